"""Configuration dataclasses: what to quantize and how (torchao-style small configs).

Every dataclass validates itself in ``__post_init__`` and names the bad field and
the accepted values.  YAML recipes (:mod:`vtquant.recipe`) use exactly these
field names.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

RECIPE_VERSION = 1

METHOD_NAMES = ("fp", "naive-static", "dynamic-token", "smoothquant", "prefix", "rotate", "insertquant",
                "insertquant+rotate")
"""Names accepted by :func:`method_recipe` (the peers of docs/method.md side by side)."""


def __getattr__(name: str) -> Any:
    # ``METHODS``: the method names a recipe may use, from the handler registry (vtquant.core.methods)
    if name == "METHODS":
        from .core.methods import registered_methods

        return registered_methods()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def method_label(method: str, rotated: bool) -> str:
    """The name a method is reported under: ``insertquant+rotate``, ``rotate`` (naive-static rotated) ..."""
    if rotated and method == "naive-static":
        return "rotate"
    if rotated and method != "fp":
        return f"{method}+rotate"
    return method


from .errors import VtquantError


class ConfigError(VtquantError, ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


NUMERICS = ("vtquant", "compressed-tensors")
"""Activation quantizer numerics (:attr:`ActArgs.numerics`)."""


def _check_choice(owner: str, name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{owner}.{name} = {value!r} is not valid; choose one of {list(choices)}")


def _check_bits(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not (2 <= value <= 8):
        raise ConfigError(f"{owner}.{name} = {value!r}: bits must be an integer from 2 to 8")


# Fields added after checkpoints were first written: left out of saved plans and recipes while they hold
# their default, so a vtquant that predates them still reads checkpoints that do not use them.
_LATER_WEIGHT_FIELDS = {"gptq_sequential": False}


def drop_unset_additions(data: Any) -> Any:
    """``data`` (a recipe / plan dict, or a weights section) without later-added fields at their defaults."""
    if isinstance(data, dict):
        out = {k: drop_unset_additions(v) for k, v in data.items()}
        if "gptq_damp" in out:  # a weights section
            for key, default in _LATER_WEIGHT_FIELDS.items():
                if out.get(key, default) == default:
                    out.pop(key, None)
        return out
    return data


@dataclass
class WeightArgs:
    """Weight quantization.

    Attributes:
        bits: integer bit width, 2..8.
        granularity: ``per-channel`` (one scale per output row) or ``per-group``.
        group_size: input columns per scale for ``per-group``.
        symmetric: symmetric (zero-point free) grid; only symmetric is implemented for weights.
        algorithm: ``rtn`` (round to nearest), ``gptq`` (GPTQ with second-order error
            compensation, from the Hessian of the Linear's calibration inputs; with insertquant
            those inputs already went through clamp-and-insert: sink rows are not in it) or
            ``auto`` (GPTQ below 8 bits, RTN at 8 bits, where GPTQ gains nothing measurable).
        clip_search: choose per-row (per-group) weight clip ratios minimising the calibration
            output error weighted by ``diag(H)`` (before RTN / GPTQ); with ``auto``, only where
            GPTQ runs.
        gptq_damp: GPTQ dampening, as a fraction of the mean Hessian diagonal.
        gptq_block_size: GPTQ lazy-update block width (columns).
        act_order: GPTQ quantizes columns by decreasing Hessian diagonal.
        gptq_sequential: GPTQ in the paper's order: each block's Hessians come from inputs that went
            through the blocks before it *with their quantized weights* (each block is run once more
            after its weights are quantized, to produce the next block's inputs); ``false`` (default):
            every Hessian from one pass with full-precision weights.  Runs block by block (the sequential
            pipeline's runner, on the model's device with ``pipeline="basic"``).
    """

    bits: int = 8
    granularity: str = "per-channel"
    group_size: int = 128
    symmetric: bool = True
    algorithm: str = "rtn"
    clip_search: bool = False
    gptq_damp: float = 0.01
    gptq_block_size: int = 128
    act_order: bool = False
    gptq_sequential: bool = False

    def __post_init__(self) -> None:
        _check_bits("weights", "bits", self.bits)
        _check_choice("weights", "granularity", self.granularity, ("per-channel", "per-group"))
        _check_choice("weights", "algorithm", self.algorithm, ("rtn", "gptq", "auto"))
        if not isinstance(self.group_size, int) or self.group_size < 8:
            raise ConfigError(f"weights.group_size = {self.group_size!r}: use an integer >= 8 (e.g. 128)")
        if not self.symmetric:
            raise ConfigError("weights.symmetric = false is not implemented; use true")
        if not (0.0 < float(self.gptq_damp) < 1.0):
            raise ConfigError(f"weights.gptq_damp = {self.gptq_damp!r}: use a fraction in (0, 1) (GPTQ: 0.01)")
        if not isinstance(self.gptq_block_size, int) or self.gptq_block_size < 1:
            raise ConfigError(f"weights.gptq_block_size = {self.gptq_block_size!r}: use a positive integer (128)")
        if not isinstance(self.gptq_sequential, bool):
            raise ConfigError(f"weights.gptq_sequential = {self.gptq_sequential!r}: use true or false")
        if self.gptq_sequential and self.algorithm == "rtn" and not self.clip_search:
            raise ConfigError("weights.gptq_sequential: true needs weights.algorithm gptq (or auto below 8 bits, or "
                              "clip_search): round-to-nearest weights use no calibration inputs")

    def resolved(self) -> "WeightArgs":
        """``algorithm: auto`` made concrete for these bits (GPTQ + clip search below 8 bits, RTN at 8)."""
        if self.algorithm != "auto":
            return self
        low = self.bits < 8
        return dataclasses.replace(self, algorithm="gptq" if low else "rtn", clip_search=self.clip_search and low,
                                   gptq_sequential=self.gptq_sequential and low)


@dataclass
class ActArgs:
    """Activation quantization of Linear inputs.

    Attributes:
        bits: integer bit width, 2..8.
        granularity: ``per-tensor`` (one scale per tensor) or ``per-token`` (one per row).
        static: scales fixed from calibration (per-tensor only); ``false`` = computed per call.
        symmetric: symmetric grid, or asymmetric with a zero point.
        clip_ratio: static range = observed range x clip_ratio (1.0 = MinMax).
        clip_search: per Linear, choose the clip ratio (a grid from 1.0 down to 0.3) that minimises
            the calibration MSE of the Linear's output over *semantic* tokens (sink rows, which the
            quantizer never sees, are excluded); replaces ``clip_ratio``.  The structure constraint
            is checked after the search: the sink set detected on the quantized model must equal
            the full-precision one (R = |S_q & S_fp| / |S_fp|, in the report); if not, the search
            is undone layer by layer from the first layer until it holds.
        numerics: the integer grid and arithmetic of the fake quantizer.  ``vtquant``: symmetric grid
            ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` with scale ``absmax / (2^(b-1) - 1)``, asymmetric ``[0, 2^b - 1]``,
            ``round(x / s) + z``.  ``compressed-tensors``: that format's (llm-compressor, vLLM, transformers'
            compressed-tensors loader) - grid ``[-2^(b-1), 2^(b-1) - 1]`` for both, symmetric scale
            ``absmax / ((2^b - 1) / 2)``, asymmetric zero point ``round(clamp(qmin - min / s))`` on that grid,
            ``round(clamp(x / s + z))``; a model quantized so exports to compressed-tensors exactly
            (``vtquant quantize --format compressed-tensors`` sets it).
    """

    bits: int = 8
    granularity: str = "per-tensor"
    static: bool = True
    symmetric: bool = True
    clip_ratio: float = 1.0
    clip_search: bool = False
    numerics: str = "vtquant"

    def __post_init__(self) -> None:
        _check_bits("activations", "bits", self.bits)
        _check_choice("activations", "granularity", self.granularity, ("per-tensor", "per-token"))
        _check_choice("activations", "numerics", self.numerics, NUMERICS)
        if self.granularity == "per-token" and self.static:
            raise ConfigError("activations: per-token scales cannot be static; set static: false")
        if not (0.0 < float(self.clip_ratio) <= 1.0):
            raise ConfigError(f"activations.clip_ratio = {self.clip_ratio!r}: use a number in (0, 1]")
        if self.clip_search and not self.static:
            raise ConfigError("activations.clip_search needs static scales (dynamic scales have no range to clip)")


@dataclass
class SinkConfig:
    """Sink detection, clamping and template insertion (docs/method.md, steps 2-5).

    Attributes:
        enabled: handle sinks at all (``false`` = plain per-tensor quantization).
        insert: insert templates for clamped sinks (``false`` = clamp only; an ablation that breaks the model).
        alpha: stage-2 threshold on a token's peak |x| over the calibrated median token peak,
            at the MLP second-linear input of the emergence layer (prototype: 64).
        detect: ``auto``: the fixed ``alpha`` rule at the probe Linears when any token exceeds it
            (massive activations, the paper's regime), otherwise the model-relative rule below;
            ``alpha``: the fixed rule only; ``relative``: the model-relative rule only.
        fence_k: model-relative rule: at every probe (each layer's probe-Linear input and block output)
            a token is an outlier when its log ratio to the probe's median lies ``fence_k`` robust
            standard deviations (1.4826 x MAD of the log ratios) above the median.
        min_ratio: model-relative rule: the threshold is never below this ratio.
        max_share: model-relative rule: a probe whose outliers exceed this share of the tokens shows
            no sink (sinks are a few tokens; a wide tail is an outlier *feature*).
        stage1: find an earlier detection layer from calibration data (``auto``) or not (``off``).
        stage1_margin: the stage-1 threshold is this factor above the largest non-sink ratio seen.
        stage1_min_recall: the stage-1 layer must catch at least this share of the calibration sinks.
        known_sinks: positions the adapter knows (e.g. ``first_token`` for causal LMs, ``cls``,
            ``registers`` for ViTs); ``[]`` = content-based detection only.
        template_min_cosine: a layer inserts templates only where the sinks' inputs have at least
            this mean cosine to their template; elsewhere sink rows are computed in full precision.
        restore_residual: restore the sinks' residual stream from a template at the cancellation layer.
        exclude_from_calibration: keep sink rows out of the activation observers.
    """

    enabled: bool = True
    insert: bool = True
    alpha: float = 64.0
    detect: str = "auto"
    fence_k: float = 8.0
    min_ratio: float = 4.0
    max_share: float = 0.25
    stage1: str = "auto"
    stage1_margin: float = 2.0
    stage1_min_recall: float = 0.9
    known_sinks: list = field(default_factory=lambda: ["first_token"])
    template_min_cosine: float = 0.9
    restore_residual: bool = True
    exclude_from_calibration: bool = True

    def __post_init__(self) -> None:
        _check_choice("sinks", "stage1", self.stage1, ("auto", "off"))
        _check_choice("sinks", "detect", self.detect, ("auto", "alpha", "relative"))
        if float(self.fence_k) <= 0 or float(self.min_ratio) <= 1.0 or not (0.0 < float(self.max_share) <= 1.0):
            raise ConfigError(f"sinks: fence_k = {self.fence_k!r} must be > 0, min_ratio = {self.min_ratio!r} > 1 and "
                              f"max_share = {self.max_share!r} in (0, 1]")
        if not all(isinstance(k, str) for k in (self.known_sinks if isinstance(self.known_sinks, list) else [])):
            raise ConfigError(f"sinks.known_sinks = {self.known_sinks!r}: give a list of names, e.g. [first_token]")
        if float(self.alpha) <= 1.0:
            raise ConfigError(f"sinks.alpha = {self.alpha!r}: the ratio threshold must be > 1 (prototype: 64)")
        if not isinstance(self.known_sinks, list):
            raise ConfigError(f"sinks.known_sinks = {self.known_sinks!r}: give a list, e.g. [first_token] or []")
        if not (-1.0 <= float(self.template_min_cosine) <= 1.0):
            raise ConfigError("sinks.template_min_cosine must lie in [-1, 1]")


@dataclass
class RotationConfig:
    """Orthogonal (randomized Hadamard) rotation of Linear inputs (QuaRot-style).

    Attributes:
        enabled: rotate.
        seed: seed of the random signs.
        residual: rotate the residual stream (folded into embeddings and weights, offline).
        online: rotate the inputs that cannot be folded (MLP second-linear input), online.
        heads: per-head rotation of the attention output projection input (folded into V / O).
    """

    enabled: bool = False
    seed: int = 0
    residual: bool = True
    online: bool = True
    heads: bool = True


@dataclass
class CalibConfig:
    """Calibration data.

    Attributes:
        dataset: a vtquant text asset name or a path to a .txt file.
        num_samples: number of random windows.
        seq_len: tokens per window.
        batch_size: windows per forward pass.
        seed: window sampling seed.
    """

    dataset: str = "shakespeare"
    num_samples: int = 16
    seq_len: int = 512
    batch_size: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.dataset, str):
            raise ConfigError(f"calibration.dataset = {self.dataset!r}: give a text asset name or a .txt path")
        for name in ("num_samples", "seq_len", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"calibration.{name} = {value!r}: use a positive integer")


@dataclass
class Recipe:
    """A full, versioned quantization recipe.

    Attributes:
        version: recipe schema version (currently 1).
        name: a label for reports.
        model: what the recipe was written for (``asset:smollm2-135m``, an HF path, ``timm:NAME``...).
        method: one of :data:`METHODS`.
        weights: weight quantization; ``null`` keeps weights in full precision.
        activations: activation quantization; ``null`` keeps activations in full precision.
        sinks: sink handling (used by ``insertquant``).
        rotation: rotation (any method may use it).
        calibration: calibration data.
        ignore: module names (suffix match) left in full precision.
        kv_cache: key / value cache quantization (the outputs of the adapter's key and value
            projections, before RoPE as in KVQuant), same fields as ``activations``; ``null`` keeps
            the cache in full precision.  Sink tokens' keys and values are never quantized: with
            insertquant they are the inserted templates (or full-precision rows), with prefix they are
            the kept full-precision ones.
        smoothquant_alpha: migration strength of ``smoothquant`` (SmoothQuant's alpha, in [0, 1]):
            s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) per input channel j; ignored by other methods.
        towers: per-tower recipes of a vision-language model (:data:`VLM_TOWERS`: ``vision``,
            ``projector``, ``language``), each a full :class:`Recipe` (in YAML: a section that overrides
            the top-level keys, see docs/vlm.md); ``None`` for single-tower models.
    """

    version: int = RECIPE_VERSION
    name: str = "insertquant-w8a8"
    model: str = ""
    method: str = "insertquant"
    weights: Optional[WeightArgs] = field(default_factory=WeightArgs)
    activations: Optional[ActArgs] = field(default_factory=ActArgs)
    sinks: SinkConfig = field(default_factory=SinkConfig)
    rotation: RotationConfig = field(default_factory=RotationConfig)
    calibration: CalibConfig = field(default_factory=CalibConfig)
    ignore: list = field(default_factory=lambda: ["lm_head"])
    smoothquant_alpha: float = 0.5
    kv_cache: Optional[ActArgs] = None
    towers: Optional[dict] = None

    def __post_init__(self) -> None:
        if isinstance(self.version, bool) or self.version != RECIPE_VERSION:
            raise ConfigError(
                f"recipe version {self.version!r} is not supported by this vtquant (expects {RECIPE_VERSION}); "
                "update vtquant or rewrite the recipe for this version"
            )
        from .core.methods import get_method, registered_methods

        _check_choice("recipe", "method", self.method, registered_methods())
        handler = get_method(self.method)
        if not isinstance(self.ignore, list) or not all(isinstance(x, str) for x in self.ignore):
            raise ConfigError(f"recipe.ignore = {self.ignore!r}: give a list of module names, e.g. [lm_head]")
        if not isinstance(self.name, str) or not isinstance(self.model, str):
            raise ConfigError("recipe.name and recipe.model must be strings")
        if self.activations is not None:
            act = self.activations
            if handler.activations == "dynamic" and (act.granularity != "per-token" or act.static):
                raise ConfigError(f"method {self.method} needs activations.granularity: per-token and static: false")
            if handler.activations == "static" and (act.granularity != "per-tensor" or not act.static):
                raise ConfigError(f"method {self.method} needs per-tensor static activations")
        if (isinstance(self.smoothquant_alpha, bool) or not isinstance(self.smoothquant_alpha, (int, float))
                or not (0.0 <= float(self.smoothquant_alpha) <= 1.0)):
            raise ConfigError(f"recipe.smoothquant_alpha = {self.smoothquant_alpha!r}: use a number in [0, 1] "
                              "(SmoothQuant's default: 0.5)")
        if self.kv_cache is not None:
            if not isinstance(self.kv_cache, ActArgs):
                raise ConfigError("recipe.kv_cache: give a mapping with bits (and granularity / static), or null")
            if not handler.quantizes:
                raise ConfigError(f"method {self.method} keeps everything in full precision; set kv_cache: null")
            kv = self.kv_cache
            if handler.activations == "dynamic" and (kv.granularity != "per-token" or kv.static):
                raise ConfigError(f"method {self.method} needs kv_cache.granularity: per-token and static: false")
            if handler.activations == "static" and (kv.granularity != "per-tensor" or not kv.static):
                raise ConfigError(f"method {self.method} needs a per-tensor static kv_cache")

        if self.towers is not None:
            if not isinstance(self.towers, dict):
                raise ConfigError(f"recipe.towers = {self.towers!r}: give a mapping of tower names {list(VLM_TOWERS)} "
                                  "to recipe sections")
            for key, value in self.towers.items():
                if key not in VLM_TOWERS:
                    raise ConfigError(f"recipe.towers: unknown tower {key!r}; the towers of a vision-language model are "
                                      f"{list(VLM_TOWERS)}")
                if not isinstance(value, Recipe):
                    raise ConfigError(f"recipe.towers.{key}: expected a Recipe (in YAML: a mapping of recipe keys), "
                                      f"got {type(value).__name__}")
                if value.towers is not None:
                    raise ConfigError(f"recipe.towers.{key}: a tower section cannot have towers of its own")

    @property
    def display_method(self) -> str:
        """Method name as reported in results (``insertquant+rotate`` / ``rotate`` when rotated)."""
        return method_label(self.method, self.rotation.enabled)

    def to_dict(self) -> dict:
        return drop_unset_additions(asdict(self))

    def with_numerics(self, numerics: str) -> "Recipe":
        """A copy whose activation and key / value cache quantizers use ``numerics`` (:attr:`ActArgs.numerics`)."""
        _check_choice("activations", "numerics", numerics, NUMERICS)
        changes = {key: dataclasses.replace(getattr(self, key), numerics=numerics)
                   for key in ("activations", "kv_cache") if getattr(self, key) is not None}
        return self.replace(**changes) if changes else self.replace()

    def replace(self, **changes: Any) -> "Recipe":
        """A validated deep copy with top-level fields replaced."""
        data = copy.deepcopy(self)
        for key, value in changes.items():
            if not hasattr(data, key):
                raise ConfigError(f"Recipe has no field {key!r}")
            setattr(data, key, value)
        data.__post_init__()
        return data


VLM_TOWERS = ("vision", "projector", "language")
"""The parts of a vision-language model a recipe may configure one by one (``recipe.towers``)."""


def method_recipe(method: str, base: Recipe, *, w_bits: int = 8, a_bits: int = 8, rotate: bool = False,
                  kv_bits: Optional[int] = None) -> Recipe:
    """Derive the recipe of a named method from a base recipe (same calibration and ignore list).

    Args:
        method: one of :data:`METHOD_NAMES`: ``fp``, ``naive-static``, ``dynamic-token``, ``smoothquant``
            (alpha from ``base.smoothquant_alpha``), ``prefix``, ``rotate`` (naive-static with the QuaRot-style
            rotation, no sink handling), ``insertquant`` or ``insertquant+rotate``.
        base: recipe whose calibration, sinks and weight settings are reused.
        w_bits: weight bits.
        a_bits: activation bits.
        rotate: also rotate (implied by ``insertquant+rotate``).
        kv_bits: key / value cache bits (``None``: full-precision cache); per-tensor static, or
            per-token dynamic for ``dynamic-token``.
    """
    if method == "rotate":
        method, rotate = "naive-static", True
    if method.endswith("+rotate"):
        method, rotate = method[: -len("+rotate")], True
    from .core.methods import registered_methods

    if method not in registered_methods():
        raise ConfigError(f"unknown method {method!r}; choose one of {list(METHOD_NAMES)}")
    weights = None if method == "fp" else dataclasses.replace(base.weights or WeightArgs(), bits=w_bits).resolved()
    base_act = base.activations or ActArgs()
    if method == "fp":
        acts = None
    elif method == "dynamic-token":
        acts = ActArgs(bits=a_bits, granularity="per-token", static=False, numerics=base_act.numerics)
    else:
        acts = ActArgs(bits=a_bits, symmetric=base_act.symmetric, clip_ratio=base_act.clip_ratio,
                       clip_search=base_act.clip_search, numerics=base_act.numerics)
    kv = None
    if kv_bits is not None and method != "fp":
        kv = (ActArgs(bits=kv_bits, granularity="per-token", static=False, numerics=base_act.numerics)
              if method == "dynamic-token" else
              ActArgs(bits=kv_bits, symmetric=base_act.symmetric, clip_search=base_act.clip_search,
                      numerics=base_act.numerics))
    rotation = copy.deepcopy(base.rotation)
    rotation.enabled = rotate and method != "fp"
    sinks = copy.deepcopy(base.sinks)
    label = method_label(method, rotation.enabled)
    return Recipe(
        name=f"{label}-w{w_bits}a{a_bits}" + (f"kv{kv_bits}" if kv is not None else ""),
        model=base.model,
        method=method,
        weights=weights,
        activations=acts,
        sinks=sinks,
        rotation=rotation,
        calibration=copy.deepcopy(base.calibration),
        ignore=list(base.ignore),
        smoothquant_alpha=base.smoothquant_alpha,
        kv_cache=kv,
    )
