"""Implanted sink mechanisms beyond the MLP-born first-token spike (issue 11 item 3), on tiny decoders.

Each model is built so that the true sink set of any input is known (``tests/sinkmodels.py``):

* *attention-born*: head 0 of the emergence layer attends to itself on the trigger token and writes
  the spike through ``o_proj`` (no MLP neuron fires at the emergence layer); sinks anywhere in the text;
* *always-on outlier channel*: one residual channel large on every token (an outlier feature): its
  tokens are not sinks, the report says so and why; smoothing / rotation is the cure;
* *outlier channel over a residual-only sink*: with post-norms and weak neurons the spike is visible in
  the residual stream only, and the always-on channel lifts every token's norm: only the per-channel
  baseline keeps the sink apart;
* *content sinks at delimiters*: two token ids ("." / "\\n") become sinks wherever they stand, never
  at the first position: detected by content at each occurrence, templates applied there.
"""
from __future__ import annotations

import copy

import pytest
import torch

import vtquant
from vtquant.config import Recipe, method_recipe
from vtquant.core.quant import QuantLinear

from sinkmodels import (ALWAYS_ON_CHANNEL, DELIMITER_IDS, SINK_ID, SPIKE_CHANNEL, SPIKE_VALUE, implanted_decoder,
                        token_batches)

pytestmark = pytest.mark.usefixtures("one_thread")

NORM_NOISE = 0.3
NO_QUANT = Recipe(method="insertquant", weights=None, activations=None)
EMERGENCE, CANCELLATION = 2, 4


def _truth(ids: torch.Tensor, sink_ids, first_token: bool) -> list:
    out = []
    for row in ids:
        pos = sum((row == s) for s in sink_ids).nonzero().flatten().tolist()
        out.append(sorted(set(pos) | ({0} if first_token else set())))
    return out


def _quantize(model, recipe, calib):
    q = copy.deepcopy(model)
    return q, vtquant.quantize_(q, recipe, calib, quiet=True)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _centered_error(ref, model, batches) -> float:
    """Relative L2 error of the logits with each row's mean over the vocabulary removed (shift-free)."""
    num = den = 0.0
    for x in batches:
        a, b = _logits(ref, x), _logits(model, x)
        a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
        num += float((a - b).pow(2).sum())
        den += float(a.pow(2).sum())
    return (num / den) ** 0.5


def _token_errors(ref, model, ids) -> torch.Tensor:
    """Per-token relative error of the logits ``[B, T]``."""
    a, b = _logits(ref, ids), _logits(model, ids)
    return (a - b).norm(dim=-1) / a.norm(dim=-1)


def _residual(model, ids, layer):
    seen = {}
    h = model.model.layers[layer].register_forward_hook(
        lambda m, i, o: seen.setdefault("h", o[0] if isinstance(o, tuple) else o))
    _logits(model, ids)
    h.remove()
    return seen["h"]


