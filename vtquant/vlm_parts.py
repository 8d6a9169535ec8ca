"""A LLaVA-style vision-language model built from real parts: CLIP ViT-B/16 + SmolLM2-135M (``asset:clip-smollm2-llava``).

No trained vision-language model can be fetched on these machines, so vtquant's real-parts check
joins the two real towers it has into a transformers ``LlavaForConditionalGeneration``:

* vision tower: the OpenAI CLIP ViT-B/16 of the ``clip-vit-b16-openai`` asset (transformers
  ``CLIPVisionModel``; "FP" is the dequantized int8 ONNX model, see :mod:`vtquant.convert.clip_onnx`).
  LLaVA-1.5 conventions: features of the second-to-last layer (``vision_feature_layer = -2``), the
  ``default`` select strategy (patch tokens, CLS dropped): 196 image tokens per 224 px image;
* language model: SmolLM2-135M-Instruct of the ``smollm2-135m`` asset (GGUF Q4_1 dequantized to
  float32), with an ``<image>`` token added to its tokenizer and embedding (the new embedding
  row is the mean of the others; it is never read: the image features replace it);
* projector: LLaVA-1.5's two-layer MLP (``linear_1`` 768 -> 576, GELU, ``linear_2`` 576 -> 576)
  with **seeded random weights** (``torch.nn.Linear``'s default initialization under
  ``torch.manual_seed(seed)``), ``linear_2`` scaled so that the median norm of the projected image
  tokens equals the mean norm of SmolLM2's token embeddings (measured on the calibration photos,
  :func:`reference_photos`).

**The composite is untrained**: the projector was never fitted, so the language model does not
understand the images and its answers are not meaningful.  What it is good for is what vtquant
needs to check: real sinks in both towers (CLIP's artifact patches, SmolLM2's first-token sink,
and whatever the projected artifact patches become inside the language model) flowing through the
real transformers LLaVA code path (processor, ``get_image_features``, ``generate`` with the KV
cache), so FP-vs-quantized fidelity can be measured on it.

The prompts follow the processor's conventions: :class:`transformers.LlavaProcessor` with a
``CLIPImageProcessor`` (OpenAI CLIP mean / std, bicubic resize to 224, center crop) expands the one
``<image>`` of a chat-templated prompt into 196 image tokens.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn as nn

from .errors import DataError

ASSET_NAME = "clip-smollm2-llava"
MODEL_SPEC = f"asset:{ASSET_NAME}"
IMAGE_TOKEN = "<image>"
DEFAULT_SEED = 0
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VLMParts:
    """A built composite and how to feed it.

    Attributes:
        model: ``LlavaForConditionalGeneration`` (fp32, eval mode).
        processor: ``LlavaProcessor`` (images + chat-templated text -> ``input_ids``, ``pixel_values``).
        tokenizer: the processor's tokenizer (SmolLM2's, plus ``<image>``).
        name: display name (``clip-smollm2-llava``).
        info: how it was built (seed, projector scale, norms, sources), for result files.
    """

    model: nn.Module
    processor: Any
    tokenizer: Any
    name: str = ASSET_NAME
    info: dict = field(default_factory=dict)


def reference_photos() -> list:
    """The photos the projector scale is measured on: the calibration split of the bundled photos
    (:func:`vtquant.eval.vlm.split_photos`)."""
    from .eval.fidelity import sample_photos
    from .eval.vlm import split_photos

    return [img for _, img in split_photos(sample_photos())[0]]


def clip_image_processor(size: int = 224) -> Any:
    """transformers ``CLIPImageProcessor`` with OpenAI CLIP's preprocessing (bicubic, center crop, CLIP mean / std)."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                              do_center_crop=True, resample=3, image_mean=list(OPENAI_CLIP_MEAN),
                              image_std=list(OPENAI_CLIP_STD), do_convert_rgb=True)


