"""transformers-native checkpoints (issue 14, part 1): the hf layout, ``from_pretrained`` in a new
process, W4 packing, tokenizer files, registration on import, vision towers."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import vtquant
from vtquant.checkpoint import CheckpointError, load_tokenizer
from vtquant.config import Recipe, SinkConfig, WeightArgs, method_recipe
from vtquant.hf_integration import pack_int4, unpack_int4

from chartok import VOCAB_SIZE, char_tokenizer
from sinkmodels import implanted_decoder, token_batches

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread, immune to contention

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fp_model():
    return implanted_decoder(vocab_size=VOCAB_SIZE)


def _quantized(model, recipe, batches=None):
    q = copy.deepcopy(model)
    vtquant.quantize_(q, recipe, batches if batches is not None else token_batches(vocab=VOCAB_SIZE), quiet=True)
    return q


def _fp32_bytes(model) -> int:
    return sum(p.numel() * 4 for p in {p.data_ptr(): p for p in model.parameters()}.values())


def _evals():
    return token_batches(n=2, seed=17, vocab=VOCAB_SIZE, sink_positions=((0,), (0, 6)))


def _run(code: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_pack_int4_round_trip():
    codes = torch.randint(-8, 8, (5, 7), dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 4)
    assert torch.equal(unpack_int4(packed, 7), codes)


# recipe id -> recipe (the W4 one is packed two codes per byte on disk)
RECIPES = {
    "insertquant": lambda: method_recipe("insertquant", Recipe()),
    "insertquant+rotate-W4A8": lambda: method_recipe("insertquant+rotate", Recipe(), w_bits=4),
    "naive-static-W8A8KV8": lambda: method_recipe("naive-static", Recipe(), kv_bits=8),
    "smoothquant": lambda: method_recipe("smoothquant", Recipe()),
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_hf_layout_loads_with_from_pretrained_in_a_new_process(fp_model, tmp_path, name):
    q = _quantized(fp_model, RECIPES[name]())
    tok = char_tokenizer()
    path = vtquant.save(q, tmp_path / "ckpt", tokenizer=tok)
    files = sorted(os.listdir(path))
    assert {"config.json", "model.safetensors", "recipe.yaml", "vtquant.json", "tokenizer.json"} <= set(files)
    meta = json.loads((path / "vtquant.json").read_text())
    assert meta["format"] == "hf" and set(meta["files"]) == set(files) - {"vtquant.json"}  # all verified
    config = json.loads((path / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "vtquant" and config["architectures"] == ["LlamaForCausalLM"]
    assert qc["plan"] == meta["plan"] and qc["rotation"] == meta["plan"]["rotation"]
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        codes = {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys() if k.endswith("qweight")}
    assert len(codes) == 7 * len(fp_model.model.layers)
    if "W4" in name:  # two codes per byte
        assert all(dtype == "U8" for dtype, _ in codes.values())
        assert codes["model.layers.0.mlp.down_proj.qweight"][1] == [64, 64]
        assert os.path.getsize(path / "model.safetensors") < 0.6 * _fp32_bytes(fp_model)
    else:
        assert all(dtype == "I8" for dtype, _ in codes.values())
    assert os.path.getsize(path / "model.safetensors") < _fp32_bytes(fp_model)

    loaded = vtquant.load(path)
    evals = _evals()
    with torch.no_grad():
        reference = [q(input_ids=x).logits for x in evals]
        for x, ref in zip(evals, reference):
            torch.testing.assert_close(loaded(input_ids=x).logits, ref, atol=1e-5, rtol=0)
    assert loaded.vtquant.recipe == q.vtquant.recipe
    assert loaded.vtquant.tokenizer("Lady Susan")["input_ids"] == tok("Lady Susan")["input_ids"]
    assert load_tokenizer(path)("Lady Susan")["input_ids"] == tok("Lady Susan")["input_ids"]

    # a new process that imports vtquant, then only transformers' API: same logits, built on the meta
    # device (no random initialisation of a full-precision model: nn.init is never called on real tensors)
    torch.save(evals, tmp_path / "inputs.pt")
    _run("""
