"""open_clip CLIP: the visual and the text tower, each quantized on its own.

* Layout: open_clip blocks run batch-first (``Transformer.batch_first=True``, the
  default since open_clip 2.2x) or sequence-first (``[T, B, C]``, older releases and
  models built with ``batch_first=False``); the adapter reads ``batch_first`` and
  tells the core, whose masks stay ``[B, T]``.
* Attention: ``nn.MultiheadAttention`` keeps q/k/v in ``in_proj_weight``.  The adapter
  replaces it by :class:`~vtquant.adapters.vision_common.ExplicitMultiheadAttention`
  (same outputs, explicit q/k/v/out Linears), so every matrix of a block is quantized;
  :func:`~vtquant.adapters.vision_common.unquantized_weights` checks that nothing is left.
* Known sinks: the visual CLS token (read by the head: protected); in the text tower
  the first token (start-of-text) and the pooled end-of-text token (protected).

A whole ``CLIP`` has two towers with separate sink mechanisms: quantize it with
:func:`vtquant.vision.quantize_clip_`, which runs the core once per tower.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .base import KnownSinks, UnsupportedModelError, register_adapter
from .vision_common import (VisionAdapter, layer_scale, ln_layer_rotation, make_attention_explicit_,
                            text_known_sinks)


def _transformer_layout(transformer: nn.Module) -> str:
    return "bsd" if getattr(transformer, "batch_first", True) else "sbd"


def _prepare_tower(transformer: nn.Module) -> int:
    """Explicit q/k/v Linears, and a cast dtype that does not read ``mlp.c_fc.weight``.

    open_clip asks ``resblocks[0].get_weight_dtype()`` (``mlp.c_fc.weight.dtype``) for the cast
    dtype; a quantized Linear keeps int8 codes instead of ``weight``, so the block answers with
    its first LayerNorm's dtype (the model's float dtype) instead.
    """
    for block in transformer.resblocks:
        if hasattr(block, "ln_1"):  # (after rotation ln_1 holds no weight: any float parameter of the block)
            block.get_weight_dtype = lambda block=block: next(
                (p.dtype for p in block.parameters() if p.is_floating_point()), torch.float32)
    return make_attention_explicit_(transformer)


class _OpenCLIPTower(VisionAdapter):
    """What both open_clip towers share: ``transformer.resblocks``, the ``mlp.c_proj`` probe, the layout."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.token_layout = _transformer_layout(model.transformer)
        self.replaced_attention = _prepare_tower(model.transformer)

    def blocks(self) -> list[nn.Module]:
        return list(self.model.transformer.resblocks)

    def probe_name(self) -> str:
        return "mlp.c_proj"

    def hidden_size(self) -> int:
        return int(self.model.transformer.width)

    def _start(self) -> dict:
        raise NotImplementedError

    def rotation_spec(self) -> Any:
        """:class:`~vtquant.core.rotation_ln.LNRotationSpec` of the tower (``ResidualAttentionBlock`` blocks)."""
        from ..core.rotation_ln import LNRotationSpec

        layers = []
        for i, block in enumerate(self.blocks()):
            if type(block).__name__ != "ResidualAttentionBlock" or hasattr(block, "ln_1_kv"):
                raise NotImplementedError(f"rotation of open_clip: block {i} is a {type(block).__name__}; only the "
                                          "pre-norm ResidualAttentionBlock self-attention block can be rotated exactly; "
                                          "use rotation.enabled: false")
            attn, mlp = block.attn, block.mlp
            head_dim = attn.embed_dim // attn.num_heads
            layers.append(ln_layer_rotation(
                block.ln_1, [attn.q_proj, attn.k_proj, attn.v_proj], (attn.v_proj, 0, head_dim), attn.out_proj,
                block.ln_2, [mlp.c_fc], mlp.c_proj,
                scales=(layer_scale(block.ls_1, attn.out_proj), layer_scale(block.ls_2, mlp.c_proj))))
        return LNRotationSpec(hidden=self.hidden_size(), root=self.model, layers=layers,
                              end=("output", self.model.transformer), **self._start())


@register_adapter("open_clip.transformer.VisionTransformer")
class OpenCLIPVisualAdapter(_OpenCLIPTower):
    """The image tower (``model.visual``) of an open_clip ``CLIP``."""

    family = "open_clip-visual"

    def prefix_kinds(self) -> list[tuple[str, str, int]]:
        return [("cls", "cls", 0)] if getattr(self.model, "class_embedding", None) is not None else []

    def _start(self) -> dict:
        from ..core.rotation_ln import is_layer_norm

        m = self.model
        if is_layer_norm(getattr(m, "ln_pre", None)):
            return {"start_norms": [m.ln_pre]}
        return {"start_linears": [m.conv1],
                "start_params": [(m, n) for n in ("class_embedding", "positional_embedding")
                                 if isinstance(getattr(m, n, None), torch.Tensor)]}

    def protected_type_names(self) -> set[str]:
        return {"cls"} if getattr(self.model, "pool_type", "tok") == "tok" else set()


