"""ONNX export of a quantized model with QDQ nodes and the sink insertion as graph constants.

:func:`export_onnx` traces a model quantized by vtquant (``insertquant``, ``naive-static``,
with or without rotation) with the TorchScript-based ONNX exporter into a graph that
onnxruntime runs on CPU: a causal LM (``input_ids -> logits``) or a vision encoder such as a
timm ViT or an open_clip visual tower (``pixel_values [B, 3, H, W] -> model(x)``).  In the
graph every quantized Linear is

* weights: an int8 initializer (the ``qweight`` codes) -> ``DequantizeLinear`` (per output
  channel, ``axis=0``; per-group weights are dequantized as ``[out * groups, group_size]``
  rows and reshaped);
* activations: ``QuantizeLinear`` -> ``DequantizeLinear`` with the static per-tensor scale
  (and zero point) from calibration; a symmetric grid ``[-127, 127]`` (or fewer bits) is
  kept exactly by a ``Clip`` before ``QuantizeLinear``, which saturates at int8/uint8 limits;
* an online input rotation (``insertquant+rotate``): its Hadamard factors as constants.

**What is static about the sinks.**  The graph is a fixed function of its input: the
content-based sink detectors of the PyTorch model (a data-dependent set of rows, types
assigned per call) are *not* in it.  It handles the sinks the plan knows in advance at fixed
positions, as the model's adapter reports them at the start of each forward (the known-sink
mask of :meth:`~vtquant.adapters.ModelAdapter.install_known_sinks`, see :func:`static_sinks`):

* causal LM, ``known_sinks: [first_token]`` with one template type (``num_types == 1``):
  **token 0 of every sequence** (prefill, no padding, no KV cache), type 0;
* vision tower, ``known_sinks: [cls, registers]``: the **prefix tokens** (timm: CLS at 0,
  a distillation token, registers at ``1..R``; open_clip: CLS), each with its own fixed type.

Known positions must be the same in every row (the pooled end-of-text token of a text tower,
or left padding, are refused).  For each guarded Linear the known rows of the input are
replaced by zeros before ``QuantizeLinear`` (so the per-tensor scale sees only semantic tokens,
as calibrated) and the known rows of the output are replaced after the ``MatMul`` by, per type,

* ``template`` mode and ``template_ok`` for that type: the pre-computed template output
  ``W t + b`` (an initializer; consecutive positions share one ``[n, out]`` initializer);
* ``fp-row`` mode, or a type whose template is not stable there, or a protected type (the
  CLS a head reads): the Linear applied to the full-precision rows with the dequantized weight;
* ``clamp`` mode: nothing (the zero row's bias output stays).

The residual restore after the cancellation layer writes its template (an initializer) into
the known rows of the types it restores.  Rows are replaced by ``Concat`` of the constant or
full-precision rows and ``Slice`` s of the other rows.  The graph is therefore the PyTorch
quantized model (to float round-off and rare int8 rounding flips) for inputs whose only sinks
sit at the known positions.  **A sink found by content** (an LLM sink token at a later
position; the high-norm background patches of a ViT trained without registers) is quantized
like any other token in the graph: no zeroing, no insertion, no restore, and it enters the
static per-tensor scales that calibration set without it (values beyond the grid saturate).
The graph equals the PyTorch model in :func:`export_mode` (known sinks only) on every input;
:func:`export_onnx` warns when calibration saw such sinks.

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

from .core.quant import ActQuantizer, QuantLinear, dequantize_weight
from .core.rotation import hadamard_apply
from .core.sinks import SinkState
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
    if act.numerics != "vtquant" and not act.symmetric:
        raise NotImplementedError(f"ONNX export of asymmetric activations with {act.numerics} numerics (QuantizeLinear "
                                  "adds the zero point after rounding, that grid before): re-quantize with "
                                  "numerics: vtquant or symmetric activations")
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
    return dequantize_weight(q.qweight, q.w_scale, rowwise=lambda codes, scale: _DequantizeWeight.apply(
        codes, scale, torch.zeros(scale.shape[0], dtype=torch.int8)))


def _known_rows(state: Optional[SinkState], x: Optional[torch.Tensor] = None) -> list[tuple[int, int]]:
    """``[(position, template type), ...]`` of the sinks known in advance for the pass in flight.

    The adapter's known-sink hook (:meth:`~vtquant.adapters.ModelAdapter.install_known_sinks`)
    resets ``state`` at the start of every forward with the known mask and types (LLM: the first
    token, type 0; vision: CLS, distillation and register tokens, one fixed type each); in export
    mode no content detector runs, so that mask is the whole sink set.  The positions become
    constants of the graph, so they must be the same in every row.
    """
    if state is None:
        return []
    known = state.found_by.get("known")
    if known is None or not bool(known.any()):
        return []
    if x is not None and tuple(known.shape) != state.batch_tokens(x):
        raise NotImplementedError(f"known sink mask {tuple(known.shape)} does not match a Linear input "
                                  f"{tuple(x.shape)}: ONNX export needs [B, T, C] Linear inputs")
    if not bool((known == known[:1]).all()):
        raise NotImplementedError(
            "known sinks sit at different positions in different rows (left padding, a pooled end-of-text "
            "token...): a static ONNX graph needs them at the same positions in every row")
    positions = known[0].nonzero().flatten().tolist()
    types = state.types[0, positions].tolist() if state.types is not None else [0] * len(positions)
    if any(t < 0 for t in types):
        raise NotImplementedError(f"known sinks at {positions} carry no template type ({types})")
    return list(zip(positions, types))


def _runs(items: list[tuple[int, Any]]) -> list[tuple[int, int, list]]:
    """Group ``[(position, key), ...]`` (sorted) into runs of consecutive positions with equal keys:
    ``[(start, stop, [key, ...]), ...]``; a key of ``None`` starts no run (left out)."""
    out: list = []
    for pos, key in items:
        if key is None:
            continue
        if out and out[-1][1] == pos and _same_kind(out[-1][2][-1], key):
            out[-1] = (out[-1][0], pos + 1, out[-1][2] + [key])
        else:
            out.append((pos, pos + 1, [key]))
    return out


def _same_kind(a: Any, b: Any) -> bool:
    return (a == "fp") == (b == "fp")


def _splice(t: torch.Tensor, pieces: list[tuple[int, int, torch.Tensor]]) -> torch.Tensor:
    """``t`` ``[B, T, C]`` with rows ``start:stop`` replaced by each piece (``Slice`` + ``Concat``)."""
    if not pieces:
        return t
    parts, prev = [], 0
    for start, stop, piece in pieces:
        if start > prev:
            parts.append(t[:, prev:start])
        parts.append(piece)
        prev = stop
    parts.append(t[:, prev:])
    return torch.cat(parts, dim=1)


def _constant_rows(table: torch.Tensor, types: list[int], like: torch.Tensor) -> torch.Tensor:
    """Rows ``table[types]`` (an initializer after constant folding) broadcast over the batch of ``like``."""
    if types == list(range(types[0], types[0] + len(types))):  # consecutive types (CLS, registers): a Slice
        rows = table[types[0]:types[0] + len(types)]
    else:
        rows = table[torch.tensor(types)]
    return rows.to(like.dtype).unsqueeze(0).expand_as(like)


def _quant_linear_export_forward(self: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """QuantLinear.forward with the sink set fixed to the known positions (see the module docstring)."""
    guard = self.guard
    known = _known_rows(guard.state, x) if guard is not None and guard.zeroes_inputs else []
    if self.rot_signs is not None:
        x = hadamard_apply(x, self.rot_signs, self.rot_factors)
    weight = _dequantized_weight(self).to(x.dtype)
    bias = None if self.bias is None else self.bias.to(x.dtype)
    xq = x
    if known:  # zero the known sink rows before QuantizeLinear
        xq = _splice(x, [(a, b, torch.zeros_like(x[:, a:b])) for a, b, _ in _runs(known)])
    act = self.act
    if act is not None and act.mode == "quant":
        xq = _qdq(act, xq)
    y = F.linear(xq, weight, bias)
    if known and guard.writes_rows:  # the sink-row policy of SinkGuard, at fixed positions
        template = guard.template_types()
        keys = [(p, t if bool(template[t]) else "fp") for p, t in known]
        pieces = []
        for a, b, ks in _runs(keys):
            if ks[0] == "fp":  # fp-row, or a type whose template is not stable here (or a protected CLS)
                pieces.append((a, b, F.linear(x[:, a:b], weight, bias)))
            else:
                pieces.append((a, b, _constant_rows(guard.template_out, ks, y[:, a:b])))
        y = _splice(y, pieces)
    out_act = getattr(self, "out_act", None)  # key / value cache quantization of the output rows
    if out_act is not None and out_act.mode == "quant":
        yq = _qdq(out_act, y)  # sink rows keep their inserted (or full-precision) values
        y = _splice(yq, [(a, b, y[:, a:b]) for a, b, _ in _runs(known)]) if known else yq
    return y


def _restore_export_forward(self: ResidualRestore, hidden: torch.Tensor) -> torch.Tensor:
    if not self.enabled or self.state is None:
        return hidden
    known = _known_rows(self.state, hidden)
    keys = [(p, t if bool(self.restore_type[t]) else None) for p, t in known]
    return _splice(hidden, [(a, b, _constant_rows(self.template, ks, hidden[:, a:b])) for a, b, ks in _runs(keys)])


def _check_exportable(model: nn.Module) -> None:
    handle = getattr(model, "vtquant", None)
    if handle is None:
        raise ValueError("model is not quantized by vtquant; call vtquant.quantize_ first")
    sinks = handle.plan.sinks
    if sinks is not None:
        fixed = sinks.num_known_types is not None  # vision: one fixed type per known token
        if not sinks.known_sinks or (not fixed and sinks.num_types != 1):
            raise NotImplementedError(
                "the static ONNX graph handles sinks at positions known in advance: quantize with "
                "sinks.known_sinks: [first_token] (LLM; calibration with one sink per sequence) or [cls, registers] "
                f"(vision); this plan has known_sinks={list(sinks.known_sinks)}, num_types={sinks.num_types}")
        if handle.state is not None and handle.state.layout != "bsd":
            raise NotImplementedError("ONNX export supports batch-first ([B, T, C]) models")
    for m in model.modules():
        if not isinstance(m, QuantLinear):
            continue
        for act in (m.act, getattr(m, "out_act", None)):
            if act is not None and act.mode == "quant" and (not act.static or act.granularity != "per-tensor"):
                raise NotImplementedError(f"{m.name}: ONNX export needs static per-tensor activations "
                                          f"(and key / value cache scales), not {act.extra_repr()}")


@contextlib.contextmanager
def export_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, quantized modules of ``model`` run their ONNX-exportable forward.

    Sinks are then the known ones only (no content detection): see the module docstring.
    """
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


