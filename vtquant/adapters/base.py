"""The adapter interface: the only place that knows model families (docs/design.md).

An adapter turns a concrete model into generic pieces the core works on:
blocks in forward order, the quantizable Linears of each block, the probe Linear
(an MLP's second Linear) whose input carries the spike, the token layout, the
sink positions the model makes known (first token, CLS, registers), and a
:class:`~vtquant.core.rotation.RotationSpec`.  Adapters register themselves by
the class names they support; :func:`get_adapter` picks one or says how to add one.
"""
from __future__ import annotations

import abc
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from ..core.hooks import HookManager
from ..core.sinks import SinkState

_REGISTRY: dict[str, type["ModelAdapter"]] = {}
_FALLBACKS: list[tuple[Callable[[nn.Module], bool], type["ModelAdapter"], str]] = []


def register_adapter(*class_names: str) -> Callable[[type], type]:
    """Class decorator: register an adapter for the given model class names."""

    def deco(cls: type) -> type:
        for name in class_names:
            _REGISTRY[name] = cls
        cls.supported = tuple(sorted(set(getattr(cls, "supported", ())) | set(class_names)))
        return cls

    return deco


def register_fallback(accepts: Callable[[nn.Module], bool], description: str) -> Callable[[type], type]:
    """Class decorator: the adapter also serves unlisted models for which ``accepts(model)`` is true.

    Tried in registration order when no class name matches; the choice is logged by the adapter.
    """

    def deco(cls: type) -> type:
        _FALLBACKS.append((accepts, cls, description))
        return cls

    return deco


def supported_architectures() -> list[str]:
    _import_builtin_adapters()
    return sorted(_REGISTRY)


def _import_builtin_adapters() -> None:
    from . import hf_decoder  # noqa: F401  (registers on import)
    from . import hf_vision, hf_vlm, open_clip, timm_vit  # noqa: F401  (import no model library until used)


class UnsupportedModelError(TypeError):
    """No adapter knows this model class."""


def get_adapter(model: nn.Module) -> "ModelAdapter":
    """The adapter for ``model``, chosen by its class name, else by a registered fallback (generic decoders).

    Raises:
        UnsupportedModelError: listing the supported classes and how to add an adapter.
    """
    _import_builtin_adapters()
    name = type(model).__name__
    # a "module.Class" key wins over the bare class name (timm and open_clip both have a VisionTransformer)
    cls = _REGISTRY.get(f"{type(model).__module__}.{name}") or _REGISTRY.get(name)
    if cls is None:
        cls = next((fallback for accepts, fallback, _ in _FALLBACKS if accepts(model)), None)
    if cls is None:
        generic = "; ".join(f"{c.__name__} also takes {d}" for _, c, d in _FALLBACKS)
        raise UnsupportedModelError(
            f"no vtquant adapter for model class {name!r}. Supported: {sorted(_REGISTRY)}"
            f"{' (' + generic + ')' if generic else ''}. "
            "To add one, subclass vtquant.adapters.ModelAdapter (see vtquant/adapters/hf_decoder.py), "
            f"decorate it with @register_adapter({name!r}) and import it before calling vtquant."
        )
    return cls(model)


KnownSinks = tuple[Optional[torch.Tensor], Optional[torch.Tensor], bool]
"""``(known bool [B, T] or None, fixed types long [B, T] or None, is_prefill)`` of one forward call."""


class _KnownSinkHook:
    """Pre-forward hook that starts each forward pass of the sink state with the known sinks.

    An object (not a closure) holding only the adapter and the kinds; the state is read from the
    hooked module (``vtquant_sink_state``), so ``copy.deepcopy`` of a quantized model gives the
    copy hooks that reset the copy's own state.
    """

    def __init__(self, adapter: "ModelAdapter", kinds: list[str]) -> None:
        self.adapter = adapter
        self.kinds = list(kinds)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        known, types, is_prefill = self.adapter.known_sinks_of_call(self.kinds, args, kwargs)
        module.vtquant_sink_state.reset(known, is_prefill=is_prefill, known_types=types)


