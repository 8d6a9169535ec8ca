"""prepare -> calibrate -> convert, model-family free (torchao's static flow, docs/method.md steps 1-6).

:func:`quantize_model_` runs one pipeline for every method; the method's handler
(:mod:`vtquant.core.methods`) adds its steps at fixed hooks:

1. optional rotation of the full-precision model (:mod:`vtquant.core.rotation`), then the
   handler's ``on_transform`` (SmoothQuant's smoothing); each checks on one calibration batch that
   the model's function is unchanged (:mod:`vtquant.core.verify`) and refuses it otherwise;
2. every target Linear becomes a :class:`QuantLinear` (still full precision);
3. the handler's ``on_sinks``: the sink calibrator (:mod:`vtquant.core.calibrate`) returns a
   :class:`~vtquant.core.plan.SinkPlan` and installs detectors, guards and the residual restore;
4. weights: RTN, or GPTQ / weight clip search from Hessians of the inputs the Linears really see;
5. activation (and KV-cache) quantizers; one pass calibrates static scales with sink rows
   excluded; the optional clip search and its structure check follow.

All forward passes go through one pass runner: :class:`PassRunner` (whole-model forwards) or
:class:`~vtquant.core.sequential.SequentialRunner` (``pipeline="sequential"``: block by block, one block
on the accelerator at a time, the same plan and weights); with GPTQ each layer's weights are quantized
as soon as its Hessians are complete, so the sequential runner holds one block's Hessians at a time.
The model is calibrated where it sits, in its dtype; every module added is created beside the Linear
or block it serves.  The result is a frozen
:class:`~vtquant.core.plan.QuantPlan` on ``model.vtquant``; :func:`apply_plan_` rebuilds that
structure on a fresh model (for loading checkpoints).  On any failure the model is given back
as it was (wrappers and hooks removed, transformed weights restored).
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, Union

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..config import ActArgs, ConfigError, Recipe, WeightArgs
from . import search
from .calibrate import install_sink_modules
from .hooks import HookManager
from .methods import QuantMethod, get_method
from .modules import replace_module
from .plan import QuantPlan, SinkPlan
from .quant import ActQuantizer, QuantLinear
from .rotation import random_hadamard_factors, rotate_model_
from .rotation_ln import LNRotationSpec, apply_ln_rotation_structure_, rotate_ln_model_
from .sinks import SinkState
from .verify import EquivalenceError, check_equivalence, compare, snapshot, unrotate

if TYPE_CHECKING:
    from ..adapters.base import ModelAdapter

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
    restore_spread: dict = field(default_factory=dict)
    restore_candidates: list = field(default_factory=list)
    type_names: list = field(default_factory=list)
    protected_types: list = field(default_factory=list)
    structure_recall: Optional[float] = None
    equivalence: dict = field(default_factory=dict)
    detection_rule: Optional[str] = None
    probes: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        lines = [f"method: {self.method} ({self.seconds:.1f} s)"]
        if self.stages:  # sinks were handled
            lines.append(f"emergence layer: {self.emergence_layer}, cancellation layer: {self.cancellation_layer}, "
                         f"stages: {self.stages}, alphas: { {k: round(v, 2) for k, v in self.alphas.items()} }"
                         + (f", rule: {self.detection_rule}" if self.detection_rule else ""))
            lines.append(f"template types: {self.num_types}, known sinks: {self.known_sinks} "
                         f"(confirmed by content in {self.known_confirmed if self.known_confirmed is None else round(100 * self.known_confirmed)} % of inputs)")
            modes = {}
            for layer, mode in self.layer_modes.items():
                modes.setdefault(mode, []).append(int(layer))
            lines.append("guard modes by layer: " + "; ".join(f"{m}: {_ranges(v)}" for m, v in modes.items()))
            if self.restore_layer is not None:
                lines.append(f"residual restored after layer {self.restore_layer}")
        lines += self.detection_lines()
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


    def detection_lines(self) -> list[str]:
        """What each probe showed, compactly: the stages and why, outlier channels, where nothing was found."""
        if not self.probes:
            return []
        lines = []
        for p in self.probes:
            if p["decision"].startswith("stage"):
                lines.append(f"detection {p['decision'].split(' ')[0]} at {_site(p)}: {p['why']}")
        channels: dict = {}
        for p in self.probes:
            for c in p.get("outlier_channels") or []:
                entry = channels.setdefault(c["channel"], {"layers": [], "times": [], "share": []})
                entry["layers"].append(p["layer"])
                entry["times"].append(c["times_typical"])
                if c.get("tokens_share") is not None:
                    entry["share"].append(c["tokens_share"])
        for ch, e in channels.items():
            share = f", large on {100 * min(e['share']):.0f}-{100 * max(e['share']):.0f} % of tokens" if e["share"] else ""
            lines.append(f"outlier channel {ch} at block outputs {_ranges(e['layers'])} ({min(e['times']):g}-"
                         f"{max(e['times']):g}x the typical channel{share}): an always-on feature, not sinks (the "
                         "per-channel baseline takes it out of the sink score; rotation / smoothing handles it)")
        quiet = [p for p in self.probes if p["decision"] == "no outlier"]
        if quiet:
            worst = max(quiet, key=lambda p: p["max_ratio"] / p["fence"])
            by_site: dict = {}
            for p in quiet:
                by_site.setdefault(p["site"], []).append(p["layer"])
            lines.append("no sink at " + "; ".join(f"{site} {_ranges(v)}" for site, v in by_site.items())
                         + f" (closest: {_site(worst)}, largest ratio {worst['max_ratio']:g} <= fence {worst['fence']:g})")
        other = [p for p in self.probes if not p["decision"].startswith("stage") and p["decision"] != "no outlier"]
        for p in other:
            lines.append(f"{_site(p)}: {p['decision']}")
        return lines

    def detection_table(self) -> str:
        """Every probe, one line each: site, layer, reference, largest ratio vs threshold, decision and why."""
        rows = [f"{'site':<28} {'layer':>5} {'reference':>10} {'max ratio':>10} {'fence':>7} {'alpha':>6}  decision / why"]
        for p in self.probes:
            alpha = f"{p['alpha']:g}" if "alpha" in p else "-"
            rows.append(f"{p['site']:<28} {p['layer']:>5} {p['reference']:>10.4g} {p['max_ratio']:>10.4g} "
                        f"{p['fence']:>7.3g} {alpha:>6}  {p['decision']}: {p['why']}")
        return "\n".join(rows)


def _site(p: dict) -> str:
    if p["site"] == "probe":
        return f"probe-Linear input {p['layer']}"
    if p["site"] == "residual":
        return f"block output {p['layer']}"
    return f"{p['site'][len('input:'):]} input {p['layer']}"


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
    """Lives on a quantized model as ``model.vtquant``: its plan, sink state, hooks and report.

    The handle is the one owner of the sink state: it hands the same :class:`SinkState` to every
    detector, guard and restore of the model (``copy.deepcopy`` of the model copies them together).
    """

    def __init__(self, plan: QuantPlan, state: Optional[SinkState], hooks: HookManager,
                 adapter: "ModelAdapter") -> None:
        self.plan = plan
        self.state = state
        self.hooks = hooks
        self.adapter = adapter
        self.report: Optional[QuantReport] = None
        self.recipe: Optional[Recipe] = None
        self.backend: Optional[str] = None  # set by vtquant.kernels.convert_
        self.cpu_kernel: Optional[str] = None

    def sink_positions(self) -> list[list[int]]:
        """Sink positions per batch row of the last forward pass."""
        return self.state.positions() if self.state is not None else []


class PassRunner:
    """Owns the forward passes over the calibration batches (llm-compressor's basic pipeline).

    Args:
        adapter: runs one batch (``adapter.forward``).
        batches: the calibration batches.
        quiet: no progress bars.
    """

    def __init__(self, adapter: "ModelAdapter", batches: list, quiet: bool = False) -> None:
        self.adapter = adapter
        self.batches = batches
        self.quiet = quiet
        self.passes = 0

    sequential = False

    def run(self, desc: str, after: Optional[Callable[[], None]] = None,
            after_block: Optional[Callable[[int], None]] = None) -> None:
        """One pass over every batch without gradients; ``after()`` runs after each batch.

        ``after_block(layer)`` runs for every block, in order, once the pass is over (the sequential
        runner calls it as soon as that block has seen every batch).
        """
        self.passes += 1
        with torch.no_grad():
            for batch in tqdm(self.batches, desc=desc, disable=self.quiet, leave=False):
                self.adapter.forward(batch)
                if after is not None:
                    after()
            if after_block is not None:
                for layer in range(len(self.adapter.blocks())):
                    after_block(layer)


@dataclass
class QuantContext:
    """What the pipeline and the method hooks share while one model is quantized."""

    model: nn.Module
    adapter: "ModelAdapter"
    recipe: Recipe
    runner: PassRunner
    hooks: HookManager
    report: "QuantReport"
    wrapped: dict = field(default_factory=dict)
    smoothquant: Optional[dict] = None
    fp_sinks: Optional[set] = None  # sink set the deployed detectors find on the full-precision model


# ------------------------------------------------------------------------------------------
def _ignore_match(pattern: str, names: tuple[str, ...]) -> bool:
    """``re:REGEX`` (full match, llm-compressor style) or a dotted suffix of any of ``names``."""
    if pattern.startswith("re:"):
        return any(re.fullmatch(pattern[3:], n) for n in names)
    return any(n == pattern or n.endswith("." + pattern) for n in names)


def _target_linears(adapter: "ModelAdapter", ignore: Iterable[str],
                    notes: Optional[list] = None) -> list[tuple[int, str, nn.Module, nn.Module]]:
    """``[(layer, relative name, block, Linear)]`` of the quantization targets, ``ignore`` applied.

    An ignore entry is matched against each Linear's relative name (``mlp.down_proj``), its layer
    name (``layers.3.mlp.down_proj``) and its module name in the model; entries that match no Linear
    of the model at all are reported (a typo would otherwise quantize what the user meant to keep).
    """
    ignore = list(ignore)
    full_names = {id(m): n for n, m in adapter.model.named_modules()}
    used: set = set()
    out = []
    for li, block in enumerate(adapter.blocks()):
        for name, lin in adapter.block_linears(block).items():
            names = (name, f"layers.{li}.{name}", full_names.get(id(lin), ""))
            hits = [pat for pat in ignore if _ignore_match(pat, names)]
            used.update(hits)
            if not hits:
                out.append((li, name, block, lin))
    unused = [p for p in ignore if p not in used]
    if unused:
        linear_names = tuple(n for n, m in adapter.model.named_modules()
                             if isinstance(m, (nn.Linear, QuantLinear)))
        unused = [p for p in unused if not _ignore_match(p, linear_names)]
    if unused:
        msg = (f"recipe.ignore entries {unused} match no Linear of {type(adapter.model).__name__}; they have no "
               "effect (entries are dotted name suffixes such as mlp.down_proj or layers.0.mlp.down_proj, or "
               "re:REGEX)")
        log.warning(msg)
        if notes is not None:
            notes.append(msg)
    return out


def _wrap_linears(adapter: "ModelAdapter", ignore: Iterable[str], skeleton_weights: Optional[WeightArgs] = None,
                  online: Optional[dict] = None, undo: Optional["_Undo"] = None,
                  notes: Optional[list] = None) -> dict[tuple[int, str], QuantLinear]:
    online = online or {}
    wrapped = {}
    rotated: set = set()
    for li, name, block, lin in _target_linears(adapter, ignore, notes):
        if isinstance(lin, QuantLinear):
            wrapped[(li, name)] = lin
            continue
        q = QuantLinear(lin, skeleton_weights, None, name=f"layers.{li}.{name}",
                        skeleton=skeleton_weights is not None)
        if lin in online:
            q.set_input_rotation(*online[lin])
            rotated.add(id(lin))
        old = replace_module(block, name, q)
        if undo is not None:
            undo.replaced.append((block, name, old))
        wrapped[(li, name)] = q
    left = [lin for lin in online if id(lin) not in rotated]
    if left:
        raise ConfigError(f"rotation.online folded an input rotation into {len(left)} Linear(s) that `ignore` keeps "
                          "unwrapped, so nothing would rotate their input; remove the MLP second Linears from ignore "
                          "or set rotation.online: false")
    return wrapped


class _Undo:
    """Gives a model back as it was when quantization fails half way.

    Wrapped Linears are put back (the originals are untouched by wrapping), hooks removed and
    ``model.vtquant`` dropped.  With a weight transform (rotation, smoothing) every parameter and
    buffer is also copied to the CPU first and restored, parameter objects included.
    """

    def __init__(self, model: nn.Module, hooks: HookManager, transforms: bool) -> None:
        self.model = model
        self.hooks = hooks
        self.replaced: list = []
        self.tensors: list = []
        self.config: Optional[dict] = None
        if transforms:
            for module in model.modules():
                for pname, p in list(module._parameters.items()) + list(module._buffers.items()):
                    if p is not None:
                        self.tensors.append((module, pname, p, p.detach().to("cpu", copy=True)))
            config = getattr(model, "config", None)
            self.config = dict(vars(config)) if config is not None and hasattr(config, "__dict__") else None
            self.tied = getattr(model, "_tied_weights_keys", None)

    def restore(self) -> None:
        self.hooks.remove()
        for block, name, old in reversed(self.replaced):
            replace_module(block, name, old)
        for module, pname, p, saved in self.tensors:
            with torch.no_grad():
                p.data = saved.to(p.device)
            store = module._parameters if pname in module._parameters else module._buffers
            store[pname] = p
        if self.config is not None:
            vars(self.model.config).clear()
            vars(self.model.config).update(self.config)
            if hasattr(self.model, "_tied_weights_keys"):
                self.model._tied_weights_keys = self.tied
        for module in self.model.modules():
            for key in ("vtquant_restore", "vtquant_detect", "vtquant_unrotate"):
                if key in module._modules:
                    del module._modules[key]
        if "vtquant" in vars(self.model):
            del self.model.vtquant


def _check_batches(batches: Iterable) -> list:
    if batches is None:
        raise ConfigError("calibration data is None: pass a list of batches (e.g. token id tensors [B, T])")
    batches = list(batches)
    if not batches:
        raise ConfigError("calibration data is empty: pass at least one batch (token id tensors [B, T], "
                          "dicts with input_ids / attention_mask, or image tensors [B, 3, H, W])")
    return batches


# ------------------------------------------------------------------------------------------
PIPELINES = ("basic", "sequential")
"""How calibration passes run: ``basic`` (whole-model forwards) or ``sequential`` (block by block)."""


def make_runner(adapter: "ModelAdapter", batches: list, quiet: bool = False, pipeline: str = "basic",
                device: Any = None, cache_device: Any = None) -> Any:
    """The pass runner of ``pipeline`` (see :data:`PIPELINES`)."""
    if pipeline not in PIPELINES:
        raise ConfigError(f"pipeline {pipeline!r}: choose one of {list(PIPELINES)}")
    if pipeline == "basic":
        if device is not None or cache_device is not None:
            raise ConfigError("device / cache_device apply to pipeline='sequential' (block-by-block offload); "
                              "with pipeline='basic' move the model with model.to(device) first")
        return PassRunner(adapter, batches, quiet)
    from .sequential import SequentialRunner

    return SequentialRunner(adapter, batches, quiet, device=device, cache_device=cache_device)


def quantize_model_(model: nn.Module, adapter: "ModelAdapter", recipe: Recipe, batches: Iterable,
                    quiet: bool = False, pipeline: str = "basic", device: Any = None,
                    cache_device: Any = None) -> QuantReport:
    """Quantize ``model`` in place following ``recipe``, calibrating on ``batches``.

    The model is calibrated where it sits (CPU or GPU) in its dtype (float32, bfloat16, float16);
    every module the pipeline adds is created beside the Linear or block it serves, in its dtype
    (statistics, scales and Hessians are kept in float32 / float64).  On any error the model is left
    as it was (see :class:`_Undo`) and the error is raised.

    Args:
        model: the full-precision model (modified in place).
        adapter: its :class:`~vtquant.adapters.ModelAdapter`.
        recipe: the validated recipe.
        batches: calibration inputs, each accepted by ``adapter.forward``.
        quiet: no progress bars.
        pipeline: ``basic`` (whole-model passes) or ``sequential`` (block by block, see
            :mod:`vtquant.core.sequential`: the same plan and weights, one block's weights and Hessians
            on the accelerator at a time).
        device: sequential only: the device each block runs on (e.g. ``cuda`` for a model kept on the
            CPU); default: where the model is.
        cache_device: sequential only: where cached block inputs wait (default: ``device``).
    """
    start = time.time()
    handler = get_method(recipe.method)
    report = QuantReport(method=recipe.display_method)
    hooks = HookManager()
    if not handler.quantizes:
        model.vtquant = QuantHandle(_base_plan(recipe), None, hooks, adapter)
        report.seconds = time.time() - start
        model.vtquant.report = report
        return report
    batches = _check_batches(batches)
    runner = make_runner(adapter, batches, quiet, pipeline, device, cache_device)
    ctx = QuantContext(model, adapter, recipe, runner, hooks, report)
    transforms = recipe.rotation.enabled or type(handler).on_transform is not QuantMethod.on_transform
    undo = _Undo(model, hooks, transforms=transforms)
    try:
        plan, state = _quantize(ctx, handler, undo)
    except BaseException:
        undo.restore()
        raise
    model.vtquant = QuantHandle(plan, state, hooks, adapter)
    report.seconds = time.time() - start
    model.vtquant.report = report
    return report


SINK_CHECK_LIMIT = 1.0
"""Largest per-row relative error of the final output that clamp-and-insert (quantization off) may
cause before quantization is refused: templates are means, so a few per cent is normal where the
sinks' inputs are nearly constant; a model whose sinks are clamped but not restored is off by far
more than 100 % (the clamp-only ablation, ``sinks.insert: false``, is not checked)."""


def _check_clamp_and_insert(adapter: "ModelAdapter", reference: Any, batch: Any, report: QuantReport,
                            restore_layer: Optional[int] = None) -> None:
    """Clamp-and-insert with quantization off against the full-precision model on one calibration batch.

    Sink types whose residual state passed the cosine test but spread more than the restore rule allows
    (``report.restore_candidates``) are measured both ways here: restored from their template or not; the
    choice with the smaller output error is kept and the report says so."""
    result = compare(adapter, reference, batch, "clamp-and-insert (quantization off)")
    cands = list(report.restore_candidates)
    if cands and restore_layer is not None and result.output_error is not None:
        restore = adapter.blocks()[restore_layer].vtquant_restore
        before = restore.restore_type.clone()
        restore.restore_type[cands] = True
        alt = compare(adapter, reference, batch, "clamp-and-insert (quantization off)")
        spreads = ", ".join(f"{report.restore_spread.get(i, float('nan')):.3g}" for i in cands)
        if alt.output_error is not None and alt.output_error < result.output_error:
            report.notes.append(f"sink residual after layer {restore_layer}: type(s) {cands} spread {spreads} across "
                                f"inputs, restored anyway: measured output error {alt.output_error:.3g} restored vs "
                                f"{result.output_error:.3g} not restored")
            report.restore_layer = restore_layer
            result = alt
        else:
            restore.restore_type.copy_(before)
            report.notes.append(f"sink residual after layer {restore_layer}: type(s) {cands} (spread {spreads}) not "
                                f"restored: measured output error {result.output_error:.3g} vs "
                                f"{'-' if alt.output_error is None else format(alt.output_error, '.3g')} restored")
    report.equivalence["sinks"] = {**result.to_dict(), "limit": SINK_CHECK_LIMIT}
    worst = result.worst_block
    where = "" if worst is None else f", worst block {worst} ({result.block_errors[worst]:.2e})"
    if result.output_error is None:
        report.notes.append(f"clamp-and-insert with quantization off{where} (no tensor output to compare)")
        return
    report.notes.append(f"clamp-and-insert with quantization off: final output {result.output_error:.2e}{where} "
                        f"({result.measure}; refused above {SINK_CHECK_LIMIT:g})")
    if result.output_error > SINK_CHECK_LIMIT:
        raise EquivalenceError(
            f"clamp-and-insert with quantization off changes the output of {type(adapter.model).__name__} by "
            f"{result.output_error:.3g} ({result.measure}; limit {SINK_CHECK_LIMIT:g}){where}: the inserted templates do not "
            "restore what the clamped sinks carried. The model is left unchanged. Try sinks.template_min_cosine "
            "closer to 1 (more full-precision sink rows), sinks.restore_residual: true, or method naive-static.",
            "clamp-and-insert", result)


def _base_plan(recipe: Recipe) -> QuantPlan:
    return QuantPlan(method=recipe.method, display_method=recipe.display_method, weights=recipe.weights,
                     activations=recipe.activations, kv_cache=recipe.kv_cache, ignore=tuple(recipe.ignore))


def _quantize(ctx: QuantContext, handler: Any, undo: _Undo) -> tuple[QuantPlan, Optional[SinkState]]:
    recipe, adapter, report, runner = ctx.recipe, ctx.adapter, ctx.report, ctx.runner

    # 1. function-preserving transforms of the full-precision model: rotation, then the method's own
    online: dict = {}
    rotation = None
    if recipe.rotation.enabled:
        rot = recipe.rotation
        spec = adapter.rotation_spec()
        reference = snapshot(adapter, runner.batches[0])
        if isinstance(spec, LNRotationSpec):  # LayerNorm towers (ViT, CLIP): projected norms, un-rotated at the end
            result = rotate_ln_model_(spec, seed=rot.seed, residual=rot.residual, online=rot.online, heads=rot.heads,
                                      hooks=ctx.hooks, replaced=undo.replaced)
        else:
            result = rotate_model_(spec, seed=rot.seed, residual=rot.residual, online=rot.online, heads=rot.heads)
        online = result["online"]
        report.notes.extend(result["notes"])
        layout = getattr(spec, "layout", None) or type(adapter).__name__
        check = check_equivalence(
            adapter, reference, runner.batches[0], "rotation",
            basis=None if result["residual"] is None else unrotate(result["residual"]), input_rotations=online,
            hint=f"The adapter describes the model as {layout}; if that is wrong, the "
                 "layout is not supported: set rotation.enabled: false (or rotation.residual: false, which keeps the "
                 "online and per-head rotations that need no layout knowledge). In float16 / bfloat16 the rotation's own "
                 "rounding can be the cause (a massive activation spread over every channel): quantizing in float32 "
                 "tells the two apart.")
        report.equivalence["rotation"] = {**check.to_dict(), "residual_folded": result["residual"] is not None}
        report.notes.append(check.note())
        rotation = rot
    handler.on_transform(ctx)

    # 2. wrap every target Linear (full precision for now)
    check_sinks = handler.handles_sinks and recipe.sinks.enabled and recipe.sinks.insert
    before_sinks = snapshot(adapter, runner.batches[0], input_rotations=online) if check_sinks else None
    ignore_notes: list = []
    wrapped = _wrap_linears(adapter, recipe.ignore, online=online, undo=undo, notes=ignore_notes)
    ctx.wrapped = wrapped

    # 3. sinks (the method's calibrator installs detectors, guards and the residual restore)
    sink_plan, state = handler.on_sinks(ctx)
    if before_sinks is not None and sink_plan is not None:
        _check_clamp_and_insert(adapter, before_sinks, runner.batches[0], report, sink_plan.restore_layer)

    leaders = search.input_group_leaders(adapter, wrapped)
    acts, kv = recipe.activations, recipe.kv_cache
    wargs = recipe.weights.resolved() if recipe.weights is not None else None
    clip_search = bool(acts is not None and acts.static and acts.clip_search)
    s_fp: Optional[set] = ctx.fp_sinks  # recorded by the templates pass

    def record_positions(desc: str) -> set:
        return search.detected_sinks(lambda: state.positions(), lambda after: runner.run(desc, after=after))

    # 4. weights: RTN, or GPTQ / clip search from the Hessians of the inputs the Linears really see
    # each layer's weights are quantized as soon as its Hessians are complete (after the whole pass,
    # or, sequentially, after its block), from inputs computed with full-precision weights
    weight_info = None
    weights = search.WeightQuantizer(wrapped, wargs, leaders, quiet=runner.quiet) if wargs is not None else None
    if wargs is not None and (wargs.algorithm == "gptq" or wargs.clip_search):
        positions: list = []
        # GPTQ's sequential order: block by block, each block run again once its weights are quantized, so the
        # next block's Hessians come from quantized inputs (the basic pipeline borrows the block runner for it)
        seq = wargs.gptq_sequential
        hessian_runner = runner
        if seq and not getattr(runner, "sequential", False):
            from .sequential import SequentialRunner

            hessian_runner = SequentialRunner(adapter, runner.batches, runner.quiet)
        extra = {"rerun_after_block": True} if seq else {}
        if seq and state is not None and clip_search and s_fp is None:  # before any weight is quantized
            s_fp = record_positions("sink set (full precision)")

        def run_hessian_pass(after_block: Callable[[int], None]) -> None:
            if state is not None and clip_search and s_fp is None:
                positions.append(search.detected_sinks(
                    lambda: state.positions(),
                    lambda after: hessian_runner.run("Hessians (GPTQ)", after=after, after_block=after_block,
                                                     **extra)))
            else:
                hessian_runner.run("Hessians (GPTQ)", after_block=after_block, **extra)

        search.collect_hessians(wrapped, leaders, run_hessian_pass, on_layer=weights.quantize_layer)
        if positions:
            s_fp = positions[0]
    if state is not None and clip_search and s_fp is None:  # prefix with RTN weights: one more pass
        s_fp = record_positions("sink set (full precision)")
    if wargs is not None:
        weights.quantize_rest()
        weight_info = weights.info()
        if wargs.algorithm == "gptq":
            report.notes.append(f"weights: GPTQ W{wargs.bits} {wargs.granularity} (damp {wargs.gptq_damp:g}, "
                                f"act_order {wargs.act_order}), Hessians "
                                + ("block by block from inputs through the already-quantized blocks (sequential)"
                                   if wargs.gptq_sequential else "from one calibration pass")
                                + " over the rows that meet the quantized weight")
        if "mean_clip" in weight_info:
            report.notes.append(f"weight clip search: mean clip {weight_info['mean_clip']:.3f}, "
                                f"{100 * weight_info['clipped_share']:.0f} % of rows / groups clipped")
        if weight_info.get("rtn_fallback"):
            report.notes.append(f"GPTQ: no calibration row reached {weight_info['rtn_fallback']}: RTN there")

    # 5. activations (and the key / value cache)
    if acts is not None:
        for qlin in wrapped.values():
            qlin.act = ActQuantizer(acts).to(qlin.device)
    if kv is not None:
        _install_kv_quantizers(adapter, wrapped, kv)
    clip_info = None
    needs_observe = (acts is not None and acts.static) or (kv is not None and kv.static)
    if needs_observe:
        if clip_search:
            samples = search.sample_rows(wrapped, leaders, lambda: runner.run("calibrate activation scales"),
                                         rows_per_batch=max(1, 512 // max(1, len(runner.batches))))
        else:
            runner.run("calibrate activation scales")
        for qlin in wrapped.values():
            for quantizer in (qlin.act, qlin.out_act):
                if quantizer is not None and quantizer.static:
                    quantizer.finalize()
        if clip_search:
            clip_info = _clip_search(wrapped, leaders, samples, state, s_fp, record_positions, report, sink_plan)

    report.notes.extend(ignore_notes)
    plan = QuantPlan(
        method=recipe.method, display_method=recipe.display_method, weights=recipe.weights,
        activations=recipe.activations, kv_cache=recipe.kv_cache, ignore=tuple(recipe.ignore), rotation=rotation,
        targets=tuple(sorted(q.name for q in wrapped.values())),
        online_rotation={q.name: [f.shape[0] for f in q.rot_factors] for q in wrapped.values()
                         if q.has_input_rotation},
        sinks=sink_plan, smoothquant=ctx.smoothquant, weight_search=weight_info, act_clip_search=clip_info)
    return plan, state



def _install_kv_quantizers(adapter: "ModelAdapter", wrapped: dict, kv: ActArgs) -> None:
    """Key / value cache quantizers on the outputs of the adapter's key and value projections."""
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
        q.out_act = ActQuantizer(kv).to(q.device)


def _clip_search(wrapped: dict, leaders: dict, samples: dict, state: Optional[SinkState], s_fp: Optional[set],
                 record_positions: Callable[[str], set], report: QuantReport,
                 sink_plan: Optional[SinkPlan]) -> dict:
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
        last_stage = sink_plan.last_stage_layer if sink_plan is not None else None
        if last_stage is None:
            last_stage = max(li for li, _ in wrapped)
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
    return info


def apply_plan_(model: nn.Module, adapter: "ModelAdapter", plan: Union[QuantPlan, dict]) -> None:
    """Rebuild a quantized structure (empty buffers) from ``plan`` on a freshly built model.

    Used when loading a checkpoint: the state dict then fills every buffer.  ``plan`` may be a
    :class:`QuantPlan` or its dict form (``QuantPlan.to_dict()``, or an older checkpoint's dict).
    """
    if not isinstance(plan, QuantPlan):
        plan = QuantPlan.from_dict(plan)
    hooks = HookManager()
    if not get_method(plan.method).quantizes:
        model.vtquant = QuantHandle(plan, None, hooks, adapter)
        return
    if plan.rotation is not None and isinstance(adapter.rotation_spec(), LNRotationSpec):
        if plan.rotation.residual:
            apply_ln_rotation_structure_(adapter.rotation_spec(), hooks)
    elif plan.rotation is not None:
        adapter.rotation_spec().untie()
        spec = adapter.rotation_spec()
        for layer in spec.layers:
            for norm, _ in layer.norm_readers:
                spec.set_norm_identity(norm)
        if spec.final_norm_readers is not None:
            spec.set_norm_identity(spec.final_norm_readers[0])
    wrapped = _wrap_linears(adapter, plan.ignore, skeleton_weights=plan.weights)
    for q in wrapped.values():
        if q.name in plan.online_rotation:
            signs, factors = random_hadamard_factors(q.in_features, plan.rotation.seed + 1)
            q.set_input_rotation(signs, factors)
        if plan.activations is not None:
            q.act = ActQuantizer(plan.activations).to(q.device)
            q.act.mode = "quant"
    if plan.kv_cache is not None:
        _install_kv_quantizers(adapter, wrapped, plan.kv_cache)
        for q in wrapped.values():
            if q.out_act is not None:
                q.out_act.mode = "quant"
    state = None
    if plan.sinks is not None:
        state = SinkState(layout=adapter.token_layout, num_types=plan.sinks.num_types)
        install_sink_modules(adapter, wrapped, plan.sinks, state, hooks)
    model.vtquant = QuantHandle(plan, state, hooks, adapter)
