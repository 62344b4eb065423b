#!/usr/bin/env bash
# Sets up, builds and runs the main job on the embedded default (CPU, no download):
# the SALAD operator against dense attention at the CPU benchmark shape
# (B 1, H 2, L 8192 = 8x32x32, D 64, keep 0.10), plus the sparsity it achieves.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
scripts/build.sh
build/salad info
build/salad select --grid 8,32,32 --keep 0.10
build/salad bench-attn --shape cpu-small --iters 5 --backward "$@"
