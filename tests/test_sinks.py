"""Sink detection, templates and clamp-and-insert (docs/method.md steps 2-5) on implanted tiny decoders.

The implanted models (``tests/sinkmodels.py``) make token ``SINK_ID`` a massive-activation
sink at a chosen emergence layer and cancel it at a chosen layer, so every expectation
below (sink positions, emergence / cancellation layers) is known from how the model was
built, never copied from a run.
"""
from __future__ import annotations

import copy

import pytest
import torch

import vtquant
from vtquant.config import Recipe, SinkConfig
from vtquant.core.quant import QuantLinear
from vtquant.core.sinks import (SinkDetector, SinkState, choose_stage1, find_cancellation_layer,
                                find_emergence_layer)

from sinkmodels import SINK_ID, implanted_decoder, token_batches

MIXED_POSITIONS = ((0,), (0, 5), (3,), (7, 12))


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread, immune to contention


@pytest.fixture(scope="module")
def fp_model():
    return implanted_decoder()


def _no_quant(**sink_kwargs) -> Recipe:
    return Recipe(method="insertquant", weights=None, activations=None, sinks=SinkConfig(**sink_kwargs))


def _quantized(model, recipe, batches):
    q = copy.deepcopy(model)
    report = vtquant.quantize_(q, recipe, batches, quiet=True)
    return q, report


def _sink_ids_per_row(ids: torch.Tensor) -> list[list[int]]:
    return [(row == SINK_ID).nonzero().flatten().tolist() for row in ids]


@torch.no_grad()
def _max_logit_error(a, b, batches) -> float:
    return max(float((a(input_ids=x).logits - b(input_ids=x).logits).abs().max()) for x in batches)


# ---------------------------------------------------------------------------------------------
# content-based detection on the whole model
# ---------------------------------------------------------------------------------------------
def test_detection_is_exact_on_new_batches(fp_model):
    calib = token_batches(n=4, sink_positions=MIXED_POSITIONS)
    q, report = _quantized(fp_model, _no_quant(known_sinks=[]), calib)
    assert report.emergence_layer == 2
    assert report.known_sinks == []
    # calibration sinks were found exactly where SINK_ID sits
    assert report.calib_sink_positions == [p for x in calib for p in _sink_ids_per_row(x)]

    # new data: other seeds, other positions, rows with 0, 1, 2 and 3 sinks in one batch
    layouts = [MIXED_POSITIONS, ((4, 10, 20), (1,), (2, 30), (31,)), ((), (6,), (0, 1, 2), ())]
    checked_rows = 0
    for seed, layout in enumerate(layouts, start=11):
        for ids in token_batches(n=2, batch=4, seed=seed, sink_positions=layout):
            with torch.no_grad():
                q(input_ids=ids)
            expected = _sink_ids_per_row(ids)
            assert q.vtquant.sink_positions() == expected, f"layout {layout}"
            checked_rows += len(expected)
    assert checked_rows == 24
    # the counts really differed between rows (the test covered that case)
    counts = {len(p) for layout in layouts for p in layout}
    assert counts == {0, 1, 2, 3}


@pytest.mark.parametrize("emergence,cancellation", [(2, 4), (1, 4), (3, 5), (1, 3)])
def test_emergence_and_cancellation_found_from_data(emergence, cancellation):
    model = implanted_decoder(emergence=emergence, cancellation=cancellation)
    _, report = _quantized(model, _no_quant(known_sinks=[]), token_batches())
    assert (report.emergence_layer, report.cancellation_layer) == (emergence, cancellation)
    assert report.stages["stage2"] == emergence
    assert report.restore_layer == cancellation
    # the probe ratio peaks at the emergence layer, far above alpha
    ratios = report.probe_max_ratio
    assert max(range(len(ratios)), key=ratios.__getitem__) == emergence
    assert ratios[emergence] > 64
    # the sink's residual norm jumps at emergence and drops most at cancellation
    norms = report.sink_residual_norm
    assert norms[emergence] > 50 * norms[emergence - 1]
    drops = [norms[i - 1] - norms[i] for i in range(emergence + 1, len(norms))]
    assert emergence + 1 + drops.index(max(drops)) == cancellation


