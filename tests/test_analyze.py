"""`vtquant analyze` (issue 4): every metric against a value known by construction.

The implanted tiny decoders (``tests/sinkmodels.py``) write exactly ``SPIKE_VALUE`` into
``SPIKE_CHANNEL`` of token ``SINK_ID`` at the emergence layer and remove 95 % of it at the
cancellation layer; a token at position 0 of a causal model sees only itself, so its states
are the same vector in every input.  Tests below modify the projections of a copy of that
model (value drain, aligned queries, RoPE band of the sink key) so the expected geometry is
fixed by the weights, and check the metric functions on hand-made tensors.
"""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from vtquant.analyze import (analyze_model, attention_share, attention_spec, logit_drift, norm_ratio, pair_energy,
                             residual_rotation, restoration_variants, rope_rotate, value_spectrum,
                             _attention_from_qk)
from vtquant.adapters import get_adapter
from vtquant.config import Recipe, SinkConfig, method_recipe
from vtquant.report import key_numbers, summary_text, write_report

from sinkmodels import SINK_ID, SPIKE_CHANNEL, SPIKE_VALUE, implanted_decoder, token_batches

EMERGENCE, CANCELLATION = 2, 4


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread, immune to contention


@pytest.fixture(scope="module")
def fp_model():
    return implanted_decoder(attn_implementation="eager")


def _chunks(seed: int = 5, positions=((0,),)) -> torch.Tensor:
    return torch.cat(token_batches(n=2, batch=2, seq=32, seed=seed, sink_positions=positions))


@pytest.fixture(scope="module")
def figures(fp_model):
    return analyze_model(fp_model, _chunks(), restoration=False)


# ---- metric functions on hand-made tensors ------------------------------------------------
def test_attention_share_known_matrix():
    attn = torch.zeros(2, 4, 4)
    attn[0, :, 0], attn[1, :, 0] = 0.5, 0.25
    attn[0, :, 1:], attn[1, :, 1:] = 0.5 / 3, 0.75 / 3
    attn[:, 0, 0] = 1.0  # the sink's own row is not counted
    share = attention_share(attn, torch.tensor([True, False, False, False]))
    torch.testing.assert_close(share, torch.tensor([0.5, 0.25]))


def test_norm_ratio_known():
    x = torch.ones(4, 2, 3)
    x[0] *= 10.0
    x[0, 1] *= 2.0
    torch.testing.assert_close(norm_ratio(x, torch.tensor([True, False, False, False])), torch.tensor([10.0, 20.0]))


def test_value_spectrum_known_directions():
    w = torch.tensor([[3.0, 0, 0, 0], [0, 1.0, 0, 0]])  # singular values 3 (channel 0) and 1 (channel 1)
    x = torch.eye(4)[:3] * 2.0
    out = value_spectrum(w, x)
    torch.testing.assert_close(out["gain"], torch.tensor([3.0, 1.0, 0.0]))
    torch.testing.assert_close(out["low"][:2], torch.tensor([0.0, 1.0]))  # channel 1 = the small direction
    torch.testing.assert_close(out["null"], torch.tensor([0.0, 0.0, 1.0]))  # channel 2 = W's null space


