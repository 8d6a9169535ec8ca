"""``vtquant bench``: prefill / decode speed and peak memory of real low-bit execution.

CPU (default): SmolLM2-135M for real, one subprocess per method so each peak-memory figure
is that method's own (ratios still come from one ``vtquant bench`` run):

* ``fp``: fp32; ``bf16``: the model cast to bfloat16;
* ``dynamic-token``: the peer, ``torch.ao`` dynamic int8 quantization of the decoder Linears
  (fbgemm; its activation scale is computed on every call);
* ``insertquant`` / ``insertquant+rotate``: vtquant per-tensor static W8A8 with sink insertion
  (the second also rotated: online Hadamard on the MLP second-linear input), converted to real
  int8 (``vtquant.kernels.convert_(model, "cpu-int8")``).

Prefill: one forward over ``prompt_len`` tokens (batch 1) keeping only the last logits,
median of ``repeats`` timed runs after a warm-up.  Decode: ``decode_tokens`` single-token
steps with the KV cache after a 64-token prompt.  Peak memory: the process' peak resident
set during the timed runs (Linux ``VmHWM``, reset before timing).

GPU (``--device cuda``): random-weight stacks with LLaMA-2-7B decoder-layer shapes and
ViT-B/16, ViT-L/14 shapes; see :func:`gpu_layer_bench`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Optional

import torch

from ..llm import peak_rss_mb as _peak_rss_mb, reset_peak_rss as _reset_peak_rss

CPU_METHODS = ("fp", "bf16", "dynamic-token", "insertquant", "insertquant+rotate")


@torch.no_grad()
def _time_prefill(model: Any, ids: torch.Tensor, repeats: int) -> float:
    model(input_ids=ids, use_cache=False, logits_to_keep=1)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def _time_decode(model: Any, prompt: torch.Tensor, steps: int) -> float:
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    token = out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=token, cache=cache, use_cache=True)
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        token = out.logits[:, -1:].argmax(-1)
    return (time.perf_counter() - start) / steps


def _worker(args: argparse.Namespace) -> dict:
    """Run one method in this process and return its measurements."""
    from ..config import Recipe, method_recipe
    from ..data import load_text, sample_windows
    from ..eval.perplexity import make_chunks, perplexity
    from ..models import load_causal_lm, set_threads

    set_threads(args.threads)
    model, tok, name = load_causal_lm(args.model, args.model_file, quiet=True)
    text_ids = torch.tensor(tok(load_text("austen-lady-susan", quiet=True))["input_ids"])
    ids = text_ids[: args.prompt_len].unsqueeze(0)
    extra: dict = {}
    method = args.method
    if method == "bf16":
        model = model.to(torch.bfloat16)
    elif method == "dynamic-token":
        import warnings

        from ..adapters import get_adapter

        warnings.filterwarnings("ignore")
        adapter = get_adapter(model)
        for block in adapter.blocks():
            for lin_name in adapter.block_linears(block):
                parent_name, _, child = lin_name.rpartition(".")
                parent = block.get_submodule(parent_name)
                q = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(getattr(parent, child)),
                                                           {torch.nn.Linear}, dtype=torch.qint8)[0]
                setattr(parent, child, q)
    elif method in ("insertquant", "insertquant+rotate"):
        import vtquant
        from ..kernels import convert_

        base = Recipe()
        recipe = method_recipe(method, base)
        cal_ids = torch.tensor(tok(load_text("shakespeare", quiet=True)[:2_000_000])["input_ids"])
        calib = list(torch.split(sample_windows(cal_ids, 512, base.calibration.num_samples, 0), 4))
        vtquant.quantize_(model, recipe, calib, quiet=True)
        chunks = make_chunks(text_ids, 512, args.ppl_chunks)
        if args.ppl_chunks:
            extra["perplexity_fake"] = perplexity(model, chunks, quiet=True)
        convert_(model, "cpu-int8")
        if args.ppl_chunks:
            extra["perplexity_real"] = perplexity(model, chunks, quiet=True)
        extra["recipe"] = recipe.display_method
    elif method != "fp":
        raise ValueError(f"unknown bench method {method!r}; choose from {CPU_METHODS}")
    _reset_peak_rss()
    prefill_s = _time_prefill(model, ids, args.repeats)
    decode_s = _time_decode(model, text_ids[:64].unsqueeze(0), args.decode_tokens)
    return {"method": method, "model": name, "prefill_seconds": prefill_s,
            "prefill_tokens_per_s": args.prompt_len / prefill_s, "decode_tokens_per_s": 1.0 / decode_s,
            "peak_mem_mb": _peak_rss_mb(), "threads": torch.get_num_threads(), **extra}


def cpu_bench(args: argparse.Namespace, log=print) -> list[dict]:
    """Run every method in its own subprocess; returns their measurement dicts."""
    results = []
    for method in args.methods.split(","):
        cmd = [sys.executable, "-m", "vtquant.kernels.bench", "--method", method, "--model", args.model,
               "--prompt-len", str(args.prompt_len), "--decode-tokens", str(args.decode_tokens),
               "--repeats", str(args.repeats), "--ppl-chunks", str(args.ppl_chunks)]
        if args.model_file:
            cmd += ["--model-file", args.model_file]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        log(f"bench {method} ...")
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if proc.returncode != 0:
            raise RuntimeError(f"bench worker for {method} failed:\n{proc.stderr[-3000:]}")
        data = json.loads(proc.stdout.strip().splitlines()[-1])
        log(f"  prefill {data['prefill_tokens_per_s']:.0f} tok/s, decode {data['decode_tokens_per_s']:.1f} tok/s, "
            f"peak {data['peak_mem_mb']:.0f} MB" + (f", ppl fake {data['perplexity_fake']:.3f} real "
                                                     f"{data['perplexity_real']:.3f}" if "perplexity_real" in data else ""))
        results.append(data)
    return results


def add_worker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="asset:smollm2-135m")
    p.add_argument("--model-file", default=None)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--ppl-chunks", type=int, default=4, help="Austen chunks for the fake vs real perplexity check")
    p.add_argument("--threads", type=int, default=None)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="one vtquant bench worker (use `vtquant bench`)")
    parser.add_argument("--method", required=True, choices=CPU_METHODS)
    add_worker_args(parser)
    print(json.dumps(_worker(parser.parse_args())))
