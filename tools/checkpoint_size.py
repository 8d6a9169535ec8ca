#!/usr/bin/env python
"""Checkpoint size of SmolLM2-135M quantized with INSERTQUANT W8A8 vs its fp32 / bf16 safetensors.

For ``insertquant`` and ``insertquant+rotate`` the quantized model is saved three ways
(``vtquant.save(..., compact_embeddings=None | "bf16" | "int8")``) and loaded back; the
script reports each ``model.safetensors`` size against the full-precision model's fp32 and
bf16 safetensors files (``safetensors.torch.save_model``, tied embeddings stored once), and
what the compact storage changes in the loaded model: perplexity on Austen chunks
(:func:`vtquant.eval.perplexity`), max / mean |logit difference| and top-1 agreement against
the in-memory quantized model.

    .venv/bin/python tools/checkpoint_size.py --eval-chunks 4 --out runs/checkpoint_size.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="insertquant,insertquant+rotate")
    p.add_argument("--eval-chunks", type=int, default=4, help="Austen chunks of --seq-len tokens (default: 4)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="write the results as json here")
    args = p.parse_args(argv)

    import vtquant
    from safetensors.torch import save_model
    from vtquant.data import load_text, sample_windows
    from vtquant.eval.perplexity import make_chunks, perplexity
    from vtquant.models import load_causal_lm, set_threads

    set_threads(args.threads)
    model, tok, name = load_causal_lm(quiet=True)
    cal_ids = torch.tensor(tok(load_text("shakespeare", quiet=True))["input_ids"])
    batches = list(torch.split(sample_windows(cal_ids, 512, 8, 0), 2))
    ev_ids = torch.tensor(tok(load_text("austen-lady-susan", quiet=True))["input_ids"])
    chunks = make_chunks(ev_ids, args.seq_len, args.eval_chunks)

    work = Path(tempfile.mkdtemp(prefix="vtq-ckpt-"))
    save_model(model, str(work / "fp32.safetensors"))
    save_model(copy.deepcopy(model).to(torch.bfloat16), str(work / "bf16.safetensors"))
    fp32 = os.path.getsize(work / "fp32.safetensors")
    bf16 = os.path.getsize(work / "bf16.safetensors")
    result: dict = {"model": name, "fp32_bytes": fp32, "bf16_bytes": bf16, "eval": {
        "text": "austen-lady-susan", "chunks": int(chunks.shape[0]), "seq_len": args.seq_len},
        "calibration": "shakespeare, 8 windows x 512 tokens (seed 0), batches of 2", "rows": []}
    print(f"{name}: fp32 safetensors {fp32 / 1e6:.1f} MB, bf16 {bf16 / 1e6:.1f} MB")
    with torch.no_grad():
        result["fp_ppl"] = perplexity(model, chunks, batch_size=2, quiet=True)

    for method in args.methods.split(","):
        q = copy.deepcopy(model)
        start = time.time()
        vtquant.quantize_(q, vtquant.method_recipe(method, vtquant.Recipe()), batches, quiet=True)
        quant_s = time.time() - start
        with torch.no_grad():
            ref_logits = [q(input_ids=chunks[i:i + 2], use_cache=False).logits for i in range(0, len(chunks), 2)]
            ref_ppl = perplexity(q, chunks, batch_size=2, quiet=True)
        for fmt in (None, "bf16", "int8"):
            path = vtquant.save(q, work / f"{method}-{fmt}", compact_embeddings=fmt)
            size = os.path.getsize(path / "model.safetensors")
            loaded = vtquant.load(path)
            with torch.no_grad():
                diffs, agree, total = [], 0, 0
                for i, ref in zip(range(0, len(chunks), 2), ref_logits):
                    got = loaded(input_ids=chunks[i:i + 2], use_cache=False).logits
                    diffs.append((got - ref).abs().flatten())
                    agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
                    total += ref.shape[0] * ref.shape[1]
                ppl = perplexity(loaded, chunks, batch_size=2, quiet=True)
            d = torch.cat(diffs)
            row = {"method": method, "tables": fmt or "fp32", "bytes": size, "x_fp32": size / fp32,
                   "x_bf16": size / bf16, "ppl_loaded": ppl, "ppl_in_memory": ref_ppl,
                   "max_abs_logit_diff": float(d.max()), "mean_abs_logit_diff": float(d.mean()),
                   "top1_agreement": agree / total, "quantize_s": round(quant_s, 1)}
            result["rows"].append(row)
            print(f"{method:20s} tables={row['tables']:5s} {size / 1e6:7.1f} MB  {row['x_fp32']:.3f}x fp32  "
                  f"{row['x_bf16']:.3f}x bf16  ppl {ref_ppl:.3f} -> {ppl:.3f}  max|dlogit| {row['max_abs_logit_diff']:.3g}"
                  f"  mean {row['mean_abs_logit_diff']:.3g}  top1 {100 * row['top1_agreement']:.2f} %", flush=True)
            del loaded
        del q
    print(f"fp32 model perplexity: {result['fp_ppl']:.3f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
