"""Producer-fused forward of a pre-norm SwiGLU decoder block on real 8-bit kernels (issue 13 item 3).

``convert_(model, backend, fused=True)`` (static per-tensor, vtquant's quantized models) and
:func:`fuse_dynamic_` (per-token dynamic FP8 / int8, the peer, done the same way) replace the
forward of every decoder block whose layout the adapter reads as a plain pre-norm block (RMSNorm ->
q/k/v -> rotary -> attention -> o_proj, RMSNorm -> gate/up -> SiLU * up -> down_proj: Llama,
Mistral, Qwen2 and their kind) by one that:

* writes the 8-bit codes straight from the producers: RMSNorm -> codes (static scale, sink rows
  written as zero codes by the same kernel; dynamic: the row max in the same kernel), SiLU(g) * u ->
  codes, the attention output -> codes (one pass), and for a rotated model SiLU(g) * u -> online
  Hadamard -> codes in one kernel (:mod:`vtquant.kernels.triton_hadamard`);
* runs q/k/v and gate/up as one GEMM each (``torch._scaled_mm`` with the weight scales fused and
  bf16 out for FP8; the Triton int8 GEMM with the rescale in its epilogue for int8 on CUDA;
  ``torch._int_mm`` + rescale, or oneDNN's int8 matmul, on the CPU; there the producers are the fake-quant
  model's own op sequence, in place, :mod:`vtquant.kernels.cpu_quant`: bit-identical codes);
* writes the sinks' output rows (the template outputs ``W t + b``, or, for full-precision sink rows,
  ``x_sink W^T + b`` from the sink rows' own float inputs) by index into the fused GEMM output: O(#sinks),
  no per-Linear split copies, concats or casts of the whole activation;
* runs attention through ``F.scaled_dot_product_attention`` (flash / efficient kernels on CUDA).

The block's forward hooks (vtquant's residual detector and residual restore) still run: only the
block's ``forward`` is replaced.  Prefill and decoding with transformers' ``DynamicCache`` run fused
(keys / values appended to the cache, attention over the cached length).  Calls the fast path does not
cover fall back, per call, to the block's original forward: other cache classes (static, sliding-window),
missing rotary embeddings, ``output_attentions``; blocks it cannot cover
at all keep their original forward: a sink detector on a Linear other than the MLP down-projection (the
probe of a stage layer, ``silu(g) * u``, is materialised there for the detector, then quantized), mixed
sink policies across the Linears of one GEMM, an online rotation anywhere but the
down-projection input, a layout other than plain pre-norm RMSNorm / SwiGLU.  :func:`fused_blocks`
says which blocks run fused.
"""
from __future__ import annotations

import sys
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import cpu_quant as cq
from . import triton_quant as tq

FUSED_ATTR = "_vtquant_fused"

try:  # pragma: no cover - exercised on the GPU machine or with TRITON_INTERPRET=1
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # pragma: no cover
    HAVE_TRITON = False

