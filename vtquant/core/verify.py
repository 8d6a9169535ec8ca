"""Function-preserving transforms check themselves (issue 11 item 1), model-family free.

Rotation folding, SmoothQuant's smoothing and clamp-and-insert with quantization off are
equivalences in exact arithmetic.  A layout described wrongly (a norm left out, readers
misnamed, a post-norm taken for a pre-norm) turns them into silent function changes: the real
case was a Gemma-family model registered on the LLaMA description, perplexity 1e10 and worse.
So, at quantize time, before the transform the full-precision model runs one calibration batch
(:func:`snapshot`: the final output and every block's output, through the adapter's
``blocks()`` / ``block_output``); after it (weights still full precision) the same batch runs
again and :func:`check_equivalence` compares, raising :class:`EquivalenceError` beyond a
tolerance.

What is compared (and why):

* every tensor is taken as rows of its last dimension (tokens x features, whatever the token
  layout), and the error of a row is its relative L2 error ``|b - a| / |a|``, the denominator
  floored at 10 % of the median row norm (rows with a tiny norm do not blow up).  The measure is
  the **largest row error** in float32/64: a sink token's norm (thousands of times the others)
  would hide an error on every other token in one global relative L2, and a fold that is wrong
  only where a massive channel sits would be averaged away by a mean.  In float16 / bfloat16 it
  is the 95th percentile (:data:`QUANTILE`): there a sink token's residual after the layer that
  cancels its spike is a difference of two huge numbers, and a rotation spreads the spike over
  every channel, so that row's rounding error legitimately reaches 10-30 % (measured on the
  implanted tiny models); a wrong fold moves nearly every row by O(1) and still fails;
* the final output (logits, features) is basis-independent and compared as it is;
* block outputs live in the residual stream, which a folded residual rotation ``Q`` rotates
  (h' = h Q): the caller passes ``basis`` (``h' -> h' Q^T``, :func:`unrotate`) so that the first
  block that differs can be named; transforms that leave the residual stream alone (smoothing,
  online and per-head rotations, clamp-and-insert) pass nothing;
* online input rotations are absorbed by their Linears' weights at transform time but applied to
  the inputs only once the Linears are wrapped; until then the caller passes them
  (``input_rotations``) and the check applies them with temporary pre-forward hooks;
* to keep memory small on real models, at most ``max_rows`` rows per tensor are kept (evenly
  spaced, the first row - a causal LM's first token, usually a sink - always among them).

Tolerances (:data:`TOLERANCE`): the fold itself runs in float64 and is rounded once to the
model's dtype, so float32 models stay near 1e-5; a wrong fold is O(1).  1e-3 for float32/64,
3e-2 for float16, 1e-1 for bfloat16 (one rounding of every weight to 8 mantissa bits, compounded
over the layers).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from ..config import ConfigError
from .hooks import HookManager
from .rotation import hadamard_apply

if TYPE_CHECKING:
    from ..adapters.base import ModelAdapter

TOLERANCE = {torch.float64: 1e-3, torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 1e-1}
"""Per-row relative error accepted, by the dtype of the model's block outputs."""

QUANTILE = {torch.float16: 0.95, torch.bfloat16: 0.95}
"""Which per-row error is compared with the tolerance (1.0, the largest, unless listed here)."""

MAX_ROWS = 256


class EquivalenceError(ConfigError):
    """A transform that must preserve the model's function does not (the model is given back as it was).

    Attributes:
        transform: what was applied (``rotation``, ``smoothquant smoothing``, ...).
        result: the :class:`EquivalenceResult` measured.
    """

    def __init__(self, message: str, transform: str, result: "EquivalenceResult") -> None:
        super().__init__(message)
        self.transform = transform
        self.result = result


@dataclass
class Snapshot:
    """Sampled rows of a model's outputs on one batch (float32, CPU)."""

    output: Optional[torch.Tensor]
    blocks: list
    dtype: torch.dtype


