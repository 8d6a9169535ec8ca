"""Adapters: every supported HF decoder is fully quantized with its sink found; others are refused clearly."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import transformers

import vtquant
from vtquant.adapters import UnsupportedModelError, get_adapter, supported_architectures
from vtquant.config import Recipe, method_recipe
from vtquant.core.quant import QuantLinear

from sinkmodels import SINK_ID, implanted_decoder, token_batches, rel_logit_error

ARCHS = ["LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM", "GemmaForCausalLM"]
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread, immune to contention




def test_supported_architectures():
    assert set(ARCHS) <= set(supported_architectures())


@pytest.mark.parametrize("arch", ARCHS)
def test_insertquant_w8a8_on_each_architecture(arch):
    model = implanted_decoder(arch)
    calib = token_batches(sink_positions=((0,), (0, 5)))
    q = copy.deepcopy(model)
    report = vtquant.quantize_(q, method_recipe("insertquant", Recipe()), calib, quiet=True)

    # detection found the implanted sink, from data
    assert (report.emergence_layer, report.cancellation_layer) == (2, 4)
    ids = token_batches(n=1, batch=3, seed=8, sink_positions=((0,), (0, 11), (0, 4, 20)))[0]
    with torch.no_grad():
        q(input_ids=ids)
    assert q.vtquant.sink_positions() == [(row == SINK_ID).nonzero().flatten().tolist() for row in ids]

    # every projection of every layer is quantized (weights int8, static activation scale set)
    for li, block in enumerate(q.model.layers):
        for name in PROJECTIONS:
            mod = block.get_submodule(name)
            assert isinstance(mod, QuantLinear), f"layer {li} {name} left as {type(mod).__name__}"
            assert mod.weight is None and mod.qweight.dtype == torch.int8 and mod.w_bits == 8
            assert mod.act is not None and mod.act.mode == "quant" and torch.isfinite(mod.act.scale)
    # nothing else silently left float, except the head (ignored by default)
    float_linears = [n for n, m in q.named_modules() if isinstance(m, nn.Linear)]
    assert float_linears == ["lm_head"]
    assert len(q.vtquant.plan.targets) == 7 * len(q.model.layers)

    # and quantization helps where it should: insertquant beats naive per-tensor static
    naive = copy.deepcopy(model)
    vtquant.quantize_(naive, method_recipe("naive-static", Recipe()), calib, quiet=True)
    evals = token_batches(n=2, seed=13)
    err_insert, err_naive = rel_logit_error(model, q, evals), rel_logit_error(model, naive, evals)
    assert err_insert < err_naive / 2, f"{arch}: insertquant {err_insert:.4f} vs naive {err_naive:.4f}"


def test_qwen2_biases_survive_quantization():
    model = implanted_decoder("Qwen2ForCausalLM")
    bias = model.model.layers[1].self_attn.q_proj.bias.detach().clone()
    q = copy.deepcopy(model)
    vtquant.quantize_(q, method_recipe("insertquant", Recipe()), token_batches(), quiet=True)
    torch.testing.assert_close(q.model.layers[1].self_attn.q_proj.bias.detach(), bias)


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("make", [lambda: nn.Sequential(nn.Linear(4, 4), nn.ReLU()), _gpt2],
                         ids=["Sequential", "GPT2LMHeadModel"])
def test_unsupported_model_error(make):
    model = make()
    with pytest.raises(UnsupportedModelError) as err:
        get_adapter(model)
    msg = str(err.value)
    assert repr(type(model).__name__) in msg
    for arch in ARCHS:
        assert arch in msg
    assert "ModelAdapter" in msg and "register_adapter" in msg  # how to add one
    assert isinstance(err.value, TypeError)
    # the public verb raises the same, before touching the model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedModelError):
        vtquant.quantize_(model, Recipe(), [torch.zeros(1, 4, dtype=torch.long)], quiet=True)
    assert getattr(model, "vtquant", None) is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_ignore_a_single_layer_projection():
    model = implanted_decoder()
    recipe = method_recipe("naive-static", Recipe(ignore=["lm_head", "layers.0.mlp.down_proj"]))
    vtquant.quantize_(model, recipe, token_batches(n=1), quiet=True)
    assert not isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
    assert isinstance(model.model.layers[1].mlp.down_proj, QuantLinear)


def test_ignoring_the_probe_gives_a_clear_error():
    model = implanted_decoder()
    recipe = method_recipe("insertquant", Recipe(ignore=["lm_head", "mlp.down_proj"]))
    try:
        report = vtquant.quantize_(model, recipe, token_batches(n=1), quiet=True)
    except ValueError as err:  # either a clear error naming the probe ...
        assert "down_proj" in str(err)
    else:  # ... or quantization without sink handling, said in the report
        assert model.vtquant.plan.sinks is None
        assert any("down_proj" in note for note in report.notes)
