#!/usr/bin/env python
"""Image-embedding fidelity of the real OpenAI CLIP ViT-B/16 vision tower under W8A8 / W8A6 (issue 12).

The model is the ``clip-vit-b16-openai`` asset ("FP" = the dequantized int8 ONNX model, see
:mod:`vtquant.convert.clip_onnx`), run in transformers, open_clip or timm.  The photos are the
ones bundled with scikit-image / scikit-learn / matplotlib (:func:`vtquant.eval.fidelity.sample_photos`),
OpenAI CLIP preprocessing at 224 px.  Calibration uses every third photo (index 0, 3, 6, ...: 8 of
23), evaluation the other 15.  For each method it reports the cosine of the 512-d image embedding
to FP (mean and min over the evaluation photos), the image-to-image nearest-neighbour agreement with
FP, and what the sink detection found; ``--breakdown`` adds the per-layer relative error of the
residual stream (block outputs, un-rotated where the model was rotated) against FP.

Usage::

    PYTHONPATH=. python tools/clip_fidelity.py --recipe recipes/hf/clip-vit-b16-openai.yaml \\
        [--methods fp,naive-static,dynamic-token,smoothquant,insertquant,insertquant+rotate] \\
        [--a-bits 8] [--library hf] [--breakdown] [--out results.json]

``--methods recipe`` runs the recipe as written (its own method, rotation and sink settings).
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch


def split_photos(photos: list) -> tuple[list, list]:
    """Calibration: every third photo (0, 3, ...); evaluation: the others."""
    calib = [p for i, p in enumerate(photos) if i % 3 == 0]
    held = [p for i, p in enumerate(photos) if i % 3 != 0]
    return calib, held


def block_outputs(adapter, pixels: torch.Tensor, rotation) -> list[torch.Tensor]:
    """The residual stream after every block ``[L][B, T, C]``, in the model's original basis."""
    from vtquant.eval.layer_errors import block_outputs as _blocks

    outs = _blocks(adapter.model, adapter, pixels)
    return [o @ rotation.T for o in outs] if rotation is not None else outs


def layer_errors(h_q: list, h_fp: list) -> dict:
    """Per layer: relative error of the CLS row and of the patch rows (``||h_q - h_fp|| / ||h_fp||``)."""
    cls = [round(float((q[:, 0] - f[:, 0]).norm() / f[:, 0].norm()), 4) for q, f in zip(h_q, h_fp)]
    patches = [round(float((q[:, 1:] - f[:, 1:]).norm() / f[:, 1:].norm()), 4) for q, f in zip(h_q, h_fp)]
    return {"cls": cls, "patches": patches}


