"""Issue 14: the real CLIP ViT-B/16 image tower (timm) quantized, saved, loaded in a new process.

Quantizes the ``clip-vit-b16-openai`` tower (:func:`vtquant.models.load_clip_vit_b16`, timm build)
with its recipe (insertquant+rotate W8A8, LayerNorm-tower rotation) on bundled photos, saves it with :func:`vtquant.save` (timm towers use the
vtquant layout: architecture name + constructor kwargs + a activation fingerprint), loads it
with :func:`vtquant.load` in a new process and compares the 512-d image embeddings of held-out
photos with the in-memory model's.

``--library open_clip``: the whole open_clip ``ViT-B-16`` CLIP (``create_model("ViT-B-16",
force_quick_gelu=True)``, no download) with the asset's real image-tower weights and a random text tower
(no real CLIP text weights are available here), both towers quantized with
``recipes/open_clip/ViT-B-16-openai.yaml`` (captions "a photo of NAME." for the text tower), saved as one
checkpoint (the open_clip model config + a plan per tower), loaded with :func:`vtquant.load` in a new
process; image and text embeddings compared.

Usage::

    .venv/bin/python tools/deploy_clip_bench.py --threads 2 --out runs/deploy_clip_bench.json
    .venv/bin/python tools/deploy_clip_bench.py --library open_clip --threads 2 --out runs/deploy_clip_open_clip.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import vtquant  # noqa: E402
from vtquant.adapters import get_adapter  # noqa: E402
from vtquant.models import load_clip_vit_b16, set_threads  # noqa: E402
from vtquant.vision import tower_recipe  # noqa: E402

NEW_PROCESS = """
import sys, time, torch
torch.set_num_threads(int(sys.argv[3]))
import vtquant
from vtquant.convert.clip_onnx import image_embeds
t0 = time.time()
model = vtquant.load(sys.argv[1])
load_s = time.time() - t0
with torch.no_grad():
    torch.save({"emb": image_embeds(model, torch.load(sys.argv[2])), "load_seconds": load_s,
                "sinks": model.vtquant.sink_positions()}, sys.argv[2] + ".out")
"""


NEW_PROCESS_CLIP = """
import sys, time, torch
torch.set_num_threads(int(sys.argv[3]))
import vtquant
t0 = time.time()
model = vtquant.load(sys.argv[1])
load_s = time.time() - t0
x, t = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save({"img": model.encode_image(x), "txt": model.encode_text(t), "load_seconds": load_s,
                "sinks": (model.visual.vtquant.sink_positions(), model.transformer.vtquant.sink_positions())},
               sys.argv[2] + ".out")
