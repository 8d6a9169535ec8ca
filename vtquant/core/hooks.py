"""Owned, removable forward hooks (llm-compressor's HooksMixin idea, without a global session).

Every hook that vtquant puts on a user's model goes through a :class:`HookManager`
so that calibration can never leave stray hooks behind: ``remove()`` drops all of
them, and the manager is a context manager.
"""
from __future__ import annotations

from typing import Any, Callable

import torch.nn as nn
from torch.utils.hooks import RemovableHandle


class HookManager:
    """Registers forward / pre-forward hooks and owns their handles."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []
        self.enabled = True

    def _wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if self.enabled:
                return fn(*args, **kwargs)
            return None

        return wrapped

    def forward(self, module: nn.Module, fn: Callable[..., Any], **kwargs: Any) -> RemovableHandle:
        """Register ``fn(module, inputs, output)`` as a forward hook."""
        handle = module.register_forward_hook(self._wrap(fn), **kwargs)
        self._handles.append(handle)
        return handle

    def pre_forward(self, module: nn.Module, fn: Callable[..., Any], **kwargs: Any) -> RemovableHandle:
        """Register ``fn(module, inputs)`` as a forward pre-hook."""
        handle = module.register_forward_pre_hook(self._wrap(fn), **kwargs)
        self._handles.append(handle)
        return handle

    def remove(self) -> None:
        """Remove every hook this manager registered."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __len__(self) -> int:
        return len(self._handles)

    def __enter__(self) -> "HookManager":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()
