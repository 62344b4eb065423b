#!/usr/bin/env bash
# Installs everything salad builds and tests with, on a fresh Debian 12 machine,
# unattended: Debian packages, then a Python virtual environment (.venv) with
# the pinned PyPI packages (LibTorch comes from torch==2.11.0). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
DEBS=(build-essential cmake ninja-build ccache pkg-config git
      libgtest-dev libgmock-dev libbenchmark-dev nlohmann-json3-dev libcli11-dev libpng-dev
      libavformat-dev libavcodec-dev libavutil-dev libswscale-dev
      python3 python3-venv python3-pip)
missing=()
for p in "${DEBS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install: Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi

# The venv sees the interpreter's own site-packages, so a machine that already
# has torch==2.11.0 does not download it again.
PY=${SALAD_PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv --system-site-packages .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -c 'import torch; assert torch.__version__.startswith("2.11.0"), torch.__version__; print("install: torch", torch.__version__)'
