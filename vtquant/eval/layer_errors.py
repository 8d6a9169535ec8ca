"""Per-layer error analysis: which part of a quantization recipe costs what, layer by layer.

For a recipe, :func:`layer_error_breakdown` quantizes copies of the full-precision model with
only one part of the recipe switched on at a time (weights only, activations only, the key /
value cache only) and with all of it, runs the same evaluation chunks through each, and
measures after every block the relative error of the residual stream against the
full-precision model, ``||h_q - h_fp|| / ||h_fp||`` over the semantic tokens (a rotated model's
residual stream ``h Q`` is rotated back first) (the sink tokens'
residual is orders of magnitude larger and would hide everything else), plus the perplexity.
This is the analysis ``vtquant compare`` points to when a target is missed: it says whether
the weights, the activations or the cache carry the error, and where in depth it grows.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Iterable, Optional

import torch

from ..config import Recipe


def recipe_parts(recipe: Recipe) -> list[tuple[str, Recipe]]:
    """``[(label, recipe)]``: weights only, activations only, cache only (where set), and all."""
    parts = []
    if recipe.weights is not None:
        parts.append(("weights only", dataclasses.replace(copy.deepcopy(recipe), activations=None, kv_cache=None)))
    if recipe.activations is not None:
        parts.append(("activations only", dataclasses.replace(copy.deepcopy(recipe), weights=None, kv_cache=None)))
    if recipe.kv_cache is not None:
        parts.append(("kv cache only", dataclasses.replace(copy.deepcopy(recipe), weights=None, activations=None)))
    parts.append(("all", copy.deepcopy(recipe)))
    return parts


@torch.no_grad()
def block_outputs(model: torch.nn.Module, adapter: Any, chunks: torch.Tensor) -> list[torch.Tensor]:
    """Residual stream after every block, ``[L][N, T, C]`` (float32, cpu), for ``chunks`` ``[N, T]``."""
    blocks = adapter.blocks()
    outs: list[list] = [[] for _ in blocks]
    handles = [b.register_forward_hook(lambda m, i, o, li=li: outs[li].append(adapter.block_output(o).float().cpu()))
               for li, b in enumerate(blocks)]
    try:
        for row in chunks:
            adapter.forward(row.unsqueeze(0))
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(o) for o in outs]


def relative_errors(h_q: list, h_fp: list, keep: torch.Tensor) -> list[float]:
    """Per layer, ``||h_q - h_fp|| / ||h_fp||`` over the tokens where ``keep`` ``[N, T]`` is True."""
    out = []
    for a, b in zip(h_q, h_fp):
        d, r = (a - b)[keep], b[keep]
        out.append(float(d.norm() / r.norm().clamp_min(1e-12)))
    return out


def layer_error_breakdown(fp_model: torch.nn.Module, recipe: Recipe, calib_batches: list, chunks: torch.Tensor,
                          keep: Optional[torch.Tensor] = None, quiet: bool = True,
                          log: Callable[[str], None] = print) -> dict:
    """Quantize a copy per :func:`recipe_parts` and measure per-layer errors and perplexity.

    Args:
        fp_model: the full-precision model (not modified).
        recipe: the recipe to break down.
        calib_batches: calibration batches (as for :func:`vtquant.quantize_`).
        chunks: evaluation token chunks ``[N, T]``.
        keep: tokens counted in the errors (default: every token but the first of each chunk,
            the causal LM's sink).

    Returns:
        ``{"layers": L, "parts": {label: {"errors": [L floats], "perplexity": float}}, "fp_perplexity"}``.
    """
    from .. import api
    from ..adapters import get_adapter
    from ..analyze import residual_rotation
    from .perplexity import perplexity

    if keep is None:
        keep = torch.ones(chunks.shape, dtype=torch.bool)
        keep[:, 0] = False
    h_fp = block_outputs(fp_model, get_adapter(fp_model), chunks)
    result = {"layers": len(h_fp), "parts": {}, "fp_perplexity": perplexity(fp_model, chunks, quiet=True)}
    for label, part in recipe_parts(recipe):
        model = copy.deepcopy(fp_model)
        api.quantize_(model, part, calib_batches, quiet=quiet)
        h_q = block_outputs(model, get_adapter(model), chunks)
        rot = residual_rotation(part, h_q[0].shape[-1], model)
        if rot is not None:  # a rotated model's residual stream is h @ Q: compare in the model's own basis
            h_q = [h @ rot.T for h in h_q]
        errs = relative_errors(h_q, h_fp, keep)
        ppl = perplexity(model, chunks, quiet=True)
        result["parts"][label] = {"errors": errs, "perplexity": ppl}
        log(f"{label:<18} perplexity {ppl:9.3f}; relative residual error, last layer {errs[-1]:.4f}")
        del model
    return result


def format_breakdown(result: dict, every: int = 3) -> str:
    """Markdown table: one row per part, columns every ``every`` layers (and the last), then perplexity."""
    layers = list(range(0, result["layers"], every))
    if layers[-1] != result["layers"] - 1:
        layers.append(result["layers"] - 1)
    head = "| part | " + " | ".join(f"L{li}" for li in layers) + " | perplexity |"
    lines = [head, "|---" * (len(layers) + 2) + "|",
             "| fp | " + " | ".join("0" for _ in layers) + f" | {result['fp_perplexity']:.3f} |"]
    for label, part in result["parts"].items():
        lines.append(f"| {label} | " + " | ".join(f"{part['errors'][li]:.4f}" for li in layers)
                     + f" | {part['perplexity']:.3f} |")
    return "\n".join(lines)


def parts_summary(result: dict) -> Iterable[str]:
    """One line per part: the share of the final-layer error it explains on its own."""
    total = result["parts"].get("all", {}).get("errors", [None])[-1]
    for label, part in result["parts"].items():
        if label != "all" and total:
            yield f"{label}: final-layer error {part['errors'][-1]:.4f} ({100 * part['errors'][-1] / total:.0f} % of all)"
