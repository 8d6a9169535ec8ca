"""Fused activation quantizers for the GPU (Triton), one pass over the activation each.

* :func:`quant_static`: ``q = sat(round(x / s))`` with a scale known ahead of time (vtquant);
* :func:`quant_dynamic_rows`: per-token (per-row) absmax scale and quantization in one
  kernel (the strongest form of the per-token dynamic peer: one read of each row for the
  max and one, from cache, for the codes).

Both write int8 or FP8 E4M3 codes.  They fall back to eager PyTorch where Triton is missing.
"""
from __future__ import annotations

import torch

try:  # pragma: no cover - exercised on the GPU machine or with TRITON_INTERPRET=1
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # pragma: no cover
    HAVE_TRITON = False

FP8_MAX = 448.0

if HAVE_TRITON:

    @triton.jit
    def _static_kernel(x_ptr, q_ptr, inv_scale, n, qmax, IS_INT8: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32) * inv_scale
        x = tl.minimum(tl.maximum(x, -qmax), qmax)
        if IS_INT8:
            x = tl.where(x >= 0, tl.floor(x + 0.5), tl.ceil(x - 0.5))
        tl.store(q_ptr + offs, x.to(q_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _dynamic_rows_kernel(x_ptr, q_ptr, s_ptr, k, qmax, IS_INT8: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        base = row.to(tl.int64) * k
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, k, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + base + offs, mask=offs < k, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.maximum(tl.max(amax, axis=0), 1e-12) / qmax
        tl.store(s_ptr + row, scale)
        for start in range(0, k, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + base + offs, mask=offs < k, other=0.0).to(tl.float32) / scale
            x = tl.minimum(tl.maximum(x, -qmax), qmax)
            if IS_INT8:
                x = tl.where(x >= 0, tl.floor(x + 0.5), tl.ceil(x - 0.5))
            tl.store(q_ptr + base + offs, x.to(q_ptr.dtype.element_ty), mask=offs < k)


def _qmax(dtype: torch.dtype) -> float:
    return 127.0 if dtype == torch.int8 else FP8_MAX


def quant_static(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Quantize ``x`` (any shape, contiguous) with a static per-tensor ``scale`` to ``dtype``."""
    qmax = _qmax(dtype)
    if not (HAVE_TRITON and (x.is_cuda or _interpreting())):
        y = (x.float() / scale).clamp(-qmax, qmax)
        return (torch.round(y) if dtype == torch.int8 else y).to(dtype)
    x = x.contiguous()
    q = torch.empty(x.shape, dtype=dtype, device=x.device)
    n = x.numel()
    block = 4096
    _static_kernel[(triton.cdiv(n, block),)](x, q, 1.0 / scale, n, qmax, IS_INT8=dtype == torch.int8, BLOCK=block)
    return q


def quant_dynamic_rows(x2: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax quantization of ``x2`` ``[M, K]``; returns ``(codes, scales [M, 1] float32)``."""
    qmax = _qmax(dtype)
    if not (HAVE_TRITON and (x2.is_cuda or _interpreting())):
        s = x2.float().abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / qmax
        y = (x2.float() / s).clamp(-qmax, qmax)
        return (torch.round(y) if dtype == torch.int8 else y).to(dtype), s
    x2 = x2.contiguous()
    m, k = x2.shape
    q = torch.empty((m, k), dtype=dtype, device=x2.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x2.device)
    _dynamic_rows_kernel[(m,)](x2, q, s, k, qmax, IS_INT8=dtype == torch.int8, BLOCK=1024)
    return q, s


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"