def test_no_massive_activation_disables_sinks():
    """A model without an implanted sink: nothing exceeds alpha, sink handling is off (with a note)."""
    import transformers

    from vtquant.adapters.hf_decoder import tiny_config

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_config()).eval()
    q, report = _quantized(model, _no_quant(known_sinks=[]), token_batches())
    assert report.emergence_layer is None
    assert q.vtquant.plan.sinks is None
    assert any("alpha" in note for note in report.notes)


# ---------------------------------------------------------------------------------------------
# clamp-and-insert with quantization off
# ---------------------------------------------------------------------------------------------
INSERT_ATOL = 1e-5  # float32 logits of O(1); observed ~3e-7 (rounding only)


def test_clamp_and_insert_is_exact_without_quantization(fp_model, capsys):
    calib = token_batches()  # the sink is the first token, as in real causal LMs
    evals = token_batches(n=2, seed=7)
    inserted, rep_ins = _quantized(fp_model, _no_quant(known_sinks=[]), calib)
    clamped, rep_clamp = _quantized(fp_model, _no_quant(known_sinks=[], insert=False, restore_residual=False), calib)

    # the guards are really active (otherwise "exact" would be vacuous)
    assert "template" in rep_ins.layer_modes.values()
    assert set(rep_clamp.layer_modes.values()) == {"clamp"}
    with torch.no_grad():
        inserted(input_ids=evals[0])
    assert inserted.vtquant.sink_positions() == _sink_ids_per_row(evals[0])

    err_insert = _max_logit_error(fp_model, inserted, evals)
    err_clamp = _max_logit_error(fp_model, clamped, evals)
    with capsys.disabled():
        print(f"\n[sinks] max |logit error| clamp+insert: {err_insert:.3e}, clamp only: {err_clamp:.3e}")
    assert err_insert < INSERT_ATOL, f"clamp+insert error {err_insert:.3e} >= {INSERT_ATOL}"
    assert err_clamp > 100 * err_insert, f"clamp-only {err_clamp:.3e} vs insert {err_insert:.3e}"
    assert err_clamp > 0.1  # the ablation really breaks the model


# ---------------------------------------------------------------------------------------------
# known sinks
# ---------------------------------------------------------------------------------------------
def test_known_first_token(fp_model):
    q, report = _quantized(fp_model, _no_quant(known_sinks=["first_token"]), token_batches())
    assert report.known_sinks == ["first_token"]
    assert report.known_confirmed == pytest.approx(1.0)
    assert set(report.layer_modes) == set(range(6))  # guards from layer 0 on
    evals = token_batches(n=2, seed=3)
    assert _max_logit_error(fp_model, q, evals) < INSERT_ATOL

    # left padding: the first non-pad token is the known sink; content sinks are added to it
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 64, (3, 16), generator=gen)
    mask = torch.ones(3, 16, dtype=torch.long)
    ids[0, :4], mask[0, :4] = 0, 0
    ids[1, :1], mask[1, :1] = 0, 0
    ids[2, 9] = SINK_ID  # a content sink in an unpadded row
    with torch.no_grad():
        q(input_ids=ids, attention_mask=mask)
    assert q.vtquant.sink_positions() == [[4], [1], [0, 9]]
    with torch.no_grad():
        q(input_ids=ids)  # no mask: position 0 of every row
    assert q.vtquant.sink_positions() == [[0], [0], [0, 9]]


def test_known_first_token_dropped_when_data_disagrees(fp_model):
    """If calibration sinks are not at the first token, the known kind is not used (with a note)."""
    _, report = _quantized(fp_model, _no_quant(known_sinks=["first_token"]), token_batches(sink_positions=((3,),)))
    assert report.known_confirmed == pytest.approx(0.0)
    assert report.known_sinks == []
    assert any("first_token" in note for note in report.notes)


def test_unknown_known_sink_kind_is_a_clear_error(fp_model):
    with pytest.raises(ValueError) as err:
        _quantized(fp_model, _no_quant(known_sinks=["registers"]), token_batches(n=1))
    msg = str(err.value)
    assert "registers" in msg and "first_token" in msg