# ---------------------------------------------------------------------------------------------
# a spike born by the attention output
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM", "Gemma2ForCausalLM"])
def test_attention_born_spike(arch, capsys):
    fp = implanted_decoder(arch, norm_noise=NORM_NOISE, mechanism="attention")
    # every row starts with the sink token, as in calibration (the known first-token sink)
    ids = token_batches(n=1, batch=2, seed=8, sink_positions=((0, 11), (0, 4, 20)))[0]
    truth = _truth(ids, (SINK_ID,), first_token=True)
    h = _residual(fp, ids, EMERGENCE)[..., SPIKE_CHANNEL]  # written for the sink alone, wherever it stands
    assert _truth(ids, (SINK_ID,), False) == [(r.abs() > SPIKE_VALUE / 2).nonzero().flatten().tolist() for r in h]

    calib = token_batches(sink_positions=((0,), (0, 5)))
    q, report = _quantize(fp, method_recipe("insertquant", Recipe()), calib)
    assert report.probe_max_ratio[EMERGENCE] < 64  # no MLP activation is massive where the spike is born
    stage = f"stage1.input.self_attn.o_proj{EMERGENCE}"  # caught at the o_proj input where the head writes it
    assert q.vtquant.plan.sinks.site(stage) == "input:self_attn.o_proj" and report.stages[stage] == EMERGENCE
    assert (report.emergence_layer, report.cancellation_layer) == (EMERGENCE, CANCELLATION)
    row = next(p for p in report.probes if p["decision"].startswith(stage))
    assert row["site"] == "input:self_attn.o_proj" and row["max_ratio"] > 64 and "called sinks" in row["why"]
    table = report.detection_table()  # every probe, one line each, with its decision and why
    assert len(table.splitlines()) == len(report.probes) + 1 and row["why"] in table
    quiet = [p for p in report.probes if p["decision"] == "no outlier"]
    assert quiet and all(p["why"].endswith("no token called a sink here") and p["max_ratio"] <= p["fence"]
                         for p in quiet)
    _logits(q, ids)
    assert q.vtquant.sink_positions() == truth
    found = [r.nonzero().flatten().tolist() for r in q.vtquant.state.found_by[stage]]
    assert found == truth  # by content, at every position (a first token is massive there too: it attends to itself)

    naive, _ = _quantize(fp, method_recipe("naive-static", Recipe()), calib)
    rotated, _ = _quantize(fp, method_recipe("insertquant+rotate", Recipe()), calib)
    evals = token_batches(n=2, seed=13, sink_positions=((0,), (0, 5)))
    err_i, err_n = _centered_error(fp, q, evals), _centered_error(fp, naive, evals)
    with capsys.disabled():  # +rotate measured, not asserted (BENCHMARKS.md: the implant's large o_proj column)
        print(f"\n[mechanisms] attention-born {arch}: W8A8 naive-static {err_n:.4f}, insertquant {err_i:.4f}, "
              f"insertquant+rotate {_centered_error(fp, rotated, evals):.4f}")
    assert err_i < err_n / 2

    # quantization off: the mid-sequence sinks' own logits carry what the template leaves out (their
    # context); every other token within 2 % (they read the sinks' inserted keys / values)
    off, rep_off = _quantize(fp, NO_QUANT, calib)
    errs = _token_errors(fp, off, ids)
    mask = torch.zeros_like(errs, dtype=torch.bool)
    for b, pos in enumerate(truth):
        mask[b, pos] = True
    with capsys.disabled():
        print(f"[mechanisms] attention-born {arch}, quantization off: sinks {float(errs[mask].max()):.3f}, "
              f"other tokens {float(errs[~mask].max()):.2e}, check {rep_off.equivalence['sinks']['output_error']:.3f}")
    assert float(errs[~mask].max()) < 2e-2 and rep_off.equivalence["sinks"]["output_error"] < 1.0


# ---------------------------------------------------------------------------------------------
# an always-on outlier channel
# ---------------------------------------------------------------------------------------------
def test_always_on_channel_is_reported_not_a_sink(capsys):
    fp = implanted_decoder("LlamaForCausalLM", norm_noise=NORM_NOISE, always_on=1.0)
    calib = token_batches(sink_positions=((0,), (0, 5)))
    q, report = _quantize(fp, method_recipe("insertquant", Recipe()), calib)
    # exactly the implanted sinks (the channel lifts every token; none of them is called a sink)
    truth_calib = []
    for x in calib:
        truth_calib += _truth(x, (SINK_ID,), first_token=True)
    assert report.calib_sink_positions == truth_calib
    ids = token_batches(n=1, batch=3, seed=8, sink_positions=((0,), (0, 11), (0, 4, 20)))[0]
    _logits(q, ids)
    assert q.vtquant.sink_positions() == _truth(ids, (SINK_ID,), first_token=True)
    # the report saw the channel, says it is not a sink and why
    rows = [p for p in report.probes if p["site"] == "residual"]
    assert rows and all(any(c["channel"] == ALWAYS_ON_CHANNEL for c in p["outlier_channels"]) for p in rows)
    chan = next(c for c in rows[0]["outlier_channels"] if c["channel"] == ALWAYS_ON_CHANNEL)
    assert chan["tokens_share"] > 0.9 and chan["times_typical"] > 8
    assert "not sinks" in rows[0]["why"] and "per-channel baseline" in rows[0]["why"]
    text = report.summary()
    assert f"outlier channel {ALWAYS_ON_CHANNEL} at block outputs" in text and "not sinks" in text

    # the cure is smoothing / rotation (per channel), not templates (per token).  After the RMSNorm the
    # channel is bounded (~sqrt(d)), so on this tiny model it costs little: the gains are small but real
    evals = token_batches(n=2, seed=13, sink_positions=((0,), (0, 5)))
    errs = {}
    for method in ("naive-static", "smoothquant", "insertquant", "insertquant+rotate"):
        qm, _ = _quantize(fp, method_recipe(method, Recipe()), calib)
        errs[method] = _centered_error(fp, qm, evals)
    with capsys.disabled():
        print("\n[mechanisms] always-on channel, W8A8: " + ", ".join(f"{k} {v:.4f}" for k, v in errs.items()))
    assert errs["smoothquant"] < errs["naive-static"] and errs["insertquant+rotate"] < errs["insertquant"]


