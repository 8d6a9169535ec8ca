"""transformers vision-language models: LLaVA, Idefics3 (SmolVLM), Qwen2-VL and Qwen2.5-VL.

A VLM is three parts, each quantized (or kept in full precision) on its own, with the sink
machinery of its kind (docs/vlm.md):

* ``vision``: the image encoder.  LLaVA's is a transformers ``CLIPVisionModel`` /
  ``SiglipVisionModel`` and Idefics3's a SigLIP-like ``Idefics3VisionTransformer``: both go
  through :class:`~vtquant.adapters.hf_vision.HFVisionAdapter` (CLS known where there is one,
  artifact patches found by content).  Qwen2-VL's own ViT (2-D rotary, fused ``qkv``, no CLS, all
  images of a batch packed into one ``[patches, C]`` sequence) has :class:`QwenVisionAdapter`:
  content-detected artifact patches only;
* ``projector``: LLaVA's ``multi_modal_projector``, Idefics3's ``connector``, Qwen2-VL's patch
  ``merger``; plain Linears (no blocks of their own, so no sink calibration: ``fp``, or a method
  without sink handling);
* ``language``: the decoder (a ``LlamaModel`` / ``Qwen2VLTextModel`` ...) with the VLM's
  ``lm_head``, through :class:`~vtquant.adapters.hf_decoder.HFDecoderAdapter`
  (:class:`VLMLanguageAdapter`): first token known, image and text tokens found by content.

Every tower's calibration and checks run the *whole* VLM on image + text batches (mappings with
``input_ids``, ``pixel_values`` and the family's image keys), so the language model is calibrated
on its real inputs (text embeddings with the projected image features merged in) and every
equivalence check compares the VLM's logits.  Per-class knowledge sits in :data:`VLMS`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch
import torch.nn as nn

from ..config import ConfigError
from .base import KnownSinks, ModelAdapter, UnsupportedModelError, register_adapter
from .decoder_layout import detect_layout
from .hf_decoder import HFDecoderAdapter
from .hf_vision import HFVisionAdapter
from .vision_common import VisionAdapter, linears_in

_IDEFICS3 = {"vision": ("model.vision_model",), "projector": ("model.connector",), "language": ("model.text_model",),
             "writer": "modality_projection.proj", "image_keys": ("pixel_values", "pixel_attention_mask"),
             "family": "idefics3"}
_QWEN = {"vision": ("model.visual",), "projector": ("model.visual.merger",), "language": ("model.language_model",),
         "writer": "mlp.2", "image_keys": ("pixel_values", "image_grid_thw", "mm_token_type_ids"), "family": "qwen2-vl"}
VLMS = {
    "LlavaForConditionalGeneration": {
        "vision": ("model.vision_tower",), "projector": ("model.multi_modal_projector",),
        "language": ("model.language_model",), "writer": "linear_2", "image_keys": ("pixel_values", "image_sizes"),
        "family": "llava"},
    "Idefics3ForConditionalGeneration": _IDEFICS3,
    "SmolVLMForConditionalGeneration": _IDEFICS3,
    "Qwen2VLForConditionalGeneration": _QWEN,
    "Qwen2_5_VLForConditionalGeneration": _QWEN,
}
"""Per VLM class: where its vision tower, projector and language model are (attribute paths, first
that exists), the projector's Linear that writes the image tokens' embeddings, the image keys a
batch may carry, and the family name."""

TEXT_KEYS = ("input_ids", "attention_mask")
TOWER_ORDER = ("vision", "language", "projector")
"""Quantization order: the language model's residual rotation folds into the projector's output
Linear, so the projector is quantized after it (the language model is calibrated on the outputs of
the quantized vision tower and the full-precision projector)."""


def is_vlm(model: nn.Module) -> bool:
    """A vision-language model class of :data:`VLMS`."""
    return type(model).__name__ in VLMS


def _resolve(model: nn.Module, paths: tuple) -> nn.Module:
    for path in paths:
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    raise UnsupportedModelError(f"{type(model).__name__}: none of {list(paths)} exists in this transformers "
                                "version; vtquant knows the module layout of transformers 5")


def image_token_id(model: nn.Module) -> int:
    cfg = model.config
    value = getattr(cfg, "image_token_id", None)
    if value is None:
        value = getattr(cfg, "image_token_index", None)
    if value is None:
        raise UnsupportedModelError(f"{type(model).__name__}: its config has no image_token_id")
    return int(value)


def vlm_inputs(model: nn.Module, batch: Any) -> dict:
    """The keyword inputs of one image + text batch, on the model's device.

    Raises:
        ConfigError: ``batch`` is not a mapping with ``input_ids`` and ``pixel_values``.
    """
    spec = VLMS[type(model).__name__]
    if not (isinstance(batch, Mapping) or hasattr(batch, "keys")):
        raise ConfigError(f"a calibration batch for {type(model).__name__} must be a mapping (the processor's output) "
                          f"with input_ids and {' / '.join(spec['image_keys'])}; got {type(batch).__name__}")
    missing = [k for k in ("input_ids", "pixel_values") if k not in batch]
    if missing:
        raise ConfigError(f"a calibration batch for {type(model).__name__} needs {missing} (got keys "
                          f"{sorted(batch.keys())}); pass the processor's output for images and prompts")
    device = next(model.parameters()).device
    out = {}
    for key in TEXT_KEYS + spec["image_keys"]:
        value = batch.get(key) if hasattr(batch, "get") else batch[key]
        if value is None:
            continue
        if isinstance(value, torch.Tensor):
            value = value.to(device)
            if key == "pixel_values" and value.is_floating_point():
                value = value.to(next(model.parameters()).dtype)
        out[key] = value
    return out


def run_vlm(model: nn.Module, batch: Any) -> Any:
    """One forward of the whole VLM on an image + text batch (no cache)."""
    return model(**vlm_inputs(model, batch), use_cache=False)


class _VLMForward:
    """Mixin: a tower adapter whose forward runs the whole VLM (``self.vlm``)."""

    vlm: nn.Module

    def forward(self, batch: Any) -> Any:
        return run_vlm(self.vlm, batch)

    def input_kind(self) -> str:
        return "image-text"

    def config_dict(self) -> dict:
        raise NotImplementedError(
            f"saving a quantized {type(self.vlm).__name__} is not supported yet: re-run vtquant.quantize_vlm_ "
            "(or save the fake-quantized model with torch.save)")


class VLMVisionAdapter(_VLMForward, HFVisionAdapter):
    """The CLIP / SigLIP / Idefics3 vision tower of a VLM (:class:`HFVisionAdapter` running the whole VLM)."""

    family = "hf-vlm-vision"

    def __init__(self, tower: nn.Module, vlm: nn.Module) -> None:
        super().__init__(tower)
        self.vlm = vlm

    def rotation_spec(self) -> Any:
        """The tower's LayerNorm rotation; for LLaVA, which reads hidden states of ``vision_feature_layer``
        (intermediate states stay rotated), the projector's first Linear is folded (``W' = W Q`` per
        selected layer) so the features it computes are unchanged (the equivalence check on the logits
        confirms it)."""
        spec = super().rotation_spec()
        fam = VLMS[type(self.vlm).__name__]["family"]
        if fam == "llava":
            layer = getattr(self.vlm.config, "vision_feature_layer", None)
            blocks = len(layer) if isinstance(layer, (list, tuple)) else 1
            reader = getattr(_resolve(self.vlm, VLMS[type(self.vlm).__name__]["projector"]), "linear_1", None)
            if not isinstance(reader, nn.Linear) or reader.in_features != blocks * self.hidden_size():
                raise ConfigError(
                    f"{type(self.vlm).__name__} reads the vision tower's hidden states of layer {layer!r} (not its "
                    f"output), which stay rotated, and its projector's first Linear ({type(reader).__name__}) cannot "
                    "take the rotation (quantized already, or not hidden-size blocks). Set towers.vision.rotation."
                    "enabled: false")
            spec.stream_readers = [(reader, blocks)]
        return spec


class QwenVisionAdapter(_VLMForward, VisionAdapter):
    """Qwen2-VL / Qwen2.5-VL's ViT: 2-D rotary attention with a fused ``qkv``, no CLS token, every image of
    a batch packed into one sequence of patches ``[N, C]`` (a 2-D tensor: one "row" of N tokens for the sink
    state); the patch merger is the projector.  Sinks: artifact patches, found by content only."""

    family = "hf-vlm-vision"

    def __init__(self, tower: nn.Module, vlm: nn.Module) -> None:
        super().__init__(tower)
        self.vlm = vlm
        mlp = tower.blocks[0].mlp
        self._probe = "mlp.fc2" if hasattr(mlp, "fc2") else "mlp.down_proj"

    @property
    def config(self) -> Any:
        return self.model.config

    def blocks(self) -> list[nn.Module]:
        return list(self.model.blocks)

    def block_linears(self, block: nn.Module) -> dict[str, nn.Module]:
        return linears_in(block)

    def input_groups(self, block: nn.Module) -> list[list[str]]:
        names = self.block_linears(block)
        return [["mlp.gate_proj", "mlp.up_proj"]] if "mlp.gate_proj" in names else []

    def probe_name(self) -> str:
        return self._probe

    def hidden_size(self) -> int:
        return int(self.model.blocks[0].norm1.weight.shape[0])

    def known_sink_site(self) -> nn.Module:
        return self.model.blocks[0]

    def known_sinks_of_call(self, kinds: list[str], args: tuple, kwargs: dict) -> KnownSinks:
        return None, None, True  # no prefix token: content sinks only

    def rotation_spec(self) -> Any:
        raise ConfigError(f"{type(self.vlm).__name__}: rotating or smoothing the Qwen2-VL vision tower is not "
                          "implemented (its blocks and the patch merger's norm over 4 merged patches are not described "
                          "to the transforms); set towers.vision.rotation.enabled: false and use a method without "
                          "smoothing for towers.vision")

    def attention_spec(self) -> Any:
        return None


class _CausalView:
    """What :func:`~vtquant.adapters.decoder_layout.detect_layout` reads of a ``*ForCausalLM``:
    ``.model`` (the decoder), ``.lm_head`` and ``.config``."""

    def __init__(self, decoder: nn.Module, head: nn.Module) -> None:
        self.model, self.lm_head, self.config = decoder, head, decoder.config


class VLMLanguageAdapter(_VLMForward, HFDecoderAdapter):
    """A VLM's language model (the decoder module carries ``.vtquant``) with the VLM's ``lm_head``.

    Calibration batches run the whole VLM, so the decoder sees its real inputs: text embeddings
    with the projected image features merged in.  The known sink is the first (non-padding) token;
    image tokens that become sinks are found by content.  A residual rotation also folds into the
    projector's output Linear (it writes the image tokens' embeddings).
    """

    family = "hf-vlm-language"

    def __init__(self, decoder: nn.Module, vlm: nn.Module, projector_writer: Optional[nn.Module]) -> None:
        ModelAdapter.__init__(self, decoder)
        self.vlm = vlm
        self.projector_writer = projector_writer
        self.arch = None
        self.layout = detect_layout(_CausalView(decoder, vlm.lm_head))

    @property
    def decoder(self) -> nn.Module:
        return self.model

    @property
    def lm_head(self) -> nn.Module:
        return self.vlm.lm_head

    def _untie(self) -> None:
        head, emb = self.vlm.lm_head, self.decoder.embed_tokens
        if head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr():
            head.weight = nn.Parameter(emb.weight.detach().clone())
        for cfg in (self.vlm.config, getattr(self.vlm.config, "text_config", None), self.model.config):
            if cfg is not None and hasattr(cfg, "tie_word_embeddings"):
                cfg.tie_word_embeddings = False
        if hasattr(self.vlm, "_tied_weights_keys"):
            self.vlm._tied_weights_keys = None

    def rotation_spec(self) -> Any:
        spec = super().rotation_spec()
        writer = self.projector_writer
        if writer is not None:
            if not isinstance(writer, nn.Linear):
                raise ConfigError(f"{type(self.vlm).__name__}: the projector's output ({type(writer).__name__}) is "
                                  "already quantized or not a Linear, so the language model's residual rotation "
                                  "cannot fold into it; set towers.language.rotation.residual: false")
            spec.input_writers = [writer]
        spec.layout = f"{type(self.vlm).__name__} language model: {spec.layout}"
        return spec

    def known_sink_types(self, kinds: list[str]) -> list[str]:
        """Fixed template types, as in vision towers: the first token has its own (its input is the same
        embedding in every prompt), every content-detected sink (image or text token) shares one more."""
        return [k for k in ("first_token",) if k in kinds]

    def known_sinks_of_call(self, kinds: list[str], args: tuple, kwargs: dict) -> KnownSinks:
        known, _types, is_prefill = super().known_sinks_of_call(kinds, args, kwargs)
        if known is None:
            return None, None, is_prefill
        types = torch.where(known, torch.zeros_like(known, dtype=torch.long), torch.full_like(known, -1, dtype=torch.long))
        return known, types, is_prefill

    def analysis_forward(self, batch: Any, attentions: bool = False) -> tuple:
        out = run_vlm(self.vlm, batch)
        return out.logits[0].float(), None


class ProjectorAdapter(_VLMForward, ModelAdapter):
    """A VLM's projector as one block of plain Linears (no sink calibration of its own)."""

    family = "hf-vlm-projector"

    def __init__(self, projector: nn.Module, vlm: nn.Module, writer: str) -> None:
        super().__init__(projector)
        self.vlm = vlm
        self.writer = writer

    def blocks(self) -> list[nn.Module]:
        return [self.model]

    def block_linears(self, block: nn.Module) -> dict[str, nn.Module]:
        return linears_in(block)

    def probe_name(self) -> str:
        return self.writer

    def hidden_size(self) -> int:
        return int(self.model.get_submodule(self.writer).out_features)


