"""Calibration beyond MinMax: GPTQ weights, clipping search, and the structure check.

These steps run inside :func:`vtquant.core.pipeline.quantize_model_` after the sink
modules are installed, so every statistic they collect comes from the inputs that the
quantized Linears really see: rotated, with sink rows clamped out (their outputs are
inserted from templates).  Nothing here knows a model family: Linears come from the
adapter, and Linears that read the same tensor (``adapter.input_groups``) share one
Hessian, one row sample and one activation clip ratio.

* :func:`collect_hessians` - one calibration pass, ``H = 2/n X^T X`` per input group over the
  rows that meet the quantized weight: semantic rows, plus sink rows computed in full precision
  (``fp-row``: prefix, unstable templates); sink rows whose output is an inserted template are
  excluded (their output does not depend on the quantized weight); for GPTQ and the weight
  clipping search;
* :func:`quantize_weights` - RTN or GPTQ, with an optional clip search weighted by ``diag(H)``;
* :func:`sample_rows` / :func:`search_activation_clips` - per Linear (group), the per-tensor
  static clip ratio minimising the (column-energy weighted) error of the Linear's *output*
  over semantic rows;
  key / value cache quantizers minimise the MSE of the cached values themselves;
* :func:`detected_sinks` / :func:`structure_recall` - the sink set detected on a model
  (per calibration sequence) and ``R = |S_q & S_fp| / |S_fp|``.

GPTQ here is the "parallel" variant: all Hessians come from one pass over the model with
full-precision weights (not layer after layer through already-quantized layers as in the
GPTQ paper's sequential loop); it costs one forward pass instead of one per block.  Each layer's
weights are quantized (:class:`WeightQuantizer`) as soon as that layer's Hessians are complete
(``collect_hessians(..., on_layer=...)``): at the end of a whole-model pass, or right after the block
in a sequential pass, which then holds one block's Hessians at a time.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from tqdm.auto import tqdm

from ..config import WeightArgs
from .quant import ActQuantizer

CLIP_GRID = tuple(round(1.0 - 0.05 * i, 2) for i in range(15))  # 1.0 ... 0.3


def input_group_leaders(adapter: Any, wrapped: dict) -> dict:
    """``{(layer, name): (layer, leader name)}``: Linears that read the same tensor share a leader."""
    leaders = {key: key for key in wrapped}
    blocks = adapter.blocks()
    for li, block in enumerate(blocks):
        for group in adapter.input_groups(block):
            members = [(li, n) for n in group if (li, n) in wrapped]
            for m in members:
                leaders[m] = members[0]
    return leaders


def collect_hessians(wrapped: dict, leaders: dict, run: Callable[..., None],
                     on_layer: Optional[Callable[[int, dict], None]] = None) -> dict:
    """Run one pass with observers on the group leaders; returns ``{leader key: H [in, in]}``.

    Args:
        wrapped: ``{(layer, name): QuantLinear}``.
        leaders: from :func:`input_group_leaders`.
        run: runs the pass: ``run()``, or with ``on_layer`` ``run(after_block)`` where the runner calls
            ``after_block(layer)`` once that layer has seen every batch.
        on_layer: ``on_layer(layer, {leader key: H})`` receives each layer's Hessians as soon as they are
            complete; they are dropped afterwards, so a sequential runner holds one block's Hessians at
            a time.  The return value is then ``{}``.
    """
    from .gptq import HessianAccumulator

    accs = {key: HessianAccumulator() for key in set(leaders.values())}

    def after_block(layer: int) -> None:
        keys = sorted(key for key in accs if key[0] == layer)
        for key in keys:
            wrapped[key].input_observer = None
        hessians = {key: accs[key].hessian() for key in keys if accs[key].num_rows > 0}
        for key in keys:
            del accs[key]
        on_layer(layer, hessians)

    def observer(acc: Any) -> Callable:
        def fn(rows: torch.Tensor, keep: Optional[torch.Tensor], weighted_sinks: Optional[torch.Tensor]) -> None:
            acc.add(rows if keep is None else rows[keep])
            if weighted_sinks is not None and weighted_sinks.shape[0]:
                acc.add(weighted_sinks)  # full-precision sink rows that still meet the quantized weight
        return fn

    observed = list(accs)
    try:
        for key in observed:  # (no loop variable left holding an accumulator: each is freed after its layer)
            wrapped[key].input_observer = observer(accs[key])
        if on_layer is None:
            run()
        else:
            run(after_block)
    finally:
        for key in observed:
            wrapped[key].input_observer = None
    return {key: acc.hessian() for key, acc in accs.items() if acc.num_rows > 0}


class WeightQuantizer:
    """Quantizes the wrapped Linears' weights group by group (RTN or GPTQ, optional clip search).

    Linears that read the same input share one group (and one Hessian).  Groups can be quantized as
    their layer's Hessians become available (:meth:`quantize_layer`, sequential pipelines) or all at
    once (:meth:`quantize_rest`); either way each group is quantized once, and the summary statistics
    are accumulated in the same (layer) order.
    """

    def __init__(self, wrapped: dict, args: WeightArgs, leaders: dict, quiet: bool = False) -> None:
        self.wrapped = wrapped
        self.args = args
        self.groups: dict = {}
        for key, leader in leaders.items():
            self.groups.setdefault(leader, []).append(key)
        self.done: set = set()
        self.clips_sum, self.clips_n, self.clipped = 0.0, 0, 0
        self.rtn_fallback: list = []
        self.progress = tqdm(total=len(self.groups), desc=f"quantize weights ({args.algorithm})", disable=quiet,
                             leave=False)

    def quantize_layer(self, layer: int, hessians: Optional[dict]) -> None:
        """Quantize every group led by a Linear of ``layer`` (``hessians``: ``{leader key: H}``)."""
        for leader in self.groups:
            if leader[0] == layer and leader not in self.done:
                self._quantize_group(leader, hessians.get(leader) if hessians else None)

    def quantize_rest(self, hessians: Optional[dict] = None) -> None:
        """Quantize every group not quantized yet."""
        for leader in self.groups:
            if leader not in self.done:
                self._quantize_group(leader, hessians.get(leader) if hessians else None)

    def _quantize_group(self, leader: tuple, hess: Optional[torch.Tensor]) -> None:
        from .gptq import gptq_quantize, search_weight_clip
        from .quant import quantize_weight

        args = self.args
        # Linears reading the same input share H: GPTQ treats rows independently given H, so the
        # group's weights are stacked and swept once
        qs = [self.wrapped[k] for k in self.groups[leader]]
        weight = torch.cat([q.weight.detach().float() for q in qs])
        if hess is not None:
            hess = hess.to(weight.device)
        clip = search_weight_clip(weight, hess, args, diagonal=True) if args.clip_search else None
        if clip is not None:
            self.clips_sum += float(clip.sum())
            self.clips_n += clip.numel()
            self.clipped += int((clip < 1.0).sum())
        if args.algorithm == "gptq" and hess is None:  # no calibration row met these weights: RTN
            self.rtn_fallback += [q.name for q in qs]
        if args.algorithm == "gptq" and hess is not None:
            codes, scale = gptq_quantize(weight, hess, args, clip=clip, blocksize=args.gptq_block_size,
                                         percdamp=args.gptq_damp, act_order=args.act_order)
        else:
            codes, scale = quantize_weight(weight, args, clip=clip)
        start = 0
        for q in qs:
            stop = start + q.out_features
            q.set_quantized_weight_(codes[start:stop].clone(), scale[start:stop].clone(), args)  # own storage
            start = stop
        self.done.add(leader)
        self.progress.update(1)

    def info(self) -> dict:
        """``{"mean_clip", "clipped_share"}`` of the clip search and ``rtn_fallback`` where they apply."""
        self.progress.close()
        info: dict = {"rtn_fallback": self.rtn_fallback} if self.rtn_fallback else {}
        if self.clips_n:
            info.update(mean_clip=round(self.clips_sum / self.clips_n, 4),
                        clipped_share=round(self.clipped / self.clips_n, 4))
        return info


def quantize_weights(wrapped: dict, args: WeightArgs, hessians: Optional[dict], leaders: dict,
                     quiet: bool = False) -> dict:
    """Quantize every wrapped Linear's weight (RTN or GPTQ, optional clip search) in place.

    A Linear that no calibration row reached (no Hessian) falls back to RTN (listed in ``rtn_fallback``).

    Returns:
        ``{"mean_clip", "clipped_share"}`` of the clip search and ``rtn_fallback`` where they apply.
    """
    quantizer = WeightQuantizer(wrapped, args, leaders, quiet=quiet)
    quantizer.quantize_rest(hessians)
    return quantizer.info()


# ------------------------------------------------------------------------------------------
def sample_rows(wrapped: dict, leaders: dict, run: Callable[[], None], rows_per_batch: int,
                seed: int = 0) -> dict:
    """Run ``run()`` once collecting up to ``rows_per_batch`` random semantic input rows per call
    on each group leader; returns ``{leader key: rows [N, in] float32 (cpu)}``."""
    gen = torch.Generator().manual_seed(seed)
    store: dict = {key: [] for key in set(leaders.values())}

    def observer(bucket: list) -> Callable:
        def fn(rows: torch.Tensor, keep: Optional[torch.Tensor], weighted_sinks: Any = None) -> None:
            if keep is not None:
                rows = rows[keep]
            if rows.shape[0] > rows_per_batch:
                idx = torch.randperm(rows.shape[0], generator=gen)[:rows_per_batch].to(rows.device)
                rows = rows[idx]
            bucket.append(rows.detach().float().cpu())
        return fn

    previous = {key: wrapped[key].input_observer for key in store}
    try:
        for key, bucket in store.items():
            wrapped[key].input_observer = observer(bucket)
        run()
    finally:
        for key, fn in previous.items():
            wrapped[key].input_observer = fn
    return {key: torch.cat(b) for key, b in store.items() if b}


def _best_ratio(quantizer: ActQuantizer, error: Callable[[torch.Tensor], float],
                grid: tuple = CLIP_GRID) -> tuple[float, float, float]:
    """Try every clip ratio on ``quantizer`` (observed range kept); returns (best, err at best, err at 1.0)."""
    best, best_err, err_one = 1.0, float("inf"), None
    for ratio in grid:
        quantizer.clip_ratio = float(ratio)
        quantizer.finalize()
        err = error(quantizer)
        if ratio == 1.0:
            err_one = err
        if err < best_err:
            best, best_err = float(ratio), err
    quantizer.clip_ratio = best
    quantizer.finalize()
    return best, best_err, err_one if err_one is not None else best_err


@torch.no_grad()
def search_activation_clips(wrapped: dict, leaders: dict, samples: dict, grid: tuple = CLIP_GRID) -> dict:
    """Per input group, the activation clip ratio minimising the output error of its readers,
    ``sum_ij (Q(X) - X)_ij^2 sum_o W_oj^2`` (the expected ``||(Q(X) - X) W^T||^2`` when the
    quantization errors of different channels are uncorrelated; one elementwise pass per ratio
    instead of a matmul); per key / value cache quantizer, the ratio minimising ``||Q(Y) - Y||^2``
    on ``Y = X W^T + b``.

    Every quantizer must have observed its range (``observe`` mode) already.  Returns
    ``{linear name: {"act": ratio, "act_gain": err(1.0) / err(best), "kv": ratio}}``.
    """
    members: dict = {}
    for key, leader in leaders.items():
        members.setdefault(leader, []).append(key)
    out: dict = {}
    for leader, keys in members.items():
        x = samples.get(leader)
        if x is None or x.shape[0] == 0:
            continue
        qs = [wrapped[k] for k in keys]
        dev = qs[0].device
        x = x.to(dev)
        # column energy of the readers' weights: sum_o W_oj^2 over every member of the group
        col_energy = sum(q.dequantized_weight(cache=False).float().pow(2).sum(dim=0) for q in qs)  # [in]
        lead_act = qs[0].act
        if lead_act is not None and lead_act.static and lead_act.mode != "off":
            def act_err(quantizer: ActQuantizer) -> float:
                return float(((quantizer.fake_quant(x) - x).pow(2) * col_energy).sum())
            ratio, err_best, err_one = _best_ratio(lead_act, act_err, grid)
            for q in qs[1:]:
                if q.act is not None:
                    q.act.clip_ratio = ratio
                    q.act.finalize()
            for q in qs:
                out.setdefault(q.name, {})["act"] = ratio
                out[q.name]["act_gain"] = round(err_one / max(err_best, 1e-30), 4)
        for q in qs:
            if q.out_act is not None and q.out_act.static:
                y = x @ q.dequantized_weight(cache=False).float().T
                if q.bias is not None:
                    y = y + q.bias.float()
                ratio, _, _ = _best_ratio(q.out_act, lambda quantizer: float((quantizer.fake_quant(y) - y).pow(2).sum()),
                                          grid)
                out.setdefault(q.name, {})["kv"] = ratio
    return out


def reset_activation_clips(wrapped: dict, keys: list, ratio: float = 1.0) -> None:
    """Set the clip ratio of the activation (and cache) quantizers of ``keys`` back to ``ratio``."""
    for key in keys:
        q = wrapped[key]
        for quantizer in (q.act, q.out_act):
            if quantizer is not None and quantizer.static:
                quantizer.clip_ratio = ratio
                quantizer.finalize()


# ------------------------------------------------------------------------------------------
def detected_sinks(handle_positions: Callable[[], list], run_batches: Callable[[Callable], None]) -> set:
    """The sink set ``{(sequence, position)}`` detected while ``run_batches`` runs the calibration batches.

    ``run_batches(after)`` must call ``after()`` after each forward; ``handle_positions()`` returns the
    last forward's positions per batch row.
    """
    found: set = set()
    counter = [0]

    def after() -> None:
        for row in handle_positions():
            found.update((counter[0], int(p)) for p in row)
            counter[0] += 1

    run_batches(after)
    return found


def structure_recall(s_q: set, s_fp: set) -> tuple[Optional[float], int]:
    """``R = |S_q & S_fp| / |S_fp|`` (``None`` when the FP model has no sinks) and ``|S_q - S_fp|``."""
    if not s_fp:
        return None, len(s_q)
    return len(s_q & s_fp) / len(s_fp), len(s_q - s_fp)
