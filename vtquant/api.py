"""Public API: ``quantize_`` (in place), ``save`` and ``load`` (torchao-style verbs).

``save`` and ``load`` live in :mod:`vtquant.checkpoint` and are re-exported here.

Example::

    import vtquant
    recipe = vtquant.load_recipe("recipes/hf/smollm2-135m.yaml")
    report = vtquant.quantize_(model, recipe, calib=batches)
    vtquant.save(model, "out/")
    model = vtquant.load("out/")
"""
from __future__ import annotations

from typing import Any, Iterable

import torch.nn as nn

from .adapters import get_adapter
from .checkpoint import FORMAT_VERSION, CheckpointError, load, save  # noqa: F401  (re-exported)
from .config import ConfigError, Recipe
from .core.pipeline import QuantReport, quantize_model_


def quantize_(model: nn.Module, recipe: Recipe, calib: Iterable, *, adapter: Any = None,
              quiet: bool = False, pipeline: str = "basic", device: Any = None,
              cache_device: Any = None) -> QuantReport:
    """Quantize ``model`` in place, where it sits (CPU or GPU), in its dtype (float32 / bfloat16 / float16).

    Args:
        model: a supported model (see ``vtquant.adapters.supported_architectures()``).
        recipe: a :class:`~vtquant.config.Recipe` (e.g. from :func:`vtquant.load_recipe`).
        calib: calibration batches (token id tensors ``[B, T]`` for LLMs).
        adapter: an explicit adapter; chosen from the model class by default.
        quiet: no progress bars.
        pipeline: ``basic`` (whole-model calibration passes) or ``sequential`` (block by block: one
            block's weights and Hessians on the accelerator at a time; the same plan and weights).
        device: with ``sequential``, the device blocks run on (e.g. ``"cuda"`` for a model kept on the CPU).
        cache_device: with ``sequential``, where cached block inputs wait (default: ``device``).

    Returns:
        A :class:`~vtquant.core.pipeline.QuantReport`; also on ``model.vtquant.report``.  A
        vision-language model (LLaVA, Idefics3 / SmolVLM, Qwen2-VL) is forwarded to
        :func:`vtquant.vlm.quantize_vlm_` (basic pipeline only) and gives its
        :class:`~vtquant.vlm.VLMReport` (one report per part).
    """
    if getattr(model, "vtquant", None) is not None:
        raise RuntimeError("this model is already quantized by vtquant; load a fresh full-precision model")
    from .adapters.hf_vlm import is_vlm

    if adapter is None and is_vlm(model):
        if pipeline != "basic" or device is not None or cache_device is not None:
            raise ConfigError(f"{type(model).__name__}: vision-language models are quantized with pipeline='basic' "
                              "(every pass runs the whole model); move it with model.to(device) first")
        from .vlm import quantize_vlm_

        return quantize_vlm_(model, recipe, calib, quiet=quiet)
    adapter = adapter or get_adapter(model)
    report = quantize_model_(model, adapter, recipe, calib, quiet=quiet, pipeline=pipeline, device=device,
                             cache_device=cache_device)
    model.vtquant.recipe = recipe
    return report
