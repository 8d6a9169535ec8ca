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

# family -> (builder, batch(model, painted, seed))
FAMILIES = {
    "llava": (vl.tiny_llava, lambda model, painted, seed: vl.llava_batch(painted, seed=seed)),
    "idefics3": (lambda: vl.tiny_idefics3(family="Idefics3"), vl.idefics3_batch),
    "smolvlm": (lambda: vl.tiny_idefics3(family="SmolVLM"), vl.idefics3_batch),
    "qwen2-vl": (vl.tiny_qwen2vl, lambda model, painted, seed: vl.qwen2vl_batch(painted, seed=seed)),
    "qwen2.5-vl": (vl.tiny_qwen25vl, lambda model, painted, seed: vl.qwen2vl_batch(painted, seed=seed)),
}
IMAGE_TOKENS = {"llava": vl.LLAVA_IMAGE_TOKENS, "idefics3": vl.IDEFICS3_IMAGE_TOKENS,
                "smolvlm": vl.IDEFICS3_IMAGE_TOKENS, "qwen2-vl": vl.QWEN_IMAGE_TOKENS, "qwen2.5-vl": vl.QWEN_IMAGE_TOKENS}


def _model(family: str = "llava"):
    if family not in _CACHE:
        _CACHE[family] = FAMILIES[family][0]()
    return _CACHE[family]


def _llava():
    return _model("llava")


def _batch(family: str, painted, seed: int) -> dict:
    return FAMILIES[family][1](_model(family), painted, seed)


def _calib(family: str = "llava"):
    return [_batch(family, vm.random_painted(4, s), s) for s in range(3)]


def _test_batch(family: str, seed: int) -> dict:
    return _batch(family, vm.random_painted(4, seed), seed)


_inputs = vl.vlm_inputs


def _recipe(**kw) -> Recipe:
    kw.setdefault("ignore", [])
    return Recipe(sinks=SinkConfig(known_sinks=list(KINDS)), **kw)


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**_inputs(batch)).logits


def _rel(ref: torch.Tensor, new: torch.Tensor) -> float:
    return float((new - ref).norm() / ref.norm())


