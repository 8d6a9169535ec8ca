"""``vtquant compare --vision``: methods x bit settings on an image encoder, scored by embedding fidelity.

The vision counterpart of the LLM ``vtquant compare`` (:mod:`vtquant.llm`): the same method names
(:data:`vtquant.config.METHOD_NAMES`, derived from one base recipe by
:func:`vtquant.config.method_recipe`), one quantized copy of the full-precision model per method and
setting, one table + JSON rows + PNG chart.  The model is the real OpenAI CLIP ViT-B/16 image tower
(asset ``clip-vit-b16-openai``, "FP" = the dequantized int8 ONNX model, docs/clip_b16.md) in
transformers, open_clip or timm; the images are the photos bundled with scikit-image / scikit-learn /
matplotlib (:func:`vtquant.eval.fidelity.sample_photos`), OpenAI CLIP preprocessing at 224 px.

Protocol (as ``tools/clip_fidelity.py``): every third photo (index 0, 3, 6, ...) calibrates, the
others are held out.  Per method and setting, on the held-out photos:

* ``emb_cos_mean`` / ``emb_cos_min``: cosine of the image embedding to FP's;
* ``nn_agree``: share of held-out photos whose image-to-image nearest neighbour (cosine, among the
  held-out photos) is the same as FP's;
* ``calib_seconds``: the whole ``quantize_`` call (detection, rotation, GPTQ / clip searches, scales);
* ``content_sinks``: sinks found per held-out image, the known CLS not counted.

:func:`vision_breakdown` is ``compare --breakdown`` for vision: the recipe quantized with only the
weights, only the activations, and all of it; the relative error of the residual stream after every
block against FP (CLS row and patch rows apart, rotated models compared in the original basis) and the
embedding cosine of each part.
"""
from __future__ import annotations

import copy
import gc
import time
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..config import ConfigError, Recipe
from .results import Row, row_for, setting_label

VISION_COMPARE_SETTINGS = "W8A8,W8A6,W4A8"
CLIP_ASSET = "asset:clip-vit-b16-openai"
CLIP_RECIPES = {"hf": "hf/clip-vit-b16-openai.yaml", "open_clip": "open_clip/ViT-B-16-openai.yaml",
                "timm": "timm/vit_base_patch16_clip_224.openai.yaml"}
"""The shipped recipe of the CLIP ViT-B/16 asset per library (under ``recipes/``)."""

EmbedFn = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]


def clip_recipe(library: str = "hf") -> Recipe:
    """The shipped insertquant+rotate W8A8 recipe of the CLIP ViT-B/16 asset in ``library``."""
    from ..recipe import load_recipe

    if library not in CLIP_RECIPES:
        raise ConfigError(f"--library {library!r}: choose one of {list(CLIP_RECIPES)}")
    return load_recipe(CLIP_RECIPES[library])


def split_photos(photos: Sequence) -> tuple[list, list]:
    """Calibration: every third photo (0, 3, ...); held out: the others."""
    return [p for i, p in enumerate(photos) if i % 3 == 0], [p for i, p in enumerate(photos) if i % 3 != 0]


def vision_settings(text: Optional[str]) -> list[tuple[int, int]]:
    """``"W8A8,W4A8"`` -> ``[(8, 8), (4, 8)]``; a key / value cache setting is refused (image towers have none)."""
    from ..cli import parse_settings

    try:
        bits = parse_settings(text or VISION_COMPARE_SETTINGS)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if any(kv is not None for _, _, kv in bits):
        raise ConfigError(f"--settings {text!r}: vision compare quantizes no key / value cache (the image tower "
                          "runs one forward, no cache); use W8A8-style settings")
    return [(w, a) for w, a, _ in bits]


def vision_methods(text: Optional[str]) -> list[str]:
    """The method names of ``--methods`` (default: every :data:`~vtquant.config.METHOD_NAMES`)."""
    from ..config import METHOD_NAMES

    names = [m.strip() for m in (text or ",".join(METHOD_NAMES)).split(",") if m.strip()]
    bad = [m for m in names if m not in METHOD_NAMES]
    if bad:
        raise ConfigError(f"--methods: unknown {bad}; vision compare takes {list(METHOD_NAMES)}")
    return names


def nearest_neighbours(emb: torch.Tensor) -> torch.Tensor:
    """Index of each row's nearest other row by cosine."""
    e = F.normalize(emb.float(), dim=-1)
    return (e @ e.T).fill_diagonal_(-2.0).argmax(dim=1)


