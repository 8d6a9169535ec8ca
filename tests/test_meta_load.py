"""Loading a vtquant-layout checkpoint builds the model on the meta device (issue 13 item 1).

``vtquant.load`` must not allocate and randomly initialise the full-precision model before it puts the
quantized skeleton in: parameters are made on the meta device, the skeleton gets empty storage, the
file fills it.  Where that is not possible (a tensor the file does not hold would keep garbage) it
builds the model in full instead: the result must be the same either way.
"""
from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn as nn

import vtquant
import vtquant.checkpoint as ckpt
from vtquant.config import Recipe, SinkConfig, method_recipe
from vtquant.vision import quantize_clip_

import visionmodels as vm
from sinkmodels import implanted_decoder, token_batches

pytestmark = pytest.mark.usefixtures("one_thread")

FULL_BUILD = "building the model in full"


def _spy(monkeypatch) -> dict:
    seen: dict = {"materialized": 0, "unfilled": None}
    real = ckpt._materialize_meta_

    def spy(model, device):
        seen["materialized"] = sum(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
        seen["params"] = sum(p.numel() for p in model.parameters())
        seen["unfilled"] = real(model, device)
        return seen["unfilled"]

    monkeypatch.setattr(ckpt, "_materialize_meta_", spy)
    return seen


def _open_clip_quantized() -> nn.Module:
    images = [vm.make_images(vm.random_painted(8, s), seed=s) for s in range(2)]
    texts = [vm.make_texts([4 + (3 * i + s) % 12 for i in range(6)], seed=s) for s in range(2)]
    q = vm.open_clip_tiny()
    quantize_clip_(q, method_recipe("insertquant+rotate", Recipe(sinks=SinkConfig(known_sinks=["cls", "first_token",
                                                                                                "eot"]), ignore=[])),
                   images=images, texts=texts, quiet=True)
    return q


@pytest.mark.parametrize("method", ["insertquant", "insertquant+rotate"])
def test_decoder_vtquant_layout_loads_through_meta(tmp_path, monkeypatch, caplog, method):
    q = implanted_decoder()
    vtquant.quantize_(q, method_recipe(method, Recipe()), token_batches(), quiet=True)
    path = vtquant.save(q, tmp_path / "ckpt", format="vtquant")
    seen = _spy(monkeypatch)
    with caplog.at_level(logging.INFO, logger="vtquant.checkpoint"):
        loaded = vtquant.load(path)
    assert FULL_BUILD not in caplog.text
    assert seen["unfilled"] == [] and seen["materialized"] > 0  # every parameter came from meta, none was left over
    assert not any(t.is_meta for t in list(loaded.parameters()) + list(loaded.buffers()))
    ids = token_batches(n=1)[0]
    with torch.no_grad():
        assert torch.equal(q(ids).logits, loaded(ids).logits)


def test_open_clip_loads_through_meta_keeping_computed_buffers(tmp_path, monkeypatch, caplog):
    q = _open_clip_quantized()
    path = vtquant.save(q, tmp_path / "clip")
    seen = _spy(monkeypatch)
    with caplog.at_level(logging.INFO, logger="vtquant.checkpoint"):
        loaded = vtquant.load(path)
    assert FULL_BUILD not in caplog.text and seen["unfilled"] == [] and seen["materialized"] > 0
    # the text tower's causal mask is a non-persistent buffer computed by the constructor: it stayed real
    assert torch.equal(loaded.attn_mask, q.attn_mask)
    x, t = vm.make_images(vm.random_painted(4, 9), seed=9), vm.make_texts([5, 9, 3, 7], seed=9)
    with torch.no_grad():
        assert torch.equal(q.encode_image(x), loaded.encode_image(x))
        assert torch.equal(q.encode_text(t), loaded.encode_text(t))


def test_meta_build_falls_back_to_a_full_build_when_a_tensor_would_stay_empty(tmp_path, monkeypatch, caplog):
    q = implanted_decoder()
    vtquant.quantize_(q, method_recipe("insertquant", Recipe()), token_batches(), quiet=True)
    path = vtquant.save(q, tmp_path / "ckpt", format="vtquant")
    real = ckpt._materialize_meta_

    def leaves_one(model, device):  # as if the skeleton held a meta tensor outside the state dict
        model.model.register_buffer("made_on_meta", torch.zeros(3, device="meta"), persistent=False)
        return real(model, device)

    monkeypatch.setattr(ckpt, "_materialize_meta_", leaves_one)
    with caplog.at_level(logging.INFO, logger="vtquant.checkpoint"):
        loaded = vtquant.load(path)
    assert FULL_BUILD in caplog.text and "made_on_meta" in caplog.text
    assert not hasattr(loaded.model, "made_on_meta")  # the full build is a new model
    ids = token_batches(n=1)[0]
    with torch.no_grad():
        assert torch.equal(q(ids).logits, loaded(ids).logits)


def test_materialize_reports_tensors_kept_as_plain_attributes():
    m = nn.Linear(4, 4, device="meta")
    m.factors = [torch.ones(2, device="meta")]  # not a buffer: load_model would never fill it
    assert ckpt._materialize_meta_(m, "cpu") == ["factors"]
    assert not m.weight.is_meta and isinstance(m.weight, nn.Parameter)
    shared = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False)).to("meta")
    shared[1].weight = shared[0].weight  # tied
    assert ckpt._materialize_meta_(copy.deepcopy(shared), "cpu") == []
    tied = copy.deepcopy(shared)
    ckpt._materialize_meta_(tied, "cpu")
    assert tied[1].weight is tied[0].weight
