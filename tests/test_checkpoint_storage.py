"""Compact on-disk embedding / head storage (vtquant.save(..., compact_embeddings=...))."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors import safe_open

import vtquant
from vtquant.config import Recipe, method_recipe
from vtquant.storage import int8_rows

from sinkmodels import implanted_decoder, token_batches


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread, immune to contention


@pytest.fixture(scope="module")
def fp_model():
    # a larger vocabulary than hidden width, as in real LLMs (the table dominates the checkpoint)
    return implanted_decoder(vocab_size=512)


@pytest.fixture(scope="module", params=["insertquant", "insertquant+rotate"])
def quantized(request, fp_model):
    q = copy.deepcopy(fp_model)
    vtquant.quantize_(q, method_recipe(request.param, Recipe()), token_batches(), quiet=True)
    return request.param, q


@pytest.mark.parametrize("fmt", ["int8", "bf16"])
def test_compact_tables_round_trip(quantized, tmp_path, fmt):
    method, q = quantized
    full = vtquant.save(q, tmp_path / "full")
    path = vtquant.save(q, tmp_path / fmt, compact_embeddings=fmt)
    full_size, size = (os.path.getsize(p / "model.safetensors") for p in (full, path))
    emb = q.model.embed_tokens.weight
    # the table is stored once (tied, or the rotated head derived from it) at 1 or 2 bytes a value
    assert size < full_size - emb.numel() * (2.9 if fmt == "int8" else 1.9) * (2 if "rotate" in method else 1)
    storage = json.loads((path / "vtquant.json").read_text())["storage"]["tensors"]
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == ("I8" if fmt == "int8" else "BF16")
    assert "lm_head.weight" not in keys  # tied: stored once; rotated: rebuilt from the embedding
    if "rotate" in method:
        assert storage["lm_head.weight"]["format"] == "linear-from"
        assert storage["lm_head.weight"]["fit_residual"] < 1e-5

    loaded = vtquant.load(path)
    if fmt == "int8":
        codes, scale = int8_rows(emb)
        expected = codes.float() * scale.unsqueeze(1)
    else:
        expected = emb.detach().to(torch.bfloat16).float()
    torch.testing.assert_close(loaded.model.embed_tokens.weight, expected, atol=0, rtol=0)
    head_err = (loaded.lm_head.weight - q.lm_head.weight).norm() / q.lm_head.weight.norm()
    assert head_err < (1.5e-2 if fmt == "int8" else 5e-3)  # per-row int8: ~0.6 % of a Gaussian row
    # nothing else changed: every other tensor is bit-identical
    ref = q.state_dict()
    for key, value in loaded.state_dict().items():
        if key not in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(value, ref[key]), key
    x = token_batches(n=1, seed=21, vocab=512)[0]
    with torch.no_grad():
        diff = (loaded(input_ids=x).logits - q(input_ids=x).logits).abs().max().item()
    assert diff < 0.1
    # a compact checkpoint loads, saves and loads again to the same model
    again = vtquant.load(vtquant.save(loaded, tmp_path / "again", compact_embeddings=fmt))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=x).logits, loaded(input_ids=x).logits, atol=1e-5, rtol=0)


def test_unknown_compact_format(quantized, tmp_path):
    with pytest.raises(ValueError, match="int8"):
        vtquant.save(quantized[1], tmp_path / "x", compact_embeddings="fp4")
    assert not (tmp_path / "x").exists()
