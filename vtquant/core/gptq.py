"""GPTQ weight quantization and a Hessian-weighted clipping search (pure functions).

GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", arXiv:2210.17323) quantizes a Linear's weight ``W [out, in]``
column by column so as to minimise the layer's output error on calibration inputs
``X [n, in]``::

    || X W^T - X Wq^T ||^2  =  sum_rows  dW_row  (X^T X)  dW_row^T,     dW = W - Wq

with the proxy Hessian ``H = 2/n X^T X`` (shared by all output rows).  After column ``j`` is
rounded, its error is spread over the not-yet-quantized columns with the Optimal Brain
Surgeon update ``W[:, j:] -= err_j / [H^-1]_jj * [H^-1]_{j, j:}``; with the upper Cholesky
factor ``U`` of ``H^-1`` (``H^-1 = U^T U``) the row ``U[j, j:]`` is exactly the needed
(already "eliminated") inverse row, so the inverse is factored once ("Cholesky-inverse
trick").  Updates are applied lazily: inside a block of ``blocksize`` columns immediately, to
the columns after the block once per block (one matmul) - results are the same as the
column-by-column algorithm up to float rounding.

Quantization grid and storage are those of :func:`vtquant.core.quant.quantize_weight`
(symmetric, ``codes int8 [out, in]`` in ``[-2^(b-1), 2^(b-1) - 1]`` and ``scale [out, groups]``
with ``scale = clip * absmax / qmax``, ``qmax = 2^(b-1) - 1``), so
:func:`~vtquant.core.quant.dequantize_weight`, checkpoints and the int8 kernels are unchanged.

:func:`search_weight_clip` picks per row (per-channel) or per (row, group) a clip ratio
``c`` from a grid so that the RTN weight error, weighted by the same Hessian,
``dW_g H_gg dW_g^T`` (diagonal block of ``H`` for a group, the full ``H`` per-channel) is
minimal - the output-error analogue of the MSE clip search of AWQ / OmniQuant-style
calibrators.  The ratios can be passed to :func:`gptq_quantize` (``clip=``).

References (read, not copied): IST-DASLab/gptq ``gptq.py`` (``GPTQ.fasterquant``) and
llm-compressor's ``modifiers/quantization/gptq/gptq_quantize.py``.  Differences from the
reference, all deliberate:

* :class:`HessianAccumulator` averages over input *rows* (tokens), not over batch items;
  the scale of ``H`` does not change GPTQ (damping is relative to ``mean(diag H)``).
* Per-group scales without ``act_order`` are computed from the *fully* updated weights of the
  group (in-block updates and the pending lazy update included).  The reference reads the
  global ``W`` there, which misses the in-block updates when a group starts inside a block
  (``group_size < blocksize``); ours does not depend on ``blocksize``.
* If the Cholesky factorisation fails, damping is raised 10x (up to 3 times) before a
  clear error is raised; the reference raises, llm-compressor falls back to RTN silently.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch

from ..config import WeightArgs

log = logging.getLogger(__name__)

__all__ = ["HessianAccumulator", "search_weight_clip", "gptq_quantize", "DEFAULT_CLIP_GRID"]

DEFAULT_CLIP_GRID: tuple[float, ...] = tuple(round(1.0 - 0.05 * i, 2) for i in range(11))
"""Clip ratios tried by :func:`search_weight_clip`: 1.0, 0.95, ..., 0.5."""

_DAMP_RETRIES = 3  # extra Cholesky attempts, each with 10x the damping of the previous one


class HessianAccumulator:
    """Running GPTQ Hessian ``H = 2/n sum_rows x^T x`` of one Linear's inputs.

    The per-call products ``x^T x`` are computed in float32 (fast on GPUs); the running sum
    is kept in **float64** by default (``dtype``) on the device of the first non-empty input,
    so accumulation over many batches does not lose precision.  ``n`` counts input rows (tokens).

    Args:
        in_features: expected last dimension of the inputs (checked if given).
        dtype: dtype of the running sum, ``torch.float64`` (default) or ``torch.float32`` (half
            the memory: ``4 * in^2`` bytes instead of ``8 * in^2``, which matters when the
            Hessians of all Linears of a large model are held at once).

    Example:
        >>> acc = HessianAccumulator(64)
        >>> acc.add(torch.randn(2, 10, 64))   # any leading dims
        >>> acc.hessian().shape
        torch.Size([64, 64])
    """

    def __init__(self, in_features: Optional[int] = None, dtype: torch.dtype = torch.float64) -> None:
        if dtype not in (torch.float64, torch.float32):
            raise ValueError(f"HessianAccumulator dtype must be torch.float64 or torch.float32, got {dtype}")
        self.in_features = in_features
        self.dtype = dtype
        self.num_rows = 0
        self._sum: Optional[torch.Tensor] = None

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Add input rows ``x [..., in_features]`` (any leading dims, any float dtype)."""
        if x.dim() == 0:
            raise ValueError("HessianAccumulator.add expects inputs [..., in_features], got a scalar")
        in_f = x.shape[-1]
        if self.in_features is None:
            self.in_features = in_f
        elif in_f != self.in_features:
            raise ValueError(f"HessianAccumulator.add: inputs have {in_f} features, expected {self.in_features}")
        rows = x.detach().reshape(-1, in_f)
        if rows.shape[0] == 0:
            return
        rows = rows.float()
        if self._sum is None:
            self._sum = torch.zeros(in_f, in_f, dtype=self.dtype, device=rows.device)
        self._sum += (rows.T @ rows).to(device=self._sum.device, dtype=self.dtype)
        self.num_rows += rows.shape[0]

    def hessian(self) -> torch.Tensor:
        """The float32 ``[in, in]`` Hessian ``2/n X^T X`` of all rows added so far.

        Raises:
            RuntimeError: if no rows were added.
        """
        if self._sum is None or self.num_rows == 0:
            raise RuntimeError(
                "HessianAccumulator.hessian(): no input rows were added; run calibration forward "
                "passes (add()) before asking for the Hessian"
            )
        return (self._sum * (2.0 / self.num_rows)).float()


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def _layout(weight: torch.Tensor, args: WeightArgs) -> tuple[int, int, int, int]:
    """``(out, in, groups, group columns)``; same checks as ``quantize_weight``."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    if args.granularity == "per-group":
        if in_f % args.group_size != 0:
            raise ValueError(
                f"per-group weight quantization needs in_features ({in_f}) divisible by group_size "
                f"({args.group_size}); choose a divisor or use per-channel"
            )
        return out_f, in_f, in_f // args.group_size, args.group_size
    return out_f, in_f, 1, in_f


def _check_hessian(H: torch.Tensor, in_f: int) -> None:
    if H.shape != (in_f, in_f):
        raise ValueError(f"Hessian has shape {tuple(H.shape)}, expected [{in_f}, {in_f}] (in_features squared)")
    if not torch.isfinite(H).all():
        raise ValueError("Hessian contains NaN/inf; check the calibration inputs of this layer")


def _check_clip(clip: torch.Tensor, out_f: int, groups: int) -> None:
    if clip.shape != (out_f, groups):
        raise ValueError(f"clip has shape {tuple(clip.shape)}, expected [{out_f}, {groups}] ([out, groups])")
    if not (torch.isfinite(clip).all() and (clip > 0).all() and (clip <= 1).all()):
        raise ValueError("clip ratios must lie in (0, 1]")


def _scale(absmax: torch.Tensor, clip: Optional[torch.Tensor], qmax: int) -> torch.Tensor:
    """``clip * absmax / qmax`` with quantize_weight's guard against all-zero rows.

    Evaluated as ``(absmax / qmax) * clip``, the order ``quantize_weight(..., clip=)`` uses, so
    both give bit-identical scales.
    """
    scale = absmax.clamp_min(1e-12) / qmax
    return scale if clip is None else scale * clip


def _round(w: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """Integer codes (as float) of ``w`` on the symmetric grid of ``scale`` (broadcast)."""
    return torch.clamp(torch.round(w / scale), -qmax - 1, qmax)


# ------------------------------------------------------------------------------------------------
# clip search
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def search_weight_clip(
    weight: torch.Tensor,
    H: Optional[torch.Tensor],
    args: WeightArgs,
    grid: Sequence[float] = DEFAULT_CLIP_GRID,
    diagonal: bool = False,
) -> torch.Tensor:
    """Per-row (or per (row, group)) clip ratios minimising the Hessian-weighted RTN error.

    For every ratio ``c`` of ``grid`` the weight is RTN-quantized with ``scale = c * absmax /
    qmax`` and the error ``dW = W - Wq`` is scored per row as ``dW H dW^T`` (per-channel, full
    ``H``) or per (row, group) as ``dW_g H_gg dW_g^T`` (per-group, diagonal block ``H_gg``),
    i.e. the output error of the row (group) under the calibration inputs.  The smallest
    score wins; ties keep the larger ratio.  Ratio 1.0 (plain absmax) is always tried, so the
    result never scores worse than RTN.

    Args:
        weight: ``[out, in]`` weight (not modified).
        H: ``[in, in]`` Hessian (e.g. :meth:`HessianAccumulator.hessian`), or ``None`` for the
            plain squared weight error (``H = I``).  Dead columns (``H_jj == 0``) cost nothing
            but still count in ``absmax``, as in ``quantize_weight`` and :func:`gptq_quantize`.
        args: weight quantization arguments.
        grid: candidate ratios in ``(0, 1]``.
        diagonal: score with ``diag(H)`` only (``sum_j dW_j^2 H_jj``: no cross terms), which costs
            one elementwise pass per ratio instead of an ``[out, in] x [in, in]`` product (the
            GPTQ reference's own clip search uses no ``H`` at all).

    Returns:
        float32 ratios ``[out, 1]`` (per-channel) or ``[out, groups]`` (per-group) on the
        weight's device, usable as ``clip=`` of :func:`gptq_quantize`.
    """
    out_f, in_f, groups, gsize = _layout(weight, args)
    ratios = sorted({1.0, *(float(c) for c in grid)}, reverse=True)
    if not all(0.0 < c <= 1.0 for c in ratios):
        raise ValueError(f"clip grid values must lie in (0, 1], got {list(grid)}")
    qmax = 2 ** (args.bits - 1) - 1
    w = weight.detach().float().contiguous()
    Hb = None
    Hd = None
    if H is not None and diagonal:
        _check_hessian(H, in_f)
        Hd = torch.diagonal(H.detach()).to(device=w.device, dtype=torch.float32).view(1, groups, gsize)
    elif H is not None:
        _check_hessian(H, in_f)
        Hf = H.detach().to(device=w.device, dtype=torch.float32)
        if groups == 1:
            Hb = Hf.unsqueeze(0)  # [1, in, in]
        else:  # diagonal blocks [groups, gsize, gsize]
            Hb = torch.stack([Hf[g * gsize:(g + 1) * gsize, g * gsize:(g + 1) * gsize] for g in range(groups)])
    wg = w.view(out_f, groups, gsize)
    absmax = wg.abs().amax(dim=-1)  # [out, groups]
    best_err = None
    best = torch.ones(out_f, groups, device=w.device)
    for c in ratios:
        scale = _scale(absmax, torch.full_like(absmax, c), qmax).unsqueeze(-1)
        dw = wg - _round(wg, scale, qmax) * scale  # [out, groups, gsize]
        if Hd is not None:
            err = (dw * dw * Hd).sum(-1)
        elif Hb is None:
            err = (dw * dw).sum(-1)
        else:
            err = (torch.einsum("ogi,gij->ogj", dw, Hb) * dw).sum(-1)  # [out, groups]
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, c), best)
    return best


# ------------------------------------------------------------------------------------------------
# GPTQ
# ------------------------------------------------------------------------------------------------
def _inverse_cholesky(H: torch.Tensor, percdamp: float, shape: tuple[int, int]) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp I)^-1``; damping is raised 10x on failure."""
    mean_diag = torch.diagonal(H).mean()
    n = H.shape[0]
    eye = torch.eye(n, dtype=H.dtype, device=H.device)
    base = percdamp if percdamp > 0 else 1e-3
    fracs = [percdamp] + [base * 10.0 ** (k + 1) for k in range(_DAMP_RETRIES)]
    for attempt, frac in enumerate(fracs):
        Hd = H + (frac * mean_diag) * eye
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0 and torch.isfinite(U).all():
                if attempt:
                    log.warning("GPTQ: Hessian of Linear weight %s needed damping %.3g x mean(diag H) "
                                "(asked %.3g); consider more calibration samples", list(shape), frac, percdamp)
                return U
    raise RuntimeError(
        f"GPTQ: the Hessian of the Linear with weight shape [{shape[0]}, {shape[1]}] is not positive definite "
        f"even with damping {fracs[-1]:.3g} x mean(diag H); calibrate with more samples (at least several "
        f"times in_features={shape[1]} tokens) or raise percdamp"
    )


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    H: torch.Tensor,
    args: WeightArgs,
    *,
    clip: Optional[torch.Tensor] = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ-quantize a Linear weight; same output format as ``quantize_weight``.

    Args:
        weight: ``[out, in]`` weight (any float dtype; not modified).
        H: ``[in, in]`` Hessian ``2/n X^T X`` of the layer's calibration inputs (not modified).
        args: weight quantization arguments (bits, granularity, group_size; symmetric).
        clip: optional ratios ``[out, groups]`` in ``(0, 1]`` (``groups = 1`` per-channel),
            e.g. from :func:`search_weight_clip`; ``scale = clip * absmax / qmax``.
        blocksize: columns per lazy-update block (speed only; results do not depend on it
            beyond float rounding).
        percdamp: damping ``percdamp * mean(diag H)`` added to the diagonal of ``H``.
        act_order: quantize columns in order of descending ``diag(H)``.  With per-group
            scales the groups are then static (computed up front from the weight, in the
            original column order), so the stored format is unchanged.

    Returns:
        ``(codes int8 [out, in], scale float32 [out, groups])`` in the original column order,
        on the weight's device.

    Scales: per-channel (and static groups) from the (clipped) absmax of the weight before
    the sweep; per-group without ``act_order`` when the sweep reaches a group's first column,
    from the group's current, error-compensated weights (reference ``static_groups=False``).
    Dead columns (``H_jj == 0``: input always zero) get ``H_jj = 1`` and zero weight (code 0);
    as in the reference they still count in the static scales' ``absmax``, so a ``clip`` from
    :func:`search_weight_clip` means the same for RTN (``quantize_weight(..., clip=)``) and GPTQ.

    Raises:
        RuntimeError: if ``H`` stays not positive definite after raising the damping.
    """
    out_f, in_f, groups, gsize = _layout(weight, args)
    _check_hessian(H, in_f)
    if clip is not None:
        _check_clip(clip, out_f, groups)
        clip = clip.detach().to(device=weight.device, dtype=torch.float32)
    if not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize = {blocksize!r}: use a positive integer")
    if percdamp < 0:
        raise ValueError(f"percdamp = {percdamp!r}: use a number >= 0 (reference: 0.01)")
    if weight.device.type == "cpu":
        # the sweep is thousands of small ops: one thread is fastest, and immune to other processes
        # on the same cores (with 2 threads on 2 busy cores a SmolLM2 layer took 53 s instead of 0.6 s)
        saved = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return _gptq(weight, H, args, out_f, in_f, groups, gsize, clip, blocksize, percdamp, act_order)
        finally:
            torch.set_num_threads(saved)
    return _gptq(weight, H, args, out_f, in_f, groups, gsize, clip, blocksize, percdamp, act_order)


def _gptq(weight: torch.Tensor, H: torch.Tensor, args: WeightArgs, out_f: int, in_f: int, groups: int, gsize: int,
          clip: Optional[torch.Tensor], blocksize: int, percdamp: float,
          act_order: bool) -> tuple[torch.Tensor, torch.Tensor]:
    qmax = 2 ** (args.bits - 1) - 1
    per_group = args.granularity == "per-group"

    W = weight.detach().to(dtype=torch.float32, copy=True).contiguous()
    H = H.detach().to(device=W.device, dtype=torch.float32, copy=True)

    static = (not per_group) or act_order
    if static:  # from the original weight, original column order (= quantize_weight's scales)
        scale = _scale(W.view(out_f, groups, gsize).abs().amax(dim=-1), clip, qmax)
    else:  # filled when the sweep reaches each group
        scale = torch.empty(out_f, groups, device=W.device)

    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    Hinv = _inverse_cholesky(H, percdamp, (out_f, in_f))
    del H

    col_scale = None  # static scales per (row, column) in sweep order
    if static:
        col_group = torch.arange(in_f, device=W.device) // gsize if perm is None else perm // gsize
        col_scale = scale[:, col_group]
    codes = torch.empty(out_f, in_f, device=W.device)  # sweep order, float codes
    for i1 in range(0, in_f, blocksize):
        i2 = min(i1 + blocksize, in_f)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            j = i1 + i
            if not static and j % gsize == 0:
                g, j_end = j // gsize, j + gsize
                cur = W1[:, i:min(j_end, i2) - i1]
                if j_end > i2:  # the group reaches past this block: add the pending lazy update
                    later = W[:, i2:j_end] - Err1[:, :i] @ Hinv[i1:j, i2:j_end]
                    cur = torch.cat([cur, later], dim=1)
                scale[:, g] = _scale(cur.abs().amax(dim=1), None if clip is None else clip[:, g], qmax)
            s = col_scale[:, j] if static else scale[:, j // gsize]
            w = W1[:, i]
            c = _round(w, s, qmax)
            codes[:, j] = c
            err = (w - c * s) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        if i2 < in_f:
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes.to(torch.int8), scale
