#!/usr/bin/env bash
# Run on the GPU machine (device tool, carry [".devdeps", ".cutlass"]): build
# against the machine's own PyTorch, run every test (CUDA ones included), then
# the benchmarks. Logs go to $OUT; a short table is printed last.
#   scripts/gpu_run.sh [test] [sanitize] [prof] [clock] [lines] [bench] [bwdloss] [ab] [ncuab] [order] [dit] [ditprof] [dit14] [world]   (default: test bench sanitize)
# Env TARGETS: ninja targets to build (default: all), e.g. salad_cli; `none` as the
# only stage just builds.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
what=${*:-test bench sanitize}
has() { [[ " $what " == *" $1 "* ]]; }
exec > >(tee -a "$OUT/gpu.log") 2>&1
export SALAD_CUTLASS_INCLUDE=$PWD/.cutlass
t0=$(date +%s)
cmake -S . -B build-gpu -G Ninja -DSALAD_CUDA=ON -DSALAD_PYTHON=python3 -DSALAD_DEPS_DIR=$PWD/.devdeps -DSALAD_WERROR=OFF \
  -DCMAKE_CUDA_COMPILER=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc) -Wno-dev >"$OUT/configure.log" 2>&1 \
  || { tail -40 "$OUT/configure.log"; exit 1; }
