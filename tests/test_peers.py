"""Peer methods beside insertquant (smoothquant, prefix, rotate) and `vtquant compare`, on tiny implanted models."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import vtquant
from vtquant.adapters import get_adapter
from vtquant.config import ConfigError, Recipe, method_recipe
from vtquant.core.quant import QuantLinear
from vtquant.core.smooth import smooth_model_
from vtquant.recipe import recipe_from_dict

from sinkmodels import SINK_ID, implanted_decoder, token_batches, rel_logit_error

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sink_model():
    return implanted_decoder()




def _quantized(model, method, calib=None, **kw):
    q = copy.deepcopy(model)
    vtquant.quantize_(q, method_recipe(method, Recipe(**kw)), calib or token_batches(), quiet=True)
    return q


# ---------------------------------------------------------------------------------------------
# recipes
# ---------------------------------------------------------------------------------------------
def test_method_names_and_alpha_field():
    r = method_recipe("rotate", Recipe())
    assert r.method == "naive-static" and r.rotation.enabled and r.display_method == "rotate"
    assert r.name == "rotate-w8a8"
    s = method_recipe("smoothquant", Recipe(smoothquant_alpha=0.8), w_bits=4)
    assert s.method == "smoothquant" and s.smoothquant_alpha == 0.8 and s.activations.static
    assert method_recipe("prefix", Recipe()).display_method == "prefix"
    for bad in (-0.1, 1.5, True, "x"):
        with pytest.raises(ConfigError, match="smoothquant_alpha"):
            Recipe(smoothquant_alpha=bad)
    # old recipes (no smoothquant_alpha key) stay valid; the key is accepted in YAML dicts
    assert recipe_from_dict({"version": 1, "method": "insertquant"}).smoothquant_alpha == 0.5
    assert recipe_from_dict({"version": 1, "method": "smoothquant", "smoothquant_alpha": 0.7}).smoothquant_alpha == 0.7
    with pytest.raises(ConfigError, match="unknown method"):
        method_recipe("gptq", Recipe())


# ---------------------------------------------------------------------------------------------
# smoothquant
# ---------------------------------------------------------------------------------------------
def test_smoothing_is_exact_in_float(sink_model):
    model = copy.deepcopy(sink_model).double()
    ref = copy.deepcopy(model)
    calib = token_batches()
    adapter = get_adapter(model)
    norm0 = model.model.layers[0].input_layernorm.weight.detach().clone()
    q0 = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    info = smooth_model_(adapter.rotation_spec(), lambda: [model(input_ids=x) for x in calib], alpha=0.5)
    assert info["groups"] == 2 * len(model.model.layers)
    assert not torch.allclose(norm0, model.model.layers[0].input_layernorm.weight)  # something was moved
    assert not torch.allclose(q0, model.model.layers[0].self_attn.q_proj.weight)
    evals = token_batches(n=2, seed=9)
    with torch.no_grad():
        for x in evals:
            torch.testing.assert_close(model(input_ids=x).logits, ref(input_ids=x).logits, rtol=1e-9, atol=1e-9)


def test_smoothing_equalises_channel_ranges(sink_model):
    """After smoothing with alpha, max|X_j| / max|W_j| is the same for every channel (SmoothQuant's balance)."""
    model = copy.deepcopy(sink_model).double()
    calib = token_batches()
    norm = model.model.layers[3].post_attention_layernorm
    readers = [model.model.layers[3].mlp.gate_proj, model.model.layers[3].mlp.up_proj]
    smooth_model_(get_adapter(model).rotation_spec(), lambda: [model(input_ids=x) for x in calib], alpha=0.5)
    seen = []
    h = norm.register_forward_hook(lambda m, i, o: seen.append(o.abs().reshape(-1, o.shape[-1]).amax(0)))
    with torch.no_grad():
        for x in calib:
            model(input_ids=x)
    h.remove()
    x_max = torch.stack(seen).amax(0)
    w_max = torch.stack([r.weight.abs().amax(0) for r in readers]).amax(0)
    # alpha = 0.5: after smoothing max|X_j| = max|W_j| = sqrt(max|X_j| max|W_j|) for every channel
    torch.testing.assert_close(x_max, w_max, rtol=1e-6, atol=1e-9)


def test_smoothquant_vs_naive_static_on_the_implanted_sink(sink_model, capsys):
    """The implanted sink's spike sits at the MLP down-projection input (after the GLU), which has no
    norm in front of it, so SmoothQuant cannot smooth it: its static scale there is still set by the
    sink, and its error stays at naive-static's level, far above insertquant / prefix.  This is the
    docs/method.md distinction (smoothing fixes always-on outlier channels, not sink tokens); the next test
    shows the case smoothing does fix."""
    evals = token_batches(n=3, seed=21)
    naive, smooth = _quantized(sink_model, "naive-static"), _quantized(sink_model, "smoothquant")
    insert = _quantized(sink_model, "insertquant")
    e_naive, e_smooth, e_insert = (rel_logit_error(sink_model, m, evals) for m in (naive, smooth, insert))
    with capsys.disabled():
        print(f"\n[W8A8 implanted sink] rel L2: naive-static {e_naive:.4f}, smoothquant {e_smooth:.4f}, "
              f"insertquant {e_insert:.4f}")
    d_naive = float(naive.model.layers[2].mlp.down_proj.act.scale)
    d_smooth = float(smooth.model.layers[2].mlp.down_proj.act.scale)
    assert d_smooth == pytest.approx(d_naive, rel=0.02)  # the sink's range is untouched by smoothing
    assert e_smooth == pytest.approx(e_naive, rel=0.25)
    assert e_smooth > 3 * e_insert


def test_smoothquant_fixes_an_always_on_outlier_channel(capsys):
    """An LLM.int8()-style outlier feature: one norm-output channel x50 on every token (readers /50,
    same function).  Per-tensor static W8A8 loses the other channels; smoothquant brings them back."""
    model = implanted_decoder(seed=3)
    with torch.no_grad():
        for block in model.model.layers:
            for norm, readers in ((block.input_layernorm, (block.self_attn.q_proj, block.self_attn.k_proj,
                                                           block.self_attn.v_proj)),
                                  (block.post_attention_layernorm, (block.mlp.gate_proj, block.mlp.up_proj))):
                norm.weight[11] *= 50.0
                for lin in readers:
                    lin.weight[:, 11] /= 50.0
    calib, evals = token_batches(sink_positions=((),)), token_batches(n=3, seed=21, sink_positions=((),))
    e_naive = rel_logit_error(model, _quantized(model, "naive-static", calib), evals)
    e_smooth = rel_logit_error(model, _quantized(model, "smoothquant", calib), evals)
    with capsys.disabled():
        print(f"\n[W8A8 outlier channel] rel L2: naive-static {e_naive:.4f}, smoothquant {e_smooth:.4f}")
    assert e_smooth < e_naive / 3


# ---------------------------------------------------------------------------------------------
# prefix
# ---------------------------------------------------------------------------------------------
def test_prefix_keeps_sink_rows_exact(sink_model, capsys):
    q = _quantized(sink_model, "prefix")
    lins = [m for m in q.modules() if isinstance(m, QuantLinear)]
    assert all(m.guard is not None and m.guard.mode == "fp-row" for m in lins)
    assert q.vtquant.plan.sinks.restore_layer is None and not q.vtquant.plan.sinks.det_templates
    records = []
    handles = [m.register_forward_hook(lambda m, i, o: records.append((m, i[0].detach(), o.detach())))
               for m in lins]
    x = token_batches(n=1, seed=33)[0]
    with torch.no_grad():
        q(input_ids=x)
    for h in handles:
        h.remove()
    assert len(records) == len(lins)
    worst_sink, worst_other = 0.0, 0.0
    for m, inp, out in records:
        ref = F.linear(inp, m.dequantized_weight(), m.bias)  # full-precision activations, W8 weights
        worst_sink = max(worst_sink, float((out[:, 0] - ref[:, 0]).abs().max() / ref[:, 0].abs().max()))
        worst_other = max(worst_other, float((out[:, 1:] - ref[:, 1:]).abs().max() / ref[:, 1:].abs().max()))
    assert worst_sink < 1e-5  # the sink row is exactly the Linear of its input
    assert worst_other > 1e-3  # the other rows are quantized
    # static scales ignore the sink rows (as insertquant), unlike naive-static
    naive = _quantized(sink_model, "naive-static")
    assert float(q.model.layers[2].mlp.down_proj.act.scale) < float(naive.model.layers[2].mlp.down_proj.act.scale) / 100
    evals = token_batches(n=3, seed=21)
    e_prefix, e_naive = rel_logit_error(sink_model, q, evals), rel_logit_error(sink_model, naive, evals)
    with capsys.disabled():
        print(f"\n[W8A8 implanted sink] rel L2: prefix {e_prefix:.4f}, naive-static {e_naive:.4f}")
    assert e_prefix < e_naive / 3


def test_prefix_and_smoothquant_checkpoints_round_trip(sink_model, tmp_path):
    x = token_batches(n=1, seed=4)[0]
    for method in ("prefix", "smoothquant"):
        q = _quantized(sink_model, method)
        vtquant.save(q, tmp_path / method)
        loaded = vtquant.load(tmp_path / method)
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=x).logits, q(input_ids=x).logits, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# vtquant compare
# ---------------------------------------------------------------------------------------------
def test_compare_settings_parse():
    from vtquant.cli import compare_settings

    out = compare_settings("fp,naive-static,rotate", "W8A8,w4a8kv4")
    assert out == [("fp", 8, 8, None), ("naive-static", 8, 8, None), ("rotate", 8, 8, None),
                   ("naive-static", 4, 8, 4), ("rotate", 4, 8, 4)]
    with pytest.raises(ConfigError, match="W8A8"):
        compare_settings("fp", "8x8")
    with pytest.raises(ConfigError, match="W4A8KV8"):
        compare_settings("fp", "W8A8KV")
    with pytest.raises(ConfigError, match="unknown"):
        compare_settings("fp,awq", "W8A8")


