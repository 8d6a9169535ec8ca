#!/usr/bin/env python
"""Per vision-language family, on a tiny random config with sinks implanted in both towers: the
BENCHMARKS.md VLM table.

For each family (LLaVA, Idefics3, SmolVLM, Qwen2-VL, Qwen2.5-VL): whether detection finds exactly
the implanted sinks in each tower on new image + text batches; the language model's calibration
sinks on image tokens and on text tokens; clamp-and-insert with quantization off against full
precision; W8A8 relative logit error (over every token of 2 new batches of 4 prompts) of
naive-static, dynamic-token, insertquant and insertquant+rotate (the language model rotated, the
vision tower too where its adapter describes a rotation: Idefics3 / SmolVLM, and LLaVA, whose
rotation folds into the projector's first Linear; refused for Qwen's ViT); the equivalence-check error of each rotation.  Thin over the
library: the models come from ``tests/vlmmodels.py`` (the implanted mechanism of the test suite),
everything else is ``vtquant.quantize_vlm_``.

Example: ``OMP_NUM_THREADS=1 python tools/vlm_table.py --results-file runs/vlm.json``
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

import vtquant  # noqa: E402
from vtquant.config import Recipe, SinkConfig, method_recipe  # noqa: E402
from vtquant.errors import VtquantError  # noqa: E402
import visionmodels as vm  # noqa: E402
import vlmmodels as vl  # noqa: E402

FAMILIES = {
    "LLaVA": (vl.tiny_llava, lambda m, p, s: vl.llava_batch(p, seed=s), True),
    "Idefics3": (lambda: vl.tiny_idefics3(family="Idefics3"), vl.idefics3_batch, True),
    "SmolVLM": (lambda: vl.tiny_idefics3(family="SmolVLM"), vl.idefics3_batch, True),
    "Qwen2-VL": (vl.tiny_qwen2vl, lambda m, p, s: vl.qwen2vl_batch(p, seed=s), False),
    "Qwen2.5-VL": (vl.tiny_qwen25vl, lambda m, p, s: vl.qwen2vl_batch(p, seed=s), False),
}
METHODS = ("naive-static", "dynamic-token", "insertquant", "insertquant+rotate")


def _recipe(**kw) -> Recipe:
    return Recipe(sinks=SinkConfig(known_sinks=["cls", "first_token"]), ignore=[], **kw)


def _rel(fp, model, batches) -> float:
    num = den = 0.0
    with torch.no_grad():
        for b in batches:
            a, q = fp(**vl.vlm_inputs(b)).logits, model(**vl.vlm_inputs(b)).logits
            num += float((a - q).pow(2).sum())
            den += float(a.pow(2).sum())
    return (num / den) ** 0.5


def family_row(name: str) -> dict:
    build, batch, vision_rotates = FAMILIES[name]
    t0 = time.time()
    fp = build()
    calib = [batch(fp, vm.random_painted(4, s), s) for s in range(3)]
    evals = [batch(fp, vm.random_painted(4, s), s) for s in (40, 41)]
    row: dict = {"family": name, "model_class": type(fp).__name__}

    q = copy.deepcopy(fp)
    report = vtquant.quantize_vlm_(q, _recipe(), calib, quiet=True)
    exact = {"vision": True, "language": True}
    for b in evals:
        with torch.no_grad():
            q(**vl.vlm_inputs(b))
        exact["vision"] &= q.vtquant.towers["vision"].sink_positions() == b["vision_expected"]
        exact["language"] &= q.vtquant.towers["language"].sink_positions() == b["expected"]
    row["detection_exact"] = exact
    row["sinks"] = report.sinks
    row["insertquant"] = _rel(fp, q, evals)

    off = copy.deepcopy(fp)
    vtquant.quantize_vlm_(off, _recipe(weights=None, activations=None), calib, quiet=True)
    row["clamp_insert_quant_off"] = _rel(fp, off, evals)

    for method in METHODS:
        if method == "insertquant":
            continue
        rec = method_recipe(method, _recipe())
        if method.endswith("+rotate") and not vision_rotates:
            rec.towers = {"vision": method_recipe("insertquant", _recipe())}
        m = copy.deepcopy(fp)
        try:
            rep = vtquant.quantize_vlm_(m, rec, calib, quiet=True)
        except VtquantError as err:
            row[method] = f"refused: {err}"
            continue
        row[method] = _rel(fp, m, evals)
        if method.endswith("+rotate"):
            row["rotation_equivalence"] = {t: r.equivalence["rotation"]["error"]
                                           for t, r in rep.towers.items() if "rotation" in r.equivalence}
    row["seconds"] = round(time.time() - t0, 1)
    return row


def markdown(rows: list) -> str:
    head = ("| family | detection exact (vision / language) | LM sinks: image / text tokens | clamp+insert, quant off "
            "| naive-static | dynamic-token | insertquant | insertquant+rotate | rotation equivalence |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        d, s = r["detection_exact"], r["sinks"]["language"]
        eq = ", ".join(f"{t} {e:.1e}" for t, e in r.get("rotation_equivalence", {}).items())
        fmt = (lambda v: f"{v:.4f}" if isinstance(v, float) else v)
        lines.append(f"| {r['family']} | {d['vision']} / {d['language']} | {s['image_tokens']} / {s['text_tokens']} "
                     f"| {r['clamp_insert_quant_off']:.4f} | {fmt(r['naive-static'])} | {fmt(r['dynamic-token'])} "
                     f"| {fmt(r['insertquant'])} | {fmt(r['insertquant+rotate'])} | {eq} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results-file", help="write the rows as JSON here")
    parser.add_argument("--families", nargs="*", default=list(FAMILIES), choices=list(FAMILIES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [family_row(name) for name in args.families]
    print(markdown(rows))
    if args.results_file:
        from vtquant.fileio import atomic_write_text

        Path(args.results_file).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.results_file), json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
