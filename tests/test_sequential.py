"""Sequential (block-by-block) calibration gives the whole-model pipeline's plan, weights and logits.

The sequential runner (``vtquant.core.sequential``) runs every calibration pass one block at a
time over all batches; nothing in the quantization may depend on that order.  So on tiny models
the two pipelines must agree exactly: the same plan, the same report, the same state dict and
bit-identical logits (everything runs on the CPU in float32 or bfloat16, deterministically).
"""
from __future__ import annotations

import copy
import dataclasses
import weakref

import pytest
import torch

import vtquant
from vtquant.config import ActArgs, ConfigError, Recipe, WeightArgs, method_recipe
from vtquant.core import gptq as gptq_mod
from vtquant.core.sequential import SequentialRunner

from sinkmodels import implanted_decoder, token_batches
import visionmodels as vm

MIXED_POSITIONS = ((0,), (0, 5), (3,), (7, 12))

pytestmark = pytest.mark.usefixtures("one_thread")


def _recipes() -> dict:
    base = Recipe()
    clip = dataclasses.replace(base, activations=ActArgs(clip_search=True))
    gptq = dataclasses.replace(base, weights=WeightArgs(bits=4, algorithm="gptq", granularity="per-group",
                                                        group_size=32, clip_search=True),
                               activations=ActArgs(clip_search=True))
    return {
        "insertquant": method_recipe("insertquant", base),
        "insertquant+rotate": method_recipe("insertquant+rotate", base),
        "prefix+clip": method_recipe("prefix", clip),
        "insertquant-gptq4+clip": method_recipe("insertquant", gptq, w_bits=4),
        "insertquant-kv8": method_recipe("insertquant", clip, kv_bits=8),
        "smoothquant": method_recipe("smoothquant", base),
    }


RECIPES = _recipes()


@pytest.fixture(scope="module")
def fp_model():
    return implanted_decoder()


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _quantize_both(model, recipe, calib, **seq_kwargs):
    whole, seq = copy.deepcopy(model), copy.deepcopy(model)
    r_whole = vtquant.quantize_(whole, recipe, calib, quiet=True)
    r_seq = vtquant.quantize_(seq, recipe, calib, quiet=True, pipeline="sequential", **seq_kwargs)
    return whole, seq, r_whole, r_seq


def _same_report(a, b) -> None:
    da, db = a.to_dict(), b.to_dict()
    da.pop("seconds"), db.pop("seconds")
    assert da == db


@pytest.mark.parametrize("name", list(RECIPES))
def test_sequential_equals_whole_model(fp_model, name):
    calib = token_batches(n=4, sink_positions=MIXED_POSITIONS)
    whole, seq, r_whole, r_seq = _quantize_both(fp_model, RECIPES[name], calib)
    assert whole.vtquant.plan.to_dict() == seq.vtquant.plan.to_dict()
    _same_report(r_whole, r_seq)
    _same_state(whole, seq)
    with torch.no_grad():
        for x in token_batches(n=2, batch=3, seed=5, sink_positions=((0,), (2, 9), ())):
            assert torch.equal(whole(input_ids=x).logits, seq(input_ids=x).logits)
            assert whole.vtquant.sink_positions() == seq.vtquant.sink_positions()


def test_sequential_bf16_and_padding_equal_whole_model():
    model = implanted_decoder(seed=3).to(torch.bfloat16)
    ids = token_batches(n=3, sink_positions=MIXED_POSITIONS)
    calib = []
    for x in ids:  # left padding moves the first-token sink: per-batch masks must travel with the batch
        mask = torch.ones_like(x)
        mask[1, :3] = 0
        calib.append({"input_ids": x, "attention_mask": mask})
    whole, seq, r_whole, r_seq = _quantize_both(model, RECIPES["insertquant+rotate"], calib)
    assert whole.vtquant.plan.to_dict() == seq.vtquant.plan.to_dict()
    _same_report(r_whole, r_seq)
    _same_state(whole, seq)


def test_sequential_vision_tower_equals_whole_model():
    model = vm.timm_vit(registers=4, sink_cls=False, sink_registers=(0, 1, 2, 3))
    calib = [vm.make_images(vm.random_painted(8, s), seed=s) for s in range(3)]
    recipe = dataclasses.replace(Recipe(), sinks=dataclasses.replace(Recipe().sinks, known_sinks=["cls", "registers"]))
    whole, seq, r_whole, r_seq = _quantize_both(model, recipe, calib)
    assert whole.vtquant.plan.to_dict() == seq.vtquant.plan.to_dict()
    _same_state(whole, seq)
    x = vm.make_images(vm.random_painted(4, 9), seed=9)
    with torch.no_grad():
        assert torch.equal(whole(x), seq(x))


def test_passes_run_block_by_block(fp_model):
    """Every batch goes through block l before any batch enters block l + 1."""
    model = copy.deepcopy(fp_model)
    adapter = vtquant.adapters.get_adapter(model)
    calls: list = []
    handles = [b.register_forward_pre_hook(lambda m, i, li=li: calls.append(li))
               for li, b in enumerate(adapter.blocks())]
    batches = token_batches(n=3)
    blocks_done: list = []
    SequentialRunner(adapter, batches, quiet=True).run("test", after_block=blocks_done.append)
    for h in handles:
        h.remove()
    n = len(adapter.blocks())
    assert calls == [li for li in range(n) for _ in batches]
    assert blocks_done == list(range(n))


