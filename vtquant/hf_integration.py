"""transformers-native vtquant checkpoints: ``config.json`` + ``quantization_config``, loadable by
``AutoModelForCausalLM.from_pretrained`` in any process that has imported vtquant.

The folder (written by :func:`vtquant.save` with ``format="hf"``, the default for transformers
models) is an ordinary transformers model folder plus vtquant's own two files::

    config.json          the model config with ``quantization_config`` (``quant_method: vtquant``):
                         format version, adapter, the quantization plan (method, quantizer settings,
                         targets, sink plan with its detection templates, rotation), the recipe, and
                         how weights are stored (W4 codes packed two per byte)
    model.safetensors    the state dict: int8 weight codes + scales, activation / cache scales, sink
                         templates, residual restore, full-precision embeddings / norms / head
    tokenizer files      when a tokenizer is given to :func:`vtquant.save` or attached to the model
    vtquant.json         format version, plan, recipe, report, sizes and sha256 of every other file
    recipe.yaml          the recipe, for people to read

How the loaders rebuild the model (torchao's ``TorchAoHfQuantizer`` is the peer):

* transformers builds the model on the meta device (no random initialisation of the fp32 model);
  :class:`VtquantHfQuantizer` replaces the target Linears by quantized skeletons following the
  plan (:func:`~vtquant.core.pipeline.apply_plan_`, still on meta, W4 code buffers in their
  packed shape); transformers fills every parameter and buffer from ``model.safetensors``;
  :func:`finalize_loaded_` unpacks W4 codes, rebuilds the online Hadamard factors from the
  recipe's seed and the detection templates from the plan, and attaches the recipe;
* :func:`vtquant.load` on such a folder verifies the checksums of ``vtquant.json`` and goes
  through the same ``from_pretrained`` path, so both loaders give the same model.

Registration with transformers (``register_quantization_config`` / ``register_quantizer``) happens
when ``transformers.quantizers.auto`` is imported after vtquant, or at once if it already was
(:func:`register_with_transformers`); importing vtquant never imports transformers itself.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

QUANT_METHOD = "vtquant"
HF_FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
PACK_W4 = "int4-two-per-byte"
"""W<=4 codes: ``uint8 [out, ceil(in / 2)]``, column ``2j`` in the low nibble, ``2j + 1`` in the high
nibble, each nibble the two's complement of the code (-8..7)."""

_AUTO_MODULE = "transformers.quantizers.auto"


# ------------------------------------------------------------------------------------------
# W4 packing
# ------------------------------------------------------------------------------------------
def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7] ``[out, in]`` -> ``uint8 [out, ceil(in / 2)]`` (see :data:`PACK_W4`)."""
    if codes.dtype != torch.int8:
        raise ValueError(f"pack_int4: expected int8 codes, got {codes.dtype}")
    lo_hi = codes.to(torch.int16) & 0xF
    if lo_hi.shape[1] % 2:
        lo_hi = torch.nn.functional.pad(lo_hi, (0, 1))
    packed = lo_hi[:, 0::2] | (lo_hi[:, 1::2] << 4)
    return packed.to(torch.uint8).contiguous()


def unpack_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``uint8 [out, ceil(in / 2)]`` -> int8 codes ``[out, in]``."""
    p = packed.to(torch.int16)
    nibbles = torch.stack((p & 0xF, (p >> 4) & 0xF), dim=-1).reshape(p.shape[0], -1)[:, :in_features]
    return torch.where(nibbles >= 8, nibbles - 16, nibbles).to(torch.int8).contiguous()


def _quant_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from .core.quant import QuantLinear

    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]


def _packed(module: nn.Module) -> bool:
    return module.weight is None and module.w_bits is not None and module.w_bits <= 4


