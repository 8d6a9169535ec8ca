"""Fused activation quantizers for the GPU (Triton), one pass over the activation each.

* :func:`quant_static`: ``q = sat(round(x / s))`` with a scale known ahead of time (vtquant);
* :func:`quant_dynamic_rows`: per-token (per-row) absmax scale and quantization in one
  kernel (the strongest form of the per-token dynamic peer: one read of each row for the
  max and one, from cache, for the codes).

Both write int8 or FP8 E4M3 codes.  They fall back to eager PyTorch where Triton is missing.

Producer-fused quantizers (see the section below): :func:`rmsnorm_quant_static` /
:func:`rmsnorm_quant_dynamic`, :func:`silu_mul_quant_static` / :func:`silu_mul_quant_dynamic`,
and the FP8 gate/up GEMM with SwiGLU in its epilogue, :func:`swiglu_matmul_static` /
:func:`swiglu_matmul_dynamic`; each has a pure-PyTorch ``ref_*`` reference.
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


# ----------------------------------------------------------------------------------------------
# Producer-fused quantizers (issue: static faster than dynamic).  A static per-tensor scale is
# known before the activation exists, so the kernel that PRODUCES the activation can write the
# 8-bit codes directly: RMSNorm -> codes, SiLU(gate) * up -> codes, and even the gate/up GEMM's
# epilogue -> codes (a GEMM tile never sees a whole row, so a per-token scale cannot be made
# there).  The per-token dynamic counterparts are fused as far as a row allows: RMSNorm and
# SiLU * up with the row held by one program (the row max is one more reduction), and the
# GEMM epilogue writes bf16 h plus a per-row running max (atomics), then one elementwise pass.
#
# Every function has a pure-PyTorch reference (``ref_*``), used where Triton cannot run (CPU
# without TRITON_INTERPRET=1) and by the checks.  Rounding: int8 codes round half away from
# zero (as the fused quantizers above); static codes are ``x * (1 / scale)``.
# ----------------------------------------------------------------------------------------------

def _codes(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 values already divided by the scale -> saturated codes (kernels' rounding)."""
    qmax = _qmax(dtype)
    y = y.clamp(-qmax, qmax)
    if dtype == torch.int8:
        y = torch.sign(y) * torch.floor(y.abs() + 0.5)
    return y.to(dtype)


def _zero(codes: torch.Tensor, zero_rows: torch.Tensor | None) -> torch.Tensor:
    if zero_rows is not None:
        target = codes.view(torch.uint8) if codes.dtype == torch.float8_e4m3fn else codes
        target[zero_rows.reshape(-1).bool()] = 0
    return codes


