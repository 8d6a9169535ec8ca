"""open_clip checkpoints (issue 14): ``vtquant.save`` / ``vtquant.load`` of quantized open_clip models -
a whole ``CLIP`` / ``CustomTextCLIP`` (both towers, one checkpoint) or one image / text tower - rebuilt
from the open_clip model config read before quantization (no pretrained download), with the same
embeddings in a new process; the checkpoint rules (foreign folders refused, sha256) hold."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("open_clip")

import vtquant
from vtquant.checkpoint import CheckpointError
from vtquant.config import Recipe, SinkConfig, method_recipe
from vtquant.vision import quantize_clip_

import visionmodels as vm

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
KINDS = ["cls", "first_token", "eot"]


def _recipe(method: str = "insertquant+rotate") -> Recipe:
    return method_recipe(method, Recipe(sinks=SinkConfig(known_sinks=KINDS), ignore=[]))


def _calib():
    images = [vm.make_images(vm.random_painted(8, s), seed=s) for s in range(3)]
    texts = [vm.make_texts([4 + (3 * i + s) % 12 for i in range(6)], seed=s) for s in range(3)]
    return images, texts


def _custom_text_clip():
    import open_clip

    torch.manual_seed(1)
    return open_clip.CustomTextCLIP(
        embed_dim=32, quick_gelu=True, init_logit_bias=-10.0,
        vision_cfg=open_clip.CLIPVisionCfg(layers=2, width=64, head_width=16, patch_size=vm.PATCH, image_size=vm.IMG,
                                           ls_init_value=0.1, final_ln_after_pool=True),
        text_cfg=open_clip.CLIPTextCfg(context_length=vm.TEXT_CTX, vocab_size=vm.TEXT_VOCAB, width=64, heads=4, layers=2,
                                       pool_type="last", norm_kwargs={"eps": 1e-6})).eval()


NEW_PROCESS = """
import sys, torch
torch.set_num_threads(1)
import vtquant
x, t = torch.load(sys.argv[1] + "/inputs.pt")
out = {}
for name in sys.argv[2:]:
    model = vtquant.load(sys.argv[1] + "/" + name)
    with torch.no_grad():
        if hasattr(model, "encode_image"):
            out[name] = (model.encode_image(x), model.encode_text(t))
        else:
            out[name] = (model(x if name.startswith("visual") else t),)
