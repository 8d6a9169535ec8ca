#!/usr/bin/env bash
# Create .venv (if missing) and install vtquant with every extra. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import vtquant, torch, transformers, gguf, pytest" 2>/dev/null; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  # torch/torchvision pinned to the releases this project is tested with (pyproject keeps honest ranges)
  .venv/bin/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
  .venv/bin/python -m pip install --quiet -e ".[dev]"
fi
