"""Model-relative sink detection (``sinks.detect: auto``): probes at every probe-Linear input and block output.

New implanted mechanisms on a tiny timm ViT (``tests/visionmodels.py``):

* *residual-only*: the emergence neuron fires weakly (its MLP second-Linear input stays below
  ``alpha = 64`` x the median token peak) but writes a large spike into the residual stream, as
  the real CLIP ViT-B/16 does (25-126x in the stream, 8-22x at fc2's input);
* *always-on channel*: on top, one residual channel carries a large constant on every token, so
  every token's norm and peak are lifted (a sink's plain norm ratio drops to ~4); the
  per-channel baseline removes it.

The sink set of every image is known from how it was built (the painted patches and the CLS).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import vtquant
from vtquant.config import ConfigError, Recipe, SinkConfig, method_recipe
from vtquant.core.sinks import ResidualDetector, robust_fence

import visionmodels as vm

pytestmark = pytest.mark.usefixtures("one_thread")

ALWAYS_ON = 11      # residual channel carrying a constant on every token
ALWAYS_ON_VALUE = 100.0
WEAK_ACT = 1.0      # the emergence neuron's activation scale (vm.EMERGE_ACT is 1000)


def residual_only_vit(always_on: bool = False, seed: int = 0) -> nn.Module:
    """A tiny timm ViT whose implanted spike is visible in the residual stream, hardly at fc2's input."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(img_size=vm.IMG, patch_size=vm.PATCH, embed_dim=64, depth=6, num_heads=4,
                              mlp_ratio=4.0, num_classes=10, global_pool="token").eval()
    with torch.no_grad():
        nn.init.normal_(model.patch_embed.proj.weight, std=0.05)
        vm._trigger_patch_conv(model.patch_embed.proj)
        model.pos_embed[..., vm.TRIGGER] = 0.0
        model.pos_embed[..., vm.SPIKE] = 0.0
        vm._set_token(model.cls_token[0, 0], True)
        if always_on:
            model.pos_embed[..., ALWAYS_ON] = ALWAYS_ON_VALUE
    probe = vm.make_images([[1, 6], [], [15]], seed=99)
    saved = vm.EMERGE_ACT
    vm.EMERGE_ACT = WEAK_ACT
    try:
        vm.implant(lambda: model(probe), list(model.blocks), lambda b: (b.mlp.fc1, b.mlp.fc2, [b.attn.proj, b.mlp.fc2]))
    finally:
        vm.EMERGE_ACT = saved
    if always_on:  # the channel stays on: no block writes it
        with torch.no_grad():
            for b in model.blocks:
                for w in (b.attn.proj, b.mlp.fc2):
                    w.weight[ALWAYS_ON] = 0.0
                    w.bias[ALWAYS_ON] = 0.0
    return model


def _calib():
    return [vm.make_images(vm.random_painted(8, s), seed=s) for s in range(4)]


def _no_quant(**sinks) -> Recipe:
    return Recipe(weights=None, activations=None, sinks=SinkConfig(known_sinks=["cls"], **sinks), ignore=[])


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def test_robust_fence():
    torch.manual_seed(0)
    bulk = torch.exp(0.1 * torch.randn(5000))  # log ratios ~ N(0, 0.1)
    tau, med, sigma = robust_fence(bulk, k=8.0, floor=1.5)
    assert abs(med) < 0.01 and abs(sigma - 0.1) < 0.01
    assert abs(tau - float(torch.exp(torch.tensor(8 * sigma + med)))) < 1e-6
    assert robust_fence(bulk, k=8.0, floor=4.0)[0] == 4.0  # the floor
    assert robust_fence(torch.ones(100), k=8.0, floor=1.1)[2] == 0.05  # a flat bulk: sigma floor


