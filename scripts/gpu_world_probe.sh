#!/usr/bin/env bash
# Does the world need long-range attention? For a few world variants: write
# train / held-out clips, pretrain a dense base, then held-out flow-matching
# loss dense vs training-free Top-K sparse (keep 0.10, key blocks of 64 tokens).
# Issue 5 asks for sparse >= 2x dense.
#   scripts/gpu_world_probe.sh <salad binary> <work dir>
# Env: PROBE_STEPS (800) pretrain steps; CLIPS (1000) train clips; HELD (32)
#   held-out clips; BATCH (8); DEVICE (cuda); VARIANTS ("B C D E A") which
#   variants, in order; DEADLINE_S (seconds: a variant starts only if, at the
#   pace of the longest one so far, it ends before then); OUT (the table also goes to $OUT/probe.txt, rewritten after
#   every variant); QUICK=1 (tiny counts on the CPU: checks every command line).
# Variants (salad world flags):
#   A  --preset v1                               8x32x32, flat, speed 0.06 (the first world)
#   B  --preset v2                               16x32x32, texture 0.25, speed 0.09 (world runs 2-3)
#   C  --preset v2 --texture 0.35 --speed 0.12
#   D  --preset v2 --frames 24                   24x32x32, texture 0.25
#   E  --preset v2 --texture 0                   16x32x32 flat (texture's share of B)
#   F  --preset cpu                              24x32x32, texture 0.35, speed 0.12 (world run 4, shipped)
#   G  --preset cpu --speed 0.09
set -euo pipefail
SALAD=$1; W=$2
QUICK=${QUICK:-}
STEPS=${PROBE_STEPS:-800}; CLIPS=${CLIPS:-1000}; HELD=${HELD:-32}; BATCH=${BATCH:-8}; DEV=${DEVICE:-cuda}
WARMUP=200; VIDEOS=2; EVAL_STEPS=10
if [ -n "$QUICK" ]; then
  STEPS=${PROBE_STEPS:-3}; CLIPS=${CLIPS_QUICK:-8}; HELD=4; BATCH=2; DEV=${DEVICE:-cpu}; WARMUP=1; VIDEOS=1; EVAL_STEPS=2
fi
[ "$WARMUP" -ge "$STEPS" ] && WARMUP=$(( STEPS / 4 ))
BF16=""; [ "$DEV" = cuda ] && BF16=--bf16
VARIANTS=${VARIANTS:-"B C D E A"}
DEADLINE_S=${DEADLINE_S:-999999}
OUT=${OUT:-}
flags() {
  case $1 in
    A) echo "--preset v1" ;;
    B) echo "--preset v2" ;;
    C) echo "--preset v2 --texture 0.35 --speed 0.12" ;;
    D) echo "--preset v2 --frames 24" ;;
    E) echo "--preset v2 --texture 0" ;;
    F) echo "--preset cpu" ;;
    G) echo "--preset cpu --speed 0.09" ;;
    *) echo "unknown variant '$1' (expected A B C D E F G)" >&2; return 1 ;;
  esac
}
t() { echo "[$(date +%T) +${SECONDS}s] $*" >&2; }
loss_of() { sed -n 's/.*"heldout_loss": *\([^,}]*\).*/\1/p' "$1" | tail -1; }
mkdir -p "$W"
TABLE=$W/probe.txt
printf "%-3s %-44s %6s %6s %10s %10s %7s %6s\n" variant world L kblocks dense sparse ratio secs > "$TABLE"
emit() { [ -n "$OUT" ] && { mkdir -p "$OUT"; cp "$TABLE" "$OUT/probe.txt"; } || true; }
emit
LONGEST=0
for V in $VARIANTS; do
  F=$(flags "$V")
  if [ $(( SECONDS + LONGEST )) -ge "$DEADLINE_S" ]; then t "deadline ${DEADLINE_S}s: skipping $V"; continue; fi
  START=$SECONDS; D=$W/$V; rm -rf "$D"; mkdir -p "$D"
  t "$V: world $F"
  # shellcheck disable=SC2086
  "$SALAD" world $F --out "$D/train" --count "$CLIPS" --seed 1 > "$D/world.txt"
  # shellcheck disable=SC2086
  "$SALAD" world $F --out "$D/heldout" --count "$HELD" --seed 2 > /dev/null
  # "world config: {...}" -> frames, height, width: L tokens of the 1x2x2 patch, key blocks of 64.
  CFG=$(sed -n 's/^world config: //p' "$D/world.txt")
  num() { echo "$CFG" | sed -n "s/.*\"$1\": *\([0-9.e+-]*\).*/\1/p"; }
  L=$(( $(num frames) * $(num height) * $(num width) / 4 )); KB=$(( L / 64 ))
  DESC="$(num frames)x$(num height)x$(num width) tex $(num texture) speed $(num speed)"
  t "$V: $DESC, L=$L, $KB key blocks; pretrain $STEPS steps"
  "$SALAD" pretrain --config world --data "$D/train" --out "$D/base" --steps "$STEPS" --batch "$BATCH" \
    --lr 5e-4 --warmup "$WARMUP" --shift 3 --device "$DEV" $BF16 --quiet --save-every 1000000 \
    --block-q 128 --block-k 64 > "$D/pretrain.txt"
  tail -1 "$D/base/metrics.jsonl" >&2 || true
  for M in dense sparse; do
    t "$V: eval $M"
    "$SALAD" eval --model "$D/base/model.safetensors" --data "$D/heldout" --mode $M --keep 0.10 \
      --videos $VIDEOS --loss-samples "$HELD" --steps $EVAL_STEPS --device "$DEV" --label "$V $M" \
      --out "$D/$M.jsonl" > /dev/null
  done
  DL=$(loss_of "$D/dense.jsonl"); SL=$(loss_of "$D/sparse.jsonl")
  R=$(awk -v d="$DL" -v s="$SL" 'BEGIN { if (d > 0) printf "%.2f", s / d; else print "nan" }')
  printf "%-3s %-44s %6d %6d %10.5f %10.5f %7s %6d\n" "$V" "$DESC" "$L" "$KB" "$DL" "$SL" "$R" $(( SECONDS - START )) \
    >> "$TABLE"
  emit
  [ $(( SECONDS - START )) -gt $LONGEST ] && LONGEST=$(( SECONDS - START ))
  t "$V: dense $DL sparse $SL ratio $R"
done
cat "$TABLE"