"""


def open_clip_main(args, threads: int, x: torch.Tensor, names: list) -> int:
    """The whole open_clip ViT-B-16 CLIP: real image tower, random text tower, both quantized and saved."""
    import open_clip

    from vtquant.recipe import load_recipe
    from vtquant.vision import quantize_clip_

    recipe_file = args.recipe if args.recipe_given else str(REPO / "recipes/open_clip/ViT-B-16-openai.yaml")
    torch.manual_seed(0)
    fp = open_clip.create_model("ViT-B-16", pretrained=None, force_quick_gelu=True).eval()
    fp.visual.load_state_dict(load_clip_vit_b16("open_clip", quiet=True).state_dict(), strict=True)
    tok = open_clip.get_tokenizer("ViT-B-16")
    captions = [f"a photo of {n.split(':')[-1].rsplit('.', 1)[0].replace('_', ' ')}." for n in names]
    t = tok(captions)
    calib_img = list(torch.split(x[:args.calib_images], 4))
    calib_txt = list(torch.split(t[:args.calib_images], 4))
    held_x, held_t = x[args.calib_images:], t[args.calib_images:]
    q = copy.deepcopy(fp)
    recipe = load_recipe(recipe_file)
    t0 = time.time()
    reports = quantize_clip_(q, recipe, images=calib_img, texts=calib_txt, quiet=True)
    calib_s = time.time() - t0
    with torch.no_grad():
        img_fp, txt_fp = fp.encode_image(held_x), fp.encode_text(held_t)
        img_q, txt_q = q.encode_image(held_x), q.encode_text(held_t)
    work = Path(tempfile.mkdtemp(prefix="vtquant-clip-"))
    path = vtquant.save(q, work / "ckpt")
    torch.save((held_x, held_t), work / "x.pt")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    subprocess.run([sys.executable, "-c", NEW_PROCESS_CLIP, str(path), str(work / "x.pt"), str(threads)], check=True,
                   env=env, cwd=tempfile.gettempdir())
    loaded = torch.load(work / "x.pt.out")
    cos = torch.nn.functional.cosine_similarity
    fp_bytes = sum(p.numel() * 4 for p in fp.parameters())
    result = {
        "model": "open_clip ViT-B-16 CLIP (quick_gelu): image tower = clip-vit-b16-openai (FP = the dequantized int8 "
                 "ONNX), text tower = random weights (seed 0; no real CLIP text weights here)",
        "recipe_file": recipe_file, "calib_images": args.calib_images, "eval_images": len(held_x),
        "captions": captions, "calibrate_seconds": round(calib_s, 1), "threads": threads,
        "reports": {k: {"emergence_layer": r.emergence_layer, "stages": r.stages, "num_types": r.num_types,
                        "notes": r.notes} for k, r in reports.items()},
        "files": sorted(p.name for p in path.iterdir()),
        "model_safetensors_bytes": (path / "model.safetensors").stat().st_size, "fp32_parameter_bytes": fp_bytes,
        "load_seconds_new_process": round(loaded["load_seconds"], 2),
        "max_abs_image_embedding_diff_loaded_vs_in_memory": float((loaded["img"] - img_q).abs().max()),
        "max_abs_text_embedding_diff_loaded_vs_in_memory": float((loaded["txt"] - txt_q).abs().max()),
        "sink_positions_equal": loaded["sinks"] == (q.visual.vtquant.sink_positions(),
                                                    q.transformer.vtquant.sink_positions()),
        "image_cosine_quantized_vs_fp": [round(float(c), 5) for c in cos(img_q, img_fp)],
        "text_cosine_quantized_vs_fp (random text tower)": [round(float(c), 5) for c in cos(txt_q, txt_fp)],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(REPO / "recipes/timm/vit_base_patch16_clip_224.openai.yaml"),
                    help="default: %(default)s (insertquant+rotate W8A8, the real-CLIP recipe)")
    ap.add_argument("--calib-images", type=int, default=12)
    ap.add_argument("--eval-images", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/deploy_clip_bench.json")
    ap.add_argument("--library", choices=("timm", "open_clip"), default="timm",
                    help="timm: the image tower alone; open_clip: the whole CLIP, both towers (default: %(default)s)")
    args = ap.parse_args()
    args.recipe_given = "--recipe" in sys.argv
    threads = set_threads(args.threads)
    from vtquant.convert.clip_onnx import clip_preprocess, image_embeds
    from vtquant.eval.fidelity import sample_photos

    photos = sample_photos()
    need = args.calib_images + args.eval_images
    if len(photos) < need:
        raise SystemExit(f"{len(photos)} bundled photos, {need} needed")
    pre = clip_preprocess()
    x = torch.stack([pre(img) for _, img in photos[:need]])
    calib = list(torch.split(x[:args.calib_images], 4))
    held_out = x[args.calib_images:]
    if args.library == "open_clip":
        return open_clip_main(args, threads, x, [n for n, _ in photos[:need]])

    fp = load_clip_vit_b16("timm", quiet=True)
    q = copy.deepcopy(fp)
    from vtquant.recipe import load_recipe

    recipe = tower_recipe(load_recipe(args.recipe), get_adapter(q))
    t0 = time.time()
    report = vtquant.quantize_(q, recipe, calib, quiet=True)
    calib_s = time.time() - t0
    with torch.no_grad():
        emb_fp = image_embeds(fp, held_out)
        emb_q = image_embeds(q, held_out)
    work = Path(tempfile.mkdtemp(prefix="vtquant-clip-"))
    path = vtquant.save(q, work / "ckpt")
    torch.save(held_out, work / "x.pt")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    subprocess.run([sys.executable, "-c", NEW_PROCESS, str(path), str(work / "x.pt"), str(threads)], check=True,
                   env=env, cwd=tempfile.gettempdir())
    loaded = torch.load(work / "x.pt.out")
    cos = torch.nn.functional.cosine_similarity
    result = {
        "model": "clip-vit-b16-openai (timm vit_base_patch16_clip_224.openai; FP = the dequantized int8 ONNX)",
        "recipe": recipe.to_dict(), "calib_images": args.calib_images, "eval_images": args.eval_images,
        "calibrate_seconds": round(calib_s, 1), "threads": threads,
        "report": {"emergence_layer": report.emergence_layer, "stages": report.stages, "num_types": report.num_types,
                   "notes": report.notes},
        "recipe_file": args.recipe,
        "files": sorted(p.name for p in path.iterdir()),
        "model_safetensors_bytes": (path / "model.safetensors").stat().st_size,
        "load_seconds_new_process": round(loaded["load_seconds"], 2),
        "max_abs_embedding_diff_loaded_vs_in_memory": float((loaded["emb"] - emb_q).abs().max()),
        "sink_positions_equal": loaded["sinks"] == q.vtquant.sink_positions(),
        "cosine_quantized_vs_fp": [round(float(c), 5) for c in cos(emb_q, emb_fp)],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
