"""Vision entry points: quantize two-tower CLIP models and load vision models by name.

The core quantizes one tower at a time (one sink mechanism, one sink state).
:func:`quantize_clip_` runs it once per tower of an open_clip ``CLIP`` /
``CustomTextCLIP`` or a transformers ``CLIPModel`` / ``SiglipModel``; each tower
carries its own ``.vtquant`` handle (``model.visual`` / ``model.vision_model`` and
the text tower).  :func:`load_vision_model` turns ``timm:NAME``,
``open_clip:NAME/PRETRAINED`` or ``hf:PATH`` into a model plus the preprocessing
that model was trained with (the same for FP and quantized runs).
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn as nn

from .config import ConfigError, Recipe


@dataclass
class Tower:
    """One tower of a two-tower model: where its handle lives, its adapter, its input kind."""

    name: str          # "visual" or "text"
    module: nn.Module  # carries ``.vtquant`` after quantization
    adapter: Any
    inputs: str        # "images" or "texts"


def clip_towers(model: nn.Module) -> list[Tower]:
    """The towers of an open_clip or transformers two-tower model, with their adapters."""
    cls = type(model)
    if cls.__module__.startswith("open_clip"):
        from .adapters.open_clip import OpenCLIPTextAdapter, OpenCLIPVisualAdapter

        text_root = getattr(model, "text", None) or model
        handle = text_root if text_root is not model else model.transformer
        return [Tower("visual", model.visual, OpenCLIPVisualAdapter(model.visual), "images"),
                Tower("text", handle, OpenCLIPTextAdapter(text_root), "texts")]
    if hasattr(model, "vision_model") and hasattr(model, "text_model"):
        from .adapters.hf_vision import HFVisionAdapter

        return [Tower("visual", model.vision_model, HFVisionAdapter(model.vision_model), "images"),
                Tower("text", model.text_model, HFVisionAdapter(model.text_model), "texts")]
    raise TypeError(f"{cls.__name__} is not a two-tower CLIP model (open_clip CLIP / CustomTextCLIP, "
                    "transformers CLIPModel / SiglipModel); use vtquant.quantize_ for single-tower models")


def tower_recipe(recipe: Recipe, adapter: Any) -> Recipe:
    """``recipe`` with ``sinks.known_sinks`` restricted to the kinds this tower offers."""
    out = copy.deepcopy(recipe)
    offered = adapter.known_sink_kinds()
    out.sinks.known_sinks = [k for k in recipe.sinks.known_sinks if k in offered]
    return out


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
    from .api import quantize_

    data = {"images": images, "texts": texts}
    reports = {}
    for tower in clip_towers(model):
        if tower.name not in towers:
            continue
        batches = data[tower.inputs]
        if batches is None:
            raise ValueError(f"quantize_clip_: the {tower.name} tower needs calibration {tower.inputs}; pass "
                             f"{tower.inputs}=[...] or leave it out with towers=({', '.join(repr(t) for t in towers if t != tower.name)},)")
        reports[tower.name] = quantize_(tower.module, tower_recipe(recipe, tower.adapter), list(batches),
                                        adapter=tower.adapter, quiet=quiet)
    return reports


# ------------------------------------------------------------------------------------------
# loading models by name
# ------------------------------------------------------------------------------------------
@dataclass
class VisionModel:
    """A loaded vision model and how to use it.

    Attributes:
        model: the ``nn.Module`` (eval mode).
        name: display name (``timm:vit_base_patch16_224``).
        library: ``timm``, ``open_clip`` or ``hf``.
        preprocess: PIL image -> ``[3, H, W]`` tensor, the model's own eval transform.
        tokenizer: texts -> ``[N, T]`` ids (CLIP models), else ``None``.
        is_clip: a two-tower image-text model.
    """

    model: nn.Module
    name: str
    library: str
    preprocess: Callable
    tokenizer: Optional[Callable] = None
    is_clip: bool = False
    encode_image: Optional[Callable] = None
    encode_text: Optional[Callable] = None


def load_vision_model(spec: str, *, pretrained: bool = True, device: str = "cpu") -> VisionModel:
    """Load ``timm:NAME``, ``open_clip:NAME/PRETRAINED`` (or ``open_clip:NAME`` + a checkpoint path
    after ``/``) or ``hf:PATH`` (a local transformers directory).

    Raises:
        ValueError: an unknown prefix (the message lists the accepted forms).
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
        tok = open_clip.get_tokenizer(arch)
        return VisionModel(model, spec, "open_clip", preprocess, tok, True,
                           encode_image=model.encode_image, encode_text=model.encode_text)
    if lib == "hf":
        try:
            import transformers
        except ImportError as err:  # pragma: no cover
            raise ImportError("transformers models need transformers: pip install 'vtquant[hf]'") from err
        config = transformers.AutoConfig.from_pretrained(name)
        processor = transformers.AutoImageProcessor.from_pretrained(name)

        def preprocess(img):  # the model's own image processor, one image
            return processor(images=img, return_tensors="pt")["pixel_values"][0]

        if config.model_type in ("clip", "siglip"):
            model = transformers.AutoModel.from_pretrained(name).eval().to(device)
            tok = transformers.AutoTokenizer.from_pretrained(name)
            pad = "max_length" if config.model_type == "siglip" else True

            def tokenizer(texts):
                return tok(list(texts), padding=pad, truncation=True, return_tensors="pt")["input_ids"]

            def encode_image(x):
                return _features(model.get_image_features(pixel_values=x))

            def encode_text(ids):
                return _features(model.get_text_features(input_ids=ids))

            return VisionModel(model, spec, "hf", preprocess, tokenizer, True, encode_image, encode_text)
        model = transformers.AutoModel.from_pretrained(name).eval().to(device)
        return VisionModel(model, spec, "hf", preprocess)
    raise ConfigError(f"model {spec!r}: use timm:NAME, open_clip:NAME/PRETRAINED or hf:PATH "
                     "(a local transformers directory)")


