#!/usr/bin/env bash
# The reproduction table of docs/RESULTS.md on the shapes world, in one script:
# data, the dense base (pretrain), training-free sparse rows, sparse + LoRA,
# SALAD (the paper's budget: 2,000 clips, 1,600 steps, batch 8) and ablations.
#   scripts/world_experiment.sh <salad binary> <work dir> <device> [quick]
# "quick" shrinks every count for a smoke run. Rows go to <work>/results.jsonl.
set -euo pipefail
SALAD=$1; W=$2; DEV=${3:-cuda}; QUICK=${4:-}
CLIPS=2000; HELD=64; PRE_STEPS=${PRE_STEPS:-2000}; FT_STEPS=1600; ABL_STEPS=${ABL_STEPS:-200}; BATCH=8; VIDEOS=8; EVAL_STEPS=20
if [ "$QUICK" = quick ]; then CLIPS=16; HELD=8; PRE_STEPS=4; FT_STEPS=3; ABL_STEPS=2; BATCH=2; VIDEOS=2; EVAL_STEPS=2; fi
BF16=""; [ "$DEV" = cuda ] && BF16=--bf16
mkdir -p "$W"; R=$W/results.jsonl; : > "$R"
t() { echo "[$(date +%T)] $*" >&2; }
# DEADLINE_S: seconds after which the remaining stages are skipped (the GPU call has a hard limit).
DEADLINE_S=${DEADLINE_S:-999999}
left() { if [ $SECONDS -ge $DEADLINE_S ]; then t "deadline reached: skipping $*"; return 1; fi; }
# COPY_TO: a folder that receives results.jsonl, the base, the SALAD adapter and its log as soon as they exist.
COPY_TO=${COPY_TO:-}
keep() { [ -n "$COPY_TO" ] && cp "$@" "$COPY_TO"/ || true; }

t world; "$SALAD" world --out "$W/train" --count $CLIPS --seed 1 >/dev/null
"$SALAD" world --out "$W/heldout" --count $HELD --seed 2 >/dev/null
rm -f "$W"/train/index.json "$W"/heldout/index.json 2>/dev/null || true

t pretrain; "$SALAD" pretrain --config world --data "$W/train" --out "$W/base" --steps $PRE_STEPS --batch $BATCH \
  --lr 5e-4 --warmup 200 --shift 3 --device $DEV $BF16 --quiet --save-every 1000 --block-q 128 --block-k 64
BASE=$W/base/model.safetensors
[ -n "$COPY_TO" ] && cp "$BASE" "$COPY_TO/base.safetensors" && cp "$W/base/metrics.jsonl" "$COPY_TO/pretrain.jsonl" || true
ev() { "$SALAD" eval --model "$BASE" --data "$W/heldout" --videos $VIDEOS --loss-samples $HELD --steps $EVAL_STEPS \
  --device $DEV --out "$R" "$@" >/dev/null; keep "$R"; }
t eval training-free
ev --mode dense --label "dense base"
for k in 0.25 0.10 0.05; do ev --mode sparse --keep $k --label "sparse training-free keep $k"; done

ft() {  # label, then finetune args
  local name=$1; shift
  "$SALAD" finetune --model "$BASE" --data "$W/train" --out "$W/$name" --batch $BATCH --lr 1e-3 --warmup 50 --shift 3 \
    --device $DEV $BF16 --quiet --save-every 400 --keep 0.10 "$@"
}
t SALAD; ft salad --steps $FT_STEPS --mode salad --lora-rank 16
[ -n "$COPY_TO" ] && cp "$W/salad/adapter.safetensors" "$COPY_TO/adapter.safetensors" && cp "$W/salad/metrics.jsonl" "$COPY_TO/tuning.jsonl" || true
ev --mode salad --adapter "$W/salad/adapter.safetensors" --label "SALAD keep 0.10"
ev --mode salad --adapter "$W/salad/adapter.safetensors" --drop-linear 0.25 --label "SALAD keep 0.10, linear branch dropped in 1 of 4 layers (smallest |s|)"
left "sparse + LoRA" && { t "sparse + LoRA"; ft sparse_lora --steps $FT_STEPS --mode sparse --trainable lora --lora-rank 16
ev --mode sparse --keep 0.10 --adapter "$W/sparse_lora/adapter.safetensors" --label "sparse + LoRA keep 0.10"; }
for g in none static dynamic; do
  left "ablation gate $g" || continue
  t "ablation gate $g"; ft "gate_$g" --steps $ABL_STEPS --mode salad --lora-rank 16 --gate $g
  ev --mode salad --adapter "$W/gate_$g/adapter.safetensors" --label "ablation ($ABL_STEPS steps): gate $g"
done
left "ablation static_dynamic" && { t "ablation static_dynamic"; ft gate_sd --steps $ABL_STEPS --mode salad --lora-rank 16
ev --mode salad --adapter "$W/gate_sd/adapter.safetensors" --label "ablation ($ABL_STEPS steps): gate static_dynamic"; }
left "ablation no linear rope" && { t "ablation no linear rope"; ft norope --steps $ABL_STEPS --mode salad --lora-rank 16 --no-linear-rope
ev --mode salad --adapter "$W/norope/adapter.safetensors" --label "ablation ($ABL_STEPS steps): linear rope off"; }
t done; cat "$R"
