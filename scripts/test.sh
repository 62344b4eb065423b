#!/usr/bin/env bash
# Sets up (scripts/install.sh), builds and runs every test: C++ (GoogleTest via
# ctest) and Python (pytest). CUDA tests skip where no GPU is visible.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
scripts/build.sh
export PATH="$PWD/.venv/bin:$PATH"
cd build && ctest --output-on-failure --timeout 1800