# ------------------------------------------------------------------------------------------
# what is written
# ------------------------------------------------------------------------------------------
def _tied_targets(model: nn.Module, state: dict) -> set:
    """State-dict keys that are transformers tie targets sharing memory with their source (not written)."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    out = set()
    for target, source in tied.items():
        a, b = state.get(target), state.get(source)
        if a is not None and b is not None and a.data_ptr() == b.data_ptr() and a.shape == b.shape:
            out.add(target)
    return out


@torch.no_grad()
def hf_state_dict(model: nn.Module, embeddings: Optional[str] = None) -> dict:
    """The tensors of ``model.safetensors``: the state dict, W<=4 codes packed, tie targets dropped.

    Args:
        embeddings: ``None`` or ``"bf16"``: the input embedding table and a full-precision output head
            are stored in bfloat16 (both loaders cast them back to the model's float type).
    """
    state = model.state_dict()
    drop = _tied_targets(model, state)
    out = {k: v for k, v in state.items() if k not in drop}
    for name, q in _quant_linears(model):
        if _packed(q):
            out[f"{name}.qweight" if name else "qweight"] = pack_int4(q.qweight)
    if embeddings is not None:
        if embeddings != "bf16":
            raise ValueError(f"format='hf' stores embeddings in full precision or bf16 (compact_embeddings='bf16'); "
                             f"{embeddings!r} needs format='vtquant'")
        from .storage import _tables

        keys, head = _tables(model)
        for key in keys + ([head] if head else []):
            if key in out:
                out[key] = out[key].to(torch.bfloat16)
    seen: dict = {}
    result = {}
    for k, v in out.items():  # safetensors refuses shared memory: copy any remaining alias
        ptr = (v.data_ptr(), v.dtype, tuple(v.shape))
        result[k] = v.detach().clone().contiguous() if ptr in seen and v.numel() else v.detach().contiguous()
        seen[ptr] = k
    return result


def quantization_config_dict(model: nn.Module, recipe_yaml: Optional[str]) -> dict:
    """The ``quantization_config`` of ``config.json`` (everything :class:`VtquantHfQuantizer` needs)."""
    import vtquant

    handle = model.vtquant
    plan = handle.plan.to_dict()
    packed = sorted(n for n, q in _quant_linears(model) if _packed(q))
    return {
        "quant_method": QUANT_METHOD,
        "format_version": HF_FORMAT_VERSION,
        "written_by": f"vtquant {vtquant.__version__}",
        "adapter": type(handle.adapter).__name__,
        "method": handle.plan.display_method,
        "plan": plan,
        "rotation": plan.get("rotation"),
        "weight_packing": {"format": PACK_W4, "modules": packed} if packed else None,
        "recipe_yaml": recipe_yaml,
    }


def model_config_dict(model: nn.Module, qconfig: dict) -> dict:
    """``config.json``: the transformers config of ``model`` with ``architectures`` and ``quantization_config``."""
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    config["dtype"] = "float32"
    config["quantization_config"] = qconfig
    return config


def save_tokenizer(tokenizer: Any, folder: Path) -> list[str]:
    """Write ``tokenizer`` (anything with ``save_pretrained``) into ``folder``; the names of the files written."""
    if not callable(getattr(tokenizer, "save_pretrained", None)):
        log.warning("the tokenizer (%s) has no save_pretrained: the checkpoint is written without it",
                    type(tokenizer).__name__)
        return []
    before = set(os.listdir(folder))
    tokenizer.save_pretrained(str(folder))
    written = sorted(set(os.listdir(folder)) - before)
    for name in written:
        if (folder / name).is_dir():
            raise ValueError(f"the tokenizer wrote a folder {name!r}; vtquant checkpoints hold plain files only")
    return written


# ------------------------------------------------------------------------------------------
# what is read: the skeleton before loading, the finishing touches after
# ------------------------------------------------------------------------------------------
def supports_hf_format(model: nn.Module) -> bool:
    """A transformers ``PreTrainedModel`` whose adapter rebuilds it from its config (HF decoders and towers)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    handle = getattr(model, "vtquant", None)
    family = getattr(getattr(handle, "adapter", None), "family", "")
    return isinstance(model, PreTrainedModel) and family in ("hf-decoder", "hf-vision")


def prepare_skeleton_(model: nn.Module, qconfig: dict) -> None:
    """Quantized skeleton of ``model`` (built on the meta device by transformers) following the plan."""
    from .adapters.base import get_adapter
    from .core.pipeline import apply_plan_

    version = qconfig.get("format_version")
    if version != HF_FORMAT_VERSION:
        raise ValueError(f"quantization_config.format_version {version!r} is not supported by this vtquant "
                         f"(reads {HF_FORMAT_VERSION}); update vtquant")
    adapter = get_adapter(model)
    if type(adapter).__name__ != qconfig.get("adapter"):
        raise ValueError(f"this checkpoint was quantized through the {qconfig.get('adapter')} adapter, but "
                         f"{type(model).__name__} gets {type(adapter).__name__}; load it with the model class "
                         "named in config.json's architectures")
    with torch.device("cpu"):  # small tensors made from the plan (scales, templates) need real storage
        apply_plan_(model, adapter, qconfig["plan"])
    packing = qconfig.get("weight_packing") or {}
    if packing:
        if packing.get("format") != PACK_W4:
            raise ValueError(f"unknown weight packing {packing.get('format')!r}; this vtquant reads {PACK_W4}")
        modules = dict(_quant_linears(model))
        for name in packing.get("modules", []):
            q = modules[name]
            q.register_buffer("qweight", torch.empty(q.out_features, (q.in_features + 1) // 2, dtype=torch.uint8,
                                                     device=q.qweight.device))
    if qconfig["plan"].get("rotation") is not None:
        model.config.tie_word_embeddings = False


@torch.no_grad()
def finalize_loaded_(model: nn.Module, qconfig: dict) -> nn.Module:
    """After the tensors are in: unpack W4 codes, rebuild online rotations and detection templates."""
    from .core.rotation import random_hadamard_factors

    plan = model.vtquant.plan
    packing = qconfig.get("weight_packing") or {}
    modules = dict(_quant_linears(model))
    for name in packing.get("modules", []):
        q = modules[name]
        q.register_buffer("qweight", unpack_int4(q.qweight, q.in_features))
        q._w_cache = None
    for q in modules.values():
        if q.name in plan.online_rotation:
            signs, factors = random_hadamard_factors(q.in_features, plan.rotation.seed + 1)
            q.rot_signs = None
            q.set_input_rotation(signs, factors)
    state = model.vtquant.state
    if state is not None and plan.sinks is not None:
        for stage, det in plan.sinks.det_templates.items():
            state.det_templates[stage] = torch.tensor(det)
    if qconfig.get("recipe_yaml"):
        import yaml

        from .recipe import recipe_from_dict

        model.vtquant.recipe = recipe_from_dict(yaml.safe_load(qconfig["recipe_yaml"]))
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"after loading, {left[:4]} are still empty (meta); the checkpoint does not match its plan")
    return model.eval()


