"""ONNX export of a quantized decoder with QDQ nodes and the sink insertion as graph constants.

:func:`export_onnx` traces a model quantized by vtquant (``insertquant``, ``naive-static``,
with or without rotation) with the TorchScript-based ONNX exporter into a graph that
onnxruntime runs on CPU.  In the graph every quantized Linear is

* weights: an int8 initializer (the ``qweight`` codes) -> ``DequantizeLinear`` (per output
  channel, ``axis=0``; per-group weights are dequantized as ``[out * groups, group_size]``
  rows and reshaped);
* activations: ``QuantizeLinear`` -> ``DequantizeLinear`` with the static per-tensor scale
  (and zero point) from calibration; a symmetric grid ``[-127, 127]`` (or fewer bits) is
  kept exactly by a ``Clip`` before ``QuantizeLinear``, which saturates at int8/uint8 limits;
* an online input rotation (``insertquant+rotate``): its Hadamard factors as constants.

**What is static about the sinks.**  The graph is a fixed function of its input: the
content-based sink detectors of the PyTorch model (a data-dependent set of rows, types
assigned per call) are *not* in it.  It handles the sink that a plan with
``known_sinks: [first_token]`` knows in advance: **token 0 of every sequence** (prefill,
no padding, no KV cache), with one template type (``num_types == 1``).  For each guarded
Linear, row 0 of the input is replaced by zeros before ``QuantizeLinear`` (so the
per-tensor scale sees only semantic tokens, as calibrated) and row 0 of the output is
replaced after the ``MatMul`` by

* ``template`` mode: the pre-computed template output ``W t + b`` (an initializer);
* ``fp-row`` mode (or a template type not marked stable): the Linear applied to the
  full-precision row 0 with the dequantized weight;
* ``clamp`` mode: nothing (the zero row's bias output stays).

The residual restore after the cancellation layer writes its template (an initializer) into
row 0 of the residual stream.  The rows are replaced by ``Concat`` of the constant row and
the ``Slice`` of the other rows.  The graph is therefore exactly the PyTorch quantized model
for inputs whose only sinks are the first tokens; a sink token at a later position (which
the PyTorch model detects by its content) is quantized like any other token in the graph.

Export mode is applied by swapping the ``forward`` of the quantized modules of the model
for the duration of the export (:func:`export_mode`); the default PyTorch path is untouched.
"""
from __future__ import annotations

import contextlib
import types
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .core.quant import ActQuantizer, QuantLinear
from .core.templates import ResidualRestore

DEFAULT_OPSET = 17


