"""Producer-fused forward of pre-norm LayerNorm / GELU ViT blocks on real 8-bit kernels (issue 13, vision).

The vision counterpart of :mod:`vtquant.kernels.fused` (which covers RMSNorm / SwiGLU decoders).
``convert_(model, "cuda-fp8")`` on a quantized ViT (on by default on CUDA; ``fused=True`` on any
backend) and :func:`fuse_vit_dynamic_` (the per-token dynamic FP8 / int8 peer, done the same way)
replace the forward of every block whose layout is a plain pre-norm ViT block -- timm's
``vision_transformer.Block`` (ViT, DeiT, DINOv2, the CLIP towers timm builds) and open_clip's
``ResidualAttentionBlock`` (batch-first, attention made explicit by vtquant) -- by one that:

* writes the 8-bit codes straight from the producers: LayerNorm -> codes in one Triton kernel (static
  scale, sink rows written as zero codes by the same kernel; dynamic: the row max in the same kernel),
  the first residual add fused into the second LayerNorm's kernel, the attention output -> codes in
  one pass, and GELU (erf / tanh / QuickGELU) -> codes in one pass (a rotated model's
  ``ProjectedRMSNorm`` is the same kernel with its projection; its online Hadamard at ``fc2`` runs
  after GELU through :mod:`vtquant.kernels.triton_hadamard`);
* runs q/k/v as one GEMM (``torch._scaled_mm`` with the weight scales fused and bf16 out for FP8;
  the Triton int8 GEMM on CUDA, ``torch._int_mm`` + rescale on the CPU), then proj, fc1, fc2;
  layer scales are folded into the GEMM's column scales and bias;
* writes the sinks' output rows by index (O(#sinks)): template outputs ``W t + b`` where the guard
  holds a stable template, the Linear applied to the sink's full-precision input row elsewhere (the
  protected CLS row, ``fp-row`` guards): those input rows are recomputed for the sinks only (their
  LayerNorm / GELU / attention rows gathered by index), in the activation dtype;
* attention runs through ``F.scaled_dot_product_attention`` (non-causal, flash kernels on CUDA).

The block's hooks (vtquant's known-sink reset, residual restore) still run: only ``forward`` is
replaced.  The stage layer's sink detector (the probe at ``fc2``) reads GELU's output as the unfused
model materialises it, then that tensor is quantized.  Calls the fast path does not cover (an
attention mask, causal attention, training mode, cross-attention inputs) fall back, per call, to the
original forward; blocks it cannot cover at all keep their original forward with the reason in
:func:`vtquant.kernels.fused.fused_blocks`: q/k norms, a gated or normed attention output, a sink
detector or an online rotation on a Linear other than ``fc2``, sequence-first open_clip blocks,
another block class.

On the CPU (no Triton, or ``TRITON_INTERPRET=1`` for the kernels) the same forward runs with int8
codes through the pure-PyTorch references below: that is what the tests compare with the per-Linear
modules.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import triton_quant as tq
from .fused import (FUSED_ATTR, FusionError, _install, _Site, dynamic_weights, fused_blocks,  # noqa: F401
                    sites_state, stacked_weights, unfuse_)

try:  # pragma: no cover - exercised on the GPU machine or with TRITON_INTERPRET=1
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # pragma: no cover
    HAVE_TRITON = False

BLOCK_GRAPHS = os.environ.get("VTQUANT_VIT_BLOCK_GRAPHS") == "1"
"""Replay each static block (all but the stage layer, whose detector synchronises with the host) as a CUDA graph
(opt-in: ``vtquant.kernels.fused_vit.BLOCK_GRAPHS = True`` or ``$VTQUANT_VIT_BLOCK_GRAPHS=1``; CUDA only)."""

ACTS = {"identity": 0, "gelu": 1, "gelu_tanh": 2, "quick_gelu": 3, "gelu_poly": 4}

# ----------------------------------------------------------------------------------------------
# Kernels: LayerNorm (or a rotated model's ProjectedRMSNorm) -> codes, with the residual add fused;
# activation (identity / GELU / QuickGELU) -> codes.  Values are rounded to the activation dtype
# before quantization, as the unfused model materialises them.
# ----------------------------------------------------------------------------------------------
if HAVE_TRITON:

    def _rows_configs():
        if tq._interpreting_at_import():
            return [triton.Config({"BM": 2}, num_warps=4)]
        return [triton.Config({"BM": bm}, num_warps=w) for bm, w in ((1, 4), (2, 4), (4, 4), (4, 8), (8, 8), (2, 8))]

    @triton.autotune(configs=_rows_configs(), key=["n", "ADD", "PROJ", "DYNAMIC", "HAS_ZERO", "IS_INT8"])
    @triton.jit
    def _norm_quant_kernel(x_ptr, y_ptr, h_ptr, w_ptr, b_ptr, u_ptr, q_ptr, s_ptr, zero_ptr, M, n, eps,
                           inv_scale, qmax, ADD: tl.constexpr, PROJ: tl.constexpr, HAS_W: tl.constexpr,
                           HAS_B: tl.constexpr, DYNAMIC: tl.constexpr, HAS_ZERO: tl.constexpr,
                           IS_INT8: tl.constexpr, BM: tl.constexpr, BLOCK: tl.constexpr):
        """``BM`` rows per program, each held whole in registers (``BLOCK`` >= n)."""
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        offs = tl.arange(0, BLOCK)
        rm = rows < M
        cm = offs < n
        m = rm[:, None] & cm[None, :]
        off = rows.to(tl.int64)[:, None] * n + offs[None, :]
        x = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
        if ADD:  # the residual add: h = x + y, written in the stream's dtype
            x = x + tl.load(y_ptr + off, mask=m, other=0.0).to(tl.float32)
            xr = x.to(h_ptr.dtype.element_ty)
            tl.store(h_ptr + off, xr, mask=m)
            x = xr.to(tl.float32)
        if PROJ:  # ProjectedRMSNorm: remove the component along u
            u = tl.load(u_ptr + offs, mask=cm, other=0.0).to(tl.float32)[None, :]
            p = x - tl.sum(x * u, axis=1)[:, None] * u
        else:
            p = tl.where(m, x - (tl.sum(x, axis=1) / n)[:, None], 0.0)
        y = p * (1.0 / tl.sqrt(tl.sum(p * p, axis=1) / n + eps))[:, None]
        if HAS_W:
            y = y * tl.load(w_ptr + offs, mask=cm, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            y = y + tl.load(b_ptr + offs, mask=cm, other=0.0).to(tl.float32)[None, :]
        y = y.to(x_ptr.dtype.element_ty).to(tl.float32)  # the norm's output as the unfused model holds it
        if DYNAMIC:
            scale = tl.maximum(tl.max(tl.abs(y), axis=1), 1e-12) / qmax
            tl.store(s_ptr + rows, scale, mask=rm)
            y = y / scale[:, None]
        else:
            y = y * inv_scale
            if HAS_ZERO:
                z = tl.load(zero_ptr + rows, mask=rm, other=0)
                y = tl.where(z[:, None] != 0, 0.0, y)
        y = tl.minimum(tl.maximum(y, -qmax), qmax)
        if IS_INT8:
            y = tl.where(y >= 0, tl.floor(y + 0.5), tl.ceil(y - 0.5))
        tl.store(q_ptr + off, y.to(q_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _act(x, ACT: tl.constexpr):
        if ACT == 1:
            x = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
        elif ACT == 2:
            z = 0.7978845608028654 * (x + 0.044715 * x * x * x)
            x = 0.5 * x * (1.0 + (2.0 * tl.sigmoid(2.0 * z) - 1.0))
        elif ACT == 3:
            x = x * tl.sigmoid(1.702 * x)
        elif ACT == 4:  # GELU(erf) with Abramowitz-Stegun 7.1.26 for erf (|error| < 1.5e-7): cheaper than libdevice
            z = tl.abs(x) * 0.7071067811865476
            t = 1.0 / (1.0 + 0.3275911 * z)
            poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
            e = 1.0 - poly * tl.exp(-z * z)
            x = 0.5 * x * (1.0 + tl.where(x >= 0, e, -e))
        return x

    def _tile_configs():
        if tq._interpreting_at_import():
            return [triton.Config({"BM": 4, "BN": 64}, num_warps=4)]
        return [triton.Config({"BM": bm, "BN": bn}, num_warps=w) for bm, bn, w in
                ((4, 1024, 8), (8, 1024, 8), (2, 1024, 4), (16, 256, 4), (8, 512, 8), (32, 128, 4), (16, 512, 8))]

    @triton.autotune(configs=_tile_configs(), key=["n", "ACT", "HAS_ZERO", "IS_INT8", "CODES"])
    @triton.jit
    def _act_static_kernel(x_ptr, q_ptr, zero_ptr, M, n, inv_scale, qmax, ACT: tl.constexpr,
                           HAS_ZERO: tl.constexpr, IS_INT8: tl.constexpr, CODES: tl.constexpr,
                           BM: tl.constexpr, BN: tl.constexpr):
        """A ``[BM, BN]`` tile per program: ``act(x)`` -> static codes (or values), sink rows zero."""
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        rm = rows < M
        m = rm[:, None] & (cols < n)[None, :]
        off = rows.to(tl.int64)[:, None] * n + cols[None, :]
        x = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
        y = _act(x, ACT).to(x_ptr.dtype.element_ty)
        if CODES:
            y = y.to(tl.float32) * inv_scale
            if HAS_ZERO:
                z = tl.load(zero_ptr + rows, mask=rm, other=0)
                y = tl.where(z[:, None] != 0, 0.0, y)
            y = tl.minimum(tl.maximum(y, -qmax), qmax)
            if IS_INT8:
                y = tl.where(y >= 0, tl.floor(y + 0.5), tl.ceil(y - 0.5))
        tl.store(q_ptr + off, y.to(q_ptr.dtype.element_ty), mask=m)

    @triton.autotune(configs=_rows_configs(), key=["n", "ACT", "IS_INT8"])
    @triton.jit
    def _act_dynamic_kernel(x_ptr, q_ptr, s_ptr, M, n, qmax, ACT: tl.constexpr, IS_INT8: tl.constexpr,
                            BM: tl.constexpr, BLOCK: tl.constexpr):
        """``BM`` whole rows per program: ``act(x)``, its row max, the codes."""
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        offs = tl.arange(0, BLOCK)
        rm = rows < M
        m = rm[:, None] & (offs < n)[None, :]
        off = rows.to(tl.int64)[:, None] * n + offs[None, :]
        x = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
        y = _act(x, ACT).to(x_ptr.dtype.element_ty).to(tl.float32)
        y = tl.where(m, y, 0.0)
        scale = tl.maximum(tl.max(tl.abs(y), axis=1), 1e-12) / qmax
        tl.store(s_ptr + rows, scale, mask=rm)
        y = tl.minimum(tl.maximum(y / scale[:, None], -qmax), qmax)
        if IS_INT8:
            y = tl.where(y >= 0, tl.floor(y + 0.5), tl.ceil(y - 0.5))
        tl.store(q_ptr + off, y.to(q_ptr.dtype.element_ty), mask=m)


# -- torch references (CPU path and the checks) ------------------------------------------------------
def ref_act(x: torch.Tensor, act: str) -> torch.Tensor:
    xf = x.float()
    if act in ("gelu", "gelu_poly"):
        y = F.gelu(xf)
    elif act == "gelu_tanh":
        y = F.gelu(xf, approximate="tanh")
    elif act == "quick_gelu":
        y = xf * torch.sigmoid(1.702 * xf)
    else:
        y = xf
    return y.to(x.dtype)


def ref_norm(x2: torch.Tensor, norm: "_Norm") -> torch.Tensor:
    xf = x2.float()
    if norm.u is not None:
        u = norm.u.float()
        p = xf - (xf @ u).unsqueeze(-1) * u
    else:
        p = xf - xf.mean(dim=-1, keepdim=True)
    y = p * torch.rsqrt(p.pow(2).mean(dim=-1, keepdim=True) + norm.eps)
    if norm.weight is not None:
        y = y * norm.weight.float()
    if norm.bias is not None:
        y = y + norm.bias.float()
    return y.to(x2.dtype)


class _Norm:
    """A LayerNorm (weight / bias optional) or a rotated model's ProjectedRMSNorm (``u``, no affine)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        name = type(module).__name__
        self.u = getattr(module, "u", None) if name == "ProjectedRMSNorm" else None
        if self.u is None and not isinstance(module, nn.LayerNorm):
            raise FusionError(f"{name} is not a LayerNorm")
        if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) != 1:
            raise FusionError("a LayerNorm over more than the last axis")
        self.eps = float(module.eps)
        self.weight = getattr(module, "weight", None) if self.u is None else None
        self.bias = getattr(module, "bias", None) if self.u is None else None


