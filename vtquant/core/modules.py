"""Module-tree surgery shared by the pipeline, the kernels and the adapters."""
from __future__ import annotations

import torch.nn as nn


def replace_module(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at the dotted path ``name`` under ``root``; returns the module that was there."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old