def static_sinks(model: nn.Module, example_inputs: torch.Tensor) -> list[tuple[int, int]]:
    """``[(position, template type), ...]`` that an exported graph of ``model`` treats as sinks.

    Runs ``model`` once on ``example_inputs`` in export mode and reads the known-sink mask its
    adapter set (LLM ``first_token``: ``[(0, 0)]``; a timm ViT with 4 registers and
    ``known_sinks: [cls, registers]``: ``[(0, 0), (1, 1), ..., (4, 4)]``).
    """
    _check_exportable(model)
    wrapper = _wrap(model).eval()
    with export_mode(model), torch.no_grad():
        wrapper(example_inputs)
    return _known_rows(model.vtquant.state)


class _LogitsOnly(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # an explicit all-ones mask: no padding (and transformers skips its packed-sequence check)
        mask = torch.ones_like(input_ids)
        return self.model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits


class _FirstOutput(nn.Module):
    """``model(x)``; a tuple / ``ModelOutput`` gives its first entry."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out if isinstance(out, torch.Tensor) else out[0]


def _is_causal_lm(model: nn.Module) -> bool:
    return getattr(getattr(model, "vtquant", None), "adapter", None) is not None and \
        model.vtquant.adapter.output_kind == "logits"


def _wrap(model: nn.Module) -> nn.Module:
    return _LogitsOnly(model) if _is_causal_lm(model) else _FirstOutput(model)


def _warn_content_sinks(model: nn.Module, known: list[tuple[int, int]]) -> None:
    """Warn when calibration found sinks the static graph does not know (found by content)."""
    report = getattr(model.vtquant, "report", None)
    seqs = getattr(report, "calib_sink_positions", None) or []
    fixed = {p for p, _ in known}
    extra = [p for p in seqs if set(p) - fixed]
    if extra:
        import warnings

        warnings.warn(
            f"calibration found sinks outside the known positions {sorted(fixed)} in {len(extra)} of {len(seqs)} "
            "sequences / images (detected by content, e.g. high-norm background patches). The ONNX graph is "
            "static: such tokens are quantized like any other token there, while the PyTorch model detects and "
            "guards them, so outputs differ on inputs that have them.", UserWarning, stacklevel=3)


def export_onnx(model: nn.Module, example_inputs: torch.Tensor, path: Union[str, Path], *,
                opset: int = DEFAULT_OPSET, dynamic: bool = True, input_name: Optional[str] = None,
                output_name: Optional[str] = None) -> Path:
    """Export a vtquant-quantized model to ONNX (QDQ nodes, known-sink insertion as constants).

    * causal LM (transformers decoder): ``input_ids [B, T] (int64) -> logits [B, T, V]``;
    * any other model (timm ViT, open_clip visual tower...): ``pixel_values [B, 3, H, W] (float) -> output``,
      what ``model(x)`` returns (timm: logits or pooled features; a tuple or ``ModelOutput`` gives
      its first entry).

    Args:
        model: a model quantized by :func:`vtquant.quantize_` (or loaded by :func:`vtquant.load`) on CPU.
        example_inputs: the input used for tracing (token ids ``[B, T]`` or images ``[B, 3, H, W]``).
        path: the ``.onnx`` file to write.
        opset: ONNX opset (>= 13 for per-axis ``DequantizeLinear``).
        dynamic: dynamic batch axis (and, for a causal LM, sequence axis, ``T >= 2``); images keep
            the traced height and width.
        input_name, output_name: graph names (default ``input_ids``/``logits`` for a causal LM,
            ``pixel_values``/``output`` otherwise).

    Returns:
        ``path``.

    Warns:
        UserWarning: when calibration found sinks outside the known positions (content-detected):
        the graph quantizes those tokens like any other (see the module docstring).
    """
    if opset < 13:
        raise ValueError("per-axis DequantizeLinear needs opset >= 13")
    _check_exportable(model)
    lm = _is_causal_lm(model)
    in_name = input_name or ("input_ids" if lm else ("pixel_values" if example_inputs.is_floating_point()
                                                      else "input_ids"))
    out_name = output_name or ("logits" if lm else "output")
    known = static_sinks(model, example_inputs)  # validates the known sink layout before tracing
    _warn_content_sinks(model, known)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = _wrap(model).eval()
    if not dynamic:
        axes = None
    elif lm:
        axes = {in_name: {0: "batch", 1: "tokens"}, out_name: {0: "batch", 1: "tokens"}}
    else:
        axes = {in_name: {0: "batch"}, out_name: {0: "batch"}}
    import warnings

    with export_mode(model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(wrapper, (example_inputs,), str(path), input_names=[in_name],
                          output_names=[out_name], dynamic_axes=axes, opset_version=opset, dynamo=False)
    return path