def test_rope_pairs_and_logit_drift_known():
    d = 16
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    low, high = torch.zeros(d), torch.zeros(d)
    low[d // 2 - 1] = low[d - 1] = 1.0  # lowest-frequency pair
    high[0] = high[d // 2] = 1.0  # highest-frequency pair
    assert pair_energy(low)[-1] == pytest.approx(1.0) and pair_energy(high)[0] == pytest.approx(1.0)
    q = torch.randn(64, d, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(10, 74)
    assert float(logit_drift(q, pos, low, 0, torch.zeros(d // 2)).abs().max()) == 0.0  # no rotation, no drift
    d_low, d_high = logit_drift(q, pos, low, 0, inv_freq).mean(), logit_drift(q, pos, high, 0, inv_freq).mean()
    assert float(d_low) < 0.01 * float(d_high)
    # rotating both by the same position keeps the logit (relative-position property)
    a = rope_rotate(q[:1], torch.tensor([5]), inv_freq) @ rope_rotate(high.unsqueeze(0), torch.tensor([2]), inv_freq).T
    b = rope_rotate(q[:1], torch.tensor([8]), inv_freq) @ rope_rotate(high.unsqueeze(0), torch.tensor([5]), inv_freq).T
    torch.testing.assert_close(a, b)


@torch.no_grad()
def test_attention_from_qk_matches_the_model(fp_model):
    """Our RoPE + attention reproduce the model's own attention maps (so RoPE metrics use its convention)."""
    adapter = get_adapter(fp_model)
    spec = attention_spec(adapter)
    seen = {}
    hs = [spec.q[3].register_forward_hook(lambda m, i, o: seen.__setitem__("q", o[0])),
          spec.k[3].register_forward_hook(lambda m, i, o: seen.__setitem__("k", o[0]))]
    ids = _chunks()[:1]
    out = fp_model(input_ids=ids, output_attentions=True, use_cache=False)
    for h in hs:
        h.remove()
    t = ids.shape[1]
    ours = _attention_from_qk(seen["q"].view(t, spec.num_heads, -1), seen["k"].view(t, spec.num_kv_heads, -1), spec)
    torch.testing.assert_close(ours, out.attentions[3][0], atol=1e-5, rtol=1e-4)


# ---- sections 1-2 on the implanted model -------------------------------------------------
def test_spikes_known_layers_channel_value(fp_model):
    f = analyze_model(fp_model, _chunks(positions=((0,), (0, 9))), restoration=False)
    assert f["emergence_layer"] == EMERGENCE and f["cancellation_layer"] == CANCELLATION
    assert f["spikes"]["sink_positions"] == [[0], [0, 9], [0], [0, 9]]
    rows = [r for r in f["sinks"] if r["token_position"] == 0]
    assert set(rows[0]) >= {"layer", "token_position", "channel", "value", "ratio_to_median"}
    for layer in (EMERGENCE, EMERGENCE + 1):  # the implanted write, untouched until cancellation
        at = [r for r in rows if r["layer"] == layer]
        assert {r["channel"] for r in at} == {SPIKE_CHANNEL}
        for r in at:
            assert r["value"] == pytest.approx(SPIKE_VALUE, rel=1e-4)
        top = f["spikes"]["layers"][layer]["top"][0]
        # the top token may be the position-9 sink (its write depends on its context): still channel 7
        assert top["channel"] == SPIKE_CHANNEL and top["value"] >= SPIKE_VALUE * (1 - 1e-4)
        assert top["ratio_to_median"] == pytest.approx(top["value"] / f["spikes"]["layers"][layer]["median_abs"])
    for r in (r for r in rows if r["layer"] == CANCELLATION):  # 95 % removed
        assert r["channel"] == SPIKE_CHANNEL and r["value"] == pytest.approx(0.05 * SPIKE_VALUE, rel=1e-3)
    assert all(r["value"] < 10 for r in rows if r["layer"] < EMERGENCE)


def test_constant_vectors_first_token_is_one_vector(figures):
    """A position-0 token of a causal model sees only itself: the same vector in every input."""
    for name in ("attention_input", "mlp_input"):
        for row in figures["constant_vectors"][name]:
            t = row["types"][0]
            assert t["count"] == 4
            assert t["pairwise_cosine"] == pytest.approx(1.0, abs=1e-5)
            assert t["relative_spread"] < 1e-5
            assert row["semantic_pairwise_cosine"] < 0.9


# ---- section 3: projection geometry, built into the weights -------------------------------
def test_key_norm_and_attention_share_follow_the_implant(figures):
    geo = figures["geometry"]
    kn = torch.tensor(geo["key_norm_ratio"])  # keys read the spike channel in layers 3-4 only
    assert bool((kn[EMERGENCE + 1:CANCELLATION + 1] > 10).all()) and bool((kn[:EMERGENCE + 1] < 3).all())
    assert len(geo["attention_share"][0]) == 4 and len(geo["key_norm_ratio"][0]) == 2  # heads / kv heads


@torch.no_grad()
def test_value_drain_by_construction(fp_model):
    """W_V blind to the spike channel in layers 3-4: the sink's value vanishes, its input is in W_V's null space."""
    m = copy.deepcopy(fp_model)
    for block in m.model.layers[EMERGENCE + 1:CANCELLATION + 1]:
        block.self_attn.v_proj.weight[:, SPIKE_CHANNEL] = 0.0
    geo = analyze_model(m, _chunks(), restoration=False)["geometry"]
    for layer in (EMERGENCE + 1, CANCELLATION):
        assert max(geo["value_gain_ratio"][layer]) < 0.1
        assert min(geo["value_null_fraction_sink"][layer]) > 0.99
        assert max(geo["value_null_fraction_semantic"][layer]) < 0.9
    assert min(geo["value_gain_ratio"][0]) > 0.3  # untouched layer


@torch.no_grad()
def test_query_alignment_by_construction():
    """Queries set to the sink key's direction (bias only): cosine 1 with the sink key, attention goes to it."""
    m = implanted_decoder(attn_implementation="eager", attention_bias=True)
    layer = EMERGENCE + 1
    attn = m.model.layers[layer].self_attn
    d, group = 16, 2
    for block in m.model.layers:
        for lin in (block.self_attn.q_proj, block.self_attn.k_proj):
            lin.bias.zero_()
    attn.q_proj.weight.zero_()
    for h in range(4):
        g = h // group
        attn.q_proj.bias[h * d:(h + 1) * d] = attn.k_proj.weight[g * d:(g + 1) * d, SPIKE_CHANNEL]
    geo = analyze_model(m, _chunks(), restoration=False)["geometry"]
    assert min(geo["query_alignment"][layer]) > 0.999
    assert max(abs(v) for v in geo["query_alignment_baseline"][layer]) < 0.5
    assert min(geo["attention_share"][layer]) > 2 * max(geo["attention_share"][0])


# ---- section 4: RoPE band of the sink key, built into W_K ----------------------------------
@torch.no_grad()
def _sink_key_in_pair(pair: int) -> torch.nn.Module:
    m = implanted_decoder(attn_implementation="eager")
    d = 16
    for block in m.model.layers[EMERGENCE + 1:CANCELLATION + 1]:
        k = block.self_attn.k_proj.weight
        k[:, SPIKE_CHANNEL] = 0.0
        for g in range(2):
            k[g * d + pair, SPIKE_CHANNEL] = k[g * d + pair + d // 2, SPIKE_CHANNEL] = 1.0
    return m


def test_rope_low_frequency_sink_key_is_stable():
    low = analyze_model(_sink_key_in_pair(7), _chunks(), restoration=False)["rope"]
    high = analyze_model(_sink_key_in_pair(0), _chunks(), restoration=False)["rope"]
    layer = EMERGENCE + 1
    assert min(low["low_frequency_share_sink"][layer]) > 0.99  # period of pair 7 >> 32 tokens
    assert max(high["low_frequency_share_sink"][layer]) < 0.01  # period of pair 0 = 2 pi tokens
    assert max(low["logit_drift_sink"][layer]) < 0.05 * min(high["logit_drift_sink"][layer])
    assert low["pair_energy_sink"][layer][0][7] == pytest.approx(1.0, abs=1e-3)


# ---- section 5: restoration -----------------------------------------------------------------
def _noquant(rotate: bool = False) -> Recipe:
    r = Recipe(weights=None, activations=None)
    r.rotation.enabled = rotate
    return r


def test_restoration_exact_without_quantization(fp_model):
    """No quantization: clamp + insert (and the exact un-rotation) give the FP hidden states; clamp only does not."""
    for rotate in (False, True):
        f = analyze_model(fp_model, _chunks(), recipe=_noquant(rotate), calib_batches=token_batches(seed=11))
        variants = list(f["restoration"]["variants"].values())
        ins, clamp = variants[0], variants[1]
        assert ins["rotated"] == rotate
        assert max(ins["hidden_error_semantic"]) < 1e-4 and max(ins["hidden_error_sink"]) < 1e-4
        assert max(clamp["hidden_error_semantic"]) > 0.1
        fp_share = torch.tensor(f["restoration"]["fp_attention_share"])
        assert float((torch.tensor(ins["attention_share"]) - fp_share).abs().max()) < 1e-4
        assert float((torch.tensor(clamp["attention_share"]) - fp_share).abs()[EMERGENCE + 1:].max()) > 0.01
        assert ins["perplexity"] == pytest.approx(f["restoration"]["fp_perplexity"], rel=1e-4)
        tt = f["restoration"]["template_transfer"]["layers"]
        for row in tt:  # position-0 sinks are one vector whatever the corpus
            assert row["types"][0]["eval_cosine_to_calib_template"] == pytest.approx(1.0, abs=1e-5)
            assert row["types"][0]["key_rel_error"] < 1e-4


def test_residual_rotation_is_the_pipelines():
    assert residual_rotation(_noquant(False), 64) is None
    q = residual_rotation(_noquant(True), 64)
    torch.testing.assert_close(q @ q.T, torch.eye(64), atol=1e-5, rtol=0)


def test_w8a8_insertion_beats_clamp_and_naive(fp_model, tmp_path):
    recipe = method_recipe("insertquant", Recipe())
    labels = [lbl for lbl, _ in restoration_variants(recipe)]
    assert "clamp only" in labels[1] and labels[2].startswith("naive-static")
    f = analyze_model(fp_model, _chunks(), recipe=recipe, calib_batches=token_batches(seed=11),
                      token_text=lambda c, p: f"t{p}")
    v = list(f["restoration"]["variants"].values())
    ins, clamp, naive = (max(x["hidden_error_semantic"]) for x in v)
    assert ins < 0.5 * naive and ins < 0.1 * clamp
    assert v[0]["report"]["emergence_layer"] == EMERGENCE
    # the report: files, json keys, embedded PNGs, summary
    out = write_report(f, tmp_path / "rep", token_labels=[f"t{p}" for p in range(32)])
    data = json.loads((tmp_path / "rep" / "figures.json").read_text())
    assert data["emergence_layer"] == EMERGENCE and data["cancellation_layer"] == CANCELLATION
    assert data["sinks"] and set(data["sinks"][0]) >= {"layer", "token_position", "channel", "value",
                                                         "ratio_to_median"}
    html = out["html"].read_text()
    for key in ("spikes", "spike_heatmap", "constant_vectors", "geometry", "rope", "restoration_error",
                "attention_diff", "attention_maps", "template_transfer"):
        assert out["plots"][key].exists(), key
    assert html.count("data:image/png;base64,") == len(out["plots"])
    text = summary_text(f)
    assert f"emergence layer {EMERGENCE}" in text and "clamp only" in text
    assert key_numbers(f)["top_channels"] == [SPIKE_CHANNEL]
    # the quantizer's detection, per probe, with why (from the first variant's report)
    assert "6. the quantizer's detection" in text
    assert f"detection stage2 at probe-Linear input {EMERGENCE}: " in text and "called sinks" in text
    assert "no sink at " in text


def test_no_sinks_is_reported_not_crashing(tmp_path):
    m = implanted_decoder(attn_implementation="eager")
    ids = torch.cat(token_batches(n=1, batch=2, seq=32, seed=3, sink_positions=((),)))
    ids[ids == SINK_ID] = 2
    f = analyze_model(m, ids, recipe=method_recipe("insertquant", Recipe()), calib_batches=token_batches())
    assert f["emergence_layer"] is None and f["sinks"] == [] and "restoration" not in f
    assert any("no sinks" in n for n in f["notes"])
    write_report(f, tmp_path)
    assert (tmp_path / "report.html").exists()


def test_cli_analyze_arguments():
    from vtquant.cli import build_parser

    args = build_parser().parse_args(["analyze", "--recipe", "r.yaml", "--out", "d", "--calib-windows", "4",
                                      "--no-restoration"])
    assert args.recipe == "r.yaml" and args.calib_windows == 4 and args.no_restoration and not math.isnan(args.alpha)


@pytest.mark.parametrize("arch", ["Phi3ForCausalLM", "Gemma3ForCausalLM", "Qwen3ForCausalLM"])
def test_analyze_runs_on_other_decoder_layouts(arch, tmp_path):
    """Fused q/k/v (Phi-3, split into row slices), per-layer-type rotary (Gemma-3: RoPE section skipped
    and said why), q/k norms (Qwen3): the report is built and finds the implanted sink."""
    m = implanted_decoder(arch, attn_implementation="eager")
    ids = torch.cat(token_batches(n=1, batch=2, seq=32, seed=3))
    f = analyze_model(m, ids, recipe=method_recipe("insertquant", Recipe()), calib_batches=token_batches())
    assert f["emergence_layer"] is not None and f["spikes"]["sink_tokens"]
    write_report(f, tmp_path)
    assert (tmp_path / "report.html").exists()


@torch.no_grad()
@pytest.mark.parametrize("arch", ["Gemma2ForCausalLM", "Gemma3ForCausalLM", "Qwen3ForCausalLM", "Olmo2ForCausalLM",
                                  "Phi3ForCausalLM"])
def test_attention_recompute_honours_the_family(arch):
    """The recomputed attention (used where the model gives no maps) is the model's own on every layer type:
    q/k norms (Qwen3, Gemma-3 per head, OLMo-2 over the whole projection), Gemma's logit scale,
    Gemma-2's soft-capping, sliding-window layers, Gemma-3's per-layer-type RoPE base."""
    m = implanted_decoder(arch, attn_implementation="eager")
    spec = attention_spec(get_adapter(m))
    assert (spec.q_norm is not None) == (arch in ("Gemma3ForCausalLM", "Qwen3ForCausalLM", "Olmo2ForCausalLM"))
    assert (spec.softcap is not None) == (arch == "Gemma2ForCausalLM")
    assert (spec.windows is not None) == arch.startswith("Gemma")
    assert (spec.layer_inv_freq is not None) == (arch == "Gemma3ForCausalLM")
    seen = {}
    hooks = [spec.input_module(i).register_forward_pre_hook(lambda mod, inp, i=i: seen.__setitem__(i, inp[0][0]))
             for i in range(len(spec.q))]
    ids = _chunks()[:1]
    out = m(input_ids=ids, output_attentions=True, use_cache=False)
    for h in hooks:
        h.remove()
    t = ids.shape[1]
    for i in (0, 1):  # Gemma: a sliding layer and a full layer
        q, k, _ = spec.project(i, seen[i])
        torch.testing.assert_close(_attention_from_qk(q, k, spec, i), out.attentions[i][0], atol=2e-5, rtol=1e-4)
    if spec.windows is not None:  # the window really masks (8 < 32 tokens)
        assert spec.windows[0] == 8 and float(out.attentions[0][0][:, t - 1, : t - 8].abs().max()) == 0.0


def test_analyze_labels_what_it_measured(tmp_path):
    """OLMo-2 (post-norms, q/k norms over the whole projection): the projections read the raw residual,
    and the key-norm ratio is taken after the key norm (the raw projection's ratio reads ~100x higher)."""
    m = implanted_decoder("Olmo2ForCausalLM", attn_implementation="eager")
    ids = torch.cat(token_batches(n=1, batch=2, seq=32, seed=3))
    f = analyze_model(m, ids, restoration=False)
    assert f["projection_input"].startswith("raw residual stream (post-norm layout")
    assert f["geometry"]["keys_measured"].startswith("after the q/k norms")
    layer = EMERGENCE + 1
    ratio = max(f["geometry"]["key_norm_ratio"][layer])
    spec = attention_spec(get_adapter(m))
    seen = {}
    h = spec.input_module(layer).register_forward_pre_hook(lambda mod, inp: seen.setdefault("x", inp[0][0]))
    with torch.no_grad():
        m(input_ids=ids[:1])
    h.remove()
    sink = ids[0] == SINK_ID
    raw = max(norm_ratio(spec.k[layer](seen["x"]).view(32, spec.num_kv_heads, -1), sink)).item()
    normed = max(norm_ratio(spec.project(layer, seen["x"])[1], sink)).item()
    assert raw > 10 * normed and ratio == pytest.approx(normed, rel=0.3)
    text = summary_text(f)
    assert "sinks' raw residual stream" in text and "keys after the q/k norms" in text
    llama = analyze_model(implanted_decoder(attn_implementation="eager"), ids, restoration=False)
    assert llama["projection_input"] == "normalized attention input"
    assert llama["geometry"]["keys_measured"] == "the projections' outputs (no q/k norm)"