@pytest.mark.parametrize("always_on", [False, True])
def test_residual_only_spike_is_found_by_the_relative_rule(always_on):
    fp = residual_only_vit(always_on=always_on)
    q = copy.deepcopy(fp)
    report = vtquant.quantize_(q, _no_quant(), _calib(), quiet=True)
    assert max(report.probe_max_ratio) < 64  # the fixed rule sees nothing at the probe Linears
    assert report.detection_rule == "relative"
    plan = q.vtquant.plan.sinks
    assert plan.rule == "relative" and plan.site("stage2") == "residual"
    assert plan.stages["stage2"] == vm.EMERGENCE
    assert isinstance(q.blocks[vm.EMERGENCE].vtquant_detect, ResidualDetector)
    # every probe is reported, with its fence and what was decided
    assert len(report.probes) == 6 + 5 and {p["site"] for p in report.probes} == {"probe", "residual"}
    main = next(p for p in report.probes if p["decision"].startswith("stage2"))
    assert main["site"] == "residual" and main["layer"] == vm.EMERGENCE and main["max_ratio"] > 10 * main["fence"]

    painted = vm.random_painted(8, seed=123)
    x = vm.make_images(painted, seed=123)
    with torch.no_grad():
        y = q(x)
        ref = fp(x)
    found = [row.nonzero().flatten().tolist() for row in q.vtquant.state.found_by["stage2"]]
    assert found == vm.expected_positions(painted, [0], 1)
    assert _rel(y, ref) < 0.01

    if always_on:  # without the channel baseline the sink's residual norm is only ~4x the median
        outs = []
        h = fp.blocks[vm.EMERGENCE].register_forward_hook(lambda m, a, o: outs.append(o.detach()))
        with torch.no_grad():
            fp(x)
        h.remove()
        norms = outs[0].norm(dim=-1)
        assert float(norms.max() / norms.median()) < 6


def test_fixed_rule_alone_misses_the_residual_only_spike():
    q = copy.deepcopy(residual_only_vit())
    report = vtquant.quantize_(q, _no_quant(detect="alpha"), _calib(), quiet=True)
    assert q.vtquant.plan.sinks is None and report.emergence_layer is None
    assert "no massive activations" in report.notes[0]


def test_relative_rule_w8a8_beats_naive():
    fp = residual_only_vit()
    x = vm.make_images(vm.random_painted(8, seed=5), seed=5)
    with torch.no_grad():
        ref = fp(x)
    errs = {}
    for method in ("naive-static", "insertquant"):
        q = copy.deepcopy(fp)
        vtquant.quantize_(q, method_recipe(method, Recipe(sinks=SinkConfig(known_sinks=["cls"]), ignore=[])),
                          _calib(), quiet=True)
        with torch.no_grad():
            errs[method] = _rel(q(x), ref)
    assert errs["insertquant"] < 0.05 and errs["naive-static"] > 3 * errs["insertquant"]


def test_implanted_massive_spike_keeps_the_fixed_rule():
    """Where a token exceeds alpha at a probe Linear (SmolLM2, the implanted towers) nothing changes."""
    q = copy.deepcopy(vm.timm_vit())
    report = vtquant.quantize_(q, _no_quant(), _calib(), quiet=True)
    assert report.detection_rule == "alpha" and q.vtquant.plan.sinks.sites == {}
    # every probe is still reported with why its tokens were or were not called sinks
    main = [p for p in report.probes if p["decision"].startswith("stage2")]
    assert len(main) == 1 and main[0]["site"] == "probe" and main[0]["layer"] == report.emergence_layer
    assert main[0]["above_alpha"] == main[0]["sinks"] > 0 and "above 64" in main[0]["why"]
    assert all(p["why"] for p in report.probes) and {"probe", "residual"} <= {p["site"] for p in report.probes}


def test_detection_settings_are_validated():
    with pytest.raises(ConfigError, match="detect"):
        SinkConfig(detect="sometimes")
    with pytest.raises(ConfigError, match="fence_k"):
        SinkConfig(fence_k=0)


def test_a_fading_spike_has_no_cancellation_layer():
    """CLIP ViT-B/16's artifact patches keep their spike to the last layer (61 -> 56): nothing to restore."""
    from vtquant.core.sinks import find_cancellation_layer

    clip_like = torch.tensor([3.9, 4.2, 3.7, 3.7, 4.6, 8.1, 18.9, 56.5, 57.7, 60.8, 60.6, 55.6])
    assert find_cancellation_layer(clip_like, 7) is None
    assert find_cancellation_layer(torch.tensor([1.0, 400.0, 400.0, 30.0, 30.0]), 1) == 3