def test_outlier_channel_does_not_hide_a_residual_only_sink():
    """Gemma-2, weak neurons: the spike is in the residual stream only (post-norm scale), and a channel
    large on every token makes the sink's plain norm ratio fall under the fence; the per-channel
    baseline keeps it far above."""
    fp = implanted_decoder("Gemma2ForCausalLM", norm_noise=NORM_NOISE, weak_neurons=True, always_on=15.0)
    calib = token_batches(sink_positions=((0,), (0, 5)))
    q, report = _quantize(fp, NO_QUANT, calib)
    assert max(report.probe_max_ratio) < 64 and report.detection_rule == "relative"
    main = next(p for p in report.probes if p["decision"].startswith("stage2"))
    assert main["site"] == "residual" and main["layer"] == EMERGENCE
    assert main["max_ratio_without_baseline"] < main["fence"] < main["max_ratio"] / 10
    assert any(c["channel"] == ALWAYS_ON_CHANNEL for c in main["outlier_channels"])
    ids = token_batches(n=1, batch=3, seed=8, sink_positions=((0,), (0, 11), (0, 4, 20)))[0]
    _logits(q, ids)
    assert q.vtquant.sink_positions() == _truth(ids, (SINK_ID,), first_token=True)


@pytest.mark.parametrize("arch", ["Gemma2ForCausalLM", "Gemma3ForCausalLM"])
def test_residual_only_spike_of_a_post_norm_family(arch):
    fp = implanted_decoder(arch, norm_noise=NORM_NOISE, weak_neurons=True)
    q, report = _quantize(fp, method_recipe("insertquant", Recipe()), token_batches(sink_positions=((0,), (0, 5))))
    assert max(report.probe_max_ratio) < 64  # no Linear input shows it massively
    assert report.detection_rule == "relative" and q.vtquant.plan.sinks.site("stage2") == "residual"
    assert report.emergence_layer == EMERGENCE
    ids = token_batches(n=1, batch=3, seed=8, sink_positions=((0,), (0, 11), (0, 4, 20)))[0]
    _logits(q, ids)
    assert q.vtquant.sink_positions() == _truth(ids, (SINK_ID,), first_token=True)