# ---------------------------------------------------------------------------------------------
# units
# ---------------------------------------------------------------------------------------------
def test_find_emergence_layer():
    ratios = torch.tensor([1.5, 80.0, 3000.0, 2.0])
    assert find_emergence_layer(ratios, alpha=64.0) == 2
    assert find_emergence_layer(ratios, alpha=5000.0) is None
    assert find_emergence_layer(torch.tensor([10.0, 65.0, 3.0]), alpha=64.0) == 1


def test_find_cancellation_layer():
    assert find_cancellation_layer(torch.tensor([1.0, 1.0, 400.0, 400.0, 40.0, 39.0]), 2) == 4
    # the largest drop wins, not the first one
    assert find_cancellation_layer(torch.tensor([1.0, 400.0, 390.0, 300.0, 10.0]), 1) == 4
    # never cancelled: no layer lowers the norm
    assert find_cancellation_layer(torch.tensor([1.0, 400.0, 410.0, 420.0]), 1) is None
    # emergence at the last layer, or none
    assert find_cancellation_layer(torch.tensor([1.0, 2.0, 400.0]), 2) is None
    assert find_cancellation_layer(torch.tensor([1.0, 2.0, 400.0]), None) is None


def test_choose_stage1():
    sink = torch.tensor([True, True, False, False, False])
    ratios = torch.tensor([
        [5.0, 5.0, 4.0, 1.0, 1.0],     # layer 0: threshold 2 x 4 = 8 catches no sink
        [50.0, 60.0, 3.0, 1.0, 2.0],   # layer 1: threshold 2 x 3 = 6 catches both
        [900.0, 900.0, 1.0, 1.0, 1.0],  # layer 2 = emergence
    ])
    layer, alpha0, recall = choose_stage1(ratios, sink, emergence=2, margin=2.0, min_recall=0.9)
    assert (layer, alpha0, recall) == (1, 6.0, 1.0)
    # only layers before emergence qualify
    assert choose_stage1(ratios, sink, emergence=1, margin=2.0, min_recall=0.9) is None
    # recall requirement: one of two sinks over the threshold
    half = ratios.clone()
    half[1, 0] = 5.0
    assert choose_stage1(half, sink, emergence=2, margin=2.0, min_recall=0.9) is None
    assert choose_stage1(half, sink, emergence=2, margin=2.0, min_recall=0.5) == (1, 6.0, 0.5)
    # a threshold <= 1 is not a separation
    low = torch.tensor([[0.9, 0.9, 0.4, 0.3, 0.2], [1.0, 1.0, 1.0, 1.0, 1.0]])
    assert choose_stage1(low, sink, emergence=1, margin=2.0, min_recall=0.9) is None
    # degenerate masks and no emergence
    assert choose_stage1(ratios, torch.zeros(5, dtype=torch.bool), 2, 2.0, 0.9) is None
    assert choose_stage1(ratios, torch.ones(5, dtype=torch.bool), 2, 2.0, 0.9) is None
    assert choose_stage1(ratios, sink, None, 2.0, 0.9) is None


def _two_type_state(is_prefill: bool = True) -> SinkState:
    state = SinkState(num_types=2)
    state.det_templates["stage2"] = torch.tensor([[10.0, 0.0], [0.0, 10.0]])
    state.reset(None, is_prefill=is_prefill)
    return state


def _features(rows: list[dict[int, int]], tokens: int = 6) -> torch.Tensor:
    """``[B, T, 2]`` features; ``rows[b][t] = k`` puts the token exactly on detection template ``k``."""
    feats = torch.zeros(len(rows), tokens, 2)
    for b, row in enumerate(rows):
        for t, k in row.items():
            feats[b, t, k] = 10.0
    return feats


def _mask(rows: list[list[int]], tokens: int = 6) -> torch.Tensor:
    mask = torch.zeros(len(rows), tokens, dtype=torch.bool)
    for b, row in enumerate(rows):
        mask[b, row] = True
    return mask


def test_sinkstate_assignment_in_order_when_count_equals_k():
    state = _two_type_state()
    # features say the opposite of the order: in a prompt with exactly K sinks, order wins
    state.add("stage2", _mask([[1, 4]]), _features([{1: 1, 4: 0}]))
    assert state.types.tolist() == [[-1, 0, -1, -1, 1, -1]]
    assert state.positions() == [[1, 4]]


