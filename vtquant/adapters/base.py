"""The adapter interface: the only place that knows model families (DESIGN.md).

An adapter turns a concrete model into generic pieces the core works on:
blocks in forward order, the quantizable Linears of each block, the probe Linear
(an MLP's second Linear) whose input carries the spike, the token layout, the
sink positions the model makes known (first token, CLS, registers), and a
:class:`~vtquant.core.rotation.RotationSpec`.  Adapters register themselves by
the class names they support; :func:`get_adapter` picks one or says how to add one.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn as nn

_REGISTRY: dict[str, type["ModelAdapter"]] = {}


def register_adapter(*class_names: str) -> Callable[[type], type]:
    """Class decorator: register an adapter for the given model class names."""

    def deco(cls: type) -> type:
        for name in class_names:
            _REGISTRY[name] = cls
        cls.supported = tuple(sorted(set(getattr(cls, "supported", ())) | set(class_names)))
        return cls

    return deco


def supported_architectures() -> list[str]:
    _import_builtin_adapters()
    return sorted(_REGISTRY)


def _import_builtin_adapters() -> None:
    from . import hf_decoder  # noqa: F401  (registers on import)
    from . import hf_vision, open_clip, timm_vit  # noqa: F401  (import no model library until used)


class UnsupportedModelError(TypeError):
    """No adapter knows this model class."""


def get_adapter(model: nn.Module) -> "ModelAdapter":
    """The adapter for ``model``, chosen by its class name.

    Raises:
        UnsupportedModelError: listing the supported classes and how to add an adapter.
    """
    _import_builtin_adapters()
    name = type(model).__name__
    # a "module.Class" key wins over the bare class name (timm and open_clip both have a VisionTransformer)
    cls = _REGISTRY.get(f"{type(model).__module__}.{name}") or _REGISTRY.get(name)
    if cls is None:
        raise UnsupportedModelError(
            f"no vtquant adapter for model class {name!r}. Supported: {sorted(_REGISTRY)}. "
            "To add one, subclass vtquant.adapters.ModelAdapter (see vtquant/adapters/hf_decoder.py), "
            f"decorate it with @register_adapter({name!r}) and import it before calling vtquant."
        )
    return cls(model)


class ModelAdapter:
    """Describes one model to the core.  Subclasses implement the abstract pieces."""

    supported: tuple = ()
    token_layout: str = "bsd"
    family: str = "generic"

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    # --- structure -------------------------------------------------------------------
    def blocks(self) -> list[nn.Module]:
        raise NotImplementedError

    def block_linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        """Quantizable Linears of a block, ``{relative name: module}`` in forward order."""
        raise NotImplementedError

    def probe_name(self) -> str:
        """Relative name (within a block) of the MLP second Linear whose input is probed."""
        raise NotImplementedError

    def block_output(self, output: Any) -> torch.Tensor:
        """The residual-stream tensor in a block's output."""
        return output[0] if isinstance(output, (tuple, list)) else output

    def replace_block_output(self, output: Any, hidden: torch.Tensor) -> Any:
        if isinstance(output, tuple):
            return (hidden,) + tuple(output[1:])
        if isinstance(output, list):
            return [hidden] + list(output[1:])
        return hidden

    def hidden_size(self) -> int:
        raise NotImplementedError

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

    def install_known_sinks(self, state: Any, kinds: list[str], hooks: Any) -> None:
        """Register hooks that reset ``state`` with the known sink mask at each forward."""
        raise NotImplementedError

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

    def describe(self) -> dict:
        return {"adapter": type(self).__name__, "model_class": type(self.model).__name__}

    def config_dict(self) -> dict:
        """What :meth:`from_config_dict` needs to rebuild the (unquantized) skeleton."""
        raise NotImplementedError

    @classmethod
    def from_config_dict(cls, data: dict) -> nn.Module:
        raise NotImplementedError

    def token_text(self, tokenizer: Any, ids: torch.Tensor) -> list[str]:
        return [str(int(i)) for i in ids]

    # --- what applications read (vtquant.analyze, vtquant.vision); defaults: one tower --------------
    def input_kind(self) -> str:
        """What a batch holds: ``tokens`` (ids ``[B, T]``) or ``images`` (``[B, 3, H, W]``)."""
        return "tokens"

    def output_kind(self) -> str:
        """What the model returns: ``next-token-logits`` (a causal LM), ``class-logits`` (a classifier
        head) or ``features`` (an embedding, pooled features or hidden states)."""
        return "features"

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
