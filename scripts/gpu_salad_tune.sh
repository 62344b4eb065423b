#!/usr/bin/env bash
# GPU: fine-tune SALAD on the shipped base (assets/base.safetensors) and score
# dense / training-free sparse / SALAD on held-out data; builds only the CLI.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; STEPS=${STEPS:-1000}; export SALAD_CUTLASS_INCLUDE=$PWD/.cutlass
cmake -S . -B build-gpu -G Ninja -DSALAD_CUDA=ON -DSALAD_PYTHON=python3 -DSALAD_DEPS_DIR=$PWD/.devdeps -DSALAD_WERROR=OFF \
  -DSALAD_TESTS=OFF -DSALAD_CUTLASS_INCLUDE=$PWD/.cutlass -Wno-dev >/dev/null 2>&1 || exit 1
SALAD_CUTLASS_INCLUDE=$PWD/.cutlass ninja -C build-gpu -j 16 salad_cli >/tmp/build.log 2>&1 || { grep error /tmp/build.log | head; exit 1; }
S=build-gpu/salad; W=/tmp/w; R=$OUT/results.jsonl
$S world --out $W/train --count 2000 --seed 1 >/dev/null; $S world --out $W/heldout --count 64 --seed 2 >/dev/null
$S finetune --model assets/base.safetensors --data $W/train --out $W/salad --steps $STEPS --batch 8 --lr 5e-4 --warmup 50 \
  --shift 3 --device cuda --bf16 --quiet --save-every 500 --keep 0.10 --mode salad --lora-rank 16
cp $W/salad/adapter.safetensors $OUT/; cp $W/salad/metrics.jsonl $OUT/tuning.jsonl
ev() { $S eval --model assets/base.safetensors --data $W/heldout --videos 8 --loss-samples 64 --steps 20 --device cuda --out $R "$@" >/dev/null; }
ev --mode salad --adapter $W/salad/adapter.safetensors --label "SALAD keep 0.10 ($STEPS steps)"
ev --mode dense --label "dense base"
ev --mode sparse --keep 0.10 --label "sparse training-free keep 0.10"
cat $R
