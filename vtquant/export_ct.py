"""Export a vtquant model as a ``compressed-tensors`` folder (what llm-compressor writes; transformers
with the ``compressed-tensors`` package and vLLM load it without vtquant).

What the format holds, and so what is exported (llm-compressor's ``QuantizationModifier`` +
``ModelCompressor`` save path is the peer: a dense model gets a ``QuantizationConfig`` applied,
its scale parameters filled, and is compressed on save):

* weights: symmetric int codes per output channel or per group, exactly vtquant's codes and scales
  (in the format compressed-tensors infers: ``int-quantized`` with static int8 activations,
  ``pack-quantized`` otherwise, W4A16 GPTQ included);
* activations: per-tensor static scales (``naive-static``, ``smoothquant`` whose smoothing is
  already folded into the norms and weights) or per-token dynamic (``dynamic-token``);
* the key / value cache: vtquant quantizes the outputs of ``k_proj`` / ``v_proj`` (before RoPE), so
  its scales are written as ``output_activations`` of those Linears (exact in transformers; vLLM's
  ``kv_cache_scheme`` quantizes after RoPE and is not what vtquant calibrated, so it is not written);
* rotation: the residual-stream and per-head rotations are folded into the weights, which the
  format holds exactly; the *online* Hadamard of the MLP down-projection input is not (transformers'
  compressed-tensors loader does not apply ``transform_config``), so such models are refused.

Numerics: the exported folder computes exactly what vtquant's model computes when that model was
quantized with ``activations.numerics: compressed-tensors`` (``vtquant quantize --format compressed-tensors``
sets it; :attr:`vtquant.config.ActArgs.numerics`): the format's int grid ``[-2^(b-1), 2^(b-1) - 1]``, its
scales (symmetric ``absmax / 127.5`` at 8 bits) and zero points, ``round(clamp(x / s + z))`` in the input's
dtype, at the same places (Linear inputs, ``k_proj`` / ``v_proj`` outputs; embeddings and the head are
not quantized by either).  Weights are exact in both numerics (the format stores vtquant's codes and
scales).  A model with vtquant's own activation numerics (``[-127, 127]``, ``round(x / s) + z``) is refused
unless ``allow_inexact=True``: there the grids differ on inputs outside the calibrated range and at
rounding ties, which a model with massive activations amplifies (naive-static SmolLM2: 27 % relative
logits, BENCHMARKS.md).

``insertquant`` and ``prefix`` are refused: the format has no place for sink detection (ratio tests
at the probe Linears), the templates inserted in place of sink rows, the full-precision sink rows or
the residual restore.  Use :func:`vtquant.save` (``format="hf"``) for those.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from .errors import VtquantError

EXPORT_FILE = "vtquant_export.json"
EXPORTABLE_METHODS = ("naive-static", "dynamic-token", "smoothquant")


class CompressedTensorsExportError(VtquantError, ValueError):
    """The model holds something the compressed-tensors format cannot express (the message says what)."""


@dataclass
class ExportReport:
    """What was written, and where the exported model's numerics differ from vtquant's."""

    path: str
    method: str
    quantization_format: str
    groups: dict = field(default_factory=dict)
    ignore: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    exact: bool = True

    def to_dict(self) -> dict:
        return dict(path=self.path, method=self.method, quantization_format=self.quantization_format,
                    groups=self.groups, ignore=self.ignore, notes=self.notes, exact=self.exact)


def _refusal(model: nn.Module) -> Optional[str]:
    """Why ``model`` cannot be exported (``None`` if it can)."""
    handle = getattr(model, "vtquant", None)
    if handle is None:
        return "the model is not quantized by vtquant; call vtquant.quantize_(model, recipe, calib) first"
    plan = handle.plan
    if getattr(handle.adapter, "family", "") != "hf-decoder":
        return (f"compressed-tensors export is for transformers decoders; {type(model).__name__} is saved with "
                "vtquant.save")
    if plan.method in ("insertquant", "prefix"):
        return (f"compressed-tensors cannot hold {plan.display_method}: its schema is config groups of "
                "per-tensor / per-channel / per-group / per-token quantizers, with no place for sink detection "
                "(the ratio tests at the probe Linears), the templates inserted for the sink rows"
                + (" (prefix: the full-precision sink rows)" if plan.method == "prefix" else "")
                + " or the residual restore; exporting the model without them would quantize the sinks with the "
                "scales calibrated without them and break it.  Instead: `vtquant quantize --format hf` (or "
                "vtquant.save(model, dir)) writes a transformers folder that AutoModelForCausalLM.from_pretrained "
                "loads exactly in any process that imports vtquant; or export a baseline of the same model that "
                "the format holds (naive-static, smoothquant, dynamic-token, rotate with rotation.online: false)")
    if plan.method not in EXPORTABLE_METHODS:
        return f"method {plan.method!r} has no compressed-tensors form (exported: {list(EXPORTABLE_METHODS)})"
    if plan.online_rotation:
        return ("the online Hadamard rotation of the MLP down-projection inputs cannot be expressed: transformers' "
                "compressed-tensors loader does not apply a transform_config, so the exported model would run "
                "without it.  Re-quantize with rotation.online: false (the residual-stream and per-head rotations "
                "are folded into the weights, which the format holds exactly), or save with vtquant.save")
    if plan.weights is not None and not plan.weights.symmetric:
        return "asymmetric weights are not exported"
    return None


def recipe_refusal(recipe: Any) -> Optional[str]:
    """Why a model quantized with ``recipe`` could not be exported (checked before minutes of calibration)."""
    if recipe.method in ("insertquant", "prefix"):
        return (f"compressed-tensors cannot hold {recipe.display_method} (no place for sink detection, templates or "
                "the residual restore): use --format hf, or a baseline the format holds (naive-static, smoothquant, "
                "dynamic-token, rotate with rotation.online: false)")
    if recipe.method not in EXPORTABLE_METHODS:
        return f"method {recipe.method!r} has no compressed-tensors form (exported: {list(EXPORTABLE_METHODS)})"
    if recipe.rotation.enabled and recipe.rotation.online:
        return ("the online Hadamard rotation cannot be expressed in compressed-tensors (transformers does not apply "
                "a transform_config): set rotation.online: false in the recipe")
    return None


def _inexact(plan: Any) -> list[str]:
    """The activation / cache quantizers of ``plan`` whose numerics the format does not reproduce."""
    return [name for name, a in (("activations", plan.activations), ("kv_cache", plan.kv_cache))
            if a is not None and a.numerics != "compressed-tensors"]


def _args(act: Any) -> Any:
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=act.bits, type="int", symmetric=act.symmetric,
                            strategy="tensor" if act.static else "token", dynamic=not act.static)


def _dense_copy(model: nn.Module, wrapped: dict) -> nn.Module:
    """A plain transformers model with vtquant's dequantized weights (folded norms, rotations, smoothing)."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dense = type(model)(config).eval()
    state = model.state_dict()
    new = {}
    for key in dense.state_dict():
        module, _, leaf = key.rpartition(".")
        if module in wrapped and leaf == "weight":
            new[key] = wrapped[module].dequantized_weight().detach().float().clone()
        else:
            new[key] = state[key].detach().clone()
    dense.load_state_dict(new, strict=True)
    return dense


