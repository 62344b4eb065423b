#!/usr/bin/env bash
# The reproduction table of docs/RESULTS.md on the shapes world, in one script:
# data, the dense base (pretrain), training-free sparse rows, SALAD (the paper's
# budget: 2,000 clips, 1,600 steps, batch 8), sparse + LoRA, a dense + LoRA
# control and the ablations.
#   scripts/world_experiment.sh <salad binary> <work dir> <device> [quick]
# "quick" shrinks every count for a smoke run. Rows go to <work>/results.jsonl.
#
# Environment:
#   STAGES      stages to run, in this order (default: all)
#               "pretrain free salad lora control ablate"
#   ADAPTER     an existing SALAD adapter for the "salad" stage; skips its tuning
#   BASE        an existing dense base; skips pretraining (a GPU call is at most
#               10 minutes, so the table is made in two calls: the second one
#               passes the first one's base)
#   WORLD_ARGS  extra `salad world` flags (default: the "cpu" preset)
#   PRE_STEPS, FT_STEPS, ABL_STEPS, LORA_RANK: step counts and rank
#   DEADLINE_S  seconds after which the remaining stages are skipped
#   COPY_TO     a folder that receives results.jsonl, the base, the SALAD adapter
#               and the logs as soon as they exist
set -euo pipefail
SALAD=$1; W=$2; DEV=${3:-cuda}; QUICK=${4:-}
CLIPS=2000; HELD=64; PRE_STEPS=${PRE_STEPS:-2000}; FT_STEPS=${FT_STEPS:-1600}; ABL_STEPS=${ABL_STEPS:-400}
BATCH=8; VIDEOS=8; EVAL_STEPS=20; LORA_RANK=${LORA_RANK:-16}
if [ "$QUICK" = quick ]; then CLIPS=16; HELD=8; PRE_STEPS=4; FT_STEPS=3; ABL_STEPS=2; BATCH=2; VIDEOS=2; EVAL_STEPS=2; fi
STAGES=${STAGES:-pretrain free salad lora control ablate}
WORLD_ARGS=${WORLD_ARGS:-}
BF16=""; [ "$DEV" = cuda ] && BF16=--bf16
mkdir -p "$W"; R=$W/results.jsonl; touch "$R"
t() { echo "[$(date +%T)] $*" >&2; }
DEADLINE_S=${DEADLINE_S:-999999}
left() { if [ $SECONDS -ge $DEADLINE_S ]; then t "deadline reached: skipping $*"; return 1; fi; }
has() { [[ " $STAGES " == *" $1 "* ]]; }
COPY_TO=${COPY_TO:-}
keep() { [ -n "$COPY_TO" ] && cp "$@" "$COPY_TO"/ || true; }

t world
# shellcheck disable=SC2086
[ -f "$W/train/sample_000000.safetensors" ] || "$SALAD" world --out "$W/train" --count $CLIPS --seed 1 $WORLD_ARGS >/dev/null
# shellcheck disable=SC2086
[ -f "$W/heldout/sample_000000.safetensors" ] || "$SALAD" world --out "$W/heldout" --count $HELD --seed 2 $WORLD_ARGS >/dev/null

BASE=${BASE:-$W/base/model.safetensors}
if has pretrain; then
  t pretrain; "$SALAD" pretrain --config world --data "$W/train" --out "$W/base" --steps $PRE_STEPS --batch $BATCH \
    --lr 5e-4 --warmup 200 --shift 3 --device $DEV $BF16 --quiet --save-every 500 --block-q 128 --block-k 64
  BASE=$W/base/model.safetensors
  [ -n "$COPY_TO" ] && cp "$BASE" "$COPY_TO/base.safetensors" && cp "$W/base/metrics.jsonl" "$COPY_TO/pretrain.jsonl" || true
fi
[ -f "$BASE" ] || { echo "BASE: expected a dense base at $BASE (run the pretrain stage or pass BASE=...)" >&2; exit 2; }

ev() { "$SALAD" eval --model "$BASE" --data "$W/heldout" --videos $VIDEOS --loss-samples $HELD --steps $EVAL_STEPS \
  --device $DEV --out "$R" "$@" >/dev/null; keep "$R"; }
ft() {  # name, then finetune args
  local name=$1; shift
  "$SALAD" finetune --model "$BASE" --data "$W/train" --out "$W/$name" --batch $BATCH --lr 1e-3 --warmup 50 --shift 3 \
    --device $DEV $BF16 --quiet --save-every 400 --keep 0.10 "$@"
  keep "$W/$name/metrics.jsonl" 2>/dev/null || true
}

if has free; then
  t eval training-free
  ev --mode dense --label "dense base"
  for k in 0.25 0.10 0.05; do ev --mode sparse --keep $k --label "sparse training-free keep $k"; done
fi
if has salad && left SALAD; then
  AD=${ADAPTER:-$W/salad/adapter.safetensors}
  if [ -z "${ADAPTER:-}" ]; then
    t SALAD; ft salad --steps $FT_STEPS --mode salad --lora-rank $LORA_RANK
    [ -n "$COPY_TO" ] && cp "$W/salad/adapter.safetensors" "$COPY_TO/adapter.safetensors" && cp "$W/salad/metrics.jsonl" "$COPY_TO/tuning.jsonl" || true
  fi
  ev --mode salad --adapter "$AD" --label "SALAD keep 0.10"
  ev --mode salad --adapter "$AD" --drop-linear 0.2 \
    --label "SALAD keep 0.10, linear branch dropped in the 20% of layers with the smallest |s|"
fi
if has lora && left "sparse + LoRA"; then
  t "sparse + LoRA"; ft sparse_lora --steps $FT_STEPS --mode sparse --trainable lora --lora-rank $LORA_RANK
  ev --mode sparse --keep 0.10 --adapter "$W/sparse_lora/adapter.safetensors" --label "sparse + LoRA keep 0.10"
fi
if has control && left "dense + LoRA"; then
  # Control: the same LoRA budget with dense attention (how much of the gain is just more training).
  t "dense + LoRA"; ft dense_lora --steps $FT_STEPS --mode dense --trainable lora --lora-rank $LORA_RANK
  ev --mode dense --adapter "$W/dense_lora/adapter.safetensors" --label "control: dense + LoRA (same budget)"
fi
if has ablate; then
  for g in none static dynamic; do
    left "ablation gate $g" || continue
    t "ablation gate $g"; ft "gate_$g" --steps $ABL_STEPS --mode salad --lora-rank $LORA_RANK --gate $g
    ev --mode salad --adapter "$W/gate_$g/adapter.safetensors" --label "ablation ($ABL_STEPS steps): gate $g"
  done
  left "ablation static_dynamic" && { t "ablation static_dynamic"; ft gate_sd --steps $ABL_STEPS --mode salad --lora-rank $LORA_RANK
  ev --mode salad --adapter "$W/gate_sd/adapter.safetensors" --label "ablation ($ABL_STEPS steps): gate static_dynamic"; }
  left "ablation no linear rope" && { t "ablation no linear rope"; ft norope --steps $ABL_STEPS --mode salad --lora-rank $LORA_RANK --no-linear-rope
  ev --mode salad --adapter "$W/norope/adapter.safetensors" --label "ablation ($ABL_STEPS steps): linear rope off"; }
fi
t done; cat "$R"