class ModelAdapter(abc.ABC):
    """Describes one model to the core.  Subclasses implement the abstract pieces."""

    supported: tuple = ()
    token_layout: str = "bsd"
    family: str = "generic"
    output_kind: str = "features"
    """What the model returns: ``logits`` (a causal LM on token ids), ``class-logits`` (a classifier
    head on images) or ``features`` (an encoder)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    # --- structure -------------------------------------------------------------------
    @abc.abstractmethod
    def blocks(self) -> list[nn.Module]:
        """The transformer blocks in forward order."""

    @abc.abstractmethod
    def block_linears(self, block: nn.Module) -> dict[str, nn.Module]:
        """Quantizable Linears of a block, ``{relative name: module}`` in forward order."""

    @abc.abstractmethod
    def probe_name(self) -> str:
        """Relative name (within a block) of the MLP second Linear whose input is probed."""

    def block_output(self, output: Any) -> torch.Tensor:
        """The residual-stream tensor in a block's output."""
        return output[0] if isinstance(output, (tuple, list)) else output

    def replace_block_output(self, output: Any, hidden: torch.Tensor) -> Any:
        if isinstance(output, tuple):
            return (hidden,) + tuple(output[1:])
        if isinstance(output, list):
            return [hidden] + list(output[1:])
        return hidden

    @abc.abstractmethod
    def hidden_size(self) -> int:
        """Width of the residual stream."""

    def input_groups(self, block: nn.Module) -> list[list[str]]:
        """Groups of Linears (relative names) that always read the same input tensor, in call order."""
        return []

    def kv_linears(self) -> tuple[str, ...]:
        """Relative names of the Linears whose outputs a decoder caches (keys, values); ``()`` for encoders."""
        return ()

    def forward(self, batch: Any) -> Any:
        """Run the model on one calibration / evaluation batch."""
        return self.model(batch)

    # --- sinks -----------------------------------------------------------------------
    def known_sink_kinds(self) -> tuple[str, ...]:
        """Kinds of known sinks this model offers (e.g. ``first_token``, ``cls``)."""
        return ()

    def known_sink_site(self) -> nn.Module:
        """The module whose pre-forward call sees the inputs that say where the known sinks are."""
        raise NotImplementedError(f"{type(self).__name__} offers no known sinks; use sinks.known_sinks: []")

    def known_sinks_of_call(self, kinds: list[str], args: tuple, kwargs: dict) -> KnownSinks:
        """Known sinks of one call of :meth:`known_sink_site` (its positional and keyword arguments)."""
        raise NotImplementedError(f"{type(self).__name__} offers no known sinks; use sinks.known_sinks: []")

    def check_known_sink_kinds(self, kinds: list[str]) -> None:
        unknown = [k for k in kinds if k not in self.known_sink_kinds()]
        if unknown:
            raise ValueError(f"sinks.known_sinks {unknown} not offered by {type(self.model).__name__}; "
                             f"available: {list(self.known_sink_kinds())} (or [] for content-based only)")

    def install_known_sinks(self, state: SinkState, kinds: list[str], hooks: HookManager) -> None:
        """Hook :meth:`known_sink_site` so every forward pass starts ``state`` with the known sinks.

        The state is handed to the site module (``vtquant_sink_state``); the hook is owned by ``hooks``.
        """
        self.check_known_sink_kinds(kinds)
        site = self.known_sink_site()
        site.vtquant_sink_state = state
        hooks.pre_forward(site, _KnownSinkHook(self, kinds), with_kwargs=True)

    def known_sink_types(self, kinds: list[str]) -> Optional[list[str]]:
        """Names of fixed template types of the known sinks (vision: ``cls``, ``register0``...).

        ``None`` (LLMs): known sinks are typed by order and the number of types comes from data.
        """
        return None

    def head_sink_types(self, kinds: list[str]) -> list[int]:
        """Known types whose token a head reads (CLS, end-of-text): never replaced by a template."""
        return []

    # --- rotation / io -----------------------------------------------------------------
    def rotation_spec(self) -> Any:
        raise NotImplementedError(f"{type(self).__name__} does not support rotation yet")

    def config_dict(self) -> dict:
        """What :meth:`from_config_dict` needs to rebuild the (unquantized) skeleton."""
        raise NotImplementedError

    @classmethod
    def from_config_dict(cls, data: dict) -> nn.Module:
        raise NotImplementedError

    # --- what applications read (vtquant.analyze, vtquant.vision); defaults: one tower --------------
    def input_kind(self) -> str:
        """What a batch holds: ``tokens`` (ids ``[B, T]``) or ``images`` (``[B, 3, H, W]``)."""
        return "tokens"

    def prefix_kinds(self) -> list[tuple[str, str, int]]:
        """``[(kind, type name, position), ...]`` of prefix tokens at fixed positions (CLS, registers)."""
        return []

    def attention_spec(self) -> Any:
        """The :class:`~vtquant.adapters.spec.AttentionSpec` of the blocks (q / k / v modules, heads,
        RoPE), or ``None`` when this adapter cannot describe its attention."""
        return None

    def analysis_forward(self, batch: Any, attentions: bool = False) -> tuple[Optional[torch.Tensor], Optional[list]]:
        """One forward of a one-sequence ``batch`` for ``vtquant analyze``.

        Returns:
            ``(next-token logits [T, V] or None, per-block attention probabilities [H, T, T] or None)``;
            the default runs :meth:`forward` and returns neither.
        """
        self.forward(batch)
        return None, None

    @classmethod
    def adapter_class(cls, model: nn.Module) -> type["ModelAdapter"]:
        """The registered adapter class of ``model`` (without building it: a two-tower model's class
        refuses to be built but still lists its :meth:`towers`).

        Raises:
            UnsupportedModelError: as :func:`get_adapter`.
        """
        _import_builtin_adapters()
        found = _REGISTRY.get(f"{type(model).__module__}.{type(model).__name__}") or _REGISTRY.get(type(model).__name__)
        if found is None:
            get_adapter(model)  # raises the error that lists the supported classes
        return found

    @classmethod
    def towers(cls, model: nn.Module) -> list:
        """The towers the core quantizes one at a time (:class:`~vtquant.adapters.spec.Tower`); by
        default the model itself, one tower named by what it reads (``visual`` or ``text``)."""
        from .spec import Tower

        adapter = cls(model)
        kind = adapter.input_kind()
        return [Tower("visual" if kind == "images" else "text", model, adapter, kind)]

    @classmethod
    def encoders(cls, model: nn.Module) -> Optional[tuple[Callable, Callable]]:
        """``(encode_image, encode_text)`` of an image-text model (features ``[N, D]``), else ``None``."""
        return None