def _features(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


# ------------------------------------------------------------------------------------------
# `vtquant eval imagenet|retrieval` and `vtquant demo --vision`
# ------------------------------------------------------------------------------------------
VISION_KNOWN_SINKS = ["cls", "registers", "first_token", "eot"]


def default_vision_recipe() -> Recipe:
    """insertquant W8A8 (per-tensor static), known sinks of every tower kind, 32 calibration images."""
    from .config import CalibConfig, SinkConfig

    return Recipe(name="insertquant-w8a8", sinks=SinkConfig(known_sinks=list(VISION_KNOWN_SINKS)),
                  calibration=CalibConfig(dataset="eval-data", num_samples=32, batch_size=8), ignore=[])


def _encoders(vmodel: VisionModel, model: nn.Module) -> tuple[Callable, Callable]:
    if vmodel.library == "open_clip":
        return model.encode_image, model.encode_text
    return (lambda x: _features(model.get_image_features(pixel_values=x)),
            lambda ids: _features(model.get_text_features(input_ids=ids)))


def quantize_vision_model_(vmodel: VisionModel, model: nn.Module, recipe: Recipe, images: list,
                           texts: Optional[list] = None, quiet: bool = False) -> dict:
    """Quantize ``model`` (a copy of ``vmodel.model``): both towers of a CLIP, else the one tower."""
    from .adapters import get_adapter
    from .api import quantize_

    if vmodel.is_clip:
        return quantize_clip_(model, recipe, images=images, texts=texts, quiet=quiet)
    adapter = get_adapter(model)
    return {"visual": quantize_(model, tower_recipe(recipe, adapter), images, adapter=adapter, quiet=quiet)}


def _calib_indices(n_total: int, n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n_total, generator=gen)[:min(n, n_total)].tolist()


def run_vision_eval(args: Any) -> int:
    """``vtquant eval imagenet|retrieval``: the FP model and the recipe's quantized copy, one table."""
    from .eval.results import format_table, row_for, write_results
    from .models import set_threads
    from .recipe import load_recipe

    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    if not args.data:
        raise FileNotFoundError(f"vtquant eval {args.task} needs --data DIR (see docs/vision.md for the layouts)")
    if ":" not in args.model or args.model.startswith("asset:"):
        raise ConfigError(f"--model {args.model!r}: vision evaluation needs timm:NAME, open_clip:NAME/PRETRAINED "
                         "or hf:PATH")
    threads = set_threads(args.threads)
    recipe = load_recipe(args.recipe) if args.recipe else default_vision_recipe()
    start = time.time()
    vmodel = load_vision_model(args.model, pretrained=not args.no_pretrained)
    log(f"loaded {vmodel.name} ({threads} threads)")
    cal = recipe.calibration
    rows, reports = [], {}
    if args.task == "imagenet":
        from .eval.imagenet import (load_imagenet, loader, topk_accuracy, zero_shot_classifier,
                                    zero_shot_logits)

        if vmodel.library == "hf" and not vmodel.is_clip:
            raise ConfigError("hf: ImageNet evaluation needs a CLIP / SigLIP model (zero-shot); evaluate "
                             "classifiers through timm:NAME")
        dataset = load_imagenet(args.data, vmodel.preprocess, limit=args.limit)
        calib_set = load_imagenet(args.calib_data, vmodel.preprocess, split="train") if args.calib_data else dataset
        idx = _calib_indices(len(calib_set), cal.num_samples, cal.seed)
        calib_imgs = [torch.stack([calib_set[i][0] for i in idx[s:s + cal.batch_size]])
                      for s in range(0, len(idx), cal.batch_size)]
        calib_desc = (f"{len(idx)} images of {args.calib_data}" if args.calib_data else
                      f"{len(idx)} evaluation images (pass --calib-data for a disjoint set)")
        protocol = (f"ImageNet top-1/top-5 on {len(dataset)} images ({dataset.layout}); preprocessing: the model's own "
                    "eval transform, same for FP and quantized" + ("; CLIP zero-shot, OpenAI prompt templates, "
                                                                 "class names from timm" if vmodel.is_clip else ""))
        calib_txt = None
        if vmodel.is_clip:
            from .eval.imagenet import prompt_templates

            temps = prompt_templates()
            prompts = [temps[i % len(temps)](dataset.class_names[i % len(dataset.class_names)])
                       for i in range(cal.num_samples)]
            calib_txt = [vmodel.tokenizer(prompts[s:s + cal.batch_size]) for s in range(0, len(prompts), cal.batch_size)]
        for label, rec in (("fp", None), (recipe.display_method, recipe)):
            model = vmodel.model if rec is None else copy.deepcopy(vmodel.model)
            t0 = time.time()
            if rec is not None:
                reports[label] = {k: r.to_dict() for k, r in
                                  quantize_vision_model_(vmodel, model, rec, calib_imgs, calib_txt, args.quiet).items()}
            if vmodel.is_clip:
                enc_i, enc_t = _encoders(vmodel, model)
                clf = zero_shot_classifier(enc_t, vmodel.tokenizer, dataset.class_names, quiet=args.quiet)
                logits_fn = zero_shot_logits(enc_i, clf)
            else:
                logits_fn = model
            res = topk_accuracy(logits_fn, loader(dataset, args.batch_size), quiet=args.quiet, desc=f"imagenet {label}")
            secs = time.time() - t0
            for metric in ("top1", "top5"):
                rows.append(row_for(rec, vmodel.name, metric, res[metric], secs, images=res["images"]))
            if rec is not None:
                del model
    else:
        from .eval.retrieval import load_flickr30k, retrieval_metrics

        if not vmodel.is_clip:
            raise ConfigError(f"retrieval needs an image-text model (open_clip:NAME/PRETRAINED or an hf CLIP/SigLIP "
                             f"directory), got {vmodel.name}")
        rset = load_flickr30k(args.data, split=args.split)
        idx = _calib_indices(len(rset.images), cal.num_samples, cal.seed)
        from PIL import Image

        def _img(src):
            return vmodel.preprocess((Image.open(src) if isinstance(src, (str, Path)) else src).convert("RGB"))

        calib_imgs = [torch.stack([_img(rset.images[i]) for i in idx[s:s + cal.batch_size]])
                      for s in range(0, len(idx), cal.batch_size)]
        caps = [rset.captions[5 * i] for i in idx] if len(rset.captions) >= 5 * len(rset.images) else rset.captions[:len(idx)]
        calib_txt = [vmodel.tokenizer(caps[s:s + cal.batch_size]) for s in range(0, len(caps), cal.batch_size)]
        calib_desc = f"{len(idx)} evaluation images and one caption each"
        protocol = (f"retrieval on {rset.source}: {len(rset.images)} images, {len(rset.captions)} captions; "
                    "i2t = captions retrieved for an image query, t2i = images retrieved for a caption query")
        for label, rec in (("fp", None), (recipe.display_method, recipe)):
            model = vmodel.model if rec is None else copy.deepcopy(vmodel.model)
            t0 = time.time()
            if rec is not None:
                reports[label] = {k: r.to_dict() for k, r in
                                  quantize_vision_model_(vmodel, model, rec, calib_imgs, calib_txt, args.quiet).items()}
            enc_i, enc_t = _encoders(vmodel, model)
            res = retrieval_metrics(rset, enc_i, enc_t, vmodel.preprocess, vmodel.tokenizer,
                                    batch_size=args.batch_size, quiet=args.quiet)
            secs = time.time() - t0
            for metric in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"):
                rows.append(row_for(rec, vmodel.name, metric, res[metric], secs, images=res["images"],
                                    captions=res["captions"]))
    print(f"\nvtquant eval {args.task}: {vmodel.name}; {protocol}; calibration: {calib_desc}")
    print(format_table(rows))
    total = time.time() - start
    print(f"total {total:.0f} s")
    if args.results_file:
        write_results(args.results_file, rows, protocol=protocol, calibration=calib_desc,
                      total_seconds=round(total, 1), reports=reports)
        log(f"wrote {args.results_file}")
    return 0


def run_vision_demo(args: Any) -> int:
    """``vtquant demo --vision``: the DINOv2-S control (no massive activations: detect none, do no harm)."""
    from .eval.fidelity import dinov2_control
    from .models import set_threads
    from .recipe import atomic_write_text

    set_threads(args.threads)
    start = time.time()
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    res = dinov2_control(quiet=args.quiet, log=log)
    res["total_seconds"] = round(time.time() - start, 1)
    print(f"\nvtquant demo --vision: DINOv2 ViT-S/14 (asset dinov2-s-imgfocus), W8A8 insertquant vs FP on "
          f"{res['num_photos']} bundled photos at {res['img_size']} px ({res['calibration_photos']} for calibration)")
    print("| model | sinks detected | max probe ratio | CLS cos mean (min) | patch cos mean (min) | saliency r mean (min) |")
    print("|---|---|---|---|---|---|")
    for name, row in res["models"].items():
        a = row["all"]
        sal = (f"{row['saliency_pearson_mean']:.4f} ({row['saliency_pearson_min']:.4f})"
               if "saliency_pearson_mean" in row else "- (install onnxruntime)")
        print(f"| {name} | {'yes' if row['sinks_detected'] else 'none'} | {max(row['probe_max_ratio']):.1f} | "
              f"{a['cls_cos_mean']:.4f} ({a['cls_cos_min']:.4f}) | {a['patch_cos_mean']:.4f} ({a['patch_cos_min']:.4f}) "
              f"| {sal} |")
    print(f"total {res['total_seconds']:.0f} s")
    if args.results_file:
        atomic_write_text(Path(args.results_file), json.dumps(res, indent=1, default=str) + "\n")
        log(f"wrote {args.results_file}")
    return 0
