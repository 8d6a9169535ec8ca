"""What applications read from an adapter (``vtquant.analyze``, ``vtquant.vision``): plain data.

The core asks an adapter for blocks, Linears and known sinks; the applications on top of it
also need to know *how the model is used*, and must not branch on its family to find out
(open_clip's ``encode_image`` / ``encode_text`` on every model class is the example):

* :class:`Tower`: a two-tower model (CLIP) is quantized one tower at a time; each tower is a
  module that carries the ``.vtquant`` handle, its adapter and what its batches hold;
* :class:`AttentionSpec`: which modules compute a block's queries, keys and values and how
  its attention is shaped (heads, RoPE, causal), for the attention geometry of ``vtquant
  analyze``;
* :func:`attention_spec_from_modules`: that spec read from the module tree of a
  pre-norm transformer tower (timm ViT / EVA, open_clip, transformers vision and text towers).

The adapter methods that hand these out (``towers``, ``attention_spec``, ``input_kind``,
``output_kind``, ``analysis_forward``, ``encoders``) have defaults on
:class:`~vtquant.adapters.base.ModelAdapter`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Tower:
    """One tower of a model, as the core quantizes it.

    Attributes:
        name: ``visual`` or ``text`` (a VLM's parts: ``vision``, ``language``, ``projector``).
        module: the module that carries ``.vtquant`` after quantization.
        adapter: its adapter.
        inputs: what its batches hold: ``images`` (``[B, 3, H, W]``), ``tokens`` (ids ``[B, T]``) or
            ``image-text`` (a part of a vision-language model: the processor's mappings, read by the whole VLM).
    """

    name: str
    module: nn.Module
    adapter: Any
    inputs: str


@dataclass
class AttentionSpec:
    """Where a model's attention projections are and how its attention is shaped.

    Attributes:
        q, k, v: per block, the query / key / value Linear (``[T, C] -> [T, heads * head_dim]``); their
            input is the block's normalized attention input.
        mlp_in: per block, a Linear reading the normalized MLP input (or ``None``).
        num_heads, num_kv_heads, head_dim: attention shape (grouped-query: ``num_heads`` multiple of kv).
        inv_freq: RoPE inverse frequencies ``[head_dim / 2]`` (``None``: no rotary embedding).
        rope_scaling: the factor the rotary embedding applies to cos / sin.
        causal: causal self-attention.
        inputs: per block, a module whose input is the attention input (default: ``q``).
        rope_note: why there is no RoPE section (non-rotary / unsupported rotary).
        q_norm, k_norm: per block, the norm applied to the projected queries / keys before RoPE (Qwen3,
            Gemma-3: over each head's ``head_dim``; OLMo-2: over the whole projection), or ``None``.
        scaling: the attention logit scale (``None``: ``head_dim ** -0.5``; Gemma: ``query_pre_attn_scalar ** -0.5``).
        softcap: attention logit soft-capping ``cap * tanh(logit / cap)`` (Gemma-2), or ``None``.
        windows: per block, the sliding-window length (a key is seen when ``query - key < window``), or ``None``.
        layer_inv_freq: per block, the RoPE inverse frequencies when they differ between layers (Gemma-3's
            sliding / full layers); ``inv_freq`` is then ``None`` and the RoPE section is skipped.
        input_label: what the projections read (``normalized`` after a norm, or the raw residual stream).
    """

    q: list
    k: list
    v: list
    mlp_in: Optional[list]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    inv_freq: Optional[torch.Tensor] = None
    rope_scaling: float = 1.0
    causal: bool = True
    inputs: Optional[list] = None
    rope_note: Optional[str] = None
    q_norm: Optional[list] = None
    k_norm: Optional[list] = None
    scaling: Optional[float] = None
    softcap: Optional[float] = None
    windows: Optional[list] = None
    layer_inv_freq: Optional[list] = None
    input_label: str = "normalized attention input"

    def input_module(self, i: int) -> Any:
        return self.inputs[i] if self.inputs is not None else self.q[i]

    def inv_freq_of(self, i: Optional[int]) -> Optional[torch.Tensor]:
        """The RoPE inverse frequencies block ``i`` uses (``None``: no rotary embedding)."""
        if self.layer_inv_freq is not None and i is not None:
            return self.layer_inv_freq[i]
        return self.inv_freq

    def project(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries ``[T, H, d]``, keys and values ``[T, KV, d]`` of block ``i`` from its attention input ``x``
        ``[T, C]``, the queries and keys after the block's q / k norms (the ones the attention uses)."""
        t, d = x.shape[0], self.head_dim
        q, k, v = self.q[i](x).float(), self.k[i](x).float(), self.v[i](x).float()
        q, k = (_norm_heads(norms[i] if norms is not None else None, y, d)
                for norms, y in ((self.q_norm, q), (self.k_norm, k)))
        return q.reshape(t, -1, d), k.reshape(t, -1, d), v.reshape(t, -1, d)


def _norm_heads(norm: Any, y: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``norm`` over each head (weight of ``head_dim``) or over the whole projection (OLMo-2)."""
    if norm is None:
        return y
    width = getattr(norm, "weight", None)
    if width is not None and width.shape[-1] == head_dim and y.shape[-1] != head_dim:
        return norm(y.reshape(*y.shape[:-1], -1, head_dim).to(width.dtype)).float().reshape(y.shape)
    return norm(y.to(width.dtype) if width is not None else y).float()


class RowSlice(nn.Module):
    """Rows ``[start, stop)`` of a fused Linear (timm's ``qkv``) as a Linear of its own (read-only view)."""

    def __init__(self, linear: nn.Module, start: int, stop: int) -> None:
        super().__init__()
        self.linear, self.start, self.stop = linear, start, stop

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight[self.start:self.stop]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.linear.bias
        return F.linear(x, self.weight.to(x.dtype), None if b is None else b[self.start:self.stop].to(x.dtype))


_SEPARATE_QKV = (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value"))
_MLP_IN = ("fc1", "c_fc", "fc1_g", "weights_in")


def attention_spec_from_modules(adapter: Any, causal: bool = False) -> Optional[AttentionSpec]:
    """The :class:`AttentionSpec` of a transformer tower read from its blocks' module names.

    A fused ``qkv`` Linear (timm) is split into row slices; separate ``q_proj`` / ``k_proj`` /
    ``v_proj`` (open_clip after :class:`~vtquant.adapters.vision_common.ExplicitMultiheadAttention`,
    EVA) or ``query`` / ``key`` / ``value`` (transformers) are used as they are.  No RoPE is modelled
    (EVA's 2-D rotary embedding is noted as skipped).  ``None`` when a block has neither layout.
    """
    q, k, v, ins, mlp = [], [], [], [], []
    heads = head_dim = None
    notes = []
    for block in adapter.blocks():
        mods = dict(block.named_modules())
        leaf = {name.rpartition(".")[2]: (name, mod) for name, mod in mods.items()}
        if "qkv" in leaf and isinstance(leaf["qkv"][1], nn.Linear):
            name, lin = leaf["qkv"]
            width = lin.out_features // 3
            q.append(RowSlice(lin, 0, width)), k.append(RowSlice(lin, width, 2 * width))
            v.append(RowSlice(lin, 2 * width, 3 * width)), ins.append(lin)
        else:
            picked = [leaf.get(a, leaf.get(b)) for a, b in _SEPARATE_QKV]
            if any(x is None for x in picked):
                return None
            name = picked[0][0]
            q.append(picked[0][1]), k.append(picked[1][1]), v.append(picked[2][1]), ins.append(picked[0][1])
        attn = mods[name.rpartition(".")[0]] if "." in name else block
        heads = int(getattr(attn, "num_heads", None) or getattr(attn, "num_attention_heads", None)
                    or getattr(getattr(adapter, "config", None), "num_attention_heads", 0))
        if not heads:
            return None
        head_dim = q[-1].weight.shape[0] // heads
        for norm in ("q_norm", "k_norm"):
            if norm in leaf and not isinstance(leaf[norm][1], nn.Identity):
                notes.append("q/k normalization (qk_norm) is not applied in the geometry section")
        mlp.append(next((leaf[n][1] for n in _MLP_IN if n in leaf), None))
    rotary = any(hasattr(b, "rope") or hasattr(getattr(b, "attn", None), "rope") for b in adapter.blocks()) or \
        getattr(adapter.model, "rope", None) is not None
    reason = ("the model uses a 2-D rotary embedding (EVA) that this analysis does not model: RoPE section skipped"
              if rotary else "no rotary position embedding (a ViT with learned absolute position embeddings added "
              "once to the patch tokens): the RoPE section does not apply")
    return AttentionSpec(q=q, k=k, v=v, mlp_in=None if any(m is None for m in mlp) else mlp, num_heads=heads,
                         num_kv_heads=heads, head_dim=head_dim, causal=causal, inputs=ins,
                         rope_note=reason + ("; " + notes[0] if notes else ""))
