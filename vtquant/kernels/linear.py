"""Real int8 / FP8 Linear modules and ``convert_`` (see the package docstring)."""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.quant import QuantLinear, dequantize_weight
from ..core.modules import replace_module
from ..core.rotation import hadamard_apply
from . import cpu_quant as cq

BACKENDS = ("cpu-int8", "cuda-int8", "cuda-fp8")
FP8_MAX = 448.0
CPU_KERNELS = ("auto", "fbgemm", "int_mm", "onednn")
CPU_KERNEL_ENV = "VTQUANT_CPU_INT8_KERNEL"
FBGEMM_MIN_ROWS = 2  # one row (decode): torch._int_mm's GEMV is faster than fbgemm's fixed cost
FBGEMM_GROUP_MAX_N = 2048  # fbgemm slows down past ~2048 output columns: wider groups run per member

log = logging.getLogger(__name__)


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


# -- cpu-int8: fused fbgemm kernel -----------------------------------------------------------
#
# ``quantized::linear_with_input_q_dq_qweight_dq_output_fp32`` (fbgemm) quantizes its float
# input to uint8 while packing it for the GEMM, multiplies uint8 x int8 with exact int32
# accumulation and writes ``acc * x_scale * w_scale[n] + bias`` as float32 in the GEMM's
# epilogue, so no int8 / int32 tensors are materialized.  Its own quantizer multiplies by 1/scale
# and clamps to [-128, 127] (uint8, zero point 128), which is not our fake quantizer's
# round(x / s).clamp(-127, 127) (ties and negative saturation differ).  So we hand it
# ``clamp(x / s, -127, 127)`` (two elementwise passes) with input scale 1 and zero point 128: it
# then only rounds (half to even) and adds 128, both exact, and the static scale is folded into
# the per-channel weight scales (``out_scale``).  Whether this build's kernel rounds before
# adding the zero point (else x / s is rounded here first) and accumulates without int16
# saturation (CPUs without VNNI) is probed once, exactly, on adversarial data; any mismatch or
# error selects ``torch._int_mm``.  The packed weights cost ~1.5x the int8 weight bytes more.

_fbgemm_probe: Optional[tuple[Optional[str], str]] = None  # (None | "div-clamp" | "div-round-clamp", why)


@contextlib.contextmanager
def _fbgemm_engine():
    engines = torch.backends.quantized.supported_engines
    previous = torch.backends.quantized.engine
    target = "fbgemm" if "fbgemm" in engines else previous
    try:
        if target != previous:
            torch.backends.quantized.engine = target
        with warnings.catch_warnings():  # quantized-tensor creation is deprecated; we only pack
            warnings.simplefilter("ignore")
            yield
    finally:
        if torch.backends.quantized.engine != previous:
            torch.backends.quantized.engine = previous


def fbgemm_pack(qweight: torch.Tensor, out_scale: torch.Tensor, bias: Optional[torch.Tensor]) -> Any:
    """Prepack int8 weights [N, K] with ``out_scale`` (activation scale folded in) and bias for fbgemm."""
    n = qweight.shape[0]
    with _fbgemm_engine():
        wq = torch._make_per_channel_quantized_tensor(
            qweight.detach().cpu().contiguous(), out_scale.detach().cpu().double(),
            torch.zeros(n, dtype=torch.long), 0)
        b = None if bias is None else bias.detach().cpu().float().contiguous()
        return torch.ops.quantized.linear_prepack(wq, b)


def fbgemm_codes(x2: torch.Tensor, a_scale: torch.Tensor, mode: str) -> torch.Tensor:
    """The int8 codes as float32, ``clamp(x / s, -127, 127)``, rounded here in ``div-round-clamp`` mode."""
    codes = torch.div(x2, a_scale)  # the same division (and dtype) as the fake quantizer
    if mode == "div-round-clamp":
        codes.round_()
    if codes.dtype != torch.float32:
        codes = codes.float()
    return codes.clamp_(-127, 127)


def fbgemm_linear(codes: torch.Tensor, packed: Any) -> torch.Tensor:
    """float32 ``codes @ W^T * out_scale + bias`` through fbgemm (codes rounded inside, exactly)."""
    return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(codes, 1.0, 128, packed)


