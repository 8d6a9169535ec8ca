#!/usr/bin/env python
"""Where the real CLIP ViT-B/16 (asset ``clip-vit-b16-openai``) carries its massive activations.

One fp32 forward pass (transformers ``CLIPVisionModelWithProjection``; "FP" = the dequantized int8
ONNX model) over the photos bundled with scikit-image / scikit-learn / matplotlib, CLIP
preprocessing at 224 px.  Per layer it measures, at the residual stream (block input, after
attention, block output) and at every Linear input (q/k/v-in = LayerNorm1 output, out_proj-in,
fc1-in = LayerNorm2 output, fc2-in = QuickGELU output):

* token peak ratio: per image ``max_t p_t / median_t p_t`` with ``p_t = max_c |x[t, c]|`` over
  all 197 tokens; min / median / max over images, and the largest ``|x|``;
* the CLS ratio ``p_CLS / median_t p_t``;
* spiking tokens: ``p_t > THRESHOLD x median_t p_t`` (count per image, their argmax channels);
* for the spiking tokens, the cosine of their Linear-input vector to the mean of the spiking
  tokens of the *other* images (leave-one-image-out: can one template stand for them?),
  next to the same number for ordinary patch tokens;
* always-on channels: ``|x[t, c]| > k x median |x|`` on more than half of all tokens.

Writes ``docs/benchmarks/clip_b16_probe_stats.json`` (``--out``) and prints a summary table.
Usage: ``PYTHONPATH=. python tools/clip_probe_stats.py [--threshold 10] [--threads 2]``.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from collections import Counter
from pathlib import Path

import torch

THRESHOLD = 10.0
POINTS = ("resid_in", "qkv_in", "out_proj_in", "resid_mid", "fc1_in", "fc2_in", "resid_out")
LINEAR_INPUTS = ("qkv_in", "out_proj_in", "fc1_in", "fc2_in")
#: which residual-stream point defines the spiking tokens whose Linear-input vectors are compared
FEEDS = {"qkv_in": "resid_in", "out_proj_in": "resid_in", "fc1_in": "resid_mid", "fc2_in": "resid_mid"}
ALWAYS_ON_K = (5.0, 10.0, 20.0)


def capture(model: torch.nn.Module, pixels: torch.Tensor) -> dict[tuple[int, str], torch.Tensor]:
    """``{(layer, point): [B, T, C]}`` for every point of every encoder layer (one forward pass)."""
    acts: dict[tuple[int, str], torch.Tensor] = {}
    handles = []

    def pre(key):
        def hook(module, args):
            acts[key] = args[0].detach().float().clone()
        return hook

    def post(key):
        def hook(module, args, out):
            acts[key] = (out[0] if isinstance(out, tuple) else out).detach().float().clone()
        return hook

    for i, layer in enumerate(model.vision_model.encoder.layers):
        handles += [layer.layer_norm1.register_forward_pre_hook(pre((i, "resid_in"))),
                    layer.self_attn.q_proj.register_forward_pre_hook(pre((i, "qkv_in"))),
                    layer.self_attn.out_proj.register_forward_pre_hook(pre((i, "out_proj_in"))),
                    layer.layer_norm2.register_forward_pre_hook(pre((i, "resid_mid"))),
                    layer.mlp.fc1.register_forward_pre_hook(pre((i, "fc1_in"))),
                    layer.mlp.fc2.register_forward_pre_hook(pre((i, "fc2_in"))),
                    layer.register_forward_hook(post((i, "resid_out")))]
    try:
        with torch.no_grad():
            model(pixel_values=pixels)
    finally:
        for h in handles:
            h.remove()
    return acts


def _q(values, digits: int = 2) -> dict:
    t = torch.as_tensor(values, dtype=torch.float64)
    return {"min": round(float(t.min()), digits), "median": round(float(t.median()), digits),
            "max": round(float(t.max()), digits)}


def spiking_mask(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """``[B, T]``: token peak above ``threshold`` x the image's median token peak."""
    peak = x.abs().amax(-1)
    return peak > threshold * peak.median(dim=1, keepdim=True).values


