"""Real int8 / FP8 Linear modules and ``convert_`` (see the package docstring)."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.quant import QuantLinear, dequantize_weight
from ..core.rotation import kron_apply

BACKENDS = ("cpu-int8", "cuda-int8", "cuda-fp8")
FP8_MAX = 448.0


class UnsupportedConversionError(ValueError):
    """The fake-quant model cannot be run with real kernels as configured."""


def int_mm(q: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """``torch._int_mm`` (int8 x int8 -> int32); pads the rows where the CUDA kernel needs more than 16."""
    m = q.shape[0]
    if q.is_cuda and m <= 16:
        padded = torch.zeros((32, q.shape[1]), dtype=q.dtype, device=q.device)
        padded[:m] = q
        return torch._int_mm(padded, w_t)[:m]
    return torch._int_mm(q, w_t)


class SharedInput:
    """Lets Linears that read the same input tensor share one quantization and one matmul.

    The first member called computes the concatenated output for all members and caches
    the others' slices; each later member takes its slice if it is called with the very
    same input tensor, else computes alone.
    """

    def __init__(self, members: list["RealQuantLinear"]) -> None:
        self.members = members
        self.sizes = [m.out_features for m in members]
        self._key = None
        self._outputs: dict[int, torch.Tensor] = {}
        for i, m in enumerate(members):
            m.group, m.group_index = self, i
        device = members[0].qweight.device
        self.qweight = torch.cat([m.qweight for m in members], 0).contiguous().to(device)
        self.out_scale = torch.cat([m.out_scale for m in members], 0)
        biases = [m.bias if m.bias is not None else torch.zeros(m.out_features, device=device) for m in members]
        self.bias = torch.cat(biases) if any(m.bias is not None for m in members) else None

    @staticmethod
    def key(x: torch.Tensor) -> tuple:
        return (x.data_ptr(), tuple(x.shape), x._version)

    def take(self, index: int, x: torch.Tensor) -> Optional[torch.Tensor]:
        if self._key == self.key(x) and index in self._outputs:
            return self._outputs.pop(index)
        return None

    def store(self, x: torch.Tensor, outputs: list[torch.Tensor], caller: int) -> None:
        self._key = self.key(x)
        self._outputs = {i: o for i, o in enumerate(outputs) if i != caller}


class RealQuantLinear(nn.Module):
    """A Linear executed with int8 or FP8 operands (static per-tensor activations, per-channel weights)."""

    def __init__(self, fake: QuantLinear, backend: str) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise UnsupportedConversionError(f"backend {backend!r}; choose one of {BACKENDS}")
        act = fake.act
        if fake.weight is not None or fake.w_bits is None:
            raise UnsupportedConversionError(f"{fake.name}: weights are not quantized; real kernels need W8")
        if fake.w_bits != 8 or fake.w_granularity != "per-channel":
            raise UnsupportedConversionError(
                f"{fake.name}: real kernels run W8 per-channel weights; this layer has {fake.w_bits}-bit "
                f"{fake.w_granularity} (keep it fake-quant or re-quantize with weights.bits: 8)")
        if act is None or not act.static or act.granularity != "per-tensor" or not act.symmetric or act.bits != 8:
            raise UnsupportedConversionError(
                f"{fake.name}: real kernels run symmetric per-tensor static 8-bit activations "
                "(method naive-static or insertquant with activations.bits: 8, symmetric: true)")
        if fake.out_act is not None:
            raise UnsupportedConversionError(
                f"{fake.name}: key / value cache quantization (recipe.kv_cache) has no real kernel yet; "
                "convert a model quantized with kv_cache: null, or evaluate this one in fake quantization")
        self.backend = backend
        self.name = fake.name
        self.in_features, self.out_features = fake.in_features, fake.out_features
        a_scale = float(act.scale)
        w_scale = fake.w_scale[:, 0].float()
        if backend == "cuda-fp8":
            w = dequantize_weight(fake.qweight, fake.w_scale)
            w_scale = (w.abs().amax(dim=1) / FP8_MAX).clamp_min(1e-12)
            qweight = (w / w_scale.unsqueeze(1)).to(torch.float8_e4m3fn)
            a_scale = a_scale * 127.0 / FP8_MAX  # same clipping range, FP8 grid
        else:
            qweight = fake.qweight.clone()
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("w_scale", w_scale.contiguous())
        self.register_buffer("a_scale", torch.tensor(a_scale, device=fake.qweight.device))
        self._a_scale_value = a_scale
        self.register_buffer("out_scale", (w_scale * a_scale).contiguous())
        self.register_buffer("w_scale_row", w_scale.float().reshape(1, -1).contiguous(), persistent=False)
        self._scale_a_cache: dict = {}
        self._sink_out_key = None
        self._sink_out: Optional[torch.Tensor] = None
        self.bias = None if fake.bias is None else nn.Parameter(fake.bias.detach().clone(), requires_grad=False)
        self.rot_signs, self.rot_factors = fake.rot_signs, fake.rot_factors
        self.detector = fake.detector
        self.guard = fake.guard
        self.w_fp = None
        if self.guard is not None and (self.guard.mode == "fp-row" or not bool(self.guard.template_ok.all())):
            self.w_fp = dequantize_weight(fake.qweight, fake.w_scale)  # only for full-precision sink rows
        self.group: Optional[SharedInput] = None
        self.group_index = 0

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        self._scale_a_cache = {}
        if self.rot_signs is not None:
            self.rot_signs = fn(self.rot_signs)
            self.rot_factors = [fn(f) for f in self.rot_factors]
        return result

    def extra_repr(self) -> str:
        text = (f"in_features={self.in_features}, out_features={self.out_features}, backend={self.backend}, "
                f"a_scale={float(self.a_scale):.4g}")
        if self.group is not None:
            text += f", shares input with {len(self.group.members) - 1} more"
        return text

    # -- quantize / matmul ---------------------------------------------------------------
    def _quantize(self, x2: torch.Tensor) -> torch.Tensor:
        if x2.is_cuda:  # one fused pass (Triton); int8 rounds half away from zero there
            from .triton_quant import quant_static

            dtype = torch.float8_e4m3fn if self.backend == "cuda-fp8" else torch.int8
            return quant_static(x2, self._a_scale_value, dtype)
        return torch.round(x2 / self.a_scale).clamp_(-127, 127).to(torch.int8)  # same op as the fake quantizer

    def _matmul(self, q: torch.Tensor, qweight: torch.Tensor, out_scale: torch.Tensor,
                bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
        if self.backend == "cuda-fp8":
            m = q.shape[0]
            scale_a = self._scale_a_cache.get(m)
            if scale_a is None:  # the static scale as the row-scale vector _scaled_mm wants, made once per M
                scale_a = self._scale_a_cache[m] = self.a_scale.float().reshape(1, 1).expand(m, 1).contiguous()
            scale_b = self.w_scale_row if out_scale is self.out_scale else (
                out_scale / self.a_scale).float().reshape(1, -1).contiguous()
            return torch._scaled_mm(q, qweight.t(), scale_a=scale_a, scale_b=scale_b, bias=bias,
                                    out_dtype=torch.bfloat16).to(out_dtype)
        if q.is_cuda:  # int8 GEMM with the rescale (and bias) fused in its epilogue (Triton)
            from .triton_quant import int8_matmul_scaled

            return int8_matmul_scaled(q, qweight, out_scale, None, bias, out_dtype)
        acc = int_mm(q, qweight.t())
        y = acc * out_scale
        if bias is not None:
            y += bias
        return y.to(out_dtype)

    def _zero_rows(self, q: torch.Tensor, index: torch.Tensor) -> None:
        target = q.view(torch.uint8) if q.dtype == torch.float8_e4m3fn else q
        target.index_fill_(0, index, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.detector is not None:
            self.detector(x)
        if self.group is not None and self.group_index > 0:
            cached = self.group.take(self.group_index, x)
            if cached is not None:
                return cached
        state = self.guard.state if self.guard is not None and self.guard.mode != "off" else None
        index = state.flat_index() if (state is not None and state.mask_for(x) is not None) else None
        x2 = state.rows(x) if state is not None else x.reshape(-1, x.shape[-1])
        if self.rot_signs is not None:
            x2 = kron_apply(x2, self.rot_signs, self.rot_factors)
        q = self._quantize(x2)
        if index is not None:
            self._zero_rows(q, index)
        group = self.group if (self.group is not None and self.group_index == 0) else None
        if group is not None:
            y_all = self._matmul(q, group.qweight, group.out_scale, group.bias, x.dtype)
            parts = list(torch.split(y_all, group.sizes, dim=-1))
            outs = []
            for member, part in zip(group.members, parts):
                if index is not None:
                    part = part.contiguous()
                    member._write_sinks(part, x2, index, state)
                outs.append(part if state is None else state.unrows(part, x))
            if state is None:
                outs = [o.reshape(*x.shape[:-1], o.shape[-1]) for o in outs]
            group.store(x, outs, 0)
            return outs[0]
        y = self._matmul(q, self.qweight, self.out_scale, self.bias, x.dtype)
        if index is not None:
            self._write_sinks(y, x2, index, state)
        return y.reshape(*x.shape[:-1], self.out_features) if state is None else state.unrows(y, x)

    def _write_sinks(self, y: torch.Tensor, x2: torch.Tensor, index: torch.Tensor, state: Any) -> None:
        """Write the sink rows' outputs (template or full precision): O(#sinks)."""
        guard = self.guard
        types = state.types.reshape(-1).index_select(0, index).clamp_min(0)
        if guard.mode == "template":
            key = (state.generation, y.dtype)
            if self._sink_out_key != key:  # template rows of this sink set, gathered once per forward
                self._sink_out_key = key
                self._sink_out = guard.template_out.index_select(0, types).to(y.dtype)
            out = self._sink_out
            if self.w_fp is not None:  # some types are not constant here: their rows in full precision
                unstable = ~guard.template_ok.index_select(0, types)
                fp = F.linear(x2.index_select(0, index).float(), self.w_fp, self.bias).to(y.dtype)
                out = torch.where(unstable.unsqueeze(1), fp, out)
        elif guard.mode == "fp-row":
            out = F.linear(x2.index_select(0, index).float(), self.w_fp, self.bias).to(y.dtype)
        else:  # clamp: zeroed rows keep the bias
            return
        y.index_copy_(0, index, out)