def test_sinkstate_assignment_least_squares_otherwise():
    state = _two_type_state()
    # row 0: one sink (count != K) that looks like type 1; row 1: three sinks; row 2: exactly K
    feats = _features([{3: 1}, {0: 1, 2: 0, 5: 1}, {0: 1, 1: 0}])
    state.add("stage2", _mask([[3], [0, 2, 5], [0, 1]]), feats)
    assert state.types.tolist() == [
        [-1, -1, -1, 1, -1, -1],
        [1, -1, 0, -1, -1, 1],
        [0, 1, -1, -1, -1, -1],  # count == K: in order, features ignored
    ]


def test_sinkstate_assignment_least_squares_when_decoding():
    state = _two_type_state(is_prefill=False)
    state.add("stage2", _mask([[1, 4]]), _features([{1: 1, 4: 0}]))
    assert state.types.tolist() == [[-1, 1, -1, -1, 0, -1]]


def test_sinkstate_without_detection_template_uses_order_clamped_to_k():
    state = SinkState(num_types=2)
    state.reset(None)
    state.add("stage1", _mask([[0, 2, 5]]), _features([{0: 1, 2: 1, 5: 1}]))
    assert state.types.tolist() == [[0, -1, 1, -1, -1, 1]]


def test_sinkstate_union_and_found_by():
    state = SinkState(num_types=1)
    known = _mask([[0], [0]])
    state.reset(known)
    assert state.types.tolist()[0][0] == 0
    state.add("stage1", _mask([[3], []]))
    state.add("stage2", _mask([[3, 5], [2]]))
    assert state.positions() == [[0, 3, 5], [0, 2]]
    assert state.found_by["known"].nonzero().tolist() == [[0, 0], [1, 0]]
    assert state.found_by["stage1"].nonzero().tolist() == [[0, 3]]
    assert state.found_by["stage2"].nonzero().tolist() == [[0, 3], [0, 5], [1, 2]]
    with pytest.raises(ValueError, match="layout"):
        SinkState(layout="bds")


def test_sink_detector_threshold_and_layout():
    det = SinkDetector("stage2", alpha=10.0, reference=2.0)
    state = SinkState(layout="sbd")  # sequence-first: x is [T, B, C]
    det.state = state
    state.reset(None)
    x = torch.ones(4, 2, 8)  # peaks 1 -> ratio 0.5
    x[1, 0, 3] = 25.0  # ratio 12.5 > 10: token 1 of batch row 0
    x[2, 1, 0] = -19.0  # ratio 9.5 < 10: not a sink
    det(x)
    assert state.positions() == [[1], []]
    assert state.found_by["stage2"].shape == (2, 4)


def test_quantized_model_holds_detector_at_emergence(fp_model):
    q, report = _quantized(fp_model, _no_quant(known_sinks=[]), token_batches())
    detectors = {name: m for name, m in q.named_modules() if isinstance(m, SinkDetector)}
    assert list(detectors) == ["model.layers.2.mlp.down_proj.detector"]
    det = detectors["model.layers.2.mlp.down_proj.detector"]
    assert det.alpha == 64.0
    # its reference is the median token peak at that probe in calibration: sinks are far above it
    peaks = []
    handle = q.model.layers[2].mlp.down_proj.register_forward_pre_hook(
        lambda m, i: peaks.append(i[0].abs().amax(-1).flatten()))
    with torch.no_grad():
        for x in token_batches():
            q(input_ids=x)
    handle.remove()
    assert float(det.reference) == pytest.approx(float(torch.cat(peaks).median()), rel=1e-5)
    assert isinstance(q.model.layers[2].mlp.down_proj, QuantLinear)


def test_content_only_decoding_is_not_prefill(fp_model):
    q, _ = _quantized(fp_model, _no_quant(known_sinks=[]), token_batches())
    ids = token_batches(n=1, seed=4)[0]
    with torch.no_grad():
        out = q(input_ids=ids[:, :8], use_cache=True)
        assert q.vtquant.state.is_prefill is True
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values")
        q(input_ids=ids[:, 8:9], cache=cache, use_cache=True)
    assert q.vtquant.state.is_prefill is False
