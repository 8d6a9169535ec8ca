"""Fast online Hadamard rotation on the GPU (Triton), optionally fused with SiLU(g) * u and static quantization.

The online rotation of vtquant (``vtquant.core.rotation``) is ``x @ diag(s) (F_1 kron F_2)`` with
``F_1`` an orthonormal Sylvester Hadamard of a power-of-two order ``A`` and ``F_2`` a small
Hadamard factor of order ``B`` (Paley, or Sylvester): 14336 = 64 x 224 (Llama-3-8B's MLP width),
4096 = 32 x 128.  A program holds ``BM`` rows, each an ``[A, B]`` tile (``B`` padded to a power of
two), stacked as one ``[BM A, B]`` operand, and computes ``H_A (X F_2)`` per column chunk with
tensor-core products: ``X F_2`` in bf16 with +-1 entries (exact products, float32 sums; the ``F_2``
chunk is loaded once for ``BM`` rows), then ``H_A (.)`` as a batched product with +-1 entries on the
bf16-rounded intermediate (for bf16 / fp16 outputs the rounding remainder goes through a second
product, so the result is float32-accurate; for 8-bit codes the bf16 intermediate is far below the
code step).  The normalisation ``1 / sqrt(A B)`` is applied once at the end.  The same math as :func:`vtquant.core.rotation.kron_apply`
(factor order and signs identical), so weights rotated offline stay valid.

Fused variants (the down-projection input of a rotated SwiGLU MLP): the kernel reads ``[g | u]``
rows, forms ``silu(g) * u`` (rounded to bf16, as the unfused model materialises it), rotates it and
writes static FP8 / int8 codes, with sink rows written as zero codes: one read of the gate/up
output and one write of codes instead of four passes.

Factorisations the kernel does not cover (a single factor, two Paley factors, a random orthogonal
factor, ``B > 256``, e.g. LLaMA-2-7B's 11008 = 2 x 5504) return ``None`` and the caller uses the torch
path.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

try:  # pragma: no cover - exercised on the GPU machine or with TRITON_INTERPRET=1
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # pragma: no cover
    HAVE_TRITON = False

MAX_B = 256
MAX_TILE = 16384  # A * padded B held by one program

_PLAN_CACHE: dict = {}


def hadamard_plan(n: int, signs: torch.Tensor, factors: list[torch.Tensor], device: torch.device
                  ) -> Optional[tuple[int, int, int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(A, B, BP, H_A (bf16 +-1 [A, A]), F_B (bf16 +-1 [BP, BP], zero padded), signs float32 [n])`` or
    ``None`` where the kernel does not apply.  Memoised per (signs, factors) tensors."""
    from ..core.rotation import tensor_memo

    return tensor_memo(_PLAN_CACHE, (signs, *factors), lambda: _make_plan(n, signs, factors, device))


