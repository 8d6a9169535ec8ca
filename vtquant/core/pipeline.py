"""prepare -> calibrate -> convert, model-family free (torchao's static flow, METHOD.md steps 1-6).

:func:`quantize_model_` runs the whole INSERTQUANT pipeline on a model described
by an adapter:

1. optional rotation of the full-precision model (:mod:`vtquant.core.rotation`);
2. every target Linear becomes a :class:`QuantLinear` (still full precision);
3. pass 1 - probe statistics: per layer, the per-token peak at the MLP second-linear
   input and the sinks' residual norm -> reference scales, emergence layer,
   cancellation layer, an optional earlier stage-1 layer, number of template types;
4. pass 2 - templates: detectors run as at inference; each guarded Linear records
   its sink inputs -> template outputs and their stability -> per-layer mode
   (``template`` where stable, ``fp-row`` elsewhere) and the residual template;
5. weights are quantized (RTN), pass 3 calibrates static activation scales with
   sink rows excluded; activations then quantize.

The resulting structure is a json-able *plan*; :func:`apply_plan_` rebuilds it on
a fresh model (for loading checkpoints).
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Optional

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..config import ActArgs, ConfigError, Recipe, WeightArgs
from .hooks import HookManager
from . import search
from .quant import QuantLinear
from .rotation import random_hadamard_factors, rotate_model_
from .sinks import (SinkDetector, SinkState, choose_stage1, find_cancellation_layer,
                    find_emergence_layer, token_peaks)
from .templates import ResidualRestore, SinkGuard, template_statistics

log = logging.getLogger(__name__)


@dataclass
class QuantReport:
    """What quantization found and did (printed by the CLI, saved beside checkpoints)."""

    method: str
    seconds: float = 0.0
    emergence_layer: Optional[int] = None
    cancellation_layer: Optional[int] = None
    stages: dict = field(default_factory=dict)
    alphas: dict = field(default_factory=dict)
    stage1_recall: Optional[float] = None
    num_types: int = 0
    known_sinks: list = field(default_factory=list)
    known_confirmed: Optional[float] = None
    probe_max_ratio: list = field(default_factory=list)
    sink_residual_norm: list = field(default_factory=list)
    calib_sink_positions: list = field(default_factory=list)
    layer_modes: dict = field(default_factory=dict)
    layer_template_cosine: dict = field(default_factory=dict)
    layer_template_spread: dict = field(default_factory=dict)
    restore_layer: Optional[int] = None
    type_names: list = field(default_factory=list)
    protected_types: list = field(default_factory=list)
    structure_recall: Optional[float] = None
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        lines = [f"method: {self.method} ({self.seconds:.1f} s)"]
        if self.method.startswith(("insertquant", "prefix")):
            lines.append(f"emergence layer: {self.emergence_layer}, cancellation layer: {self.cancellation_layer}, "
                         f"stages: {self.stages}, alphas: { {k: round(v, 2) for k, v in self.alphas.items()} }")
            lines.append(f"template types: {self.num_types}, known sinks: {self.known_sinks} "
                         f"(confirmed by content in {self.known_confirmed if self.known_confirmed is None else round(100 * self.known_confirmed)} % of inputs)")
            modes = {}
            for layer, mode in self.layer_modes.items():
                modes.setdefault(mode, []).append(int(layer))
            lines.append("guard modes by layer: " + "; ".join(f"{m}: {_ranges(v)}" for m, v in modes.items()))
            if self.restore_layer is not None:
                lines.append(f"residual restored after layer {self.restore_layer}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _ranges(values: list[int]) -> str:
    values = sorted(values)
    out, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(f"{start}" if start == v else f"{start}-{v}")
            start = None
    return ",".join(out)


class QuantHandle:
    """Lives on a quantized model as ``model.vtquant``: its plan, sink state and hooks."""

    def __init__(self, plan: dict, state: Optional[SinkState], hooks: HookManager, adapter: Any) -> None:
        self.plan = plan
        self.state = state
        self.hooks = hooks
        self.adapter = adapter
        self.report: Optional[QuantReport] = None

    def sink_positions(self) -> list[list[int]]:
        """Sink positions per batch row of the last forward pass."""
        return self.state.positions() if self.state is not None else []


# ------------------------------------------------------------------------------------------
def _target_linears(adapter: Any, ignore: list) -> list[tuple[int, str, nn.Module, nn.Module]]:
    out = []
    for li, block in enumerate(adapter.blocks()):
        for name, lin in adapter.block_linears(block).items():
            full = f"layers.{li}.{name}"
            if any(name.endswith(pat) or full == pat or full.endswith("." + pat) for pat in ignore):
                continue
            out.append((li, name, block, lin))
    return out


def _set_child(block: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = block.get_submodule(parent_name) if parent_name else block
    setattr(parent, child, module)


def _wrap_linears(adapter: Any, ignore: list, skeleton_weights: Optional[WeightArgs] = None,
                  online: Optional[dict] = None) -> dict[tuple[int, str], QuantLinear]:
    online = online or {}
    wrapped = {}
    for li, name, block, lin in _target_linears(adapter, ignore):
        if isinstance(lin, QuantLinear):
            wrapped[(li, name)] = lin
            continue
        q = QuantLinear(lin, skeleton_weights, None, name=f"layers.{li}.{name}",
                        skeleton=skeleton_weights is not None)
        if lin in online:
            q.set_input_rotation(*online[lin])
        _set_child(block, name, q)
        wrapped[(li, name)] = q
    return wrapped


def _run(adapter: Any, batches: list, desc: str, quiet: bool, after: Optional[Any] = None) -> None:
    with torch.no_grad():
        for batch in tqdm(batches, desc=desc, disable=quiet, leave=False):
            adapter.forward(batch)
            if after is not None:
                after()


def _attach_restore(adapter: Any, hooks: HookManager, block: nn.Module, restore: ResidualRestore) -> None:
    block.vtquant_restore = restore

    def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
        return adapter.replace_block_output(output, module.vtquant_restore(adapter.block_output(output)))

    hooks.forward(block, hook)


# ------------------------------------------------------------------------------------------
def quantize_model_(model: nn.Module, adapter: Any, recipe: Recipe, batches: Iterable,
                    quiet: bool = False) -> QuantReport:
    """Quantize ``model`` in place following ``recipe``, calibrating on ``batches``.

    Args:
        model: the full-precision model (modified in place).
        adapter: its :class:`~vtquant.adapters.ModelAdapter`.
        recipe: the validated recipe.
        batches: calibration inputs, each accepted by ``adapter.forward``.
        quiet: no progress bars.
    """
    start = time.time()
    batches = list(batches)
    report = QuantReport(method=recipe.display_method)
    plan: dict = {"method": recipe.method, "display_method": recipe.display_method,
                  "weights": asdict(recipe.weights) if recipe.weights else None,
                  "activations": asdict(recipe.activations) if recipe.activations else None,
                  "ignore": list(recipe.ignore), "rotation": None, "sinks": None,
                  "kv_cache": asdict(recipe.kv_cache) if recipe.kv_cache else None}
    hooks = HookManager()
    if recipe.method == "fp":
        model.vtquant = QuantHandle(plan, None, hooks, adapter)
        report.seconds = time.time() - start
        return report

    # 1. rotation of the full-precision model
    online: dict = {}
    if recipe.rotation.enabled:
        rot = recipe.rotation
        online = rotate_model_(adapter.rotation_spec(), seed=rot.seed, residual=rot.residual,
                               online=rot.online, heads=rot.heads)["online"]
        plan["rotation"] = asdict(rot)

    # 1b. smoothquant: migrate per-channel activation scale into the readers' weights (exact in float)
    if recipe.method == "smoothquant":
        from .smooth import smooth_model_

        info = smooth_model_(adapter.rotation_spec(), lambda: _run(adapter, batches, "smoothquant statistics", quiet),
                             alpha=float(recipe.smoothquant_alpha))
        plan["smoothquant"] = info
        report.notes.append(f"smoothquant: alpha={info['alpha']:g}, {info['groups']} norm->readers groups smoothed, "
                            f"largest factor {info['max_factor']:g} (largest input |x| {info['max_act_absmax']:g})")

    # 2. wrap every target Linear (full precision for now)
    wrapped = _wrap_linears(adapter, recipe.ignore, online=online)
    plan["targets"] = sorted(q.name for q in wrapped.values())
    plan["online_rotation"] = {q.name: [f.shape[0] for f in q.rot_factors]
                               for q in wrapped.values() if q.has_input_rotation}

    state = None
    fp_sinks: list = []
    if recipe.method in ("insertquant", "prefix") and recipe.sinks.enabled:
        state = _calibrate_sinks(adapter, recipe, batches, wrapped, hooks, report, plan, quiet,
                                 templates=recipe.method == "insertquant", fp_sinks=fp_sinks)

    leaders = search.input_group_leaders(adapter, wrapped)
    acts, kv = recipe.activations, recipe.kv_cache
    wargs = recipe.weights.resolved() if recipe.weights is not None else None
    clip_search = bool(acts is not None and acts.static and acts.clip_search)
    s_fp: Optional[set] = fp_sinks[0] if fp_sinks else None  # recorded by the templates pass

    def record_positions(desc: str) -> set:
        return search.detected_sinks(lambda: state.positions(),
                                     lambda after: _run(adapter, batches, desc, quiet, after=after))

    # 3. weights: RTN, or GPTQ / clip search from the Hessians of the inputs the Linears really see
    if wargs is not None:
        hessians = None
        if wargs.algorithm == "gptq" or wargs.clip_search:
            positions: list = []

            def run_hessian_pass() -> None:
                if state is not None and clip_search and s_fp is None:
                    positions.append(record_positions("Hessians (GPTQ)"))
                else:
                    _run(adapter, batches, "Hessians (GPTQ)", quiet)

            hessians = search.collect_hessians(wrapped, leaders, run_hessian_pass)
            if positions:
                s_fp = positions[0]
    if state is not None and clip_search and s_fp is None:  # prefix with RTN weights: one more pass
        s_fp = record_positions("sink set (full precision)")
    if wargs is not None:
        info = search.quantize_weights(wrapped, wargs, hessians, leaders, quiet=quiet)
        del hessians
        plan["weight_search"] = info
        if wargs.algorithm == "gptq":
            report.notes.append(f"weights: GPTQ W{wargs.bits} {wargs.granularity} (damp {wargs.gptq_damp:g}, "
                                f"act_order {wargs.act_order}), Hessians from one calibration pass over the rows that meet the quantized weight")
        if "mean_clip" in info:
            report.notes.append(f"weight clip search: mean clip {info['mean_clip']:.3f}, "
                                f"{100 * info['clipped_share']:.0f} % of rows / groups clipped")
        if info.get("rtn_fallback"):
            report.notes.append(f"GPTQ: no calibration row reached {info['rtn_fallback']}: RTN there")

    # 4. activations (and the key / value cache)
    if acts is not None:
        from .quant import ActQuantizer

        for qlin in wrapped.values():
            qlin.act = ActQuantizer(acts).to(qlin.dequantized_weight().device)
    if kv is not None:
        _install_kv_quantizers(adapter, wrapped, kv)
    needs_observe = (acts is not None and acts.static) or (kv is not None and kv.static)
    if needs_observe:
        if clip_search:
            samples = search.sample_rows(wrapped, leaders, lambda: _run(adapter, batches, "calibrate activation "
                                                                         "scales", quiet),
                                         rows_per_batch=max(1, 512 // max(1, len(batches))))
        else:
            _run(adapter, batches, "calibrate activation scales", quiet)
        for qlin in wrapped.values():
            for quantizer in (qlin.act, qlin.out_act):
                if quantizer is not None and quantizer.static:
                    quantizer.finalize()
        if clip_search:
            _clip_search(adapter, wrapped, leaders, samples, state, s_fp, record_positions, report, plan)

    model.vtquant = QuantHandle(plan, state, hooks, adapter)
    report.seconds = time.time() - start
    model.vtquant.report = report
    return report


def _calibrate_sinks(adapter: Any, recipe: Recipe, batches: list, wrapped: dict, hooks: HookManager,
                     report: QuantReport, plan: dict, quiet: bool, templates: bool = True,
                     fp_sinks: Optional[list] = None) -> Optional[SinkState]:
    """Detection (pass 1) and, with ``templates``, templates and residual restore (pass 2).

    ``templates=False`` is the ``prefix`` method: the same detection, then every Linear computes
    the sink rows in full precision (``fp-row``) and keeps them out of the static scales; no
    templates, no residual restore.
    """
    cfg = recipe.sinks
    blocks = adapter.blocks()
    n_layers = len(blocks)
    probe = adapter.probe_name()
    probes = {li: q for (li, name), q in wrapped.items() if name == probe}
    if len(probes) != n_layers:
        missing = sorted(set(range(n_layers)) - set(probes))
        raise ConfigError(
            f"insertquant detects sinks at the input of {probe!r}, but it is in `ignore` for layers {missing}; "
            f"remove it from ignore (recipe.ignore = {recipe.ignore}) or use method naive-static")

    # ---- pass 1: probe statistics on the full-precision model --------------------------
    peaks: dict[int, list] = {li: [] for li in probes}
    res_norms: dict[int, list] = {li: [] for li in range(n_layers)}
    state = SinkState(layout=adapter.token_layout)
    with HookManager() as tmp:
        for li, q in probes.items():
            tmp.pre_forward(q, lambda m, inp, li=li: peaks[li].append(
                token_peaks(state.rows(inp[0])).view(*state.batch_tokens(inp[0])).float().cpu()))
        for li, block in enumerate(blocks):
            tmp.forward(block, lambda m, inp, out, li=li: res_norms[li].append(
                state.rows(adapter.block_output(out)).float().norm(dim=-1).view(
                    *state.batch_tokens(adapter.block_output(out))).cpu()))
        known_kinds = [k for k in cfg.known_sinks]
        adapter.install_known_sinks(state, known_kinds, tmp)
        known_masks: list = []
        tmp.pre_forward(blocks[0], lambda m, inp: known_masks.append(
            None if state.mask is None else state.mask.cpu()))
        _run(adapter, batches, "sink statistics", quiet)

    layers = sorted(probes)
    peak_t = torch.stack([torch.cat([p.flatten() for p in peaks[li]]) for li in layers])  # [L, N]
    references = peak_t.median(dim=1).values.clamp_min(1e-12)
    ratios = peak_t / references.unsqueeze(1)
    report.probe_max_ratio = [round(float(r), 2) for r in ratios.max(dim=1).values]
    emergence_idx = find_emergence_layer(ratios.max(dim=1).values, cfg.alpha)
    if emergence_idx is None:
        report.notes.append(f"no token exceeds alpha={cfg.alpha:g} x the median token peak at any probe: "
                            "no massive activations, sink handling disabled (plain per-tensor quantization)")
        plan["sinks"] = None
        return None
    emergence = layers[emergence_idx]
    shape_bt = [p.shape for p in peaks[emergence]]
    sink_flat = ratios[emergence_idx] > cfg.alpha
    known_flat = torch.cat([(m if m is not None else torch.zeros(s, dtype=torch.bool)).flatten()
                            for m, s in zip(known_masks, shape_bt)]) if known_kinds else None
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
    content_sinks = sink_flat.clone()
    all_sinks = sink_flat | known_flat if (known_kinds and known_flat is not None) else sink_flat

    # per-sequence sink counts -> number of template types K (the most common count)
    seq_masks = torch.split(all_sinks, [s.numel() for s in shape_bt])
    per_seq = []
    for m, s in zip(seq_masks, shape_bt):
        per_seq += [row.nonzero().flatten().tolist() for row in m.view(s)]
    counts = torch.tensor([len(p) for p in per_seq])
    k = int(torch.mode(counts[counts > 0]).values) if bool((counts > 0).any()) else 1
    protected: list = []
    if fixed_types is not None:  # one type per known token kind + one shared by content-detected sinks
        k = len(fixed_types) + 1
        state.num_known_types = len(fixed_types)
        report.type_names = list(fixed_types) + ["content"]
        protected = list(adapter.head_sink_types(known_kinds))
        report.protected_types = protected
    report.num_types = k
    report.calib_sink_positions = per_seq
    state.num_types = k

    norms = torch.stack([torch.cat([r.flatten() for r in res_norms[li]]) for li in range(n_layers)])
    sink_norm = norms[:, all_sinks].mean(dim=1)
    report.sink_residual_norm = [round(float(v), 2) for v in sink_norm]
    cancellation = find_cancellation_layer(sink_norm, emergence)
    stages = {"stage2": emergence}
    alphas = {"stage2": float(cfg.alpha)}
    refs = {"stage2": float(references[emergence_idx])}
    if cfg.stage1 == "auto":
        found = choose_stage1(ratios, content_sinks, emergence_idx, cfg.stage1_margin, cfg.stage1_min_recall)
        if found is not None:
            idx, alpha0, recall = found
            stages["stage1"] = layers[idx]
            alphas["stage1"] = alpha0
            refs["stage1"] = float(references[idx])
            report.stage1_recall = recall
    report.emergence_layer, report.cancellation_layer = emergence, cancellation
    report.stages, report.alphas, report.known_sinks = stages, alphas, known_kinds

    # ---- pass 2: templates ----------------------------------------------------------
    first_guard = 0 if (known_kinds or not templates) else min(stages.values())
    sink_plan = {"stages": stages, "alphas": alphas, "references": refs, "num_types": k,
                 "known_sinks": known_kinds, "first_guard_layer": first_guard,
                 "emergence_layer": emergence, "cancellation_layer": cancellation,
                 "exclude_from_calibration": cfg.exclude_from_calibration,
                 "restore_layer": cancellation if (templates and cfg.restore_residual and cancellation is not None)
                 else None,
                 "num_known_types": state.num_known_types, "protected_types": protected,
                 "guard_modes": {}}
    for (li, name), q in wrapped.items():
        if li >= first_guard:
            sink_plan["guard_modes"][q.name] = "fp-row"
    _install_sink_modules(adapter, wrapped, sink_plan, state, hooks, num_types=k)
    if not templates:  # prefix: full-precision sink rows everywhere, nothing more to calibrate
        report.layer_modes = {li: "fp-row" for (li, _name) in wrapped}
        sink_plan["det_templates"] = {}
        plan["sinks"] = sink_plan
        return state
    recorders = {}
    for q in wrapped.values():
        if q.guard is not None:
            q.guard.recorder = recorders.setdefault(q.name, [])
    det_records: dict[str, list] = {s: [] for s in stages}
    res_records: list = []
    restore_layer = sink_plan["restore_layer"]
    with HookManager() as tmp:
        for (li, name), q in wrapped.items():
            if q.detector is not None:
                stage = q.detector.stage
                tmp.forward(q, lambda m, inp, out, stage=stage: det_records[stage].append(
                    (state.rows(inp[0]).float().cpu(), None if state.mask is None else state.mask.reshape(-1).cpu(),
                     None if state.types is None else state.types.reshape(-1).cpu())))
        if restore_layer is not None:
            blocks[restore_layer].vtquant_restore.enabled = False
            tmp.forward(blocks[restore_layer], lambda m, inp, out: res_records.append(
                (state.rows(adapter.block_output(out)).float().cpu(), state.mask.reshape(-1).cpu(),
                 state.types.reshape(-1).cpu()) if state.mask is not None else None))
        found = search.detected_sinks(lambda: state.positions(),
                                      lambda after: _run(adapter, batches, "sink templates", quiet, after=after))
        if fp_sinks is not None:  # pass 2 runs the deployed detectors on the full-precision model
            fp_sinks.append(found)
    if restore_layer is not None:
        blocks[restore_layer].vtquant_restore.enabled = True

    type_cos: dict[tuple[int, int], float] = {}  # (layer, type) -> min cosine over the layer's Linears
    layer_spread: dict[int, float] = {}
    for (li, name), q in wrapped.items():
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
    for (li, name), q in wrapped.items():
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
        sink_plan["guard_modes"][q.name] = mode
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
            state.det_templates[stage] = det
    if restore_layer is not None:
        rows = [r for r in res_records if r is not None]
        if rows:
            h = torch.cat([r[0][r[1]] for r in rows])
            t = torch.cat([r[2][r[1]] for r in rows]).clamp_min(0)
            restore = blocks[restore_layer].vtquant_restore
            for i in range(k):
                if bool((t == i).any()):
                    mean, cos, _ = template_statistics(h[t == i])
                    restore.template[i] = mean.to(restore.template)
                    # restore only residual states that are (nearly) constant across inputs
                    restore.restore_type[i] = cos >= cfg.template_min_cosine and i not in protected
                else:
                    restore.restore_type[i] = False
            if not bool(restore.restore_type.any()):
                report.notes.append(f"sink residual after layer {restore_layer} is not constant across inputs: "
                                    "not restored")
        report.restore_layer = restore_layer
    sink_plan["det_templates"] = {s: v.tolist() for s, v in state.det_templates.items()}
    plan["sinks"] = sink_plan
    return state


def _install_sink_modules(adapter: Any, wrapped: dict, sink_plan: dict, state: SinkState,
                          hooks: HookManager, num_types: int) -> None:
    """Create detectors, guards and the residual restore of ``sink_plan``, sharing ``state``."""
    state.num_types = num_types
    state.num_known_types = sink_plan.get("num_known_types")
    probe = adapter.probe_name()
    stage_of_layer = {layer: stage for stage, layer in sink_plan["stages"].items()}
    for (li, name), q in wrapped.items():
        if name == probe and li in stage_of_layer:
            stage = stage_of_layer[li]
            q.detector = SinkDetector(stage, sink_plan["alphas"][stage], sink_plan["references"][stage])
            q.detector.state = state
        mode = sink_plan["guard_modes"].get(q.name)
        if mode is not None:
            q.guard = SinkGuard(q.out_features, num_types, mode,
                                exclude_from_calibration=sink_plan.get("exclude_from_calibration", True))
            q.guard.state = state
    adapter.install_known_sinks(state, sink_plan["known_sinks"], hooks)
    if sink_plan.get("restore_layer") is not None:
        restore = ResidualRestore(adapter.hidden_size(), num_types)
        restore.state = state
        _attach_restore(adapter, hooks, adapter.blocks()[sink_plan["restore_layer"]], restore)
    for stage, det in sink_plan.get("det_templates", {}).items():
        state.det_templates[stage] = torch.tensor(det)


def _install_kv_quantizers(adapter: Any, wrapped: dict, kv: ActArgs) -> None:
    """Key / value cache quantizers on the outputs of the adapter's key and value projections."""
    from .quant import ActQuantizer

    names = tuple(adapter.kv_linears())
    if not names:
        raise ConfigError(f"recipe.kv_cache: {type(adapter).__name__} has no key / value cache "
                          "(encoders attend over the whole input at once); set kv_cache: null")
    found = [(li, n) for (li, n) in wrapped if n in names]
    missing = [f"layers.{li}.{n}" for li in range(len(adapter.blocks())) for n in names if (li, n) not in wrapped]
    if missing:
        raise ConfigError(f"recipe.kv_cache quantizes the outputs of {list(names)}, but {missing[:4]}"
                          f"{' ...' if len(missing) > 4 else ''} are in `ignore`; remove them from ignore "
                          "or set kv_cache: null")
    for key in found:
        q = wrapped[key]
        q.out_act = ActQuantizer(kv).to(q.dequantized_weight().device)