def text_pool_positions(ids: torch.Tensor, pool_type: str, eos_id: Any = None) -> torch.Tensor:
    """Position of the pooled (end-of-text) token per row, as open_clip's ``text_global_pool``."""
    if pool_type == "argmax":
        return ids.argmax(dim=-1)
    if pool_type == "eos" and eos_id is not None:
        return (ids == eos_id).int().argmax(dim=-1)
    if pool_type == "first":
        return torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
    return torch.full((ids.shape[0],), ids.shape[1] - 1, dtype=torch.long, device=ids.device)


class OpenCLIPTextAdapter(_OpenCLIPTower):
    """The text tower of an open_clip ``CLIP`` (``transformer``, ``token_embedding``, ``ln_final``).

    ``model`` is the ``CLIP`` itself (its text tower is not a module of its own) or a
    ``TextTransformer`` (``CustomTextCLIP.text``).
    """

    family = "open_clip-text"

    def __init__(self, model: nn.Module) -> None:
        if not hasattr(model, "token_embedding") or not hasattr(model, "transformer"):
            raise ValueError(f"{type(model).__name__} has no open_clip text tower (token_embedding + transformer)")
        super().__init__(model)

    def known_sink_kinds(self) -> tuple[str, ...]:
        return ("first_token", "eot")

    def _start(self) -> dict:
        m = self.model
        params = [(m.token_embedding, "weight")] + [(m, n) for n in ("positional_embedding", "cls_emb")
                                                    if isinstance(getattr(m, n, None), torch.Tensor)]
        return {"start_params": params}

    def _pool(self) -> tuple[str, Any]:
        pool = getattr(self.model, "text_pool_type", None) or getattr(self.model, "pool_type", "argmax")
        return pool, getattr(self.model, "eos_id", None)

    def known_sink_types(self, kinds: list[str]) -> list[str]:
        return [k for k in ("first_token", "eot") if k in kinds]

    def head_sink_types(self, kinds: list[str]) -> list[int]:
        names = self.known_sink_types(kinds)
        return [names.index("eot")] if "eot" in names else []

    def known_sink_site(self) -> nn.Module:
        return self.model.token_embedding

    def known_sinks_of_call(self, kinds: list[str], args: tuple, kwargs: dict) -> KnownSinks:
        names = self.known_sink_types(kinds)
        if not names:
            return None, None, True
        pool, eos_id = self._pool()
        ids = args[0]
        known, types = text_known_sinks(ids, names, lambda x: text_pool_positions(x, pool, eos_id))
        return known, types, True

    def forward(self, batch: Any) -> Any:
        ids = batch[0] if isinstance(batch, (tuple, list)) else batch
        device = next(self.model.parameters()).device
        encode = getattr(self.model, "encode_text", None) or self.model
        return encode(ids.to(device))

    def input_kind(self) -> str:
        return "tokens"


@register_adapter("open_clip.model.CLIP", "open_clip.model.CustomTextCLIP")
class _OpenCLIPTwoTowers(OpenCLIPVisualAdapter):
    """A whole CLIP is two models for the core: say how to quantize it."""

    def __init__(self, model: nn.Module) -> None:  # noqa: D107
        raise UnsupportedModelError(
            f"{type(model).__name__} has two towers with separate sinks: quantize it with "
            "vtquant.vision.quantize_clip_(model, recipe, images=..., texts=...), or one tower with "
            "vtquant.quantize_(model.visual, recipe, calib=images)")

    @classmethod
    def towers(cls, model: nn.Module) -> list:
        """The image tower (``model.visual``) and the text tower (``model.text`` of a ``CustomTextCLIP``,
        else the CLIP's own text modules, whose handle goes on ``model.transformer``)."""
        from .spec import Tower

        text_root = getattr(model, "text", None) or model
        handle = text_root if text_root is not model else model.transformer
        return [Tower("visual", model.visual, OpenCLIPVisualAdapter(model.visual), "images"),
                Tower("text", handle, OpenCLIPTextAdapter(text_root), "tokens")]

    @classmethod
    def encoders(cls, model: nn.Module) -> tuple:
        return model.encode_image, model.encode_text
