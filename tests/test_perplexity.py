"""Perplexity against the HF model's own loss, BOS policies, chunking errors, and results JSON."""
from __future__ import annotations

import json
import math

import pytest
import torch
import transformers

from vtquant.adapters.hf_decoder import tiny_config
from vtquant.config import Recipe, method_recipe
from vtquant.eval.perplexity import make_chunks, perplexity, protocol
from vtquant.eval.results import Row, format_table, row_for, write_results

REQUIRED_KEYS = {"model", "method", "w_bits", "a_bits", "act_granularity", "static", "metric", "value", "seconds"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread, immune to contention


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(tiny_config()).eval()


@pytest.fixture(scope="module")
def stream():
    return torch.randint(1, 64, (5 * 16 + 7,), generator=torch.Generator().manual_seed(2))


@torch.no_grad()
def _hf_mean_loss(model, chunks: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over chunks of the model's own loss (every chunk scores the same number of tokens)."""
    losses = [float(model(input_ids=c[None], labels=l[None]).loss) for c, l in zip(chunks, labels)]
    return sum(losses) / len(losses)


def test_perplexity_equals_exp_of_hf_loss(model, stream):
    chunks = make_chunks(stream, 16, None)
    assert chunks.shape == (5, 16)  # the 7-token remainder is dropped
    assert torch.equal(chunks.flatten(), stream[:80])
    expected = math.exp(_hf_mean_loss(model, chunks, chunks))
    for batch_size in (1, 2, 5):  # uneven last batch with 2
        assert perplexity(model, chunks, batch_size=batch_size, quiet=True) == pytest.approx(expected, rel=1e-5)
    # max_chunks keeps the first chunks
    first3 = make_chunks(stream, 16, 3)
    assert torch.equal(first3, chunks[:3])
    assert perplexity(model, first3, quiet=True) == pytest.approx(
        math.exp(_hf_mean_loss(model, first3, first3)), rel=1e-5)


def test_bos_prepend_scores_every_text_token(model, stream):
    bos = 0
    chunks = make_chunks(stream, 16, None, bos="prepend", bos_id=bos)
    assert chunks.shape == (5, 16)
    assert bool((chunks[:, 0] == bos).all())
    assert torch.equal(chunks[:, 1:].flatten(), stream[:75])  # bodies of 15 tokens, consecutive
    # every text token is a target (the first one predicted from the BOS); the BOS never is
    expected = math.exp(_hf_mean_loss(model, chunks, chunks))
    assert perplexity(model, chunks, batch_size=2, quiet=True) == pytest.approx(expected, rel=1e-5)
    # without the BOS the first text token of each chunk cannot be scored
    bodies = chunks[:, 1:]
    unscored_first = math.exp(_hf_mean_loss(model, bodies, bodies))
    assert perplexity(model, bodies, quiet=True) == pytest.approx(unscored_first, rel=1e-5)


def test_make_chunks_errors(stream):
    with pytest.raises(ValueError, match="BOS policy 'append'"):
        make_chunks(stream, 16, None, bos="append")
    with pytest.raises(ValueError, match="BOS"):
        make_chunks(stream, 16, None, bos="prepend", bos_id=None)
    with pytest.raises(ValueError, match="seq_len"):
        make_chunks(stream[:10], 16, None)
    with pytest.raises(ValueError):
        make_chunks(stream, 0, None)
    with pytest.raises(ValueError):
        make_chunks(stream.view(1, -1), 16, None)


def test_protocol_states_the_policy():
    text = protocol(512, 8, "prepend")
    assert "512" in text and "8" in text and "prepend" in text and "non-overlapping" in text


def test_write_results(tmp_path):
    rows = [
        row_for(None, "tiny", "perplexity", 12.5, 0.25),
        row_for(method_recipe("insertquant+rotate", Recipe()), "tiny", "perplexity", 13.0, 1.5, chunks=5),
        row_for(method_recipe("dynamic-token", Recipe(), w_bits=4), "tiny", "perplexity", 14.0, 1.0),
    ]
    path = tmp_path / "out" / "results.json"
    write_results(str(path), rows, protocol="p", seq_len=16)
    data = json.loads(path.read_text())
    assert data["protocol"] == "p" and data["seq_len"] == 16
    assert len(data["rows"]) == 3
    for row in data["rows"]:
        assert REQUIRED_KEYS <= set(row), REQUIRED_KEYS - set(row)
    fp, rot, dyn = data["rows"]
    assert fp == {"model": "tiny", "method": "fp", "w_bits": None, "a_bits": None, "act_granularity": None,
                  "static": None, "metric": "perplexity", "value": 12.5, "seconds": 0.25}
    assert (rot["method"], rot["w_bits"], rot["a_bits"], rot["act_granularity"], rot["static"], rot["chunks"]) == \
        ("insertquant+rotate", 8, 8, "per-tensor", True, 5)
    assert (dyn["method"], dyn["w_bits"], dyn["act_granularity"], dyn["static"]) == ("dynamic-token", 4, "per-token", False)
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # atomic: no temp file left

    table = format_table([Row(**{k: fp[k] for k in REQUIRED_KEYS})], reference=12.5)
    assert "| fp |" in table and "1.000" in table