def _clip_search(adapter: Any, wrapped: dict, leaders: dict, samples: dict, state: Optional[SinkState],
                 s_fp: Optional[set], record_positions: Any, report: QuantReport, plan: dict) -> None:
    """Activation / cache clip search, then the structure check (sink set of the quantized model = FP's).

    The sink set is decided by the detectors at the stage layers, from inputs that only the layers up
    to the last stage layer shape; so if the sets differ after the search, the search is undone in
    exactly those layers (deeper layers cannot change detection) and the check is repeated once.  If
    that does not improve the structure (higher R, then fewer extra sinks), the difference comes
    from quantization itself, not from the search: the searched scales are restored and reported.
    """
    ratios = search.search_activation_clips(wrapped, leaders, samples)
    info: dict = {"structure_recall": None, "undone_layers": []}
    note = "activation clip search"
    if state is not None and s_fp is not None:
        s_q = record_positions("sink set (quantized)")
        recall, extra = search.structure_recall(s_q, s_fp)
        first = (recall, extra)
        stages = (plan.get("sinks") or {}).get("stages") or {}
        last_stage = max(stages.values()) if stages else max(li for li, _ in wrapped)
        undone: list = []
        if recall is not None and (recall < 1.0 or extra > 0):
            undone = sorted({li for li, _ in wrapped if li <= last_stage})
            keys = [k for k in wrapped if k[0] in undone]
            searched = {k: (wrapped[k].act.clip_ratio if wrapped[k].act is not None else None,
                            wrapped[k].out_act.clip_ratio if wrapped[k].out_act is not None else None) for k in keys}
            search.reset_activation_clips(wrapped, keys)
            s_q = record_positions("sink set (quantized, search undone)")
            recall, extra = search.structure_recall(s_q, s_fp)
            if (recall, -extra) <= (first[0], -first[1]):  # undoing did not improve the structure: keep the search
                for k, (ra, rk) in searched.items():
                    for quantizer, ratio in ((wrapped[k].act, ra), (wrapped[k].out_act, rk)):
                        if quantizer is not None and ratio is not None and quantizer.static:
                            quantizer.clip_ratio = ratio
                            quantizer.finalize()
                kept = undone
                undone = []
                minmax = (recall, extra)
                recall, extra = first
            else:
                kept = []
                for name in list(ratios):
                    if int(name.split(".")[1]) in undone:
                        ratios[name] = {**ratios[name], **({"act": 1.0} if "act" in ratios[name] else {}),
                                        **({"kv": 1.0} if "kv" in ratios[name] else {})}
        else:
            kept = []
        info.update(structure_recall=recall, extra_sinks=extra, undone_layers=undone, fp_sinks=len(s_fp),
                    recall_with_search=first[0], extra_with_search=first[1])
        report.structure_recall = recall
        structure = (f"structure R = {recall if recall is None else round(recall, 4)} over {len(s_fp)} FP sinks"
                     f" ({extra} extra)")
        if undone:
            structure += (f" after undoing the search in layers {_ranges(undone)} (with it: R = {round(first[0], 4)}, "
                          f"{first[1]} extra)")
        if kept:
            structure += (f"; MinMax scales in layers {_ranges(kept)} do not do better (R = {round(minmax[0], 4)}, "
                          f"{minmax[1]} extra): the difference comes from quantization itself, not from the search, so "
                          "the searched scales are kept")
    act = [v["act"] for v in ratios.values() if "act" in v]
    kvr = [v["kv"] for v in ratios.values() if "kv" in v]
    info.update(act_mean_clip=round(sum(act) / len(act), 4) if act else None,
                kv_mean_clip=round(sum(kvr) / len(kvr), 4) if kvr else None,
                ratios={name: v for name, v in sorted(ratios.items())})
    note += f": mean clip {info['act_mean_clip']}"
    if kvr:
        note += f", cache mean clip {info['kv_mean_clip']}"
    if state is not None and s_fp is not None:
        note += "; " + structure
    report.notes.append(note)
    plan["act_clip_search"] = info