def _groups(plan: Any, wrapped: dict) -> tuple[dict, dict]:
    """``{group name: QuantizationScheme}`` and ``{group name: [leaf names]}`` for the wrapped Linears."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    w = plan.weights
    wargs = None
    if w is not None:
        wargs = QuantizationArgs(num_bits=w.bits, type="int", symmetric=True,
                                 strategy="channel" if w.granularity == "per-channel" else "group",
                                 group_size=None if w.granularity == "per-channel" else w.group_size)
    aargs = _args(plan.activations) if plan.activations is not None else None
    kv_leaves = sorted({n.rsplit(".", 1)[-1] for n, q in wrapped.items() if q.out_act is not None})
    other = sorted({n.rsplit(".", 1)[-1] for n, q in wrapped.items() if q.out_act is None})
    schemes, leaves = {}, {}
    if other:
        schemes["group_0"] = QuantizationScheme(targets=["re:.*\\.(" + "|".join(other) + ")$"], weights=wargs,
                                                input_activations=aargs)
        leaves["group_0"] = other
    if kv_leaves:
        schemes["group_1"] = QuantizationScheme(targets=["re:.*\\.(" + "|".join(kv_leaves) + ")$"], weights=wargs,
                                                input_activations=aargs, output_activations=_args(plan.kv_cache))
        leaves["group_1"] = kv_leaves
    return schemes, leaves


@torch.no_grad()
def _fill_scales(dense: nn.Module, wrapped: dict) -> None:
    for name, q in wrapped.items():
        lin = dense.get_submodule(name)
        if q.weight is None:
            lin.weight_scale.data.copy_(q.w_scale.reshape(lin.weight_scale.shape))
            if hasattr(lin, "weight_zero_point"):
                lin.weight_zero_point.data.zero_()
        for quantizer, prefix in ((q.act, "input"), (q.out_act, "output")):
            if quantizer is None or not quantizer.static:
                continue
            scale = getattr(lin, f"{prefix}_scale")
            scale.data.copy_(quantizer.scale.reshape(scale.shape))
            zero = getattr(lin, f"{prefix}_zero_point", None)
            if zero is not None:
                shift = 0
                if quantizer.numerics == "vtquant" and not quantizer.symmetric:
                    shift = -(2 ** (quantizer.bits - 1))  # vtquant's [0, 2^b) -> the format's [-2^(b-1), ...)
                zero.data.copy_((quantizer.zero_point + shift).reshape(zero.shape).to(zero.dtype))


def _notes(plan: Any) -> list[str]:
    notes = []
    if _inexact(plan):
        notes.append("NOT EXACT: the activation quantizers use vtquant's numerics (symmetric grid [-127, 127], "
                     "round(x / s) + z); the format computes on [-128, 127] with round(x / s + z) (and symmetric "
                     "per-token scales absmax / 127.5): the loaded model differs from vtquant's outside the "
                     "calibrated range and at rounding ties.  Quantize with activations.numerics: compressed-tensors "
                     "(vtquant quantize --format compressed-tensors does) for an exact export")
    elif plan.activations is not None or plan.kv_cache is not None:
        notes.append("exact: the activation quantizers use compressed-tensors' numerics (grid [-2^(b-1), 2^(b-1) - 1], "
                     "its scales and zero points, round(clamp(x / s + z)))")
    if plan.kv_cache is not None:
        notes.append("key / value cache: written as output_activations of k_proj / v_proj (before RoPE, as vtquant "
                     "calibrated it); transformers applies them, vLLM's kv_cache_scheme (after RoPE) is not written")
    if plan.rotation is not None:
        notes.append("rotation: residual-stream and per-head rotations are folded into the exported weights "
                     "(exact); the head is untied from the embeddings")
    if plan.smoothquant is not None:
        notes.append("smoothquant: the smoothing factors are folded into the norms and weights (exact)")
    return notes


def _check_out(target: Path) -> None:
    if os.path.islink(target) or (target.exists() and not target.is_dir()):
        raise CompressedTensorsExportError(f"cannot export to {target}: it is a file or a link; choose a folder path")
    if target.is_dir() and os.listdir(target) and not (target / EXPORT_FILE).exists():
        raise CompressedTensorsExportError(
            f"cannot export to {target}: the folder exists and is not a vtquant compressed-tensors export (no "
            f"{EXPORT_FILE}); choose another path or remove it yourself (nothing was changed)")


def export_compressed_tensors(model: nn.Module, path: Union[str, os.PathLike], *, tokenizer: Any = None,
                              quiet: bool = False, allow_inexact: bool = False) -> ExportReport:
    """Write ``model`` (quantized by vtquant) as a compressed-tensors folder at ``path``.

    The folder (``config.json`` with ``quant_method: compressed-tensors``, ``model.safetensors``,
    ``generation_config.json``, the tokenizer if given or attached, and ``vtquant_export.json`` with
    the report) loads with ``AutoModelForCausalLM.from_pretrained`` in a process that has the
    ``compressed-tensors`` package and never imports vtquant.  It is written to a temporary sibling
    and moved into place; an existing folder is replaced only if it is an earlier export.

    Args:
        allow_inexact: export a model whose activation quantizers use vtquant's own numerics (the
            loaded folder then differs from it; ``report.exact`` is False and a note says so).

    Raises:
        CompressedTensorsExportError: the model holds what the format cannot (insertquant / prefix
            sink handling, an online rotation), or its activation numerics are vtquant's and
            ``allow_inexact`` is False; the message says what and what to use instead.
    """
    problem = _refusal(model)
    if problem is not None:
        raise CompressedTensorsExportError(problem)
    inexact = _inexact(model.vtquant.plan)
    if inexact and not allow_inexact:
        raise CompressedTensorsExportError(
            f"the {' and '.join(inexact)} quantizers use vtquant's numerics (grid [-127, 127], round(x / s) + z), "
            "which compressed-tensors cannot reproduce (its grid is [-128, 127] with round(x / s + z)): quantize with "
            f"{inexact[0]}.numerics: compressed-tensors (recipe.with_numerics('compressed-tensors'); `vtquant "
            "quantize --format compressed-tensors` sets it) for an exact export, or pass allow_inexact=True")
    try:
        import compressed_tensors
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    except ImportError:
        raise CompressedTensorsExportError("the compressed-tensors export needs the compressed-tensors package: "
                                           "pip install 'vtquant[deploy]'") from None
    from .core.quant import QuantLinear

    plan = model.vtquant.plan
    wrapped = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    dense = _dense_copy(model, wrapped)
    schemes, leaves = _groups(plan, wrapped)
    wrapped_names = set(wrapped)
    ignore = sorted(n for n, m in dense.named_modules() if isinstance(m, nn.Linear) and n not in wrapped_names)
    config = QuantizationConfig(config_groups=schemes, ignore=ignore, quantization_status="frozen")
    apply_quantization_config(dense, config, show_progress=not quiet)
    applied = {n for n, m in dense.named_modules() if getattr(m, "quantization_scheme", None) is not None}
    if applied != wrapped_names:
        raise CompressedTensorsExportError(f"the exported config groups do not cover exactly vtquant's Linears "
                                           f"(missing {sorted(wrapped_names - applied)[:4]}, extra "
                                           f"{sorted(applied - wrapped_names)[:4]})")
    _fill_scales(dense, wrapped)
    compressor = ModelCompressor.from_pretrained_model(dense)  # the format compressed-tensors infers for the scheme
    fmt = str(getattr(compressor.quantization_config.format, "value", compressor.quantization_config.format))
    target = Path(os.path.abspath(path))
    _check_out(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    report = ExportReport(path=str(path), method=plan.display_method, quantization_format=fmt,
                          groups={g: {"modules": leaves[g], "scheme": s.model_dump()} for g, s in schemes.items()},
                          ignore=ignore, notes=_notes(plan), exact=not inexact)
    try:
        compressor.compress_model(dense)
        dense.save_pretrained(str(tmp))
        compressor.update_config(str(tmp))
        tokenizer = tokenizer if tokenizer is not None else getattr(model.vtquant, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        import vtquant

        info = {"written_by": f"vtquant {vtquant.__version__}", "compressed_tensors": compressed_tensors.__version__,
                "plan": plan.to_dict(), **report.to_dict()}
        (tmp / EXPORT_FILE).write_text(json.dumps(info, indent=1, default=str) + "\n", encoding="utf-8")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        if target.exists():
            old = target.with_name(f".{target.name}.old-export")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report
