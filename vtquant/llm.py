"""The LLM comparison behind ``vtquant demo`` and ``vtquant eval perplexity``.

One full-precision model is loaded once; every method quantizes a fresh copy of it
with the same calibration windows (Shakespeare by default) and is scored on the
same evaluation chunks (Austen by default: a different text, on purpose).
"""
from __future__ import annotations

import copy
import gc
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from .config import Recipe, method_recipe
from .eval.perplexity import make_chunks, perplexity, protocol
from .eval.results import Row, row_for


@dataclass
class TextSetup:
    calib_batches: list
    eval_chunks: torch.Tensor
    protocol: str
    calib_desc: str
    eval_desc: str
    seconds: float = 0.0


def prepare_text(tokenizer: Any, recipe: Recipe, eval_text: str = "austen-lady-susan",
                 seq_len: int = 512, max_chunks: Optional[int] = 16, bos: str = "none",
                 quiet: bool = False) -> TextSetup:
    """Tokenize calibration and evaluation texts into batches / chunks."""
    from .data import sample_windows, text_token_ids

    start = time.time()
    cal = recipe.calibration
    cal_ids = text_token_ids(tokenizer, cal.dataset, cal.seq_len, role="calibration text",
                             need=f"one calibration window (calibration.seq_len = {cal.seq_len})", quiet=quiet)
    windows = sample_windows(cal_ids, cal.seq_len, cal.num_samples, seed=cal.seed)
    batches = list(torch.split(windows, cal.batch_size))
    ev_ids = text_token_ids(tokenizer, eval_text, seq_len, role="evaluation text",
                            need=f"one {seq_len}-token evaluation chunk", quiet=quiet)
    chunks = make_chunks(ev_ids, seq_len, max_chunks, bos=bos, bos_id=tokenizer.bos_token_id)
    n_total = len(ev_ids) // seq_len
    return TextSetup(
        calib_batches=batches,
        eval_chunks=chunks,
        protocol=protocol(seq_len, chunks.shape[0], bos) + f" (of {n_total} available in {eval_text}, "
        f"{len(ev_ids)} tokens)",
        calib_desc=f"{cal.num_samples} random windows x {cal.seq_len} tokens of {cal.dataset} (seed {cal.seed})",
        eval_desc=eval_text,
        seconds=time.time() - start,
    )


@dataclass
class MethodResult:
    recipe: Optional[Recipe]
    ppl: float
    calib_seconds: float
    eval_seconds: float
    report: Any = None
    model: Any = field(default=None, repr=False)
    peak_rss_mb: Optional[float] = None


