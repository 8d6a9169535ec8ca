"""Real int8 execution (vtquant.kernels) against the fake-quant model it was converted from."""
import copy

import pytest
import torch

import vtquant
from vtquant.config import Recipe, SinkConfig, method_recipe
from vtquant.kernels import RealQuantLinear, convert_
from vtquant.kernels.gpu_bench import SHAPES, layer_bench
from vtquant.kernels.linear import UnsupportedConversionError
from vtquant.kernels.triton_quant import quant_dynamic_rows, quant_static

from sinkmodels import SINK_ID, implanted_decoder, token_batches


@pytest.fixture(scope="module")
def fp_model():
    torch.set_num_threads(1)
    return implanted_decoder()


def _quantized(model, method, **sinks):
    m = copy.deepcopy(model)
    vtquant.quantize_(m, method_recipe(method, Recipe(sinks=SinkConfig(known_sinks=[], **sinks))),
                      token_batches(), quiet=True)
    return m


@pytest.mark.parametrize("method", ["naive-static", "insertquant", "insertquant+rotate"])
def test_real_int8_matches_fake_quant(fp_model, method):
    batch = token_batches(n=1, seed=7, sink_positions=((0,), (0, 9)))[0]
    fake = _quantized(fp_model, method)
    with torch.no_grad():
        expected = fake(input_ids=batch).logits
    real = convert_(fake, "cpu-int8")
    assert all(isinstance(real.model.layers[i].mlp.down_proj, RealQuantLinear) for i in range(6))
    assert real.model.layers[0].self_attn.q_proj.group is not None  # q/k/v share one int8 matmul
    with torch.no_grad():
        got = real(input_ids=batch).logits
    # identical int8 codes; only the float32 accumulation order differs
    err = (got - expected).abs().max().item()
    print(f"[{method}] real vs fake max |diff| {err:.2e}")
    assert err < 1e-4


def test_real_int8_sinks_and_cached_decoding(fp_model):
    real = convert_(_quantized(fp_model, "insertquant"), "cpu-int8")
    ids = token_batches(n=1, batch=1, seq=20, seed=3, sink_positions=((0,),))[0]
    with torch.no_grad():
        full = real(input_ids=ids).logits[0, -1]
        assert real.vtquant.sink_positions() == [[0]]
        out = real(input_ids=ids[:, :12], use_cache=True)
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        for t in range(12, 20):
            out = real(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True)
            cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    assert (out.logits[0, -1] - full).abs().max().item() < 1e-3


def test_conversion_errors_name_the_problem(fp_model):
    dyn = _quantized(fp_model, "dynamic-token")
    with pytest.raises(UnsupportedConversionError, match="per-tensor static"):
        convert_(dyn, "cpu-int8")
    w4 = copy.deepcopy(fp_model)
    vtquant.quantize_(w4, method_recipe("insertquant", Recipe(sinks=SinkConfig(known_sinks=[])), w_bits=4),
                      token_batches(), quiet=True)
    with pytest.raises(UnsupportedConversionError, match="W8 per-channel"):
        convert_(w4, "cpu-int8")
    with pytest.raises(UnsupportedConversionError, match="not quantized by vtquant"):
        convert_(copy.deepcopy(fp_model), "cpu-int8")
    if not torch.cuda.is_available():
        with pytest.raises(UnsupportedConversionError, match="CUDA"):
            convert_(_quantized(fp_model, "insertquant"), "cuda-fp8")


def test_quantizer_fallbacks_match_reference():
    x = torch.randn(33, 100) * 4
    q = quant_static(x, 0.05, torch.int8)
    assert torch.equal(q, torch.round(x / 0.05).clamp(-127, 127).to(torch.int8))
    qd, s = quant_dynamic_rows(x, torch.int8)
    assert torch.allclose(s.squeeze(1), x.abs().amax(1) / 127)
    assert (qd.float() * s - x).abs().max() <= s.max() / 2 + 1e-6


def test_layer_bench_runs_on_cpu():
    rows = layer_bench(SHAPES["tiny"], "cpu", ["cpu-int8"], repeats=1)
    methods = [r["method"] for r in rows]
    assert methods == ["fp", "dynamic-token", "insertquant"]
    for r in rows[1:]:
        assert r["rel_error"] < 0.1, r
