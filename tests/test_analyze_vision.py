"""`vtquant analyze` on vision towers: the implanted sinks of ``tests/visionmodels.py`` are found where built.

The tiny random ViTs carry a trigger on the CLS token, chosen registers and the patches painted
bright; block ``EMERGENCE`` writes exactly ``SPIKE_VALUE`` into channel ``SPIKE`` of every sink and
block ``CANCELLATION`` removes it.  So the emergence / cancellation layers, the sink tokens (as CLS /
reg-i / (row, col)), the channel and the value are known by construction.
"""
from __future__ import annotations

import json

import pytest
import torch

from vtquant.analyze import analyze_model, patch_coordinates, vision_layout
from vtquant.adapters import get_adapter
from vtquant.report import summary_text, write_report
from vtquant.vision import default_vision_recipe

import visionmodels as vm

PAINTED = [[1, 6], [], [15], [0, 5, 10]]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread, immune to contention


def _labels(painted, prefix):
    return [prefix + [f"({p // vm.GRID},{p % vm.GRID})" for p in patches] for patches in painted]


def _check_spikes(f, prefix_labels):
    assert f["emergence_layer"] == vm.EMERGENCE and f["cancellation_layer"] == vm.CANCELLATION
    assert f["spikes"]["sink_tokens"] == _labels(PAINTED, prefix_labels)
    for layer in range(vm.EMERGENCE, vm.CANCELLATION):  # the implanted write, untouched until cancellation
        rows = [r for r in f["sinks"] if r["layer"] == layer]
        assert len(rows) == sum(len(p) + len(prefix_labels) for p in PAINTED)
        for r in rows:
            assert r["channel"] == vm.SPIKE and r["value"] == pytest.approx(vm.SPIKE_VALUE, rel=1e-3)
        top = f["spikes"]["layers"][layer]["top"][0]
        assert top["channel"] == vm.SPIKE and top["value"] == pytest.approx(vm.SPIKE_VALUE, rel=1e-3)
    assert all(r["value"] < vm.SPIKE_VALUE / 4 for r in f["sinks"] if r["layer"] >= vm.CANCELLATION)


@pytest.mark.parametrize("make,prefix", [
    (lambda: vm.timm_vit(registers=2, sink_registers=(1,)), ["CLS", "reg-1"]),
    (lambda: vm.open_clip_tiny(batch_first=False).visual, ["CLS"]),  # sequence-first layout
    (lambda: vm.hf_dinov2(registers=1, sink_registers=(0,)), ["CLS", "reg-0"]),
])
def test_implanted_sinks_found_with_patch_coordinates(make, prefix):
    m = make()
    f = analyze_model(m, vm.make_images(PAINTED, seed=1), restoration=False)
    _check_spikes(f, prefix)
    assert f["spikes"]["type_names"][-1] == "patches" and f["spikes"]["type_names"][0] == "CLS"
    # constant vectors per sink type: CLS / register / content patches are each one vector across images
    row = f["constant_vectors"]["attention_input"][vm.EMERGENCE + 1]
    names = f["spikes"]["type_names"]
    for label in prefix + ["patches"]:
        t = row["types"][names.index(label)]
        assert t is not None and t["pairwise_cosine"] > 0.99
    assert row["semantic_pairwise_cosine"] < 0.9
    assert "rotary" in f["rope_skipped"] and not f.get("rope")
    assert f["geometry"]["shape"]["heads"] == 4


def test_patch_coordinates_map_row_major():
    m = vm.timm_vit(registers=2)
    v = vision_layout(get_adapter(m), 2 + 1 + 16, (vm.IMG, vm.IMG))
    assert v["num_prefix"] == 3 and v["grid"] == [4, 4]
    assert v["labels"][:4] == ["CLS", "reg-0", "reg-1", "(0,0)"] and v["labels"][3 + 6] == "(1,2)"
    assert patch_coordinates(1, v) is None and patch_coordinates(3 + 15, v) == (3, 3)
    w = vision_layout(get_adapter(vm.timm_vit()), 1 + 8, (16, 32))  # non-square: 2 rows x 4 columns
    assert w["grid"] == [2, 4] and w["labels"][1 + 5] == "(1,1)"