def point_stats(x: torch.Tensor, threshold: float) -> dict:
    peak = x.abs().amax(-1)  # [B, T]
    med = peak.median(dim=1).values
    mask = spiking_mask(x, threshold)
    chans = x.abs().argmax(-1)[mask]
    return {"peak_ratio": _q(peak.amax(1) / med, 1), "max_abs": round(float(x.abs().max()), 1),
            "median_token_peak": _q(med, 3), "cls_ratio": _q(peak[:, 0] / med, 2),
            "spiking_per_image": mask[:, 1:].sum(1).tolist(), "cls_spikes": int(mask[:, 0].sum()),
            "spiking_argmax_channels": dict(Counter(chans.tolist()).most_common(4))}


def template_cosine(x: torch.Tensor, mask: torch.Tensor) -> dict:
    """Cosine of each masked token's vector to the mean of the masked tokens of the other images."""
    cos = []
    for b in range(x.shape[0]):
        mine = x[b][mask[b]]
        others = torch.cat([x[o][mask[o]] for o in range(x.shape[0]) if o != b])
        if len(mine) == 0 or len(others) == 0:
            continue
        cos += torch.nn.functional.cosine_similarity(mine, others.mean(0, keepdim=True), dim=-1).tolist()
    return _q(cos, 4) | {"tokens": len(cos)} if cos else {"tokens": 0}