def _make_plan(n: int, signs: torch.Tensor, factors: list[torch.Tensor], device: torch.device) -> Optional[tuple]:
    from ..core.rotation import _sylvester, is_sylvester_factor

    plan = None
    if len(factors) == 1 and is_sylvester_factor(factors[0]) and n >= 32:
        b = min(128, n // 16)
        a = n // b
        fb = _sylvester(b)
        plan = (a, b, fb)
    elif len(factors) == 2 and is_sylvester_factor(factors[0]) and factors[0].shape[0] >= 16:
        a, b = factors[0].shape[0], factors[1].shape[0]
        unnorm = factors[1].detach().double().cpu() * math.sqrt(b)
        if b <= MAX_B and bool(
                ((unnorm - unnorm.round()).abs() < 1e-4).all()) and bool((unnorm.round().abs() == 1).all()):
            plan = (a, b, unnorm.round())
    result = None
    if plan is not None:
        a, b, fb = plan
        bp = max(16, triton.next_power_of_2(b)) if HAVE_TRITON else b
        if a * bp <= MAX_TILE and a <= 64:
            pad = torch.zeros(bp, bp, dtype=torch.float64)
            pad[:b, :b] = fb
            low = torch.bfloat16 if device.type == "cuda" else torch.float32
            result = (a, b, bp, _sylvester(a).to(device=device, dtype=low).contiguous(),
                      # bf16 operands for the tensor cores; float32 (same values) where Triton interprets on
                      # the CPU (its interpreter multiplies bf16 wrongly)
                      pad.to(device=device, dtype=low).contiguous(),
                      signs.detach().to(device=device, dtype=torch.float32).contiguous())
    return result


if HAVE_TRITON:

    def _had_configs():
        import os

        if os.environ.get("TRITON_INTERPRET") == "1":
            return [triton.Config({"BMA": 128, "BC": 64}, num_warps=4)]
        return [triton.Config({"BMA": bma, "BC": bc}, num_warps=w)
                for bma in (64, 128) for bc in (64, 128) for w in (4, 8)]

    @triton.autotune(configs=_had_configs(), key=["n", "A", "B", "SILU", "QUANT", "IS_INT8"])
    @triton.jit
    def _hadamard_kernel(x_ptr, out_ptr, s_ptr, ha_ptr, fb_ptr, zero_ptr, M, n, x_stride, out_stride, norm,
                         inv_scale, qmax, A: tl.constexpr, B: tl.constexpr, BP: tl.constexpr,
                         SILU: tl.constexpr, QUANT: tl.constexpr, HAS_ZERO: tl.constexpr,
                         IS_INT8: tl.constexpr, LOWP: tl.constexpr, BMA: tl.constexpr, BC: tl.constexpr):
        # BMA // A rows per program, each an [A, B] tile; stacked, they are one [BMA, BP] operand, so the
        # B-factor product is one tensor-core GEMM tile per column chunk (its operand loaded once for all
        # the program's rows); the A-factor (+-1 Sylvester) is one more 2-D product with the
        # block-diagonal [BMA, BMA] matrix I kron H_A.
        BM: tl.constexpr = BMA // A
        pid = tl.program_id(0)
        rs = tl.arange(0, BMA)
        r = pid * BM + rs // A
        i = rs % A
        rb = tl.arange(0, BP)
        rowok = r < M
        m = rowok[:, None] & (rb < B)[None, :]
        col = (i * B)[:, None] + rb[None, :]
        off = r.to(tl.int64)[:, None] * x_stride + col
        if SILU:
            g = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
            u = tl.load(x_ptr + off + n, mask=m, other=0.0).to(tl.float32)
            h = (g / (1.0 + tl.exp(-g)) * u).to(tl.bfloat16).to(tl.float32)
        else:
            h = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
        sg = tl.load(s_ptr + col, mask=(rb < B)[None, :], other=0.0)
        xb = (h * sg).to(tl.bfloat16)
        if not LOWP:
            xb = xb.to(tl.float32)
        # I kron H_A as a [BMA, BMA] matrix (zero off the diagonal blocks)
        hv = tl.load(ha_ptr + i[:, None] * A + i[None, :])
        hb = tl.where((rs // A)[:, None] == (rs // A)[None, :], hv, tl.zeros_like(hv))
        if HAS_ZERO:
            zr = tl.load(zero_ptr + r, mask=rowok, other=0) != 0
        obase = r.to(tl.int64)[:, None] * out_stride + (i * B)[:, None]
        for c in tl.range(0, BP, BC, num_stages=1):
            rc = c + tl.arange(0, BC)
            fb = tl.load(fb_ptr + rb[:, None] * BP + rc[None, :], mask=(rc < BP)[None, :], other=0.0)
            z = tl.dot(xb, fb)  # [BMA, BC] float32: bf16 x +-1, exact products
            zh = z.to(hb.dtype)
            y = tl.dot(hb, zh)
            if (not QUANT) or IS_INT8:  # add the rounding remainder of z: a float32-accurate result
                zl = (z - zh.to(tl.float32)).to(hb.dtype)
                y += tl.dot(hb, zl)
            y = y * norm
            om = rowok[:, None] & (rc < B)[None, :]
            if QUANT:
                v = tl.minimum(tl.maximum(y * inv_scale, -qmax), qmax)
                if IS_INT8:
                    v = tl.where(v >= 0, tl.floor(v + 0.5), -tl.floor(-v + 0.5))
                if HAS_ZERO:
                    v = tl.where(zr[:, None], 0.0, v)
                tl.store(out_ptr + obase + rc[None, :], v.to(out_ptr.dtype.element_ty), mask=om)
            else:
                tl.store(out_ptr + obase + rc[None, :], y.to(out_ptr.dtype.element_ty), mask=om)


def _launch(x2: torch.Tensor, n: int, plan: tuple, silu: bool, out: torch.Tensor, scale: Optional[float],
            zero_rows: Optional[torch.Tensor]) -> torch.Tensor:
    a, b, bp, ha, fb, signs = plan
    quant = scale is not None
    is_int8 = out.dtype == torch.int8
    qmax = 127.0 if is_int8 else 448.0
    zero = zero_rows.reshape(-1) if zero_rows is not None else None
    if zero is not None and zero.dtype == torch.bool:
        zero = zero.view(torch.uint8)
    m = x2.shape[0]
    grid = lambda meta: (triton.cdiv(m, max(1, meta["BMA"] // a)),)  # noqa: E731
    _hadamard_kernel[grid](
        x2, out, signs, ha, fb, zero if zero is not None else x2, m, n, x2.stride(0), out.stride(0),
        1.0 / math.sqrt(a * b), (1.0 / scale) if quant else 1.0, qmax, A=a, B=b, BP=bp,
        SILU=silu, QUANT=quant, HAS_ZERO=zero is not None, IS_INT8=is_int8,
        LOWP=fb.dtype == torch.bfloat16)
    return out


def _usable(x: torch.Tensor) -> bool:
    import os

    return HAVE_TRITON and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def hadamard_cuda(x: torch.Tensor, signs: torch.Tensor, factors: list[torch.Tensor]) -> Optional[torch.Tensor]:
    """``x @ diag(signs) (F_1 kron F_2)`` in one Triton kernel, or ``None`` where it does not apply."""
    if not _usable(x) or x.dtype not in (torch.bfloat16, torch.float16):  # float32: the exact torch path
        return None
    n = x.shape[-1]
    plan = hadamard_plan(n, signs, factors, x.device)
    if plan is None:
        return None
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    return _launch(x2, n, plan, False, out, None, None).view(x.shape)


def silu_mul_hadamard_quant(gu: torch.Tensor, signs: torch.Tensor, factors: list[torch.Tensor], scale: float,
                            dtype: torch.dtype, zero_rows: Optional[torch.Tensor] = None
                            ) -> Optional[torch.Tensor]:
    """Static codes of ``rotate(silu(g) * u)`` for ``gu = [g | u]`` ``[M, 2 n]`` in one kernel (``None``
    where the kernel does not apply); ``zero_rows`` (bool / uint8 ``[M]``) rows get zero codes."""
    if not _usable(gu):
        return None
    n = gu.shape[-1] // 2
    plan = hadamard_plan(n, signs, factors, gu.device)
    if plan is None:
        return None
    if gu.stride(-1) != 1:
        gu = gu.contiguous()
    out = torch.empty((gu.shape[0], n), dtype=dtype, device=gu.device)
    return _launch(gu, n, plan, True, out, scale, zero_rows)


def ref_silu_mul_hadamard_quant(gu: torch.Tensor, signs: torch.Tensor, factors: list[torch.Tensor], scale: float,
                                dtype: torch.dtype, zero_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Torch reference (and CPU path) of :func:`silu_mul_hadamard_quant`."""
    from ..core.rotation import hadamard_apply
    from .triton_quant import _codes, _zero

    g, u = gu.float().chunk(2, dim=-1)
    h = (torch.nn.functional.silu(g) * u).to(gu.dtype)
    y = hadamard_apply(h, signs, factors) if not gu.is_cuda else _torch_rotate(h, signs, factors)
    return _zero(_codes(y.float() * (1.0 / scale), dtype), zero_rows)


def _torch_rotate(h: torch.Tensor, signs: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """The torch butterfly path even on CUDA (the reference for the Triton kernel)."""
    from ..core.rotation import fwht_, is_sylvester_factor

    shape = h.shape
    sizes = [f.shape[0] for f in factors]
    y = (h.float() * signs.to(h.device).float()).reshape(-1, *sizes)
    last = y.dim() - 1
    for axis, f in enumerate(factors, start=1):
        if is_sylvester_factor(f):
            y = fwht_(y, axis)
        elif axis == last:
            y = y @ f.to(h.device).float()
        else:
            y = torch.movedim(torch.movedim(y, axis, last) @ f.to(h.device).float(), last, axis)
    return y.reshape(shape)
