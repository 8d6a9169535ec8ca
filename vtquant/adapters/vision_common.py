"""Shared pieces of the vision / CLIP adapters (timm, open_clip, transformers towers).

Vision towers differ from LLM decoders in how their sinks are known (docs/method.md
"Vision"): prefix tokens (CLS, distillation, registers) sit at fixed positions
and each gets its *own* fixed template type, while content-detected sinks (the
high-norm background patches of ViTs trained without registers, whose
positions change per image) share one more type.  The token a head reads (CLS,
the end-of-text token of a text tower) is a *protected* type: it is kept out of
the quantized tensors like any sink, but its rows are always computed in full
precision from the real input, never replaced by a template or a residual
restore.

Also here: :class:`ExplicitMultiheadAttention`, an output-identical drop-in for
``nn.MultiheadAttention`` with explicit q / k / v / out Linears, so a
Linear-only quantizer covers all of attention (docs/design.md "Things that bite").
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.modules import replace_module
from ..core.quant import QuantLinear
from .base import KnownSinks, ModelAdapter

_QKV = ("q_proj", "k_proj", "v_proj", "query", "key", "value")
_GLU = ("fc1_g", "fc1_x", "weights_in")


def linears_in(block: nn.Module) -> dict[str, nn.Module]:
    """Every ``nn.Linear`` (or already wrapped :class:`QuantLinear`) of ``block``, in module order."""
    out = {}
    for name, mod in block.named_modules():
        if isinstance(mod, (nn.Linear, QuantLinear)) and not any(name.startswith(p + ".") for p in out):
            out[name] = mod
    return out


def unquantized_weights(module: nn.Module) -> list[str]:
    """Names of matrix weights (dim >= 2) of ``module`` that no :class:`QuantLinear` owns.

    After quantization this must be empty for every block: it catches a q/k/v kept in an
    ``in_proj_weight`` or any other Linear-like parameter a Linear-only filter would miss.
    """
    owned = set()
    for name, mod in module.named_modules():
        if isinstance(mod, QuantLinear):
            owned.add(name)
    left = []
    for pname, param in module.named_parameters():
        if param.dim() < 2:
            continue
        owner = pname.rpartition(".")[0]
        if not any(owner == o or owner.startswith(o + ".") for o in owned):
            left.append(pname)
    return left


def ln_layer_rotation(norm1: nn.Module, attn_readers: list, value: tuple, out: nn.Module, norm2: nn.Module,
                      mlp_readers: list, fc2: nn.Module, scales: tuple = (), heads: bool = True) -> Any:
    """One pre-LayerNorm block for :class:`~vtquant.core.rotation_ln.LNRotationSpec`.

    Args:
        norm1, norm2: the block's LayerNorms (attention, MLP).
        attn_readers: the q / k / v Linears (or one fused ``qkv``).
        value: ``(value Linear, first value row, head_dim)``.
        out: the attention output projection (a writer).
        mlp_readers: the MLP's first Linear(s).
        fc2: the MLP's second Linear (writer, rotated online).
        scales: ``((module, parameter name, writer), ...)`` layer scales on the writers' outputs.
        heads: the per-head value / output rotation is valid (no norm or gate between them).
    """
    from ..core.rotation_ln import LNLayerRotation, check_layer_norms

    check_layer_norms([norm1, norm2], type(norm1).__name__)
    v, offset, head_dim = value
    return LNLayerRotation(norm_readers=[(norm1, list(attn_readers)), (norm2, list(mlp_readers))],
                           writers=[out, fc2], online=[fc2],
                           value_output=(v, offset, out, head_dim) if heads else None,
                           layer_scales=[s for s in scales if s is not None])


def layer_scale(module: Any, writer: nn.Module, name: str = "gamma") -> Optional[tuple]:
    """``(module, name, writer)`` when ``module`` is a layer scale holding ``name``, else ``None``."""
    if module is None or isinstance(module, nn.Identity) or not isinstance(getattr(module, name, None), torch.Tensor):
        return None
    return (module, name, writer)


def text_known_sinks(ids: torch.Tensor, names: list[str], eot_positions) -> tuple[torch.Tensor, torch.Tensor]:
    """Known-sink mask and fixed template types of a text tower's tokens ``ids`` ``[B, T]``.

    ``names`` (in type order) may hold ``first_token`` and ``eot`` (the pooled end-of-text token);
    ``eot_positions(ids)`` gives the latter's position per row.
    """
    b, t = ids.shape
    known = torch.zeros(b, t, dtype=torch.bool, device=ids.device)
    types = torch.full((b, t), -1, dtype=torch.long, device=ids.device)
    if "first_token" in names:
        known[:, 0], types[:, 0] = True, names.index("first_token")
    if "eot" in names:
        rows, eot = torch.arange(b, device=ids.device), eot_positions(ids)
        known[rows, eot], types[rows, eot] = True, names.index("eot")
    return known, types


class VisionAdapter(ModelAdapter):
    """Common behaviour of vision towers: prefix-token known sinks with fixed types.

    Subclasses implement :meth:`blocks`, :meth:`probe_name`, :meth:`hidden_size`, :meth:`forward`
    and say which prefix tokens exist through :meth:`prefix_kinds`.
    """

    token_layout = "bsd"

    def block_linears(self, block: nn.Module) -> dict[str, nn.Module]:
        return linears_in(block)

    def input_groups(self, block: nn.Module) -> list[list[str]]:
        """q/k/v (and SwiGLU gate/up) Linears of one parent read the same input."""
        groups: dict[tuple, list[str]] = {}
        for name in self.block_linears(block):
            parent, _, leaf = name.rpartition(".")
            if leaf in _QKV:
                groups.setdefault((parent, "qkv"), []).append(name)
            elif leaf in _GLU:
                groups.setdefault((parent, "glu"), []).append(name)
        return [g for g in groups.values() if len(g) > 1]

    # --- known sinks ------------------------------------------------------------------
    def prefix_kinds(self) -> list[tuple[str, str, int]]:
        """``[(kind, type name, position), ...]`` of the tower's prefix tokens, in position order."""
        return []

    def protected_type_names(self) -> set[str]:
        """Type names whose token a head reads."""
        return {"cls", "dist"}

    offers_registers = False  # the family has register tokens (zero of them is fine)

    def known_sink_kinds(self) -> tuple[str, ...]:
        kinds = ["cls"] if any(k == "cls" for k, _, _ in self.prefix_kinds()) else []
        if self.offers_registers:
            kinds.append("registers")
        for kind, _, _ in self.prefix_kinds():
            if kind not in kinds:
                kinds.append(kind)
        return tuple(kinds)

    def _known(self, kinds: list[str]) -> list[tuple[str, int]]:
        return [(name, pos) for kind, name, pos in self.prefix_kinds() if kind in kinds]

    def known_sink_types(self, kinds: list[str]) -> Optional[list[str]]:
        return [name for name, _ in self._known(kinds)]

    def head_sink_types(self, kinds: list[str]) -> list[int]:
        protected = self.protected_type_names()
        return [i for i, (name, _) in enumerate(self._known(kinds)) if name in protected]

    def known_masks(self, batch: int, tokens: int, kinds: list[str], device: Any) -> tuple:
        """``(known bool [B, T], types long [B, T])`` or ``(None, None)`` when nothing is known."""
        known_list = self._known(kinds)
        if not known_list:
            return None, None
        known = torch.zeros(batch, tokens, dtype=torch.bool, device=device)
        types = torch.full((batch, tokens), -1, dtype=torch.long, device=device)
        for type_id, (_, pos) in enumerate(known_list):
            if pos < tokens:
                known[:, pos] = True
                types[:, pos] = type_id
        return known, types

    def known_sink_site(self) -> nn.Module:
        return self.blocks()[0]

    def known_sinks_of_call(self, kinds: list[str], args: tuple, kwargs: dict) -> KnownSinks:
        x = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values())))
        b, t = (x.shape[0], x.shape[1]) if self.token_layout == "bsd" else (x.shape[1], x.shape[0])
        known, types = self.known_masks(b, t, kinds, x.device)
        return known, types, True

    def forward(self, batch: Any) -> Any:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        p = next(self.model.parameters())
        # pixels follow the model's device and dtype (a model placed in bf16 / fp16 on a GPU)
        return self.model(images.to(p.device, dtype=p.dtype if images.is_floating_point() else None))

    def config_dict(self) -> dict:
        raise NotImplementedError(
            f"saving a quantized {type(self.model).__name__} is not supported yet (timm ViTs, open_clip and transformers "
            "towers are): re-run vtquant.quantize_ (calibration takes seconds) or save the fake-quantized model "
            "with torch.save")

    # --- what applications read (vtquant.analyze, vtquant.vision) ------------------------------
    def input_kind(self) -> str:
        return "images"

    def attention_spec(self) -> Any:
        """Read from the blocks' module names (fused ``qkv`` or separate q / k / v Linears); text
        towers (``input_kind() == "tokens"``) attend causally."""
        from .spec import attention_spec_from_modules

        return attention_spec_from_modules(self, causal=self.input_kind() == "tokens")