def test_gptq_holds_one_blocks_hessians(fp_model, monkeypatch):
    """Sequential GPTQ: when a block's weights are quantized, only that block's Hessians exist."""
    live: "weakref.WeakSet" = weakref.WeakSet()
    original = gptq_mod.HessianAccumulator.add

    def add(self, x):
        live.add(self)
        return original(self, x)

    monkeypatch.setattr(gptq_mod.HessianAccumulator, "add", add)
    seen: list = []
    from vtquant.core import search

    original_layer = search.WeightQuantizer.quantize_layer

    def quantize_layer(self, layer, hessians):
        seen.append((layer, len(live), len(hessians or {})))
        return original_layer(self, layer, hessians)

    monkeypatch.setattr(search.WeightQuantizer, "quantize_layer", quantize_layer)
    model = copy.deepcopy(fp_model)
    vtquant.quantize_(model, RECIPES["insertquant-gptq4+clip"], token_batches(n=2), quiet=True, pipeline="sequential")
    # 4 input groups per block (q/k/v, o, gate/up, down); the block's accumulators were handed over
    assert [s[0] for s in seen] == list(range(len(model.model.layers)))
    assert all(n_live == 0 and n_h == 4 for _, n_live, n_h in seen), seen


def test_offload_device_arguments(fp_model):
    with pytest.raises(ConfigError, match="sequential"):
        vtquant.quantize_(copy.deepcopy(fp_model), RECIPES["insertquant"], token_batches(n=1), quiet=True,
                          device="cpu")
    with pytest.raises(ConfigError, match="pipeline"):
        vtquant.quantize_(copy.deepcopy(fp_model), RECIPES["insertquant"], token_batches(n=1), quiet=True,
                          pipeline="layerwise")
    model = copy.deepcopy(fp_model)  # explicit devices (the CPU here) take the offload code path
    vtquant.quantize_(model, RECIPES["insertquant"], token_batches(n=2), quiet=True, pipeline="sequential",
                      device="cpu", cache_device="cpu")
    assert model.vtquant.plan.sinks is not None


def _hessians_by_layer(monkeypatch) -> dict:
    from vtquant.core import search

    seen: dict = {}
    original_layer = search.WeightQuantizer.quantize_layer

    def quantize_layer(self, layer, hessians):
        seen[layer] = {k: h.clone() for k, h in (hessians or {}).items()}
        return original_layer(self, layer, hessians)

    monkeypatch.setattr(search.WeightQuantizer, "quantize_layer", quantize_layer)
    return seen


def test_gptq_sequential_hessians_see_the_quantized_blocks(fp_model, monkeypatch):
    """``weights.gptq_sequential``: block 0's Hessians are those of the one-pass GPTQ (same inputs), every later
    block's differ (its inputs went through quantized blocks); the basic pipeline (which borrows the block runner
    for that pass) and the sequential pipeline give the same model."""
    parallel = RECIPES["insertquant-gptq4+clip"]
    sequential = dataclasses.replace(parallel, weights=dataclasses.replace(parallel.weights, gptq_sequential=True))
    calib = token_batches(n=2)
    runs = {}
    for name, recipe, pipeline in (("parallel", parallel, "basic"), ("seq-basic", sequential, "basic"),
                                   ("seq-seq", sequential, "sequential")):
        seen = _hessians_by_layer(monkeypatch)
        model = copy.deepcopy(fp_model)
        report = vtquant.quantize_(model, recipe, calib, quiet=True, pipeline=pipeline)
        runs[name] = (model, dict(seen), report)
    hp, hs = runs["parallel"][1], runs["seq-basic"][1]
    assert sorted(hp) == sorted(hs) == list(range(len(fp_model.model.layers)))
    for key in hp[0]:
        assert torch.allclose(hp[0][key], hs[0][key], rtol=1e-5, atol=1e-6), key
    for layer in range(1, len(hp)):
        diffs = [float((hp[layer][k] - hs[layer][k]).norm() / hp[layer][k].norm()) for k in hp[layer]]
        assert max(diffs) > 1e-4, (layer, diffs)  # W4 weights upstream change these inputs
    _same_state(runs["seq-basic"][0], runs["seq-seq"][0])
    assert any("already-quantized blocks" in n for n in runs["seq-basic"][2].notes)
    ids = token_batches(n=1, seed=7)[0]
    with torch.no_grad():
        assert torch.equal(runs["seq-basic"][0](ids).logits, runs["seq-seq"][0](ids).logits)


def test_gptq_sequential_needs_calibrated_weights():
    with pytest.raises(ConfigError, match="gptq_sequential"):
        WeightArgs(bits=8, algorithm="rtn", gptq_sequential=True)


def test_gptq_sequential_written_only_when_set():
    """A field added later stays out of saved plans / recipes at its default (older vtquant still reads them)."""
    from vtquant.core.plan import QuantPlan  # noqa: F401  (the plan writer uses the same rule)
    from vtquant.recipe import recipe_to_yaml

    plain = method_recipe("insertquant", Recipe(weights=WeightArgs(bits=4, algorithm="gptq")), w_bits=4)
    assert "gptq_sequential" not in recipe_to_yaml(plain)
    seq = dataclasses.replace(plain, weights=dataclasses.replace(plain.weights, gptq_sequential=True))
    assert "gptq_sequential: true" in recipe_to_yaml(seq)


def test_gptq_sequential_with_auto_weights():
    assert WeightArgs(bits=4, algorithm="auto", gptq_sequential=True).resolved().gptq_sequential
    assert not WeightArgs(bits=8, algorithm="auto", gptq_sequential=True).resolved().gptq_sequential  # RTN at 8 bits
