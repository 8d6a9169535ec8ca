"""Vision-language models (LLaVA, Idefics3 / SmolVLM, Qwen2-VL) on tiny random configs with sinks
implanted in both towers (``tests/vlmmodels.py``).

The sinks of every input are known from how it was built: in the vision tower the CLS (LLaVA)
and the patches painted bright, in the language model the first token and the image tokens of
painted patches.  Every expectation below comes from that construction, never from a run.
"""
from __future__ import annotations

import copy

import pytest
import torch

import vtquant
from vtquant.config import ConfigError, Recipe, SinkConfig, method_recipe
from vtquant.recipe import load_recipe, recipe_from_dict

import visionmodels as vm
import vlmmodels as vl

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = ["cls", "first_token"]
_CACHE: dict = {}


def _llava():
    if "llava" not in _CACHE:
        _CACHE["llava"] = vl.tiny_llava()
    return _CACHE["llava"]


def _calib():
    return [vl.llava_batch(vm.random_painted(4, s), seed=s) for s in range(3)]


def _inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "pixel_values")}


def _recipe(**kw) -> Recipe:
    return Recipe(sinks=SinkConfig(known_sinks=list(KINDS)), ignore=[], **kw)


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**_inputs(batch)).logits


def _rel(ref: torch.Tensor, new: torch.Tensor) -> float:
    return float((new - ref).norm() / ref.norm())


def test_llava_detection_exact_in_both_towers():
    """New images and prompts: the vision tower finds CLS + exactly the painted patches, the language
    model the first token + exactly the image tokens of painted patches (nothing else, in either)."""
    model = copy.deepcopy(_llava())
    report = vtquant.quantize_vlm_(model, _recipe(), _calib(), quiet=True)
    assert set(report.towers) == {"vision", "language"} and report.kept == ["projector"]
    for seed in (50, 51):
        test = vl.llava_batch(vm.random_painted(4, seed, max_per_image=3), seed=seed)
        _logits(model, test)
        assert model.vtquant.towers["vision"].sink_positions() == test["vision_expected"]
        assert model.vtquant.towers["language"].sink_positions() == test["expected"]


def test_llava_image_token_sinks_counted():
    """The report counts the language model's calibration sinks on image tokens (one per painted patch)
    and on text tokens (the first token of each prompt), and the vision tower's CLS and patch sinks."""
    calib = _calib()
    painted = [vm.random_painted(4, s) for s in range(3)]
    n_painted = sum(len(p) for rows in painted for p in rows)
    n_rows = sum(len(rows) for rows in painted)
    model = copy.deepcopy(_llava())
    report = vtquant.quantize_vlm_(model, _recipe(), calib, quiet=True)
    lang = report.sinks["language"]
    assert lang["image_tokens"] == n_painted and lang["text_tokens"] == n_rows == lang["first_token"]
    assert lang["image_tokens_total"] == n_rows * vl.LLAVA_IMAGE_TOKENS
    assert report.sinks["vision"] == {"prefix": n_rows, "patches": n_painted, "sequences": n_rows}
    assert "image_tokens" in report.summary() and report.to_dict()["sinks"] == report.sinks


def test_llava_clamp_and_insert_quant_off_matches_fp():
    """insertquant with weights and activations in full precision (clamp sink rows, insert templates,
    restore the residual) in both towers: the VLM's logits stay within 1 % of FP on new inputs."""
    fp = _llava()
    model = copy.deepcopy(fp)
    report = vtquant.quantize_vlm_(model, _recipe(weights=None, activations=None), _calib(), quiet=True)
    for name in ("vision", "language"):
        assert report.towers[name].equivalence["sinks"]["ok"] is not None  # the pipeline's own check ran
        assert report.towers[name].restore_layer is not None
    test = vl.llava_batch(vm.random_painted(4, 60), seed=60)
    assert _rel(_logits(fp, test), _logits(model, test)) < 1e-2


def test_llava_w8a8_insertquant_beats_naive_static():
    """W8A8 per-tensor static: insertquant's relative logit error is several times below naive-static's."""
    fp = _llava()
    test = vl.llava_batch(vm.random_painted(4, 61), seed=61)
    ref = _logits(fp, test)
    errors = {}
    for method in ("naive-static", "insertquant"):
        model = copy.deepcopy(fp)
        vtquant.quantize_vlm_(model, method_recipe(method, _recipe()), _calib(), quiet=True)
        errors[method] = _rel(ref, _logits(model, test))
    assert errors["insertquant"] < errors["naive-static"] / 3, errors


