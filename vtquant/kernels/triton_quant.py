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


def _interpreting_at_import() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"

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


if HAVE_TRITON:

    def _mm_configs():
        cfgs = []
        for bm, bn, bk, warps, stages in ((128, 128, 64, 4, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
                                          (64, 128, 64, 4, 4), (128, 128, 128, 8, 3), (64, 64, 64, 4, 4)):
            cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                                      num_warps=warps, num_stages=stages))
        return cfgs

    @triton.autotune(configs=_mm_configs() if not _interpreting_at_import() else
                     [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2})],
                     key=["M", "N", "K", "ROW_SCALE"])
    @triton.jit
    def _int8_mm_kernel(a_ptr, b_ptr, c_ptr, rs_ptr, cs_ptr, bias_ptr, M, N, K,
                        stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                        ROW_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        num_pid_in_group = GROUP_M * num_pid_n
        group_id = pid // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
        pid_n = (pid % num_pid_in_group) // group_size_m
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < k_left), other=0)
            b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & (offs_n[None, :] < N), other=0)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        cs = tl.load(cs_ptr + offs_n, mask=offs_n < N, other=0.0)
        out = acc.to(tl.float32) * cs[None, :]
        if ROW_SCALE:
            rs = tl.load(rs_ptr + offs_m, mask=offs_m < M, other=0.0)
            out = out * rs[:, None]
        if HAS_BIAS:
            out = out + tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :]
        c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
        tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def int8_matmul_scaled(q: torch.Tensor, qweight: torch.Tensor, col_scale: torch.Tensor,
                       row_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                       out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``(q @ qweight.T) * row_scale * col_scale + bias`` with int8 operands and the rescale fused in
    the GEMM epilogue (Triton); eager ``torch._int_mm`` + rescale where Triton cannot run.

    Args:
        q: int8 ``[M, K]`` activation codes.
        qweight: int8 ``[N, K]`` weight codes.
        col_scale: float32 ``[N]`` (static: activation scale x weight scale; dynamic: weight scale).
        row_scale: float32 ``[M]`` / ``[M, 1]`` per-token scales (dynamic), or ``None`` (static).
    """
    m, k = q.shape
    n = qweight.shape[0]
    if not (HAVE_TRITON and (q.is_cuda or _interpreting())):
        y = torch._int_mm(q, qweight.t()).float() * col_scale
        if row_scale is not None:
            y = y * row_scale.reshape(-1, 1)
        if bias is not None:
            y = y + bias
        return y.to(out_dtype)
    c = torch.empty((m, n), dtype=out_dtype, device=q.device)
    rs = row_scale.reshape(-1).contiguous() if row_scale is not None else col_scale
    bias_t = bias.float().contiguous() if bias is not None else col_scale
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _int8_mm_kernel[grid](q, qweight, c, rs, col_scale.float().contiguous(), bias_t, m, n, k,
                          q.stride(0), q.stride(1), qweight.stride(1), qweight.stride(0), c.stride(0), c.stride(1),
                          ROW_SCALE=row_scale is not None, HAS_BIAS=bias is not None)
    return c
