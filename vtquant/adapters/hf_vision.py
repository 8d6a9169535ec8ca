"""transformers vision towers: CLIP / SigLIP (vision and text) and DINOv2 (with and without registers).

Per-class knowledge in the small :data:`TOWERS` table (llm-compressor's mapping idea):
where the blocks are, the probe Linear, and the prefix tokens.  All run batch-first.

* ``CLIPVisionTransformer`` / ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection``: CLS at 0
  (pooled: protected).
* ``SiglipVisionTransformer`` / ``SiglipVisionModel``: no CLS (attention-pooling head
  reads every token): content-based detection only; so are ``Idefics3VisionTransformer`` /
  ``SmolVLMVisionTransformer`` (the SigLIP-like encoders of Idefics3 / SmolVLM).
* ``CLIPTextTransformer`` / ``CLIPTextModel``: first token and the pooled end-of-text
  token (argmax of the ids for legacy ``eos_token_id == 2``, else the first
  ``eos_token_id``); ``SiglipTextTransformer``: the pooled last token.
* ``Dinov2Model``: CLS at 0; ``Dinov2WithRegistersModel``: CLS then
  ``num_register_tokens`` registers.

A whole ``CLIPModel`` / ``SiglipModel`` is quantized tower by tower with
:func:`vtquant.vision.quantize_clip_`.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .base import KnownSinks, UnsupportedModelError, register_adapter
from .vision_common import VisionAdapter, layer_scale, ln_layer_rotation, text_known_sinks

TOWERS = {
    "CLIPVisionTransformer": {"kind": "vision", "cls": True},
    "CLIPVisionModel": {"kind": "vision", "cls": True, "inner": "vision_model"},
    "CLIPVisionModelWithProjection": {"kind": "vision", "cls": True, "inner": "vision_model"},
    "SiglipVisionTransformer": {"kind": "vision", "cls": False},
    "SiglipVisionModel": {"kind": "vision", "cls": False, "inner": "vision_model"},
    "Idefics3VisionTransformer": {"kind": "vision", "cls": False},  # SmolVLM / Idefics3: SigLIP-like
    "SmolVLMVisionTransformer": {"kind": "vision", "cls": False},
    "Dinov2Model": {"kind": "dinov2", "cls": True},
    "Dinov2WithRegistersModel": {"kind": "dinov2", "cls": True},
    "CLIPTextTransformer": {"kind": "text", "pool": "clip"},
    "CLIPTextModel": {"kind": "text", "pool": "clip", "inner": "text_model"},
    "SiglipTextTransformer": {"kind": "text", "pool": "last"},
    "SiglipTextModel": {"kind": "text", "pool": "last", "inner": "text_model"},
}


@register_adapter(*TOWERS)
class HFVisionAdapter(VisionAdapter):
    """Adapter for the transformers towers listed in :data:`TOWERS`."""

    family = "hf-vision"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.spec = TOWERS[type(model).__name__]
        self.tower = getattr(model, self.spec.get("inner", ""), None) or model  # transformers 5 flattened the wrappers
        self.offers_registers = self.spec["kind"] == "dinov2"
        if self.spec["kind"] == "dinov2":
            self.layers = self.tower.encoder.layer
        else:
            self.layers = self.tower.encoder.layers

    @property
    def config(self) -> Any:
        return self.tower.config

    def blocks(self) -> list[nn.Module]:
        return list(self.layers)

    def probe_name(self) -> str:
        if self.spec["kind"] == "dinov2" and getattr(self.config, "use_swiglu_ffn", False):
            return "mlp.weights_out"
        return "mlp.fc2"

    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    # --- rotation -----------------------------------------------------------------------
    def rotation_spec(self) -> Any:
        """:class:`~vtquant.core.rotation_ln.LNRotationSpec` of the tower (pre-norm encoder layers)."""
        from ..core.rotation_ln import LNRotationSpec, is_layer_norm

        t, kind = self.tower, self.spec["kind"]
        heads = int(self.config.num_attention_heads)
        head_dim = self.hidden_size() // heads
        layers = []
        for block in self.blocks():
            if kind == "dinov2":
                attn, mlp = block.attention, block.mlp
                fc2 = getattr(mlp, "fc2", None) or mlp.weights_out
                readers = [lin for lin in mlp.children() if isinstance(lin, nn.Linear) and lin is not fc2]
                layers.append(ln_layer_rotation(
                    block.norm1, [attn.q_proj, attn.k_proj, attn.v_proj], (attn.v_proj, 0, head_dim), attn.o_proj,
                    block.norm2, readers, fc2, scales=(layer_scale(block.layer_scale1, attn.o_proj, "lambda1"),
                                                      layer_scale(block.layer_scale2, fc2, "lambda1"))))
            else:
                attn, mlp = block.self_attn, block.mlp
                layers.append(ln_layer_rotation(
                    block.layer_norm1, [attn.q_proj, attn.k_proj, attn.v_proj], (attn.v_proj, 0, head_dim),
                    attn.out_proj, block.layer_norm2, [mlp.fc1], mlp.fc2))
        emb = t.embeddings
        start: dict = {}
        if kind == "text":
            start["start_params"] = [(emb.token_embedding, "weight")] + (
                [(emb.position_embedding, "weight")] if getattr(emb, "position_embedding", None) is not None else [])
        elif is_layer_norm(getattr(t, "pre_layrnorm", None)):  # CLIP: the pre-norm output starts the stream
            start["start_norms"] = [t.pre_layrnorm]
        elif kind == "dinov2":
            start["start_linears"] = [emb.patch_embeddings.projection]
            start["start_params"] = [(emb, n) for n in ("cls_token", "mask_token", "register_tokens",
                                                         "position_embeddings")
                                     if isinstance(getattr(emb, n, None), torch.Tensor)]
        else:  # SigLIP
            start["start_linears"] = [emb.patch_embedding]
            start["start_params"] = [(emb.position_embedding, "weight")]
        return LNRotationSpec(hidden=self.hidden_size(), root=self.model, layers=layers, end=("output", t.encoder),
                              **start)

    # --- known sinks ------------------------------------------------------------------
    def prefix_kinds(self) -> list[tuple[str, str, int]]:
        if self.spec["kind"] == "text":
            return []
        out = [("cls", "cls", 0)] if self.spec["cls"] else []
        for r in range(int(getattr(self.config, "num_register_tokens", 0) or 0)):
            out.append(("registers", f"register{r}", 1 + r))
        return out

    def known_sink_kinds(self) -> tuple[str, ...]:
        if self.spec["kind"] == "text":
            return ("first_token", "eot")
        return super().known_sink_kinds()

    def known_sink_types(self, kinds: list[str]) -> list[str]:
        if self.spec["kind"] == "text":
            return [k for k in ("first_token", "eot") if k in kinds]
        return super().known_sink_types(kinds)

    def head_sink_types(self, kinds: list[str]) -> list[int]:
        if self.spec["kind"] == "text":
            names = self.known_sink_types(kinds)
            return [names.index("eot")] if "eot" in names else []
        return super().head_sink_types(kinds)

    def eot_positions(self, ids: torch.Tensor) -> torch.Tensor:
        """The pooled token per row, as the transformers text tower pools."""
        if self.spec["pool"] == "last":
            return torch.full((ids.shape[0],), ids.shape[1] - 1, dtype=torch.long, device=ids.device)
        eos = getattr(self.config, "eos_token_id", 2)
        if eos == 2:
            return ids.to(torch.int).argmax(dim=-1)
        return (ids == eos).int().argmax(dim=-1)

    def known_sink_site(self) -> nn.Module:
        return self.tower.embeddings if self.spec["kind"] == "text" else super().known_sink_site()

    def known_sinks_of_call(self, kinds: list[str], args: tuple, kwargs: dict) -> KnownSinks:
        if self.spec["kind"] != "text":
            return super().known_sinks_of_call(kinds, args, kwargs)
        names = self.known_sink_types(kinds)
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not names or ids is None:
            return None, None, True
        known, types = text_known_sinks(ids, names, self.eot_positions)
        return known, types, True

    def forward(self, batch: Any) -> Any:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        device = next(self.model.parameters()).device
        if self.spec["kind"] == "text":
            return self.model(input_ids=x.to(device))
        return self.model(pixel_values=x.to(device))

    # --- io ---------------------------------------------------------------------------
    def config_dict(self) -> dict:
        """The model class and its transformers config (what :meth:`from_config_dict` rebuilds)."""
        return {"model_class": type(self.model).__name__, "config": self.model.config.to_dict()}

    @classmethod
    def from_config_dict(cls, data: dict) -> nn.Module:
        import transformers

        name = data["model_class"]
        if name not in TOWERS or not hasattr(transformers, name):
            raise ValueError(f"model class {name!r} is not a transformers tower vtquant knows ({sorted(TOWERS)})")
        model_cls = getattr(transformers, name)
        return model_cls(model_cls.config_class.from_dict(data["config"])).eval()

    def input_kind(self) -> str:
        return "tokens" if self.spec["kind"] == "text" else "images"


@register_adapter("CLIPModel", "SiglipModel")
class _HFTwoTowers(HFVisionAdapter):
    def __init__(self, model: nn.Module) -> None:  # noqa: D107
        raise UnsupportedModelError(
            f"{type(model).__name__} has two towers with separate sinks: quantize it with "
            "vtquant.vision.quantize_clip_(model, recipe, images=..., texts=...), or one tower with "
            "vtquant.quantize_(model.vision_model, recipe, calib=pixel_values)")

    @classmethod
    def towers(cls, model: nn.Module) -> list:
        from .spec import Tower

        return [Tower("visual", model.vision_model, HFVisionAdapter(model.vision_model), "images"),
                Tower("text", model.text_model, HFVisionAdapter(model.text_model), "tokens")]

    @classmethod
    def encoders(cls, model: nn.Module) -> tuple:
        """``get_image_features`` / ``get_text_features`` (a ``ModelOutput`` gives its pooled output)."""

        def features(out: Any) -> torch.Tensor:
            return out if isinstance(out, torch.Tensor) else out.pooler_output

        return (lambda x: features(model.get_image_features(pixel_values=x)),
                lambda ids: features(model.get_text_features(input_ids=ids)))