def norm_codes(x2: torch.Tensor, norm: _Norm, scale: Optional[float], dtype: torch.dtype,
               zero_rows: Optional[torch.Tensor] = None, add: Optional[torch.Tensor] = None
               ) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """``norm(x2 (+ add))`` -> 8-bit codes in one pass.  ``scale`` ``None``: per-row dynamic scales.

    Returns ``(codes, row scales [M, 1] or None, the residual x2 + add (x2 itself without add))``.
    """
    m, n = x2.shape
    qmax = tq._qmax(dtype)
    if not tq._can_run(x2) or triton.next_power_of_2(n) > tq.MAX_ROW_BLOCK:
        h = x2 if add is None else x2 + add
        y = ref_norm(h, norm)
        if scale is None:
            q, s = tq._row_codes(y, dtype)
            return q, s, h
        return tq._zero(tq._codes(y.float() * (1.0 / scale), dtype), zero_rows), None, h
    x2 = x2.contiguous()
    h = torch.empty_like(x2) if add is not None else x2
    q = torch.empty((m, n), dtype=dtype, device=x2.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x2.device) if scale is None else None
    dummy = x2
    u = norm.u.to(device=x2.device, dtype=torch.float32) if norm.u is not None else None
    grid = lambda meta: (triton.cdiv(m, meta["BM"]),)  # noqa: E731
    _norm_quant_kernel[grid](
        x2, add.contiguous() if add is not None else dummy, h, norm.weight if norm.weight is not None else dummy,
        norm.bias if norm.bias is not None else dummy, u if u is not None else dummy, q,
        s if s is not None else dummy, tq._zero_arg(zero_rows, dummy), m, n, norm.eps,
        1.0 / scale if scale is not None else 1.0, qmax, ADD=add is not None, PROJ=u is not None,
        HAS_W=norm.weight is not None, HAS_B=norm.bias is not None, DYNAMIC=scale is None,
        HAS_ZERO=zero_rows is not None and scale is not None, IS_INT8=dtype == torch.int8,
        BLOCK=triton.next_power_of_2(n))
    return q, s, h


