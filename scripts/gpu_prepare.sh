#!/usr/bin/env bash
# Run here, before a GPU run: the GPU machine reaches no registry, so copy what
# the build needs from this machine's packages into ignored folders that the
# device tool carries: .devdeps (nlohmann-json, CLI11 headers, googletest
# sources) and .cutlass (CUTLASS/CuTe headers of the pinned nvidia-cutlass wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .devdeps && mkdir -p .devdeps/include
cp -r /usr/include/nlohmann /usr/include/CLI .devdeps/include/
cp -r /usr/src/googletest .devdeps/googletest
PY=.venv/bin/python; [ -x "$PY" ] || PY=python3
inc=$("$PY" -c "import cutlass_library,os;print(os.path.dirname(cutlass_library.__file__)+'/source/include')")
rm -rf .cutlass && mkdir -p .cutlass && cp -r "$inc"/cute "$inc"/cutlass .cutlass/
du -sh .devdeps .cutlass
