"""YAML recipes <-> Recipe: shipped recipes load, errors name the bad key, round trips are lossless."""
from __future__ import annotations

import pytest
import yaml

import vtquant
from vtquant.config import METHODS, ConfigError, Recipe, RotationConfig, SinkConfig, WeightArgs, method_recipe
from vtquant.recipe import load_recipe, recipe_from_dict, recipe_to_yaml, recipes_dir, save_recipe


def test_every_shipped_recipe_loads():
    root = recipes_dir()
    assert root.is_dir(), f"no recipes/ folder at {root}"
    files = sorted(root.rglob("*.yaml")) + sorted(root.rglob("*.yml"))
    loaded = []
    for path in files:  # every file, none skipped
        recipe = load_recipe(path)
        assert isinstance(recipe, Recipe), path
        assert recipe.version == 1 and recipe.method in METHODS, path
        assert recipe.model, f"{path}: 'model' is empty"
        # by its name relative to recipes/, as the CLI and docs use it
        assert load_recipe(path.relative_to(root)) == recipe
        # and it survives a YAML round trip
        assert recipe_from_dict(yaml.safe_load(recipe_to_yaml(recipe))) == recipe
        loaded.append(path.name)
    assert len(loaded) == len(files)  # the glob ran over all of them (may be zero)
    print(f"\n[recipes] loaded {len(loaded)}: {loaded}")


def test_missing_recipe_lists_shipped_ones(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_recipe(tmp_path / "nope.yaml")
    shipped = [str(p.relative_to(recipes_dir())) for p in recipes_dir().rglob("*.yaml")]
    for name in shipped:
        assert name in str(err.value)


def _error(data) -> str:
    with pytest.raises(ConfigError) as err:
        recipe_from_dict(data)
    return str(err.value)


def test_unknown_top_level_key_suggests_close_match():
    msg = _error({"version": 1, "weigths": {"bits": 8}})
    assert "'weigths'" in msg and "did you mean 'weights'" in msg


def test_unknown_section_key_suggests_close_match():
    msg = _error({"version": 1, "sinks": {"alpah": 3}})
    assert "'alpah'" in msg and "did you mean 'alpha'" in msg and "sinks" in msg
    msg = _error({"version": 1, "calibration": {"num_sample": 3}})
    assert "did you mean 'num_samples'" in msg
    msg = _error({"version": 1, "rotation": {"zzz": 1}})
    assert "'zzz'" in msg and "valid keys" in msg and "did you mean" not in msg


@pytest.mark.parametrize("data,words", [
    ({"weights": {"bits": "8"}}, ["weights.bits", "'8'", "number"]),
    ({"weights": {"bits": 8.0}}, ["bits", "integer"]),
    ({"sinks": {"insert": "yes"}}, ["sinks.insert", "true or false"]),
    ({"sinks": {"alpha": True}}, ["sinks.alpha", "number"]),
    ({"rotation": {"seed": "0"}}, ["rotation.seed", "number"]),
    ({"weights": 8}, ["weights", "mapping", "int"]),
    ({"sinks": {"known_sinks": "first_token"}}, ["known_sinks", "list"]),
    ({"activations": {"granularity": "per-channel"}}, ["activations.granularity", "per-token"]),
    ({"activations": {"granularity": "per-token", "static": False}}, ["insertquant", "per-tensor static"]),
    ({"calibration": {"seq_len": 0}}, ["calibration.seq_len", "positive"]),
])
def test_wrong_values_are_named(data, words):
    msg = _error({"version": 1, **data})
    for word in words:
        assert word in msg, (word, msg)


def test_missing_version():
    msg = _error({"method": "fp"})
    assert "version" in msg and "version: 1" in msg


def test_version_mismatch():
    msg = _error({"version": 2})
    assert "version 2" in msg and "expects 1" in msg
    with pytest.raises(ConfigError, match="version"):
        Recipe(version=0)


def test_bad_method():
    msg = _error({"version": 1, "method": "insertqaunt"})
    assert "'insertqaunt'" in msg
    for method in METHODS:
        assert method in msg


def test_not_a_mapping(tmp_path):
    assert "mapping" in _error([1, 2])
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nweights: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(bad)


@pytest.mark.parametrize("name", ["fp", "naive-static", "dynamic-token", "insertquant", "insertquant+rotate"])
def test_method_recipe(name):
    base = Recipe(model="asset:x", weights=WeightArgs(granularity="per-group", group_size=32),
                  sinks=SinkConfig(alpha=32.0), rotation=RotationConfig(seed=7), ignore=["lm_head", "x"])
    r = method_recipe(name, base, w_bits=4, a_bits=8)
    assert r.display_method == name
    assert r.model == "asset:x" and r.ignore == ["lm_head", "x"] and r.sinks.alpha == 32.0
    assert r.calibration == base.calibration
    if name == "fp":
        assert r.weights is None and r.activations is None and not r.rotation.enabled
        return
    assert r.weights.bits == 4 and r.weights.granularity == "per-group" and r.weights.group_size == 32
    assert r.activations.bits == 8
    if name == "dynamic-token":
        assert r.activations.granularity == "per-token" and not r.activations.static
    else:
        assert r.activations.granularity == "per-tensor" and r.activations.static
    assert r.rotation.enabled == (name == "insertquant+rotate")
    assert r.rotation.seed == 7
    assert not base.rotation.enabled  # the base recipe is not modified
    assert recipe_from_dict(yaml.safe_load(recipe_to_yaml(r))) == r


def test_method_recipe_unknown():
    with pytest.raises(ConfigError) as err:
        method_recipe("gptq", Recipe())  # (smoothquant became a method with the peers)
    assert "gptq" in str(err.value) and "insertquant+rotate" in str(err.value) and "smoothquant" in str(err.value)


def test_yaml_round_trip(tmp_path):
    recipe = Recipe(name="custom", model="asset:smollm2-135m", weights=None,
                    sinks=SinkConfig(alpha=16.0, known_sinks=[], stage1="off"),
                    rotation=RotationConfig(enabled=True, seed=3, heads=False), ignore=["lm_head", "mlp.up_proj"])
    text = recipe_to_yaml(recipe)
    assert recipe_from_dict(yaml.safe_load(text)) == recipe
    path = tmp_path / "sub" / "r.yaml"
    save_recipe(recipe, path)
    assert vtquant.load_recipe(path) == recipe
    assert [p.name for p in path.parent.iterdir()] == ["r.yaml"]  # atomic write left no temp file
    # sections may be null: weights/activations mean full precision, the rest their defaults
    r = recipe_from_dict({"version": 1, "weights": None, "activations": None, "sinks": None})
    assert r.weights is None and r.activations is None and r.sinks == SinkConfig()


def test_ignore_must_be_a_list():
    msg = _error({"version": 1, "ignore": "down_proj"})
    assert "ignore" in msg


@pytest.mark.parametrize("data", [{"version": 1, "calibration": {"dataset": 5}}, {"version": True}],
                         ids=["dataset-int", "version-bool"])
def test_other_wrong_types_are_named(data):
    _error(data)
