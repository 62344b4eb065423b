#!/usr/bin/env bash
# Builds bench/cuda_check (torch-free CUDA validate-then-benchmark harness).
# Usage: scripts/cuda_build_standalone.sh [out_binary]   (run from anywhere)
# CUTLASS/CuTe headers: $CUTLASS_INCLUDE, else ./.cutlass (carried to the GPU
# machine), else the nvidia-cutlass pip package (not needed by the current kernels).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-build/cuda_check}
mkdir -p "$(dirname "$OUT")"
CUTLASS_INCLUDE=${CUTLASS_INCLUDE:-}
if [ -z "$CUTLASS_INCLUDE" ]; then
  if [ -d .cutlass ]; then CUTLASS_INCLUDE=.cutlass
  else CUTLASS_INCLUDE=$(python3 -c "import cutlass_library,os;print(os.path.dirname(cutlass_library.__file__)+'/source/include')" 2>/dev/null || echo .cutlass)
  fi
fi
nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a ${NVCC_EXTRA:-} \
  -Iinclude -I"$CUTLASS_INCLUDE" \
  src/kernels/layout.cpp src/kernels/cpu/reference.cpp src/kernels/cuda/*.cu bench/cuda_check.cu \
  -o "$OUT"
echo "built $OUT"