def convert_(model: nn.Module, backend: str = "cpu-int8", *, group_shared_inputs: bool = True) -> nn.Module:
    """Replace every calibrated ``QuantLinear`` of ``model`` by a :class:`RealQuantLinear` (in place).

    Args:
        model: a model quantized by :func:`vtquant.quantize_` (W8 per-channel, A8 per-tensor static).
        backend: ``cpu-int8``, ``cuda-int8`` or ``cuda-fp8``.
        group_shared_inputs: fuse Linears that read the same input (q/k/v, gate/up) into one matmul.
    """
    handle = getattr(model, "vtquant", None)
    if handle is None:
        raise UnsupportedConversionError("model is not quantized by vtquant; call vtquant.quantize_ first")
    if backend.startswith("cuda") and not torch.cuda.is_available():
        raise UnsupportedConversionError(f"backend {backend} needs a CUDA GPU; use cpu-int8 here")
    adapter = handle.adapter
    for block in adapter.blocks():
        converted: dict[str, RealQuantLinear] = {}
        for name, module in list(block.named_modules()):
            if isinstance(module, QuantLinear):
                real = RealQuantLinear(module, backend)
                parent_name, _, child = name.rpartition(".")
                setattr(block.get_submodule(parent_name) if parent_name else block, child, real)
                converted[name] = real
        if group_shared_inputs:
            for names in adapter.input_groups(block):
                members = [converted.get(n) for n in names]
                if any(m is None for m in members) or len(members) < 2:
                    continue
                same_scale = len({float(m.a_scale) for m in members}) == 1
                same_rot = all(m.rot_signs is None for m in members)
                same_guard = len({(m.guard.mode if m.guard is not None else None) for m in members}) == 1
                if same_scale and same_rot and same_guard:
                    SharedInput(members)
    handle.plan["backend"] = backend
    return model