def _row_codes(h: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    s = h.float().abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / _qmax(dtype)
    return _codes(h.float() / s, dtype), s


def ref_rmsnorm(x2: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    xf = x2.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return y * weight.float() if weight is not None else y


def ref_rmsnorm_quant_static(x2, weight, eps, scale, dtype, zero_rows=None):
    return _zero(_codes(ref_rmsnorm(x2, weight, eps) * (1.0 / scale), dtype), zero_rows)


def ref_rmsnorm_quant_dynamic(x2, weight, eps, dtype):
    return _row_codes(ref_rmsnorm(x2, weight, eps), dtype)


def ref_silu_mul(gu: torch.Tensor) -> torch.Tensor:
    g, u = gu.float().chunk(2, dim=-1)
    return torch.nn.functional.silu(g) * u


def ref_silu_mul_quant_static(gu, scale, dtype, zero_rows=None):
    return _zero(_codes(ref_silu_mul(gu) * (1.0 / scale), dtype), zero_rows)


def ref_silu_mul_quant_dynamic(gu, dtype):
    return _row_codes(ref_silu_mul(gu), dtype)


def ref_swiglu_matmul(q, qweight, col_scale, row_scale=None) -> torch.Tensor:
    """float32 ``silu(g) * u`` of ``[g | u] = (q @ qweight.T) * col_scale (* row_scale)``."""
    y = (q.float() @ qweight.float().T) * col_scale.float().reshape(1, -1)
    if row_scale is not None:
        y = y * row_scale.float().reshape(-1, 1)
    return ref_silu_mul(y)


def _can_run(t: torch.Tensor) -> bool:
    return HAVE_TRITON and (t.is_cuda or _interpreting())


def _zero_arg(zero_rows: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if zero_rows is None:
        return like
    z = zero_rows.reshape(-1)
    return (z.view(torch.uint8) if z.dtype == torch.bool else z).contiguous()


def _row_warps(block: int) -> int:
    return 4 if block <= 2048 else (8 if block <= 8192 else 16)


MAX_ROW_BLOCK = 16384  # rows up to this width are held in registers by one program

if HAVE_TRITON:

    def _warp_configs(warps):
        """Row kernels: the row width fixes BLOCK; num_warps is tuned (equally for static and dynamic)."""
        if _interpreting_at_import():
            return [triton.Config({}, num_warps=4)]
        return [triton.Config({}, num_warps=w) for w in warps]

    def _elementwise_configs():
        if _interpreting_at_import():
            return [triton.Config({"BLOCK": 64}, num_warps=4)]
        return [triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((1024, 4), (2048, 4), (2048, 8), (4096, 8))]

    @triton.autotune(configs=_warp_configs((4, 8, 16)), key=["n", "DYNAMIC", "HAS_ZERO", "IS_INT8"])
    @triton.jit
    def _rmsnorm_quant_kernel(x_ptr, w_ptr, q_ptr, s_ptr, zero_ptr, n, eps, inv_scale, qmax,
                              DYNAMIC: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_ZERO: tl.constexpr,
                              IS_INT8: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        base = row.to(tl.int64) * n
        offs = tl.arange(0, BLOCK)
        m = offs < n
        x = tl.load(x_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n + eps)
        y = x * r
        if HAS_WEIGHT:
            y = y * tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
        if DYNAMIC:
            scale = tl.maximum(tl.max(tl.abs(y), axis=0), 1e-12) / qmax
            tl.store(s_ptr + row, scale)
            y = y / scale
        else:
            y = y * inv_scale
            if HAS_ZERO:
                z = tl.load(zero_ptr + row)
                y = tl.where(z != 0, 0.0, y)
        y = tl.minimum(tl.maximum(y, -qmax), qmax)
        if IS_INT8:
            y = tl.where(y >= 0, tl.floor(y + 0.5), tl.ceil(y - 0.5))
        tl.store(q_ptr + base + offs, y.to(q_ptr.dtype.element_ty), mask=m)

    @triton.autotune(configs=_elementwise_configs(), key=["nh", "HAS_ZERO", "IS_INT8"])
    @triton.jit
    def _silu_mul_static_kernel(gu_ptr, q_ptr, zero_ptr, nh, inv_scale, qmax,
                                HAS_ZERO: tl.constexpr, IS_INT8: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = offs < nh
        src = gu_ptr + row.to(tl.int64) * (2 * nh) + offs
        g = tl.load(src, mask=m, other=0.0).to(tl.float32)
        u = tl.load(src + nh, mask=m, other=0.0).to(tl.float32)
        y = g * tl.sigmoid(g) * u * inv_scale
        if HAS_ZERO:
            z = tl.load(zero_ptr + row)
            y = tl.where(z != 0, 0.0, y)
        y = tl.minimum(tl.maximum(y, -qmax), qmax)
        if IS_INT8:
            y = tl.where(y >= 0, tl.floor(y + 0.5), tl.ceil(y - 0.5))
        tl.store(q_ptr + row.to(tl.int64) * nh + offs, y.to(q_ptr.dtype.element_ty), mask=m)

    @triton.autotune(configs=_warp_configs((4, 8, 16, 32)), key=["nh", "IS_INT8", "SINGLE", "BLOCK"])
    @triton.jit
    def _silu_mul_dynamic_kernel(gu_ptr, q_ptr, s_ptr, nh, qmax, IS_INT8: tl.constexpr,
                                 SINGLE: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        src = gu_ptr + row.to(tl.int64) * (2 * nh)
        dst = q_ptr + row.to(tl.int64) * nh
        if SINGLE:  # the whole row in registers: one read
            offs = tl.arange(0, BLOCK)
            m = offs < nh
            g = tl.load(src + offs, mask=m, other=0.0).to(tl.float32)
            u = tl.load(src + nh + offs, mask=m, other=0.0).to(tl.float32)
            h = g * tl.sigmoid(g) * u
            scale = tl.maximum(tl.max(tl.abs(h), axis=0), 1e-12) / qmax
            tl.store(s_ptr + row, scale)
            y = tl.minimum(tl.maximum(h / scale, -qmax), qmax)
            if IS_INT8:
                y = tl.where(y >= 0, tl.floor(y + 0.5), tl.ceil(y - 0.5))
            tl.store(dst + offs, y.to(q_ptr.dtype.element_ty), mask=m)
        else:  # two passes over the row (the second mostly from L2)
            amax = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, nh, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                m = offs < nh
                g = tl.load(src + offs, mask=m, other=0.0).to(tl.float32)
                u = tl.load(src + nh + offs, mask=m, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.abs(g * tl.sigmoid(g) * u))
            scale = tl.maximum(tl.max(amax, axis=0), 1e-12) / qmax
            tl.store(s_ptr + row, scale)
            for start in range(0, nh, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                m = offs < nh
                g = tl.load(src + offs, mask=m, other=0.0).to(tl.float32)
                u = tl.load(src + nh + offs, mask=m, other=0.0).to(tl.float32)
                y = tl.minimum(tl.maximum(g * tl.sigmoid(g) * u / scale, -qmax), qmax)
                if IS_INT8:
                    y = tl.where(y >= 0, tl.floor(y + 0.5), tl.ceil(y - 0.5))
                tl.store(dst + offs, y.to(q_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _rowmax_quant_kernel(h_ptr, amax_ptr, q_ptr, s_ptr, n, qmax, IS_INT8: tl.constexpr, BLOCK: tl.constexpr):
        """Elementwise quantization with a per-row max computed elsewhere (the GEMM epilogue)."""
        row = tl.program_id(0)
        cb = tl.program_id(1)
        scale = tl.maximum(tl.load(amax_ptr + row), 1e-12) / qmax
        if cb == 0:
            tl.store(s_ptr + row, scale)
        offs = cb * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        base = row.to(tl.int64) * n
        y = tl.load(h_ptr + base + offs, mask=m, other=0.0).to(tl.float32) / scale
        y = tl.minimum(tl.maximum(y, -qmax), qmax)
        if IS_INT8:
            y = tl.where(y >= 0, tl.floor(y + 0.5), tl.ceil(y - 0.5))
        tl.store(q_ptr + base + offs, y.to(q_ptr.dtype.element_ty), mask=m)

    def _swiglu_configs():
        if _interpreting_at_import():
            return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2})]
        cfgs = []
        for bm, bn, bk, warps, stages in ((128, 128, 128, 8, 4), (128, 128, 128, 8, 3), (128, 64, 128, 4, 4),
                                          (128, 128, 64, 8, 4), (64, 128, 128, 4, 4), (256, 64, 128, 8, 3)):
            cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                                      num_warps=warps, num_stages=stages))
        return cfgs

    @triton.autotune(configs=_swiglu_configs(), key=["M", "NH", "K", "ROW_SCALE", "OUT_QUANT", "ROW_AMAX", "HAS_ZERO"])
    @triton.jit
    def _swiglu_mm_kernel(a_ptr, w_ptr, out_ptr, rs_ptr, cs_ptr, zero_ptr, amax_ptr, M, NH, K, inv_out_scale, qmax,
                          ROW_SCALE: tl.constexpr, OUT_QUANT: tl.constexpr, IS_INT8: tl.constexpr,
                          ROW_AMAX: tl.constexpr, HAS_ZERO: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        """``h = silu(g) * u`` with ``[g | u] = (a @ w.T) * col_scale (* row_scale)``; a ``[M, K]``,
        w ``[2 NH, K]`` (gate rows, then up rows), both K-contiguous; K a multiple of BLOCK_K.
        Each tile accumulates the matching gate and up columns (two dots sharing the A tile), so the
        epilogue has both; OUT_QUANT writes static codes ``sat(h * inv_out_scale)``, else bf16 h."""
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(NH, BLOCK_N)
        num_pid_in_group = GROUP_M * num_pid_n
        group_id = pid // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
        pid_n = (pid % num_pid_in_group) // group_size_m
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = offs_m % M  # wrapped rows / columns: loads need no masks, stores are masked
        rn = offs_n % NH
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + rm[:, None] * K + offs_k[None, :]
        g_ptrs = w_ptr + rn[None, :] * K + offs_k[:, None]
        u_ptrs = g_ptrs + NH * K
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in range(0, K // BLOCK_K):
            a = tl.load(a_ptrs)
            # partial sums promoted to the float32 accumulator after every BLOCK_K (<= 128) of K, like
            # cuBLAS's FP8 GEMM without fast accumulation (torch._scaled_mm's default); Triton's sm_90
            # default never promotes (faster, less exact)
            acc_g = tl.dot(a, tl.load(g_ptrs), acc_g, max_num_imprecise_acc=BLOCK_K)
            acc_u = tl.dot(a, tl.load(u_ptrs), acc_u, max_num_imprecise_acc=BLOCK_K)
            a_ptrs += BLOCK_K
            g_ptrs += BLOCK_K
            u_ptrs += BLOCK_K
        gv = acc_g * tl.load(cs_ptr + rn)[None, :]
        uv = acc_u * tl.load(cs_ptr + NH + rn)[None, :]
        if ROW_SCALE:
            rs = tl.load(rs_ptr + rm)[:, None]
            gv = gv * rs
            uv = uv * rs
        h = gv * tl.sigmoid(gv) * uv
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < NH)
        out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * NH + offs_n[None, :]
        if OUT_QUANT:
            h = h * inv_out_scale
            if HAS_ZERO:
                z = tl.load(zero_ptr + rm)
                h = tl.where(z[:, None] != 0, 0.0, h)
            h = tl.minimum(tl.maximum(h, -qmax), qmax)
            if IS_INT8:
                h = tl.where(h >= 0, tl.floor(h + 0.5), tl.ceil(h - 0.5))
            tl.store(out_ptrs, h.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            hb = h.to(out_ptr.dtype.element_ty)
            tl.store(out_ptrs, hb, mask=mask)
            if ROW_AMAX:
                am = tl.max(tl.where(mask, tl.abs(hb.to(tl.float32)), 0.0), axis=1)
                tl.atomic_max(amax_ptr + offs_m, am, mask=offs_m < M)


def rmsnorm_quant_static(x2: torch.Tensor, weight: torch.Tensor | None, eps: float, scale: float,
                         dtype: torch.dtype, zero_rows: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm of ``x2`` ``[M, N]`` written straight as static codes ``sat(norm(x) / scale)``: one read of
    ``x2``, one write of codes, no bf16 intermediate.  ``zero_rows`` (bool / uint8 ``[M]``) marks rows
    whose codes are written as 0 (vtquant's sink rows)."""
    m, n = x2.shape
    if not _can_run(x2) or triton.next_power_of_2(n) > MAX_ROW_BLOCK:
        return ref_rmsnorm_quant_static(x2, weight, eps, scale, dtype, zero_rows)
    x2 = x2.contiguous()
    q = torch.empty((m, n), dtype=dtype, device=x2.device)
    block = triton.next_power_of_2(n)
    _rmsnorm_quant_kernel[(m,)](x2, weight if weight is not None else x2, q, x2, _zero_arg(zero_rows, x2), n, eps,
                                1.0 / scale, _qmax(dtype), DYNAMIC=False, HAS_WEIGHT=weight is not None,
                                HAS_ZERO=zero_rows is not None, IS_INT8=dtype == torch.int8, BLOCK=block)
    return q


def rmsnorm_quant_dynamic(x2: torch.Tensor, weight: torch.Tensor | None, eps: float,
                          dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm + per-row absmax quantization in one kernel (the row held in registers; the row max is
    one more in-register reduction).  Returns ``(codes, scales [M, 1] float32)``."""
    m, n = x2.shape
    if not _can_run(x2) or triton.next_power_of_2(n) > MAX_ROW_BLOCK:
        return ref_rmsnorm_quant_dynamic(x2, weight, eps, dtype)
    x2 = x2.contiguous()
    q = torch.empty((m, n), dtype=dtype, device=x2.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x2.device)
    block = triton.next_power_of_2(n)
    _rmsnorm_quant_kernel[(m,)](x2, weight if weight is not None else x2, q, s, x2, n, eps, 1.0, _qmax(dtype),
                                DYNAMIC=True, HAS_WEIGHT=weight is not None, HAS_ZERO=False,
                                IS_INT8=dtype == torch.int8, BLOCK=block)
    return q, s


def silu_mul_quant_static(gu: torch.Tensor, scale: float, dtype: torch.dtype,
                          zero_rows: torch.Tensor | None = None) -> torch.Tensor:
    """``sat(silu(g) * u / scale)`` for ``gu = [g | u]`` ``[M, 2 NH]``: elementwise, one read, one write."""
    m, n2 = gu.shape
    nh = n2 // 2
    if not _can_run(gu):
        return ref_silu_mul_quant_static(gu, scale, dtype, zero_rows)
    gu = gu.contiguous()
    q = torch.empty((m, nh), dtype=dtype, device=gu.device)
    grid = lambda meta: (m, triton.cdiv(nh, meta["BLOCK"]))  # noqa: E731
    _silu_mul_static_kernel[grid](gu, q, _zero_arg(zero_rows, gu), nh, 1.0 / scale, _qmax(dtype),
                                  HAS_ZERO=zero_rows is not None, IS_INT8=dtype == torch.int8)
    return q


def silu_mul_quant_dynamic(gu: torch.Tensor, dtype: torch.dtype,
                           single: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``silu(g) * u`` + per-row absmax quantization, one program per row: the row in registers when
    ``NH <= MAX_ROW_BLOCK`` (one read), else two passes over it.  Returns ``(codes, scales [M, 1])``."""
    m, n2 = gu.shape
    nh = n2 // 2
    if not _can_run(gu):
        return ref_silu_mul_quant_dynamic(gu, dtype)
    gu = gu.contiguous()
    q = torch.empty((m, nh), dtype=dtype, device=gu.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=gu.device)
    if single is None:
        single = triton.next_power_of_2(nh) <= MAX_ROW_BLOCK
    block = triton.next_power_of_2(nh) if single else 2048
    _silu_mul_dynamic_kernel[(m,)](gu, q, s, nh, _qmax(dtype), IS_INT8=dtype == torch.int8, SINGLE=single,
                                   BLOCK=block)
    return q, s


def _swiglu_ok(q: torch.Tensor, qweight: torch.Tensor) -> bool:
    m, k = q.shape
    nh = qweight.shape[0] // 2
    return (_can_run(q) and k % 128 == 0 and qweight.shape[1] == k and qweight.shape[0] % 2 == 0
            and q.is_contiguous() and qweight.is_contiguous() and 2 * nh * k < 2 ** 31 and m * k < 2 ** 31)


def swiglu_matmul_static(q: torch.Tensor, qweight: torch.Tensor, col_scale: torch.Tensor, scale: float,
                         dtype: torch.dtype, zero_rows: torch.Tensor | None = None) -> torch.Tensor:
    """The gate/up GEMM with SwiGLU and the NEXT Linear's static quantization in its epilogue:
    codes ``sat(silu(g) * u / scale)`` straight from the accumulators (no bf16 gate/up tensor).

    Args:
        q: ``[M, K]`` FP8 (or bf16) activation codes; qweight: ``[2 NH, K]`` gate rows then up rows.
        col_scale: float32 ``[2 NH]`` (activation scale x weight scale).
        scale: the down projection's static input scale.  zero_rows: rows written as 0 (sinks).
    """
    if not _swiglu_ok(q, qweight):
        return _zero(_codes(ref_swiglu_matmul(q, qweight, col_scale) * (1.0 / scale), dtype), zero_rows)
    m, k = q.shape
    nh = qweight.shape[0] // 2
    out = torch.empty((m, nh), dtype=dtype, device=q.device)
    cs = col_scale.float().reshape(-1).contiguous()
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(nh, meta["BLOCK_N"]),)  # noqa: E731
    _swiglu_mm_kernel[grid](q, qweight, out, cs, cs, _zero_arg(zero_rows, cs), cs, m, nh, k, 1.0 / scale,
                            _qmax(dtype), ROW_SCALE=False, OUT_QUANT=True, IS_INT8=dtype == torch.int8,
                            ROW_AMAX=False, HAS_ZERO=zero_rows is not None)
    return out


def swiglu_matmul_dynamic(q: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, row_scale: torch.Tensor,
                          dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-token dynamic counterpart, as fused as a row-spanning scale allows: the GEMM epilogue
    writes bf16 ``h = silu(g) * u`` and folds each tile's row max into a per-row max (atomic), then one
    elementwise pass writes the codes with the row scales.  Returns ``(codes, scales [M, 1])``."""
    if not _swiglu_ok(q, qweight):
        h = ref_swiglu_matmul(q, qweight, w_scale, row_scale).to(torch.bfloat16)
        return _row_codes(h, dtype)
    m, k = q.shape
    nh = qweight.shape[0] // 2
    h = torch.empty((m, nh), dtype=torch.bfloat16, device=q.device)
    amax = torch.zeros((m,), dtype=torch.float32, device=q.device)
    cs = w_scale.float().reshape(-1).contiguous()
    rs = row_scale.float().reshape(-1).contiguous()
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(nh, meta["BLOCK_N"]),)  # noqa: E731
    _swiglu_mm_kernel[grid](q, qweight, h, rs, cs, cs, amax, m, nh, k, 1.0, 1.0, ROW_SCALE=True, OUT_QUANT=False,
                            IS_INT8=False, ROW_AMAX=True, HAS_ZERO=False)
    codes = torch.empty((m, nh), dtype=dtype, device=q.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=q.device)
    block = min(2048, triton.next_power_of_2(nh))
    _rowmax_quant_kernel[(m, triton.cdiv(nh, block))](h, amax, codes, s, nh, _qmax(dtype),
                                                      IS_INT8=dtype == torch.int8, BLOCK=block,
                                                      num_warps=_row_warps(block))
    return codes, s