def apply_plan_(model: nn.Module, adapter: Any, plan: dict) -> None:
    """Rebuild a quantized structure (empty buffers) from ``plan`` on a freshly built model.

    Used when loading a checkpoint: the state dict then fills every buffer.
    """
    hooks = HookManager()
    if plan["method"] == "fp":
        model.vtquant = QuantHandle(plan, None, hooks, adapter)
        return
    if plan.get("rotation"):
        adapter.rotation_spec().untie()
        spec = adapter.rotation_spec()
        for layer in spec.layers:
            for norm, _ in layer.norm_readers:
                spec.set_norm_identity(norm)
        if spec.final_norm_readers is not None:
            spec.set_norm_identity(spec.final_norm_readers[0])
    weights = WeightArgs(**plan["weights"]) if plan.get("weights") else None
    acts = ActArgs(**plan["activations"]) if plan.get("activations") else None
    wrapped = _wrap_linears(adapter, plan["ignore"], skeleton_weights=weights)
    for q in wrapped.values():
        if q.name in plan.get("online_rotation", {}):
            signs, factors = random_hadamard_factors(q.in_features, plan["rotation"]["seed"] + 1)
            q.set_input_rotation(signs, factors)
        if acts is not None:
            from .quant import ActQuantizer

            q.act = ActQuantizer(acts)
            q.act.mode = "quant"
    if plan.get("kv_cache"):
        _install_kv_quantizers(adapter, wrapped, ActArgs(**plan["kv_cache"]))
        for q in wrapped.values():
            if q.out_act is not None:
                q.out_act.mode = "quant"
    state = None
    if plan.get("sinks"):
        state = SinkState(layout=adapter.token_layout, num_types=plan["sinks"]["num_types"])
        _install_sink_modules(adapter, wrapped, plan["sinks"], state, hooks, plan["sinks"]["num_types"])
    model.vtquant = QuantHandle(plan, state, hooks, adapter)