import sys, torch
import vtquant
calls = []
for fn in ("normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "xavier_uniform_"):
    orig = getattr(torch.nn.init, fn)
    def wrapped(*a, _orig=orig, **k):
        t = a[0] if a else k["tensor"]
        if not t.is_meta:
            calls.append(tuple(t.shape))
        return _orig(*a, **k)
    setattr(torch.nn.init, fn, wrapped)
from transformers import AutoModelForCausalLM, AutoTokenizer
model, info = AutoModelForCausalLM.from_pretrained(sys.argv[1], output_loading_info=True)
assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
assert calls == [], calls
assert type(model.config.quantization_config).__name__ == "VtquantConfig"
tok = AutoTokenizer.from_pretrained(sys.argv[1])
assert tok("Lady Susan")["input_ids"] == [int(i) for i in sys.argv[3].split(",")]
with torch.no_grad():
    torch.save([model(input_ids=x).logits for x in torch.load(sys.argv[2])], sys.argv[2] + ".out")
""", str(path), str(tmp_path / "inputs.pt"), ",".join(map(str, tok("Lady Susan")["input_ids"])))
    for got, ref in zip(torch.load(tmp_path / "inputs.pt.out"), reference):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)

    # a loaded checkpoint saves again with its tokenizer
    again = vtquant.save(loaded, tmp_path / "again")
    assert sorted(os.listdir(again)) == files


def test_import_registers_with_transformers_without_importing_it():
    out = _run("""
import sys
import vtquant
assert "transformers" not in sys.modules and "lm_eval" not in sys.modules
from transformers.quantizers import auto
assert "vtquant" in auto.AUTO_QUANTIZER_MAPPING and "vtquant" in auto.AUTO_QUANTIZATION_CONFIG_MAPPING
print("ok")
""")
    assert out.strip() == "ok"
    out = _run("""
from transformers.quantizers import auto
assert "vtquant" not in auto.AUTO_QUANTIZER_MAPPING
import vtquant  # after transformers: registers at once
assert "vtquant" in auto.AUTO_QUANTIZER_MAPPING
print("ok")
""")
    assert out.strip() == "ok"


def test_layouts_and_their_errors(fp_model, tmp_path):
    q = _quantized(fp_model, method_recipe("insertquant", Recipe()))
    plain = vtquant.save(q, tmp_path / "plain", format="vtquant")
    assert sorted(os.listdir(plain)) == ["model.safetensors", "recipe.yaml", "vtquant.json"]
    bf16 = vtquant.save(q, tmp_path / "bf16", format="hf", compact_embeddings="bf16")
    with safe_open(str(bf16 / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
    x = _evals()[0]
    with torch.no_grad():
        ref = q(input_ids=x).logits
        torch.testing.assert_close(vtquant.load(plain)(input_ids=x).logits, ref, atol=1e-5, rtol=0)
        assert (vtquant.load(bf16)(input_ids=x).logits - ref).abs().max() < 0.1
    with pytest.raises(CheckpointError, match="compact_embeddings='int8' needs format='vtquant'"):
        vtquant.save(q, tmp_path / "x", format="hf", compact_embeddings="int8")
    with pytest.raises(CheckpointError, match="format='nope'"):
        vtquant.save(q, tmp_path / "x", format="nope")
    assert not (tmp_path / "x").exists()

    # an hf checkpoint is vtquant's own (it may be replaced); a file it did not write makes it foreign
    target = vtquant.save(q, tmp_path / "ckpt", tokenizer=char_tokenizer())
    vtquant.save(q, target)  # replaced, tokenizer files removed with the old checkpoint
    assert sorted(os.listdir(target)) == ["config.json", "model.safetensors", "recipe.yaml", "vtquant.json"]
    (target / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="notes.txt"):
        vtquant.save(q, target)
    (target / "notes.txt").unlink()
    config = json.loads((target / "config.json").read_text())
    config["quantization_config"]["plan"]["targets"] = []
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json"):  # its checksum no longer matches
        vtquant.load(target)


# ---------------------------------------------------------------------------------------------
# vision towers
# ---------------------------------------------------------------------------------------------
def _vision_round_trip(model, kinds, pooled, tmp_path, expected_files):
    import visionmodels as vm

    q = copy.deepcopy(model)
    calib = [vm.make_images(vm.random_painted(8, s), seed=s) for s in range(4)]
    vtquant.quantize_(q, method_recipe("insertquant", Recipe(sinks=SinkConfig(known_sinks=kinds), ignore=[])), calib,
                      quiet=True)
    path = vtquant.save(q, tmp_path / "ckpt")
    assert sorted(os.listdir(path)) == expected_files
    loaded = vtquant.load(path)
    x = vm.make_images(vm.random_painted(4, 77), seed=77)
    with torch.no_grad():
        torch.testing.assert_close(pooled(loaded, x), pooled(q, x), atol=1e-5, rtol=0)
    assert loaded.vtquant.sink_positions() == q.vtquant.sink_positions()
    assert any(len(p) > 1 for p in q.vtquant.sink_positions())  # content-detected patches, not only CLS


def test_timm_vit_round_trip(tmp_path):
    import visionmodels as vm

    _vision_round_trip(vm.timm_vit(registers=2, sink_registers=(1,)), ["cls", "registers"], lambda m, x: m(x),
                       tmp_path, ["model.safetensors", "recipe.yaml", "vtquant.json"])


@pytest.mark.parametrize("family", ["clip-vision", "dinov2-reg"])
def test_hf_vision_round_trip(tmp_path, family):
    import visionmodels as vm

    model = vm.hf_clip_vision() if family == "clip-vision" else vm.hf_dinov2(registers=4, sink_registers=(1, 3))
    _vision_round_trip(model, ["cls", "registers"] if "dinov2" in family else ["cls"],
                       lambda m, x: m(pixel_values=x).pooler_output, tmp_path,
                       ["config.json", "model.safetensors", "recipe.yaml", "vtquant.json"])


def test_cli_quantize_formats_and_checkpoint_eval_without_the_fp_model(fp_model, tmp_path, monkeypatch, capsys):
    """`vtquant quantize` writes the hf layout with the tokenizer (and the FP reference) or a
    compressed-tensors folder; `vtquant eval perplexity --checkpoint` then needs no --model."""
    import vtquant.models
    from vtquant.cli import main

    loads = []

    def fake_loader(spec, model_file=None, quiet=False, **kwargs):
        loads.append(spec)
        model = copy.deepcopy(fp_model)
        model.vtquant_load_seconds = 0.0
        return model, char_tokenizer(), "tiny"

    monkeypatch.setattr(vtquant.models, "load_causal_lm", fake_loader)
    text = tmp_path / "calib.txt"
    text.write_text("Lady Susan Vernon to Mr. Vernon. My dear brother, I can no longer refuse myself. " * 30)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"version: 1\nmethod: naive-static\nweights: {{bits: 8}}\nactivations: {{bits: 8}}\n"
                      f"calibration: {{dataset: {text}, num_samples: 4, seq_len: 32, batch_size: 2}}\n")
    common = ["--recipe", str(recipe), "--quiet", "--threads", "1"]
    assert main(["quantize", "--out", str(tmp_path / "hf"), *common]) == 0
    files = set(os.listdir(tmp_path / "hf"))
    assert {"config.json", "tokenizer.json", "vtquant.json"} <= files
    meta = json.loads((tmp_path / "hf" / "vtquant.json").read_text())
    assert "GGUF Q4_1" in meta["fp_reference"]  # the default --model is the SmolLM2 asset
    assert main(["quantize", "--out", str(tmp_path / "ct"), "--format", "compressed-tensors", *common]) == 0
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    capsys.readouterr()

    results = tmp_path / "rows.json"
    loads.clear()
    assert main(["eval", "perplexity", "--checkpoint", str(tmp_path / "hf"), "--eval-text", str(text), "--seq-len", "64",
                 "--eval-chunks", "2", "--results-file", str(results), *common[2:]]) == 0
    assert loads == []  # the tokenizer came from the checkpoint
    row = json.loads(results.read_text())["rows"][0]
    assert row["method"] == "naive-static" and row["fp_reference"] == meta["fp_reference"] and row["value"] > 1
