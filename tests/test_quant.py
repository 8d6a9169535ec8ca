"""Quantizers (weight RTN, activation observers / fake quantization) and W8A8 on an implanted sink model."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import vtquant
from vtquant.config import ActArgs, Recipe, SinkConfig, WeightArgs, method_recipe
from vtquant.core.quant import ActQuantizer, QuantLinear, dequantize_weight, quantize_weight

from sinkmodels import SINK_ID, implanted_decoder, token_batches, rel_logit_error


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread, immune to contention


def _weights(out_f: int = 16, in_f: int = 64, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen) * torch.logspace(-2, 1, out_f).unsqueeze(1)
    w[3, 17] = 40.0  # one outlier weight
    return w


# ---------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 8])
def test_weight_rtn_per_channel(bits):
    w = _weights()
    codes, scale = quantize_weight(w, WeightArgs(bits=bits, granularity="per-channel"))
    qmax = 2 ** (bits - 1) - 1
    assert codes.dtype == torch.int8 and codes.shape == w.shape
    assert scale.shape == (16, 1)
    assert int(codes.min()) >= -qmax - 1 and int(codes.max()) <= qmax
    # one scale per output row, set by the row's largest |w|: that weight maps to +-qmax exactly
    torch.testing.assert_close(scale[:, 0], w.abs().amax(dim=1) / qmax)
    assert (codes.abs().amax(dim=1) == qmax).all()
    err = (dequantize_weight(codes, scale) - w).abs()
    assert (err <= scale / 2 * (1 + 1e-5)).all()


@pytest.mark.parametrize("bits", [4, 8])
def test_weight_rtn_per_group(bits):
    w = _weights()
    args = WeightArgs(bits=bits, granularity="per-group", group_size=16)
    codes, scale = quantize_weight(w, args)
    qmax = 2 ** (bits - 1) - 1
    assert codes.dtype == torch.int8
    assert scale.shape == (16, 4)
    assert int(codes.min()) >= -(qmax + 1) and int(codes.max()) <= qmax
    if bits == 4:
        assert -8 <= int(codes.min()) and int(codes.max()) <= 7
    groups = w.view(16, 4, 16)
    torch.testing.assert_close(scale, groups.abs().amax(dim=-1) / qmax)
    deq = dequantize_weight(codes, scale)
    err = (deq - w).abs().view(16, 4, 16)
    assert (err <= scale.unsqueeze(-1) / 2 * (1 + 1e-5)).all()
    # the outlier only coarsens its own group: per-group error of row 3 beats per-channel
    pc_codes, pc_scale = quantize_weight(w, WeightArgs(bits=bits))
    pc_err = (dequantize_weight(pc_codes, pc_scale) - w).abs()
    assert float(err.view(16, 64)[3].sum()) < 0.5 * float(pc_err[3].sum())


def test_weight_per_group_divisibility_error():
    with pytest.raises(ValueError) as err:
        quantize_weight(torch.randn(8, 40), WeightArgs(granularity="per-group", group_size=16))
    msg = str(err.value)
    assert "40" in msg and "16" in msg and "group_size" in msg
    with pytest.raises(ValueError, match="divisible"):
        QuantLinear(nn.Linear(40, 8), WeightArgs(granularity="per-group", group_size=16), None)


def test_quantlinear_stores_int8_codes():
    lin = nn.Linear(64, 16)
    with torch.no_grad():
        lin.weight.copy_(_weights())
    q = QuantLinear(lin, WeightArgs(bits=4), None)
    assert q.weight is None and q.qweight.dtype == torch.int8
    x = torch.randn(5, 64)
    expected = x @ dequantize_weight(q.qweight, q.w_scale).T + lin.bias
    torch.testing.assert_close(q(x), expected.detach())


# ---------------------------------------------------------------------------------------------
# activations
# ---------------------------------------------------------------------------------------------
def _calibrated(args: ActArgs, data: torch.Tensor, keep=None) -> ActQuantizer:
    aq = ActQuantizer(args)
    assert aq.mode == "observe"
    aq.observe(data, keep)
    aq.finalize()
    assert aq.mode == "quant"
    return aq


@pytest.mark.parametrize("bits", [4, 8])
def test_act_static_symmetric(bits):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 32, generator=gen) * 3
    aq = _calibrated(ActArgs(bits=bits), x)
    qmax = 2 ** (bits - 1) - 1
    scale = float(aq.scale)
    assert scale == pytest.approx(float(x.abs().max()) / qmax, rel=1e-6)
    assert float(aq.zero_point) == 0.0
    y = aq.fake_quant(x)
    k = y / scale
    assert float((k - k.round()).abs().max()) < 1e-3  # on the grid
    assert float(k.abs().max()) <= qmax + 1e-3
    assert float((y - x).abs().max()) <= scale / 2 * (1 + 1e-5)
    # outside the calibrated range: saturates at the grid end
    big = aq.fake_quant(torch.tensor([[1e4, -1e4]]))
    torch.testing.assert_close(big, torch.tensor([[qmax * scale, -qmax * scale]]))


@pytest.mark.parametrize("bits", [4, 8])
def test_act_static_asymmetric(bits):
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(64, 32, generator=gen) * 5 - 1  # range about [-1, 4]
    aq = _calibrated(ActArgs(bits=bits, symmetric=False), x)
    qmax = 2 ** bits - 1
    scale, zero = float(aq.scale), float(aq.zero_point)
    assert scale == pytest.approx(float(x.max() - x.min()) / qmax, rel=1e-6)
    assert zero == round(zero) and 0 <= zero <= qmax
    y = aq.fake_quant(x)
    code = y / scale + zero
    assert float((code - code.round()).abs().max()) < 1e-3
    assert float(code.min()) >= -1e-3 and float(code.max()) <= qmax + 1e-3
    assert float((y - x).abs().max()) <= scale / 2 * (1 + 1e-4)
    # an all-positive range still represents 0 exactly (zero point 0)
    pos = _calibrated(ActArgs(bits=bits, symmetric=False), torch.rand(16, 8, generator=gen) + 1.0)
    assert float(pos.zero_point) == 0.0
    assert float(pos.fake_quant(torch.zeros(1, 8)).abs().max()) == 0.0


def test_act_clip_ratio():
    x = torch.linspace(-4, 4, 64).view(8, 8)
    aq = _calibrated(ActArgs(clip_ratio=0.5), x)
    assert float(aq.scale) == pytest.approx(2.0 / 127, rel=1e-6)
    assert float(aq.fake_quant(torch.tensor([[4.0]]))) == pytest.approx(2.0, rel=1e-6)


def test_act_observer_excludes_masked_rows():
    rows = torch.randn(10, 16)
    rows[4] = 1000.0
    rows[7, 2] = -800.0
    keep = torch.ones(10, dtype=torch.bool)
    keep[[4, 7]] = False
    aq = ActQuantizer(ActArgs())
    aq.observe(rows, keep)
    assert float(aq.observed_max) == pytest.approx(float(rows[keep].max()))
    assert float(aq.observed_min) == pytest.approx(float(rows[keep].min()))
    aq.observe(rows[keep][:0])  # empty: no change, no error
    aq.finalize()
    assert float(aq.scale) == pytest.approx(float(rows[keep].abs().max()) / 127, rel=1e-6)
    with pytest.raises(RuntimeError, match="no data"):
        ActQuantizer(ActArgs()).finalize()


@pytest.mark.parametrize("symmetric", [True, False])
def test_act_per_token_dynamic(symmetric):
    aq = ActQuantizer(ActArgs(granularity="per-token", static=False, symmetric=symmetric))
    assert aq.mode == "quant"
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 32, generator=gen) * torch.tensor([0.01, 0.1, 1, 10, 100, 1000.0]).unsqueeze(1)
    y = aq.fake_quant(x)
    for i in range(6):  # each row is quantized on its own: a huge row does not affect others
        torch.testing.assert_close(y[i:i + 1], aq.fake_quant(x[i:i + 1]))
        if symmetric:
            row_scale = float(x[i].abs().max()) / 127
        else:
            row_scale = float(x[i].max().clamp(min=0) - x[i].min().clamp(max=0)) / 255
        assert float((y[i] - x[i]).abs().max()) <= row_scale / 2 * (1 + 1e-4) + 1e-12
    if symmetric:  # the row max is represented exactly
        torch.testing.assert_close(y.abs().amax(1), x.abs().amax(1))


# ---------------------------------------------------------------------------------------------
# the implanted sink model
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sink_model():
    return implanted_decoder()


@pytest.fixture(scope="module")
def w8a8_models(sink_model):
    calib = token_batches()
    out = {}
    for method in ("naive-static", "insertquant"):
        q = copy.deepcopy(sink_model)
        vtquant.quantize_(q, method_recipe(method, Recipe()), calib, quiet=True)
        out[method] = q
    return out




def test_naive_static_degrades_far_more_than_insertquant(sink_model, w8a8_models, capsys):
    evals = token_batches(n=3, seed=21)  # sinks at the first token, as in calibration
    naive = rel_logit_error(sink_model, w8a8_models["naive-static"], evals)
    insert = rel_logit_error(sink_model, w8a8_models["insertquant"], evals)
    with capsys.disabled():
        print(f"\n[W8A8] relative L2 logit error: naive-static {naive:.4f}, insertquant {insert:.4f}")
    assert naive > 3 * insert, f"naive-static {naive:.4f} vs insertquant {insert:.4f}"


def test_insertquant_scale_ignores_sinks(sink_model, w8a8_models):
    """The static scale of the emergence layer's down_proj comes from semantic tokens only."""
    naive = w8a8_models["naive-static"].model.layers[2].mlp.down_proj.act
    insert = w8a8_models["insertquant"].model.layers[2].mlp.down_proj.act
    # reference: max |x| over non-sink rows of the full-precision input on the calibration data
    inputs = []
    handle = sink_model.model.layers[2].mlp.down_proj.register_forward_pre_hook(
        lambda m, i: inputs.append(i[0].reshape(-1, i[0].shape[-1])))
    calib = token_batches()
    with torch.no_grad():
        for x in calib:
            sink_model(input_ids=x)
    handle.remove()
    rows = torch.cat(inputs)
    is_sink = torch.cat([(x == SINK_ID).reshape(-1) for x in calib])
    semantic_scale = float(rows[~is_sink].abs().max()) / 127
    all_scale = float(rows.abs().max()) / 127
    assert all_scale > 100 * semantic_scale  # the sink dominates the plain MinMax range
    assert float(insert.scale) == pytest.approx(semantic_scale, rel=0.05)
    assert float(naive.scale) == pytest.approx(all_scale, rel=0.05)


