#!/usr/bin/env python
"""Per decoder family, on a tiny random config with the implanted sink: the BENCHMARKS.md family table.

For each family (Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma-2, Gemma-3 text, Phi-3, OLMo-2):
the layout read from the modules; whether detection finds exactly the implanted sink tokens on
new batches; clamp-and-insert with quantization off against full precision (the equivalence
checker's measure: largest per-token relative error of the logits); W8A8 relative logit error
of naive-static, insertquant, insertquant+rotate and smoothquant; and the equivalence-check
error of each transform (or why it was refused).  Thin over the library: the models come from
``tests/sinkmodels.py`` (the implanted mechanism of the test suite), everything else is
``vtquant.quantize_`` and :mod:`vtquant.core.verify`.

Example: ``python tools/family_table.py --results-file runs/families.json``
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

import vtquant  # noqa: E402
from vtquant.adapters import get_adapter  # noqa: E402
from vtquant.config import Recipe, RotationConfig, SinkConfig, method_recipe  # noqa: E402
from vtquant.core import verify  # noqa: E402
from vtquant.errors import VtquantError  # noqa: E402
from sinkmodels import FAMILIES, SINK_ID, implanted_decoder, rel_logit_error, token_batches  # noqa: E402

W8A8 = ("naive-static", "insertquant", "insertquant+rotate", "smoothquant")


def _sinks(ids: torch.Tensor) -> list:
    return [(row == SINK_ID).nonzero().flatten().tolist() for row in ids]


def family_row(arch: str, norm_noise: float) -> dict:
    """Every number of one family's row (see the module docstring)."""
    model = implanted_decoder(arch, norm_noise=norm_noise)
    adapter = get_adapter(model)
    row: dict = {"family": arch, "layout": adapter.layout.kind, "layout_detail": adapter.layout.describe()}
    calib = token_batches(sink_positions=((0,), (0, 5)))
    evals = token_batches(n=2, seed=13)

    # clamp-and-insert with quantization off, calibrated on first-token sinks (as real causal LMs)
    batch = token_batches(n=1, seed=7)[0]
    reference = verify.snapshot(adapter, batch)
    q = copy.deepcopy(model)
    vtquant.quantize_(q, Recipe(method="insertquant", weights=None, activations=None,
                                sinks=SinkConfig(known_sinks=[])), token_batches(), quiet=True)
    result = verify.compare(q.vtquant.adapter, reference, batch, "clamp-and-insert")
    row["clamp_insert_error"] = result.error

    for method in W8A8:
        q = copy.deepcopy(model)
        try:
            report = vtquant.quantize_(q, method_recipe(method, Recipe()), calib, quiet=True)
        except VtquantError as err:
            row[method] = None
            row[f"{method}_refused"] = str(err)
            continue
        row[method] = rel_logit_error(model, q, evals)
        for transform, check in report.equivalence.items():
            row[f"equivalence_{transform}"] = check["error"]
        if method == "insertquant":
            ids = token_batches(n=2, batch=3, seed=8, sink_positions=((0,), (0, 11), (0, 4, 20)))
            exact = True
            for x in ids:
                with torch.no_grad():
                    q(input_ids=x)
                exact &= q.vtquant.sink_positions() == _sinks(x)
            row["detection_exact"] = exact
            row["emergence_cancellation"] = [report.emergence_layer, report.cancellation_layer]
        if method == "insertquant+rotate":
            row["rotation_note"] = next((n for n in report.notes if n.startswith("rotation: residual")), "folded")
    return row


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "refused"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if value >= 10 ** -digits else f"{value:.1e}"
    return str(value)


def markdown(rows: list) -> str:
    head = ("| family | layout | detection exact | clamp+insert, quant off | naive-static | insertquant | "
            "insertquant+rotate | smoothquant | rotation: residual | equivalence rotation | equivalence smoothing |")
    lines = [head, "|" + "|".join("---" for _ in range(11)) + "|"]
    for r in rows:
        residual = "folded" if r.get("rotation_note") == "folded" else "online (post-norms)"
        lines.append(f"| {r['family'].replace('ForCausalLM', '')} | {r['layout']} | {r.get('detection_exact')} | "
                     f"{_fmt(r['clamp_insert_error'])} | {_fmt(r['naive-static'])} | {_fmt(r['insertquant'])} | "
                     f"{_fmt(r['insertquant+rotate'])} | {_fmt(r['smoothquant'])} | {residual} | "
                     f"{_fmt(r.get('equivalence_rotation'))} | {_fmt(r.get('equivalence_smoothquant'))} |")
    return "\n".join(lines)


def main(argv: list | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--families", default=",".join(FAMILIES), help="comma-separated transformers class names")
    p.add_argument("--norm-noise", type=float, default=0.3,
                   help="perturb every norm scale and bias (so a wrong fold cannot hide behind an identity norm)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--results-file", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    rows = []
    for arch in args.families.split(","):
        start = time.time()
        rows.append(family_row(arch, args.norm_noise))
        rows[-1]["seconds"] = round(time.time() - start, 1)
    print(markdown(rows))
    for r in rows:
        if r.get("smoothquant_refused"):
            print(f"\n{r['family']} smoothquant: {r['smoothquant_refused']}")
    if args.results_file:
        Path(args.results_file).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results_file).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
