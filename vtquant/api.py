"""Public API: ``quantize_`` (in place), ``save`` and ``load`` (torchao-style verbs).

Example::

    import vtquant
    recipe = vtquant.load_recipe("recipes/hf/smollm2-135m.yaml")
    report = vtquant.quantize_(model, recipe, calib=batches)
    vtquant.save(model, "out/")
    model = vtquant.load("out/")
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch.nn as nn

from .adapters import get_adapter
from .adapters.base import _REGISTRY, _import_builtin_adapters
from .config import Recipe
from .core.pipeline import QuantReport, apply_plan_, quantize_model_
from .recipe import recipe_from_dict, recipe_to_yaml

FORMAT_VERSION = 1


def quantize_(model: nn.Module, recipe: Recipe, calib: Iterable, *, adapter: Any = None,
              quiet: bool = False) -> QuantReport:
    """Quantize ``model`` in place.

    Args:
        model: a supported model (see ``vtquant.adapters.supported_architectures()``).
        recipe: a :class:`~vtquant.config.Recipe` (e.g. from :func:`vtquant.load_recipe`).
        calib: calibration batches (token id tensors ``[B, T]`` for LLMs).
        adapter: an explicit adapter; chosen from the model class by default.
        quiet: no progress bars.

    Returns:
        A :class:`~vtquant.core.pipeline.QuantReport`; also on ``model.vtquant.report``.
    """
    if getattr(model, "vtquant", None) is not None:
        raise RuntimeError("this model is already quantized by vtquant; load a fresh full-precision model")
    adapter = adapter or get_adapter(model)
    report = quantize_model_(model, adapter, recipe, calib, quiet=quiet)
    model.vtquant.recipe = recipe
    return report


def save(model: nn.Module, path: Union[str, os.PathLike], *, compact_embeddings: Optional[str] = None) -> Path:
    """Save a quantized model: ``model.safetensors`` + ``vtquant.json`` (plan, recipe, model config, report).

    The directory is written to a temporary sibling and moved into place, so an
    interrupted save never leaves a half-written checkpoint.

    Args:
        compact_embeddings: ``None`` (default) stores every tensor as it is; ``"int8"`` (per-row
            codes + scales) or ``"bf16"`` stores the full-precision embedding table and output head
            compactly on disk (see :mod:`vtquant.storage`); :func:`load` restores float tables.
    """
    from safetensors.torch import save_model

    handle = getattr(model, "vtquant", None)
    if handle is None:
        raise ValueError("model is not quantized by vtquant; call vtquant.quantize_(model, recipe, calib) first")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        storage = None
        if compact_embeddings is not None:
            from .storage import save_compact

            storage = save_compact(model, str(tmp / "model.safetensors"), compact_embeddings)
        else:
            save_model(model, str(tmp / "model.safetensors"))
        _usual_permissions(tmp)
        meta = {
            "format_version": FORMAT_VERSION,
            "adapter": type(handle.adapter).__name__,
            "model": handle.adapter.config_dict(),
            "plan": handle.plan.to_dict(),
            "recipe_yaml": recipe_to_yaml(handle.recipe) if getattr(handle, "recipe", None) else None,
            "report": handle.report.to_dict() if handle.report else None,
        }
        if storage is not None:
            meta["storage"] = storage
        (tmp / "vtquant.json").write_text(json.dumps(meta, indent=1))
        if getattr(handle, "recipe", None):
            (tmp / "recipe.yaml").write_text(recipe_to_yaml(handle.recipe))
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _usual_permissions(folder: Path) -> None:
    """mkdtemp makes 0700 folders (and safetensors may write 0600 files): give the checkpoint the
    permissions of a normally created folder, as the user's umask says."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for child in folder.iterdir():
        os.chmod(child, 0o666 & ~umask)


def load(path: Union[str, os.PathLike], *, device: Optional[str] = None) -> nn.Module:
    """Load a checkpoint written by :func:`save`; returns the quantized model in eval mode."""
    from safetensors.torch import load_model

    path = Path(path)
    meta_file = path / "vtquant.json"
    if not meta_file.exists():
        raise FileNotFoundError(f"{path} is not a vtquant checkpoint (no vtquant.json); save one with vtquant.save()")
    meta = json.loads(meta_file.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {meta.get('format_version')} is not supported "
                         f"(this vtquant reads {FORMAT_VERSION})")
    _import_builtin_adapters()
    adapter_cls = next((c for c in _REGISTRY.values() if c.__name__ == meta["adapter"]), None)
    if adapter_cls is None:
        raise ValueError(f"{path}: adapter {meta['adapter']!r} is not available; import the module that defines it")
    model = adapter_cls.from_config_dict(meta["model"])
    adapter = adapter_cls(model)
    apply_plan_(model, adapter, meta["plan"])
    if meta.get("recipe_yaml"):
        import yaml

        model.vtquant.recipe = recipe_from_dict(yaml.safe_load(meta["recipe_yaml"]))
    if device is not None:
        model.to(device)
    if meta.get("storage"):
        from .storage import load_compact

        load_compact(model, str(path / "model.safetensors"), meta["storage"], device=device or "cpu")
    else:
        load_model(model, str(path / "model.safetensors"), strict=True, device=device or "cpu")
    return model.eval()
