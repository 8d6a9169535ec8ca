"""Public API: quantize_ / save / load round trips, atomic saves, errors, and KV-cache decoding."""
from __future__ import annotations

import copy
import inspect
import json
import os

import pytest
import torch
from safetensors import safe_open

import vtquant
from vtquant.config import Recipe, SinkConfig, method_recipe

from sinkmodels import implanted_decoder, token_batches


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread, immune to contention


@pytest.fixture(scope="module")
def fp_model():
    return implanted_decoder()


def _fp32_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():  # tied embeddings counted once
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * 4
    return total


def _quantized(model, recipe, batches=None):
    q = copy.deepcopy(model)
    vtquant.quantize_(q, recipe, batches if batches is not None else token_batches(), quiet=True)
    return q


@pytest.mark.parametrize("method", ["insertquant", "insertquant+rotate", "naive-static", "dynamic-token"])
def test_save_load_round_trip(fp_model, tmp_path, method):
    q = _quantized(fp_model, method_recipe(method, Recipe()))
    path = vtquant.save(q, tmp_path / "ckpt")
    assert sorted(os.listdir(path)) == ["model.safetensors", "recipe.yaml", "vtquant.json"]
    loaded = vtquant.load(path)
    assert not loaded.training

    evals = token_batches(n=2, seed=17, sink_positions=((0,), (0, 6)))
    with torch.no_grad():
        for x in evals:
            a, b = q(input_ids=x).logits, loaded(input_ids=x).logits
            torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
            assert loaded.vtquant.sink_positions() == q.vtquant.sink_positions()
    assert loaded.vtquant.recipe == q.vtquant.recipe
    assert loaded.vtquant.plan.to_dict() == json.loads(json.dumps(q.vtquant.plan.to_dict()))
    meta = json.loads((path / "vtquant.json").read_text())
    assert meta["report"]["method"] == method

    # a loaded checkpoint can be saved and loaded again
    again = vtquant.load(vtquant.save(loaded, tmp_path / "again"))
    with torch.no_grad():
        x = evals[0]
        torch.testing.assert_close(again(input_ids=x).logits, q(input_ids=x).logits, atol=1e-5, rtol=0)

    # int8 codes on disk: smaller than the full-precision fp32 model
    size = os.path.getsize(path / "model.safetensors")
    assert size < _fp32_bytes(fp_model), f"{size} bytes >= fp32 {_fp32_bytes(fp_model)}"
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        codes = [k for k in f.keys() if k.endswith("qweight")]
        assert len(codes) == 7 * len(fp_model.model.layers)
        assert all(f.get_slice(k).get_dtype() == "I8" for k in codes)


def test_rotated_checkpoint_does_not_repeat_the_online_rotation(fp_model, tmp_path):
    plain = vtquant.save(_quantized(fp_model, method_recipe("insertquant", Recipe())), tmp_path / "plain")
    rotated = vtquant.save(_quantized(fp_model, method_recipe("insertquant+rotate", Recipe())), tmp_path / "rot")
    cfg = fp_model.config
    one_rotation = cfg.intermediate_size ** 2 * 4
    untied_head = cfg.vocab_size * cfg.hidden_size * 4  # rotation unties lm_head from the embeddings
    budget = 1.05 * os.path.getsize(plain / "model.safetensors") + one_rotation + untied_head
    size = os.path.getsize(rotated / "model.safetensors")
    assert size <= budget, f"rotated checkpoint {size} bytes > {budget:.0f}"


def test_save_is_atomic_and_overwrites(fp_model, tmp_path, monkeypatch):
    q = _quantized(fp_model, method_recipe("insertquant", Recipe()))
    target = tmp_path / "ckpt"
    vtquant.save(q, target)
    first = (target / "model.safetensors").read_bytes()
    vtquant.save(q, target)  # over an existing checkpoint
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary or .old directories left
    assert (target / "model.safetensors").read_bytes() == first

    # a save that fails half-way keeps the old checkpoint and leaves nothing behind
    import safetensors.torch

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_model", broken)
    with pytest.raises(OSError, match="disk full"):
        vtquant.save(q, target)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    assert (target / "model.safetensors").read_bytes() == first
    monkeypatch.undo()
    vtquant.load(target)