def q_hidden(model: torch.nn.Module) -> int:
    return int(model.vtquant.adapter.hidden_size())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/hf/clip-vit-b16-openai.yaml")
    ap.add_argument("--methods", default="fp,naive-static,dynamic-token,smoothquant,insertquant,insertquant+rotate")
    ap.add_argument("--a-bits", type=int, default=8)
    ap.add_argument("--w-bits", type=int, default=8)
    ap.add_argument("--library", default="hf", choices=("hf", "open_clip", "timm"))
    ap.add_argument("--breakdown", action="store_true", help="per-layer residual-stream error against FP")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the results as JSON")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import vtquant
    from vtquant.adapters import get_adapter
    from vtquant.config import method_recipe
    from vtquant.convert.clip_onnx import clip_preprocess, image_embeds, load_clip_vit_b16
    from vtquant.analyze import residual_rotation
    from vtquant.eval.fidelity import sample_photos
    from vtquant.vision import tower_recipe

    start = time.time()
    fp = load_clip_vit_b16(args.library, quiet=True)
    photos = sample_photos()
    calib_photos, eval_photos = split_photos(photos)
    pre = clip_preprocess()
    x_cal = torch.stack([pre(img) for _, img in calib_photos])
    x_eval = torch.stack([pre(img) for _, img in eval_photos])
    base = vtquant.load_recipe(args.recipe)
    with torch.no_grad():
        ref = image_embeds(fp, x_eval)
    ref_n = torch.nn.functional.normalize(ref, dim=-1)
    nn_ref = (ref_n @ ref_n.T).fill_diagonal_(-2).argmax(dim=1)
    fp_layers = block_outputs(get_adapter(copy.deepcopy(fp)), x_eval, None) if args.breakdown else None
    rows = []
    for name in args.methods.split(","):
        t0 = time.time()
        model = copy.deepcopy(fp)
        if name == "recipe":
            recipe = base
        else:
            recipe = method_recipe(name, base, w_bits=args.w_bits, a_bits=args.a_bits)
        adapter = get_adapter(model)
        recipe = tower_recipe(recipe, adapter)  # known sinks this tower offers (a CLIP recipe lists both towers')
        report = vtquant.quantize_(model, recipe, [x_cal], adapter=adapter, quiet=args.quiet)
        with torch.no_grad():
            emb = image_embeds(model, x_eval)
        cos = torch.nn.functional.cosine_similarity(emb, ref, dim=-1)
        emb_n = torch.nn.functional.normalize(emb, dim=-1)
        nn_q = (emb_n @ emb_n.T).fill_diagonal_(-2).argmax(dim=1)
        row = {"method": recipe.display_method if name != "recipe" else f"recipe ({recipe.display_method})",
               "w_bits": recipe.weights.bits if recipe.weights is not None else None,
               "a_bits": recipe.activations.bits if recipe.activations is not None else None,
               "cos_mean": round(float(cos.mean()), 5), "cos_min": round(float(cos.min()), 5),
               "nn_agree": round(float((nn_q == nn_ref).float().mean()), 3),
               "seconds": round(time.time() - t0, 1)}
        sinks = model.vtquant.plan.sinks if name != "fp" else None
        if sinks is not None:
            row["detection"] = {"rule": sinks.rule, "stages": dict(sinks.stages),
                                "thresholds": {k: round(v, 2) for k, v in sinks.alphas.items()},
                                "sites": {k: sinks.site(k) for k in sinks.stages}}
            with torch.no_grad():
                image_embeds(model, x_eval)
            state = model.vtquant.state
            counts = [len(p) - (1 if 0 in p else 0) for p in state.positions()]
            row["content_sinks_per_image"] = counts
        if name != "fp":
            row["report_notes"] = report.notes
            row["report"] = {k: getattr(report, k) for k in ("detection_rule", "probes", "emergence_layer",
                                                             "cancellation_layer", "restore_layer", "layer_modes",
                                                             "sink_residual_norm")}
        if args.breakdown and name != "fp":
            rot = residual_rotation(recipe, q_hidden(model))
            row["layer_rel_error"] = layer_errors(block_outputs(model.vtquant.adapter, x_eval, rot), fp_layers)
        rows.append(row)
        if not args.quiet:
            print(json.dumps({k: v for k, v in row.items() if k not in ("report_notes", "report")}), flush=True)
        del model
    print(f"\nCLIP ViT-B/16 ({args.library}), {len(calib_photos)} calibration / {len(eval_photos)} evaluation photos; "
          f"image-embedding cosine to FP")
    print("| method | W/A | emb cos mean (min) | NN agree | content sinks / image |")
    print("|---|---|---|---|---|")
    for r in rows:
        wa = "-" if r["w_bits"] is None else f"W{r['w_bits']}A{r['a_bits']}"
        sk = r.get("content_sinks_per_image")
        sk = f"{sum(sk) / len(sk):.1f} ({min(sk)}-{max(sk)})" if sk else "-"
        print(f"| {r['method']} | {wa} | {r['cos_mean']:.4f} ({r['cos_min']:.4f}) | {r['nn_agree']:.2f} | {sk} |")
    print(f"total {time.time() - start:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps({"library": args.library, "recipe": args.recipe,
                                              "calibration": [n for n, _ in calib_photos],
                                              "evaluation": [n for n, _ in eval_photos], "rows": rows},
                                             indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
