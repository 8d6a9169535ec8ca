"""Owned, removable forward hooks (llm-compressor's HooksMixin idea, without a global session).

Every hook that vtquant puts on a user's model goes through a :class:`HookManager`
so that calibration can never leave stray hooks behind: ``remove()`` drops all of
them, and the manager is a context manager.

Hooks survive ``copy.deepcopy`` of the model correctly: the registered callables are objects
(:class:`_Gated`), copied with the model, and the manager remembers ``(module, hook id)`` pairs,
so a copied manager removes the copy's hooks, not the original's.  Hook functions must therefore
not close over per-model state: they read it from the module they are called with (e.g. the sink
state on ``module.vtquant_sink_state``) or are callable objects holding it.
"""
from __future__ import annotations

from typing import Any, Callable

import torch.nn as nn
from torch.utils.hooks import RemovableHandle

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
               "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


class _Gated:
    """A hook that runs only while its manager is enabled (an object, so deepcopy copies it)."""

    def __init__(self, manager: "HookManager", fn: Callable[..., Any]) -> None:
        self.manager = manager
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.manager.enabled:
            return self.fn(*args, **kwargs)
        return None


class HookManager:
    """Registers forward / pre-forward hooks and owns them."""

    def __init__(self) -> None:
        self._hooks: list[tuple[nn.Module, int]] = []
        self.enabled = True

    def forward(self, module: nn.Module, fn: Callable[..., Any], **kwargs: Any) -> RemovableHandle:
        """Register ``fn(module, inputs, output)`` as a forward hook."""
        handle = module.register_forward_hook(_Gated(self, fn), **kwargs)
        self._hooks.append((module, handle.id))
        return handle

    def pre_forward(self, module: nn.Module, fn: Callable[..., Any], **kwargs: Any) -> RemovableHandle:
        """Register ``fn(module, inputs)`` as a forward pre-hook."""
        handle = module.register_forward_pre_hook(_Gated(self, fn), **kwargs)
        self._hooks.append((module, handle.id))
        return handle

    def remove(self) -> None:
        """Remove every hook this manager registered."""
        for module, hook_id in self._hooks:
            for name in _HOOK_DICTS:
                table = getattr(module, name, None)
                if table is not None:
                    table.pop(hook_id, None)
        self._hooks.clear()

    def __len__(self) -> int:
        return len(self._hooks)

    def __enter__(self) -> "HookManager":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()
