"""Quantizers and the quantized Linear (fake quantization; real kernels live in ``vtquant.kernels``).

* weights: symmetric round-to-nearest, per output channel or per group of input columns,
  stored as int8 codes plus scales (so checkpoints are small);
* activations: per-tensor static (scale from calibration, symmetric or asymmetric) or
  per-token dynamic; sink rows are excluded from the observers (docs/method.md step 6).

A :class:`QuantLinear` optionally carries an online input rotation, a
:class:`~vtquant.core.sinks.SinkDetector` (on probe Linears) and a
:class:`~vtquant.core.templates.SinkGuard` (clamp and insert).  All of them are
child modules or buffers, so ``print(model)`` shows the whole quantization.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ActArgs, WeightArgs
from .rotation import hadamard_apply


def quantize_weight(weight: torch.Tensor, args: WeightArgs,
                    clip: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric RTN weight quantization.

    Args:
        weight: ``[out, in]``.
        args: bits and granularity.
        clip: optional clip ratios ``[out, groups]`` (e.g. from :func:`vtquant.core.gptq.search_weight_clip`):
            the scale is ``clip * absmax / qmax``.

    Returns:
        ``(codes int8 [out, in], scales float [out, groups])``.
    """
    out_f, in_f = weight.shape
    qmax = 2 ** (args.bits - 1) - 1
    w = weight.detach().float()
    if args.granularity == "per-group":
        if in_f % args.group_size != 0:
            raise ValueError(
                f"per-group weight quantization needs in_features ({in_f}) divisible by group_size "
                f"({args.group_size}); choose a divisor or use per-channel"
            )
        groups = in_f // args.group_size
        wg = w.view(out_f, groups, args.group_size)
    else:
        groups = 1
        wg = w.view(out_f, 1, in_f)
    scale = wg.abs().amax(dim=-1).clamp_min(1e-12) / qmax  # [out, groups]
    if clip is not None:
        scale = scale * clip.to(scale).reshape(out_f, groups)
    codes = torch.clamp(torch.round(wg / scale.unsqueeze(-1)), -qmax - 1, qmax).to(torch.int8)
    return codes.view(out_f, in_f), scale


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor,
                      rowwise: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """``codes [out, in]`` x ``scale [out, groups]`` -> float ``[out, in]``.

    ``rowwise(codes [R, C], scale [R]) -> float [R, C]`` replaces the elementwise product on the
    ``[out * groups, group]`` view (the ONNX export passes a ``DequantizeLinear`` op).
    """
    out_f, in_f = codes.shape
    groups = scale.shape[1]
    if rowwise is not None:
        return rowwise(codes.reshape(out_f * groups, in_f // groups), scale.reshape(-1).float()).reshape(out_f, in_f)
    return (codes.view(out_f, groups, in_f // groups).float() * scale.unsqueeze(-1)).view(out_f, in_f)


def ct_qparams(lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int,
               symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors' ``calculate_qparams`` for int grids: ``(scale, zero point)`` from a range.

    The range is widened to hold 0; symmetric: ``scale = max(|lo|, |hi|) / ((qmax - qmin) / 2)``, zero 0;
    asymmetric: ``scale = (hi - lo) / (qmax - qmin)``, zero ``round(clamp(qmin - lo / scale, qmin, qmax))``
    (int8 there, held as float here); a zero scale becomes the dtype's eps.  Computed in ``lo``'s dtype.
    """
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    span = torch.tensor(float(qmax - qmin), dtype=lo.dtype, device=lo.device)
    if symmetric:
        scale = torch.maximum(lo.abs(), hi.abs()) / (span / 2)
        zero = torch.zeros_like(scale)
    else:
        scale = (hi - lo) / span
        zero = torch.round(torch.clamp(qmin - lo / scale, qmin, qmax))
    scale = torch.where(scale == 0, torch.tensor(torch.finfo(scale.dtype).eps, dtype=scale.dtype,
                                                 device=scale.device), scale)
    if not symmetric:  # a zero range: compressed-tensors divided by 0 above (nan -> clamp), then round
        zero = torch.nan_to_num(zero, nan=0.0)
    return scale, zero


class ActQuantizer(nn.Module):
    """Activation fake-quantizer with a MinMax observer.

    Modes: ``observe`` (collect ranges, pass through), ``quant`` (quantize), ``off``.
    """

    def __init__(self, args: ActArgs) -> None:
        super().__init__()
        self.bits = args.bits
        self.granularity = args.granularity
        self.static = args.static
        self.symmetric = args.symmetric
        self.clip_ratio = float(args.clip_ratio)
        self.numerics = getattr(args, "numerics", "vtquant")
        self.mode = "quant" if not self.static else "observe"
        self.register_buffer("observed_min", torch.tensor(float("inf")))
        self.register_buffer("observed_max", torch.tensor(float("-inf")))
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0.0))

    def extra_repr(self) -> str:
        kind = "static" if self.static else "dynamic"
        sym = "sym" if self.symmetric else "asym"
        text = f"bits={self.bits}, {self.granularity}, {kind}, {sym}, mode={self.mode}"
        if self.numerics != "vtquant":
            text += f", numerics={self.numerics}"
        if self.static:
            text += f", scale={float(self.scale):.4g}"
        return text

    @property
    def qrange(self) -> tuple[int, int]:
        """The integer grid: ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` symmetric / ``[0, 2^b - 1]`` asymmetric, or
        compressed-tensors' ``[-2^(b-1), 2^(b-1) - 1]`` for both (``numerics: compressed-tensors``)."""
        if self.numerics == "compressed-tensors":
            return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        if self.symmetric:
            return -(2 ** (self.bits - 1)) + 1, 2 ** (self.bits - 1) - 1
        return 0, 2 ** self.bits - 1

    @torch.no_grad()
    def observe(self, rows: torch.Tensor, keep: Optional[torch.Tensor] = None) -> None:
        """Update the range from ``rows`` ``[N, C]``; rows where ``keep`` is False are ignored."""
        if keep is not None:
            rows = rows[keep]
        if rows.numel() == 0:
            return
        self.observed_min.copy_(torch.minimum(self.observed_min, rows.min().float()))
        self.observed_max.copy_(torch.maximum(self.observed_max, rows.max().float()))

    @torch.no_grad()
    def finalize(self) -> None:
        """Turn the observed range into the static scale / zero point and switch to ``quant``."""
        if not torch.isfinite(self.observed_max):
            raise RuntimeError("activation observer saw no data; run calibration before finalize()")
        lo, hi = self.observed_min * self.clip_ratio, self.observed_max * self.clip_ratio
        qmin, qmax = self.qrange
        if self.numerics == "compressed-tensors":
            scale, zero = ct_qparams(lo, hi, qmin, qmax, self.symmetric)
            self.scale.copy_(scale)
            self.zero_point.copy_(zero)
        elif self.symmetric:
            self.scale.copy_(torch.maximum(lo.abs(), hi.abs()).clamp_min(1e-8) / qmax)
            self.zero_point.zero_()
        else:
            lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
            self.scale.copy_(((hi - lo) / (qmax - qmin)).clamp_min(1e-8))
            self.zero_point.copy_(torch.round(qmin - lo / self.scale))
        self.mode = "quant"

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        qmin, qmax = self.qrange
        if self.numerics == "compressed-tensors":
            return self._fake_quant_ct(x, qmin, qmax)
        if self.static:
            scale, zero = self.scale.to(x.dtype), self.zero_point.to(x.dtype)
        else:  # per-token dynamic
            if self.symmetric:
                scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / qmax
                zero = torch.zeros_like(scale)
            else:
                lo = x.amin(dim=-1, keepdim=True).clamp(max=0)
                hi = x.amax(dim=-1, keepdim=True).clamp(min=0)
                scale = ((hi - lo) / (qmax - qmin)).clamp_min(1e-8)
                zero = torch.round(qmin - lo / scale)
        q = torch.clamp(torch.round(x / scale) + zero, qmin, qmax)
        return (q - zero) * scale

    def _fake_quant_ct(self, x: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
        """compressed-tensors' quantize-dequantize (``_quantize_dequantize``), op for op."""
        if self.static:
            scale, zero = self.scale.to(x.dtype), self.zero_point.to(x.dtype)
        else:  # per token: compressed-tensors reduces over every dim but the first two ([B, T, C] -> per token)
            scale, zero = ct_qparams(x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True), qmin, qmax,
                                     self.symmetric)
        scaled = x / scale + zero
        q = torch.round(torch.clamp(scaled, qmin, qmax))
        return (q - zero) * scale


class QuantLinear(nn.Module):
    """A Linear with int8-coded weights, an activation quantizer and optional sink handling.

    Forward order: detect sinks on the raw input -> rotate -> zero sink rows -> quantize
    -> matmul -> write the sink rows' outputs (template, or full-precision activations).
    """

    def __init__(
        self,
        linear: nn.Linear,
        weights: Optional[WeightArgs],
        activations: Optional[ActArgs],
        name: str = "",
        skeleton: bool = False,
    ) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.name = name
        self.w_bits = weights.bits if weights else None
        self.w_granularity = weights.granularity if weights else None
        dev = linear.weight.device
        # the dtype the Linear computes in (the model's dtype); follows .to() / .half() (see _apply)
        self.compute_dtype = linear.weight.dtype
        if weights is not None:
            if skeleton:
                groups = 1 if weights.granularity == "per-channel" else self.in_features // weights.group_size
                codes = torch.zeros(self.out_features, self.in_features, dtype=torch.int8, device=dev)
                scale = torch.ones(self.out_features, groups, device=dev)
            else:
                codes, scale = quantize_weight(linear.weight, weights)
            self.register_buffer("qweight", codes)
            self.register_buffer("w_scale", scale)
            self.weight = None
        else:
            self.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.act = ActQuantizer(activations) if activations is not None else None
        # online input rotation diag(signs) (F_1 kron ... kron F_k): rebuilt from the recipe's seed,
        # so it is not stored in checkpoints (it is the same matrix in every layer)
        self.register_buffer("rot_signs", None, persistent=False)
        self.rot_factors: list[torch.Tensor] = []
        # key / value cache quantizer (applied to this Linear's output rows, sink rows excepted)
        self.out_act: Optional[ActQuantizer] = None
        # calibration-time callback ``fn(rows [N, in], keep [N] or None, sink_rows [S, in] or None)``:
        # the rows the activation quantizer sees (rotated, sink rows zeroed; ``keep`` False on sink
        # rows) and the sink rows that are multiplied by the weight in full precision (fp-row)
        self.input_observer = None
        self.detector = None
        self.guard = None
        self._w_cache: Optional[torch.Tensor] = None  # float32 dequantized weight
        self._w_cast: Optional[torch.Tensor] = None  # the same in a lower compute dtype (bf16 / fp16 models)

    def extra_repr(self) -> str:
        text = f"in_features={self.in_features}, out_features={self.out_features}"
        if self.w_bits:
            text += f", w_bits={self.w_bits} ({self.w_granularity})"
        if self.rot_signs is not None:
            sizes = "x".join(str(f.shape[0]) for f in self.rot_factors)
            text += f", online_rotation=hadamard({sizes})"
        if self.out_act is not None:
            text += f", kv_cache=({self.out_act.extra_repr()})"
        return text

    def set_input_rotation(self, signs: torch.Tensor, factors: list) -> None:
        """Rotate inputs online by ``diag(signs) (F_1 kron ... kron F_k)`` (weights must absorb it)."""
        device = self.bias.device if self.bias is not None else (
            self.qweight.device if self.weight is None else self.weight.device)
        if device.type == "meta":  # a skeleton built on meta (checkpoint loading): factors are values, not weights
            device = signs.device
        self.rot_signs = signs.contiguous().to(device)
        self.rot_factors = [f.contiguous().to(device) for f in factors]

    @property
    def has_input_rotation(self) -> bool:
        return self.rot_signs is not None

    @property
    def device(self) -> torch.device:
        """Where this Linear's weights live (modules the pipeline creates for it go there too)."""
        if self.weight is not None:
            return self.weight.device
        return self.qweight.device

    def quantize_weights_(self, args: WeightArgs, clip: Optional[torch.Tensor] = None) -> None:
        """Replace the full-precision weight by RTN int8 codes + scales (in place)."""
        codes, scale = quantize_weight(self.weight, args, clip=clip)
        self.set_quantized_weight_(codes, scale, args)

    def set_quantized_weight_(self, codes: torch.Tensor, scale: torch.Tensor, args: WeightArgs) -> None:
        """Install int8 ``codes [out, in]`` and ``scale [out, groups]`` (from RTN or GPTQ) in place of the weight."""
        if codes.shape != (self.out_features, self.in_features) or codes.dtype != torch.int8:
            raise ValueError(f"{self.name}: codes must be int8 [{self.out_features}, {self.in_features}], "
                             f"got {codes.dtype} {list(codes.shape)}")
        self.weight = None
        self.register_buffer("qweight", codes)
        self.register_buffer("w_scale", scale)
        self.w_bits, self.w_granularity = args.bits, args.granularity
        self._w_cache = None
        self._w_cast = None

    def dequantized_weight(self, cache: bool = True) -> torch.Tensor:
        """The weight in full precision: the float weight, or codes x scales in float32.

        Args:
            cache: keep the float32 dequantized weight for the next call (the fake-quant forward of
                float32 models); one-off readers pass ``False`` so a large model does not hold a float32
                copy of every weight.
        """
        if self.weight is not None:
            return self.weight
        if self._w_cache is not None and self._w_cache.device == self.qweight.device:
            return self._w_cache
        w = dequantize_weight(self.qweight, self.w_scale)
        if cache:
            self._w_cache = w
        return w

    def _weight_for(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight the forward multiplies by, in ``dtype`` (cached once per dtype and device)."""
        if self.weight is not None or dtype == torch.float32:
            return self.dequantized_weight().to(dtype)
        w = self._w_cast
        if w is None or w.dtype != dtype or w.device != self.qweight.device:
            w = self._w_cast = dequantize_weight(self.qweight, self.w_scale).to(dtype)  # = float32 then cast
        return w

    def _apply(self, fn, recurse=True):  # keep the caches coherent with .to()/.half()
        self._w_cache = None
        self._w_cast = None
        result = super()._apply(fn, recurse)
        if self.rot_signs is not None:
            self.rot_factors = [f.to(self.rot_signs.device) for f in self.rot_factors]
        if self.weight is not None:
            self.compute_dtype = self.weight.dtype
        else:  # what the conversion does to a floating tensor of the old compute dtype
            self.compute_dtype = fn(torch.empty(0, dtype=self.compute_dtype, device=self.qweight.device)).dtype
        return result

    def _load_from_state_dict(self, *args, **kwargs):
        self._w_cache = None
        self._w_cast = None
        return super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.detector is not None:
            self.detector(x)
        guard = self.guard
        state = guard.state if guard is not None else None
        mask = state.mask_for(x) if (state is not None and guard.mode != "off") else None
        if self.rot_signs is not None:
            x = hadamard_apply(x, self.rot_signs, self.rot_factors)
        weight = self._weight_for(x.dtype)
        rows = None
        if mask is not None:
            rows = state.rows(x)
            flat_mask = mask.reshape(-1)
            sink_rows = rows[flat_mask]
            xq_rows = rows.masked_fill(flat_mask.unsqueeze(-1), 0.0)
        else:
            xq_rows = x
        if self.input_observer is not None:
            self.input_observer(xq_rows.reshape(-1, xq_rows.shape[-1]), None if mask is None else ~flat_mask,
                                None if mask is None else guard.rows_through_weight(sink_rows, flat_mask, state))
        act = self.act
        if act is not None:
            if act.mode == "observe":
                if mask is not None and guard.exclude_from_calibration:
                    act.observe(rows, keep=~flat_mask)
                else:
                    act.observe(x.reshape(-1, x.shape[-1]))
            elif act.mode == "quant":
                xq_rows = act.fake_quant(xq_rows)
        y = F.linear(xq_rows, weight, None if self.bias is None else self.bias.to(x.dtype))
        if mask is not None:
            y = guard.write_sink_rows(y, sink_rows, flat_mask, state, weight, self.bias)
        out_act = self.out_act
        if out_act is not None and out_act.mode != "off":
            y = self._quantize_output(y, out_act, flat_mask if mask is not None else None,
                                      guard is not None and guard.exclude_from_calibration)
        if mask is not None:
            y = state.unrows(y, x)
        return y

    @staticmethod
    def _quantize_output(y: torch.Tensor, out_act: "ActQuantizer", flat_mask: Optional[torch.Tensor],
                         exclude: bool) -> torch.Tensor:
        """Cache quantization of the output rows; sink rows (``flat_mask``) keep their inserted values."""
        rows = y.reshape(-1, y.shape[-1])
        if out_act.mode == "observe":
            out_act.observe(rows, keep=None if (flat_mask is None or not exclude) else ~flat_mask)
            return y
        yq = out_act.fake_quant(rows)
        if flat_mask is not None:
            yq = torch.where(flat_mask.unsqueeze(-1), rows, yq)
        return yq.view_as(y)
