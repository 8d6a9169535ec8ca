"""``vtquant compare --vision`` on a tiny random CLIP tower with implanted sinks (the real CLIP run is in
BENCHMARKS.md; it takes minutes per method on a CPU)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import visionmodels as vm

pytest.importorskip("transformers")


def tiny_clip_with_projection(seed: int = 0):
    """A tiny ``CLIPVisionModelWithProjection`` whose tower carries the implanted CLS / bright-patch sinks."""
    import transformers

    tower = vm.hf_clip_vision(seed=seed)
    cfg = tower.config
    cfg.projection_dim = 32
    model = transformers.CLIPVisionModelWithProjection(cfg).eval()
    model.vision_model.load_state_dict(tower.state_dict())
    return model


def embed(model, x):
    return model(pixel_values=x).image_embeds


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = tiny_clip_with_projection()
    calib = vm.make_images(vm.random_painted(8, seed=5), seed=6)
    held = vm.make_images(vm.random_painted(6, seed=7), seed=8)
    return model, calib, held


def test_rows_methods_and_sinks(setup, one_thread):
    from vtquant.config import Recipe, SinkConfig, CalibConfig
    from vtquant.eval.vision_compare import format_vision_table, run_vision_compare, target_lines

    model, calib, held = setup
    base = Recipe(sinks=SinkConfig(known_sinks=["cls"]), calibration=CalibConfig(batch_size=4), ignore=[])
    before = [p.clone() for p in model.parameters()]
    rows, reports = run_vision_compare(model, embed, calib, held, base,
                                       ["fp", "naive-static", "dynamic-token", "prefix", "insertquant"],
                                       [(8, 8), (4, 8)], model_name="tiny", log=lambda s: None)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # FP untouched
    assert [(r.method, r.w_bits, r.a_bits) for r in rows] == [
        ("fp", None, None)] + [(m, w, 8) for w in (8, 4) for m in ("naive-static", "dynamic-token", "prefix",
                                                                       "insertquant")]
    by = {(r.method, r.w_bits): r for r in rows}
    assert by[("fp", None)].value == 1.0
    # the implanted sinks wreck per-tensor static scales; sink handling restores them
    assert by[("naive-static", 8)].value < 0.99 < by[("insertquant", 8)].value
    assert by[("prefix", 8)].value > 0.99
    assert by[("insertquant", 8)].extra["content_sinks_max"] >= 1  # bright patches found at run time
    assert "content_sinks_mean" not in by[("naive-static", 8)].extra
    assert by[("insertquant", 4)].extra["w_algorithm"] == "rtn"  # the base recipe's algorithm
    for r in rows[1:]:
        assert -1.0 <= r.extra["emb_cos_min"] <= r.value <= 1.0 and 0.0 <= r.extra["nn_agree"] <= 1.0
        assert r.extra["calib_seconds"] > 0
    table = format_vision_table(rows)
    assert table.count("\n") == len(rows) + 1 and "| insertquant | 4 | 8 | rtn |" in table
    assert any("W8A8: best insertquant variant insertquant" in line for line in target_lines(rows))
    assert len(reports) == len(rows) - 1


def test_gptq_and_clip_search_on_a_vision_tower(setup, one_thread):
    from vtquant.config import ActArgs, CalibConfig, Recipe, SinkConfig, WeightArgs
    from vtquant.eval.vision_compare import run_vision_compare

    model, calib, held = setup
    base = Recipe(sinks=SinkConfig(known_sinks=["cls"]), calibration=CalibConfig(batch_size=8), ignore=[],
                  weights=WeightArgs(algorithm="auto", clip_search=True), activations=ActArgs(clip_search=True))
    rows, reports = run_vision_compare(model, embed, calib, held, base, ["insertquant"], [(4, 8), (8, 8)],
                                       model_name="tiny", log=lambda s: None)
    w4, w8 = rows
    assert w4.extra["w_algorithm"] == "gptq+clip" and w8.extra["w_algorithm"] == "rtn"
    rep = reports["insertquant-w4a8"]
    assert rep["notes"] and any("GPTQ W4" in n for n in rep["notes"])
    assert any("activation clip search" in n and "structure R" in n for n in rep["notes"])
    assert w4.value > 0.99 and w8.value > 0.999


def test_smoothquant_and_rotation_run_on_a_layernorm_tower(setup, one_thread):
    from vtquant.config import CalibConfig, Recipe, SinkConfig
    from vtquant.eval.vision_compare import run_vision_compare

    model, calib, held = setup
    base = Recipe(sinks=SinkConfig(known_sinks=["cls"]), calibration=CalibConfig(batch_size=8), ignore=[])
    rows, reports = run_vision_compare(model, embed, calib, held, base, ["smoothquant", "rotate"], [(8, 8)],
                                       model_name="tiny", log=lambda s: None)
    assert [r.method for r in rows] == ["smoothquant", "rotate"]
    assert any("smoothquant: alpha=0.5" in n for n in reports["smoothquant-w8a8"]["notes"])


def test_breakdown_parts(setup, one_thread):
    from vtquant.config import CalibConfig, Recipe, SinkConfig, method_recipe
    from vtquant.eval.vision_compare import format_vision_breakdown, vision_breakdown

    model, calib, held = setup
    base = Recipe(sinks=SinkConfig(known_sinks=["cls"]), calibration=CalibConfig(batch_size=8), ignore=[])
    recipe = method_recipe("naive-static", base, w_bits=4, a_bits=8)
    result = vision_breakdown(model, embed, recipe, calib, held, log=lambda s: None)
    assert list(result["parts"]) == ["weights only", "activations only", "all"]
    layers = result["layers"]
    assert layers == 6 and all(len(p["cls"]) == layers == len(p["patches"]) for p in result["parts"].values())
    # the implanted sinks make per-tensor activations the dominant error here
    assert result["parts"]["activations only"]["patches"][-1] > result["parts"]["weights only"]["patches"][-1]
    assert format_vision_breakdown(result).count("\n") == 4


def test_cli_compare_vision(setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread) -> None:
    """The CLI path with the asset loader and the photos replaced by the tiny tower and random images."""
    from vtquant.cli import main
    from vtquant.eval import vision_compare as vc

    model, calib, held = setup

    def fake_setup(library, num_images=None, quiet=True):
        assert library == "hf"
        return {"model": model, "embed": embed, "calib_pixels": calib, "eval_pixels": held[:num_images],
                "calib_names": [f"c{i}" for i in range(len(calib))],
                "eval_names": [f"e{i}" for i in range(len(held[:num_images]))], "name": "tiny"}

    monkeypatch.setattr(vc, "clip_photo_setup", fake_setup)
    out, png = tmp_path / "rows.json", tmp_path / "chart.png"
    rc = main(["compare", "--vision", "--methods", "fp,naive-static,insertquant", "--settings", "W8A8,W4A8",
               "--num-images", "4", "--threads", "1", "--quiet", "--results-file", str(out), "--plot", str(png)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert [(r["method"], r["w_bits"]) for r in data["rows"]] == [("fp", None), ("naive-static", 8),
                                                                   ("insertquant", 8), ("naive-static", 4),
                                                                   ("insertquant", 4)]
    assert data["rows"][-1]["w_algorithm"] == "gptq+clip"  # the vision default: GPTQ below 8 bits
    assert data["rows"][1]["eval_images"] == 4 and data["base_recipe"]["name"].startswith("clip-vit-b16")
    assert data["partial"] is False and len(data["reports"]) == 4
    assert png.read_bytes()[:4] == b"\x89PNG"
    bd = tmp_path / "bd.json"
    assert main(["compare", "--model", "asset:clip-vit-b16-openai", "--breakdown", "insertquant@W8A6",
                 "--threads", "1", "--quiet", "--results-file", str(bd)]) == 0
    assert list(json.loads(bd.read_text())["parts"]) == ["weights only", "activations only", "all"]


def test_cli_compare_vision_bad_settings(capsys) -> None:
    from vtquant.cli import main

    assert main(["compare", "--vision", "--settings", "W4A8KV8", "--quiet"]) == 2
    assert "key / value cache" in capsys.readouterr().err
    assert main(["compare", "--vision", "--methods", "gptq", "--quiet"]) == 2
    assert "unknown ['gptq']" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.network
def test_real_clip_w8a8_targets() -> None:
    """The issue's W8A8 target on the real CLIP ViT-B/16 (asset), 4 held-out photos: the shipped recipe's
    insertquant+rotate >= 0.995 mean embedding cosine and >= per-token dynamic (minutes on a CPU)."""
    pytest.importorskip("onnx")
    pytest.importorskip("skimage")
    from vtquant.eval.vision_compare import clip_photo_setup, clip_recipe, run_vision_compare

    torch.set_num_threads(2)
    s = clip_photo_setup("hf", num_images=4)
    rows, _ = run_vision_compare(s["model"], s["embed"], s["calib_pixels"], s["eval_pixels"], clip_recipe("hf"),
                                 ["dynamic-token", "insertquant+rotate"], [(8, 8)], model_name="clip",
                                 log=lambda m: None)
    dyn, iq = rows
    assert iq.value >= 0.995 and iq.value >= dyn.value, (iq.value, dyn.value)
    assert iq.extra["content_sinks_min"] >= 1  # the artifact patches are found per image