def act_codes(x2: torch.Tensor, act: str, scale: Optional[float], dtype: torch.dtype,
              zero_rows: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``act(x2)`` -> codes in one pass (``act`` one of :data:`ACTS`); ``scale`` ``None``: per-row dynamic."""
    m, n = x2.shape
    qmax = tq._qmax(dtype)
    if not tq._can_run(x2) or (scale is None and triton.next_power_of_2(n) > tq.MAX_ROW_BLOCK):
        y = ref_act(x2, act)
        if scale is None:
            return tq._row_codes(y, dtype)
        return tq._zero(tq._codes(y.float() * (1.0 / scale), dtype), zero_rows), None
    x2 = x2.contiguous()
    q = torch.empty((m, n), dtype=dtype, device=x2.device)
    if scale is None:
        s = torch.empty((m, 1), dtype=torch.float32, device=x2.device)
        grid = lambda meta: (triton.cdiv(m, meta["BM"]),)  # noqa: E731
        _act_dynamic_kernel[grid](x2, q, s, m, n, qmax, ACT=ACTS[act], IS_INT8=dtype == torch.int8,
                                  BLOCK=triton.next_power_of_2(n))
        return q, s
    grid = lambda meta: (triton.cdiv(m, meta["BM"]), triton.cdiv(n, meta["BN"]))  # noqa: E731
    _act_static_kernel[grid](x2, q, tq._zero_arg(zero_rows, x2), m, n, 1.0 / scale, qmax, ACT=ACTS[act],
                             HAS_ZERO=zero_rows is not None, IS_INT8=dtype == torch.int8, CODES=True)
    return q, None


def act_values(x2: torch.Tensor, act: str) -> torch.Tensor:
    """``act(x2)`` in ``x2``'s dtype (one pass): the probe a sink detector reads, a rotation's input."""
    if not tq._can_run(x2):
        return ref_act(x2, act)
    x2 = x2.contiguous()
    out = torch.empty_like(x2)
    m, n = x2.shape
    grid = lambda meta: (triton.cdiv(m, meta["BM"]), triton.cdiv(n, meta["BN"]))  # noqa: E731
    _act_static_kernel[grid](x2, out, x2, m, n, 1.0, 1.0, ACT=ACTS[act], HAS_ZERO=False, IS_INT8=False, CODES=False)
    return out


GELU_ERF = "gelu_poly" if os.environ.get("VTQUANT_GELU_ERF", "poly") == "poly" else "gelu"
"""How the kernels evaluate GELU(erf): ``gelu_poly`` (erf by a 5-term polynomial, |error| < 1.5e-7, far below the
bf16 rounding of the activation; default) or ``gelu`` (libdevice erf); ``$VTQUANT_GELU_ERF=libdevice`` picks it."""


def _act_name(module: nn.Module) -> Optional[str]:
    name = type(module).__name__
    if name == "GELU":
        return "gelu_tanh" if getattr(module, "approximate", "none") == "tanh" else GELU_ERF
    if name == "GELUTanh":
        return "gelu_tanh"
    if name == "QuickGELU":
        return "quick_gelu"
    return None


# ----------------------------------------------------------------------------------------------
# Block layouts
# ----------------------------------------------------------------------------------------------
def _identity(m: Any) -> bool:
    return m is None or isinstance(m, nn.Identity)


def _gamma(ls: Any) -> tuple[Optional[torch.Tensor], Optional[str]]:
    if _identity(ls):
        return None, None
    g = getattr(ls, "gamma", None)
    if isinstance(g, torch.Tensor) and not getattr(ls, "inplace", False):
        return g, None
    return None, f"layer scale {type(ls).__name__} is not covered"


class VitLayout:
    """Where the parts of one pre-norm ViT block are (timm ``Block`` or open_clip ``ResidualAttentionBlock``)."""

    def __init__(self, kind: str, norm1: str, norm2: str, qkv: list[str], proj: str, fc1: str, fc2: str, act: str,
                 heads: int, head_dim: int, ls1: Optional[torch.Tensor], ls2: Optional[torch.Tensor]) -> None:
        self.kind, self.norm1, self.norm2, self.qkv, self.proj = kind, norm1, norm2, qkv, proj
        self.fc1, self.fc2, self.act, self.heads, self.head_dim = fc1, fc2, act, heads, head_dim
        self.ls1, self.ls2 = ls1, ls2


def vit_layout(block: nn.Module) -> tuple[Optional[VitLayout], str]:
    """The layout of ``block`` or ``(None, why it is not covered)``."""
    cls = f"{type(block).__module__}.{type(block).__name__}"
    if cls == "timm.models.vision_transformer.Block":
        attn, mlp = block.attn, block.mlp
        if not all(_identity(getattr(attn, n, None)) for n in ("q_norm", "k_norm", "norm")):
            return None, "q/k norms or a normed attention output are not covered"
        if getattr(attn, "gate", None) is not None:
            return None, "gated attention is not covered"
        if not hasattr(attn, "qkv") or not _identity(getattr(mlp, "norm", None)):
            return None, "separate q/k/v or a normed MLP are not covered"
        if not all(hasattr(mlp, n) for n in ("fc1", "act", "fc2")):
            return None, "the MLP is not fc1 -> act -> fc2 (a GLU MLP is not covered)"
        act = _act_name(mlp.act)
        if act is None:
            return None, f"MLP activation {type(mlp.act).__name__} is not covered"
        ls1, why1 = _gamma(block.ls1)
        ls2, why2 = _gamma(block.ls2)
        if why1 or why2:
            return None, why1 or why2
        heads = int(attn.num_heads)
        head_dim = int(getattr(attn, "head_dim", 0) or attn.proj.in_features // heads)
        if abs(float(getattr(attn, "scale", head_dim ** -0.5)) - head_dim ** -0.5) > 1e-9:
            return None, "an attention scale other than head_dim ** -0.5"
        return VitLayout("timm", "norm1", "norm2", ["attn.qkv"], "attn.proj", "mlp.fc1", "mlp.fc2", act,
                         heads, head_dim, ls1, ls2), ""
    if cls == "open_clip.transformer.ResidualAttentionBlock":
        attn, mlp = block.attn, block.mlp
        if type(attn).__name__ != "ExplicitMultiheadAttention":
            return None, "attention is not vtquant's ExplicitMultiheadAttention"
        if not attn.batch_first:
            return None, "sequence-first blocks are not covered"
        if hasattr(block, "ln_1_kv"):
            return None, "cross-attention blocks are not covered"
        names = [n for n, _ in mlp.named_children()]
        if names != ["c_fc", "gelu", "c_proj"]:
            return None, f"MLP {names} is not c_fc -> gelu -> c_proj"
        act = _act_name(mlp.gelu)
        if act is None:
            return None, f"MLP activation {type(mlp.gelu).__name__} is not covered"
        ls1, why1 = _gamma(block.ls_1)
        ls2, why2 = _gamma(block.ls_2)
        if why1 or why2:
            return None, why1 or why2
        heads = int(attn.num_heads)
        return VitLayout("open_clip", "ln_1", "ln_2", ["attn.q_proj", "attn.k_proj", "attn.v_proj"],
                         "attn.out_proj", "mlp.c_fc", "mlp.c_proj", act, heads, attn.embed_dim // heads,
                         ls1, ls2), ""
    return None, f"block class {type(block).__name__} is not a covered pre-norm ViT block"


# ----------------------------------------------------------------------------------------------
# GEMM sites with the sinks' rows (templates and full-precision rows)
# ----------------------------------------------------------------------------------------------
class _VSite(_Site):
    """One GEMM of a ViT block; sink rows: ``none``, ``zero`` (clamp) or ``rows`` (template / fp rows)."""

    def setup_rows(self, members: list, gamma: Optional[torch.Tensor]) -> None:
        self.gamma = None if gamma is None else gamma.detach().float().reshape(-1)
        if self.gamma is not None:  # fold the layer scale into the column scales and the bias
            self.col_scale = (self.col_scale * self.gamma.to(self.col_scale.device)).contiguous()
            if self.bias is not None:
                self.bias = (self.bias.detach().float() * self.gamma.to(self.bias.device))
        self.rows = "none"
        self.need_fp = False
        self.w_fp: Optional[torch.Tensor] = None
        self.b_fp: Optional[torch.Tensor] = None
        self._cache_key = None
        self._cache: tuple = (None, None)
        self._tmpl_dev: Optional[torch.Tensor] = None
        guards = [getattr(m, "guard", None) for m in members]
        if all(g is None or g.mode == "off" for g in guards):
            return
        if any(g is None for g in guards) or len({g.mode for g in guards}) != 1:
            raise FusionError("the fused Linears have different sink policies")
        mode = guards[0].mode
        if mode == "clamp":
            self.rows = "zero"
            return
        self.rows = "rows"
        tmpl, cols = [], []
        for m, g in zip(members, guards):
            tt = g.template_types().bool()
            tmpl.append(g.template_out.float() if g.mode == "template" else
                        torch.zeros(g.num_types, m.out_features, device=tt.device))
            cols.append(tt.reshape(-1, 1).expand(-1, m.out_features))
            if bool(g.fp_types().any()):
                self.need_fp = True
        self.templates = torch.cat(tmpl, 1)
        self.tmpl_cols = torch.cat(cols, 1).contiguous()
        self.any_tmpl = bool(self.tmpl_cols.any())  # else every sink row is a full-precision row
        if self.need_fp:
            ws, bs = [], []
            for m in members:
                w_fp = getattr(m, "w_fp", None)
                if w_fp is None:
                    raise FusionError("a full-precision sink row needs the Linear's dequantized weights")
                ws.append(w_fp)
                bs.append(m.bias.detach() if m.bias is not None else torch.zeros(m.out_features, device=w_fp.device))
            self.w_fp = torch.cat(ws, 0).contiguous()
            self.b_fp = torch.cat(bs, 0) if any(m.bias is not None for m in members) else None

    def gemm(self, q: torch.Tensor, row_scale: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
        if q.dtype != torch.float8_e4m3fn:
            return super().gemm(q, row_scale, out_dtype)
        m = q.shape[0]
        if row_scale is None:  # static: the activation scale is in the column scales
            row_scale = self._scale_a.get((m, q.device))
            if row_scale is None:
                row_scale = self._scale_a[(m, q.device)] = torch.ones((m, 1), dtype=torch.float32, device=q.device)
        if self.w_row is None or self.w_row.device != q.device:
            self.w_row = self.col_scale.to(q.device).reshape(1, -1).contiguous()
            self.bias_bf16 = None if self.bias is None else self.bias.to(device=q.device, dtype=torch.bfloat16)
        y = torch._scaled_mm(q, self.qweight.t(), scale_a=row_scale, scale_b=self.w_row, bias=self.bias_bf16,
                             out_dtype=torch.bfloat16)
        return y if out_dtype == torch.bfloat16 else y.to(out_dtype)

    def write_rows(self, y: torch.Tensor, index: Optional[torch.Tensor], state: Any, fp_in: Any,
                   types: Optional[torch.Tensor] = None) -> None:
        """Write the sinks' output rows by index: templates, full-precision rows of ``fp_in()`` elsewhere.
        ``types``: the sinks' template types (a CUDA graph's buffer: gathered on every call, not cached)."""
        if self.rows != "rows" or index is None:
            return
        if self._tmpl_dev is None or self._tmpl_dev.device != y.device or self._tmpl_dev.dtype != y.dtype:
            self._tmpl_dev = self.templates.to(device=y.device, dtype=y.dtype)
            self.tmpl_cols = self.tmpl_cols.to(y.device)
        if types is not None:
            out, cols = self._tmpl_dev.index_select(0, types), self.tmpl_cols.index_select(0, types)
        else:
            key = (state.generation, y.dtype, index.data_ptr(), index.numel())
            if self._cache_key != key:
                types = state.types.reshape(-1).index_select(0, index).clamp_min(0)
                self._cache = (self._tmpl_dev.index_select(0, types), self.tmpl_cols.index_select(0, types))
                self._cache_key = key
            out, cols = self._cache
        if self.need_fp:
            if self.w_fp.dtype != y.dtype or self.w_fp.device != y.device:
                self.w_fp = self.w_fp.to(device=y.device, dtype=y.dtype)
                self.b_fp = None if self.b_fp is None else self.b_fp.to(device=y.device, dtype=y.dtype)
            rows = fp_in()
            fp = F.linear(rows.to(self.w_fp.dtype), self.w_fp, self.b_fp).to(y.dtype)
            out = torch.where(cols, out, fp) if self.any_tmpl else fp
        if self.gamma is not None:
            out = out * self.gamma.to(device=y.device, dtype=y.dtype)
        y.index_copy_(0, index, out)


def _members(block: nn.Module, names: list[str]) -> list:
    return [block.get_submodule(n) for n in names]


def _static_sites(block: nn.Module, lay: VitLayout) -> tuple[Optional[dict], str]:
    from .linear import RealQuantLinear

    sites: dict = {}
    groups = {"qkv": (lay.qkv, None), "proj": ([lay.proj], lay.ls1), "fc1": ([lay.fc1], None),
              "fc2": ([lay.fc2], lay.ls2)}
    for key, (names, gamma) in groups.items():
        members = _members(block, names)
        if not all(isinstance(m, RealQuantLinear) for m in members):
            return None, f"{key}: not every Linear is a converted RealQuantLinear"
        if any(m.detector is not None for m in members) and key != "fc2":
            return None, f"{key}: a sink detector reads this input (only the fc2 probe is covered)"
        if key != "fc2" and any(m.rot_signs is not None for m in members):
            return None, f"{key}: online rotation of this input is not covered"
        if len({m._a_scale_value for m in members}) != 1:
            return None, f"{key}: the fused Linears have different activation scales"
        m0 = members[0]
        qweight, col, bias = stacked_weights(members, [m.out_scale for m in members])
        site = _VSite(qweight, col, bias, [m.out_features for m in members], m0._a_scale_value)
        try:
            site.setup_rows(members, gamma)
        except FusionError as exc:
            return None, f"{key}: {exc}"
        site.codes_dtype = m0.qweight.dtype
        site.rot = (m0.rot_signs, m0.rot_factors) if m0.rot_signs is not None else None
        site.detector = m0.detector
        site.members = members
        sites[key] = site
    return sites, ""


def _dynamic_sites(block: nn.Module, lay: VitLayout) -> tuple[Optional[dict], str]:
    from ..bench.gpu import DynamicRowLinear

    sites: dict = {}
    groups = {"qkv": (lay.qkv, None), "proj": ([lay.proj], lay.ls1), "fc1": ([lay.fc1], None),
              "fc2": ([lay.fc2], lay.ls2)}
    for key, (names, gamma) in groups.items():
        members = _members(block, names)
        if not all(isinstance(m, DynamicRowLinear) for m in members):
            return None, f"{key}: not every Linear is a per-token dynamic Linear"
        site = _VSite(*dynamic_weights(members), [m.out_features for m in members], None)
        site.setup_rows([], gamma)
        site.codes_dtype = members[0].qweight.dtype
        site.rot, site.detector, site.members = None, None, members
        sites[key] = site
    return sites, ""


# ----------------------------------------------------------------------------------------------
# The fused block forward
# ----------------------------------------------------------------------------------------------
class FusedVitBlockForward:
    """The fused forward of one pre-norm ViT block (installed as the block's ``forward``)."""

    def __init__(self, block: nn.Module, lay: VitLayout, sites: dict, static: bool, state: Any = None) -> None:
        self.block_ref = [block]
        self.original = block.forward
        self.layout = lay
        self.sites = sites
        self.static = static
        self.state = state
        self.norm1_mod = block.get_submodule(lay.norm1)
        self.norm2_mod = block.get_submodule(lay.norm2)
        self.norm1, self.norm2 = _Norm(self.norm1_mod), _Norm(self.norm2_mod)
        self.act_mod = block.get_submodule(lay.fc1.rsplit(".", 1)[0] + (".act" if lay.kind == "timm" else ".gelu"))
        self.calls = 0
        self.graphs: dict = {}
        self.warm: set = set()
        self.graph_error = ""
        # a block whose forward synchronises with the host (the stage layer's detector) is never captured
        self.graphable = static and sites["fc2"].detector is None

    def _covered_call(self, args: tuple, kwargs: dict) -> bool:
        block = self.block_ref[0]
        if block.training or args:
            return False
        if self.layout.kind == "timm":
            return kwargs.get("attn_mask") is None and not kwargs.get("is_causal", False) and set(kwargs) <= {
                "attn_mask", "is_causal"}
        return all(kwargs.get(k) is None for k in kwargs) and set(kwargs) <= {"k_x", "v_x", "attn_mask"}

    def _codes_of_norm(self, x2, norm, site, zero, add=None):
        scale = site.a_scale if self.static else None
        return norm_codes(x2, norm, scale, site.codes_dtype,
                          zero if (self.static and site.rows != "none") else None, add)

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if x.dim() != 3 or not self._covered_call(args, kwargs):
            return self.original(x, *args, **kwargs)
        self.calls += 1
        state = self.state
        mask = state.mask_for(x) if state is not None else None
        index = state.flat_index() if mask is not None else None
        if BLOCK_GRAPHS and x.is_cuda and self.graphable and state is not None:
            return self._graphed(x, mask, index)
        return self._body(x, mask.reshape(-1) if index is not None else None, index, None)

    # -- CUDA graphs of the block (BLOCK_GRAPHS): one replay instead of ~40 launches ---------------------------
    graphable = True

    def _graphed(self, x: torch.Tensor, mask: Optional[torch.Tensor], index: Optional[torch.Tensor]) -> torch.Tensor:
        """Replay this block's CUDA graph (captured on the second call of a shape and sink count; the first runs
        eagerly on the same buffers).  The sink rows, mask and types live in buffers shared by the model's blocks,
        refreshed once per sink set; the output is the graph's buffer (valid until the block runs again)."""
        state = self.state
        sh = getattr(state, "_vit_graphs", None)
        if sh is None:
            sh = state._vit_graphs = {"pool": torch.cuda.graph_pool_handle(), "bufs": {}, "gen": None, "outs": set()}
        b, t, _ = x.shape
        n_sinks = 0 if index is None else index.numel()
        bkey = (b, t, n_sinks, x.device)
        bufs = sh["bufs"].get(bkey)
        if bufs is None:
            bufs = sh["bufs"][bkey] = (torch.zeros(max(n_sinks, 1), dtype=torch.long, device=x.device),
                                      torch.zeros(max(n_sinks, 1), dtype=torch.long, device=x.device),
                                      torch.zeros(b * t, dtype=torch.bool, device=x.device))
            sh["gen"] = None
        g_index, g_types, g_zero = bufs
        if sh["gen"] != (state.generation, bkey):
            if n_sinks:
                g_index.copy_(index)
                g_types.copy_(state.types.reshape(-1).index_select(0, index).clamp_min(0))
                g_zero.copy_(mask.reshape(-1))
            sh["gen"] = (state.generation, bkey)
        args = (g_zero, g_index, g_types) if n_sinks else (None, None, None)
        key = (bkey, x.dtype)
        entry = self.graphs.get(key)
        if entry is None:
            if key not in self.warm:  # autotuning, lazy casts and caches happen outside the capture
                self.warm.add(key)
                return self._body(x, *args)
            x_in = x if x.data_ptr() in sh["outs"] else x.clone()
            try:
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=sh["pool"]):
                    out = self._body(x_in, *args)
            except Exception as exc:  # noqa: BLE001 - a block that cannot be captured runs eagerly
                torch.cuda.synchronize()
                self.graphable = False
                self.graph_error = f"{type(exc).__name__}: {exc}"
                return self._body(x, *args)
            sh["outs"].add(out.data_ptr())
            entry = self.graphs[key] = (graph, x_in, out)
        graph, x_in, out = entry
        if x.data_ptr() != x_in.data_ptr():
            x_in.copy_(x)
        graph.replay()
        return out

    def _body(self, x: torch.Tensor, zero: Optional[torch.Tensor], index: Optional[torch.Tensor],
              types: Optional[torch.Tensor]) -> torch.Tensor:
        lay, s, state = self.layout, self.sites, self.state
        b, t, d = x.shape
        dtype = x.dtype
        x2 = x.reshape(-1, d)

        # attention
        q, rs, _ = self._codes_of_norm(x2, self.norm1, s["qkv"], zero)
        qkv = s["qkv"].gemm(q, rs, dtype)
        s["qkv"].write_rows(qkv, index, state, lambda: self.norm1_mod(x2.index_select(0, index)), types)
        c = qkv.shape[1] // 3
        hd = lay.head_dim
        qs = qkv[:, :c].view(b, t, -1, hd).transpose(1, 2)
        ks = qkv[:, c:2 * c].view(b, t, -1, hd).transpose(1, 2)
        vs = qkv[:, 2 * c:].view(b, t, -1, hd).transpose(1, 2)
        o = F.scaled_dot_product_attention(qs, ks, vs)
        o2 = o.transpose(1, 2).reshape(b * t, c)
        site = s["proj"]
        if self.static:
            q, rs = act_codes(o2, "identity", site.a_scale, site.codes_dtype,
                              zero if site.rows != "none" else None)
        else:
            q, rs = act_codes(o2, "identity", None, site.codes_dtype)
        y = site.gemm(q, rs, dtype)
        site.write_rows(y, index, state, lambda: o2.index_select(0, index), types)

        # MLP: the residual add fused into the second norm's kernel
        q, rs, h = self._codes_of_norm(x2, self.norm2, s["fc1"], zero, add=y)
        f = s["fc1"].gemm(q, rs, dtype)
        s["fc1"].write_rows(f, index, state, lambda: self.norm2_mod(h.index_select(0, index)), types)
        site = s["fc2"]
        act = lay.act
        if site.detector is not None or site.rot is not None:
            a = act_values(f, act)  # materialised: the probe the detector reads / the rotation's input
            if site.detector is not None:
                site.detector(a.view(b, t, -1))
                mask = state.mask_for(x) if state is not None else None
                index = state.flat_index() if mask is not None else None
                zero = mask.reshape(-1) if index is not None else None
            zr = zero if site.rows != "none" else None
            if site.rot is not None:
                q = self._rotated_codes(a, site, zr)
            else:
                q, _ = act_codes(a, "identity", site.a_scale, site.codes_dtype, zr)
            rs = None

            def fc2_in():
                rows = a.index_select(0, index)
                if site.rot is not None:
                    from ..core.rotation import hadamard_apply

                    rows = hadamard_apply(rows, *site.rot)
                return rows
        else:
            if self.static:
                q, rs = act_codes(f, act, site.a_scale, site.codes_dtype, zero if site.rows != "none" else None)
            else:
                q, rs = act_codes(f, act, None, site.codes_dtype)

            def fc2_in():
                return self.act_mod(f.index_select(0, index))
        y = site.gemm(q, rs, dtype)
        site.write_rows(y, index, state, fc2_in, types)
        return (h + y).view(b, t, d)

    def _rotated_codes(self, a: torch.Tensor, site: _VSite, zero: Optional[torch.Tensor]) -> torch.Tensor:
        from ..core.rotation import hadamard_apply
        from .triton_hadamard import _launch, _usable, hadamard_plan

        signs, factors = site.rot
        n = a.shape[1]
        if _usable(a) and a.dtype in (torch.bfloat16, torch.float16):
            plan = hadamard_plan(n, signs, factors, a.device)
            if plan is not None:
                out = torch.empty(a.shape, dtype=site.codes_dtype, device=a.device)
                return _launch(a, n, plan, False, out, site.a_scale, zero)
        r = hadamard_apply(a, signs, factors)
        q, _ = act_codes(r, "identity", site.a_scale, site.codes_dtype, zero)
        return q


