#!/usr/bin/env bash
# Sets up, builds and runs the main job on the embedded default (CPU, no
# download): `salad demo` generates held-out shapes-world prompts with dense,
# sparse-only and SALAD attention from the shipped checkpoints (assets/),
# scores them and writes an HTML report (salad-demo/index.html). Then the
# operator benchmark at the CPU shape. Extra arguments go to `salad demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
scripts/build.sh
build/salad info
build/salad demo --assets assets --out salad-demo "$@"
build/salad bench-attn --shape cpu-small --iters 5