def _probe_fbgemm() -> tuple[Optional[str], str]:
    op = getattr(torch.ops.quantized, "linear_with_input_q_dq_qweight_dq_output_fp32", None)
    if op is None:
        return None, "torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32 is missing"
    if not {"fbgemm", "x86"} & set(torch.backends.quantized.supported_engines):
        return None, f"no fbgemm engine (quantized engines: {torch.backends.quantized.supported_engines})"
    g = torch.Generator().manual_seed(0)
    m, k, n = 37, 72, 40
    s = torch.tensor(0.0123456789)
    x = torch.randn(m, k, generator=g) * 40 * s
    halves = (torch.randint(-140, 140, (m, k), generator=g) + 0.5) * s  # ties, just off, saturated
    nudge = torch.randint(-2, 3, (m, k), generator=g)
    halves = torch.where(nudge > 0, torch.nextafter(halves, halves + 1), halves)
    halves = torch.where(nudge < 0, torch.nextafter(halves, halves - 1), halves)
    x[: m // 2] = halves[: m // 2]
    x[-3] = 300 * s  # codes 127 (uint8 255) against weights 127: int16 pair sums would saturate
    x[-2:] = -300 * s  # codes -127 (fbgemm's own clamp would give -128)
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    w[: n // 2] = 127
    w[n // 2: n // 2 + 2] = -128
    codes = torch.round(x / s).clamp(-127, 127)
    expected = codes.double() @ w.double().t()  # exact (|acc| < 2^24), as float32 below
    try:
        packed = fbgemm_pack(w, torch.ones(n), None)
        for mode in ("div-clamp", "div-round-clamp"):
            got = fbgemm_linear(fbgemm_codes(x, s, mode), packed)
            if torch.equal(got.double(), expected):
                return mode, "exact on the probe"
        return None, "fbgemm's result differs from exact int8 codes x int32 accumulation on this CPU"
    except Exception as exc:  # noqa: BLE001 - any failure means: use the portable path
        return None, f"fbgemm failed: {type(exc).__name__}: {exc}"


def fbgemm_mode() -> Optional[str]:
    """The exact fbgemm input mode on this machine (probed once), or ``None`` where it is unusable."""
    global _fbgemm_probe
    if _fbgemm_probe is None:
        _fbgemm_probe = _probe_fbgemm()
        mode, why = _fbgemm_probe
        if mode is None:
            log.info("cpu-int8: the fused fbgemm kernel is unavailable (%s); using torch._int_mm", why)
        else:
            log.debug("cpu-int8: fused fbgemm kernel selected (input %s, %s)", mode, why)
    return _fbgemm_probe[0]


def resolve_cpu_kernel(kernel: Optional[str] = None) -> str:
    """``onednn``, ``fbgemm`` or ``int_mm`` for the cpu-int8 backend: ``kernel`` (or
    ``$VTQUANT_CPU_INT8_KERNEL``; default: ``onednn`` on CPUs with AMX int8 where its exactness probe
    passes, else ``int_mm``);
    ``auto`` takes fbgemm where its probe passes, else ``int_mm``."""
    # onednn: oneDNN's matmul primitive (brgemm: AMX int8 tiles where the CPU has them, VNNI otherwise, the
    # rescale in its epilogue).  torch._int_mm runs oneDNN's legacy s8 GEMM API, which has no AMX kernel, so
    # on AMX CPUs onednn is the default.  On AVX-512 VNNI (2 AMD EPYC cores) the GEMM alone was 1.05x
    # int_mm + rescale, end to end on SmolLM2 even (the uint8 code pass eats it): int_mm stays there.  The fused fbgemm
    # kernel was 3 % slower than int_mm end to end (709 vs 732 tok/s, 1 thread) with +173 MB packed weights.
    kernel = kernel or os.environ.get(CPU_KERNEL_ENV)
    if kernel is None:  # AMX only: on AVX-512 VNNI (AMD EPYC) the two were even end to end (1153 vs 1178 tok/s)
        return "onednn" if cq.has_amx_int8() and cq.onednn_ok()[0] else "int_mm"
    if kernel not in CPU_KERNELS:
        raise UnsupportedConversionError(f"cpu kernel {kernel!r}; choose one of {CPU_KERNELS}")
    if kernel == "int_mm":
        return "int_mm"
    if kernel == "onednn":
        ok, why = cq.onednn_ok()
        if not ok:
            raise UnsupportedConversionError(f"cpu kernel onednn is unusable here: {why}")
        return "onednn"
    if fbgemm_mode() is None:
        if kernel == "fbgemm":
            raise UnsupportedConversionError(f"cpu kernel fbgemm is unusable here: {_fbgemm_probe[1]}")
        return "int_mm"
    return "fbgemm"


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
        self._fbgemm: Optional[list[tuple[list[int], Any]]] = None
        self._onednn: Optional[torch.Tensor] = None

    def onednn_packed(self) -> torch.Tensor:
        """The group's concatenated weights in oneDNN's layout (packed once)."""
        if self._onednn is None:
            self._onednn = cq.onednn_pack(self.qweight)
        return self._onednn

    def fbgemm_chunks(self) -> list[tuple[list[int], Any]]:
        """The members in runs of at most ``FBGEMM_GROUP_MAX_N`` columns (a wider member alone), each
        run as (its members' sizes, its fbgemm-packed weights); packed once."""
        if self._fbgemm is None:
            runs: list[list[int]] = []
            for size in self.sizes:
                if runs and sum(runs[-1]) + size <= FBGEMM_GROUP_MAX_N:
                    runs[-1].append(size)
                else:
                    runs.append([size])
            chunks, start = [], 0
            for sizes in runs:
                stop = start + sum(sizes)
                bias = None if self.bias is None else self.bias[start:stop]
                chunks.append((sizes, fbgemm_pack(self.qweight[start:stop], self.out_scale[start:stop], bias)))
                start = stop
            self._fbgemm = chunks
        return self._fbgemm

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
        if act is not None and getattr(act, "numerics", "vtquant") != "vtquant":
            raise UnsupportedConversionError(
                f"{fake.name}: real kernels run vtquant's int8 grid [-127, 127]; this layer uses {act.numerics} "
                "numerics (made for that export): evaluate it in fake quantization or re-quantize without it")
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
        if self.guard is not None and bool(self.guard.fp_types().any()):
            self.w_fp = dequantize_weight(fake.qweight, fake.w_scale)  # only for full-precision sink rows
        self.group: Optional[SharedInput] = None
        self.group_index = 0
        self.cpu_kernel = "int_mm"  # set by convert_ (resolve_cpu_kernel) for the cpu-int8 backend
        self._packed_cache: tuple = (None, None)
        self._onednn: Optional[torch.Tensor] = None

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        self._scale_a_cache = {}
        self._packed_cache = (None, None)
        self._onednn = None
        if self.rot_signs is not None:
            self.rot_signs = fn(self.rot_signs)
            self.rot_factors = [fn(f) for f in self.rot_factors]
        return result

    def extra_repr(self) -> str:
        text = (f"in_features={self.in_features}, out_features={self.out_features}, backend={self.backend}, "
                f"a_scale={float(self.a_scale):.4g}")
        if self.backend == "cpu-int8":
            text += f", cpu_kernel={self.cpu_kernel}"
        if self.group is not None:
            text += f", shares input with {len(self.group.members) - 1} more"
        return text

    # -- quantize / matmul ---------------------------------------------------------------
    def _fused_cpu(self, x2: torch.Tensor) -> bool:
        """Whether this call runs the fused fbgemm kernel (cpu-int8, a CPU input of >= 2 rows)."""
        return (self.cpu_kernel == "fbgemm" and self.backend == "cpu-int8" and not x2.is_cuda
                and x2.shape[0] >= FBGEMM_MIN_ROWS)

    def fbgemm_packed(self) -> Any:
        """This Linear's weights, rescale and bias packed for fbgemm (once; again after ``.to()``)."""
        key = (self.qweight.data_ptr(), self.qweight._version, self.out_scale.data_ptr(),
               self.out_scale._version, None if self.bias is None else (self.bias.data_ptr(), self.bias._version))
        cached_key, packed = self._packed_cache
        if cached_key != key:
            packed = fbgemm_pack(self.qweight, self.out_scale, self.bias)
            self._packed_cache = (key, packed)
        return packed

    def _onednn_rows(self, x2: torch.Tensor) -> bool:
        """Whether this call runs oneDNN's int8 matmul (cpu-int8, a CPU input of >= ``ONEDNN_MIN_ROWS`` rows)."""
        return (self.cpu_kernel == "onednn" and self.backend == "cpu-int8" and not x2.is_cuda
                and x2.shape[0] >= cq.ONEDNN_MIN_ROWS)

    def _quantize(self, x2: torch.Tensor, fused: bool = False) -> torch.Tensor:
        if self._onednn_rows(x2):  # code + 128 as uint8, the same rounding
            return cq.static_codes_(x2, self._a_scale_value, u8=True)
        if fused:  # float32 codes; fbgemm turns them into uint8 while packing them
            return fbgemm_codes(x2, self.a_scale, fbgemm_mode() or "div-round-clamp")
        if x2.is_cuda:  # one fused pass (Triton); int8 rounds half away from zero there
            from .triton_quant import quant_static

            dtype = torch.float8_e4m3fn if self.backend == "cuda-fp8" else torch.int8
            return quant_static(x2, self._a_scale_value, dtype)
        return torch.round(x2 / self.a_scale).clamp_(-127, 127).to(torch.int8)  # same op as the fake quantizer

    def _matmul(self, q: torch.Tensor, qweight: torch.Tensor, out_scale: torch.Tensor,
                bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
        if q.dtype == torch.float32:  # float codes from _quantize(fused=True): this Linear's own weights
            return fbgemm_linear(q, self.fbgemm_packed()).to(out_dtype)
        if q.dtype == torch.uint8:  # codes + 128 (onednn): the group's or this Linear's packed weights
            if out_scale is self.out_scale:
                if self._onednn is None:
                    self._onednn = cq.onednn_pack(self.qweight)
                packed = self._onednn
            else:
                packed = self.group.onednn_packed()
            return cq.onednn_linear(q, packed, out_scale, bias, out_dtype)
        if self.backend == "cuda-fp8":
            m = q.shape[0]
            scale_a = self._scale_a_cache.get(m)
            if scale_a is None:  # the static scale as the row-scale vector _scaled_mm wants, made once per M
                scale_a = self._scale_a_cache[m] = self.a_scale.float().reshape(1, 1).expand(m, 1).contiguous()
            scale_b = self.w_scale_row if out_scale is self.out_scale else (
                out_scale / self.a_scale).float().reshape(1, -1).contiguous()
            return torch._scaled_mm(q, qweight.t(), scale_a=scale_a, scale_b=scale_b,
                                    bias=None if bias is None else bias.to(torch.bfloat16),
                                    out_dtype=torch.bfloat16).to(out_dtype)
        if q.is_cuda:  # int8 GEMM with the rescale (and bias) fused in its epilogue (Triton)
            from .triton_quant import int8_matmul_scaled

            return int8_matmul_scaled(q, qweight, out_scale, None, bias, out_dtype)
        acc = int_mm(q, qweight.t())
        y = acc.float().mul_(out_scale)  # = acc * out_scale, without its int32 -> float temporary
        if bias is not None:
            y += bias
        return y.to(out_dtype)

    def _zero_rows(self, q: torch.Tensor, index: torch.Tensor) -> None:
        target = q.view(torch.uint8) if q.dtype == torch.float8_e4m3fn else q
        target.index_fill_(0, index, 128 if q.dtype == torch.uint8 else 0)

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
            x2 = hadamard_apply(x2, self.rot_signs, self.rot_factors)
        q = self._quantize(x2, fused=self._fused_cpu(x2))
        if index is not None:
            self._zero_rows(q, index)
        group = self.group if (self.group is not None and self.group_index == 0) else None
        if group is not None:
            if q.dtype == torch.float32:  # fused fbgemm: one GEMM per run of members, codes shared
                parts = []
                for sizes, packed in group.fbgemm_chunks():
                    y_run = fbgemm_linear(q, packed).to(x.dtype)
                    parts.extend(torch.split(y_run, sizes, dim=-1) if len(sizes) > 1 else [y_run])
            else:
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
        if not guard.writes_rows:  # clamp: zeroed rows keep the bias
            return
        types = state.types.reshape(-1).index_select(0, index).clamp_min(0)
        template_rows = None
        if guard.mode == "template":
            key = (state.generation, y.dtype)
            if self._sink_out_key != key:  # template rows of this sink set, gathered once per forward
                self._sink_out_key = key
                self._sink_out = guard.template_out.index_select(0, types).to(y.dtype)
            template_rows = self._sink_out
        out = guard.sink_outputs(types, None if x2 is None else x2.index_select(0, index),
                                 lambda rows: F.linear(rows.float(), self.w_fp,
                                                       None if self.bias is None else self.bias.float()), y.dtype,
                                 template_rows=template_rows)
        y.index_copy_(0, index, out)


def convert_(model: nn.Module, backend: str = "cpu-int8", *, group_shared_inputs: bool = True,
             cpu_kernel: Optional[str] = None, fused: Optional[bool] = None) -> nn.Module:
    """Replace every calibrated ``QuantLinear`` of ``model`` by a :class:`RealQuantLinear` (in place).

    Args:
        model: a model quantized by :func:`vtquant.quantize_` (W8 per-channel, A8 per-tensor static).
        backend: ``cpu-int8``, ``cuda-int8`` or ``cuda-fp8``.
        group_shared_inputs: fuse Linears that read the same input (q/k/v, gate/up) into one matmul.
        cpu_kernel: for ``cpu-int8`` (default ``$VTQUANT_CPU_INT8_KERNEL``, else ``onednn`` where its
            exactness probe passes on a CPU with AMX int8, else ``int_mm``): ``onednn`` runs inputs of 8 or more rows through
            oneDNN's int8 matmul primitive (AMX int8 where the CPU has it, AVX-512 VNNI otherwise; codes
            + 128 as uint8, rescale and bias in the epilogue), fewer rows through ``torch._int_mm``;
            ``int_mm`` runs ``torch._int_mm`` with a separate rescale; ``auto`` runs inputs of two or
            more rows through fbgemm's fused GEMM + rescale kernel where a one-time exactness probe
            passes (else ``int_mm``); ``fbgemm`` insists on it.  Both give the same int8 codes and
            int32 sums.
        fused: run each decoder block through the producer-fused forward
            (:mod:`vtquant.kernels.fused`: RMSNorm / SiLU * up / attention output -> codes, one GEMM
            for q/k/v and one for gate/up, sink rows written by index, SDPA attention; for pre-norm
            ViT blocks of timm / open_clip on ``cuda-*`` backends :mod:`vtquant.kernels.fused_vit`:
            LayerNorm / GELU / attention output -> codes, q/k/v one GEMM).  Default (``None``): on for the
            transformers decoders' blocks it covers (CPU and CUDA; measured on SmolLM2, CPU: 1.07-1.10x the
            per-Linear modules) and for ViTs on ``cuda-*`` backends, off otherwise; ``True`` insists (an
            error if no block can be fused); ``False``: per-Linear modules only.
    """
    handle = getattr(model, "vtquant", None)
    if handle is None:
        raise UnsupportedConversionError("model is not quantized by vtquant; call vtquant.quantize_ first")
    if backend.startswith("cuda") and not torch.cuda.is_available():
        raise UnsupportedConversionError(f"backend {backend} needs a CUDA GPU; use cpu-int8 here")
    kernel = resolve_cpu_kernel(cpu_kernel) if backend == "cpu-int8" else "int_mm"
    adapter = handle.adapter
    for block in adapter.blocks():
        converted: dict[str, RealQuantLinear] = {}
        for name, module in list(block.named_modules()):
            if isinstance(module, QuantLinear):
                real = RealQuantLinear(module, backend)
                real.cpu_kernel = kernel
                replace_module(block, name, real)
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
    handle.backend = backend
    handle.fused = {}
    if fused or fused is None:
        from .fused import FusionError, fuse_static_

        if not group_shared_inputs:
            if fused:
                raise UnsupportedConversionError("fused=True needs group_shared_inputs=True")
        else:
            try:
                from .fused_vit import fuse_vit_static_, is_vit

                # pre-norm LayerNorm / GELU ViT blocks (timm, open_clip): vtquant.kernels.fused_vit, by default on
                # CUDA only (measured there; on the CPU it runs when asked for, fused=True)
                if is_vit(model):
                    if fused or backend.startswith("cuda"):
                        handle.fused = fuse_vit_static_(model)
                else:
                    handle.fused = fuse_static_(model)
            except FusionError as exc:
                if fused:
                    raise UnsupportedConversionError(f"fused=True: {exc}") from exc
            if fused and not any(v == "fused" for v in handle.fused.values()):
                reasons = sorted(set(handle.fused.values()))
                raise UnsupportedConversionError(f"fused=True: no block can run the fused forward ({'; '.join(reasons)})")
    if backend == "cpu-int8":
        handle.cpu_kernel = kernel
        if kernel == "fbgemm":  # pack now, not inside the first forward
            for module in model.modules():
                if isinstance(module, RealQuantLinear):
                    if module.group is None:
                        module.fbgemm_packed()
                    elif module.group_index == 0:
                        module.group.fbgemm_chunks()
    return model