# ----------------------------------------------------------------------------------------------
# Installing it
# ----------------------------------------------------------------------------------------------
def vit_blocks(model: nn.Module) -> Optional[list[nn.Module]]:
    """The blocks of a ViT the fused forward may cover (its adapter's blocks), or ``None`` if the model
    has no covered block class at all (then it is not a ViT for this module)."""
    handle = getattr(model, "vtquant", None)
    adapter = handle.adapter if handle is not None else None
    if adapter is not None:
        blocks = adapter.blocks()
    else:
        blocks = [m for m in model.modules() if type(m).__name__ in ("Block", "ResidualAttentionBlock")]
    known = ("timm.models.vision_transformer.Block", "open_clip.transformer.ResidualAttentionBlock")
    if not any(f"{type(b).__module__}.{type(b).__name__}" in known for b in blocks):
        return None
    return list(blocks)


def is_vit(model: nn.Module) -> bool:
    return vit_blocks(model) is not None


def fuse_vit_static_(model: nn.Module) -> dict[int, str]:
    """Install the fused forward on every block of a converted static ViT that it covers."""
    blocks = vit_blocks(model)
    if blocks is None:
        raise FusionError(f"{type(model).__name__}: no timm Block / open_clip ResidualAttentionBlock")
    state = getattr(model.vtquant, "state", None) if getattr(model, "vtquant", None) is not None else None
    report: dict[int, str] = {}
    for i, block in enumerate(blocks):
        lay, why = vit_layout(block)
        sites = None
        if lay is not None:
            try:
                _Norm(block.get_submodule(lay.norm1)), _Norm(block.get_submodule(lay.norm2))
            except FusionError as exc:
                lay, why = None, str(exc)
        if lay is not None:
            sites, why = _static_sites(block, lay)
        if sites is None:
            report[i] = why
            continue
        _install(block, FusedVitBlockForward(block, lay, sites, True, sites_state(sites, state)))
        report[i] = "fused"
    model._vtquant_fusion_report = report
    return report


def fuse_vit_dynamic_(model: nn.Module, blocks: Optional[list[nn.Module]] = None) -> dict[int, str]:
    """Install the fused per-token dynamic forward on every block whose Linears are
    :class:`vtquant.bench.gpu.DynamicRowLinear` (the per-token dynamic peer)."""
    blocks = blocks if blocks is not None else vit_blocks(model)
    if blocks is None:
        raise FusionError(f"{type(model).__name__}: no timm Block / open_clip ResidualAttentionBlock")
    report: dict[int, str] = {}
    for i, block in enumerate(blocks):
        lay, why = vit_layout(block)
        sites = None
        if lay is not None:
            sites, why = _dynamic_sites(block, lay)
        if sites is None:
            report[i] = why
            continue
        _install(block, FusedVitBlockForward(block, lay, sites, False, None))
        report[i] = "fused"
    model._vtquant_fusion_report = report
    return report


__all__ = ["FUSED_ATTR", "FusedVitBlockForward", "act_codes", "fuse_vit_dynamic_", "fuse_vit_static_", "is_vit",
           "norm_codes", "vit_layout"]