# ------------------------------------------------------------------------------------------
# the transformers classes (built lazily: transformers is only imported when it is used)
# ------------------------------------------------------------------------------------------
_CLASSES: dict = {}


def _classes() -> tuple[type, type]:
    if _CLASSES:
        return _CLASSES["config"], _CLASSES["quantizer"]
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class VtquantConfig(QuantizationConfigMixin):
        """``quantization_config`` of a vtquant checkpoint (see :func:`quantization_config_dict`)."""

        def __init__(self, plan: Optional[dict] = None, adapter: Optional[str] = None, format_version: int = 1,
                     method: Optional[str] = None, rotation: Optional[dict] = None,
                     weight_packing: Optional[dict] = None, recipe_yaml: Optional[str] = None,
                     written_by: Optional[str] = None, **kwargs: Any) -> None:
            self.quant_method = QUANT_METHOD
            if plan is None or adapter is None:
                raise ValueError("a vtquant quantization_config needs 'plan' and 'adapter': vtquant only loads "
                                 "models it quantized (vtquant.quantize_ then vtquant.save)")
            self.format_version = format_version
            self.written_by = written_by
            self.adapter = adapter
            self.method = method
            self.plan = plan
            self.rotation = rotation
            self.weight_packing = weight_packing
            self.recipe_yaml = recipe_yaml
            for key, value in kwargs.items():
                setattr(self, key, value)

        def to_dict(self) -> dict:
            data = super().to_dict()
            data["quant_method"] = QUANT_METHOD
            return data

    class VtquantHfQuantizer(HfQuantizer):
        """Loads vtquant checkpoints: quantized skeleton on meta, tensors from the file, then the rest."""

        requires_calibration = True  # pre-quantized checkpoints only: quantizing needs calibration data

        def __init__(self, quantization_config: Any, **kwargs: Any) -> None:
            super().__init__(quantization_config, **kwargs)

        def validate_environment(self, *args: Any, **kwargs: Any) -> None:
            device_map = kwargs.get("device_map")
            if isinstance(device_map, dict) and len(set(device_map.values())) > 1:
                raise ValueError("vtquant checkpoints load onto one device; pass device_map=None or one device")

        def update_dtype(self, dtype: Any) -> Any:
            if dtype is not None and dtype != torch.float32:
                log.warning("vtquant: loading in %s; the checkpoint's scales and templates were calibrated in "
                            "float32 (logits equal vtquant's only in float32)", dtype)
            return dtype

        def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
            prepare_skeleton_(model, self.quantization_config.to_dict())

        def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
            return finalize_loaded_(model, self.quantization_config.to_dict())

        def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
            return False

        def is_serializable(self) -> bool:
            return False  # save with vtquant.save (it writes the plan, checksums and packing)

        @property
        def is_trainable(self) -> bool:
            return False

    for cls in (VtquantConfig, VtquantHfQuantizer):
        cls.__qualname__ = cls.__name__
    _CLASSES.update(config=VtquantConfig, quantizer=VtquantHfQuantizer)
    return VtquantConfig, VtquantHfQuantizer


def register_with_transformers() -> bool:
    """Register ``quant_method: vtquant`` with transformers (idempotent); False if transformers is missing."""
    try:
        from transformers.quantizers import auto
    except ImportError:
        return False
    config_cls, quantizer_cls = _classes()
    if auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not config_cls:
        auto.AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
        auto.register_quantization_config(QUANT_METHOD)(config_cls)
    if auto.AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not quantizer_cls:
        auto.AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        auto.register_quantizer(QUANT_METHOD)(quantizer_cls)
    return True


def install_registration_hook() -> None:
    """Register with transformers now if its quantizer registry is loaded, else right after it loads."""
    from ._post_import import when_imported

    when_imported(_AUTO_MODULE, register_with_transformers)


# ------------------------------------------------------------------------------------------
# vtquant.load of an hf-format folder
# ------------------------------------------------------------------------------------------
def load_hf_folder(folder: Path, device: Optional[str] = None) -> nn.Module:
    """Load an hf-format vtquant folder through transformers' ``from_pretrained`` (checksums already verified)."""
    import transformers
    from transformers.utils import logging as hf_logging

    register_with_transformers()
    config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    archs = config.get("architectures") or []
    if not archs or not hasattr(transformers, archs[0]):
        raise ValueError(f"{folder / CONFIG_FILE}: 'architectures' {archs} names no transformers model class")
    model_cls = getattr(transformers, archs[0])
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model = model_cls.from_pretrained(str(folder), dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    if device is not None:
        model.to(device)
    return model.eval()
