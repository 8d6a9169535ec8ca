"""CPU producers of the fused decoder forward: the float op sequence of the fake-quant model, then its
quantizer, with in-place passes (issue 13, CPU).

:mod:`vtquant.kernels.fused` calls these on CPU tensors (no Triton there).  Each function repeats the
operations the unfused model runs, in the same order and dtype, so the int8 codes are the fake-quant
model's bit for bit:

* static: ``round(y / scale)`` (a true division by the 0-dim scale in ``y``'s dtype, half to even), clamped
  to [-127, 127], as :meth:`vtquant.core.quant.ActQuantizer.fake_quant`; sink rows get code 0, as the
  fake model's ``masked_fill`` before quantizing;
* dynamic (the per-token peer): ``s = max|y| / 127`` per row, ``round(clamp(y / s))``, as the unfused
  :class:`vtquant.bench_e2e.DynamicTokenLinear` on the CPU;
* RMSNorm as transformers' ``LlamaRMSNorm`` (float32 statistics, ``weight * y.to(dtype)``);
  SiLU * up as ``act_fn(gate) * up``; the online rotation through :func:`vtquant.core.rotation.hadamard_apply`
  (the butterfly Walsh-Hadamard transform), as :class:`vtquant.core.quant.QuantLinear`.

Where the reference kernels of the Triton path (``triton_quant.ref_*``) multiply by ``1 / scale`` and
round half away from zero (the GPU kernels' numerics) and take ~10 elementwise passes, these take 4-7
passes, most in place (measured on SmolLM2 shapes, 512 tokens, 2 AMD EPYC cores: RMSNorm -> codes 0.33 ms
vs 1.0 ms, SiLU * up -> codes 0.81 ms vs 1.34 ms).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

QMAX = 127.0


def _scale_tensor(scale: float, like: torch.Tensor) -> torch.Tensor:
    # the fake quantizer divides by its float32 scale buffer cast to the input dtype
    return torch.tensor(scale, dtype=torch.float32, device=like.device).to(like.dtype)


def static_codes_(y: torch.Tensor, scale: float, index: Optional[torch.Tensor] = None,
                  owned: bool = False, u8: bool = False) -> torch.Tensor:
    """int8 codes ``clamp(round(y / scale), -127, 127)`` of ``y`` ``[M, K]``, rows ``index`` set to 0.

    ``owned``: ``y`` is a temporary of the caller and may be overwritten (one allocation less).
    ``u8``: return ``code + 128`` as uint8 (:func:`onednn_linear`'s input)."""
    s = _scale_tensor(scale, y)
    y = y.div_(s) if owned else torch.div(y, s)
    y.round_().clamp_(-QMAX, QMAX)
    q = to_u8_(y) if u8 else y.to(torch.int8)
    if index is not None and index.numel():
        q.index_fill_(0, index, 128 if u8 else 0)
    return q


def dynamic_codes_(y: torch.Tensor, owned: bool = False, u8: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax int8 codes of ``y`` ``[M, K]`` (``u8``: ``code + 128``) and the row scales ``[M, 1]``."""
    yf = y if y.dtype == torch.float32 else y.float()
    s = yf.abs().amax(dim=1, keepdim=True).clamp_min(1e-12).div_(QMAX)
    yf = yf.div_(s) if (owned or yf is not y) else torch.div(yf, s)
    yf.clamp_(-QMAX, QMAX).round_()
    return (to_u8_(yf) if u8 else yf.to(torch.int8)), s


def rmsnorm(x2: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """``LlamaRMSNorm`` of ``x2`` ``[M, N]`` (a new tensor in ``x2``'s dtype)."""
    xf = x2.float()
    var = xf.pow(2).mean(-1, keepdim=True)
    y = xf * torch.rsqrt(var + eps)
    if y.dtype != x2.dtype:
        y = y.to(x2.dtype)
    if weight is not None:
        y = y.mul_(weight) if weight.dtype == y.dtype else weight * y
    return y


def rmsnorm_codes(x2: torch.Tensor, weight: Optional[torch.Tensor], eps: float, scale: float,
                  index: Optional[torch.Tensor] = None, u8: bool = False) -> torch.Tensor:
    """RMSNorm -> static codes (sink rows ``index`` 0)."""
    return static_codes_(rmsnorm(x2, weight, eps), scale, index, owned=True, u8=u8)


def rmsnorm_codes_dynamic(x2: torch.Tensor, weight: Optional[torch.Tensor], eps: float, u8: bool = False
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm -> per-row dynamic codes and scales."""
    return dynamic_codes_(rmsnorm(x2, weight, eps), owned=True, u8=u8)


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """``silu(g) * u`` of ``gu = [g | u]`` ``[M, 2 NH]`` (a new tensor)."""
    g, u = gu.chunk(2, dim=-1)
    return F.silu(g).mul_(u)


def silu_mul_codes(gu: torch.Tensor, scale: float, index: Optional[torch.Tensor] = None,
                   rot: Optional[tuple] = None, u8: bool = False) -> torch.Tensor:
    """SiLU(g) * u (-> the online Hadamard rotation ``rot = (signs, factors)``) -> static codes."""
    h = silu_mul(gu)
    if rot is not None:
        from ..core.rotation import hadamard_apply

        h = hadamard_apply(h, *rot)
    return static_codes_(h, scale, index, owned=True, u8=u8)


def silu_mul_codes_dynamic(gu: torch.Tensor, u8: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """SiLU(g) * u -> per-row dynamic codes and scales."""
    return dynamic_codes_(silu_mul(gu), owned=True, u8=u8)


# -- oneDNN int8 matmul (brgemm: AMX on CPUs that have it, VNNI otherwise) ---------------------
#
# ``torch._int_mm`` on the CPU runs oneDNN's legacy s8 x s8 -> s32 GEMM API (an AVX-512 VNNI igemm, no AMX),
# followed here by a rescale pass.  ``torch.ops.onednn.qlinear_pointwise`` runs oneDNN's matmul primitive
# (brgemm), which picks AMX int8 tiles where the CPU has them and VNNI otherwise, with the per-channel
# rescale (and bias) in its epilogue.  Its fast kernels take uint8 activations (an int8 source falls to a
# reference kernel, ~1000x slower), so codes are written as ``code + 128`` with source zero point 128: the
# int32 sums are exact either way (oneDNN subtracts ``128 * sum(w)``).  A one-time probe on adversarial
# data (saturating products, whose int16 pair sums would overflow on CPUs without VNNI) checks that this
# build's kernel gives exactly ``int32 sums * scale``; otherwise ``torch._int_mm`` is used.

ONEDNN_MIN_ROWS = 8  # fewer rows (decode): torch._int_mm's GEMV is faster than the primitive's fixed cost
_onednn_probe: Optional[tuple[bool, str]] = None


def onednn_pack(qweight: torch.Tensor) -> torch.Tensor:
    """int8 weights ``[N, K]`` in oneDNN's blocked layout for :func:`onednn_linear`."""
    return torch.ops.onednn.qlinear_prepack(qweight.detach().cpu().contiguous(), None)


def onednn_linear(codes_u8: torch.Tensor, packed: torch.Tensor, col_scale: torch.Tensor,
                  bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    """``(codes - 128) @ W^T * col_scale + bias`` (``codes_u8`` = int8 codes + 128), float32 or bfloat16 out."""
    n = col_scale.shape[0]
    zero = _zeros(n)
    dtype = out_dtype if out_dtype in (torch.float32, torch.bfloat16) else torch.float32
    y = torch.ops.onednn.qlinear_pointwise.default(codes_u8, 1.0, 128, packed, col_scale, zero,
                                                   None if bias is None else bias.float(), 1.0, 0, dtype,
                                                   "none", [], "")
    return y if y.dtype == out_dtype else y.to(out_dtype)


_zero_cache: dict = {}


def _zeros(n: int) -> torch.Tensor:
    z = _zero_cache.get(n)
    if z is None:
        z = _zero_cache[n] = torch.zeros(n, dtype=torch.int64)
    return z


def _probe_onednn() -> tuple[bool, str]:
    op = getattr(getattr(torch.ops, "onednn", None), "qlinear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return False, "torch.ops.onednn.qlinear_pointwise / oneDNN is not available in this torch build"
    g = torch.Generator().manual_seed(0)
    m, k, n = 24, 128, 48
    q = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    q[:4] = 127  # u8 255 x s8 127: int16 pair sums would saturate
    q[4:6] = -127
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    w[: n // 2: 3] = 127
    w[1: n // 2: 3] = -127
    scale = torch.rand(n, generator=g) * 0.01 + 1e-4
    expected = torch._int_mm(q, w.t()).float().mul_(scale)
    try:
        got = onednn_linear((q.to(torch.int16) + 128).to(torch.uint8), onednn_pack(w), scale, None, torch.float32)
    except Exception as exc:  # noqa: BLE001 - any failure means: use torch._int_mm
        return False, f"oneDNN qlinear failed: {type(exc).__name__}: {exc}"
    if not torch.equal(got, expected):
        return False, "oneDNN qlinear differs from exact int32 sums x scale on this CPU"
    return True, "exact on the probe"


def onednn_ok() -> tuple[bool, str]:
    """Whether the oneDNN int8 matmul is usable and exact here (probed once) and why."""
    global _onednn_probe
    if _onednn_probe is None:
        _onednn_probe = _probe_onednn()
    return _onednn_probe


def cpu_features() -> dict:
    """The CPU model and the ISA flags that decide the int8 / bf16 kernels (Linux ``/proc/cpuinfo``), torch's
    vector capability and oneDNN's availability."""
    import platform

    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
    return {"cpu": model, "flags": [f for f in wanted if f in flags], "threads": torch.get_num_threads(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "onednn": bool(torch.backends.mkldnn.is_available()), "torch": torch.__version__}


def has_amx_int8() -> bool:
    """Whether this CPU has AMX int8 tiles (``/proc/cpuinfo`` flag ``amx_int8``)."""
    return "amx_int8" in cpu_features()["flags"]


def onednn_kernels(fn, *args, **kwargs) -> dict[str, int]:
    """Run ``fn(*args, **kwargs)`` with oneDNN's verbose log on and count the primitives it executed,
    ``{"matmul brg_matmul:avx512_core_amx": 120, ...}`` (what actually ran, AMX / VNNI / reference), plus
    ``"isa ..."``: the ISA oneDNN detected.  Empty where oneDNN ran nothing (MKL / fbgemm / aten kernels)."""
    import os
    import sys
    import tempfile

    counts: dict[str, int] = {}
    if not torch.backends.mkldnn.is_available():
        return counts
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(tmp.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                fn(*args, **kwargs)
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        tmp.seek(0)
        text = tmp.read().decode(errors="replace")
    for line in text.splitlines():
        parts = line.split(",")
        if len(parts) > 6 and parts[2] == "primitive" and parts[3] == "exec":
            key = f"{parts[5]} {parts[6]}".strip()  # primitive kind, implementation (gemm_api: the legacy GEMM)
        elif len(parts) > 4 and parts[2] == "info" and parts[4].startswith("isa:"):
            key = "isa " + parts[4][4:]
        else:
            continue
        counts[key] = counts.get(key, 0) + 1
    return counts


def to_u8_(codes_f: torch.Tensor) -> torch.Tensor:
    """Rounded, clamped float codes -> uint8 ``code + 128`` (exact)."""
    return codes_f.add_(128.0).to(torch.uint8)