@dataclass
class EquivalenceResult:
    """Measured equivalence of a transformed model with its reference on one batch.

    Attributes:
        transform: the transform's name.
        output_error: largest per-row relative error of the final output (``None``: no tensor output).
        block_errors: the same per block output.
        tolerance: the threshold applied.
        dtype: the model's dtype (name).
        quantile: which per-row error the errors are (1.0: the largest).
    """

    transform: str
    output_error: Optional[float]
    block_errors: list = field(default_factory=list)
    tolerance: float = 1e-3
    dtype: str = "float32"
    quantile: float = 1.0

    @property
    def measure(self) -> str:
        return ("largest per-token relative error" if self.quantile >= 1.0 else
                f"{round(100 * self.quantile)}th percentile of the per-token relative errors")

    @property
    def first_bad_block(self) -> Optional[int]:
        return next((i for i, e in enumerate(self.block_errors) if not e <= self.tolerance), None)

    @property
    def worst_block(self) -> Optional[int]:
        if not self.block_errors:
            return None
        return max(range(len(self.block_errors)), key=lambda i: _sortable(self.block_errors[i]))

    @property
    def error(self) -> float:
        """The largest error measured (final output and blocks)."""
        values = [e for e in [self.output_error, *self.block_errors] if e is not None]
        return max(values, key=_sortable) if values else 0.0

    @property
    def ok(self) -> bool:
        return self.error <= self.tolerance  # NaN fails

    def to_dict(self) -> dict:
        return {"error": self.error, "output_error": self.output_error, "worst_block_error": _max_or_none(self.block_errors),
                "worst_block": self.worst_block, "first_bad_block": self.first_bad_block,
                "tolerance": self.tolerance, "dtype": self.dtype, "quantile": self.quantile, "ok": self.ok}

    def note(self) -> str:
        """One line for the report's notes."""
        worst = self.worst_block
        text = f"equivalence check ({self.transform}): "
        if self.output_error is not None:
            text += f"final output {self.output_error:.2e}, "
        if worst is not None:
            text += f"worst block {self.block_errors[worst]:.2e} (layer {worst}), "
        return text + (f"{self.measure}; tolerance {self.tolerance:g} ({self.dtype}): "
                       + ("equivalent" if self.ok else "NOT equivalent"))


def _sortable(value: float) -> float:
    return float("inf") if value != value else value


def _max_or_none(values: list) -> Optional[float]:
    return max(values, key=_sortable) if values else None


def _final_tensor(out: Any) -> Optional[torch.Tensor]:
    """The model's main output: a tensor, ``.logits``, or the first tensor of a mapping / tuple."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "image_embeds", "text_embeds", "pooler_output", "last_hidden_state"):
        value = out.get(key) if isinstance(out, Mapping) else getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    values = out.values() if isinstance(out, Mapping) else out if isinstance(out, (tuple, list)) else ()
    return next((v for v in values if isinstance(v, torch.Tensor)), None)


def _rows(x: torch.Tensor, max_rows: int) -> torch.Tensor:
    """At most ``max_rows`` evenly spaced rows (of the last dim) of ``x``, float32 on the CPU."""
    flat = x.detach().reshape(-1, x.shape[-1]) if x.dim() > 1 else x.detach().reshape(1, -1)
    n = flat.shape[0]
    if n > max_rows:
        index = torch.linspace(0, n - 1, max_rows, device=flat.device).round().long()
        flat = flat[index]
    return flat.float().cpu()


class _RotateInput:
    """Pre-forward hook: rotate a Linear's input online (``x @ diag(signs) (F_1 kron ... kron F_k)``)."""

    def __init__(self, signs: torch.Tensor, factors: list) -> None:
        self.signs, self.factors = signs, factors

    def __call__(self, module: Any, inputs: tuple) -> tuple:
        x = inputs[0]
        return (hadamard_apply(x, self.signs.to(x.device), [f.to(x.device) for f in self.factors]),) + tuple(inputs[1:])


@torch.no_grad()
def snapshot(adapter: "ModelAdapter", batch: Any, max_rows: int = MAX_ROWS,
             input_rotations: Optional[dict] = None) -> Snapshot:
    """Run ``batch`` through the adapter's model; keep sampled rows of every block output and the output.

    Args:
        input_rotations: ``{Linear: (signs, factors)}`` applied to those Linears' inputs during the pass.
    """
    blocks: dict[int, torch.Tensor] = {}
    dtype: list = []
    with HookManager() as hooks:
        for module, (signs, factors) in (input_rotations or {}).items():
            hooks.pre_forward(module, _RotateInput(signs, factors))
        for li, block in enumerate(adapter.blocks()):
            def keep(module: Any, inputs: Any, output: Any, li: int = li) -> None:
                h = adapter.block_output(output)
                dtype.append(h.dtype)
                blocks.setdefault(li, _rows(h, max_rows))  # the first call of a block (no re-entry)
            hooks.forward(block, keep)
        out = adapter.forward(batch)
    final = _final_tensor(out)
    return Snapshot(output=None if final is None else _rows(final, max_rows),
                    blocks=[blocks.get(i) for i in range(len(adapter.blocks()))],
                    dtype=dtype[0] if dtype else (final.dtype if final is not None else torch.float32))