@torch.no_grad()
def embed_batches(embed: EmbedFn, model: torch.nn.Module, pixels: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """``embed(model, x)`` over ``pixels`` in batches, float32 on the CPU."""
    return torch.cat([embed(model, pixels[i:i + batch_size]).float().cpu() for i in range(0, len(pixels), batch_size)])


def content_sinks(model: torch.nn.Module) -> Optional[list[int]]:
    """Sinks found per image of the last forward, the CLS (position 0) not counted; ``None`` without sink handling."""
    handle = getattr(model, "vtquant", None)
    state = getattr(handle, "state", None) if handle is not None else None
    if state is None or getattr(handle.plan, "sinks", None) is None:
        return None
    return [len(p) - (1 if 0 in p else 0) for p in state.positions()]


def quantize_copy(fp_model: torch.nn.Module, recipe: Recipe, calib_batches: list, quiet: bool = True) -> tuple:
    """``(quantized deep copy, report, seconds)``; the known sinks restricted to what the tower offers."""
    from ..adapters import get_adapter
    from ..api import quantize_
    from ..vision import tower_recipe

    model = copy.deepcopy(fp_model)
    adapter = get_adapter(model)
    t0 = time.time()
    report = quantize_(model, tower_recipe(recipe, adapter), calib_batches, adapter=adapter, quiet=quiet)
    return model, report, time.time() - t0


def run_vision_compare(fp_model: torch.nn.Module, embed: EmbedFn, calib_pixels: torch.Tensor,
                       eval_pixels: torch.Tensor, base: Recipe, methods: Sequence[str],
                       settings: Sequence[tuple[int, int]], *, model_name: str, quiet: bool = True,
                       log: Callable[[str], None] = print,
                       on_row: Optional[Callable[[list, dict], None]] = None) -> tuple[list[Row], dict]:
    """Quantize a copy of ``fp_model`` per method x setting and score its embeddings against FP.

    Args:
        fp_model: the full-precision image encoder (not modified).
        embed: ``(model, pixels [B, 3, H, W]) -> embeddings [B, D]``.
        calib_pixels: calibration images (batched by ``base.calibration.batch_size``).
        eval_pixels: held-out images.
        base: the recipe every method derives from (sinks, rotation, weight algorithm, clip searches).
        methods: :data:`~vtquant.config.METHOD_NAMES` entries; ``fp`` gives the reference row once.
        settings: ``[(w_bits, a_bits)]``.
        on_row: called with ``(rows, reports)`` after every row (e.g. to write partial results).

    Returns:
        ``(rows, reports)``: one ``emb_cos_mean`` row per method and setting (``extra``: ``emb_cos_min``,
        ``nn_agree``, ``calib_seconds``, ``eval_seconds``, ``content_sinks_mean`` / ``_min`` / ``_max``,
        ``w_algorithm``), and each quantized copy's report by recipe name.
    """
    from ..config import method_recipe

    calib = list(torch.split(calib_pixels, base.calibration.batch_size))
    t0 = time.time()
    ref = embed_batches(embed, fp_model, eval_pixels)
    fp_seconds = time.time() - t0
    nn_ref = nearest_neighbours(ref)
    rows: list[Row] = []
    reports: dict = {}
    if "fp" in methods:
        rows.append(row_for(None, model_name, "emb_cos_mean", 1.0, fp_seconds, emb_cos_min=1.0, nn_agree=1.0,
                            calib_seconds=0.0, eval_seconds=round(fp_seconds, 2)))
    for w, a in settings:
        for method in (m for m in methods if m != "fp"):
            recipe = method_recipe(method, base, w_bits=w, a_bits=a)
            model, report, calib_s = quantize_copy(fp_model, recipe, calib, quiet=quiet)
            t1 = time.time()
            emb = embed_batches(embed, model, eval_pixels)
            eval_s = time.time() - t1
            sinks = content_sinks(model)
            cos = F.cosine_similarity(emb, ref, dim=-1)
            extra: dict = {"emb_cos_min": round(float(cos.min()), 5),
                           "nn_agree": round(float((nearest_neighbours(emb) == nn_ref).float().mean()), 4),
                           "calib_seconds": round(calib_s, 2), "eval_seconds": round(eval_s, 2),
                           "eval_images": len(eval_pixels), "calib_images": len(calib_pixels)}
            if sinks is not None:
                extra.update(content_sinks_mean=round(sum(sinks) / max(1, len(sinks)), 2),
                             content_sinks_min=min(sinks, default=0), content_sinks_max=max(sinks, default=0))
                extra["detection_rule"] = getattr(report, "detection_rule", None)
            row = row_for(recipe, model_name, "emb_cos_mean", round(float(cos.mean()), 5), calib_s + eval_s, **extra)
            rows.append(row)
            reports[recipe.name] = report.to_dict()
            log(f"{row.method} {setting_label(row)}: emb cos {row.value:.4f} (min {extra['emb_cos_min']:.4f}), "
                f"NN agree {extra['nn_agree']:.2f}, calibrate {calib_s:.1f} s"
                + (f", content sinks / image {extra['content_sinks_mean']:.1f}" if sinks is not None else ""))
            del model, report
            gc.collect()  # a quantized copy holds reference cycles (handle <-> adapter <-> model): free it now
            if on_row is not None:
                on_row(rows, reports)
    return rows, reports


def format_vision_table(rows: Sequence[Row]) -> str:
    """Markdown table of :func:`run_vision_compare` rows."""
    lines = ["| method | W | A | weights | act | static | emb cos mean (min) | NN agree | content sinks / image | "
             "calibrate s | eval s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e = r.extra
        sinks = ("-" if e.get("content_sinks_mean") is None else
                 f"{e['content_sinks_mean']:.1f} ({e['content_sinks_min']}-{e['content_sinks_max']})")
        static = "-" if r.static is None else ("yes" if r.static else "no")
        lines.append(f"| {r.method} | {r.w_bits if r.w_bits is not None else 'fp'} | "
                     f"{r.a_bits if r.a_bits is not None else 'fp'} | {e.get('w_algorithm', '-')} | "
                     f"{r.act_granularity or '-'} | {static} | {r.value:.4f} ({e.get('emb_cos_min', 1.0):.4f}) | "
                     f"{e.get('nn_agree', 1.0):.2f} | {sinks} | {e.get('calib_seconds', 0.0):.1f} | "
                     f"{e.get('eval_seconds', r.seconds):.1f} |")
    return "\n".join(lines)


def target_lines(rows: Sequence[Row]) -> list[str]:
    """The issue's targets, checked on the rows: best insertquant W8A8 >= 0.995 and >= dynamic-token; W8A6
    best static ahead of dynamic-token."""
    def pick(setting: str, pred: Callable[[Row], bool]) -> list[Row]:
        return [r for r in rows if setting_label(r) == setting and pred(r)]

    out = []
    iq = pick("W8A8", lambda r: r.method.startswith("insertquant"))
    dyn = pick("W8A8", lambda r: r.method == "dynamic-token")
    if iq:
        best = max(iq, key=lambda r: r.value)
        ok = best.value >= 0.995 and (not dyn or best.value >= dyn[0].value)
        out.append(f"W8A8: best insertquant variant {best.method} {best.value:.4f} (target >= 0.995 and >= "
                   f"dynamic-token {dyn[0].value:.4f})" if dyn else
                   f"W8A8: best insertquant variant {best.method} {best.value:.4f} (target >= 0.995)")
        out[-1] += ": met" if ok else ": MISSED"
    st = pick("W8A6", lambda r: bool(r.static))
    dyn6 = pick("W8A6", lambda r: r.method == "dynamic-token")
    if st and dyn6:
        best = max(st, key=lambda r: r.value)
        out.append(f"W8A6: best static {best.method} {best.value:.4f} vs dynamic-token {dyn6[0].value:.4f}: "
                   + ("met" if best.value > dyn6[0].value else "MISSED"))
    return out


def plot_vision_compare(rows: Sequence[Row], path: str, title: str = "") -> None:
    """Bar chart of ``1 - mean embedding cosine`` per method, one bar per setting (log scale), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    from pathlib import Path

    import matplotlib.pyplot as plt

    from ..fileio import atomic_output

    quant = [r for r in rows if r.method != "fp"]
    methods = list(dict.fromkeys(r.method for r in quant))
    settings = list(dict.fromkeys(setting_label(r) for r in quant))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(methods) * max(1, len(settings)) ** 0.5 + 2), 4.2))
    width = 0.8 / max(1, len(settings))
    for si, setting in enumerate(settings):
        xs, ys, labels = [], [], []
        for mi, method in enumerate(methods):
            hit = next((r for r in quant if r.method == method and setting_label(r) == setting), None)
            if hit is not None:
                xs.append(mi + (si - (len(settings) - 1) / 2) * width)
                ys.append(max(1.0 - hit.value, 1e-6))
                labels.append(f"{hit.value:.4f}")
        bars = ax.bar(xs, ys, width=width, label=setting)
        for bar, y, text in zip(bars, ys, labels):
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, y), ha="center", va="bottom", fontsize=6,
                        rotation=90)
    ax.axhline(1.0 - 0.995, color="black", linestyle="--", linewidth=1, label="cos 0.995")
    ax.set_yscale("log")
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels(methods, rotation=20, ha="right")
    ax.set_ylabel("1 - mean embedding cosine to FP (log, lower is better)")
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        with atomic_output(Path(path)) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)


# ------------------------------------------------------------------------------------------
# per-layer breakdown
# ------------------------------------------------------------------------------------------
def _layer_errors(h_q: list, h_fp: list) -> dict:
    cls = [round(float((q[:, 0] - f[:, 0]).norm() / f[:, 0].norm().clamp_min(1e-12)), 4) for q, f in zip(h_q, h_fp)]
    patches = [round(float((q[:, 1:] - f[:, 1:]).norm() / f[:, 1:].norm().clamp_min(1e-12)), 4)
               for q, f in zip(h_q, h_fp)]
    return {"cls": cls, "patches": patches}


def vision_breakdown(fp_model: torch.nn.Module, embed: EmbedFn, recipe: Recipe, calib_pixels: torch.Tensor,
                     eval_pixels: torch.Tensor, *, quiet: bool = True,
                     log: Callable[[str], None] = print) -> dict:
    """Per-layer error of ``recipe`` with weights only, activations only and all of it, against FP.

    Returns:
        ``{"layers": L, "parts": {label: {"cls": [L], "patches": [L], "emb_cos_mean", "emb_cos_min"}}}``;
        errors are ``||h_q - h_fp|| / ||h_fp||`` of the residual stream after each block over the held-out
        images (rotated copies un-rotated first).
    """
    from ..adapters import get_adapter
    from ..analyze import residual_rotation
    from .layer_errors import block_outputs, recipe_parts

    calib = list(torch.split(calib_pixels, recipe.calibration.batch_size))
    h_fp = block_outputs(fp_model, get_adapter(fp_model), eval_pixels)
    ref = embed_batches(embed, fp_model, eval_pixels)
    result: dict = {"layers": len(h_fp), "parts": {}}
    for label, part in recipe_parts(recipe):
        model, _, seconds = quantize_copy(fp_model, part, calib, quiet=quiet)
        h_q = block_outputs(model, model.vtquant.adapter, eval_pixels)
        rot = residual_rotation(part, h_q[0].shape[-1], model)
        if rot is not None:
            h_q = [h @ rot.T.to(h.dtype) for h in h_q]
        cos = F.cosine_similarity(embed_batches(embed, model, eval_pixels), ref, dim=-1)
        entry = _layer_errors(h_q, h_fp)
        entry.update(emb_cos_mean=round(float(cos.mean()), 5), emb_cos_min=round(float(cos.min()), 5),
                     calib_seconds=round(seconds, 1))
        result["parts"][label] = entry
        log(f"{label:<17} emb cos {entry['emb_cos_mean']:.4f}; last block error CLS {entry['cls'][-1]:.4f}, "
            f"patches {entry['patches'][-1]:.4f}")
        del model
        gc.collect()
    return result


def format_vision_breakdown(result: dict, every: int = 2) -> str:
    """Markdown: one row per part, ``CLS / patches`` error every ``every`` blocks (and the last), embedding cosine."""
    layers = list(range(0, result["layers"], every))
    if layers[-1] != result["layers"] - 1:
        layers.append(result["layers"] - 1)
    lines = ["| part | " + " | ".join(f"L{li}" for li in layers) + " | emb cos mean (min) |",
             "|---" * (len(layers) + 2) + "|"]
    for label, part in result["parts"].items():
        cells = " | ".join(f"{part['cls'][li]:.3f} / {part['patches'][li]:.3f}" for li in layers)
        lines.append(f"| {label} | {cells} | {part['emb_cos_mean']:.4f} ({part['emb_cos_min']:.4f}) |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# the CLIP ViT-B/16 asset on the bundled photos
# ------------------------------------------------------------------------------------------
def clip_photo_setup(library: str = "hf", *, num_images: Optional[int] = None, quiet: bool = True) -> dict:
    """The CLIP asset in ``library`` and the bundled photos split for calibration / evaluation.

    Args:
        num_images: keep only the first ``num_images`` held-out photos (``None``: all).

    Returns:
        ``{"model", "embed", "calib_pixels", "eval_pixels", "calib_names", "eval_names", "name"}``.
    """
    from ..convert.clip_onnx import clip_preprocess, image_embeds
    from ..models import load_clip_vit_b16
    from .fidelity import sample_photos

    photos = sample_photos()
    calib, held = split_photos(photos)
    if num_images is not None:
        if num_images < 2:
            raise ConfigError(f"--num-images {num_images}: give at least 2 (the nearest-neighbour agreement needs "
                              "two held-out photos)")
        held = held[:num_images]
    pre = clip_preprocess()
    model = load_clip_vit_b16(library, quiet=quiet)
    return {"model": model, "embed": image_embeds,
            "calib_pixels": torch.stack([pre(img) for _, img in calib]),
            "eval_pixels": torch.stack([pre(img) for _, img in held]),
            "calib_names": [n for n, _ in calib], "eval_names": [n for n, _ in held],
            "name": f"clip-vit-b16-openai ({library}; FP = dequantized int8)"}