def test_report_renders_for_a_vision_model(tmp_path):
    m = vm.timm_vit()
    calib = [vm.make_images(vm.random_painted(8, seed=3), seed=2)]
    f = analyze_model(m, vm.make_images(PAINTED, seed=1), recipe=default_vision_recipe(), calib_batches=calib)
    v = list(f["restoration"]["variants"].values())
    ins, clamp = max(v[0]["hidden_error_semantic"]), max(v[1]["hidden_error_semantic"])
    assert ins < clamp
    tt = f["restoration"]["template_transfer"]["layers"][vm.EMERGENCE + 1]["types"]
    assert tt[0]["eval_cosine_to_calib_template"] > 0.99  # CLS template transfers across image sets
    out = write_report(f, tmp_path / "rep")
    for key in ("spikes", "spike_heatmap", "patch_maps", "constant_vectors", "geometry", "restoration_error",
                "template_transfer"):
        assert out["plots"][key].exists(), key
    data = json.loads(out["json"].read_text())
    assert data["vision"]["grid"] == [4, 4] and data["vision"]["sink_patches"][0] == [[0, 1], [1, 2]]
    html = out["html"].read_text()
    assert html.count("data:image/png;base64,") == len(out["plots"]) and "RoPE" in html and "Skipped" in html
    assert "(0,1)" in summary_text(f)


def test_no_sinks_vision_reported_honestly(tmp_path):
    m = vm.timm_vit(sink_cls=False)
    f = analyze_model(m, vm.make_images([[], [], []], seed=1), recipe=default_vision_recipe(),
                      calib_batches=[vm.make_images([[], []], seed=2)])
    assert f["emergence_layer"] is None and f["sinks"] == [] and "geometry" not in f
    assert "restoration" in f and "template_transfer" not in f["restoration"]
    write_report(f, tmp_path)
    text = (tmp_path / "summary.txt").read_text()
    assert "no massive activations" in text and "emergence layer None" in text
    assert "No massive activations" in (tmp_path / "report.html").read_text()


def test_cli_analyze_vision_arguments():
    from vtquant.analyze import is_vision_spec
    from vtquant.cli import build_parser

    args = build_parser().parse_args(["analyze", "--model", "control", "--images", "d", "--num-images", "3"])
    assert args.images == "d" and args.num_images == 3 and args.calib_images == 8
    assert is_vision_spec("control") and is_vision_spec("timm:vit_small_patch14_dinov2")
    assert not is_vision_spec("asset:smollm2-135m")


def test_detection_section_finds_the_painted_patches_per_image(tmp_path):
    """analyze_vision's 'detected sinks': the quantizer's rule, calibrated on other images, marks per analysed
    image exactly the painted patches, in the implanted channel, and draws them."""
    from vtquant.analyze import analyze_vision

    m = vm.timm_vit(sink_cls=False)
    painted = [[0, 5], [], [9, 10, 15]]
    calib_painted = vm.random_painted(8, seed=11)
    x = vm.make_images(painted, seed=1)
    xc = vm.make_images(calib_painted, seed=2)
    photos = [(f"a{i}", x[i]) for i in range(3)] + [(f"c{i}", xc[i]) for i in range(8)]
    f = analyze_vision(m, lambda t: t, "tiny", photos, num_images=3, calib_images=8, restoration=False,
                       out=str(tmp_path))
    det = f["detection"]
    assert [im["count"] for im in det["images"]] == [2, 0, 3]
    assert [im["patches"] for im in det["images"]] == [[list(divmod(p, vm.GRID)) for p in ps] for ps in painted]
    assert det["channel_counts"] == {vm.SPIKE: 5} and det["calibration_images"] == [f"c{i}" for i in range(8)]
    assert det["_maps"].shape == (3, vm.GRID, vm.GRID)
    # the detection quantity is largest on the painted patches
    assert int(det["_maps"][2].flatten().argmax()) in painted[2]
    assert (tmp_path / "detected_sinks.png").exists()
    summary = (tmp_path / "summary.txt").read_text()
    assert "a2: 3 sinks at (2,1) (2,2) (3,3); channel(s) [7]" in summary
    html = (tmp_path / "report.html").read_text()
    assert "Sinks found by the quantizer" in html and "(2,1) (2,2) (3,3)" in html
    assert json.loads((tmp_path / "figures.json").read_text())["detection"]["images"][0]["positions"] == [1, 6]


def test_clip_asset_is_a_vision_spec():
    from vtquant.analyze import is_vision_spec

    assert is_vision_spec("asset:clip-vit-b16-openai")


def test_bf16_vision_model_analyzed_where_it_sits():
    """``vtquant analyze --dtype bfloat16`` on a vision model: the tower in bf16 (pixels follow its dtype) shows
    the same implanted sinks as in float32."""
    m = vm.timm_vit(registers=2, sink_registers=(1,)).to(torch.bfloat16)
    f = analyze_model(m, vm.make_images(PAINTED, seed=1))
    assert f["emergence_layer"] == vm.EMERGENCE and f["cancellation_layer"] == vm.CANCELLATION
    assert f["spikes"]["sink_tokens"] == _labels(PAINTED, ["CLS", "reg-1"])
