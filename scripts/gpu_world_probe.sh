#!/usr/bin/env bash
# Times world pretraining and fine-tuning steps on the GPU (to size the real run).
set -euo pipefail
S=${1:-build-gpu/salad}; W=/tmp/probe; rm -rf $W
$S world --out $W/train --count 64 --seed 1 >/dev/null
for mode in pretrain finetune; do
  if [ $mode = pretrain ]; then
    /usr/bin/time -f "pretrain 60 steps: %e s" $S pretrain --config world --data $W/train --out $W/base --steps 60 --batch 8 --device cuda --bf16 --quiet
  else
    /usr/bin/time -f "finetune 60 steps: %e s" $S finetune --model $W/base/model.safetensors --data $W/train --out $W/ft --steps 60 --batch 8 --device cuda --bf16 --quiet --lora-rank 16
  fi
done
tail -2 $W/base/metrics.jsonl $W/ft/metrics.jsonl