def _insertquant(family: str):
    """``(model, report)``: a copy of the family's model quantized with insertquant W8A8 (shared by tests)."""
    key = ("insertquant", family)
    if key not in _CACHE:
        model = copy.deepcopy(_model(family))
        _CACHE[key] = (model, vtquant.quantize_vlm_(model, _recipe(), _calib(family), quiet=True))
    return _CACHE[key]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_detection_exact_in_both_towers(family):
    """New images and prompts: the vision tower finds exactly the painted patches (+ the CLS where there
    is one), the language model the first token + exactly the image tokens that read a painted patch."""
    model, report = _insertquant(family)
    assert set(report.towers) == {"vision", "language"} and report.kept == ["projector"]
    for seed in (50, 51):
        test = _test_batch(family, seed)
        _logits(model, test)
        assert model.vtquant.towers["vision"].sink_positions() == test["vision_expected"]
        assert model.vtquant.towers["language"].sink_positions() == test["expected"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_image_token_sinks_counted(family):
    """The report counts the language model's calibration sinks on image tokens (those that read a
    painted patch) and on text tokens (the first token of each prompt), and the vision tower's prefix
    (CLS) and patch sinks."""
    calib = _calib(family)
    n_rows = sum(len(b["expected"]) for b in calib)
    n_image_sinks = sum(len(row) - 1 for b in calib for row in b["expected"])
    n_painted = sum(len(row) for b in calib for row in b["vision_expected"])
    prefix = n_rows if family == "llava" else 0
    sequences = sum(len(b["vision_expected"]) for b in calib)  # Qwen2-VL packs a batch's images into one
    _model_q, report = _insertquant(family)
    lang = report.sinks["language"]
    assert lang["image_tokens"] == n_image_sinks > 0 and lang["text_tokens"] == n_rows == lang["first_token"]
    assert lang["image_tokens_total"] == n_rows * IMAGE_TOKENS[family]
    assert report.sinks["vision"] == {"prefix": prefix, "patches": n_painted - prefix, "sequences": sequences}
    assert "image_tokens" in report.summary() and report.to_dict()["sinks"] == report.sinks


@pytest.mark.parametrize("family", list(FAMILIES))
def test_clamp_and_insert_quant_off_matches_fp(family):
    """insertquant with weights and activations in full precision (clamp sink rows, insert templates,
    restore the residual) in both towers: the VLM's logits stay within 3 % of FP on new inputs."""
    fp = _model(family)
    model = copy.deepcopy(fp)
    report = vtquant.quantize_vlm_(model, _recipe(weights=None, activations=None), _calib(family), quiet=True)
    for name in ("vision", "language"):
        assert report.towers[name].equivalence["sinks"]["ok"] is not None  # the pipeline's own check ran
        assert "template" in report.towers[name].layer_modes.values()  # templates inserted somewhere
    test = _test_batch(family, 60)
    assert _rel(_logits(fp, test), _logits(model, test)) < 3e-2


@pytest.mark.parametrize("family", list(FAMILIES))
def test_w8a8_insertquant_beats_naive_static(family):
    """W8A8 per-tensor static: insertquant's relative logit error is several times below naive-static's."""
    fp = _model(family)
    test = _test_batch(family, 61)
    ref = _logits(fp, test)
    model = copy.deepcopy(fp)
    vtquant.quantize_vlm_(model, method_recipe("naive-static", _recipe()), _calib(family), quiet=True)
    errors = {"naive-static": _rel(ref, _logits(model, test)),
              "insertquant": _rel(ref, _logits(_insertquant(family)[0], test))}
    assert errors["insertquant"] < errors["naive-static"] / 3, errors


def test_idefics3_rotation_in_both_towers():
    """Idefics3 reads its vision tower's output (post-LayerNorm): the LayerNorm rotation of the vision tower
    and the language model's residual rotation (folded into the connector's Linear) both pass their
    equivalence checks on the VLM's logits, and W8A8 insertquant+rotate stays close to FP."""
    fp = _model("idefics3")
    model = copy.deepcopy(fp)
    rec = method_recipe("insertquant+rotate", _recipe())
    rec.towers = {"projector": method_recipe("dynamic-token", _recipe())}
    report = vtquant.quantize_vlm_(model, rec, _calib("idefics3"), quiet=True)
    for name in ("vision", "language"):
        eq = report.towers[name].equivalence["rotation"]
        assert eq["ok"] and eq["residual_folded"], (name, eq)
    assert report.methods == {"vision": "insertquant+rotate", "language": "insertquant+rotate",
                              "projector": "dynamic-token"} and not report.kept
    assert type(model.model.connector.modality_projection.proj).__name__ == "QuantLinear"
    test = _test_batch("idefics3", 63)
    assert _rel(_logits(fp, test), _logits(model, test)) < 0.05


def test_llava_language_rotation_folds_into_projector_and_rollback():
    """The language model's residual rotation folds into the decoder, lm_head and the projector's output
    Linear (checked for equivalence on the VLM's logits); the vision tower's LayerNorm rotation, whose layer -2
    hidden states stay rotated, folds into the projector's first Linear (exact: equivalence on the logits);
    a projector that cannot take it (features of two layers side by side, a Linear one layer wide) is refused
    with a clear error and leaves the whole model as it was."""
    fp = _llava()
    model = copy.deepcopy(fp)
    rec = _recipe()
    rec.towers = {"language": method_recipe("insertquant+rotate", rec),
                  "vision": method_recipe("insertquant+rotate", rec)}
    report = vtquant.quantize_vlm_(model, rec, _calib(), quiet=True)
    for name in ("language", "vision"):
        eq = report.towers[name].equivalence["rotation"]
        assert eq["ok"] and eq["residual_folded"], name
    assert report.towers["vision"].equivalence["rotation"]["output_error"] < 1e-4
    test = _test_batch("llava", 62)
    assert _rel(_logits(fp, test), _logits(model, test)) < 0.05

    model = copy.deepcopy(fp)  # smoothing leaves the residual stream alone: allowed in both towers, checked
    report = vtquant.quantize_vlm_(model, method_recipe("smoothquant", _recipe()), _calib(), quiet=True)
    assert all(report.towers[t].equivalence["smoothquant"]["ok"] for t in ("vision", "language"))

    model = copy.deepcopy(fp)
    model.config.vision_feature_layer = [-2, -3]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = _recipe()
    bad.towers = {"vision": method_recipe("insertquant+rotate", bad)}
    with pytest.raises(ConfigError, match="hidden states of layer \\[-2, -3\\]"):
        vtquant.quantize_vlm_(model, bad, _calib(), quiet=True)
    assert getattr(model, "vtquant", None) is None and model.config.vision_feature_layer == [-2, -3]
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    model.config.vision_feature_layer = -2
    assert _rel(_logits(fp, test), _logits(model, test)) == 0.0


def test_failure_in_a_later_part_gives_every_part_back():
    """The vision tower quantizes, then the language model's recipe is refused inside the pipeline: the
    vision tower is given back too (no QuantLinear, no hook, same weights and logits)."""
    fp = _model("qwen2-vl")
    model = copy.deepcopy(fp)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rec = _recipe()
    rec.towers = {"language": _recipe(ignore=["mlp.down_proj"])}
    with pytest.raises(ConfigError, match="mlp.down_proj"):
        vtquant.quantize_vlm_(model, rec, _calib("qwen2-vl"), quiet=True)
    assert getattr(model, "vtquant", None) is None
    assert not any(type(m).__name__ == "QuantLinear" for m in model.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    test = _test_batch("qwen2-vl", 65)
    assert _rel(_logits(fp, test), _logits(model, test)) == 0.0


def test_saving_a_quantized_vlm_is_refused(tmp_path):
    model, _ = _insertquant("llava")
    with pytest.raises(vtquant.checkpoint.CheckpointError, match="not supported yet"):
        vtquant.save(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_quantize_forwards_vlms_and_checks_batches():
    model = copy.deepcopy(_llava())
    with pytest.raises(ConfigError, match="mapping"):
        vtquant.quantize_(model, _recipe(), [torch.zeros(1, 8, dtype=torch.long)])
    with pytest.raises(ConfigError, match="pixel_values"):
        vtquant.quantize_(model, _recipe(), [{"input_ids": torch.zeros(1, 8, dtype=torch.long)}])
    from vtquant.vision import quantize_towers_

    with pytest.raises(ConfigError, match="quantize_vlm_"):
        quantize_towers_(model, _recipe(), images=[torch.zeros(1, 3, 32, 32)])
    report = vtquant.quantize_(model, _recipe(), _calib()[:1], quiet=True)
    assert isinstance(report, vtquant.vlm.VLMReport) and model.vtquant.report is report
    with pytest.raises(RuntimeError, match="already quantized"):
        vtquant.quantize_vlm_(model, _recipe(), _calib()[:1])


# ------------------------------------------------------------------------------------------
# recipes
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["hf/llava-1.5-7b.yaml", "hf/smolvlm-256m.yaml", "hf/qwen2-vl-2b.yaml"])
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


def test_qwen2vl_mrope_language_rotation_and_vision_rotation_refused():
    """Qwen2-VL's M-RoPE acts on the projections' outputs, so the language model's residual, online and
    per-head rotations stay exact (equivalence checked on the logits, patch merger's Linear folded); its
    own ViT has no rotation description, so a vision rotation is refused with a clear error and the model
    is left as it was."""
    fp = _model("qwen2-vl")
    model = copy.deepcopy(fp)
    rec = method_recipe("insertquant+rotate", _recipe())
    rec.towers = {"vision": method_recipe("insertquant", _recipe())}
    report = vtquant.quantize_vlm_(model, rec, _calib("qwen2-vl"), quiet=True)
    eq = report.towers["language"].equivalence["rotation"]
    assert eq["ok"] and eq["residual_folded"]
    test = _test_batch("qwen2-vl", 64)
    assert _rel(_logits(fp, test), _logits(model, test)) < 0.05
    model = copy.deepcopy(fp)
    with pytest.raises(ConfigError, match="towers.vision.rotation.enabled: false"):
        vtquant.quantize_vlm_(model, method_recipe("insertquant+rotate", _recipe()), _calib("qwen2-vl"), quiet=True)
    assert getattr(model, "vtquant", None) is None and _rel(_logits(fp, test), _logits(model, test)) == 0.0


def test_projector_refuses_sink_methods_and_rotation():
    model = copy.deepcopy(_llava())
    rec = _recipe()
    rec.towers = {"projector": _recipe()}
    with pytest.raises(ConfigError, match="projector has no blocks"):
        vtquant.quantize_vlm_(model, rec, _calib()[:1], quiet=True)
    rec.towers = {"projector": method_recipe("dynamic-token", _recipe(), rotate=True)}
    with pytest.raises(ConfigError, match="towers.projector.rotation.enabled: false"):
        vtquant.quantize_vlm_(model, rec, _calib()[:1], quiet=True)
    assert getattr(model, "vtquant", None) is None