if HAVE_TRITON:

    @triton.jit
    def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, x_stride, cs_stride, t, NH, HALF: tl.constexpr, NHP: tl.constexpr):
        """In place: the rotary embedding of the ``NH`` leading heads (queries then keys) of one row of
        the fused q/k/v GEMM output, ``x1 cos - x2 sin | x2 cos + x1 sin`` (HF's ``rotate_half`` layout)."""
        row = tl.program_id(0)
        hs = tl.arange(0, NHP)
        d = tl.arange(0, HALF)
        m = (hs < NH)[:, None]
        base = x_ptr + row.to(tl.int64) * x_stride + hs[:, None] * (2 * HALF) + d[None, :]
        x1 = tl.load(base, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(base + HALF, mask=m, other=0.0).to(tl.float32)
        cb = cos_ptr + row.to(tl.int64) * cs_stride
        sb = sin_ptr + row.to(tl.int64) * cs_stride
        c1 = tl.load(cb + d).to(tl.float32)[None, :]
        c2 = tl.load(cb + HALF + d).to(tl.float32)[None, :]
        s1 = tl.load(sb + d).to(tl.float32)[None, :]
        s2 = tl.load(sb + HALF + d).to(tl.float32)[None, :]
        tl.store(base, (x1 * c1 - x2 * s1).to(x_ptr.dtype.element_ty), mask=m)
        tl.store(base + HALF, (x2 * c2 + x1 * s2).to(x_ptr.dtype.element_ty), mask=m)


def rotary_inplace_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, head_dim: int) -> bool:
    """Apply the rotary embedding to the first ``heads`` heads of ``qkv`` ``[M, N]`` in place (one Triton
    kernel); ``cos`` / ``sin`` ``[B, T, head_dim]`` with ``B * T = M``.  ``False`` where it cannot run."""
    import os

    if not HAVE_TRITON or not (qkv.is_cuda or os.environ.get("TRITON_INTERPRET") == "1") or head_dim % 2:
        return False
    half = head_dim // 2
    if half & (half - 1) or qkv.stride(-1) != 1:
        return False
    m = qkv.shape[0]
    cos2 = cos.reshape(-1, head_dim)
    sin2 = sin.reshape(-1, head_dim)
    if cos2.shape[0] != m:
        if m % cos2.shape[0]:
            return False
        cos2 = cos2.repeat(m // cos2.shape[0], 1)  # positions shared across the batch
        sin2 = sin2.repeat(m // sin2.shape[0], 1)
    cos2, sin2 = cos2.contiguous(), sin2.contiguous()
    _rotary_kernel[(m,)](qkv, cos2, sin2, qkv.stride(0), cos2.stride(0), 0, heads, HALF=half,
                         NHP=triton.next_power_of_2(heads), num_warps=4)
    return True


def _on_cpu(x: torch.Tensor) -> bool:
    """CPU tensors take :mod:`vtquant.kernels.cpu_quant` (the Triton interpreter, in tests, the Triton kernels)."""
    return not x.is_cuda and not tq._interpreting()


class FusionError(ValueError):
    """The model's blocks cannot run the fused forward."""


def _norm_eps(norm: nn.Module) -> float:
    for name in ("variance_epsilon", "eps"):
        value = getattr(norm, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    raise FusionError(f"{type(norm).__name__}: no epsilon attribute")


def _layout_ok(layout: Any, block: nn.Module) -> Optional[str]:
    """``None`` if ``block`` is a plain pre-norm RMSNorm / SwiGLU block, else why not."""
    from ..adapters.decoder_layout import norm_kind

    if layout is None:
        return "no decoder layout"
    if layout.kind != "pre-norm" or layout.post_attn_norm or layout.post_mlp_norm or layout.qk_norm \
            or layout.other_norms:
        return f"layout {layout.kind} (post norms / q-k norms) is not covered"
    if len(layout.attn_readers) != 3 or len(layout.mlp_readers) != 2:
        return "fused qkv / gate_up projections are not covered"
    if layout.pre_attn_norm is None or layout.pre_mlp_norm is None:
        return "no pre-norms"
    for name in (layout.pre_attn_norm, layout.pre_mlp_norm):
        norm = block.get_submodule(name)
        if norm_kind(norm) != "rms" or getattr(norm, "weight", None) is None:
            return f"{name} is not an x / rms(x) * w RMSNorm"
    mlp = block.get_submodule(layout.mlp_writer.rsplit(".", 1)[0])
    act = getattr(mlp, "act_fn", None)
    if not isinstance(act, nn.SiLU) and type(act).__name__ not in ("SiLU", "SiLUActivation"):
        return f"MLP activation {type(act).__name__} is not SiLU"
    attn = block.get_submodule(layout.attn_readers[0].rsplit(".", 1)[0])
    if getattr(attn, "sliding_window", None):
        return "sliding-window attention is not covered"
    if not hasattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb"):
        return "no apply_rotary_pos_emb next to the attention class"
    return None


class _Site:
    """One GEMM of the block: 8-bit weights (one or several Linears fused), scales, sink policy."""

    def __init__(self, qweight: torch.Tensor, col_scale: torch.Tensor, bias: Optional[torch.Tensor],
                 sizes: list[int], a_scale: Optional[float], policy: str = "none",
                 templates: Optional[torch.Tensor] = None) -> None:
        self.qweight = qweight  # [N, K] float8_e4m3fn / int8
        self.col_scale = col_scale.float().reshape(-1).contiguous()  # [N] weight scale (x activation scale: static)
        self.w_row = None
        self.bias = bias
        self.sizes = sizes
        self.a_scale = a_scale  # static activation scale (None: dynamic)
        self.policy = policy  # none | zero | template
        self.templates = templates  # [K, N] template outputs of the fused members
        self._scale_a: dict = {}
        self._tmpl_key = None
        self._tmpl_rows: Optional[torch.Tensor] = None
        self.cpu_kernel = "int_mm"  # cpu-int8: int_mm | onednn (set by the fusing functions) | fbgemm (as int_mm)
        self._onednn = None

    def u8(self, x: torch.Tensor) -> bool:
        """Whether this call's codes go to oneDNN as uint8 (a CPU input of >= ``ONEDNN_MIN_ROWS`` rows)."""
        return self.cpu_kernel == "onednn" and x.shape[0] >= cq.ONEDNN_MIN_ROWS and self.qweight.dtype == torch.int8

    def gemm(self, q: torch.Tensor, row_scale: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
        if q.dtype == torch.float8_e4m3fn:
            m = q.shape[0]
            if row_scale is None:  # static: col_scale holds w_scale * a_scale; a row vector of ones
                scale_a = self._scale_a.get((m, q.device))
                if scale_a is None:
                    scale_a = self._scale_a[(m, q.device)] = torch.ones((m, 1), dtype=torch.float32, device=q.device)
                row_scale = scale_a
            if self.w_row is None or self.w_row.device != q.device:
                self.w_row = self.col_scale.to(q.device).reshape(1, -1).contiguous()
            bias = None if self.bias is None else self.bias.to(torch.bfloat16)
            y = torch._scaled_mm(q, self.qweight.t(), scale_a=row_scale, scale_b=self.w_row, bias=bias,
                                 out_dtype=torch.bfloat16)
            return y if out_dtype == torch.bfloat16 else y.to(out_dtype)
        if q.is_cuda:
            return tq.int8_matmul_scaled(q, self.qweight, self.col_scale, row_scale, self.bias, out_dtype)
        if q.dtype == torch.uint8:  # codes + 128: oneDNN's int8 matmul, rescale and bias in its epilogue
            if self._onednn is None:
                self._onednn = cq.onednn_pack(self.qweight)
            y = cq.onednn_linear(q, self._onednn, self.col_scale, self.bias,
                                 torch.float32 if row_scale is not None else out_dtype)
            return y if row_scale is None else y.mul_(row_scale.reshape(-1, 1)).to(out_dtype)
        from .linear import int_mm

        y = int_mm(q, self.qweight.t()).float().mul_(self.col_scale)
        if row_scale is not None:
            y.mul_(row_scale.reshape(-1, 1))
        if self.bias is not None:
            y += self.bias.float()
        return y.to(out_dtype)

    def write_sinks(self, y: torch.Tensor, index: Optional[torch.Tensor], state: Any,
                    rows_in: Optional[torch.Tensor] = None) -> None:
        """The sink rows' outputs, written by index (O(#sinks)): template outputs, or (policy ``rows``) each
        member's guard's own rule (templates and / or ``rows_in @ W^T + b`` in full precision)."""
        if self.policy == "rows" and index is not None:
            types = state.types.reshape(-1).index_select(0, index).clamp_min(0)
            start = 0
            for m, size in zip(self.members, self.sizes):
                bias = None if m.bias is None else m.bias.float()
                out = m.guard.sink_outputs(types, rows_in,
                                           lambda r, m=m, bias=bias: F.linear(r.float(), m.w_fp, bias), y.dtype)
                y[:, start:start + size].index_copy_(0, index, out)
                start += size
            return
        if self.policy != "template" or index is None:
            return
        key = (state.generation, y.dtype, index.data_ptr(), index.numel())
        if self._tmpl_key != key:
            types = state.types.reshape(-1).index_select(0, index).clamp_min(0)
            self._tmpl_rows = self.templates.to(y.dtype).index_select(0, types)
            self._tmpl_key = key
        y.index_copy_(0, index, self._tmpl_rows)


def _policy(members: list) -> Optional[tuple[str, Optional[torch.Tensor]]]:
    """The members' common sink policy (``none`` / ``zero`` / ``template`` + concatenated templates), or
    ``None`` where the fused path cannot follow it (full-precision sink rows, mixed policies)."""
    guards = [m.guard for m in members]
    if all(g is None or g.mode == "off" for g in guards):
        return "none", None
    if any(g is None for g in guards) or len({g.mode for g in guards}) != 1:
        return None
    mode = guards[0].mode
    if mode == "clamp":
        return "zero", None
    if mode == "template" and all(bool(g.template_ok.all()) for g in guards):
        return "template", torch.cat([g.template_out for g in guards], dim=1)
    if mode in ("template", "fp-row") and all(getattr(m, "w_fp", None) is not None for m in members):
        return "rows", None  # full-precision sink rows (some or all types): each member's guard writes them
    return None


def _static_sites(block: nn.Module, layout: Any) -> tuple[Optional[dict], str]:
    """The four GEMM sites of a converted block (static RealQuantLinear members), or why not."""
    from .linear import RealQuantLinear

    sites: dict = {}
    groups = {"qkv": list(layout.attn_readers), "o": [layout.attn_writer], "gu": list(layout.mlp_readers),
              "down": [layout.mlp_writer]}
    for key, names in groups.items():
        members = [block.get_submodule(n) for n in names]
        if not all(isinstance(m, RealQuantLinear) for m in members):
            return None, f"{key}: not every Linear is a converted RealQuantLinear"
        if any(m.detector is not None for m in members) and (key != "down" or len(members) > 1):
            return None, f"{key}: a sink detector reads this input (a stage layer)"
        if len({m._a_scale_value for m in members}) != 1:
            return None, f"{key}: the fused Linears have different activation scales"
        if key != "down" and any(m.rot_signs is not None for m in members):
            return None, f"{key}: online rotation of this input is not covered"
        policy = _policy(members)
        if policy is None:
            return None, f"{key}: sink rows computed in full precision (fp-row guard) are not covered"
        m0 = members[0]
        qweight, col, bias = stacked_weights(members, [m.out_scale for m in members])
        site = _Site(qweight, col, bias, [m.out_features for m in members], m0._a_scale_value, *policy)
        site.codes_dtype = m0.qweight.dtype
        site.cpu_kernel = getattr(m0, "cpu_kernel", "int_mm") if m0.backend == "cpu-int8" else "int_mm"
        site.rot = (m0.rot_signs, m0.rot_factors) if m0.rot_signs is not None else None
        site.detector = m0.detector
        site.members = members
        sites[key] = site
    return sites, ""


def stacked_weights(members: list, scales: list) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``(codes, column scales, bias)`` of 8-bit Linears run as one GEMM (their rows concatenated); ``scales``:
    each member's per-output-row scale (a static Linear's ``out_scale``, a dynamic one's ``w_scale``)."""
    biases = [getattr(m, "bias", None) for m in members]
    if len(members) == 1:
        return members[0].qweight, scales[0].reshape(-1), biases[0]
    qweight = torch.cat([m.qweight for m in members], 0).contiguous()
    col = torch.cat([c.reshape(-1) for c in scales], 0)
    bias = None if all(b is None for b in biases) else torch.cat(
        [b.detach() if b is not None else torch.zeros(m.out_features, device=m.qweight.device)
         for b, m in zip(biases, members)])
    return qweight, col, bias


def dynamic_weights(members: list) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """:func:`stacked_weights` of per-token dynamic Linears."""
    return stacked_weights(members, [m.w_scale for m in members])


def _dynamic_sites(block: nn.Module, layout: Any, cpu_kernel: Optional[str] = None) -> tuple[Optional[dict], str]:
    from ..bench.gpu import DynamicRowLinear

    sites: dict = {}
    groups = {"qkv": list(layout.attn_readers), "o": [layout.attn_writer], "gu": list(layout.mlp_readers),
              "down": [layout.mlp_writer]}
    for key, names in groups.items():
        members = [block.get_submodule(n) for n in names]
        if not all(isinstance(m, DynamicRowLinear) for m in members):
            return None, f"{key}: not every Linear is a per-token dynamic Linear"
        site = _Site(*dynamic_weights(members), [m.out_features for m in members], None)
        site.codes_dtype = members[0].qweight.dtype
        if members[0].backend == "cpu-int8":
            from .linear import resolve_cpu_kernel

            site.cpu_kernel = resolve_cpu_kernel(cpu_kernel)
        site.rot = None
        site.detector = None
        site.members = members
        sites[key] = site
    return sites, ""


class FusedBlockForward:
    """The fused forward of one decoder block (installed as the block's ``forward``)."""

    def __init__(self, block: nn.Module, layout: Any, sites: dict, static: bool, state: Any = None) -> None:
        self.block_ref = [block]  # a list: not registered as a submodule
        self.original = block.forward
        self.layout = layout
        self.sites = sites
        self.static = static
        self.state = state
        self.norm1 = block.get_submodule(layout.pre_attn_norm)
        self.norm2 = block.get_submodule(layout.pre_mlp_norm)
        self.eps1, self.eps2 = _norm_eps(self.norm1), _norm_eps(self.norm2)
        self.attn = block.get_submodule(layout.attn_readers[0].rsplit(".", 1)[0])
        self.rotary = sys.modules[type(self.attn).__module__].apply_rotary_pos_emb
        self.head_dim = int(getattr(self.attn, "head_dim", 0) or layout.head_dim)
        self.scaling = float(getattr(self.attn, "scaling", self.head_dim ** -0.5))
        self.calls = 0  # fused calls (tests and the bench read it)
        # the one-kernel in-place rotary embedding: only for the standard rotate_half rotary (checked once
        # against the model's own function in _check_rotary) on CUDA
        self.fused_rotary = _rotary_is_standard(self.rotary)

    # -- producers -> codes ---------------------------------------------------------------
    def _norm_codes(self, x2: torch.Tensor, norm: nn.Module, eps: float, site: _Site,
                    zero: Optional[torch.Tensor], index: Optional[torch.Tensor] = None
                    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if _on_cpu(x2):  # the fake-quant model's op sequence, in place (vtquant.kernels.cpu_quant)
            if self.static:
                return cq.rmsnorm_codes(x2, norm.weight, eps, site.a_scale,
                                        index if site.policy != "none" else None, site.u8(x2)), None
            return cq.rmsnorm_codes_dynamic(x2, norm.weight, eps, site.u8(x2))
        if self.static:
            return tq.rmsnorm_quant_static(x2, norm.weight, eps, site.a_scale, site.codes_dtype,
                                           zero if site.policy != "none" else None), None
        return tq.rmsnorm_quant_dynamic(x2, norm.weight, eps, site.codes_dtype)

    def _detect_and_codes(self, gu: torch.Tensor, site: _Site, b: int, t: int) -> tuple:
        """A stage layer: the probe (sink detector) reads ``silu(g) * u`` as the unfused model materialises
        it; the sink set may grow here, so the zero rows and index are read again afterwards."""
        from ..core.rotation import hadamard_apply

        g, u = gu.chunk(2, dim=-1)
        h = (F.silu(g) * u).view(b, t, -1)
        site.detector(h)
        state = self.state
        mask = state.mask_for(h) if state is not None else None
        index = state.flat_index() if mask is not None else None
        h2 = h.view(b * t, -1)
        if site.rot is not None:
            h2 = hadamard_apply(h2, *site.rot)
        if _on_cpu(h2):
            return cq.static_codes_(h2, site.a_scale, index if site.policy != "none" else None,
                                    u8=site.u8(h2)), index
        q = tq.quant_static(h2, site.a_scale, site.codes_dtype)
        if index is not None and site.policy != "none":
            (q.view(torch.uint8) if q.dtype == torch.float8_e4m3fn else q).index_fill_(0, index, 0)
        return q, index

    def _act_codes(self, gu: torch.Tensor, site: _Site, zero: Optional[torch.Tensor],
                   index: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if _on_cpu(gu):
            if not self.static:
                return cq.silu_mul_codes_dynamic(gu, site.u8(gu))
            return cq.silu_mul_codes(gu, site.a_scale, index if site.policy != "none" else None, site.rot,
                                     site.u8(gu)), None
        if not self.static:
            return tq.silu_mul_quant_dynamic(gu, site.codes_dtype)
        zero = zero if site.policy != "none" else None
        if site.rot is not None:
            from .triton_hadamard import ref_silu_mul_hadamard_quant, silu_mul_hadamard_quant

            signs, factors = site.rot
            q = silu_mul_hadamard_quant(gu, signs, factors, site.a_scale, site.codes_dtype, zero)
            if q is None:
                q = ref_silu_mul_hadamard_quant(gu, signs, factors, site.a_scale, site.codes_dtype, zero)
            return q, None
        return tq.silu_mul_quant_static(gu, site.a_scale, site.codes_dtype, zero), None

    def _plain_codes(self, x2: torch.Tensor, site: _Site, index: Optional[torch.Tensor]
                     ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if _on_cpu(x2):
            if not self.static:
                return cq.dynamic_codes_(x2, owned=True, u8=site.u8(x2))  # x2: the attention output's own copy
            return cq.static_codes_(x2, site.a_scale, index if site.policy != "none" else None, owned=True,
                                    u8=site.u8(x2)), None
        if not self.static:
            return tq.quant_dynamic_rows(x2, site.codes_dtype)
        q = tq.quant_static(x2, site.a_scale, site.codes_dtype)
        if index is not None and site.policy != "none":
            (q.view(torch.uint8) if q.dtype == torch.float8_e4m3fn else q).index_fill_(0, index, 0)
        return q, None

    # -- the block ----------------------------------------------------------------------------
    def __call__(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        position_embeddings = kwargs.get("position_embeddings")
        if args or (cache is not None and type(cache).__name__ != "DynamicCache") or position_embeddings is None \
                or hidden_states.dim() != 3 or kwargs.get("output_attentions") \
                or (cache is not None and getattr(self.attn, "layer_idx", None) is None):
            return self.original(hidden_states, *args, **kwargs)
        self.calls += 1
        state = self.state
        h = hidden_states
        b, t, d = h.shape
        dtype = h.dtype
        mask = state.mask_for(h) if state is not None else None
        index = state.flat_index() if mask is not None else None
        zero = mask.reshape(-1) if index is not None else None
        s = self.sites

        # attention
        x2 = h.reshape(-1, d)
        rows_in = self._norm_rows(s["qkv"], x2, index, self.norm1, self.eps1)
        q, rs = self._norm_codes(x2, self.norm1, self.eps1, s["qkv"], zero, index)
        qkv = s["qkv"].gemm(q, rs, dtype)
        s["qkv"].write_sinks(qkv, index, state, rows_in)
        nq, nk, nv = s["qkv"].sizes
        hd = self.head_dim
        cos, sin = position_embeddings
        fused_rope = self.fused_rotary and rotary_inplace_(qkv, cos, sin, (nq + nk) // hd, hd)
        qs = qkv[:, :nq].view(b, t, -1, hd).transpose(1, 2)
        ks = qkv[:, nq:nq + nk].view(b, t, -1, hd).transpose(1, 2)
        vs = qkv[:, nq + nk:].view(b, t, -1, hd).transpose(1, 2)
        if not fused_rope:
            qs, ks = self.rotary(qs, ks, cos, sin)
        if cache is not None:  # a DynamicCache (generation): keys / values as their own tensors, not views
            ks, vs = cache.update(ks.contiguous(), vs.contiguous(), self.attn.layer_idx)
        attn_mask = kwargs.get("attention_mask")
        if attn_mask is not None and attn_mask.dtype != torch.bool and attn_mask.dtype != qs.dtype:
            attn_mask = attn_mask.to(qs.dtype)
        gqa = qs.shape[1] != ks.shape[1]
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=attn_mask,
                                           is_causal=attn_mask is None and t > 1, scale=self.scaling,
                                           enable_gqa=gqa)
        o2 = o.transpose(1, 2).reshape(b * t, -1)
        rows_in = o2.index_select(0, index) if (index is not None and s["o"].policy == "rows") else None
        q, rs = self._plain_codes(o2, s["o"], index)
        y = s["o"].gemm(q, rs, dtype)
        s["o"].write_sinks(y, index, state, rows_in)
        h = h + y.view(b, t, d)

        # MLP
        x2 = h.reshape(-1, d)
        rows_in = self._norm_rows(s["gu"], x2, index, self.norm2, self.eps2)
        q, rs = self._norm_codes(x2, self.norm2, self.eps2, s["gu"], zero, index)
        gu = s["gu"].gemm(q, rs, dtype)
        s["gu"].write_sinks(gu, index, state, rows_in)
        if s["down"].detector is not None:
            q, index = self._detect_and_codes(gu, s["down"], b, t)
            rs = None
        else:
            q, rs = self._act_codes(gu, s["down"], zero, index)
        rows_in = None
        if index is not None and s["down"].policy == "rows":  # the sink rows' SiLU * up (rotated), O(#sinks)
            rows_in = cq.silu_mul(gu.index_select(0, index))
            if s["down"].rot is not None:
                from ..core.rotation import hadamard_apply

                rows_in = hadamard_apply(rows_in, *s["down"].rot)
        y = s["down"].gemm(q, rs, dtype)
        s["down"].write_sinks(y, index, state, rows_in)
        return h + y.view(b, t, d)

    @staticmethod
    def _norm_rows(site: _Site, x2: torch.Tensor, index: Optional[torch.Tensor], norm: nn.Module, eps: float
                   ) -> Optional[torch.Tensor]:
        """The sink rows' normalised inputs where the site computes them in full precision (O(#sinks))."""
        if index is None or site.policy != "rows":
            return None
        return cq.rmsnorm(x2.index_select(0, index), norm.weight, eps)


def _rotary_is_standard(fn: Any) -> bool:
    """Whether the model's ``apply_rotary_pos_emb`` is ``x cos + rotate_half(x) sin`` (checked on numbers)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 3, 8, generator=g)
    k = torch.randn(1, 1, 3, 8, generator=g)
    cos = torch.randn(1, 3, 8, generator=g)
    sin = torch.randn(1, 3, 8, generator=g)
    try:
        qr, kr = fn(q, k, cos, sin)
    except Exception:  # noqa: BLE001 - another signature: keep the model's function
        return False

    def ref(x):
        x1, x2 = x[..., :4], x[..., 4:]
        return x * cos.unsqueeze(1) + torch.cat((-x2, x1), dim=-1) * sin.unsqueeze(1)

    return torch.allclose(qr, ref(q), atol=1e-5) and torch.allclose(kr, ref(k), atol=1e-5)


def _install(block: nn.Module, fused: FusedBlockForward) -> None:
    block.forward = fused
    setattr(block, FUSED_ATTR, fused)


def unfuse_(model: nn.Module) -> nn.Module:
    """Restore every fused block's original forward (in place)."""
    for m in model.modules():
        fused = m.__dict__.pop(FUSED_ATTR, None)
        if fused is not None:
            m.__dict__.pop("forward", None)
    return model


def fused_blocks(model: nn.Module) -> dict[int, str]:
    """``{block index: "fused" or the reason it is not}`` of a model passed to a fusing function."""
    return dict(getattr(model, "_vtquant_fusion_report", {}))


def _decoder_layout(model: nn.Module) -> tuple[Any, list[nn.Module]]:
    handle = getattr(model, "vtquant", None)
    adapter = handle.adapter if handle is not None else None
    if adapter is None:
        from ..adapters.hf_decoder import HFDecoderAdapter, looks_like_decoder

        if not looks_like_decoder(model):
            raise FusionError(f"{type(model).__name__}: the fused forward covers transformers decoders only")
        adapter = HFDecoderAdapter(model)
    layout = getattr(adapter, "layout", None)
    if layout is None:
        raise FusionError(f"{type(model).__name__}: the fused forward covers transformers decoders only "
                          "(convert without fused=True)")
    return layout, adapter.blocks()


def sites_state(sites: dict, state: Any) -> Any:
    """The model's sink state, or (a block converted on its own) the state its guards share."""
    if state is not None:
        return state
    for site in sites.values():
        for m in site.members:
            if m.guard is not None:
                state = m.guard.state
    return state


def fuse_static_(model: nn.Module) -> dict[int, str]:
    """Install the fused forward on every block of a converted static model that it covers."""
    layout, blocks = _decoder_layout(model)
    state = getattr(model.vtquant, "state", None) if getattr(model, "vtquant", None) is not None else None
    report: dict[int, str] = {}
    for i, block in enumerate(blocks):
        why = _layout_ok(layout, block)
        sites = None
        if why is None:
            sites, why = _static_sites(block, layout)
        if sites is None:
            report[i] = why
            continue
        _install(block, FusedBlockForward(block, layout, sites, True, sites_state(sites, state)))
        report[i] = "fused"
    model._vtquant_fusion_report = report
    return report


def decoder_layout(model: nn.Module) -> tuple[Any, list[nn.Module]]:
    """``(layout, blocks)`` of a transformers decoder as its adapter reads them (before Linears are replaced)."""
    return _decoder_layout(model)


def fuse_dynamic_(model: nn.Module, layout: Optional[tuple] = None, cpu_kernel: Optional[str] = None) -> dict[int, str]:
    """Install the fused per-token dynamic forward on every block whose Linears are
    :class:`vtquant.bench.gpu.DynamicRowLinear` (the bench's per-token dynamic peer).  ``layout``: the
    ``(layout, blocks)`` of :func:`decoder_layout`, read before the Linears were replaced.  ``cpu_kernel``:
    the int8 GEMM of the ``cpu-int8`` peer, as :func:`vtquant.kernels.linear.resolve_cpu_kernel`."""
    layout, blocks = layout if layout is not None else _decoder_layout(model)
    report: dict[int, str] = {}
    for i, block in enumerate(blocks):
        why = _layout_ok(layout, block)
        sites = None
        if why is None:
            sites, why = _dynamic_sites(block, layout, cpu_kernel)
        if sites is None:
            report[i] = why
            continue
        _install(block, FusedBlockForward(block, layout, sites, False, None))
        report[i] = "fused"
    model._vtquant_fusion_report = report
    return report
