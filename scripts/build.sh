#!/usr/bin/env bash
# Configures and builds salad into build/ (CUDA kernels compiled when nvcc exists).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
CUDA=OFF
if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then CUDA=ON; fi
CUDA=${SALAD_CUDA:-$CUDA}
cmake -S . -B build -G Ninja -DSALAD_CUDA="$CUDA" -DSALAD_PYTHON="$PWD/$PY" -Wno-dev >build.configure.log 2>&1 || {
  cat build.configure.log; exit 1; }
ninja -C build -j "${SALAD_JOBS:-$(nproc)}"