def test_llava_language_rotation_folds_into_projector_and_rollback():
    """The language model's residual rotation folds into the decoder, lm_head and the projector's output
    Linear (checked for equivalence on the VLM's logits); a vision rotation, which LLaVA's layer -2
    features cannot take, is refused with a clear error and leaves the whole model as it was."""
    fp = _llava()
    model = copy.deepcopy(fp)
    rec = _recipe()
    rec.towers = {"language": method_recipe("insertquant+rotate", rec),
                  "vision": method_recipe("insertquant", rec)}
    report = vtquant.quantize_vlm_(model, rec, _calib(), quiet=True)
    eq = report.towers["language"].equivalence["rotation"]
    assert eq["ok"] and eq["residual_folded"]
    test = vl.llava_batch(vm.random_painted(4, 62), seed=62)
    assert _rel(_logits(fp, test), _logits(model, test)) < 0.05

    model = copy.deepcopy(fp)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = _recipe()
    bad.towers = {"vision": method_recipe("insertquant+rotate", bad)}
    with pytest.raises(ConfigError, match="hidden states of layer -2"):
        vtquant.quantize_vlm_(model, bad, _calib(), quiet=True)
    assert getattr(model, "vtquant", None) is None
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert _rel(_logits(fp, test), _logits(model, test)) == 0.0


def test_quantize_forwards_vlms_and_checks_batches():
    model = copy.deepcopy(_llava())
    with pytest.raises(ConfigError, match="mapping"):
        vtquant.quantize_(model, _recipe(), [torch.zeros(1, 8, dtype=torch.long)])
    with pytest.raises(ConfigError, match="pixel_values"):
        vtquant.quantize_(model, _recipe(), [{"input_ids": torch.zeros(1, 8, dtype=torch.long)}])
    report = vtquant.quantize_(model, _recipe(), _calib()[:1], quiet=True)
    assert isinstance(report, vtquant.vlm.VLMReport) and model.vtquant.report is report
    with pytest.raises(RuntimeError, match="already quantized"):
        vtquant.quantize_vlm_(model, _recipe(), _calib()[:1])


# ------------------------------------------------------------------------------------------
# recipes
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["hf/llava-1.5-7b.yaml"])
def test_shipped_vlm_recipes_load(path):
    recipe = load_recipe(path)
    assert set(recipe.towers) == {"vision", "projector", "language"}
    assert recipe_from_dict(recipe.to_dict()) == recipe
    for tower in recipe.towers.values():
        assert tower.towers is None and tower.version == 1


def test_recipe_tower_sections_validate():
    base = {"version": 1, "method": "insertquant", "sinks": {"known_sinks": ["cls", "first_token"], "alpha": 32.0}}
    rec = recipe_from_dict({**base, "towers": {"vision": {"sinks": {"known_sinks": ["cls"]}},
                                               "projector": {"method": "fp"}}})
    assert rec.towers["vision"].sinks.known_sinks == ["cls"] and rec.towers["vision"].sinks.alpha == 32.0
    assert rec.towers["projector"].method == "fp" and "language" not in rec.towers
    with pytest.raises(ConfigError, match="unknown tower 'visual'.*did you mean 'vision'"):
        recipe_from_dict({**base, "towers": {"visual": {}}})
    with pytest.raises(ConfigError, match="towers.language: unknown key 'methd'"):
        recipe_from_dict({**base, "towers": {"language": {"methd": "fp"}}})
    with pytest.raises(ConfigError, match="towers.vision.*bits"):
        recipe_from_dict({**base, "towers": {"vision": {"weights": {"bits": 12}}}})
    with pytest.raises(ConfigError, match="towers: expected a mapping"):
        recipe_from_dict({**base, "towers": ["vision"]})
    with pytest.raises(ConfigError, match="unknown tower"):
        Recipe(towers={"text": Recipe()})


def test_projector_refuses_sink_methods():
    model = copy.deepcopy(_llava())
    rec = _recipe()
    rec.towers = {"projector": _recipe()}
    with pytest.raises(ConfigError, match="projector has no blocks"):
        vtquant.quantize_vlm_(model, rec, _calib()[:1], quiet=True)
    assert getattr(model, "vtquant", None) is None