@register_adapter(*VLMS)
class HFVLMAdapter(ModelAdapter):
    """Names the towers of a VLM; the model as a whole is quantized with :func:`vtquant.quantize_vlm_`."""

    def __init__(self, model: nn.Module) -> None:  # noqa: D107
        raise UnsupportedModelError(
            f"{type(model).__name__} is a vision-language model with three parts (vision tower, projector, language "
            "model) quantized one by one: use vtquant.quantize_vlm_(model, recipe, batches=...) (or vtquant.quantize_, "
            "which forwards VLMs there); saving a quantized VLM is not supported yet")

    @classmethod
    def towers(cls, model: nn.Module) -> list:
        """``vision``, ``language``, ``projector`` (:data:`TOWER_ORDER`), each a :class:`~vtquant.adapters.spec.Tower`
        whose adapter runs the whole VLM on image + text batches."""
        from .spec import Tower

        spec = VLMS[type(model).__name__]
        vision = _resolve(model, spec["vision"])
        projector = _resolve(model, spec["projector"])
        language = _resolve(model, spec["language"])
        writer = projector.get_submodule(spec["writer"])
        vision_adapter = (QwenVisionAdapter(vision, model) if spec["family"] == "qwen2-vl"
                          else VLMVisionAdapter(vision, model))
        towers = {"vision": Tower("vision", vision, vision_adapter, "image-text"),
                  "language": Tower("language", language, VLMLanguageAdapter(language, model, writer), "image-text"),
                  "projector": Tower("projector", projector, ProjectorAdapter(projector, model, spec["writer"]),
                                     "image-text")}
        return [towers[name] for name in TOWER_ORDER]