def test_print_model_shows_quantization(w8a8_models):
    text = str(w8a8_models["insertquant"])
    for name in ("QuantLinear", "SinkGuard", "SinkDetector", "ResidualRestore", "ActQuantizer"):
        assert name in text, name
    assert "w_bits=8" in text and "mode=template" in text and "stage=stage2" in text
    naive = str(w8a8_models["naive-static"])
    assert "QuantLinear" in naive and "SinkGuard" not in naive and "SinkDetector" not in naive


def test_dynamic_token_needs_no_calibrated_scale(sink_model):
    q = copy.deepcopy(sink_model)
    vtquant.quantize_(q, method_recipe("dynamic-token", Recipe()), token_batches(n=1), quiet=True)
    acts = [m.act for m in q.modules() if isinstance(m, QuantLinear)]
    assert len(acts) == 42 and all(a.granularity == "per-token" and not a.static for a in acts)
    evals = token_batches(n=2, seed=5)
    assert rel_logit_error(sink_model, q, evals) < 0.05


def test_sinks_disabled_is_plain_per_tensor(sink_model):
    q = copy.deepcopy(sink_model)
    recipe = method_recipe("insertquant", Recipe(sinks=SinkConfig(enabled=False)))
    vtquant.quantize_(q, recipe, token_batches(), quiet=True)
    assert q.vtquant.plan.sinks is None
    assert not any(m.guard is not None for m in q.modules() if isinstance(m, QuantLinear))