def test_load_errors(tmp_path, fp_model):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="vtquant.json"):
        vtquant.load(tmp_path / "empty")
    path = vtquant.save(_quantized(fp_model, method_recipe("naive-static", Recipe()), token_batches(n=1)),
                        tmp_path / "ckpt")
    meta = json.loads((path / "vtquant.json").read_text())
    meta["format_version"] = 99
    (path / "vtquant.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="99"):
        vtquant.load(path)


def test_save_needs_a_quantized_model(fp_model, tmp_path):
    with pytest.raises(ValueError, match="quantize_"):
        vtquant.save(copy.deepcopy(fp_model), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_quantize_twice_raises(fp_model):
    q = _quantized(fp_model, method_recipe("naive-static", Recipe()), token_batches(n=1))
    with pytest.raises(RuntimeError, match="already quantized"):
        vtquant.quantize_(q, method_recipe("naive-static", Recipe()), token_batches(n=1), quiet=True)


# ---------------------------------------------------------------------------------------------
# KV-cache decoding: the sink stays a sink through the cache
# ---------------------------------------------------------------------------------------------
def _cache_kwarg(model) -> str:
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"  # transformers 5 renamed it


def _returned_cache(out):
    for name in ("cache", "past_key_values"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    raise AssertionError(f"no cache in the model output ({list(out.keys())})")


@torch.no_grad()
def _incremental(model, ids: torch.Tensor, prompt: int):
    """Prefill ``ids[:, :prompt]``, then decode the rest one token at a time with the cache."""
    kw = _cache_kwarg(model)
    out = model(input_ids=ids[:, :prompt], use_cache=True)
    logits, positions = [out.logits[:, -1]], [model.vtquant.sink_positions()]
    cache = _returned_cache(out)
    for t in range(prompt, ids.shape[1]):
        out = model(input_ids=ids[:, t:t + 1], use_cache=True, **{kw: cache})
        cache = _returned_cache(out)
        logits.append(out.logits[:, -1])
        positions.append(model.vtquant.sink_positions())
    return torch.stack(logits, dim=1), positions


@pytest.mark.parametrize("known_sinks", [["first_token"], []], ids=["first_token", "content-only"])
@pytest.mark.parametrize("quantized", [False, True], ids=["no-quant", "W8A8"])
def test_kv_cache_decoding_matches_full_forward(fp_model, known_sinks, quantized):
    if quantized:
        recipe = method_recipe("insertquant", Recipe(sinks=SinkConfig(known_sinks=known_sinks)))
    else:
        recipe = Recipe(method="insertquant", weights=None, activations=None, sinks=SinkConfig(known_sinks=known_sinks))
    q = _quantized(fp_model, recipe)
    prompt = 8
    # row 0: a second sink arrives during decoding (position 12); row 1: only the prompt's sink
    ids = token_batches(n=1, seq=20, seed=5, sink_positions=((0, 12), (0,)))[0]
    with torch.no_grad():
        full = q(input_ids=ids, use_cache=False).logits
    assert q.vtquant.sink_positions() == [[0, 12], [0]]
    inc, positions = _incremental(q, ids, prompt)
    torch.testing.assert_close(inc, full[:, prompt - 1:], atol=1e-4, rtol=0)

    assert positions[0] == [[0], [0]]  # prefill
    step_of_12 = 12 - prompt + 1
    assert positions[step_of_12] == [[0], []]  # the new sink token is detected by content
    assert all(p == [[], []] for i, p in enumerate(positions[1:], start=1) if i != step_of_12)
    if not quantized:  # and the model is still the full-precision one where sinks sit at position 0
        with torch.no_grad():
            ref = fp_model(input_ids=ids[1:]).logits
        torch.testing.assert_close(full[1:], ref, atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to load onto")
def test_load_onto_device(fp_model, tmp_path):
    path = vtquant.save(_quantized(fp_model, method_recipe("insertquant", Recipe())), tmp_path / "ckpt")
    loaded = vtquant.load(path, device="cuda")
    assert all(t.device.type == "cuda" for t in list(loaded.parameters()) + list(loaded.buffers()))


def test_saved_checkpoint_has_the_umask_permissions(fp_model, tmp_path):
    q = _quantized(fp_model, method_recipe("naive-static", Recipe()))
    old = os.umask(0o022)
    try:
        target = vtquant.save(q, tmp_path / "ckpt")
    finally:
        os.umask(old)
    assert (os.stat(target).st_mode & 0o777) == 0o755  # not mkdtemp's 0700
    assert (os.stat(target / "model.safetensors").st_mode & 0o777) == 0o644