ninja -C build-gpu -j 16 ${TARGETS:-} >"$OUT/build.log" 2>&1 || { grep -E "error|Error" "$OUT/build.log" | head -40; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
nvidia-smi --query-gpu=name,driver_version,memory.total,serial,uuid --format=csv,noheader
if has test; then
  (cd build-gpu && SALAD_SEGV_TRACE=1 ctest --output-on-failure --timeout ${CTEST_TIMEOUT:-300}) >"$OUT/test.log" 2>&1
  grep -E "tests passed|tests failed|Failure|FAILED|PASSED|SKIPPED|Expected|actual|Which is|fatal signal" "$OUT/test.log" | head -40
fi
if has sanitize; then
  for tool in memcheck racecheck; do
    SALAD_TEST_QUICK=1 timeout ${SANITIZE_TIMEOUT:-200} compute-sanitizer --tool $tool --error-exitcode 9 build-gpu/salad_op_tests \
      --gtest_filter='SM90_Attention.ForwardAndBackward*' >"$OUT/sanitize_$tool.log" 2>&1
    echo "compute-sanitizer $tool: rc=$? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|PASSED|FAILED' "$OUT/sanitize_$tool.log" | tail -2 | tr '\n' ' ')"
  done
fi
if has prof; then
  # Per-kernel time of one SALAD forward + backward at Wan1.3B-480p (ncu, kernels serialised).
  ncu --target-processes all --metrics gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__throughput.avg.pct_of_peak_sustained_elapsed \
    --csv build-gpu/salad bench-attn --shape wan1.3b-480p --device cuda --iters 1 --warmup 0 --backward --variants salad \
    >"$OUT/ncu.csv" 2>"$OUT/ncu.err" || tail -5 "$OUT/ncu.err"
  python3 scripts/ncu_table.py "$OUT/ncu.csv" | grep -v ' at::' || true
fi
if has clock; then
  # The same per-kernel times at the card's own clock (ncu locks it by default: 1.37 GHz on the H200s,
  # which puts compute-bound kernels ~25% above their share of a benchmark run).
  ncu --clock-control none --metrics gpu__time_duration.sum --csv build-gpu/salad bench-attn --shape wan1.3b-480p \
    --device cuda --iters 1 --warmup 0 --backward --variants salad >"$OUT/ncu_clock.csv" 2>"$OUT/ncu_clock.err" \
    || tail -5 "$OUT/ncu_clock.err"
  python3 scripts/ncu_table.py "$OUT/ncu_clock.csv" | grep -v ' at::' || true
fi
if has lines; then
  # Per-instruction counters (ncu SourceCounters) of the first launch of each kernel in KERNELS
  # (name substrings) at Wan1.3B-480p, as SASS tables for scripts/ncu_lines.py: $OUT/<kernel>_sass.csv.
  for k in ${KERNELS:-apply_fwd_mma state_mma_kernel}; do
    ncu -k regex:$k -c 1 --section SourceCounters --section WarpStateStats --section SchedulerStats -f -o /tmp/lines_$k \
      build-gpu/salad bench-attn --shape wan1.3b-480p --device cuda --iters 1 --warmup 0 --backward --variants salad \
      >/dev/null 2>&1 || echo "lines: ncu failed for $k"
    ncu -i /tmp/lines_$k.ncu-rep --page source --csv --print-source sass >"$OUT/${k}_sass.csv" 2>/dev/null
    ncu -i /tmp/lines_$k.ncu-rep --page details >>"$OUT/lines_details.txt" 2>/dev/null
  done
fi
if has bench; then
  for shape in wan1.3b-480p wan14b-480p wan14b-720p; do
    timeout 180 build-gpu/salad bench-attn --shape $shape --device cuda --iters 20 --warmup 5 --backward \
      --queued 3 --variants sdpa,sparse,salad 2>&1 | tail -12
  done
fi
if has bwdloss; then
  # The backward as sessions 1-10 timed it (backward of sum(o * dO) over the outputs), for comparison.
  timeout 180 build-gpu/salad bench-attn --shape wan1.3b-480p --device cuda --iters 20 --warmup 5 --backward \
    --queued 3 --bwd-grad loss --variants sdpa,sparse,salad 2>&1 | tail -12
fi
if has ab; then
  # A/B of kernel switches at Wan1.3B-480p, same build and card: one bench per setting
  # (env AB: space-separated items, each VAR=value[,VAR=value...]; "-" is the default build).
  for e in ${AB:--}; do
    echo "== $e"
    if [ "$e" = - ]; then env_set=(); else IFS=, read -ra env_set <<<"$e"; fi
    env "${env_set[@]}" timeout 120 build-gpu/salad bench-attn --shape wan1.3b-480p --device cuda --iters 20 --warmup 5 \
      --backward --variants sdpa,salad 2>&1 | tail -4
  done
fi
if has order; then
  # The Wan1.3B-480p bench in both orders (--order interleaved | blocked), then SDPA alone and SALAD
  # alone for ~2 s each, with the SM clock and the board power sampled every 20 ms (nvidia-smi):
  # does the dense baseline's power draw lower the clock that the next variant runs at?
  run_clocked() {  # name, bench-attn arguments...
    local name=$1; shift
    nvidia-smi --query-gpu=clocks.sm,power.draw --format=csv,noheader,nounits -lms 20 >/tmp/clk_$name.csv &
    local smi=$!
    timeout 180 build-gpu/salad bench-attn --shape wan1.3b-480p --device cuda "$@" 2>&1 | tail -${TAIL:-12}
    kill $smi; wait $smi 2>/dev/null
    python3 - /tmp/clk_$name.csv "$name" <<'PY'
import sys, statistics as st
rows = [l.split(",") for l in open(sys.argv[1]) if l.count(",") == 1]
clk = [float(a) for a, b in rows if a.strip().replace(".", "").isdigit()]
pw = [float(b) for a, b in rows if b.strip().replace(".", "").isdigit()]
busy = [c for c, p in zip(clk, pw) if p > 200]
print(f"clocks {sys.argv[2]}: {len(clk)} samples, SM MHz median {st.median(clk):.0f} (min {min(clk):.0f}); "
      f"under load (>200 W) median {st.median(busy) if busy else 0:.0f} MHz, power median {st.median(pw):.0f} W, max {max(pw):.0f} W")
PY
  }
  for o in interleaved blocked; do
    run_clocked $o --iters 20 --warmup 5 --backward --queued 3 --order $o --variants sdpa,sparse,salad
  done
  TAIL=3 run_clocked sdpa_alone --iters 150 --warmup 20 --variants sdpa
  TAIL=3 run_clocked salad_alone --iters 1200 --warmup 100 --variants salad
fi
if has ncuab; then
  # Kernel-level A/B at the card's clock: the launches of kernels matching KERNELS (a regex) in one
  # SALAD forward + backward at Wan1.3B-480p, once per AB setting (as for `ab`), same build.
  for e in ${AB:--}; do
    echo "== ncu $e"
    if [ "$e" = - ]; then env_set=(); else IFS=, read -ra env_set <<<"$e"; fi
    f="$OUT/ncuab_$(echo "$e" | tr -c 'A-Za-z0-9' '_').csv"
    env "${env_set[@]}" ncu --clock-control none -k regex:"${KERNELS:-.}" --metrics gpu__time_duration.sum --csv \
      build-gpu/salad bench-attn --shape wan1.3b-480p --device cuda --iters 1 --warmup 0 --backward --variants salad \
      >"$f" 2>/dev/null || echo "ncuab: ncu failed for $e"
    python3 scripts/ncu_table.py "$f" | grep -v ' at::' || true
  done
fi
if has dit; then
  build-gpu/salad bench-dit --config wan2.1-1.3b --frames 81 --height 480 --width 832 --device cuda --iters 3 \
    --warmup 1 --modes dense,salad --fused both 2>&1 | tail -16
fi
if has ditprof; then
  # Every kernel of one DiT step in launch order (ncu, one built block; bias adds, copies, GEMMs):
  # random-weight init first, then the step, the attention op alone, the self-attention alone, the block.
  ncu --metrics gpu__time_duration.sum --csv build-gpu/salad bench-dit --config wan2.1-1.3b --frames 81 --height 480 \
    --width 832 --device cuda --iters 1 --warmup 0 --modes ${DIT_MODES:-salad} --fused on --layers 1 \
    >"$OUT/dit_ncu.csv" 2>"$OUT/dit_ncu.err" || tail -5 "$OUT/dit_ncu.err"
  python3 scripts/ncu_table.py "$OUT/dit_ncu.csv" | tail -80
fi
if has dit14; then
  # Issue 4's memory check and 14B step: Wan2.1-14B at 720p, 81 frames, bf16 random weights.
  build-gpu/salad bench-dit --config wan2.1-14b --frames 81 --height 720 --width 1280 --device cuda --iters 1 \
    --warmup 0 --modes dense,salad --fused both 2>&1 | tail -12
fi
if has world; then
  DEADLINE_S=${DEADLINE_S:-440} COPY_TO=$OUT scripts/world_experiment.sh build-gpu/salad /tmp/world cuda 2>&1 | tail -30
fi
