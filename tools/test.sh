#!/usr/bin/env bash
# The test command: set up .venv if needed, then run the default (fast) test set.
# Slow tests: ./tools/test.sh -m slow ; tests that fetch real assets: ./tools/test.sh -m network
set -euo pipefail
cd "$(dirname "$0")/.."
./tools/setup.sh
exec .venv/bin/python -m pytest -q "$@"
