#!/usr/bin/env bash
# `make gpu-check`: on a GPU machine that has its own PyTorch (and torchvision) but nothing else of our stack and no
# network, install the wheels `make gpu-wheels` put in .whl/ beside it, then run bench/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/mpft-gpu-site .whl/*.whl
  export PYTHONPATH=/tmp/mpft-gpu-site${PYTHONPATH:+:$PYTHONPATH}
else
  echo "gpu-check: no wheels in .whl/ (run 'make gpu-wheels' where pip can download); using what is installed" >&2
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec "$PY" bench/gpu_check.py "$@"