_ACTIVATIONS = ("GELU", "QuickGELU", "SiLU", "ReLU", "GELUTanh", "Tanh", "Sigmoid")


def structure_fingerprint(model: nn.Module) -> list:
    """``[[name, class], ...]`` of the activation modules of ``model``.

    What a rebuilt skeleton must share with the saved model beyond tensor shapes (which loading
    checks) and is not visible in them: quantization wraps Linears and attention and a rotation
    replaces LayerNorms, never the activations, so a quantized model's fingerprint equals that of a
    fresh build of its full-precision original.
    """
    return [[name, type(mod).__name__] for name, mod in model.named_modules() if type(mod).__name__ in _ACTIVATIONS]


class ExplicitMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with explicit ``q_proj``/``k_proj``/``v_proj``/``out_proj`` Linears.

    Same call signature and outputs (``(output, None)``; attention weights are not returned)
    in both layouts (``batch_first`` or sequence-first).  The projections run on tensors in
    the caller's layout so the sink state reads their rows like every other Linear input.
    """

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("ExplicitMultiheadAttention supports self/cross attention with equal q/k/v widths, "
                             "no bias_k/bias_v and add_zero_attn=False; leave this module unquantized (ignore it)")
        e = mha.embed_dim
        self.embed_dim, self.num_heads, self.batch_first = e, mha.num_heads, mha.batch_first
        self.dropout = mha.dropout
        has_bias = mha.in_proj_bias is not None
        dev, dt = mha.in_proj_weight.device, mha.in_proj_weight.dtype
        for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
            lin = nn.Linear(e, e, bias=has_bias, device=dev, dtype=dt)
            with torch.no_grad():
                lin.weight.copy_(mha.in_proj_weight[i * e:(i + 1) * e])
                if has_bias:
                    lin.bias.copy_(mha.in_proj_bias[i * e:(i + 1) * e])
            setattr(self, name, lin)
        self.out_proj = nn.Linear(e, e, bias=mha.out_proj.bias is not None, device=dev, dtype=dt)
        with torch.no_grad():
            self.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                self.out_proj.bias.copy_(mha.out_proj.bias)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"

    def _heads(self, y: torch.Tensor) -> torch.Tensor:
        """``[B, T, E]`` or ``[T, B, E]`` -> ``[B, H, T, d]``."""
        if not self.batch_first:
            y = y.transpose(0, 1)
        b, t, _ = y.shape
        return y.reshape(b, t, self.num_heads, -1).transpose(1, 2)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = False,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, None]:
        q = self._heads(self.q_proj(query))
        k = self._heads(self.k_proj(key))
        v = self._heads(self.v_proj(value))
        b, h, lq, _ = q.shape
        ls = k.shape[2]
        mask = None
        if attn_mask is not None:
            mask = attn_mask
            if mask.dtype == torch.bool:  # True = not allowed (nn.MultiheadAttention convention)
                mask = torch.zeros_like(mask, dtype=q.dtype).masked_fill(mask, float("-inf"))
            mask = mask.to(q.dtype)
            if mask.dim() == 3:
                mask = mask.view(b, h, lq, ls)
        elif is_causal:
            mask = torch.full((lq, ls), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
        if key_padding_mask is not None:
            kpm = key_padding_mask
            if kpm.dtype == torch.bool:
                kpm = torch.zeros_like(kpm, dtype=q.dtype).masked_fill(kpm, float("-inf"))
            kpm = kpm.to(q.dtype).view(b, 1, 1, ls)
            mask = kpm if mask is None else mask + kpm
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        out = out.transpose(1, 2).reshape(b, lq, self.embed_dim)  # [B, T, E]
        if not self.batch_first:
            out = out.transpose(0, 1)
        return self.out_proj(out), None


def make_attention_explicit_(root: nn.Module) -> int:
    """Replace every ``nn.MultiheadAttention`` under ``root`` by :class:`ExplicitMultiheadAttention`.

    Returns:
        the number of modules replaced.
    """
    count = 0
    for name, mod in list(root.named_modules()):
        if isinstance(mod, nn.MultiheadAttention):
            replace_module(root, name, ExplicitMultiheadAttention(mod))
            count += 1
    return count
