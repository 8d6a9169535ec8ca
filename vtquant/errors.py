"""The base of vtquant's own errors: the CLI prints any of them as one line (no traceback)."""
from __future__ import annotations


class VtquantError(Exception):
    """An error whose message names the problem and the fix."""