def test_compare_end_to_end(sink_model, tmp_path, monkeypatch, capsys):
    import vtquant.cli as cli
    import vtquant.llm as llm
    from vtquant.cli import main

    def fake_load(args, log, **kw):
        return copy.deepcopy(sink_model), None, "tiny-implanted"

    def fake_prepare(tok, recipe, *a, **kw):
        evals = torch.cat(token_batches(n=2, seed=21, seq=32))
        return llm.TextSetup(token_batches(), evals, "4 x 32 tokens", "4 x 2 windows", "random ids")

    monkeypatch.setattr(cli, "_load", fake_load)
    monkeypatch.setattr(llm, "prepare_text", fake_prepare)
    monkeypatch.setattr(cli, "llmcompressor_available", lambda: False)  # its rows: test_llmcompressor_peer.py
    res, png = tmp_path / "c.json", tmp_path / "plots" / "c.png"
    rc = main(["compare", "--quiet", "--settings", "W8A8,W8A6", "--results-file", str(res), "--plot", str(png)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| method | W | A |" in text and "peak RSS MiB" in text
    rows = json.loads(res.read_text())["rows"]
    names = ["fp", "naive-static", "dynamic-token", "smoothquant", "prefix", "rotate", "insertquant",
             "insertquant+rotate"]
    assert [r["method"] for r in rows] == names + names[1:]
    assert [r["a_bits"] for r in rows[1:]] == [8] * 7 + [6] * 7
    for r in rows:
        assert r["calib_seconds"] >= 0 and r["eval_seconds"] >= 0 and r["peak_rss_mb"] > 0
        assert f"| {r['method']} |" in text
    # (a random tiny model on random ids: every perplexity is near the vocabulary size, no ranking to test)
    assert all(0 < r["value"] < float("inf") for r in rows) and rows[0]["w_bits"] is None
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in png.parent.iterdir() if p.name != "c.png"]  # atomic: no temp file left


def test_compare_settings_llmcompressor_rows(monkeypatch):
    import vtquant.cli as cli
    from vtquant.cli import compare_settings

    monkeypatch.setattr(cli, "llmcompressor_available", lambda: True)
    out = compare_settings(None, "W8A8,W4A8KV8")
    llmc = [s for s in out if s[0].startswith("llmcompressor-")]
    assert llmc == [("llmcompressor-sq-static", 8, 8, None), ("llmcompressor-sq-gptq-dynamic", 8, 8, None)]
    assert out[0] == ("fp", 8, 8, None) and ("insertquant+rotate", 4, 8, 8) in out
    with pytest.raises(ConfigError, match="W8A8 recipes"):
        compare_settings("fp,llmcompressor-sq-static", "W4A8")
    monkeypatch.setattr(cli, "llmcompressor_available", lambda: False)
    assert not [s for s in compare_settings(None, "W8A8") if s[0].startswith("llmcompressor-")]
    with pytest.raises(ConfigError, match="setup.sh --llmcompressor"):
        compare_settings("fp,llmcompressor-sq-static", "W8A8")


def test_compare_base_recipe_defaults_and_overrides(tmp_path):
    from vtquant.cli import build_parser, compare_base_recipe
    from vtquant.recipe import save_recipe

    parse = lambda *a: build_parser().parse_args(["compare", *a])  # noqa: E731
    base = compare_base_recipe(parse())
    assert (base.weights.algorithm, base.weights.granularity, base.weights.group_size) == ("auto", "per-group", 32)
    assert base.weights.clip_search and base.activations.clip_search
    w4 = method_recipe("insertquant", base, w_bits=4).weights
    w8 = method_recipe("insertquant", base, w_bits=8).weights
    assert (w4.algorithm, w4.clip_search, w8.algorithm, w8.clip_search) == ("gptq", True, "rtn", False)
    pc = compare_base_recipe(parse("--group-size", "0", "--weights", "rtn", "--clip-search", "off"))
    assert (pc.weights.granularity, pc.weights.algorithm, pc.weights.clip_search, pc.activations.clip_search) == \
        ("per-channel", "rtn", False, False)
    save_recipe(Recipe(name="mine"), tmp_path / "r.yaml")  # a recipe's own choices are kept unless overridden
    mine = compare_base_recipe(parse("--recipe", str(tmp_path / "r.yaml")))
    assert (mine.weights.algorithm, mine.weights.granularity, mine.activations.clip_search) == \
        ("rtn", "per-channel", False)


def test_compare_breakdown_cli(sink_model, tmp_path, monkeypatch, capsys):
    import vtquant.cli as cli
    import vtquant.llm as llm
    from vtquant.cli import main

    monkeypatch.setattr(cli, "_load", lambda args, log, **kw: (copy.deepcopy(sink_model), None, "tiny-implanted"))
    monkeypatch.setattr(llm, "prepare_text", lambda tok, recipe, *a, **kw: llm.TextSetup(
        token_batches(), torch.cat(token_batches(n=1, seed=21)), "2 x 32 tokens", "4 x 2 windows", "random ids"))
    res = tmp_path / "b.json"
    assert main(["compare", "--quiet", "--breakdown", "insertquant@W4A8KV8", "--results-file", str(res)]) == 0
    text = capsys.readouterr().out
    assert "| weights only |" in text and "| kv cache only |" in text and "% of all" in text
    data = json.loads(res.read_text())
    assert data["recipe"]["kv_cache"]["bits"] == 8 and len(data["parts"]["all"]["errors"]) == 6
    assert main(["compare", "--quiet", "--breakdown", "insertquant@W4"]) == 2
