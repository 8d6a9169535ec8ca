"""Vision entry points: quantize two-tower CLIP models, load vision models by name, evaluate them.

The core quantizes one tower at a time (one sink mechanism, one sink state).
:func:`quantize_towers_` runs it once per tower of a model, as the model's adapter
lists them (``ModelAdapter.towers``): the model itself, or the image and text
towers of an open_clip ``CLIP`` / ``CustomTextCLIP`` or a transformers
``CLIPModel`` / ``SiglipModel``; each tower carries its own ``.vtquant`` handle.
:func:`load_vision_model` turns ``timm:NAME``, ``open_clip:NAME/PRETRAINED`` or
``hf:PATH`` into a model plus the preprocessing that model was trained with (the
same for FP and quantized runs).  :func:`evaluate_imagenet`,
:func:`evaluate_retrieval` and :func:`vision_control_rows` are what ``vtquant eval
imagenet|retrieval`` and ``vtquant demo --vision`` print and write; they take typed
arguments and return result rows (:class:`~vtquant.eval.results.Row`).  Nothing
here branches on the model family: what a model returns and how it encodes images
and texts come from its adapter (``output_kind``, ``encoders``).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn as nn

from .adapters.spec import Tower
from .config import ConfigError, Recipe


def model_towers(model: nn.Module) -> list[Tower]:
    """The towers of ``model`` as its adapter lists them (one, or the image and text towers of a CLIP).

    Raises:
        UnsupportedModelError: no adapter knows the model class.
    """
    from .adapters import ModelAdapter

    return ModelAdapter.adapter_class(model).towers(model)


def clip_towers(model: nn.Module) -> list[Tower]:
    """The towers of an open_clip or transformers two-tower model, with their adapters."""
    from .adapters import UnsupportedModelError

    try:
        towers = model_towers(model)
    except UnsupportedModelError:
        towers = []
    if len(towers) < 2:
        raise TypeError(f"{type(model).__name__} is not a two-tower CLIP model (open_clip CLIP / CustomTextCLIP, "
                        "transformers CLIPModel / SiglipModel); use vtquant.quantize_ for single-tower models")
    return towers


def tower_recipe(recipe: Recipe, adapter: Any) -> Recipe:
    """``recipe`` with ``sinks.known_sinks`` restricted to the kinds this tower offers."""
    out = copy.deepcopy(recipe)
    offered = adapter.known_sink_kinds()
    out.sinks.known_sinks = [k for k in recipe.sinks.known_sinks if k in offered]
    return out


def quantize_towers_(model: nn.Module, recipe: Recipe, *, images: Optional[Iterable] = None,
                     texts: Optional[Iterable] = None, towers: Optional[tuple] = None,
                     quiet: bool = False) -> dict:
    """Quantize the towers of ``model`` (:func:`model_towers`) in place, each with its own sink calibration.

    Args:
        model: any supported model; a two-tower model (CLIP, SigLIP) has a ``visual`` and a ``text`` tower.
        recipe: one recipe for every tower; ``sinks.known_sinks`` may list kinds of any tower (``cls``,
            ``registers``, ``first_token``, ``eot``): each tower uses the ones it offers.
        images: calibration image batches (``[B, 3, H, W]``) for towers that read images.
        texts: calibration token batches (``[B, T]``) for towers that read tokens.
        towers: names of the towers to quantize (default: all).
        quiet: no progress bars.

    Returns:
        ``{tower name: QuantReport}`` for the towers quantized.
    """
    from .api import quantize_

    data = {"images": images, "tokens": texts}
    keyword = {"images": "images", "tokens": "texts"}
    listed = model_towers(model)
    if any(t.inputs not in data for t in listed):
        raise ConfigError(f"{type(model).__name__} is calibrated on image + text batches as a whole "
                          "(a vision-language model): use vtquant.quantize_vlm_(model, recipe, batches)")
    wanted = towers if towers is not None else tuple(t.name for t in listed)
    reports = {}
    for tower in listed:
        if tower.name not in wanted:
            continue
        batches = data[tower.inputs]
        if batches is None:
            others = ", ".join(repr(t) for t in wanted if t != tower.name)
            raise ValueError(f"the {tower.name} tower needs calibration {tower.inputs}; pass "
                             f"{keyword[tower.inputs]}=[...] or leave it out with towers=({others},)")
        reports[tower.name] = quantize_(tower.module, tower_recipe(recipe, tower.adapter), list(batches),
                                        adapter=tower.adapter, quiet=quiet)
    return reports


def quantize_clip_(model: nn.Module, recipe: Recipe, *, images: Optional[Iterable] = None,
                   texts: Optional[Iterable] = None, towers: tuple = ("visual", "text"),
                   quiet: bool = False) -> dict:
    """Quantize the towers of a two-tower model in place, each with its own sink calibration.

    Args:
        model: open_clip ``CLIP`` / ``CustomTextCLIP`` or transformers ``CLIPModel`` / ``SiglipModel``.
        recipe: one recipe for both towers; ``sinks.known_sinks`` may list kinds of either tower
            (``cls``, ``registers``, ``first_token``, ``eot``): each tower uses the ones it offers.
        images: calibration image batches (``[B, 3, H, W]``) for the visual tower.
        texts: calibration token batches (``[B, T]``) for the text tower.
        towers: which towers to quantize.
        quiet: no progress bars.

    Returns:
        ``{"visual": QuantReport, "text": QuantReport}`` for the towers quantized.
    """
    clip_towers(model)  # a two-tower model, or a TypeError that says what to call instead
    try:
        return quantize_towers_(model, recipe, images=images, texts=texts, towers=towers, quiet=quiet)
    except ValueError as err:
        raise ValueError(f"quantize_clip_: {err}") from None


# ------------------------------------------------------------------------------------------
# loading models by name
# ------------------------------------------------------------------------------------------
@dataclass
class VisionModel:
    """A loaded vision model and how to use it.

    Attributes:
        model: the ``nn.Module`` (eval mode).
        name: display name (``timm:vit_base_patch16_224``).
        library: ``timm``, ``open_clip`` or ``hf`` (where it was loaded from; nothing branches on it).
        preprocess: PIL image -> ``[3, H, W]`` tensor, the model's own eval transform.
        tokenizer: texts -> ``[N, T]`` ids (image-text models), else ``None``.
        is_clip: a two-tower image-text model (its adapter gives ``encoders``).
        encode_image, encode_text: the image-text model's encoders (features ``[N, D]``), else ``None``.
    """

    model: nn.Module
    name: str
    library: str
    preprocess: Callable
    tokenizer: Optional[Callable] = None
    is_clip: bool = False
    encode_image: Optional[Callable] = None
    encode_text: Optional[Callable] = None


def model_encoders(model: nn.Module) -> Optional[tuple[Callable, Callable]]:
    """``(encode_image, encode_text)`` of an image-text ``model`` (from its adapter), else ``None``."""
    from .adapters import ModelAdapter, UnsupportedModelError

    try:
        return ModelAdapter.adapter_class(model).encoders(model)
    except UnsupportedModelError:
        return None


def _image_text(model: nn.Module, spec: str, library: str, preprocess: Callable, tokenizer: Callable) -> VisionModel:
    encoders = model_encoders(model)
    if encoders is None:
        raise ConfigError(f"{spec}: {type(model).__name__} has no image-text adapter (CLIP / SigLIP)")
    return VisionModel(model, spec, library, preprocess, tokenizer, True, *encoders)


def load_vision_model(spec: str, *, pretrained: bool = True, device: str = "cpu") -> VisionModel:
    """Load ``timm:NAME``, ``open_clip:NAME/PRETRAINED`` (or ``open_clip:NAME`` + a checkpoint path
    after ``/``) or ``hf:PATH`` (a local transformers directory).

    Raises:
        ConfigError: an unknown prefix (the message lists the accepted forms).
        ImportError: the library is missing (the message names the extra to install).
    """
    lib, _, name = spec.partition(":")
    if lib == "timm":
        try:
            import timm
        except ImportError as err:  # pragma: no cover
            raise ImportError("timm models need timm: pip install 'vtquant[timm]'") from err
        model = timm.create_model(name, pretrained=pretrained).eval().to(device)
        cfg = timm.data.resolve_data_config({}, model=model)
        preprocess = timm.data.create_transform(**cfg)
        return VisionModel(model, spec, "timm", preprocess)
    if lib == "open_clip":
        try:
            import open_clip
        except ImportError as err:  # pragma: no cover
            raise ImportError("open_clip models need open_clip_torch: pip install 'vtquant[clip]'") from err
        arch, _, tag = name.partition("/")
        model, _, preprocess = open_clip.create_model_and_transforms(
            arch, pretrained=(tag or None) if pretrained else None, device=device)
        model.eval()
        return _image_text(model, spec, "open_clip", preprocess, open_clip.get_tokenizer(arch))
    if lib == "hf":
        try:
            import transformers
        except ImportError as err:  # pragma: no cover
            raise ImportError("transformers models need transformers: pip install 'vtquant[hf]'") from err
        config = transformers.AutoConfig.from_pretrained(name)
        processor = transformers.AutoImageProcessor.from_pretrained(name)

        def preprocess(img):  # the model's own image processor, one image
            return processor(images=img, return_tensors="pt")["pixel_values"][0]

        model = transformers.AutoModel.from_pretrained(name).eval().to(device)
        if config.model_type in ("clip", "siglip"):  # an image-text checkpoint: it has a tokenizer
            tok = transformers.AutoTokenizer.from_pretrained(name)
            pad = "max_length" if config.model_type == "siglip" else True

            def tokenizer(texts):
                return tok(list(texts), padding=pad, truncation=True, return_tensors="pt")["input_ids"]

            return _image_text(model, spec, "hf", preprocess, tokenizer)
        return VisionModel(model, spec, "hf", preprocess)
    raise ConfigError(f"model {spec!r}: use timm:NAME, open_clip:NAME/PRETRAINED or hf:PATH "
                     "(a local transformers directory)")


# ------------------------------------------------------------------------------------------
# `vtquant eval imagenet|retrieval` and `vtquant demo --vision`
# ------------------------------------------------------------------------------------------
VISION_KNOWN_SINKS = ["cls", "registers", "first_token", "eot"]


def default_vision_recipe() -> Recipe:
    """insertquant W8A8 (per-tensor static), known sinks of every tower kind, 32 calibration images."""
    from .config import CalibConfig, SinkConfig

    return Recipe(name="insertquant-w8a8", sinks=SinkConfig(known_sinks=list(VISION_KNOWN_SINKS)),
                  calibration=CalibConfig(dataset="eval-data", num_samples=32, batch_size=8), ignore=[])


def quantize_vision_model_(vmodel: VisionModel, model: nn.Module, recipe: Recipe, images: list,
                           texts: Optional[list] = None, quiet: bool = False) -> dict:
    """Quantize ``model`` (a copy of ``vmodel.model``): every tower its adapter lists, each with its inputs."""
    return quantize_towers_(model, recipe, images=images, texts=texts, quiet=quiet)


def _calib_indices(n_total: int, n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n_total, generator=gen)[:min(n, n_total)].tolist()


@dataclass
class VisionEvalResult:
    """What an evaluation produced: result rows (FP, then the recipe), how it was measured, reports."""

    rows: list
    protocol: str
    calibration: str
    reports: dict = field(default_factory=dict)
    seconds: float = 0.0


def _quantized_copies(vmodel: VisionModel, recipe: Recipe, calib_imgs: list, calib_txt: Optional[list],
                      quiet: bool, reports: dict):
    """Yield ``(recipe or None, model)``: the FP model, then a quantized copy (its reports into ``reports``)."""
    yield None, vmodel.model
    model = copy.deepcopy(vmodel.model)
    reports[recipe.display_method] = {k: r.to_dict() for k, r in
                                      quantize_vision_model_(vmodel, model, recipe, calib_imgs, calib_txt, quiet).items()}
    yield recipe, model


def evaluate_imagenet(vmodel: VisionModel, recipe: Recipe, data: str, *, calib_data: Optional[str] = None,
                      limit: Optional[int] = None, batch_size: int = 64, quiet: bool = False,
                      log: Callable[[str], None] = lambda s: None) -> VisionEvalResult:
    """ImageNet top-1 / top-5 of the FP model and of its ``recipe``-quantized copy.

    Classifiers (adapter ``output_kind == "class-logits"``) are scored on their logits, image-text
    models zero-shot (OpenAI prompt templates, class names from timm).

    Args:
        vmodel: from :func:`load_vision_model`.
        recipe: the quantization recipe (its calibration: ``num_samples``, ``batch_size``, ``seed``).
        data: ImageNet directory (:func:`vtquant.eval.imagenet.load_imagenet` lists the layouts).
        calib_data: calibration images (``train`` split; default: a seeded sample of ``data``).
        limit: evaluate the first ``limit`` images only.
        batch_size: images per batch.

    Raises:
        ConfigError: the model gives neither class logits nor image-text encoders.
    """
    from .adapters import get_adapter
    from .eval.imagenet import (load_imagenet, loader, prompt_templates, topk_accuracy, zero_shot_classifier,
                                zero_shot_logits)
    from .eval.results import row_for

    start = time.time()
    if not vmodel.is_clip:
        kind = get_adapter(vmodel.model).output_kind
        if kind != "class-logits":
            raise ConfigError(f"{vmodel.name} returns {kind}, not class logits: ImageNet evaluation needs a "
                              "classifier with its head (e.g. timm:NAME) or an image-text model (zero-shot)")
    cal = recipe.calibration
    dataset = load_imagenet(data, vmodel.preprocess, limit=limit)
    calib_set = load_imagenet(calib_data, vmodel.preprocess, split="train") if calib_data else dataset
    idx = _calib_indices(len(calib_set), cal.num_samples, cal.seed)
    calib_imgs = [torch.stack([calib_set[i][0] for i in idx[s:s + cal.batch_size]])
                  for s in range(0, len(idx), cal.batch_size)]
    calib_desc = (f"{len(idx)} images of {calib_data}" if calib_data else
                  f"{len(idx)} evaluation images (pass --calib-data for a disjoint set)")
    protocol = (f"ImageNet top-1/top-5 on {len(dataset)} images ({dataset.layout}); preprocessing: the model's own "
                "eval transform, same for FP and quantized" + ("; CLIP zero-shot, OpenAI prompt templates, "
                                                             "class names from timm" if vmodel.is_clip else ""))
    calib_txt = None
    if vmodel.is_clip:
        temps = prompt_templates()
        prompts = [temps[i % len(temps)](dataset.class_names[i % len(dataset.class_names)])
                   for i in range(cal.num_samples)]
        calib_txt = [vmodel.tokenizer(prompts[s:s + cal.batch_size]) for s in range(0, len(prompts), cal.batch_size)]
    rows, reports = [], {}
    t0 = time.time()
    for rec, model in _quantized_copies(vmodel, recipe, calib_imgs, calib_txt, quiet, reports):
        label = "fp" if rec is None else rec.display_method
        if vmodel.is_clip:
            enc_i, enc_t = model_encoders(model)
            clf = zero_shot_classifier(enc_t, vmodel.tokenizer, dataset.class_names, quiet=quiet)
            logits_fn = zero_shot_logits(enc_i, clf)
        else:
            logits_fn = model
        res = topk_accuracy(logits_fn, loader(dataset, batch_size), quiet=quiet, desc=f"imagenet {label}")
        secs = time.time() - t0
        rows += [row_for(rec, vmodel.name, metric, res[metric], secs, images=res["images"])
                 for metric in ("top1", "top5")]
        log(f"{label}: top-1 {res['top1']:.2f} %, top-5 {res['top5']:.2f} % ({secs:.0f} s)")
        t0 = time.time()
    return VisionEvalResult(rows, protocol, calib_desc, reports, round(time.time() - start, 1))


RETRIEVAL_METRICS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")


def evaluate_retrieval(vmodel: VisionModel, recipe: Recipe, data: Any, *, split: str = "test",
                       batch_size: int = 64, quiet: bool = False,
                       log: Callable[[str], None] = lambda s: None) -> VisionEvalResult:
    """Image-text retrieval R@1/5/10 in both directions of the FP model and its ``recipe``-quantized copy.

    Args:
        vmodel: an image-text model from :func:`load_vision_model`.
        recipe: the quantization recipe; calibration: ``num_samples`` evaluation images, one caption each.
        data: Flickr30k directory or Karpathy JSON (:func:`vtquant.eval.retrieval.load_flickr30k`), or
            the :class:`~vtquant.eval.retrieval.RetrievalSet` it returned.
        split: the Karpathy split (when ``data`` is a path).
        batch_size: images / captions per batch.

    Raises:
        ConfigError: not an image-text model.
        DataError: a malformed split file or an unreadable image (named).
    """
    from .data import load_image
    from .eval.results import row_for
    from .eval.retrieval import RetrievalSet, load_flickr30k, retrieval_metrics

    start = time.time()
    if not vmodel.is_clip:
        raise ConfigError(f"retrieval needs an image-text model (open_clip:NAME/PRETRAINED or an hf CLIP/SigLIP "
                          f"directory), got {vmodel.name}")
    cal = recipe.calibration
    rset = data if isinstance(data, RetrievalSet) else load_flickr30k(data, split=split)
    idx = _calib_indices(len(rset.images), cal.num_samples, cal.seed)

    def _img(src):
        return vmodel.preprocess(load_image(src) if isinstance(src, (str, Path)) else src.convert("RGB"))

    calib_imgs = [torch.stack([_img(rset.images[i]) for i in idx[s:s + cal.batch_size]])
                  for s in range(0, len(idx), cal.batch_size)]
    caps = ([rset.captions[5 * i] for i in idx] if len(rset.captions) >= 5 * len(rset.images)
            else rset.captions[:len(idx)])
    calib_txt = [vmodel.tokenizer(caps[s:s + cal.batch_size]) for s in range(0, len(caps), cal.batch_size)]
    calib_desc = f"{len(idx)} evaluation images and one caption each"
    protocol = (f"retrieval on {rset.source}: {len(rset.images)} images, {len(rset.captions)} captions; "
                "i2t = captions retrieved for an image query, t2i = images retrieved for a caption query")
    rows, reports = [], {}
    t0 = time.time()
    for rec, model in _quantized_copies(vmodel, recipe, calib_imgs, calib_txt, quiet, reports):
        enc_i, enc_t = model_encoders(model)
        res = retrieval_metrics(rset, enc_i, enc_t, vmodel.preprocess, vmodel.tokenizer,
                                batch_size=batch_size, quiet=quiet)
        secs = time.time() - t0
        rows += [row_for(rec, vmodel.name, metric, res[metric], secs, images=res["images"], captions=res["captions"])
                 for metric in RETRIEVAL_METRICS]
        log(f"{'fp' if rec is None else rec.display_method}: rsum {res['rsum']:.1f} ({secs:.0f} s)")
        t0 = time.time()
    return VisionEvalResult(rows, protocol, calib_desc, reports, round(time.time() - start, 1))


def control_recipe() -> Recipe:
    """The recipe of the DINOv2-S control: insertquant W8A8 per-tensor static, known CLS and registers."""
    from .config import SinkConfig

    return Recipe(name="insertquant-w8a8-dinov2", sinks=SinkConfig(known_sinks=["cls", "registers"]))


CONTROL_METRICS = ("cls_cos_mean", "cls_cos_min", "patch_cos_mean", "patch_cos_min")


def vision_control_rows(results: dict, recipe: Recipe) -> list:
    """Result rows of :func:`vtquant.eval.fidelity.dinov2_control` (``vtquant demo --vision``).

    Per loader (``hf:Dinov2Model``, ``timm:vit_small_patch14_dinov2``): the cosine of the quantized
    features with the FP ones on all photos (``cls_cos_mean``...) and on the held-out photos
    (``held_out_cls_cos_mean``...), and the saliency Pearson r where the decoder ran; each row's extra
    fields say whether sinks were detected and the largest probe ratio.
    """
    from .eval.results import row_for

    rows = []
    for name, res in results["models"].items():
        extra = {"sinks_detected": bool(res["sinks_detected"]),
                 "max_probe_ratio": round(float(max(res["probe_max_ratio"])), 3),
                 "photos": results.get("num_photos"), "calibration_photos": results.get("calibration_photos"),
                 "img_size": results.get("img_size")}
        metrics = [(m, res["all"][m]) for m in CONTROL_METRICS]
        metrics += [(f"held_out_{m}", res["held_out"][m]) for m in CONTROL_METRICS if m in res.get("held_out", {})]
        metrics += [(m, res[m]) for m in ("saliency_pearson_mean", "saliency_pearson_min") if m in res]
        rows += [row_for(recipe, name, metric, float(value), float(res.get("seconds", 0.0)), **extra)
                 for metric, value in metrics]
    return rows
