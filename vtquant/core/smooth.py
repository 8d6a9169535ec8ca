"""SmoothQuant (Xiao et al., 2023): migrate activation outliers into the weights, per input channel.

For every norm -> readers group of the adapter's :class:`~vtquant.core.rotation.RotationSpec`
(the same groups the rotation folds into: ``input_layernorm -> q/k/v``,
``post_attention_layernorm -> gate/up`` for LLaMA) the smoothing factor of input channel ``j``
is

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

with ``max|X_j|`` the calibration maximum of the norm output (= the readers' input) and
``max|W_j|`` the largest weight of column ``j`` over all readers.  ``X diag(1/s)`` is folded into
the norm (its scale, and its bias if it has one) and ``diag(s) W^T`` into every reader, so the
model is unchanged in exact arithmetic; only then are weights and activations quantized.
Massive-activation channels get a large ``s_j`` (they shrink in X, grow in W).

The module knows no model family: the spec says which modules form a group and how a norm's
effective scale relates to its ``weight`` (``norm_scale``; assumed ``weight + constant``, true for
RMSNorm, LayerNorm and Gemma's ``1 + w``).  Post-norms (Gemma-2/3's sandwich norms) have no Linear
readers and are left alone; the pre-norms in front of the readers carry the smoothing.  A layout
whose Linears read the residual stream with no norm in front (OLMo-2) has nowhere to put ``1/s``:
:func:`smoothing_blocker` says why and :func:`smooth_model_` refuses it before touching anything.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn as nn

from ..config import ConfigError
from .rotation import RotationSpec


def smoothing_blocker(spec: RotationSpec) -> "str | None":
    """Why smoothing cannot be folded into ``spec``'s model, or ``None`` when it can."""
    raw = [lin for layer in spec.layers for lin in getattr(layer, "raw_readers", ())]  # LN towers have none
    if raw:
        return (f"{spec.short_names(raw, 3)} read the residual stream with no norm in front of them "
                f"({spec.layout}), so no norm scale can absorb the 1/s of smoothing (the residual stream itself "
                "cannot be rescaled either: the final norm is not invariant to a per-channel scale)")
    if not smoothing_groups(spec):
        return f"no norm -> Linear readers group in this model ({getattr(spec, 'layout', None) or 'unknown layout'})"
    return None


def check_smoothable(spec: RotationSpec) -> None:
    """Raise a :class:`~vtquant.config.ConfigError` naming why smoothing cannot fold, if it cannot."""
    reason = smoothing_blocker(spec)
    if reason is not None:
        raise ConfigError(f"smoothquant is refused for this model: {reason}. Use another method (insertquant, "
                          "naive-static, dynamic-token, rotate).")


def smoothing_groups(spec: RotationSpec) -> list[tuple[nn.Module, list[nn.Linear]]]:
    """The (norm, readers) groups smoothed: every block's norm -> readers pair (not the final norm / head)."""
    return [(norm, list(readers)) for layer in spec.layers for norm, readers in layer.norm_readers]


@torch.no_grad()
def collect_input_absmax(groups: list, run: Callable[[], None]) -> list[torch.Tensor]:
    """Per-channel max |x| of each group's norm output over the calibration batches run by ``run()``."""
    maxima: list = [None] * len(groups)
    handles = []
    for i, (norm, _) in enumerate(groups):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor, i: int = i) -> None:
            m = output.detach().abs().reshape(-1, output.shape[-1]).amax(dim=0).float().cpu()
            maxima[i] = m if maxima[i] is None else torch.maximum(maxima[i], m)
        handles.append(norm.register_forward_hook(hook))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    if any(m is None for m in maxima):
        raise RuntimeError("smoothquant: a norm saw no calibration data; run calibration batches through the model")
    return maxima


def smoothing_factors(act_absmax: torch.Tensor, readers: Iterable[nn.Linear], alpha: float,
                      eps: float = 1e-5) -> torch.Tensor:
    """``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)`` (float64), clamped away from zero."""
    w_max = torch.stack([lin.weight.detach().abs().double().amax(dim=0) for lin in readers]).amax(dim=0)
    a = act_absmax.double().to(w_max.device).clamp_min(eps)
    s = a.pow(alpha) / w_max.clamp_min(eps).pow(1.0 - alpha)
    return s.clamp_min(eps)


@torch.no_grad()
def smooth_group_(norm: nn.Module, readers: list[nn.Linear], s: torch.Tensor,
                  norm_scale: Callable[[nn.Module], torch.Tensor]) -> None:
    """Fold ``1/s`` into the norm's output and ``s`` into the readers' input columns (exact in float)."""
    scale = norm_scale(norm).detach().double()
    new_scale = scale / s.to(scale.device)
    # norm_scale(norm) = weight + c (c = 0 or 1): shift the stored weight by the change of the scale
    norm.weight.data = (norm.weight.data.double() + (new_scale - scale)).to(norm.weight.dtype)
    bias = getattr(norm, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.data = (bias.data.double() / s.to(bias.device)).to(bias.dtype)
    for lin in readers:
        lin.weight.data = (lin.weight.data.double() * s.to(lin.weight.device).unsqueeze(0)).to(lin.weight.dtype)


@torch.no_grad()
def smooth_model_(spec: RotationSpec, run: Callable[[], None], alpha: float) -> dict:
    """Calibrate (``run()`` pushes the calibration batches through the model) and smooth in place.

    Returns:
        ``{"alpha", "groups", "max_factor", "max_act_absmax"}`` for the report.

    Raises:
        ConfigError: the layout gives smoothing nowhere to fold (:func:`smoothing_blocker`).
    """
    check_smoothable(spec)
    groups = smoothing_groups(spec)
    maxima = collect_input_absmax(groups, run)
    max_s, max_a = 0.0, 0.0
    for (norm, readers), act in zip(groups, maxima):
        s = smoothing_factors(act, readers, alpha)
        smooth_group_(norm, readers, s, spec.norm_scale)
        max_s, max_a = max(max_s, float(s.max())), max(max_a, float(act.max()))
    return {"alpha": float(alpha), "groups": len(groups), "max_factor": round(max_s, 3),
            "max_act_absmax": round(max_a, 3)}