def reset_peak_rss() -> bool:
    """Reset the process's peak resident set (Linux ``/proc/self/clear_refs`` = 5); False if not possible."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> Optional[float]:
    """The process's peak resident set since the last reset (``VmHWM`` of ``/proc/self/status``), MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def run_methods(fp_model: torch.nn.Module, setup: TextSetup, base: Recipe, settings: list[tuple],
                model_name: str, quiet: bool = False, log: Callable[[str], None] = print,
                keep_models: bool = False) -> tuple[list[Row], list[MethodResult]]:
    """Quantize a copy of ``fp_model`` per setting and measure perplexity.

    A setting is ``(method, w_bits, a_bits[, kv_bits])`` (the method's recipe derived from ``base``
    by :func:`~vtquant.config.method_recipe`) or a whole :class:`~vtquant.config.Recipe`, run as it is
    (its weights, activations, key / value cache, rotation and sinks).

    Each row's extra fields: ``calib_seconds`` (copy + calibrate + quantize), ``eval_seconds`` and
    ``peak_rss_mb``: the peak resident memory of the whole process while that method ran (VmHWM
    after a reset through /proc/self/clear_refs; it includes the full-precision reference model
    held for all methods; ``None`` where /proc is not available).

    Returns:
        Result rows (metric ``perplexity``) and the per-method details.
    """
    from . import api

    rows, results = [], []
    from .peers import llmcompressor as llmc

    for setting in settings:
        if isinstance(setting, Recipe):
            recipe = None if setting.method == "fp" else setting
        else:
            method, w_bits, a_bits, kv_bits = (tuple(setting) + (None,))[:4]
            if method in llmc.METHODS:
                row, result = _run_llmcompressor(fp_model, setup, method, model_name, quiet, log, keep_models)
                rows.append(row)
                results.append(result)
                continue
            recipe = None if method == "fp" else method_recipe(method, base, w_bits=w_bits, a_bits=a_bits,
                                                               kv_bits=kv_bits)
        label = "fp" if recipe is None else f"{recipe.display_method} {setting_label(recipe)}"
        can_reset = reset_peak_rss()
        t0 = time.time()
        model = fp_model if recipe is None else copy.deepcopy(fp_model)
        report = None
        if recipe is not None:
            report = api.quantize_(model, recipe, setup.calib_batches, quiet=quiet)
        calib_s = time.time() - t0
        t1 = time.time()
        ppl = perplexity(model, setup.eval_chunks, quiet=quiet, desc=f"eval {label}")
        eval_s = time.time() - t1
        peak = peak_rss_mb() if can_reset else None
        extra = {}
        if report is not None and report.structure_recall is not None:
            extra["structure_recall"] = round(report.structure_recall, 4)
        rows.append(row_for(recipe, model_name, "perplexity", ppl, calib_s + eval_s,
                            calib_seconds=round(calib_s, 2), eval_seconds=round(eval_s, 2),
                            peak_rss_mb=None if peak is None else round(peak, 1), **extra))
        results.append(MethodResult(recipe, ppl, calib_s, eval_s, report, model if keep_models else None, peak))
        log(f"{label:<28} perplexity {ppl:9.3f}   (calibrate+quantize {calib_s:5.1f} s, eval {eval_s:5.1f} s)")
        if report is not None and (report.stages or report.notes) and not quiet:
            log("    " + report.summary().replace("\n", "\n    "))
        if model is not fp_model and not keep_models:
            del model
    return rows, results


def setting_label(recipe: Recipe) -> str:
    """``W4A8KV8``-style label of a recipe (``fp`` for bits it leaves in full precision)."""
    w = recipe.weights.bits if recipe.weights else "fp"
    a = recipe.activations.bits if recipe.activations else "fp"
    kv = recipe.kv_cache.bits if getattr(recipe, "kv_cache", None) is not None else None
    return f"W{w}A{a}" + (f"KV{kv}" if kv is not None else "")


def _run_llmcompressor(fp_model: torch.nn.Module, setup: TextSetup, method: str, model_name: str, quiet: bool,
                       log: Callable[[str], None], keep_models: bool) -> tuple[Row, MethodResult]:
    """One llm-compressor row (its own SmoothQuant + W8A8 recipe) on the same calibration and evaluation data."""
    from .eval.results import Row
    from .peers.llmcompressor import llmcompressor_quantize

    can_reset = reset_peak_rss()
    t0 = time.time()
    model = llmcompressor_quantize(copy.deepcopy(fp_model), setup.calib_batches, method, quiet=quiet)
    calib_s = time.time() - t0
    t1 = time.time()
    ppl = perplexity(model, setup.eval_chunks, quiet=quiet, desc=f"eval {method}")
    eval_s = time.time() - t1
    peak = peak_rss_mb() if can_reset else None
    dynamic = method.endswith("dynamic")
    row = Row(model=model_name, method=method, w_bits=8, a_bits=8,
              act_granularity="per-token" if dynamic else "per-tensor", static=not dynamic, metric="perplexity",
              value=ppl, seconds=calib_s + eval_s,
              extra={"calib_seconds": round(calib_s, 2), "eval_seconds": round(eval_s, 2),
                     "peak_rss_mb": None if peak is None else round(peak, 1),
                     "w_algorithm": "gptq" if "gptq" in method else "rtn", "tool": "llmcompressor"})
    log(f"{method + ' W8A8':<28} perplexity {ppl:9.3f}   (calibrate+quantize {calib_s:5.1f} s, eval {eval_s:5.1f} s)")
    return row, MethodResult(None, ppl, calib_s, eval_s, None, model if keep_models else None, peak)
