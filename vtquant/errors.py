"""The errors vtquant raises for things a user can fix (docs/design.md "Errors name the thing").

:class:`VtquantError` is the base: its message names what is wrong (a file, a field, a value)
and what to do about it, in one line.  The ``vtquant`` command prints any of them as
``vtquant <command>: error: <message>`` on stderr and exits with status 2, without a
traceback.  Library callers catch the base class (or a subclass) the same way.

* :class:`DataError`: an input file or data set is unreadable or malformed (a text that is
  not UTF-8 or too short, a truncated model file, a corrupt image, a Karpathy split file
  missing a field).  It is also a ``ValueError``, so code that caught the ``ValueError`` of
  earlier releases keeps working.
* :class:`vtquant.config.ConfigError` (recipe and option values), :class:`vtquant.assets.AssetError`
  (named assets) and :class:`vtquant.checkpoint.CheckpointError` (saved checkpoints) subclass it
  beside their modules.
"""
from __future__ import annotations


class VtquantError(Exception):
    """An error whose message names the problem and the fix (one line)."""


class DataError(VtquantError, ValueError):
    """An input file or data set is unreadable or malformed (the message names the file and the field)."""
