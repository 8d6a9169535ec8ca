"""Run a callback right after a module of another package is imported (a post-import hook).

vtquant registers itself with transformers (a quantization method) and lm-evaluation-harness (a
model class) without importing either when ``import vtquant`` runs: importing transformers'
quantizer registry alone costs seconds, and most vtquant users never need it.  A meta-path finder
wraps the loader of the named module; when the module has been executed, the callback runs.  If the
module is already imported, the callback runs at once.  A failing callback only logs a warning: it
must never break the other package.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import logging
import sys
from typing import Any, Callable

log = logging.getLogger(__name__)

_CALLBACKS: dict[str, list[Callable[[], Any]]] = {}


def _run(name: str, callbacks: list) -> None:
    for callback in callbacks:
        try:
            callback()
        except Exception as err:  # never break the other package for vtquant's sake
            log.warning("vtquant: could not register with %s (%s: %s)", name.split(".")[0], type(err).__name__, err)


class _RunAfterExec(importlib.abc.Loader):
    def __init__(self, loader: Any, name: str) -> None:
        self.loader = loader
        self.name = name

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.loader.exec_module(module)
        _run(self.name, _CALLBACKS.pop(self.name, []))


class _PostImportFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in _CALLBACKS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _RunAfterExec(spec.loader, fullname)
        return spec


def when_imported(name: str, callback: Callable[[], Any]) -> None:
    """Call ``callback()`` once module ``name`` is imported (now, if it already is)."""
    if name in sys.modules:
        _run(name, [callback])
        return
    _CALLBACKS.setdefault(name, []).append(callback)
    if not any(isinstance(f, _PostImportFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PostImportFinder())
