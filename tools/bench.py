#!/usr/bin/env python
"""Thin script over `vtquant bench` (same arguments): real low-bit speed on CPU or GPU."""
import sys

from vtquant.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
