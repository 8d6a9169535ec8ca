"""Typed, versioned quantization plans: what calibration decided, enough to rebuild the model.

A :class:`QuantPlan` is the structure of a quantized model (method, quantizer settings, which
Linears are wrapped, rotation, sink handling); its :class:`SinkPlan` is what the sink
calibrator decided (detection stages and thresholds, template types, per-Linear guard modes,
the residual-restore layer).  Both are frozen dataclasses: the pipeline builds them once and
hands them on, and :func:`~vtquant.core.pipeline.apply_plan_` rebuilds a quantized skeleton from
one (checkpoint loading).  Buffers (weights, scales, templates) are not in the plan: they live
in the model's state dict.

``to_dict`` / ``from_dict`` give the JSON form written into checkpoints; ``from_dict`` also reads
the unversioned dict plans of checkpoints written before plans were typed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from ..config import ActArgs, ConfigError, RotationConfig, WeightArgs, drop_unset_additions

PLAN_VERSION = 1

GUARD_MODES = ("template", "fp-row", "clamp", "off")


def _tuple(values: Any) -> tuple:
    return tuple(values) if values is not None else ()


@dataclass(frozen=True)
class SinkPlan:
    """Sink handling decided by calibration (docs/method.md steps 2-5).

    Attributes:
        stages: detection stage name -> layer index (``stage1`` optional, ``stage2`` the emergence layer).
        alphas: stage name -> ratio threshold.
        references: stage name -> reference (median) token peak at that probe.
        num_types: template types K.
        known_sinks: adapter-known sink kinds in use (``first_token``, ``cls``, ...).
        num_known_types: vision-style fixed types (one per known token kind), ``None`` for LLM order typing.
        protected_types: types whose token a head reads (never replaced by a template).
        first_guard_layer: first layer whose Linears guard sink rows.
        emergence_layer: where the sinks' spike is first detected (the earliest detection stage; with the
            fixed rule the probe with the largest ratio, or an earlier stage-1 probe that separates the same sinks).
        cancellation_layer: the layer whose block output removes the sinks' residual peak.
        restore_layer: the block after which sink residual rows are restored (or ``None``).
        exclude_from_calibration: sink rows kept out of the activation observers.
        guard_modes: Linear name -> one of :data:`GUARD_MODES`.
        det_templates: stage name -> ``[K][C]`` detection templates (least-squares type assignment).
        inserts_templates: templates are inserted (insertquant) rather than full-precision rows only (prefix).
        sites: stage name -> where its detector reads: ``probe`` (the probe Linear's input, the default
            for stages not listed), ``residual`` (the block output, :class:`~vtquant.core.sinks.ResidualDetector`)
            or ``input:<Linear name>`` (the input of another quantized Linear of that layer).
        rule: how the thresholds were chosen: ``alpha`` (fixed ratio) or ``relative`` (model-relative fences).
    """

    stages: dict = field(default_factory=dict)
    alphas: dict = field(default_factory=dict)
    references: dict = field(default_factory=dict)
    num_types: int = 1
    known_sinks: tuple = ()
    num_known_types: Optional[int] = None
    protected_types: tuple = ()
    first_guard_layer: int = 0
    emergence_layer: Optional[int] = None
    cancellation_layer: Optional[int] = None
    restore_layer: Optional[int] = None
    exclude_from_calibration: bool = True
    guard_modes: dict = field(default_factory=dict)
    det_templates: dict = field(default_factory=dict)
    inserts_templates: bool = True
    sites: dict = field(default_factory=dict)
    rule: str = "alpha"

    def __post_init__(self) -> None:
        bad_sites = {k: v for k, v in self.sites.items() if k not in self.stages
                     or not (v in ("probe", "residual") or (isinstance(v, str) and v.startswith("input:")))}
        if bad_sites:
            raise ConfigError(f"sink plan: sites {bad_sites} must name stages and be 'probe', 'residual' or "
                              "'input:<Linear name>'")
        bad = {name: mode for name, mode in self.guard_modes.items() if mode not in GUARD_MODES}
        if bad:
            raise ConfigError(f"sink plan: unknown guard modes {bad}; valid: {list(GUARD_MODES)}")
        if set(self.stages) != set(self.alphas) or set(self.stages) != set(self.references):
            raise ConfigError(f"sink plan: stages {sorted(self.stages)}, alphas {sorted(self.alphas)} and "
                              f"references {sorted(self.references)} must name the same stages")
        if not isinstance(self.num_types, int) or self.num_types < 1:
            raise ConfigError(f"sink plan: num_types = {self.num_types!r} must be a positive integer")

    @property
    def last_stage_layer(self) -> Optional[int]:
        return max(self.stages.values()) if self.stages else None

    def site(self, stage: str) -> str:
        """Where the detector of ``stage`` reads (``probe`` or ``residual``)."""
        return self.sites.get(stage, "probe")

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["known_sinks"] = list(self.known_sinks)
        data["protected_types"] = list(self.protected_types)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "SinkPlan":
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs["known_sinks"] = _tuple(kwargs.get("known_sinks"))
        kwargs["protected_types"] = _tuple(kwargs.get("protected_types"))
        if "inserts_templates" not in data:  # unversioned plans: prefix had no detection templates
            kwargs["inserts_templates"] = bool(data.get("det_templates")) or data.get("restore_layer") is not None \
                or any(m == "template" for m in data.get("guard_modes", {}).values())
        return cls(**kwargs)


@dataclass(frozen=True)
class QuantPlan:
    """The structure of a quantized model (json-able through :meth:`to_dict`).

    Attributes:
        version: plan schema version (:data:`PLAN_VERSION`).
        method: the recipe's method name (a registered method handler).
        display_method: the name reported in results (``insertquant+rotate`` ...).
        weights / activations / kv_cache: the quantizer settings, or ``None`` (full precision).
        ignore: the recipe's ignore patterns.
        rotation: the rotation settings when the model was rotated, else ``None``.
        targets: names (``layers.{i}.{linear}``) of the wrapped Linears.
        online_rotation: Linear name -> sizes of its online Hadamard factors.
        sinks: the :class:`SinkPlan`, or ``None`` when sinks are not handled (or none was found).
        smoothquant: what smoothing did (alpha, groups, factors), or ``None``.
        weight_search: what GPTQ / weight clip search reported, or ``None``.
        act_clip_search: activation clip-search ratios and the structure check, or ``None``.
    """

    method: str
    display_method: str
    version: int = PLAN_VERSION
    weights: Optional[WeightArgs] = None
    activations: Optional[ActArgs] = None
    kv_cache: Optional[ActArgs] = None
    ignore: tuple = ()
    rotation: Optional[RotationConfig] = None
    targets: tuple = ()
    online_rotation: dict = field(default_factory=dict)
    sinks: Optional[SinkPlan] = None
    smoothquant: Optional[dict] = None
    weight_search: Optional[dict] = None
    act_clip_search: Optional[dict] = None

    def __post_init__(self) -> None:
        if self.version != PLAN_VERSION:
            raise ConfigError(f"quantization plan version {self.version!r} is not supported by this vtquant "
                              f"(reads {PLAN_VERSION}); update vtquant or re-quantize the model")

    def replace(self, **changes: Any) -> "QuantPlan":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key in ("weights", "activations", "kv_cache", "rotation"):
            data[key] = None if data[key] is None else drop_unset_additions(dataclasses.asdict(data[key]))
        data["sinks"] = None if self.sinks is None else self.sinks.to_dict()
        data["ignore"] = list(self.ignore)
        data["targets"] = list(self.targets)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "QuantPlan":
        """Read a plan dict (this version's, or an unversioned one of an older checkpoint)."""
        if not isinstance(data, dict) or "method" not in data:
            raise ConfigError("quantization plan: expected a mapping with at least 'method'; "
                              f"got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs.setdefault("version", PLAN_VERSION)
        kwargs.setdefault("display_method", data["method"])
        for key, typ in (("weights", WeightArgs), ("activations", ActArgs), ("kv_cache", ActArgs),
                         ("rotation", RotationConfig)):
            if kwargs.get(key) is not None:
                kwargs[key] = typ(**kwargs[key])
        if kwargs.get("sinks") is not None:
            kwargs["sinks"] = SinkPlan.from_dict(kwargs["sinks"])
        kwargs["ignore"] = _tuple(kwargs.get("ignore"))
        kwargs["targets"] = _tuple(kwargs.get("targets"))
        return cls(**kwargs)
