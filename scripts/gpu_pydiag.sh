#!/usr/bin/env bash
# Run on the GPU machine after a build (build-gpu): checks for the Python-only
# crash of session 2 (fixed in session 3). Prints the toolchains, counts C++
# runtime code linked into libsalad.so (must be 0), triggers op errors from plain
# Python with SALAD_SEGV_TRACE=1 and resolves any crash's libsalad frames with
# addr2line; where gdb exists, runs the error tests under it.
cd "$(dirname "$0")/.."
B=${BUILD:-build-gpu}
export SALAD_LIB=$PWD/$B/libsalad.so SALAD_CLI=$PWD/$B/salad SALAD_OP_TESTS=$PWD/$B/salad_op_tests
python3 - <<'PY'
import torch, sys
print("torch", torch.__version__, "cuda", torch.version.cuda, "cxx11abi", torch._C._GLIBCXX_USE_CXX11_ABI, "python", sys.version.split()[0])
print("\n".join(l for l in torch.__config__.show().splitlines() if "COMPILER" in l or "CXX_FLAGS" in l or "Build settings" in l)[:1500])
PY
gcc --version | head -1; nvcc --version | tail -1
ldd "$SALAD_LIB" | grep -E "stdc|gcc_s"
echo "libstdc++ code inside libsalad.so (expected 0): $(nm -C --defined-only "$SALAD_LIB" | grep -c 'std::ostream::_M_insert')"
echo "== plain python"
SALAD_SEGV_TRACE=1 timeout 60 python3 - <<'PY' 2>&1 | head -12
import os, torch
torch.ops.load_library(os.environ["SALAD_LIB"])
q = torch.randn(1, 2, 24, 8)
for kw in (dict(keep=0.0), dict(block_q=0), dict(mode="nope")):
    try:
        torch.ops.salad.attention(q, q, q, [2, 3, 4], block_k=4, **kw)
        print("no error for", kw)
    except Exception as e:
        print("caught", type(e).__name__, str(e).splitlines()[0][:120])
PY
tr=/tmp/pydiag_trace.txt
SALAD_SEGV_TRACE=1 timeout 60 python3 - > "$tr" 2>&1 <<'PY'
import os, torch
torch.ops.load_library(os.environ["SALAD_LIB"])
q = torch.randn(1, 2, 24, 8)
torch.ops.salad.attention(q, q, q, [2, 3, 4], block_k=4, keep=0.0)
PY
echo "rc=$? (trace head)"; head -14 "$tr"
echo "== libsalad frames"
grep -o 'libsalad.so(+0x[0-9a-f]*)' "$tr" | sed 's/.*(+\(0x[0-9a-f]*\))/\1/' | head -8 | \
  xargs -r addr2line -f -C -i -e "$SALAD_LIB" | head -40
if command -v gdb >/dev/null; then
  echo "== gdb"
  timeout 180 gdb -q -batch -ex run -ex bt -ex "info sharedlibrary" --args python3 -m pytest -x -s -q -p no:cacheprovider \
    tests/python/test_ops.py -k bad_arguments 2>&1 | grep -vE "^\[|New Thread|Thread .* exited" | tail -60
else
  echo "no gdb"
fi
