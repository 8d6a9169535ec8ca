"""The layout of a transformers decoder block, read from the modules it has (issue 11 item 2).

The class name says little about what matters for quantization transforms; the modules do.
Three norm layouts occur among the usual ``*ForCausalLM`` decoders, and one name means two
different things in them (``post_attention_layernorm`` is LLaMA's *pre*-MLP norm but Gemma-2's
and OLMo-2's norm on the attention *output*):

=============  ===================================================================  ==========================
layout         block (``x`` the residual stream)                                     families
=============  ===================================================================  ==========================
``pre-norm``   x += attn(input_layernorm(x)); x += mlp(post_attention_layernorm(x))   Llama, Mistral, Qwen2/3,
                                                                                    Gemma, Phi-3
``sandwich``   x += post_attention_layernorm(attn(input_layernorm(x)));             Gemma-2, Gemma-3 text
               x += post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))
``post-norm``  x += post_attention_layernorm(attn(x));                              OLMo-2
               x += post_feedforward_layernorm(mlp(x))
=============  ===================================================================  ==========================

Projections are separate (``q/k/v_proj``, ``gate/up_proj``) or fused (Phi-3's ``qkv_proj`` and
``gate_up_proj``); q/k norms (Qwen3, Gemma-3, OLMo-2) act on projection outputs and touch no
residual-stream transform.  The norm's scale convention (``w`` or Gemma's ``1 + w``) is measured
by running the norm once on a fixed input (:func:`norm_kind`).  Anything else - an unknown norm
name, blocks that differ - is the ``unknown`` layout: quantization works, rotation and smoothing
are refused (they would need to know where the norms sit).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

BLOCK_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
               "post_feedforward_layernorm")
ATTN_NORMS = ("q_norm", "k_norm")


class LayoutError(TypeError):
    """The model does not have the modules of a transformers decoder (``model.model.layers[i]...``)."""


@dataclass(frozen=True)
class DecoderLayout:
    """Where things are in every block of a decoder (relative module names).

    Attributes:
        kind: ``pre-norm``, ``sandwich``, ``post-norm`` or ``unknown``.
        attn_readers: ``(q, k, v)`` projections, or ``(qkv,)`` when fused.
        mlp_readers: ``(gate, up)``, or ``(gate_up,)`` when fused.
        attn_writer, mlp_writer: ``self_attn.o_proj``, ``mlp.down_proj``.
        pre_attn_norm, pre_mlp_norm: norms whose output the readers read (``None``: raw residual).
        post_attn_norm, post_mlp_norm: norms on the sublayer output before the residual add.
        qk_norm: q/k norms inside attention.
        other_norms: norm-like children nobody here understands (they make the layout ``unknown``).
        value_rows: rows ``(start, stop)`` of the values in a fused ``qkv`` projection.
        head_dim: attention head width.
    """

    kind: str
    attn_readers: tuple
    mlp_readers: tuple
    attn_writer: str = "self_attn.o_proj"
    mlp_writer: str = "mlp.down_proj"
    pre_attn_norm: Optional[str] = None
    post_attn_norm: Optional[str] = None
    pre_mlp_norm: Optional[str] = None
    post_mlp_norm: Optional[str] = None
    qk_norm: bool = False
    other_norms: tuple = ()
    value_rows: Optional[tuple] = None
    head_dim: int = 0

    @property
    def fused_qkv(self) -> bool:
        return len(self.attn_readers) == 1

    @property
    def fused_mlp(self) -> bool:
        return len(self.mlp_readers) == 1

    @property
    def linears(self) -> tuple:
        """Quantizable Linears of a block in forward order."""
        return (*self.attn_readers, self.attn_writer, *self.mlp_readers, self.mlp_writer)

    @property
    def key_value(self) -> Optional[tuple]:
        """``(k_proj, v_proj)``, or ``None`` when keys and values share a fused projection with queries."""
        return None if self.fused_qkv else (self.attn_readers[1], self.attn_readers[2])

    def describe(self) -> str:
        parts = [f"{self.kind} layout"]
        norms = [n for n in (self.pre_attn_norm, self.post_attn_norm, self.pre_mlp_norm, self.post_mlp_norm) if n]
        parts.append("norms " + "/".join(norms) if norms else "no block norms")
        if self.post_attn_norm or self.post_mlp_norm:
            parts.append("post-norms on the sublayer outputs")
        if self.pre_attn_norm is None and self.kind != "unknown":
            parts.append("attention and MLP read the raw residual")
        parts.append("fused qkv_proj" if self.fused_qkv else "separate q/k/v")
        parts.append("fused gate_up_proj" if self.fused_mlp else "separate gate/up")
        if self.qk_norm:
            parts.append("q/k norms")
        if self.other_norms:
            parts.append(f"unrecognized norms {list(self.other_norms)}")
        return ", ".join(parts)


def _is_norm(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return "norm" in name and not isinstance(module, nn.Linear)


def _has(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
        return True
    except AttributeError:
        return False


def decoder_blocks(model: nn.Module) -> list:
    """``model.model.layers`` as a list, or raise :class:`LayoutError`."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise LayoutError(f"{type(model).__name__} has no decoder blocks at model.model.layers")
    for part in ("embed_tokens", "norm"):
        if not isinstance(getattr(inner, part, None), nn.Module):
            raise LayoutError(f"{type(model).__name__} has no model.model.{part}")
    if not hasattr(getattr(model, "lm_head", None), "in_features"):
        raise LayoutError(f"{type(model).__name__} has no lm_head Linear")
    return list(layers)


