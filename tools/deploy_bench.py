"""Deployment numbers of issue 14 on SmolLM2-135M (or any --model): one JSON file.

1. hf layout: quantize with --recipe (default: the shipped insertquant+rotate W8A8), score the
   in-memory model, ``vtquant.save`` it (hf layout, with the tokenizer), then in a **new process**
   ``import vtquant`` + ``AutoModelForCausalLM.from_pretrained`` + ``AutoTokenizer`` and score the
   same chunks; checkpoint size against the full-precision model's fp32 / bf16 state dict.
2. compressed-tensors: naive-static W8A8 (symmetric and asymmetric activations), dynamic-token W8A8,
   smoothquant W8A8 (all quantized with ``activations.numerics: compressed-tensors``, what ``vtquant
   quantize --format compressed-tensors`` uses), W4A16 GPTQ, and for comparison naive-static with
   vtquant's own numerics (exported with ``allow_inexact``), each exported and loaded by transformers in
   a **new process that never imports vtquant**; relative logits error against vtquant's in-memory
   model on the first chunks, per-chunk NLL on all chunks, both perplexities.

Usage::

    .venv/bin/python tools/deploy_bench.py --threads 2 --out runs/deploy_bench.json
    .venv/bin/python tools/deploy_bench.py --threads 2 --parts ct --out runs/deploy_bench.json
    .venv/bin/python tools/deploy_bench.py --tiny-sizes     # file sizes of a tiny random Llama, seconds
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import vtquant  # noqa: E402
from vtquant.config import method_recipe  # noqa: E402
from vtquant.eval.perplexity import perplexity  # noqa: E402
from vtquant.llm import prepare_text  # noqa: E402
from vtquant.models import load_causal_lm, set_threads  # noqa: E402
from vtquant.recipe import load_recipe  # noqa: E402

NEW_PROCESS = """
import json, math, sys, time, torch
torch.set_num_threads(int(sys.argv[3]))
if sys.argv[4] == "vtquant":
    import vtquant
