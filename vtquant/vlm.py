"""Vision-language models: one recipe, three parts, each with the sink machinery of its kind (docs/vlm.md).

:func:`quantize_vlm_` quantizes a transformers LLaVA, Idefics3 (SmolVLM) or Qwen2-VL / Qwen2.5-VL
in place, part by part as its adapter lists them (:class:`~vtquant.adapters.hf_vlm.HFVLMAdapter`):
the vision tower, then the language model, then the projector.  Each part goes through the same
pipeline as a single-tower model (:func:`vtquant.core.pipeline.quantize_model_`): its own sink
calibration, its own rotation / smoothing equivalence check and clamp-and-insert check, its own
``.vtquant`` handle; every forward pass runs the *whole* VLM on the image + text calibration
batches, so the language model is calibrated on its real inputs and every check compares the
VLM's logits.  If any part fails, every part is given back as it was (weights, modules, hooks).

The :class:`VLMReport` holds one :class:`~vtquant.core.pipeline.QuantReport` per part and the sink
counts per tower: in the language model how many calibration sinks sit on image tokens and how many
on text tokens (the first token among them), in the vision tower how many are prefix tokens (CLS)
and how many patches.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Optional

import torch
import torch.nn as nn

from .config import ConfigError, Recipe

FP_METHOD = "fp"


@dataclass
class VLMReport:
    """What :func:`quantize_vlm_` did, per part.

    Attributes:
        model: the VLM class name.
        towers: ``{part: QuantReport}`` of the parts quantized (``vision``, ``language``, ``projector``).
        kept: parts kept in full precision (method ``fp``).
        methods: ``{part: display method}`` of every part.
        sinks: ``{part: {...counts}}``: language: ``image_tokens`` / ``text_tokens`` (sinks found on each
            kind of token over the calibration sequences), ``first_token`` (of the text ones), and the
            totals of tokens of each kind; vision: ``prefix`` / ``patches`` sinks and the number of
            sequences (images; Qwen2-VL packs a batch's images into one).
        seconds: wall time.
        notes: what the user should know.
    """

    model: str
    towers: dict = field(default_factory=dict)
    kept: list = field(default_factory=list)
    methods: dict = field(default_factory=dict)
    sinks: dict = field(default_factory=dict)
    seconds: float = 0.0
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["towers"] = {k: r.to_dict() for k, r in self.towers.items()}
        return out

    def summary(self) -> str:
        lines = [f"{self.model}: " + ", ".join(f"{k} {v}" for k, v in self.methods.items())
                 + f" ({self.seconds:.1f} s)"]
        for name, rep in self.towers.items():
            counts = self.sinks.get(name)
            lines.append(f"[{name}] sinks: {counts}" if counts else f"[{name}] no sinks")
            lines += ["  " + line for line in rep.summary().splitlines()]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def vlm_towers(model: nn.Module) -> list:
    """The parts of a VLM in quantization order (:class:`~vtquant.adapters.spec.Tower`: vision, language, projector)."""
    from .adapters.base import ModelAdapter
    from .adapters.hf_vlm import HFVLMAdapter, is_vlm

    if not is_vlm(model):
        from .adapters.hf_vlm import VLMS

        raise ConfigError(f"{type(model).__name__} is not a vision-language model vtquant knows ({sorted(VLMS)}); "
                          "use vtquant.quantize_ for single-tower models")
    assert ModelAdapter.adapter_class(model) is HFVLMAdapter
    return HFVLMAdapter.towers(model)


def tower_recipe(recipe: Recipe, name: str, adapter: Any) -> tuple[Recipe, list]:
    """The recipe of one part: ``recipe.towers[name]`` or the top-level recipe (the projector: ``fp``
    unless configured), ``sinks.known_sinks`` kept to the kinds this part offers.

    Returns:
        ``(recipe, notes)``.
    """
    from .config import method_recipe

    notes = []
    towers = recipe.towers or {}
    if name in towers:
        out = copy.deepcopy(towers[name])
    elif name == "projector":
        out = method_recipe(FP_METHOD, recipe)
        notes.append("projector: not configured (recipe.towers.projector), kept in full precision")
    else:
        out = copy.deepcopy(recipe)
        out.towers = None
    offered = adapter.known_sink_kinds()
    dropped = [k for k in out.sinks.known_sinks if k not in offered]
    if dropped and out.sinks.enabled and out.method != FP_METHOD:
        notes.append(f"{name}: known sinks {dropped} not offered by this part (offers {list(offered)}): not used")
    out.sinks.known_sinks = [k for k in out.sinks.known_sinks if k in offered]
    return out, notes


def _check_vlm_batches(model: nn.Module, batches: Optional[Iterable]) -> list:
    from .adapters.hf_vlm import vlm_inputs

    if batches is None:
        raise ConfigError("quantize_vlm_: calibration batches are None: pass batches=[...] (the processor's outputs for "
                          "images with prompts: mappings with input_ids, pixel_values, ...)")
    batches = list(batches)
    if not batches:
        raise ConfigError("quantize_vlm_: calibration batches are empty: pass at least one image + text batch")
    for batch in batches:
        vlm_inputs(model, batch)  # raises a clear error on a malformed batch
    return batches


class _ModelBackup:
    """Gives a VLM back as it was: every parameter and buffer (the objects, and CPU copies of their
    values when a rotation or smoothing will change them in place), every child module slot, the
    config, and removes what the parts' quantization added (hooks, handles, sink modules)."""

    ADDED = ("vtquant_restore", "vtquant_detect", "vtquant_unrotate")

    def __init__(self, model: nn.Module, tensors: bool = True) -> None:
        self.model = model
        self.tensors = []
        self.children = []
        for module in model.modules():
            for pname, p in list(module._parameters.items()) + list(module._buffers.items()):
                if p is not None:  # the objects always; CPU copies of the values only when a transform changes them
                    self.tensors.append((module, pname, p, p.detach().to("cpu", copy=True) if tensors else None))
            self.children.append((module, dict(module._modules)))
        self.configs = []
        for cfg in (getattr(model, "config", None),) + tuple(
                getattr(getattr(model, "config", None), k, None) for k in ("text_config", "vision_config")):
            if cfg is not None and hasattr(cfg, "__dict__"):
                self.configs.append((cfg, dict(vars(cfg))))
        self.tied = vars(model).get("_tied_weights_keys", "missing")

    def restore(self, towers: list) -> None:
        for tower in towers:
            handle = vars(tower.module).get("vtquant")
            if handle is not None and getattr(handle, "hooks", None) is not None:
                handle.hooks.remove()
            if "vtquant" in vars(tower.module):
                del tower.module.vtquant
        for module, children in self.children:
            module._modules.clear()
            module._modules.update(children)
        for module, pname, p, saved in self.tensors:
            if saved is not None:
                with torch.no_grad():
                    p.data = saved.to(p.device)
            store = module._parameters if pname in module._parameters else module._buffers
            store[pname] = p
        for module in self.model.modules():
            if "vtquant_sink_state" in vars(module):
                del module.vtquant_sink_state
        for cfg, saved in self.configs:
            vars(cfg).clear()
            vars(cfg).update(saved)
        if self.tied == "missing":
            vars(self.model).pop("_tied_weights_keys", None)
        else:
            self.model._tied_weights_keys = self.tied
        if "vtquant" in vars(self.model):
            del self.model.vtquant


class VLMHandle:
    """``model.vtquant`` of a quantized VLM: the report, the recipe and each part's own handle."""

    plan = None  # no single plan: each part's handle has its own
    save_hint = "each part has its own plan; re-run vtquant.quantize_vlm_, or torch.save the fake-quantized model"

    def __init__(self, report: VLMReport, recipe: Recipe, towers: list) -> None:
        self.report = report
        self.recipe = recipe
        self.towers = {t.name: getattr(t.module, "vtquant", None) for t in towers}

    def sink_positions(self) -> dict:
        """Sink positions per batch row of the last forward pass, per quantized part."""
        return {name: h.sink_positions() for name, h in self.towers.items() if h is not None}


def _sink_counts(name: str, adapter: Any, report: Any, batches: list, model: nn.Module) -> Optional[dict]:
    """How many calibration sinks the part found on which kind of token."""
    positions = report.calib_sink_positions
    if not report.stages or not positions:
        return None
    if name == "language":
        from .adapters.hf_vlm import image_token_id

        image_id = image_token_id(model)
        rows = []
        for batch in batches:
            ids = batch["input_ids"]
            mask = batch.get("attention_mask") if hasattr(batch, "get") else None
            for b in range(ids.shape[0]):
                valid = mask[b].bool() if mask is not None else torch.ones(ids.shape[1], dtype=torch.bool)
                rows.append((ids[b] == image_id, valid))
        if len(rows) != len(positions):
            return {"sinks": sum(len(p) for p in positions), "note": "sequences do not match the batches"}
        image = text = first = 0
        for (is_image, valid), pos in zip(rows, positions):
            first_pos = int(valid.long().argmax())
            for p in pos:
                if bool(is_image[p]):
                    image += 1
                else:
                    text += 1
                    first += int(p == first_pos)
        n_image = sum(int((im & v).sum()) for im, v in rows)
        n_text = sum(int((~im & v).sum()) for im, v in rows)
        return {"image_tokens": image, "text_tokens": text, "first_token": first, "sequences": len(rows),
                "image_tokens_total": n_image, "text_tokens_total": n_text}
    if name == "vision":
        prefix_pos = {pos for _, _, pos in adapter.prefix_kinds()}
        prefix = sum(1 for pos in positions for p in pos if p in prefix_pos)
        total = sum(len(p) for p in positions)
        return {"prefix": prefix, "patches": total - prefix, "sequences": len(positions)}
    return {"sinks": sum(len(p) for p in positions)}


def quantize_vlm_(model: nn.Module, recipe: Recipe, batches: Iterable, *, quiet: bool = False) -> VLMReport:
    """Quantize a vision-language model in place, part by part (vision tower, language model, projector).

    Args:
        model: a transformers ``LlavaForConditionalGeneration``, ``Idefics3ForConditionalGeneration``
            (SmolVLM), ``Qwen2VLForConditionalGeneration`` or ``Qwen2_5_VLForConditionalGeneration``.
        recipe: one recipe; ``recipe.towers`` may give each part its own section (``vision``,
            ``projector``, ``language``); a part without one uses the top-level recipe (the projector:
            kept in full precision).  ``sinks.known_sinks`` may list kinds of any part (``cls``,
            ``first_token``): each part uses those it offers.
        batches: calibration batches, each the processor's output for images with prompts (a mapping
            with ``input_ids``, ``attention_mask``, ``pixel_values`` and the family's image keys:
            ``pixel_attention_mask`` for Idefics3, ``image_grid_thw`` for Qwen2-VL).
        quiet: no progress bars.

    Returns:
        A :class:`VLMReport`; also on ``model.vtquant.report``.

    Raises:
        ConfigError: a malformed batch or recipe, or a transform a part refuses (the model is given back
            as it was).
    """
    from .core.methods import get_method
    from .core.pipeline import quantize_model_

    if getattr(model, "vtquant", None) is not None:
        raise RuntimeError("this model is already quantized by vtquant; load a fresh full-precision model")
    start = time.time()
    towers = vlm_towers(model)
    batches = _check_vlm_batches(model, batches)
    report = VLMReport(model=type(model).__name__)
    plan = []
    for tower in towers:
        rec, notes = tower_recipe(recipe, tower.name, tower.adapter)
        handler = get_method(rec.method)
        if tower.name == "projector" and handler.handles_sinks and rec.sinks.enabled:
            raise ConfigError(f"recipe.towers.projector: method {rec.method} calibrates sinks, but the projector has no "
                              "blocks of its own (its inputs' sinks are the vision tower's output tokens); use fp, "
                              "dynamic-token or naive-static for the projector")
        if tower.name == "projector" and rec.rotation.enabled and handler.quantizes:
            raise ConfigError("recipe.towers.projector: rotation is enabled, but the projector has no residual stream "
                              "of its own to rotate (the language model's rotation folds into its output Linear); set "
                              "towers.projector.rotation.enabled: false")
        plan.append((tower, rec))
        report.notes += notes
        report.methods[tower.name] = rec.display_method
    transforms = any(rec.rotation.enabled or rec.method == "smoothquant" for _, rec in plan)
    backup = _ModelBackup(model, tensors=transforms)
    try:
        for tower, rec in plan:
            if not get_method(rec.method).quantizes:
                report.kept.append(tower.name)
                continue
            rep = quantize_model_(tower.module, tower.adapter, rec, batches, quiet=quiet)
            tower.module.vtquant.recipe = rec
            report.towers[tower.name] = rep
            counts = _sink_counts(tower.name, tower.adapter, rep, batches, model)
            if counts is not None:
                report.sinks[tower.name] = counts
                rep.notes.append(f"{tower.name} sinks over the calibration sequences: "
                                 + ", ".join(f"{k} {v}" for k, v in counts.items()))
    except BaseException:
        backup.restore(towers)
        raise
    report.seconds = time.time() - start
    model.vtquant = VLMHandle(report, recipe, towers)
    return report
