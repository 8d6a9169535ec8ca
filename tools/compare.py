#!/usr/bin/env python
"""Same as ``vtquant compare``: methods x bit settings on one model, one table + JSON rows + PNG chart.

Example: ``python tools/compare.py --settings W8A8 --results-file runs/compare.json --plot compare.png``
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vtquant.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
