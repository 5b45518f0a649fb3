#!/usr/bin/env bash
# Creates .venv (if missing) and installs idml with its dependencies. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test,onnx,cpu]'  # cpu: faiss-cpu (GPU machines: gpu)