def _block_layout(block: nn.Module) -> tuple:
    if _has(block, "self_attn.qkv_proj"):
        attn = ("self_attn.qkv_proj",)
    elif all(_has(block, f"self_attn.{p}_proj") for p in "qkv"):
        attn = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    else:
        raise LayoutError(f"{type(block).__name__}: no self_attn.q_proj/k_proj/v_proj nor self_attn.qkv_proj")
    if _has(block, "mlp.gate_up_proj"):
        mlp = ("mlp.gate_up_proj",)
    elif _has(block, "mlp.gate_proj") and _has(block, "mlp.up_proj"):
        mlp = ("mlp.gate_proj", "mlp.up_proj")
    else:
        raise LayoutError(f"{type(block).__name__}: no mlp.gate_proj/up_proj nor mlp.gate_up_proj")
    for name in ("self_attn.o_proj", "mlp.down_proj", *attn, *mlp):  # nn.Linear, or already wrapped by vtquant
        if not hasattr(block.get_submodule(name), "in_features"):
            raise LayoutError(f"{type(block).__name__}.{name} is not a Linear")
    norms = tuple(n for n, m in block.named_children() if _is_norm(m))
    attn_norms = tuple(n for n, m in block.self_attn.named_children() if _is_norm(m))
    other = tuple(n for n in norms if n not in BLOCK_NORMS) + tuple(
        f"self_attn.{n}" for n in attn_norms if n not in ATTN_NORMS)
    return attn, mlp, tuple(n for n in norms if n in BLOCK_NORMS), other, bool(attn_norms)


def detect_layout(model: nn.Module) -> DecoderLayout:
    """The :class:`DecoderLayout` of a transformers decoder, from the modules of its blocks.

    Raises:
        LayoutError: no ``model.model.layers`` with the usual projection names.
    """
    blocks = decoder_blocks(model)
    seen = {_block_layout(b) for b in blocks}
    first = _block_layout(blocks[0])
    attn, mlp, norms, other, qk = first
    cfg = getattr(model, "config", None)
    heads = int(getattr(cfg, "num_attention_heads", 0) or 0)
    kv_heads = int(getattr(cfg, "num_key_value_heads", 0) or heads)
    hidden = int(getattr(cfg, "hidden_size", 0) or 0)
    head_dim = int(getattr(cfg, "head_dim", 0) or (hidden // heads if heads else 0))
    value_rows = None
    if len(attn) == 1 and heads:
        start = (heads + kv_heads) * head_dim
        value_rows = (start, start + kv_heads * head_dim)
    base = dict(attn_readers=attn, mlp_readers=mlp, qk_norm=qk, other_norms=other, value_rows=value_rows,
                head_dim=head_dim)
    present = set(norms)
    if len(seen) > 1:
        return DecoderLayout(kind="unknown", other_norms=other + ("(blocks differ)",),
                             **{k: v for k, v in base.items() if k != "other_norms"})
    if other:
        return DecoderLayout(kind="unknown", **base)
    if present == {"input_layernorm", "post_attention_layernorm"}:
        return DecoderLayout(kind="pre-norm", pre_attn_norm="input_layernorm", pre_mlp_norm="post_attention_layernorm",
                             **base)
    if present == set(BLOCK_NORMS):
        return DecoderLayout(kind="sandwich", pre_attn_norm="input_layernorm", post_attn_norm="post_attention_layernorm",
                             pre_mlp_norm="pre_feedforward_layernorm", post_mlp_norm="post_feedforward_layernorm",
                             **base)
    if present == {"post_attention_layernorm", "post_feedforward_layernorm"}:
        return DecoderLayout(kind="post-norm", post_attn_norm="post_attention_layernorm",
                             post_mlp_norm="post_feedforward_layernorm", **base)
    return DecoderLayout(kind="unknown", other_norms=tuple(sorted(present)) or ("(no block norms)",),
                         **{k: v for k, v in base.items() if k != "other_norms"})


@torch.no_grad()
def norm_kind(norm: nn.Module) -> Optional[str]:
    """``rms`` (``x / rms(x) * w``), ``rms-plus-one`` (Gemma: ``* (1 + w)``) or ``None`` (neither / unknown).

    Measured by running ``norm.forward`` (no hooks) on a fixed input and comparing with both formulas.
    """
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or weight.device.type == "meta":
        return None
    gen = torch.Generator().manual_seed(0)
    x = (3.0 * torch.randn(3, weight.shape[0], generator=gen) + 0.5).to(weight.device, weight.dtype)
    try:
        y = norm.forward(x).double()
    except Exception:  # noqa: BLE001 - a norm we cannot run is a norm we do not understand
        return None
    xd = x.double()
    base = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6)
    tol = 1e-3 if weight.dtype in (torch.float32, torch.float64) else 3e-2
    w = weight.double()
    for kind, scale in (("rms", w), ("rms-plus-one", 1.0 + w)):
        ref = base * scale
        if float((y - ref).norm() / ref.norm().clamp_min(1e-30)) < tol:
            return kind
    return None