def always_on(x: torch.Tensor, top: int = 5) -> dict:
    """Channels whose |x| exceeds k x the median |x| on more than half of all tokens."""
    flat = x.abs().reshape(-1, x.shape[-1])
    scale = float(flat.median())
    chan_median = flat.median(dim=0).values / scale  # > k  <=>  large on more than half of the tokens
    order = chan_median.argsort(descending=True)[:top]
    return {"median_abs": round(scale, 4),
            **{f"channels_over_{k:g}x": int((chan_median > k).sum()) for k in ALWAYS_ON_K},
            "top_channels": {int(c): round(float(chan_median[c]), 1) for c in order}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--threshold", type=float, default=THRESHOLD, help="spiking token: peak > T x median token peak")
    ap.add_argument("--artifact-layer", type=int, default=7, help="layer whose output defines the artifact tokens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="docs/benchmarks/clip_b16_probe_stats.json")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from vtquant.convert.clip_onnx import clip_preprocess, load_clip_vit_b16
    from vtquant.eval.fidelity import sample_photos

    start = time.time()
    model = load_clip_vit_b16("hf", quiet=args.quiet)
    photos = sample_photos()
    pre = clip_preprocess()
    pixels = torch.stack([pre(img) for _, img in photos])
    acts = capture(model, pixels)
    n_layers = len(model.vision_model.encoder.layers)
    a = args.artifact_layer
    art = spiking_mask(acts[(a, "resid_out")], args.threshold)
    art[:, 0] = False
    layers = []
    for i in range(n_layers):
        row: dict = {"layer": i}
        for p in POINTS:
            row[p] = point_stats(acts[(i, p)], args.threshold)
            if p in LINEAR_INPUTS:
                x = acts[(i, p)]
                peak, norm = x.abs().amax(-1), x.norm(dim=-1)
                row[p]["artifact_tokens"] = {
                    "peak_ratio": _q((peak / peak.median(dim=1, keepdim=True).values)[art], 2),
                    "norm_ratio": _q((norm / norm.median(dim=1, keepdim=True).values)[art], 2),
                    "template_cosine": template_cosine(x, art)}
        row["template_cosine"] = {}
        for p in LINEAR_INPUTS:
            mask = spiking_mask(acts[(i, FEEDS[p])], args.threshold)
            mask[:, 0] = False  # the CLS token is reported on its own
            normal = ~spiking_mask(acts[(i, FEEDS[p])], args.threshold)
            normal[:, 0] = False
            row["template_cosine"][p] = {"spiking": template_cosine(acts[(i, p)], mask),
                                         "ordinary_patches": template_cosine(acts[(i, p)], normal)}
        row["always_on"] = {p: always_on(acts[(i, p)]) for p in LINEAR_INPUTS}
        layers.append(row)

    per_image = {name: (torch.nonzero(art[b]).flatten() - 1).tolist() for b, (name, _) in enumerate(photos)}
    overlap = {}
    for i in range(n_layers):
        other = spiking_mask(acts[(i, "resid_out")], args.threshold)
        other[:, 0] = False
        inter, union = (art & other).sum().item(), (art | other).sum().item()
        overlap[i] = {"jaccard": round(inter / union, 3) if union else None,
                      "spiking": int(other.sum()), "of_layer_%d_set" % a: int(inter)}
    values_474 = acts[(a, "resid_out")][..., 474]
    result = {
        "model": "OpenAI CLIP ViT-B/16 vision tower (asset clip-vit-b16-openai; FP = dequantized int8 ONNX), "
                 "transformers CLIPVisionModelWithProjection, fp32",
        "photos": [n for n, _ in photos], "img_size": 224,
        "preprocessing": "bicubic resize of the short side to 224, center crop, OpenAI CLIP mean/std",
        "threshold": args.threshold,
        "definitions": {
            "layer": "encoder layer index, 0-based; resid_out of layer i = hidden_states[i + 1] in transformers",
            "peak_ratio": "per image max_t p_t / median_t p_t, p_t = max_c |x[t, c]| over all 197 tokens; "
                          "min/median/max over images",
            "cls_ratio": "p_CLS / median_t p_t",
            "spiking_per_image": f"patch tokens (CLS excluded) with p_t > {args.threshold:g} x median_t p_t",
            "template_cosine": "cosine of a token's vector at that Linear input to the mean vector of the same kind "
                               "of token in the other images (leave-one-image-out); spiking = spiking in the "
                               "residual stream feeding the Linear (resid_in for qkv/out_proj, resid_mid for fc1/fc2)",
            "artifact_tokens (per Linear input)": "the patch tokens spiking at the artifact layer's output, at "
                                                  "this layer's Linear input: their peak ratio p_t / median_t p_t, "
                                                  "norm ratio |x_t| / median_t |x_t|, template_cosine",
            "always_on": "channels with |x[t, c]| > k x median |x| on more than half of all tokens "
                         "(channel median over tokens > k x global median)",
        },
        "layers": layers,
        "artifact_tokens": {
            "layer": a, "point": "resid_out",
            "count_per_image": {n: len(v) for n, v in per_image.items()},
            "count": _q([len(v) for v in per_image.values()], 1),
            "patch_positions": per_image,
            "channel_474_on_artifacts": _q(values_474[art], 1),
            "channel_474_elsewhere_abs": _q(values_474[~art].abs(), 2),
            "overlap_by_layer": overlap,
        },
        "seconds": round(time.time() - start, 1), "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")

    print(f"CLIP ViT-B/16, {len(photos)} photos; token peak / median token peak (median over images [max]); "
          f"spiking = peak > {args.threshold:g}x median")
    print("| layer | resid_out | CLS | spiking/img | ch | qkv_in | out_proj_in | fc1_in | fc2_in | "
          "cos qkv_in spk / ord | cos fc1_in spk / ord | cos L7-artifacts qkv_in / fc1_in / fc2_in | always-on fc1_in / fc2_in (>10x) |")
    print("|" + "---|" * 14)
    for r in layers:
        def pr(p):
            return f"{r[p]['peak_ratio']['median']:.0f} [{r[p]['peak_ratio']['max']:.0f}]"

        tc = r["template_cosine"]

        def cs(p):
            s, o = tc[p]["spiking"], tc[p]["ordinary_patches"]
            return (f"{s['median']:.3f} (min {s['min']:.3f}) / {o['median']:.2f}" if s.get("tokens") else
                    f"- / {o['median']:.2f}")

        ch = r["resid_out"]["spiking_argmax_channels"]
        print(f"| {r['layer']} | {pr('resid_out')} | {r['resid_out']['cls_ratio']['max']:.1f} | "
              f"{_q(r['resid_out']['spiking_per_image'], 0)['median']:.0f} "
              f"[{min(r['resid_out']['spiking_per_image'])}-{max(r['resid_out']['spiking_per_image'])}] | "
              f"{next(iter(ch), '-')} | {pr('qkv_in')} | {pr('out_proj_in')} | {pr('fc1_in')} | {pr('fc2_in')} | "
              f"{cs('qkv_in')} | {cs('fc1_in')} | "
              + " / ".join(f"{r[p]['artifact_tokens']['template_cosine']['median']:.3f}" for p in ("qkv_in", "fc1_in", "fc2_in"))
              + f" | {r['always_on']['fc1_in']['channels_over_10x']} / "
              f"{r['always_on']['fc2_in']['channels_over_10x']} |")
    c = result["artifact_tokens"]["count"]
    print(f"artifact patches at layer {a} output: {c['min']:.0f}-{c['max']:.0f} per image (median {c['median']:.0f}); "
          f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