torch.save(out, sys.argv[1] + "/outputs.pt")
"""


def test_open_clip_models_round_trip_in_a_new_process(tmp_path):
    images, texts = _calib()
    x = vm.make_images(vm.random_painted(6, seed=9), seed=9)
    t = vm.make_texts([5, 9, 16, 3, 12, 7], seed=9)
    models = {}
    q = vm.open_clip_tiny()  # both towers implanted: content sinks + SOT / EOT
    quantize_clip_(q, _recipe(), images=images, texts=texts, quiet=True)
    models["clip-rotate"] = q
    q = vm.open_clip_tiny(batch_first=False)  # sequence-first blocks
    quantize_clip_(q, _recipe("naive-static"), images=images, texts=texts, quiet=True)
    models["clip-seq-first"] = q
    q = _custom_text_clip()  # quick_gelu, layer scale, logit bias, last-token pool, eps 1e-6
    quantize_clip_(q, _recipe("naive-static"), images=images, texts=texts, quiet=True)
    models["custom-text-clip"] = q
    v = vm.open_clip_tiny().visual  # one tower alone
    vtquant.quantize_(v, method_recipe("insertquant+rotate", Recipe(sinks=SinkConfig(known_sinks=["cls"]), ignore=[])),
                      images, quiet=True)
    models["visual-tower"] = v
    text = _custom_text_clip().text
    vtquant.quantize_(text, method_recipe("naive-static", Recipe(ignore=[])), texts, quiet=True)
    models["text-tower"] = text
    expected = {}
    for name, model in models.items():
        path = vtquant.save(model, tmp_path / name)
        assert sorted(os.listdir(path)) == (["model.safetensors", "vtquant.json"] if "clip" in name else
                                            ["model.safetensors", "recipe.yaml", "vtquant.json"])
        meta = json.loads((path / "vtquant.json").read_text())
        assert meta["model"]["library"] == "open_clip"
        with torch.no_grad():
            expected[name] = ((model.encode_image(x), model.encode_text(t)) if hasattr(model, "encode_image") else
                              (model(x if name.startswith("visual") else t),))
    clip = json.loads((tmp_path / "clip-rotate" / "vtquant.json").read_text())
    assert [e["module"] for e in clip["towers"]] == ["visual", "transformer"]
    assert clip["model"]["class"] == "CLIP" and clip["towers"][0]["plan"]["rotation"] is not None
    torch.save((x, t), tmp_path / "inputs.pt")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", NEW_PROCESS, str(tmp_path), *models], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "outputs.pt")
    for name in models:
        for a, b in zip(got[name], expected[name]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    # in this process too: the handles, recipes and sink positions come back
    loaded = vtquant.load(tmp_path / "clip-rotate")
    with torch.no_grad():
        loaded.encode_image(x), models["clip-rotate"].encode_image(x)
    assert loaded.visual.vtquant.sink_positions() == models["clip-rotate"].visual.vtquant.sink_positions()
    assert loaded.transformer.vtquant.recipe.sinks.known_sinks == ["first_token", "eot"]
    assert loaded.visual.vtquant.plan.to_dict() == models["clip-rotate"].visual.vtquant.plan.to_dict()


def test_open_clip_checkpoint_rules(tmp_path):
    images, texts = _calib()
    q = vm.open_clip_tiny()
    quantize_clip_(q, _recipe("naive-static"), images=images, texts=texts, quiet=True)
    with pytest.raises(NotImplementedError, match="save the whole model"):  # a CLIP's text tower is the CLIP's
        vtquant.save(q.transformer, tmp_path / "text")
    with pytest.raises(CheckpointError, match="format='vtquant'"):
        vtquant.save(q, tmp_path / "hf", format="hf")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(CheckpointError, match="not a vtquant checkpoint"):
        vtquant.save(q, tmp_path / "mine")
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]
    path = vtquant.save(q, tmp_path / "ckpt")
    vtquant.save(q, path)  # an earlier checkpoint is replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "mine"]  # nothing temporary left
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        vtquant.load(path)
    with pytest.raises(ValueError, match="not quantized"):
        vtquant.save(vm.open_clip_tiny(), tmp_path / "fp")
    one = vm.open_clip_tiny()
    vtquant.quantize_(one.visual, method_recipe("naive-static", Recipe(ignore=[])), images, quiet=True)
    with pytest.raises(NotImplementedError, match="save the quantized tower itself"):
        vtquant.save(one, tmp_path / "one")
    only = vm.open_clip_tiny()  # one tower through quantize_clip_: the other is prepared, the CLIP saves
    quantize_clip_(only, _recipe("naive-static"), images=images, towers=("visual",), quiet=True)
    with torch.no_grad():
        x, t = images[0], texts[0]
        torch.testing.assert_close(vtquant.load(vtquant.save(only, tmp_path / "only")).encode_text(t),
                                   only.encode_text(t), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cli_quantize_open_clip(tmp_path, monkeypatch, capsys, dtype):
    """`vtquant quantize --model open_clip:...` quantizes both towers on the bundled photos (one caption each)
    and saves one checkpoint that vtquant.load reads (``--dtype bfloat16``: calibrated and saved in bf16,
    loaded in bf16)."""
    import numpy as np

    import vtquant.vision
    from vtquant.cli import main

    def preprocess(img):
        arr = np.asarray(img.convert("RGB").resize((vm.IMG, vm.IMG)), dtype=np.float32) / 255.0
        return torch.from_numpy(arr).permute(2, 0, 1)

    def tokenizer(captions):
        return vm.make_texts([min(vm.TEXT_CTX, 3 + len(c) // 4) for c in captions], seed=len(captions))

    def fake_loader(spec, pretrained=True, device="cpu"):
        model = vm.open_clip_tiny()
        return vtquant.vision._image_text(model, spec, "open_clip", preprocess, tokenizer)

    monkeypatch.setattr(vtquant.vision, "load_vision_model", fake_loader)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("version: 1\nmethod: insertquant\nsinks: {known_sinks: [cls, first_token, eot]}\nignore: []\n"
                      "calibration: {dataset: images, num_samples: 8, batch_size: 4}\n")
    out = tmp_path / "ckpt"
    assert main(["quantize", "--model", "open_clip:tiny", "--recipe", str(recipe), "--out", str(out), "--quiet",
                 "--threads", "1", "--dtype", dtype]) == 0
    text = capsys.readouterr().out
    assert "[visual]" in text and "[text]" in text and f"saved {out}" in text
    loaded = vtquant.load(out)
    assert loaded.visual.vtquant.plan.method == "insertquant" and loaded.transformer.vtquant is not None
    assert "random" not in (loaded.visual.vtquant.fp_reference or "")
    assert loaded.visual.conv1.weight.dtype == getattr(torch, dtype)
    x = vm.make_images(vm.random_painted(2, 5), seed=5).to(getattr(torch, dtype))
    with torch.no_grad():
        assert torch.isfinite(loaded.encode_image(x)).all()
    # the real CLIP B/16 image tower's path (the asset, here a tiny open_clip tower in its place)
    import vtquant.convert.clip_onnx as clip_onnx

    monkeypatch.setattr(clip_onnx, "load_clip_vit_b16", lambda library, quiet=False: vm.open_clip_tiny().visual)
    monkeypatch.setattr(clip_onnx, "clip_preprocess", lambda: preprocess)
    assert main(["quantize", "--model", "asset:clip-vit-b16-openai", "--library", "open_clip", "--recipe", str(recipe),
                 "--out", str(tmp_path / "asset"), "--quiet", "--threads", "1"]) == 0
    tower = vtquant.load(tmp_path / "asset")
    assert type(tower).__name__ == "VisionTransformer" and "int8 ONNX" in tower.vtquant.fp_reference
    assert main(["quantize", "--model", "open_clip:tiny", "--recipe", str(recipe), "--out", str(tmp_path / "ct"),
                 "--format", "compressed-tensors", "--quiet"]) != 0
    assert "--format compressed-tensors is for transformers decoders" in capsys.readouterr().err
    assert not (tmp_path / "ct").exists()
