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
                  owned: bool = False) -> torch.Tensor:
    """int8 codes ``clamp(round(y / scale), -127, 127)`` of ``y`` ``[M, K]``, rows ``index`` set to 0.

    ``owned``: ``y`` is a temporary of the caller and may be overwritten (one allocation less)."""
    s = _scale_tensor(scale, y)
    y = y.div_(s) if owned else torch.div(y, s)
    y.round_().clamp_(-QMAX, QMAX)
    q = y.to(torch.int8)
    if index is not None and index.numel():
        q.index_fill_(0, index, 0)
    return q


def dynamic_codes_(y: torch.Tensor, owned: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax int8 codes of ``y`` ``[M, K]`` and the row scales ``[M, 1]`` (float32)."""
    yf = y if y.dtype == torch.float32 else y.float()
    s = yf.abs().amax(dim=1, keepdim=True).clamp_min(1e-12).div_(QMAX)
    yf = yf.div_(s) if (owned or yf is not y) else torch.div(yf, s)
    yf.clamp_(-QMAX, QMAX).round_()
    return yf.to(torch.int8), s


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
                  index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """RMSNorm -> static codes (sink rows ``index`` 0)."""
    return static_codes_(rmsnorm(x2, weight, eps), scale, index, owned=True)


def rmsnorm_codes_dynamic(x2: torch.Tensor, weight: Optional[torch.Tensor], eps: float
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm -> per-row dynamic codes and scales."""
    return dynamic_codes_(rmsnorm(x2, weight, eps), owned=True)


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """``silu(g) * u`` of ``gu = [g | u]`` ``[M, 2 NH]`` (a new tensor)."""
    g, u = gu.chunk(2, dim=-1)
    return F.silu(g).mul_(u)


def silu_mul_codes(gu: torch.Tensor, scale: float, index: Optional[torch.Tensor] = None,
                   rot: Optional[tuple] = None) -> torch.Tensor:
    """SiLU(g) * u (-> the online Hadamard rotation ``rot = (signs, factors)``) -> static codes."""
    h = silu_mul(gu)
    if rot is not None:
        from ..core.rotation import hadamard_apply

        h = hadamard_apply(h, *rot)
    return static_codes_(h, scale, index, owned=True)


def silu_mul_codes_dynamic(gu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SiLU(g) * u -> per-row dynamic codes and scales."""
    return dynamic_codes_(silu_mul(gu), owned=True)