def relative_row_error(ref: torch.Tensor, new: torch.Tensor, quantile: float = 1.0) -> float:
    """Per-row relative L2 error of ``new`` against ``ref`` (``[N, d]``), denominators floored.

    Returns the largest row error (``quantile`` 1.0) or the given quantile of the row errors; NaN if any is NaN.
    """
    if ref.shape != new.shape:
        return float("inf")
    ref, new = ref.double(), new.double()
    norms = ref.norm(dim=-1)
    floor = (0.1 * norms.median()).clamp_min(1e-30)
    err = (new - ref).norm(dim=-1) / torch.maximum(norms, floor)
    if bool(torch.isnan(err).any()):
        return float("nan")
    if not err.numel():
        return 0.0
    return float(err.max()) if quantile >= 1.0 else float(torch.quantile(err, quantile))


def unrotate(q: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``basis`` for a folded residual rotation ``Q`` (rotated h = h @ Q): maps rows back by ``Q^T``."""
    qt = q.double().T.contiguous()
    return lambda rows: (rows.double() @ qt).float()


def compare(adapter: "ModelAdapter", reference: Snapshot, batch: Any, transform: str, *,
            tolerance: Optional[float] = None, basis: Optional[Callable] = None,
            input_rotations: Optional[dict] = None, max_rows: int = MAX_ROWS) -> EquivalenceResult:
    """Measure the transformed model against ``reference`` (no error raised; see :func:`check_equivalence`)."""
    now = snapshot(adapter, batch, max_rows, input_rotations=input_rotations)
    tol = float(tolerance) if tolerance is not None else TOLERANCE.get(reference.dtype, 1e-3)
    quantile = QUANTILE.get(reference.dtype, 1.0)
    block_errors = []
    for ref, new in zip(reference.blocks, now.blocks):
        if ref is None or new is None:
            block_errors.append(0.0 if ref is None and new is None else float("inf"))
            continue
        block_errors.append(relative_row_error(ref, basis(new) if basis is not None else new, quantile))
    output_error = None
    if reference.output is not None and now.output is not None:
        output_error = relative_row_error(reference.output, now.output, quantile)
    return EquivalenceResult(transform=transform, output_error=output_error, block_errors=block_errors,
                             tolerance=tol, dtype=str(reference.dtype).replace("torch.", ""), quantile=quantile)


def check_equivalence(adapter: "ModelAdapter", reference: Snapshot, batch: Any, transform: str, *,
                      hint: str = "", tolerance: Optional[float] = None, basis: Optional[Callable] = None,
                      input_rotations: Optional[dict] = None, max_rows: int = MAX_ROWS) -> EquivalenceResult:
    """:func:`compare`, raising :class:`EquivalenceError` beyond the tolerance.

    Args:
        adapter: the model's adapter (its model is the transformed one now).
        reference: :func:`snapshot` of the model before the transform, on the same ``batch``.
        batch: one calibration batch.
        transform: the transform's name, for messages.
        hint: what the user can do (appended to the error).
        tolerance: default by dtype (:data:`TOLERANCE`).
        basis: maps the transformed model's block-output rows back to the reference basis.
        input_rotations: online input rotations the weights absorbed but no wrapper applies yet.
    """
    result = compare(adapter, reference, batch, transform, tolerance=tolerance, basis=basis,
                     input_rotations=input_rotations, max_rows=max_rows)
    if result.ok:
        return result
    first = result.first_bad_block
    where = (f"block {first} of {len(result.block_errors)} is the first that differs ({result.measure} "
             f"{result.block_errors[first]:.3g})" if first is not None else "no block output differs")
    out = "" if result.output_error is None else f"; final output error {result.output_error:.3g}"
    message = (f"{transform} does not preserve the function of {type(adapter.model).__name__}: {where}{out}, "
               f"tolerance {result.tolerance:g} for {result.dtype}. The model is left unchanged."
               + (f" {hint}" if hint else ""))
    raise EquivalenceError(message, transform, result)
