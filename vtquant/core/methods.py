"""Quantization methods as registered handlers (torchao's config -> handler registry, shaped like
llm-compressor's modifiers: an algorithm is a few lifecycle hooks; the pipeline owns the passes).

Every recipe ``method`` names a :class:`QuantMethod` subclass registered here with
:func:`register_method`.  :func:`~vtquant.core.pipeline.quantize_model_` looks the handler up and
calls its hooks at fixed points of one pipeline:

* :meth:`QuantMethod.on_transform` - after the optional rotation, before the Linears are wrapped:
  function-preserving transforms of the full-precision weights (SmoothQuant's smoothing);
* :meth:`QuantMethod.on_sinks` - after wrapping, before weight and activation calibration: sink
  calibration (insertquant: detection + templates; prefix: detection + full-precision rows).

Everything else (rotation, weights, activation scales, KV cache, clip search) is the same for all
methods and driven by the recipe's fields.  A new method is a new subclass here (or in user code),
nothing else: the recipe validation, display labels and the pipeline pick it up.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Optional

from ..config import ConfigError
from .plan import SinkPlan
from .sinks import SinkState

if TYPE_CHECKING:
    from .pipeline import QuantContext

_METHODS: dict[str, type["QuantMethod"]] = {}


def register_method(cls: type["QuantMethod"]) -> type["QuantMethod"]:
    """Class decorator: register a method handler under ``cls.name``."""
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls.__name__} needs a class attribute `name` (the recipe's method value)")
    _METHODS[cls.name] = cls
    return cls


def registered_methods() -> tuple[str, ...]:
    """Method names a recipe may use, in registration order."""
    return tuple(_METHODS)


def get_method(name: str) -> "QuantMethod":
    """The handler of recipe method ``name``."""
    cls = _METHODS.get(name)
    if cls is None:
        raise ConfigError(f"unknown method {name!r}; registered methods: {list(_METHODS)}")
    return cls()


class QuantMethod:
    """One quantization method: lifecycle hooks that the pipeline calls.

    Class attributes:
        name: the recipe's ``method`` value.
        quantizes: ``False`` only for ``fp`` (the pipeline then wraps nothing).
        handles_sinks: the method calibrates sink handling (:meth:`on_sinks` returns a plan).
        activations: which activation quantizers the method needs (``static`` per-tensor,
            ``dynamic`` per-token, or ``any``); checked by recipe validation.
    """

    name: ClassVar[str] = ""
    quantizes: ClassVar[bool] = True
    handles_sinks: ClassVar[bool] = False
    activations: ClassVar[str] = "static"

    def on_transform(self, ctx: "QuantContext") -> None:
        """Transform the full-precision model before its Linears are wrapped (default: nothing)."""

    def on_sinks(self, ctx: "QuantContext") -> tuple[Optional[SinkPlan], Optional[SinkState]]:
        """Calibrate sink handling on the wrapped model (default: none)."""
        return None, None


@register_method
class FullPrecision(QuantMethod):
    """The reference: nothing is quantized."""

    name = "fp"
    quantizes = False
    activations = "any"


@register_method
class NaiveStatic(QuantMethod):
    """Per-tensor static MinMax scales, sinks included (with rotation: the QuaRot-style ``rotate`` peer)."""

    name = "naive-static"


@register_method
class DynamicToken(QuantMethod):
    """Per-token dynamic activation scales (what most tools use)."""

    name = "dynamic-token"
    activations = "dynamic"


@register_method
class InsertQuant(QuantMethod):
    """INSERTQUANT: detect sinks, clamp them out of the quantized tensors, insert templates."""

    name = "insertquant"
    handles_sinks = True
    inserts_templates: ClassVar[bool] = True

    def on_sinks(self, ctx: "QuantContext") -> tuple[Optional[SinkPlan], Optional[SinkState]]:
        if not ctx.recipe.sinks.enabled:
            return None, None
        from .calibrate import SinkCalibrator

        calibrator = SinkCalibrator(ctx.adapter, ctx.recipe.sinks, ctx.wrapped, ctx.runner, ctx.hooks, ctx.report,
                                    templates=self.inserts_templates, ignore=list(ctx.recipe.ignore))
        plan, state = calibrator.calibrate()
        ctx.fp_sinks = calibrator.fp_sinks
        return plan, state


@register_method
class Prefix(InsertQuant):
    """PrefixQuant-style peer: the same detection, sink rows computed in full precision (no templates)."""

    name = "prefix"
    inserts_templates = False


@register_method
class SmoothQuant(QuantMethod):
    """SmoothQuant: migrate per-channel activation scale into the readers' weights (exact in float)."""

    name = "smoothquant"

    def on_transform(self, ctx: "QuantContext") -> None:
        from .smooth import check_smoothable, smooth_model_
        from .verify import check_equivalence, snapshot

        spec = ctx.adapter.rotation_spec()
        check_smoothable(spec)  # refuse a layout with nowhere to fold before running anything
        batch = ctx.runner.batches[0]
        reference = snapshot(ctx.adapter, batch)
        info = smooth_model_(spec, lambda: ctx.runner.run("smoothquant statistics"),
                             alpha=float(ctx.recipe.smoothquant_alpha))
        check = check_equivalence(
            ctx.adapter, reference, batch, "smoothquant smoothing",
            hint=f"The adapter describes the model as {getattr(spec, 'layout', None) or type(ctx.adapter).__name__}; if that is "
                 "wrong, the layout is not supported by smoothquant: use another method (insertquant, naive-static, "
                 "dynamic-token).")
        info["equivalence"] = check.to_dict()
        ctx.smoothquant = info
        ctx.report.equivalence["smoothquant"] = check.to_dict()
        ctx.report.notes.append(f"smoothquant: alpha={info['alpha']:g}, {info['groups']} norm->readers groups "
                                f"smoothed, largest factor {info['max_factor']:g} (largest input |x| "
                                f"{info['max_act_absmax']:g})")
        ctx.report.notes.append(check.note())