from transformers import AutoModelForCausalLM
t0 = time.time()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
load_s = time.time() - t0
chunks = torch.load(sys.argv[2])
nll, logits0 = [], []
with torch.no_grad():
    for i in range(chunks.shape[0]):  # one chunk per forward, as the in-memory side
        ids = chunks[i:i + 1]
        logits = model(input_ids=ids, use_cache=False).logits.float()
        if i < int(sys.argv[5]):
            logits0.append(logits.clone())
        nll.append(float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")))
imported = sorted({m.split(".")[0] for m in sys.modules if m.split(".")[0] in ("vtquant", "compressed_tensors")})
torch.save(logits0, sys.argv[2] + ".logits")
print(json.dumps({"ppl": math.exp(sum(nll) / chunks[:, 1:].numel()), "chunk_nll": nll, "load_seconds": round(load_s, 2),
                  "imported": imported}))
"""


def _new_process(folder: Path, chunks_file: Path, threads: int, mode: str) -> dict:
    env = dict(os.environ)
    if mode == "vtquant":
        env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    out = subprocess.run([sys.executable, "-c", NEW_PROCESS, str(folder), str(chunks_file), str(threads), mode,
                          str(LOGIT_CHUNKS)],
                         capture_output=True, text=True, env=env, cwd=tempfile.gettempdir(), check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _size(folder: Path, name: str = "model.safetensors") -> int:
    return (folder / name).stat().st_size


def _fp_sizes(model: torch.nn.Module, folder: Path) -> dict:
    from safetensors.torch import save_model

    save_model(model, str(folder / "fp32.safetensors"))
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    save_model(bf16, str(folder / "bf16.safetensors"))
    sizes = {"fp32": _size(folder, "fp32.safetensors"), "bf16": _size(folder, "bf16.safetensors")}
    for name in ("fp32.safetensors", "bf16.safetensors"):
        (folder / name).unlink()
    return sizes


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def tiny_sizes() -> list[tuple[str, int]]:
    """``model.safetensors`` sizes of a tiny random Llama (4 layers, width 256, vocabulary 512) per layout."""
    import transformers

    from vtquant.adapters.hf_decoder import tiny_config
    from vtquant.config import Recipe, WeightArgs
    from vtquant.export_ct import export_compressed_tensors
    from safetensors.torch import save_model

    torch.manual_seed(0)
    fp = transformers.LlamaForCausalLM(tiny_config(vocab_size=512, hidden_size=256, intermediate_size=1024,
                                                   num_hidden_layers=4, num_attention_heads=4,
                                                   num_key_value_heads=4)).eval()
    work = Path(tempfile.mkdtemp(prefix="vtquant-tiny-"))
    save_model(fp, str(work / "fp32.safetensors"))
    rows = [("fp32 state dict (safetensors save_model, tied embedding once)", _size(work, "fp32.safetensors"))]
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 512, (2, 64), generator=gen) for _ in range(4)]
    w4 = Recipe(weights=WeightArgs(bits=4, granularity="per-group", group_size=128))
    for label, recipe, fmt in (
            ("insertquant W8A8, hf layout", method_recipe("insertquant", Recipe()), "hf"),
            ("insertquant W8A8, vtquant layout", method_recipe("insertquant", Recipe()), "vtquant"),
            ("insertquant+rotate W8A8, hf layout (head untied)", method_recipe("insertquant+rotate", Recipe()), "hf"),
            ("insertquant W4A8 g128, hf layout (two codes per byte)", method_recipe("insertquant", w4, w_bits=4), "hf"),
            ("insertquant W4A8 g128, vtquant layout (one code per byte)", method_recipe("insertquant", w4, w_bits=4),
             "vtquant"),
            ("naive-static W8A8, compressed-tensors",
             method_recipe("naive-static", Recipe()).with_numerics("compressed-tensors"), "ct"),
            ("W4A16 g128, compressed-tensors (pack-quantized)",
             method_recipe("naive-static", w4, w_bits=4).replace(activations=None), "ct")):
        q = copy.deepcopy(fp)
        vtquant.quantize_(q, recipe, calib, quiet=True)
        out = work / str(len(rows))
        if fmt == "ct":
            export_compressed_tensors(q, out, quiet=True)
        else:
            vtquant.save(q, out, format=fmt)
        rows.append((label, _size(out)))
    for label, size in rows:
        print(f"| {label} | {size / 1e6:.3f} MB | {size / rows[0][1]:.3f} |")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="asset:smollm2-135m")
    ap.add_argument("--recipe", default=str(REPO / "recipes/hf/smollm2-135m.yaml"))
    ap.add_argument("--chunks", type=int, default=8, help="Austen chunks x 512 tokens (default: %(default)s, the demo's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=None, help="folder for the checkpoints (default: a temporary one)")
    ap.add_argument("--out", default="runs/deploy_bench.json")
    ap.add_argument("--tiny-sizes", action="store_true", help="only the file sizes of a tiny random Llama")
    ap.add_argument("--parts", default="hf,ct", help="hf and / or ct (default: %(default)s)")
    ap.add_argument("--ct-rows", default=None,
                    help="comma-separated indices of the compressed-tensors rows to run (default: all six)")
    args = ap.parse_args()
    if args.tiny_sizes:
        set_threads(1)
        tiny_sizes()
        return 0
    threads = set_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="vtquant-deploy-"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"model": args.model, "threads": threads, "recipe": args.recipe}

    fp, tok, name = load_causal_lm(args.model, quiet=True)
    recipe = load_recipe(args.recipe)
    setup = prepare_text(tok, recipe, "austen-lady-susan", 512, args.chunks, bos="none", quiet=True)
    chunks_file = work / "chunks.pt"
    torch.save(setup.eval_chunks, chunks_file)
    result["protocol"] = setup.protocol
    result["fp_sizes"] = _fp_sizes(fp, work)
    result["fp_ppl"] = perplexity(fp, setup.eval_chunks, quiet=True)

    parts = set(args.parts.split(","))
    if Path(args.out).exists():  # keep the other part's numbers
        previous = json.loads(Path(args.out).read_text())
        result.update({k: v for k, v in previous.items() if k in ("hf", "compressed_tensors")})
        if "ct" in parts and args.ct_rows is None:
            result.pop("compressed_tensors", None)  # all rows run again

    # 1. the hf layout, loaded by transformers in a new process
    if "hf" in parts:
        _hf_part(fp, tok, recipe, setup, chunks_file, threads, work, result)
    if "ct" in parts:
        only = None if args.ct_rows is None else {int(i) for i in args.ct_rows.split(",")}
        _ct_part(fp, tok, recipe, setup, chunks_file, threads, work, result, only)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


def _hf_part(fp, tok, recipe, setup, chunks_file, threads, work, result) -> None:
    q = copy.deepcopy(fp)
    t0 = time.time()
    vtquant.quantize_(q, recipe, setup.calib_batches, quiet=True)
    calib_s = time.time() - t0
    ppl_mem = perplexity(q, setup.eval_chunks, quiet=True)
    with torch.no_grad():
        logits_mem = q(input_ids=setup.eval_chunks[:1], use_cache=False).logits
    ckpt = vtquant.save(q, work / "hf-ckpt", tokenizer=tok)
    loaded = _new_process(ckpt, chunks_file, threads, "vtquant")
    logits_new = torch.load(str(chunks_file) + ".logits")[0]
    result["hf"] = {"method": recipe.display_method, "calibrate_seconds": round(calib_s, 1), "ppl_in_memory": ppl_mem,
                    "ppl_from_pretrained_new_process": loaded["ppl"], "load_seconds": loaded["load_seconds"],
                    "max_abs_logit_diff_chunk0": float((logits_new - logits_mem).abs().max()),
                    "model_safetensors_bytes": _size(ckpt),
                    "folder_bytes": sum(p.stat().st_size for p in ckpt.iterdir()),
                    "files": sorted(p.name for p in ckpt.iterdir())}
    del q


def _ct_recipes(recipe):
    """(label, recipe, numerics) of the compressed-tensors rows: the baselines the format holds, on the
    shipped recipe's calibration (rotation off: its online Hadamard has no compressed-tensors form)."""
    from vtquant.config import WeightArgs

    base = method_recipe("naive-static", recipe.replace(rotation=dataclasses.replace(recipe.rotation, enabled=False)))
    ct = "compressed-tensors"
    w4 = base.replace(weights=WeightArgs(bits=4, granularity="per-group", group_size=64, algorithm="gptq"),
                      activations=None, name="w4a16-g64-gptq")
    return [
        ("naive-static W8A8, vtquant numerics (before; exported with allow_inexact)", base, "vtquant"),
        ("naive-static W8A8 (symmetric)", base.with_numerics(ct), ct),
        ("naive-static W8A8 (asymmetric activations)",
         base.replace(activations=dataclasses.replace(base.activations, symmetric=False)).with_numerics(ct), ct),
        ("dynamic-token W8A8", method_recipe("dynamic-token", base).with_numerics(ct), ct),
        ("smoothquant W8A8", method_recipe("smoothquant", base).with_numerics(ct), ct),
        ("W4A16 g64 GPTQ", w4, "-"),
    ]


def _ct_part(fp, tok, recipe, setup, chunks_file, threads, work, result, only=None) -> None:
    """2. compressed-tensors, loaded by transformers in a new process that never imports vtquant."""
    from vtquant.export_ct import export_compressed_tensors

    result.setdefault("compressed_tensors", {})
    for i, (label, r, numerics) in enumerate(_ct_recipes(recipe)):
        if only is not None and i not in only:
            continue
        q = copy.deepcopy(fp)
        t0 = time.time()
        vtquant.quantize_(q, r, setup.calib_batches, quiet=True)
        calib_s = time.time() - t0
        nll_mem, logits_mem = _chunk_nll(q, setup.eval_chunks)
        folder = work / f"ct-{i}"
        report = export_compressed_tensors(q, folder, tokenizer=tok, quiet=True, allow_inexact=numerics == "vtquant")
        del q
        loaded = _new_process(folder, chunks_file, threads, "plain")
        logits_new = torch.load(str(chunks_file) + ".logits")
        nll_new = loaded["chunk_nll"]
        tokens = setup.eval_chunks[:, 1:].numel()
        result["compressed_tensors"][label] = {
            "recipe": r.name, "activations_numerics": numerics, "format": report.quantization_format,
            "exact": report.exact, "calibrate_seconds": round(calib_s, 1),
            "ppl_vtquant_in_memory": math.exp(sum(nll_mem) / tokens),
            "ppl_transformers_compressed_tensors": loaded["ppl"], "imported_in_new_process": loaded["imported"],
            f"max_rel_logit_error_first_{len(logits_mem)}_chunks": max(
                _rel(a, b) for a, b in zip(logits_new, logits_mem)),
            f"max_abs_logit_diff_first_{len(logits_mem)}_chunks": max(
                float((a - b).abs().max()) for a, b in zip(logits_new, logits_mem)),
            "max_abs_chunk_nll_diff_all_chunks": max(abs(a - b) for a, b in zip(nll_new, nll_mem)),
            "model_safetensors_bytes": _size(folder), "notes": report.notes}
        print(label, json.dumps(result["compressed_tensors"][label]), flush=True)
        shutil.rmtree(folder, ignore_errors=True)


LOGIT_CHUNKS = 2  # chunks whose full logits are compared (each 512 x 49152 floats)


@torch.no_grad()
def _chunk_nll(model, chunks) -> tuple[list, list]:
    """Summed next-token NLL per chunk (one chunk per forward) and the logits of the first chunks."""
    nll, logits0 = [], []
    for i in range(chunks.shape[0]):
        ids = chunks[i:i + 1]
        logits = model(input_ids=ids, use_cache=False).logits.float()
        if i < LOGIT_CHUNKS:
            logits0.append(logits.clone())
        nll.append(float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")))
    return nll, logits0


if __name__ == "__main__":
    sys.exit(main())
