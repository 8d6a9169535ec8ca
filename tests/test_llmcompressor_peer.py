"""The llm-compressor peer (optional extra) on a tiny random Llama: both rows run, quantize, stay close.

The error-message tests run everywhere; the others are skipped unless ``llmcompressor`` is installed
(``pip install "vtquant[llmcompressor]"``).
"""
from __future__ import annotations

import copy
import sys

import pytest
import torch

from vtquant.peers.llmcompressor import METHODS, llmcompressor_quantize

pytestmark = pytest.mark.usefixtures("one_thread")

transformers = pytest.importorskip("transformers")


def _tiny_llama():
    from vtquant.adapters.hf_decoder import tiny_config

    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(tiny_config(hidden_size=64, num_hidden_layers=2)).eval()


def _batches(n: int = 4, batch: int = 2, seq: int = 32, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (batch, seq), generator=gen) for _ in range(n)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


def test_unknown_method_names_the_valid_ones():
    with pytest.raises(ValueError, match="llmcompressor-sq-static.*llmcompressor-sq-gptq-dynamic"):
        llmcompressor_quantize(torch.nn.Linear(2, 2), [], "llmcompressor-gptq")


def test_missing_llmcompressor_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "llmcompressor", None)  # import llmcompressor -> ImportError
    with pytest.raises(ImportError, match=r'pip install "vtquant\[llmcompressor\]"'):
        llmcompressor_quantize(_tiny_llama(), _batches(), METHODS[0], quiet=True)


@pytest.fixture(scope="module")
def quantized():
    pytest.importorskip("llmcompressor", reason='the llmcompressor peer needs pip install "vtquant[llmcompressor]"')
    fp = _tiny_llama()
    calib = _batches()
    return fp, {m: llmcompressor_quantize(copy.deepcopy(fp), calib, m, quiet=True) for m in METHODS}


@pytest.mark.parametrize("method", METHODS)
def test_quantized_forward_differs_from_fp_but_stays_close(quantized, method):
    fp, models = quantized
    q = models[method]
    x = _batches(n=1, seed=7)[0]
    with torch.no_grad():
        ref, out = fp(input_ids=x).logits, q(input_ids=x).logits
    assert 0.0 < _rel(ref, out) < 0.2
    assert q.vtquant_peer["method"] == method
    assert fp.config.name_or_path == q.config.name_or_path == ""  # restored after the temporary local config


@pytest.mark.parametrize("method", METHODS)
def test_linears_carry_the_scheme_and_fake_quantize(quantized, method):
    from compressed_tensors.quantization import QuantizationStatus

    _, models = quantized
    q = models[method]
    linears = {n: m for n, m in q.named_modules() if isinstance(m, torch.nn.Linear)}
    assert not hasattr(linears.pop("lm_head"), "quantization_scheme")
    assert linears and all(m.quantization_status == QuantizationStatus.FROZEN for m in linears.values())
    static = method == "llmcompressor-sq-static"
    for name, lin in linears.items():
        scheme = lin.quantization_scheme
        assert scheme.weights.num_bits == 8 and scheme.weights.strategy == "channel" and scheme.weights.symmetric
        act = scheme.input_activations
        assert act.num_bits == 8 and act.symmetric
        assert (act.strategy, bool(act.dynamic)) == (("tensor", False) if static else ("token", True)), name
        assert lin.weight_scale.shape == (lin.out_features, 1)
        assert hasattr(lin, "input_scale") == static, name

    # one Linear by hand: int8 QDQ of the input (static scale / per-token absmax) and of the weight
    lin = q.model.layers[1].mlp.down_proj
    x = torch.randn(2, 5, lin.in_features) * 0.05

    def qdq(v, scale):
        return torch.clamp(torch.round(v / scale), -128, 127) * scale

    x_scale = lin.input_scale if static else x.abs().amax(dim=-1, keepdim=True) / 127.5
    with torch.no_grad():
        expected = torch.nn.functional.linear(qdq(x, x_scale), qdq(lin.weight, lin.weight_scale))
        got = lin(x)
        lin.quantization_enabled = False
        plain = lin(x)
        lin.quantization_enabled = True
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, plain, atol=1e-6)


def test_smoothing_alone_is_exact_for_the_static_row(quantized):
    """Without QDQ the static row is the smoothed model: equal to fp up to float rounding."""
    fp, models = quantized
    q = models["llmcompressor-sq-static"]
    x = _batches(n=1, seed=7)[0]
    modules = [m for m in q.modules() if hasattr(m, "quantization_scheme")]
    try:
        for m in modules:
            m.quantization_enabled = False
        with torch.no_grad():
            assert _rel(fp(input_ids=x).logits, q(input_ids=x).logits) < 1e-5
    finally:
        for m in modules:
            m.quantization_enabled = True


def test_compare_rows_from_run_methods():
    """The llm-compressor rows go through vtquant's own evaluation (same chunks, same perplexity code)."""
    pytest.importorskip("llmcompressor", reason='the llmcompressor peer needs pip install "vtquant[llmcompressor]"')
    from vtquant.config import Recipe
    from vtquant.llm import TextSetup, run_methods

    model = _tiny_llama()
    setup = TextSetup(_batches(), torch.cat(_batches(n=2, seed=7)), "4 x 32", "random", "random")
    rows, _ = run_methods(model, setup, Recipe(), [("fp", 8, 8), (METHODS[0], 8, 8), (METHODS[1], 8, 8)],
                          "tiny", quiet=True, log=lambda m: None)
    assert [r.method for r in rows] == ["fp", *METHODS]
    assert rows[1].static and not rows[2].static and rows[2].act_granularity == "per-token"
    assert all(r.extra["tool"] == "llmcompressor" for r in rows[1:])
    assert all(r.value != rows[0].value and abs(r.value / rows[0].value - 1) < 0.2 for r in rows[1:])
