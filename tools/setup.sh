#!/usr/bin/env bash
# Create .venv (if missing) and install vtquant with every extra. Idempotent.
# ./tools/setup.sh --llmcompressor also installs the optional llm-compressor peer (see below).
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
if [ "${1:-}" = "--llmcompressor" ]; then
  # Every llmcompressor release caps torch and transformers below the versions pinned above
  # (0.14.0.1: torch<=2.14.0, transformers<=5.17.0); a resolving install would downgrade both.
  # These exact versions were tested with --no-deps on the pinned torch / transformers
  # (tests/test_llmcompressor_peer.py). `pip install "vtquant[llmcompressor]"` in a fresh
  # environment resolves the versions llmcompressor asks for instead.
  if ! .venv/bin/python -c "import llmcompressor" 2>/dev/null; then
    .venv/bin/python -m pip install --quiet --no-deps llmcompressor==0.14.0.1 compressed-tensors==0.19.0 \
      auto-round==0.15.1 loguru==0.7.3 nvidia-ml-py py-cpuinfo
  fi
fi
