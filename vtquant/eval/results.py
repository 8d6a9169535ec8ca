"""Results rows, tables and the ``--results-file`` JSON (timm's validate.py habit).

Every evaluation produces :class:`Row` objects; ``write_results`` writes
``{"rows": [...]}`` atomically; ``format_table`` prints a markdown table.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from ..fileio import atomic_output, atomic_write_text


@dataclass(kw_only=True)
class Row:
    """One measured number: which model and quantization setting, which metric, its value.

    Fields are keyword-only (``Row(model=..., method=..., metric=..., value=...)``): a row names
    what it holds.  ``extra`` holds per-command fields (``kv_bits``, ``calib_seconds``, ``backend``...),
    flattened into the JSON row.
    """

    model: str
    method: str
    w_bits: Optional[int]
    a_bits: Optional[int]
    act_granularity: Optional[str]
    static: Optional[bool]
    metric: str
    value: float
    seconds: float
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        data = asdict(self)
        extra = data.pop("extra")
        data.update(extra)
        return data


def row_for(recipe_or_none, model: str, metric: str, value: float, seconds: float, **extra) -> Row:
    """A row describing ``recipe`` (``None`` = full precision)."""
    r = recipe_or_none
    if r is None or r.method == "fp":
        return Row(model=model, method="fp", w_bits=None, a_bits=None, act_granularity=None, static=None,
                   metric=metric, value=value, seconds=seconds, extra=dict(extra))
    act = r.activations
    extra = dict(extra)
    if r.weights is not None:
        w = r.weights.resolved()
        extra.setdefault("w_algorithm", w.algorithm + (f"-g{w.group_size}" if w.granularity == "per-group" else "")
                         + ("+clip" if w.clip_search else ""))
    if getattr(r, "kv_cache", None) is not None:
        extra.setdefault("kv_bits", r.kv_cache.bits)
    return Row(model=model, method=r.display_method, w_bits=r.weights.bits if r.weights else None,
               a_bits=act.bits if act else None, act_granularity=act.granularity if act else None,
               static=act.static if act else None, metric=metric, value=value, seconds=seconds, extra=extra)


def setting_label(row: Row) -> str:
    """``W4A8KV8``-style label of a row (``fp`` for full precision)."""
    if row.w_bits is None and row.a_bits is None:
        return "fp"
    kv = row.extra.get("kv_bits")
    return f"W{row.w_bits or 'fp'}A{row.a_bits or 'fp'}" + (f"KV{kv}" if kv is not None else "")


def write_results(path: str, rows: Iterable[Row], **meta) -> None:
    """Write ``{"rows": [...], ...meta}`` to ``path`` atomically."""
    data = {"rows": [r.to_dict() for r in rows]}
    data.update(meta)
    atomic_write_text(Path(path), json.dumps(data, indent=1) + "\n")


def format_table(rows: Iterable[Row], reference: Optional[float] = None) -> str:
    """Markdown table; with ``reference`` (the fp value) a ratio column is added."""
    rows = list(rows)
    head = "| method | W | A | act | static | metric | value |" + (" x fp |" if reference else "") + " seconds |"
    sep = "|---" * (9 if reference else 8) + "|"
    lines = [head, sep]
    for r in rows:
        w = r.w_bits if r.w_bits is not None else "fp"
        a = r.a_bits if r.a_bits is not None else "fp"
        gran = r.act_granularity or "-"
        static = "-" if r.static is None else ("yes" if r.static else "no")
        ratio = f" {r.value / reference:.3f} |" if reference else ""
        lines.append(f"| {r.method} | {w} | {a} | {gran} | {static} | {r.metric} | {r.value:.3f} |{ratio} {r.seconds:.1f} |")
    return "\n".join(lines)


def format_compare_table(rows: Iterable[Row], reference: Optional[float] = None) -> str:
    """The ``vtquant compare`` table: value, ratio to fp, calibration / eval seconds, peak RSS per method."""
    lines = ["| method | W | A | KV | weights | act | static | perplexity | x fp | R | calibrate s | eval s | "
             "peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        w = r.w_bits if r.w_bits is not None else "fp"
        a = r.a_bits if r.a_bits is not None else "fp"
        kv = r.extra.get("kv_bits", "fp")
        static = "-" if r.static is None else ("yes" if r.static else "no")
        ratio = f"{r.value / reference:.3f}" if reference else "-"
        cal, ev, rss, rec = (r.extra.get(k) for k in ("calib_seconds", "eval_seconds", "peak_rss_mb",
                                                       "structure_recall"))
        lines.append(f"| {r.method} | {w} | {a} | {kv} | {r.extra.get('w_algorithm', '-')} | {r.act_granularity or '-'} | "
                     f"{static} | {r.value:.3f} | {ratio} | {'-' if rec is None else f'{rec:.3f}'} | "
                     f"{'-' if cal is None else f'{cal:.1f}'} | {'-' if ev is None else f'{ev:.1f}'} | "
                     f"{'-' if rss is None else f'{rss:.0f}'} |")
    return "\n".join(lines)


def plot_compare(rows: Iterable[Row], path: str, title: str = "") -> None:
    """Bar chart of perplexity per method, one bar per bit setting (log scale), written atomically (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(rows)
    fp = next((r.value for r in rows if r.method == "fp"), None)
    quant = [r for r in rows if r.method != "fp"]
    methods = list(dict.fromkeys(r.method for r in quant))
    settings = list(dict.fromkeys(setting_label(r) for r in quant))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(methods) * max(1, len(settings)) ** 0.5 + 2), 4.2))
    width = 0.8 / max(1, len(settings))
    for si, setting in enumerate(settings):
        xs, ys = [], []
        for mi, method in enumerate(methods):
            hit = next((r for r in quant if r.method == method and setting_label(r) == setting), None)
            if hit is not None:
                xs.append(mi + (si - (len(settings) - 1) / 2) * width)
                ys.append(hit.value)
        bars = ax.bar(xs, ys, width=width, label=setting)
        for bar, y in zip(bars, ys):
            ax.annotate(f"{y:.1f}" if y < 1000 else f"{y:.3g}", (bar.get_x() + bar.get_width() / 2, y),
                        ha="center", va="bottom", fontsize=7)
    if fp is not None:
        ax.axhline(fp, color="black", linestyle="--", linewidth=1, label=f"fp {fp:.2f}")
    ax.set_yscale("log")
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels(methods, rotation=20, ha="right")
    ax.set_ylabel("perplexity (log scale, lower is better)")
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    target = Path(path)
    try:
        with atomic_output(target) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)