def seeded_projector(vision_hidden: int, text_hidden: int, seed: int = DEFAULT_SEED) -> dict[str, torch.Tensor]:
    """LLaVA-1.5 projector weights (``linear_1``, ``linear_2`` with biases), ``nn.Linear``'s default
    initialization drawn under ``torch.manual_seed(seed)`` (the global RNG state is restored)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        l1 = nn.Linear(vision_hidden, text_hidden)
        l2 = nn.Linear(text_hidden, text_hidden)
    return {"linear_1.weight": l1.weight.data, "linear_1.bias": l1.bias.data,
            "linear_2.weight": l2.weight.data, "linear_2.bias": l2.bias.data}


def build_llava(vision: nn.Module, lm: nn.Module, tokenizer: Any, *, seed: int = DEFAULT_SEED,
                scale_images: Optional[list] = None, image_size: Optional[int] = None) -> tuple[nn.Module, Any, dict]:
    """Join a transformers CLIP vision tower and a Llama-family causal LM into a ``LlavaForConditionalGeneration``.

    Args:
        vision: ``CLIPVisionModel`` or ``CLIPVisionModelWithProjection`` (the projection is dropped).
        lm: a ``*ForCausalLM`` whose ``.model`` is the decoder (Llama, Qwen2, Mistral...).
        tokenizer: the LM's tokenizer; a copy gets the ``<image>`` token (the argument is not changed).
        seed: the projector's seed.
        scale_images: PIL images on which the projector's output scale is measured (``None``: no
            scaling, the seeded weights as drawn).
        image_size: the vision tower's input size (default: its config's).

    Returns:
        ``(model, processor, info)``: the composite (eval mode, float32), its ``LlavaProcessor`` and
        ``info`` (seed, image token id, projector scale, norms).
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    vcfg = copy.deepcopy(vision.config)
    size = int(image_size or vcfg.image_size)
    patch = int(vcfg.patch_size)
    tok = copy.deepcopy(tokenizer)
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_id = int(tok.convert_tokens_to_ids(IMAGE_TOKEN))
    tcfg = copy.deepcopy(lm.config)
    for attr in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        if hasattr(tcfg, attr):
            try:
                delattr(tcfg, attr)
            except AttributeError:
                pass
    old_vocab = int(lm.get_input_embeddings().weight.shape[0])
    vocab = max(old_vocab, len(tok))
    tcfg.vocab_size = vocab
    tied = bool(getattr(lm.config, "tie_word_embeddings", False))
    n_patches = (size // patch) ** 2
    cfg = LlavaConfig(vision_config=vcfg.to_dict() | {"model_type": "clip_vision_model"}, text_config=tcfg.to_dict(),
                      image_token_index=image_id, image_seq_length=n_patches, projector_hidden_act="gelu",
                      vision_feature_select_strategy="default", vision_feature_layer=-2,
                      multimodal_projector_bias=True, tie_word_embeddings=tied)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(cfg)

    state: dict[str, torch.Tensor] = {}
    tower_keys = {k for k in model.state_dict() if k.startswith("model.vision_tower.")}
    for k, v in vision.state_dict().items():
        if k.startswith("visual_projection."):
            continue  # CLIPVisionModelWithProjection's 512-d head: LLaVA reads hidden states
        key = "model.vision_tower." + k
        if key not in tower_keys and k.startswith("vision_model."):  # transformers 5 flattened CLIPVisionModel
            key = "model.vision_tower." + k[len("vision_model."):]
        state[key] = v
    dec = lm.model.state_dict()
    emb_key = next(k for k in dec if k.endswith("embed_tokens.weight"))
    emb = dec[emb_key]
    if vocab > old_vocab:  # new rows (the <image> token): the mean embedding
        emb = torch.cat([emb, emb.mean(dim=0, keepdim=True).expand(vocab - old_vocab, -1)], dim=0)
    for k, v in dec.items():
        state["model.language_model." + k] = emb if k == emb_key else v
    if tied:
        state["lm_head.weight"] = emb
    else:
        head = lm.get_output_embeddings().weight.data
        if vocab > old_vocab:
            head = torch.cat([head, head.mean(dim=0, keepdim=True).expand(vocab - old_vocab, -1)], dim=0)
        state["lm_head.weight"] = head
    proj = seeded_projector(int(vcfg.hidden_size), int(tcfg.hidden_size), seed)
    state.update({"model.multi_modal_projector." + k: v for k, v in proj.items()})
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    extra = sorted(set(state) - expected)
    if missing or extra:
        raise DataError(f"building the LLaVA composite: missing weights {missing[:6]}, unexpected {extra[:6]} "
                        "(is the vision tower a transformers CLIP vision model and the LM a *ForCausalLM?)")
    model.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True, assign=True)
    if tied:
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
    # non-persistent buffers (rotary inv_freq, position ids) are still on the meta device: take the parts' own
    _copy_buffers(model.model.vision_tower, vision)
    _copy_buffers(model.model.language_model, lm.model)
    model.eval()

    processor = LlavaProcessor(image_processor=clip_image_processor(size), tokenizer=tok, patch_size=patch,
                               vision_feature_select_strategy="default", image_token=IMAGE_TOKEN,
                               num_additional_image_tokens=1, chat_template=tok.chat_template)
    emb_norm = float(model.model.language_model.embed_tokens.weight[:old_vocab].detach().norm(dim=1).mean())
    info = {"seed": seed, "image_token": IMAGE_TOKEN, "image_token_id": image_id, "image_tokens": n_patches,
            "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "text_embedding_norm": emb_norm,
            "projector_scale": 1.0, "trained": False}
    if scale_images:
        pix = processor.image_processor(images=list(scale_images), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            feats = model.model.get_image_features(pixel_values=pix).pooler_output
        feats = torch.cat(list(feats), dim=0) if isinstance(feats, (list, tuple)) else feats.flatten(0, -2)
        median = float(feats.norm(dim=-1).median())
        scale = emb_norm / median
        with torch.no_grad():
            model.model.multi_modal_projector.linear_2.weight.mul_(scale)
            model.model.multi_modal_projector.linear_2.bias.mul_(scale)
        info.update(projector_scale=scale, projected_median_norm_before=median,
                    scale_images=len(scale_images))
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model, processor, info


def _copy_buffers(target: nn.Module, source: nn.Module) -> None:
    src = dict(source.named_buffers())
    src.update({k[len("vision_model."):]: v for k, v in list(src.items()) if k.startswith("vision_model.")})
    for name, buf in list(target.named_buffers()):
        if buf.is_meta:
            if name not in src:
                raise DataError(f"building the LLaVA composite: buffer {name} has no value in the source part")
            owner, _, leaf = name.rpartition(".")
            mod = target.get_submodule(owner) if owner else target
            mod._buffers[leaf] = src[name].detach().clone()
    for name, p in target.named_parameters():
        if p.is_meta:  # pragma: no cover - load_state_dict(strict=True) covers every parameter
            raise DataError(f"building the LLaVA composite: parameter {name} was not loaded")


def load_clip_smollm2_llava(*, seed: int = DEFAULT_SEED, quiet: bool = False,
                            clip_onnx: Optional[str] = None, smollm2_file: Optional[str] = None) -> VLMParts:
    """The real-parts composite ``asset:clip-smollm2-llava`` (CLIP ViT-B/16 + seeded projector + SmolLM2-135M).

    **Untrained**: see the module docstring.  Built in about a minute on a CPU (the two assets are
    fetched and converted on first use).

    Args:
        seed: the projector's seed.
        quiet: no progress output.
        clip_onnx: the ``clip-vit-b16-openai`` asset's ONNX file given by hand (offline use).
        smollm2_file: SmolLM2's GGUF file given by hand (offline use).
    """
    from .models import load_causal_lm, load_clip_vit_b16

    start = time.time()
    vision = load_clip_vit_b16("hf", quiet=quiet, onnx_path=clip_onnx)
    lm, tok, _ = load_causal_lm("asset:smollm2-135m", smollm2_file, quiet=quiet)
    model, processor, info = build_llava(vision, lm, tok, seed=seed, scale_images=reference_photos())
    del vision, lm
    info.update(vision_tower="clip-vit-b16-openai (dequantized int8 ONNX, transformers CLIPVisionModel)",
                language_model="smollm2-135m (SmolLM2-135M-Instruct GGUF Q4_1 dequantized to float32)",
                projector=f"LLaVA-1.5 MLP (linear_1, GELU, linear_2), seeded random weights (seed {seed}), "
                          "untrained")
    model.vtquant_load_seconds = time.time() - start
    return VLMParts(model=model, processor=processor, tokenizer=processor.tokenizer, info=info)


FP_REFERENCE = ("clip-smollm2-llava: untrained composite of CLIP ViT-B/16 (dequantized int8 ONNX) + seeded "
                "LLaVA-1.5 projector + SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to float32)")


def is_vlm_spec(spec: Optional[str]) -> bool:
    """``asset:clip-smollm2-llava`` or ``vlm:PATH`` (a local transformers VLM folder)."""
    return bool(spec) and (spec == MODEL_SPEC or spec.startswith("vlm:"))


def load_vlm(spec: str, *, quiet: bool = False) -> VLMParts:
    """A vision-language model and its processor by name.

    Args:
        spec: ``asset:clip-smollm2-llava`` (the untrained real-parts composite, :func:`load_clip_smollm2_llava`)
            or ``vlm:PATH``: a local transformers folder of a LLaVA, SmolVLM (Idefics3) or Qwen2-VL model
            with its processor (``AutoProcessor`` / ``AutoModelForImageTextToText``, float32).

    Raises:
        FileNotFoundError: ``vlm:PATH`` is not a folder.
        DataError: an unknown ``asset:`` name.
    """
    from pathlib import Path

    if spec == MODEL_SPEC:
        return load_clip_smollm2_llava(quiet=quiet)
    if spec.startswith("asset:"):
        raise DataError(f"--model {spec}: not a vision-language asset; the one here is {MODEL_SPEC} (or give "
                        "vlm:PATH, a local transformers folder of a LLaVA / SmolVLM / Qwen2-VL model)")
    path = Path(spec[len("vlm:"):] if spec.startswith("vlm:") else spec).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"--model {spec}: no such folder (give vlm:PATH, a local transformers folder with the "
                                "model and its processor; hub names cannot be downloaded here)")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    start = time.time()
    processor = AutoProcessor.from_pretrained(str(path))
    model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch.float32).eval()
    model.vtquant_load_seconds = time.time() - start
    return VLMParts(model=model, processor=processor, tokenizer=getattr(processor, "tokenizer", None),
                    name=path.name, info={"source": str(path), "trained": True})
