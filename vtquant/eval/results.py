"""Results rows, tables and the ``--results-file`` JSON (timm's validate.py habit).

Every evaluation produces :class:`Row` objects; ``write_results`` writes
``{"rows": [...]}`` atomically; ``format_table`` prints a markdown table.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from ..recipe import atomic_write_text


@dataclass
class Row:
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
        return Row(model, "fp", None, None, None, None, metric, value, seconds, extra)
    act = r.activations
    return Row(model, r.display_method, r.weights.bits if r.weights else None, act.bits if act else None,
               act.granularity if act else None, act.static if act else None, metric, value, seconds, extra)


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
