"""Adapters: per-family knowledge (the core never imports a model library)."""
from .base import (ModelAdapter, UnsupportedModelError, get_adapter, register_adapter, register_fallback,
                   supported_architectures)

__all__ = ["ModelAdapter", "UnsupportedModelError", "get_adapter", "register_adapter", "register_fallback",
           "supported_architectures"]