# ---------------------------------------------------------------------------------------------
# content sinks at delimiters
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen3ForCausalLM"])
def test_delimiter_content_sinks(arch, capsys):
    fp = implanted_decoder(arch, norm_noise=NORM_NOISE, sink_ids=DELIMITER_IDS)
    calib = token_batches(sink_positions=((3, 17), (9, 25, 30)), sink_ids=DELIMITER_IDS)
    q, report = _quantize(fp, method_recipe("insertquant", Recipe()), calib)
    # the first token is never a delimiter here: the known first-token sink is not confirmed, not used
    assert report.known_sinks == [] and any("not used" in n for n in report.notes)
    assert report.emergence_layer == EMERGENCE
    ids = token_batches(n=1, batch=3, seed=8, sink_positions=((1, 6), (12,), (2, 13, 27, 31)),
                        sink_ids=DELIMITER_IDS)[0]
    truth = _truth(ids, DELIMITER_IDS, first_token=False)
    assert [len(t) for t in truth] == [2, 1, 4]
    _logits(q, ids)
    assert q.vtquant.sink_positions() == truth

    # templates applied there: with quantization off, the emergence layer's down-projection outputs the
    # template at every delimiter and its own product elsewhere
    off, rep_off = _quantize(fp, NO_QUANT, calib)
    assert rep_off.layer_modes[EMERGENCE] == "template"
    down = off.model.layers[EMERGENCE].mlp.down_proj
    assert isinstance(down, QuantLinear) and down.guard.mode == "template"
    seen = {}
    hook = down.register_forward_hook(lambda m, i, o: seen.update(x=i[0].detach(), y=o.detach()))
    errs = _token_errors(fp, off, ids)
    hook.remove()
    types = off.vtquant.state.types
    mask = torch.zeros_like(errs, dtype=torch.bool)
    for b, pos in enumerate(truth):
        mask[b, pos] = True
        for p in pos:
            torch.testing.assert_close(seen["y"][b, p], down.guard.template_out[int(types[b, p])].to(seen["y"]))
    plain = torch.nn.functional.linear(seen["x"], down.weight, down.bias)
    torch.testing.assert_close(seen["y"][~mask], plain[~mask])
    with capsys.disabled():
        print(f"\n[mechanisms] delimiters {arch}, quantization off: delimiters {float(errs[mask].max()):.3f}, "
              f"other tokens {float(errs[~mask].max()):.2e}")
    assert float(errs[~mask].max()) < 1e-2  # the others read the delimiters' inserted keys / values

    naive, _ = _quantize(fp, method_recipe("naive-static", Recipe()), calib)
    evals = token_batches(n=2, seed=13, sink_positions=((3, 17), (9, 25, 30)), sink_ids=DELIMITER_IDS)
    err_i, err_n = _centered_error(fp, q, evals), _centered_error(fp, naive, evals)
    with capsys.disabled():
        print(f"\n[mechanisms] delimiters {arch}: W8A8 naive-static {err_n:.4f}, insertquant {err_i:.4f}")
    assert err_i < err_n / 2


def test_input_site_stage_survives_save_and_load(tmp_path):
    """A detection stage at an ``o_proj`` input (site ``input:self_attn.o_proj``) is rebuilt from the plan."""
    fp = implanted_decoder("LlamaForCausalLM", norm_noise=NORM_NOISE, mechanism="attention")
    q, report = _quantize(fp, method_recipe("insertquant", Recipe()), token_batches(sink_positions=((0,), (0, 5))))
    assert "input:self_attn.o_proj" in q.vtquant.plan.sinks.sites.values()
    loaded = vtquant.load(vtquant.save(q, tmp_path / "ckpt"))
    ids = token_batches(n=1, batch=2, seed=8, sink_positions=((0, 11), (0, 4, 20)))[0]
    torch.testing.assert_close(_logits(loaded, ids), _logits(q, ids), rtol=0, atol=0)
    assert loaded.vtquant.sink_positions() == q.vtquant.sink_positions() == _truth(ids, (SINK_ID,), True)
    assert loaded.model.layers[EMERGENCE].self_attn.o_proj.detector is not None


def test_cancelling_mlp_with_the_largest_probe_ratio_keeps_emergence_and_cancellation():
    """The fixed rule's stage 2 is the probe with the largest ratio.  When that is the input of the MLP that
    cancels the spike (the last block here), stage 1 still separates the sinks at the emergence block: the
    emergence layer is that block and the cancellation search finds the cancelling block, whose residual is
    then restored (before, emergence was the last block and there was no cancellation layer)."""
    from vtquant.bench_e2e import implanted_llama, token_batches as llama_batches

    model = implanted_llama("small", 5, "cpu", torch.float32)  # emergence 1, cancellation 4 (the last block)
    report = vtquant.quantize_(model, method_recipe("insertquant", Recipe()),
                               llama_batches(2, 64, model.config.vocab_size, seed=1), quiet=True)
    assert report.stages["stage2"] == 4 and report.stages["stage1"] == 1  # the largest ratio is the late probe
    assert report.emergence_layer == 1 and report.cancellation_layer == 4
    assert report.restore_layer == 4
