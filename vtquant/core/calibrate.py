"""The sink calibrator: statistics -> detection -> templates, returning a :class:`SinkPlan`.

docs/method.md steps 1-4, model-family free (the adapter says where blocks, probes and known sinks
are).  Three parts, each small:

1. :meth:`SinkCalibrator.collect_statistics` - one full-precision pass: per layer, the per-token
   peak at the probe Linear's input (an MLP's second Linear), the residual norm of every token
   at every block output, and the known-sink masks the adapter sets;
2. :func:`decide_detection` - a pure function of those statistics: reference scales, emergence
   and cancellation layers, an optional earlier stage-1 layer, the number of template types;
3. :meth:`SinkCalibrator.fit_templates` - with the detectors and guards installed, one pass
   records the sinks' inputs of every guarded Linear -> template outputs ``W t + b`` and their
   stability -> per-Linear guard mode (``template`` where stable, ``fp-row`` elsewhere), the
   detection templates and the residual template.

:func:`install_sink_modules` builds detectors, guards and the residual restore of a plan on a
wrapped model; it is shared by calibration and checkpoint loading.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.nn as nn

from ..config import ConfigError, SinkConfig
from .hooks import HookManager
from .plan import SinkPlan
from .quant import QuantLinear
from .sinks import (ResidualDetector, SinkDetector, SinkState, choose_stage1, find_cancellation_layer,
                    find_emergence_layer, residual_scores, robust_fence, token_peaks)
from .templates import ResidualRestore, SinkGuard, template_statistics

if TYPE_CHECKING:
    from ..adapters.base import ModelAdapter
    from .pipeline import PassRunner, QuantReport

Wrapped = dict  # {(layer index, relative name): QuantLinear}


@dataclass
class ProbeStatistics:
    """What the full-precision statistics pass saw.

    Attributes:
        layers: probe layer indices, in order.
        peaks: ``[L, N]`` per-token peak at each probe over all N calibration tokens.
        shapes: ``[(B, T), ...]`` of each batch (to split N back into sequences).
        residual_norms: ``[n_layers, N]`` per-token residual norm at every block output.
        known: ``[N]`` bool of adapter-known sinks, or ``None`` when no kinds are configured.
        residual_scores: ``[n_layers, N]`` per-token ``||h - baseline||`` at every block output.
        baselines: ``[n_layers, C]`` per-channel median of each block output (over the first batch).
        channel_abs: ``[n_layers, C]`` per-channel median of ``|h|`` of each block output (first batch).
        channel_large_share: ``[n_layers, C]`` share of the first batch's tokens whose ``|h_c|`` exceeds
            :data:`OUTLIER_CHANNEL_FACTOR` x the typical channel (the median of ``channel_abs``).
        inputs: ``(layer, position in the layer's call order, Linear name) -> [N]`` per-token peak at every
            other distinct quantized input (one Linear per group that shares its input).
    """

    layers: list
    peaks: torch.Tensor
    shapes: list
    residual_norms: torch.Tensor
    known: Optional[torch.Tensor]
    residual_scores: Optional[torch.Tensor] = None
    baselines: Optional[torch.Tensor] = None
    channel_abs: Optional[torch.Tensor] = None
    channel_large_share: Optional[torch.Tensor] = None
    inputs: Optional[dict] = None


#: a residual channel whose median |h| over the tokens is this many times the typical channel's is an
#: always-on outlier channel (large on most tokens): an outlier *feature*, reported, never a sink.
OUTLIER_CHANNEL_FACTOR = 8.0
#: with the fixed rule, an earlier block output joins as a detection stage when at least this share of
#: its outliers are the fixed rule's sinks (they are confirmed massive; the relative rule uses 0.5).
ALPHA_EARLIER_PRECISION = 0.9
#: the sinks' residual is restored from its template only where their states spread at most this much
#: around it (mean ||h - t|| / ||t||): a content sink's residual after cancellation carries its context.
RESTORE_MAX_SPREAD = 0.05


@dataclass
class Detection:
    """Detection decided from :class:`ProbeStatistics` (before templates)."""

    stages: dict
    alphas: dict
    references: dict
    num_types: int
    known_sinks: list
    num_known_types: Optional[int]
    protected_types: list
    emergence_layer: int
    cancellation_layer: Optional[int]
    sites: dict = dataclasses.field(default_factory=dict)
    baselines: dict = dataclasses.field(default_factory=dict)
    rule: str = "alpha"


def _probes(adapter: "ModelAdapter", wrapped: Wrapped, ignore: list) -> dict[int, QuantLinear]:
    probe = adapter.probe_name()
    probes = {li: q for (li, name), q in wrapped.items() if name == probe}
    n_layers = len(adapter.blocks())
    if len(probes) != n_layers:
        missing = sorted(set(range(n_layers)) - set(probes))
        raise ConfigError(
            f"insertquant detects sinks at the input of {probe!r}, but it is in `ignore` for layers {missing}; "
            f"remove it from ignore (recipe.ignore = {ignore}) or use method naive-static")
    return probes


def _outlier_channels(stats: ProbeStatistics, layer: int) -> list:
    """Always-on outlier channels of block output ``layer``: median |h_c| >= OUTLIER_CHANNEL_FACTOR x typical."""
    if stats.channel_abs is None:
        return []
    chan = stats.channel_abs[layer]
    typical = float(chan.median().clamp_min(1e-12))
    idx = (chan >= OUTLIER_CHANNEL_FACTOR * typical).nonzero().flatten().tolist()
    share = stats.channel_large_share[layer] if stats.channel_large_share is not None else None
    return [{"channel": c, "median_abs": round(float(chan[c]), 4), "times_typical": round(float(chan[c]) / typical, 1),
             "tokens_share": None if share is None else round(float(share[c]), 3)} for c in idx]


def _probe_rows(stats: ProbeStatistics, ratios: torch.Tensor, references: torch.Tensor, cfg: SinkConfig,
                content: torch.Tensor, with_inputs: bool = False) -> list:
    """Every probe, in forward order, with its model-relative fence and what lies above it.

    Probes: each layer's probe-Linear input (token peak / median token peak) and each block output
    but the last (``||h - mu||`` / its median, ``mu`` the per-channel median).  Per probe, over the
    content tokens (known sinks left out), the fence :func:`robust_fence` (``fence_k`` robust standard
    deviations of the log ratios above their median, at least ``min_ratio``); a probe *fires* when
    some token passes it and at most ``max_share`` of the tokens do.  ``with_inputs`` adds every
    other quantized input (site ``input:<Linear>``, token peak / median token peak).
    """
    n_content = int(content.sum())
    probe_pos = {li: j for (li, j, name) in (stats.inputs or {}) if name is None}
    candidates = [((li, probe_pos.get(li, 500)), "probe", li, ratios[i], float(references[i]), None)
                  for i, li in enumerate(stats.layers)]
    if stats.residual_scores is not None:
        for li in range(stats.residual_scores.shape[0] - 1):  # the last block output feeds no quantized Linear
            sc = stats.residual_scores[li]
            ref = float(sc.median().clamp_min(1e-12))
            candidates.append(((li, 1000), "residual", li, sc / ref, ref, stats.baselines[li]))
    if with_inputs:
        for (li, j, name), peaks in (stats.inputs or {}).items():
            if name is not None and peaks is not None and peaks.numel() == ratios.shape[1]:
                ref = float(peaks.median().clamp_min(1e-12))
                candidates.append(((li, j), f"input:{name}", li, peaks / ref, ref, None))
    candidates.sort(key=lambda c: c[0])
    rows = []
    for order, site, li, r, ref, base in candidates:
        rc = r[content]
        tau, _med, sigma = robust_fence(rc, cfg.fence_k, cfg.min_ratio)
        above_all = r > tau  # known tokens above the fence confirm them; the rule itself counts content tokens
        above = above_all & content
        count = int(above.sum())
        share = count / n_content
        row = {"order": order, "site": site, "layer": li, "ratio": r, "reference": ref, "baseline": base, "fence": tau,
               "sigma": sigma, "above": above, "above_all": above_all, "count": count, "share": share,
               "max": float(rc.max()), "fired": count > 0 and share <= cfg.max_share, "sinks": None}
        if site == "residual":
            norms = stats.residual_norms[li]
            row["plain_max"] = float((norms / norms.median().clamp_min(1e-12))[content].max())
            row["channels"] = _outlier_channels(stats, li)
        if count == 0:
            row["decision"] = "no outlier"
        elif not row["fired"]:
            row["decision"] = (f"{100 * share:.0f} % of the tokens above the fence: a wide tail (outlier feature), "
                               "not a few sinks")
        else:
            row["decision"] = "fires"
        rows.append(row)
    return rows


def _why(row: dict, cfg: SinkConfig, rule: str) -> str:
    """One sentence: why this probe's tokens were or were not called sinks."""
    what = ("||h - mu|| / its median (mu: per-channel median of the block output)" if row["site"] == "residual"
            else "token peak / median token peak")
    fence = f"fence {row['fence']:.3g} (max(min_ratio {cfg.min_ratio:g}, exp(median + {cfg.fence_k:g} sigma)))"
    if row.get("threshold") is not None:  # a fixed-rule stage: its own threshold, every token counted
        text = (f"{row['sinks']} tokens with {what} above {row['threshold']:.3g} (largest {row['max_all']:.3g}): "
                "called sinks")
    elif row["count"] == 0:
        text = f"largest {what} {row['max']:.3g} <= {fence}: no token called a sink here"
    elif not row["fired"]:
        text = (f"{row['count']} tokens ({100 * row['share']:.1f} %) above {fence}, more than max_share "
                f"{100 * cfg.max_share:g} %: an outlier feature, not sinks")
    elif row["decision"].startswith("stage"):
        text = f"{row['count']} content tokens above {fence} (largest {row['max']:.3g}): called sinks"
    else:
        text = f"{row['count']} content tokens above {fence} (largest {row['max']:.3g})"
    if row["site"] == "residual" and row.get("channels"):
        chans = ", ".join(f"{c['channel']} ({c['times_typical']:g}x the typical channel"
                          + (f", large on {100 * c['tokens_share']:.0f} % of tokens" if c["tokens_share"] is not None
                             else "") + ")" for c in row["channels"])
        text += (f"; outlier channel(s) {chans}: an always-on feature of most tokens, not sinks (rotation / smoothing "
                 f"handles it); the per-channel baseline mu removes it from the score (largest plain norm ratio "
                 f"{row['plain_max']:.3g}, baselined {row['max']:.3g})")
    return text


def _public_probes(rows: list, cfg: SinkConfig, rule: str) -> list:
    out = []
    for row in rows:
        entry = {"site": row["site"], "layer": row["layer"], "rule": rule,
                 "measure": "baselined residual norm" if row["site"] == "residual" else "peak",
                 "reference": round(row["reference"], 6), "max_ratio": round(row["max"], 2),
                 "fence": round(row["fence"], 2), "sigma_log": round(row["sigma"], 3), "outliers": row["count"],
                 "share": round(row["share"], 4), "decision": row["decision"], "why": _why(row, cfg, rule)}
        if row["sinks"] is not None:
            entry["sinks"] = row["sinks"]
        if row.get("alpha_count") is not None:
            entry["alpha"] = round(float(row.get("threshold") or cfg.alpha), 2)
            entry["above_alpha"] = row["alpha_count"]
        if row["site"] == "residual":
            entry["max_ratio_without_baseline"] = round(row["plain_max"], 2)
            entry["outlier_channels"] = row["channels"]
        out.append(entry)
    return out


def _relative_detection(rows: list, n_tok: int) -> Optional[dict]:
    """The model-relative rule over the probe rows (docs/method.md: probes where the spike is, thresholds from the model).

    The main stage (``stage2``) is the firing probe whose largest ratio is furthest above its fence;
    every earlier firing probe whose outliers are mostly (>= 50 %) sinks of the main stage too becomes
    an extra stage (``stage1.<site><layer>``): the sink set of an input is the union of all stages.
    Each row's ``decision`` says what was made of it.
    """
    fired = [row for row in rows if row["fired"]]
    main = max(fired, key=lambda row: row["max"] / row["fence"]) if fired else None
    if main is None:
        return None
    stages: dict = {}
    main["decision"] = "stage2 (main: largest ratio over its fence)"
    stages["stage2"] = main
    for row in fired:
        if row["order"] >= main["order"]:
            if row is not main:
                row["decision"] = "fires, after the main probe (its sinks are already known there)"
            continue
        precision = float((row["above"] & main["above"]).sum()) / row["count"]
        if precision >= 0.5:
            name = f"stage1.{row['site']}{row['layer']}"
            row["decision"] = f"{name} ({100 * precision:.0f} % of its outliers are main-stage sinks)"
            stages[name] = row
        else:
            row["decision"] = (f"fires, not used: only {100 * precision:.0f} % of its outliers are sinks at "
                               "the main probe (another phenomenon)")
    sink_flat = torch.zeros(n_tok, dtype=torch.bool)
    for row in stages.values():
        sink_flat |= row["above_all"]
        row["sinks"] = int(row["above_all"].sum())
    return {"stages": {n: row["layer"] for n, row in stages.items()},
            "alphas": {n: float(row["fence"]) for n, row in stages.items()},
            "references": {n: float(row["reference"]) for n, row in stages.items()},
            "sites": {n: row["site"] for n, row in stages.items()},
            "baselines": {n: row["baseline"] for n, row in stages.items() if row["site"] == "residual"},
            "sink_flat": sink_flat, "emergence": main["layer"]}


def _earlier_stages(rows: list, main_order: tuple, sink_flat: torch.Tensor, content: torch.Tensor,
                    alpha: float) -> dict:
    """Fixed rule: block outputs and quantized inputs before the fixed stage where its sinks are already massive.

    A block output or a quantized input joins as a stage (name -> row, threshold ``alpha`` on its
    ratio: baselined norm / token peak) when
    some content token's ratio there exceeds ``alpha`` and at least :data:`ALPHA_EARLIER_PRECISION` of
    those tokens are the fixed stage's sinks.  A spike written by an attention head (or visible in
    the residual stream before any probe Linear reads it massively) is caught where it is born, not
    only where a later MLP happens to read it.
    """
    stages = {}
    target = sink_flat & content
    for row in rows:
        if row["site"] == "probe" or row["order"] >= main_order:
            continue
        massive = (row["ratio"] > alpha) & content
        count = int(massive.sum())
        if count == 0:
            continue
        precision = float((massive & target).sum()) / count
        if precision >= ALPHA_EARLIER_PRECISION:
            name = f"stage1.{row['site'].replace('input:', 'input.')}{row['layer']}"
            row["decision"] = (f"{name} ({count} tokens above alpha {alpha:g}, {100 * precision:.0f} % of them "
                               "fixed-rule sinks: the spike is in the stream here already)")
            row["alpha_count"], row["threshold"], row["max_all"] = count, alpha, float(row["ratio"].max())
            row["sinks"] = int((row["ratio"] > alpha).sum())
            stages[name] = row
        else:
            row["decision"] = (f"{count} tokens above alpha {alpha:g}, only {100 * precision:.0f} % of them fixed-rule "
                               "sinks: not used (another phenomenon)")
    return stages


def decide_detection(stats: ProbeStatistics, cfg: SinkConfig, adapter: "ModelAdapter",
                     report: "QuantReport") -> Optional[Detection]:
    """Thresholds, stages and template types from the statistics pass (``None``: no sink).

    Two rules (``sinks.detect``): the fixed one (a token whose peak at the probe Linear exceeds
    ``alpha`` x the median token peak; the emergence layer is the probe with the largest ratio) and,
    when no token anywhere exceeds ``alpha`` (``auto``), the model-relative one of
    :func:`_relative_detection`.
    """
    layers = stats.layers
    references = stats.peaks.median(dim=1).values.clamp_min(1e-12)
    ratios = stats.peaks / references.unsqueeze(1)
    report.probe_max_ratio = [round(float(r), 2) for r in ratios.max(dim=1).values]
    known_kinds = list(cfg.known_sinks)
    known_flat = stats.known if known_kinds else None
    n_tok = ratios.shape[1]
    content = ~known_flat if known_flat is not None else torch.ones(n_tok, dtype=torch.bool)
    emergence_idx = (find_emergence_layer(ratios.max(dim=1).values, cfg.alpha)
                     if cfg.detect in ("auto", "alpha") else None)
    # the fixed rule looks at every quantized input too (a spike an attention head writes is massive at
    # its o_proj input first); the relative rule at the probe Linears and block outputs
    rows = (_probe_rows(stats, ratios, references, cfg, content, with_inputs=emergence_idx is not None)
            if bool(content.any()) else [])
    probe_row = {row["layer"]: row for row in rows if row["site"] == "probe"}
    for i, li in enumerate(layers):
        if li in probe_row:
            probe_row[li]["alpha_count"] = int((ratios[i] > cfg.alpha).sum())
            probe_row[li]["max_all"] = float(ratios[i].max())
    sites: dict = {}
    baselines: dict = {}
    if emergence_idx is not None:
        rule = "alpha"
        emergence = layers[emergence_idx]
        sink_flat = ratios[emergence_idx] > cfg.alpha
        stages = {"stage2": emergence}
        alphas = {"stage2": float(cfg.alpha)}
        refs = {"stage2": float(references[emergence_idx])}
        main = probe_row.get(emergence)
        if main is not None:
            main["decision"] = f"stage2 (fixed rule: the largest probe ratio, above alpha {cfg.alpha:g})"
            main["sinks"], main["threshold"] = int(sink_flat.sum()), float(cfg.alpha)
            if cfg.detect == "auto":  # the spike may be in the residual stream before that probe
                for name, row in _earlier_stages(rows, main["order"], sink_flat, content, cfg.alpha).items():
                    stages[name], alphas[name], refs[name] = row["layer"], float(cfg.alpha), float(row["reference"])
                    sites[name] = row["site"]
                    if row["site"] == "residual":
                        baselines[name] = row["baseline"]
                    sink_flat = sink_flat | (row["ratio"] > cfg.alpha)
                    emergence = min(emergence, row["layer"])  # where the spike is first in the stream
            for row in rows:
                if row is main or row["decision"].startswith("stage"):
                    continue
                if row.get("alpha_count"):
                    row["decision"] = (f"{row['alpha_count']} tokens above alpha, not the largest ratio "
                                       f"(the fixed rule uses layer {layers[emergence_idx]})")
                elif row["decision"] == "fires":
                    row["decision"] = ("fires, after the main probe (its sinks are already known there)"
                                       if row["order"] > main["order"] else
                                       "fires (relative fence), not used: the fixed rule decides")
    else:
        found = _relative_detection(rows, n_tok) if (cfg.detect in ("auto", "relative") and rows) else None
        if found is None:
            report.probes = _public_probes(rows, cfg, "none")
            why = {"alpha": f"no token exceeds alpha={cfg.alpha:g} x the median token peak at any probe",
                   "relative": f"no probe has a few tokens {cfg.fence_k:g} robust standard deviations above its bulk",
                   "auto": f"no token exceeds alpha={cfg.alpha:g} x the median token peak at any probe, and no probe "
                           f"(probe-Linear inputs and block outputs) has a few tokens {cfg.fence_k:g} robust standard "
                           "deviations above its bulk"}[cfg.detect]
            report.notes.append(f"{why}: no massive activations, sink handling disabled (plain per-tensor "
                                "quantization)")
            return None
        rule = "relative"
        emergence = found["emergence"]
        sink_flat = found["sink_flat"]
        stages, alphas, refs = found["stages"], found["alphas"], found["references"]
        sites, baselines = found["sites"], found["baselines"]
    report.detection_rule = rule
    fixed_types = adapter.known_sink_types(known_kinds)  # None: LLM-style types by order
    if known_flat is not None and bool(known_flat.any()):
        report.known_confirmed = float((sink_flat & known_flat).sum() / known_flat.sum())
        if fixed_types is not None:  # vision: known tokens (CLS, registers) stay guarded; harmless if calm
            if report.known_confirmed < 0.5:
                report.notes.append(f"known sinks {known_kinds} carry the spike in only "
                                    f"{100 * report.known_confirmed:.0f} % of their tokens: kept (full-precision "
                                    "rows unless their inputs are constant)")
        elif report.known_confirmed < 0.5:
            report.notes.append(f"known sinks {known_kinds} carry the spike in only "
                                f"{100 * report.known_confirmed:.0f} % of inputs: not used")
            known_kinds = []
    all_sinks = sink_flat | known_flat if (known_kinds and known_flat is not None) else sink_flat

    # per-sequence sink counts -> number of template types K (the most common count)
    per_seq: list = []
    for m, s in zip(torch.split(all_sinks, [a * b for a, b in stats.shapes]), stats.shapes):
        per_seq += [row.nonzero().flatten().tolist() for row in m.view(s)]
    counts = torch.tensor([len(p) for p in per_seq])
    k = int(torch.mode(counts[counts > 0]).values) if bool((counts > 0).any()) else 1
    protected: list = []
    num_known = None
    if fixed_types is not None:  # one type per known token kind + one shared by content-detected sinks
        k = len(fixed_types) + 1
        num_known = len(fixed_types)
        report.type_names = list(fixed_types) + ["content"]
        protected = list(adapter.head_sink_types(known_kinds))
        report.protected_types = protected
    report.num_types = k
    report.calib_sink_positions = per_seq

    sink_norm = stats.residual_norms[:, all_sinks].mean(dim=1)
    report.sink_residual_norm = [round(float(v), 2) for v in sink_norm]
    if rule == "alpha" and cfg.stage1 == "auto":
        found = choose_stage1(ratios, sink_flat, emergence_idx, cfg.stage1_margin, cfg.stage1_min_recall)
        if found is not None:
            idx, alpha0, recall = found
            stages["stage1"] = layers[idx]
            alphas["stage1"] = alpha0
            refs["stage1"] = float(references[idx])
            report.stage1_recall = recall
            row = probe_row.get(layers[idx])
            if row is not None:
                row["decision"] = (f"stage1 (fixed rule: the earliest probe separating the stage-2 sinks, "
                                   f"{cfg.stage1_margin:g} x the largest other ratio, recall {100 * recall:.0f} %)")
                row["threshold"], row["sinks"] = alpha0, int((ratios[idx] > alpha0).sum())
            # the fixed rule's stage 2 is the largest ratio, which can be a late probe (e.g. the input of the MLP
            # that cancels the spike); stage 1 separates the same sinks earlier, so the spike is in the stream from
            # there: the emergence layer, and the cancellation search (which must not start after the drop)
            emergence = min(emergence, layers[idx])
    cancellation = find_cancellation_layer(sink_norm, emergence)
    report.probes = _public_probes(rows, cfg, rule)
    report.emergence_layer, report.cancellation_layer = emergence, cancellation
    report.stages, report.alphas, report.known_sinks = stages, alphas, known_kinds
    return Detection(stages=stages, alphas=alphas, references=refs, num_types=k, known_sinks=known_kinds,
                     num_known_types=num_known, protected_types=protected, emergence_layer=emergence,
                     cancellation_layer=cancellation, sites=sites, baselines=baselines, rule=rule)


class _RestoreHook:
    """Forward hook of the block after which the sinks' residual rows are restored.

    A callable object (not a closure) so that ``copy.deepcopy`` of a quantized model gives the
    copy its own hook, reading the copy's restore module.
    """

    def __init__(self, adapter: "ModelAdapter") -> None:
        self.adapter = adapter

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> Any:
        return self.adapter.replace_block_output(output, module.vtquant_restore(self.adapter.block_output(output)))


def _block_placement(block: nn.Module) -> tuple[Optional[torch.device], Optional[torch.dtype]]:
    """Device and floating dtype of a block's first floating parameter (``None``: no parameter)."""
    for p in block.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return None, None


class _DetectHook:
    """Forward hook of a block whose output a :class:`ResidualDetector` reads (``vtquant_detect``).

    A callable object reading the detector from the hooked block, so deep copies stay separate.
    """

    def __init__(self, adapter: "ModelAdapter") -> None:
        self.adapter = adapter

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> None:
        module.vtquant_detect(self.adapter.block_output(output))


def install_sink_modules(adapter: "ModelAdapter", wrapped: Wrapped, plan: SinkPlan, state: SinkState,
                         hooks: HookManager, baselines: Optional[dict] = None) -> None:
    """Create the detectors, guards and residual restore of ``plan``, all sharing ``state``.

    Every module is created where the Linear (block) it serves lives, in its compute dtype, so a
    model calibrated on a GPU in bf16 gets GPU bf16 templates (a model moved later moves them along).
    ``baselines`` (stage -> ``[C]``) fill the residual detectors' per-channel baselines at calibration;
    when loading a checkpoint they come from the state dict instead.
    """
    state.num_types = plan.num_types
    state.num_known_types = plan.num_known_types
    probe = adapter.probe_name()
    blocks = adapter.blocks()
    probe_device: dict = {}
    for stage, layer in plan.stages.items():
        if plan.site(stage) != "residual":
            continue
        det = ResidualDetector(stage, plan.alphas[stage], plan.references[stage], adapter.hidden_size())
        if baselines and stage in baselines:
            det.baseline.copy_(baselines[stage].float())
        device, _dtype = _block_placement(blocks[layer])
        if device is not None:
            det.to(device)
            probe_device[stage] = device
        det.state = state
        blocks[layer].vtquant_detect = det
        hooks.forward(blocks[layer], _DetectHook(adapter))
    stage_at = {(layer, probe if plan.site(stage) == "probe" else plan.site(stage)[len("input:"):]): stage
                for stage, layer in plan.stages.items() if plan.site(stage) != "residual"}
    for (li, name), q in wrapped.items():
        if (li, name) in stage_at:
            stage = stage_at[(li, name)]
            q.detector = SinkDetector(stage, plan.alphas[stage], plan.references[stage]).to(q.device)
            q.detector.state = state
            probe_device[stage] = q.device
        mode = plan.guard_modes.get(q.name)
        if mode is not None:
            q.guard = SinkGuard(q.out_features, plan.num_types, mode,
                                exclude_from_calibration=plan.exclude_from_calibration,
                                device=q.device, dtype=q.compute_dtype)
            q.guard.state = state
    adapter.install_known_sinks(state, list(plan.known_sinks), hooks)
    if plan.restore_layer is not None:
        block = adapter.blocks()[plan.restore_layer]
        device, dtype = _block_placement(block)
        restore = ResidualRestore(adapter.hidden_size(), plan.num_types, device=device, dtype=dtype)
        restore.state = state
        block.vtquant_restore = restore
        hooks.forward(block, _RestoreHook(adapter))
    for stage, det in plan.det_templates.items():
        state.det_templates[stage] = torch.tensor(det, device=probe_device.get(stage))


class SinkCalibrator:
    """Calibrates sink handling on a wrapped (still full-precision) model.

    Args:
        adapter: the model's adapter.
        cfg: the recipe's sink settings.
        wrapped: ``{(layer, name): QuantLinear}``.
        runner: owns the forward passes over the calibration batches.
        hooks: the quantized model's hook manager (the installed modules' hooks go there).
        report: filled with what was found.
        templates: fit templates (insertquant); ``False`` is prefix: the same detection, then every
            guarded Linear computes sink rows in full precision, no templates, no residual restore.
        ignore: the recipe's ignore list (for error messages).
    """

    def __init__(self, adapter: "ModelAdapter", cfg: SinkConfig, wrapped: Wrapped, runner: "PassRunner",
                 hooks: HookManager, report: "QuantReport", templates: bool = True,
                 ignore: Optional[list] = None) -> None:
        self.adapter = adapter
        self.cfg = cfg
        self.wrapped = wrapped
        self.runner = runner
        self.hooks = hooks
        self.report = report
        self.templates = templates
        self.probes = _probes(adapter, wrapped, ignore or [])
        self.fp_sinks: Optional[set] = None  # the sink set the deployed detectors find on the FP model

    # ---- pass 1 -----------------------------------------------------------------------------
    def collect_statistics(self) -> ProbeStatistics:
        adapter, blocks = self.adapter, self.adapter.blocks()
        peaks: dict[int, list] = {li: [] for li in self.probes}
        res_norms: dict[int, list] = {li: [] for li in range(len(blocks))}
        res_scores: dict[int, list] = {li: [] for li in range(len(blocks))}
        baselines: dict[int, torch.Tensor] = {}
        chan_abs: dict[int, torch.Tensor] = {}
        chan_share: dict[int, torch.Tensor] = {}
        state = SinkState(layout=adapter.token_layout)
        known_masks: list = []

        def on_block(li: int, out: Any) -> None:
            h = adapter.block_output(out)
            rows = state.rows(h).detach().float()
            shape = state.batch_tokens(h)
            res_norms[li].append(rows.norm(dim=-1).view(*shape).cpu())
            if li not in baselines:  # per-channel median of the first batch: the channel baseline
                baselines[li] = rows.median(dim=0).values
                absolute = rows.abs()
                chan_abs[li] = absolute.median(dim=0).values
                typical = chan_abs[li].median().clamp_min(1e-12)
                chan_share[li] = (absolute > OUTLIER_CHANNEL_FACTOR * typical).float().mean(dim=0)
            res_scores[li].append(residual_scores(rows, baselines[li]).view(*shape).cpu())

        # every other distinct quantized input, in call order (one Linear per shared-input group)
        probe = adapter.probe_name()
        input_peaks: dict[tuple, list] = {}
        position: dict[int, int] = {}
        for (li, name), q in self.wrapped.items():
            group = next((g for g in adapter.input_groups(blocks[li]) if name in g), [name])
            if name != group[0] and group[0] in {n for (l2, n) in self.wrapped if l2 == li}:
                continue  # reads the same tensor as its group's first Linear
            j = position[li] = position.get(li, -1) + 1
            input_peaks[(li, j, None if name == probe else name)] = []
        input_mods = {key: self.wrapped[(key[0], key[2] or probe)] for key in input_peaks}

        with HookManager() as tmp:
            for li, q in self.probes.items():
                tmp.pre_forward(q, lambda m, inp, li=li: peaks[li].append(
                    token_peaks(state.rows(inp[0])).view(*state.batch_tokens(inp[0])).float().cpu()))
            for key, q in input_mods.items():
                if key[2] is not None:
                    tmp.pre_forward(q, lambda m, inp, key=key: input_peaks[key].append(
                        token_peaks(state.rows(inp[0])).float().cpu()))
            for li, block in enumerate(blocks):
                tmp.forward(block, lambda m, inp, out, li=li: on_block(li, out))
            adapter.install_known_sinks(state, list(self.cfg.known_sinks), tmp)
            tmp.pre_forward(blocks[0], lambda m, inp: known_masks.append(
                None if state.mask is None else state.mask.cpu()))
            self.runner.run("sink statistics")
        layers = sorted(self.probes)
        shapes = [tuple(p.shape) for p in peaks[layers[0]]]
        known = None
        if self.cfg.known_sinks:
            known = torch.cat([(m if m is not None else torch.zeros(s, dtype=torch.bool)).flatten()
                               for m, s in zip(known_masks, shapes)])
        return ProbeStatistics(
            layers=layers,
            peaks=torch.stack([torch.cat([p.flatten() for p in peaks[li]]) for li in layers]),
            shapes=shapes,
            residual_norms=torch.stack([torch.cat([r.flatten() for r in res_norms[li]])
                                        for li in range(len(blocks))]),
            known=known,
            residual_scores=torch.stack([torch.cat([r.flatten() for r in res_scores[li]])
                                         for li in range(len(blocks))]),
            baselines=torch.stack([baselines[li].cpu() for li in range(len(blocks))]),
            channel_abs=torch.stack([chan_abs[li].cpu() for li in range(len(blocks))]),
            channel_large_share=torch.stack([chan_share[li].cpu() for li in range(len(blocks))]),
            inputs={key: (torch.cat(v) if v else None) for key, v in input_peaks.items()})

    # ---- the whole calibration ---------------------------------------------------------------
    def calibrate(self) -> tuple[Optional[SinkPlan], Optional[SinkState]]:
        """Statistics, detection and (with ``templates``) template fitting; installs the modules."""
        detection = decide_detection(self.collect_statistics(), self.cfg, self.adapter, self.report)
        if detection is None:
            return None, None
        d = detection
        first_guard = 0 if (d.known_sinks or not self.templates) else min(d.stages.values())
        restore = d.cancellation_layer if (self.templates and self.cfg.restore_residual) else None
        modes = {q.name: "fp-row" for (li, _name), q in self.wrapped.items() if li >= first_guard}
        plan = SinkPlan(stages=d.stages, alphas=d.alphas, references=d.references, num_types=d.num_types,
                        known_sinks=tuple(d.known_sinks), num_known_types=d.num_known_types,
                        protected_types=tuple(d.protected_types), first_guard_layer=first_guard,
                        emergence_layer=d.emergence_layer, cancellation_layer=d.cancellation_layer,
                        restore_layer=restore, exclude_from_calibration=self.cfg.exclude_from_calibration,
                        guard_modes=modes, inserts_templates=self.templates, sites=dict(d.sites), rule=d.rule)
        state = SinkState(layout=self.adapter.token_layout)
        install_sink_modules(self.adapter, self.wrapped, plan, state, self.hooks, baselines=d.baselines)
        if not self.templates:  # prefix: full-precision sink rows everywhere, nothing more to calibrate
            self.report.layer_modes = {li: "fp-row" for (li, _name) in self.wrapped}
            return plan, state
        return self.fit_templates(plan, state), state

    # ---- pass 2 -----------------------------------------------------------------------------
    def fit_templates(self, plan: SinkPlan, state: SinkState) -> SinkPlan:
        """Record sink inputs with the deployed detectors; fill the guards' and restore's templates."""
        from . import search

        adapter, cfg, report, k = self.adapter, self.cfg, self.report, plan.num_types
        blocks = adapter.blocks()
        protected = list(plan.protected_types)
        recorders: dict[str, list] = {}
        for q in self.wrapped.values():
            if q.guard is not None:
                q.guard.recorder = recorders.setdefault(q.name, [])
        det_records: dict[str, list] = {s: [] for s in plan.stages}
        res_records: list = []
        restore_layer = plan.restore_layer
        def record(stage: str, x: torch.Tensor) -> None:
            det_records[stage].append((state.rows(x).float().cpu(),
                                       None if state.mask is None else state.mask.reshape(-1).cpu(),
                                       None if state.types is None else state.types.reshape(-1).cpu()))

        with HookManager() as tmp:
            for q in self.wrapped.values():
                if q.detector is not None:
                    tmp.forward(q, lambda m, inp, out, stage=q.detector.stage: record(stage, inp[0]))
            for block in blocks:
                det = getattr(block, "vtquant_detect", None)
                if det is not None:  # after the detector's own hook: the mask holds its detections
                    tmp.forward(block, lambda m, inp, out, stage=det.stage: record(stage, adapter.block_output(out)))
            if restore_layer is not None:
                blocks[restore_layer].vtquant_restore.enabled = False
                tmp.forward(blocks[restore_layer], lambda m, inp, out: res_records.append(
                    (state.rows(adapter.block_output(out)).float().cpu(), state.mask.reshape(-1).cpu(),
                     state.types.reshape(-1).cpu()) if state.mask is not None else None))
            self.fp_sinks = search.detected_sinks(
                lambda: state.positions(), lambda after: self.runner.run("sink templates", after=after))
        if restore_layer is not None:
            blocks[restore_layer].vtquant_restore.enabled = True

        type_cos: dict[tuple[int, int], float] = {}  # (layer, type) -> min cosine over the layer's Linears
        layer_spread: dict[int, float] = {}
        for (li, name), q in self.wrapped.items():
            if q.guard is None:
                continue
            rec = recorders.get(q.name, [])
            q.guard.recorder = None
            if not rec:
                continue
            inputs = torch.cat([r[0] for r in rec])
            types = torch.cat([r[1] for r in rec]).clamp_min(0)
            weight = q.weight.detach().float()
            bias = None if q.bias is None else q.bias.detach().float()
            for t in range(k):
                sel = inputs[types == t]
                if len(sel) == 0:
                    continue
                mean, cos, spread = template_statistics(sel)
                out = mean.to(weight.device) @ weight.T + (0 if bias is None else bias)
                q.guard.template_out[t] = out.to(q.guard.template_out.dtype)
                q.guard.template_cosine[t] = cos
                type_cos[(li, t)] = min(type_cos.get((li, t), 1.0), cos)
                layer_spread[li] = max(layer_spread.get(li, 0.0), spread)
        modes = dict(plan.guard_modes)
        for (li, name), q in self.wrapped.items():
            if q.guard is None:
                continue
            stable = torch.tensor([type_cos.get((li, t), -1.0) >= cfg.template_min_cosine and t not in protected
                                   for t in range(k)])  # a token the head reads is never replaced
            if not cfg.insert:
                mode = "clamp"
            elif bool(stable.any()):
                mode = "template"
                q.guard.template_ok.copy_(stable)
            else:
                mode = "fp-row"
            q.guard.mode = mode
            modes[q.name] = mode
            report.layer_modes[li] = mode
        report.layer_template_cosine = {li: round(min(c for (l2, _), c in type_cos.items() if l2 == li), 4)
                                        for li in sorted({l for l, _ in type_cos})}
        report.layer_template_spread = {li: round(s, 4) for li, s in sorted(layer_spread.items())}

        # detection templates for least-squares assignment
        for stage, recs in det_records.items():
            feats, tys = [], []
            for rows, mask, types in recs:
                if mask is not None and bool(mask.any()):
                    feats.append(rows[mask])
                    tys.append(types[mask])
            if feats:
                f, t = torch.cat(feats), torch.cat(tys).clamp_min(0)
                det = torch.stack([f[t == i].mean(0) if bool((t == i).any()) else torch.zeros(f.shape[1])
                                   for i in range(k)])
                device = _block_placement(blocks[plan.stages[stage]])[0]  # where that stage's detector runs
                state.det_templates[stage] = det if device is None else det.to(device)
        if restore_layer is not None:
            self._fit_restore(blocks[restore_layer].vtquant_restore, res_records, k, protected, restore_layer)
            if bool(blocks[restore_layer].vtquant_restore.restore_type.any()):  # else the note says why not
                report.restore_layer = restore_layer
        return dataclasses.replace(plan, guard_modes=modes,
                                   det_templates={s: v.tolist() for s, v in state.det_templates.items()})

    def _fit_restore(self, restore: ResidualRestore, res_records: list, k: int, protected: list,
                     layer: int) -> None:
        rows = [r for r in res_records if r is not None]
        if not rows:
            return
        h = torch.cat([r[0][r[1]] for r in rows])
        t = torch.cat([r[2][r[1]] for r in rows]).clamp_min(0)
        for i in range(k):
            if bool((t == i).any()):
                mean, cos, spread = template_statistics(h[t == i])
                self.report.restore_spread[i] = round(spread, 4)
                restore.template[i] = mean.to(restore.template)
                # restore only residual states that are (nearly) constant across inputs: the template replaces
                # the whole state for every later layer, so its spread is the error it brings
                restore.restore_type[i] = (cos >= self.cfg.template_min_cosine and spread <= RESTORE_MAX_SPREAD
                                           and i not in protected)
                if cos >= self.cfg.template_min_cosine and spread > RESTORE_MAX_SPREAD and i not in protected:
                    # the clamp-and-insert check measures both choices for these on data (pipeline)
                    self.report.restore_candidates.append(i)
            else:
                restore.restore_type[i] = False
        if not bool(restore.restore_type.any()):
            spreads = ", ".join(f"{v:.3g}" for v in self.report.restore_spread.values())
            self.report.notes.append(f"sink residual after layer {layer} is not constant across inputs (relative "
                                     f"spread {spreads} > {RESTORE_MAX_SPREAD:g}): not restored")