class _DequantizeWeight(torch.autograd.Function):
    """int8 codes ``[R, C]`` x per-row scale ``[R]`` -> float; exported as ``DequantizeLinear(axis=0)``."""

    @staticmethod
    def forward(ctx: Any, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return codes.float() * scale.unsqueeze(-1)

    @staticmethod
    def symbolic(g: Any, codes: Any, scale: Any, zero: Any) -> Any:
        return g.op("DequantizeLinear", codes, scale, zero, axis_i=0)


class _QDQ(torch.autograd.Function):
    """Static per-tensor fake quantization; exported as ``[Clip] -> QuantizeLinear -> DequantizeLinear``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor, zero_q: torch.Tensor, lo: Optional[torch.Tensor],
                hi: Optional[torch.Tensor], qmin: int, qmax: int, zero_f: float) -> torch.Tensor:
        # the same arithmetic as ActQuantizer.fake_quant (static branch)
        s = scale.to(x.dtype)
        q = torch.clamp(torch.round(x / s) + zero_f, qmin, qmax)
        return (q - zero_f) * s

    @staticmethod
    def symbolic(g: Any, x: Any, scale: Any, zero_q: Any, lo: Any, hi: Any, qmin: int, qmax: int,
                 zero_f: float) -> Any:
        if lo is not None and not (hasattr(lo, "node") and lo.node().mustBeNone()):
            x = g.op("Clip", x, lo, hi)
        q = g.op("QuantizeLinear", x, scale, zero_q)
        return g.op("DequantizeLinear", q, scale, zero_q)


def _qdq(act: ActQuantizer, x: torch.Tensor) -> torch.Tensor:
    if not act.static or act.granularity != "per-tensor":
        raise NotImplementedError(f"ONNX export needs static per-tensor activations, not {act.extra_repr()}")
    qmin, qmax = act.qrange
    zero = float(act.zero_point)
    if act.symmetric:
        zero_q = torch.tensor(0, dtype=torch.int8)
        full = (-128, 127)
    else:
        zero_q = torch.tensor(int(round(zero)), dtype=torch.uint8)
        full = (0, 255)
    scale = act.scale.detach().float()
    lo = hi = None
    if (qmin, qmax) != full:  # QuantizeLinear saturates at the int8 / uint8 limits: clip to the grid first
        lo = ((qmin - zero) * scale).to(x.dtype)
        hi = ((qmax - zero) * scale).to(x.dtype)
    return _QDQ.apply(x, scale, zero_q, lo, hi, qmin, qmax, zero)


def _dequantized_weight(q: QuantLinear) -> torch.Tensor:
    if q.weight is not None:
        return q.weight
    out_f, in_f = q.qweight.shape
    groups = q.w_scale.shape[1]
    codes = q.qweight.reshape(out_f * groups, in_f // groups)
    scale = q.w_scale.reshape(-1).float()
    zero = torch.zeros(scale.shape[0], dtype=torch.int8)
    return _DequantizeWeight.apply(codes, scale, zero).reshape(out_f, in_f)


def _kron_apply(x: torch.Tensor, signs: torch.Tensor, factors: list) -> torch.Tensor:
    """:func:`~vtquant.core.rotation.kron_apply` with non-negative axes (the exporter mis-handles ``-1``)."""
    shape = x.shape
    y = (x * signs.to(x.dtype)).reshape(-1, *[f.shape[0] for f in factors])
    last = y.dim() - 1
    for axis, f in enumerate(factors, start=1):
        if axis == last:
            y = y @ f.to(x.dtype)
        else:
            y = torch.movedim(torch.movedim(y, axis, last) @ f.to(x.dtype), last, axis)
    return y.reshape(shape)


def _first_row(t: torch.Tensor) -> torch.Tensor:
    return t[:, :1]


def _replace_first_row(t: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    return torch.cat([row, t[:, 1:]], dim=1)


def _quant_linear_export_forward(self: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """QuantLinear.forward with the sink set fixed to token 0 (see the module docstring)."""
    guard = self.guard
    sink = guard is not None and guard.mode != "off"
    if self.rot_signs is not None:
        x = _kron_apply(x, self.rot_signs, self.rot_factors)
    weight = _dequantized_weight(self).to(x.dtype)
    bias = None if self.bias is None else self.bias.to(x.dtype)
    xq = _replace_first_row(x, torch.zeros_like(_first_row(x))) if sink else x
    act = self.act
    if act is not None and act.mode == "quant":
        xq = _qdq(act, xq)
    y = F.linear(xq, weight, bias)
    if not sink or guard.mode == "clamp":
        return y
    if guard.mode == "template" and bool(guard.template_ok[0]):
        row = guard.template_out[0].to(y.dtype).expand_as(_first_row(y))
    else:  # fp-row, or a template type that is not stable here
        row = F.linear(_first_row(x), weight, bias)
    return _replace_first_row(y, row)


def _restore_export_forward(self: ResidualRestore, hidden: torch.Tensor) -> torch.Tensor:
    if not self.enabled or self.state is None or not bool(self.restore_type[0]):
        return hidden
    return _replace_first_row(hidden, self.template[0].to(hidden.dtype).expand_as(_first_row(hidden)))


def _check_exportable(model: nn.Module) -> None:
    handle = getattr(model, "vtquant", None)
    if handle is None:
        raise ValueError("model is not quantized by vtquant; call vtquant.quantize_ first")
    sinks = handle.plan.get("sinks")
    if sinks:
        if "first_token" not in sinks.get("known_sinks", []) or sinks.get("num_types") != 1:
            raise NotImplementedError(
                "the static ONNX graph handles one sink type at token 0: quantize with "
                "sinks.known_sinks: [first_token] (calibration with one sink per sequence); this plan has "
                f"known_sinks={sinks.get('known_sinks')}, num_types={sinks.get('num_types')}")
        if handle.state is not None and handle.state.layout != "bsd":
            raise NotImplementedError("ONNX export supports batch-first ([B, T, C]) models")
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.act is not None and m.act.mode == "quant":
            if not m.act.static or m.act.granularity != "per-tensor":
                raise NotImplementedError(f"{m.name}: ONNX export needs static per-tensor activations")


@contextlib.contextmanager
def export_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, quantized modules of ``model`` run their ONNX-exportable forward."""
    patched = []
    try:
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.forward = types.MethodType(_quant_linear_export_forward, m)
                patched.append(m)
            elif isinstance(m, ResidualRestore):
                m.forward = types.MethodType(_restore_export_forward, m)
                patched.append(m)
        yield model
    finally:
        for m in patched:
            del m.forward


class _LogitsOnly(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # an explicit all-ones mask: no padding (and transformers skips its packed-sequence check)
        mask = torch.ones_like(input_ids)
        return self.model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits


def export_onnx(model: nn.Module, example_inputs: torch.Tensor, path: Union[str, Path], *,
                opset: int = DEFAULT_OPSET, dynamic: bool = True) -> Path:
    """Export a vtquant-quantized causal LM to ONNX: ``input_ids [B, T] (int64) -> logits [B, T, V]``.

    Args:
        model: a model quantized by :func:`vtquant.quantize_` (or loaded by :func:`vtquant.load`) on CPU.
        example_inputs: token ids ``[B, T]`` used for tracing (token 0 of each row is the sink).
        path: the ``.onnx`` file to write.
        opset: ONNX opset (>= 13 for per-axis ``DequantizeLinear``).
        dynamic: batch and sequence axes dynamic (``T >= 2``).

    Returns:
        ``path``.
    """
    if opset < 13:
        raise ValueError("per-axis DequantizeLinear needs opset >= 13")
    _check_exportable(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = _LogitsOnly(model).eval()
    axes = {"input_ids": {0: "batch", 1: "tokens"}, "logits": {0: "batch", 1: "tokens"}} if dynamic else None
    import warnings

    with export_mode(model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(wrapper, (example_inputs,), str(path), input_names=["input_ids"],
                          output_names=["logits"], dynamic_axes=axes, opset_version=opset, dynamo=False)
    return path
