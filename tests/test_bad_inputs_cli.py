"""The ``vtquant`` command on bad inputs: exit status 2 and ONE line on stderr naming the problem and
the fix, no traceback; text files are checked before the model load.  Also two commands that used to
do less than they said: ``eval perplexity --recipe`` runs the whole recipe (its KV cache too) and
``demo --vision --results-file`` writes the result rows every other command writes.

No downloads: tiny random models, a tokenizer built here, images drawn here.
"""
from __future__ import annotations

import json

import pytest
import torch

from vtquant.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread, immune to contention


def one_line_error(capsys, *fragments: str) -> str:
    """The command's stderr: exactly one non-empty line, no traceback, holding every fragment."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a command loads the LLM (the checks must come first: the load takes 20 s)."""
    import vtquant.models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(vtquant.models, "load_causal_lm", refuse)


# ------------------------------------------------------------------------------------------
# recipe and model files
# ------------------------------------------------------------------------------------------
def test_non_utf8_recipe_names_the_file(tmp_path, capsys, no_model_load):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes("version: 1\nname: caf\xe9-w8a8\n".encode("latin-1"))
    assert main(["quantize", "--recipe", str(recipe), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    one_line_error(capsys, str(recipe), "not UTF-8", "0xe9", "save the recipe as UTF-8")
    assert not (tmp_path / "o").exists()


def test_invalid_yaml_recipe_is_one_line(tmp_path, capsys, no_model_load):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("version: 1\nweights: {bits: 8\n")
    assert main(["eval", "perplexity", "--recipe", str(recipe), "--quiet"]) == 2
    one_line_error(capsys, str(recipe), "not valid YAML")


def _gguf(path, tensors: int = 2):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    for i in range(tensors):
        writer.add_tensor(f"blk.0.w{i}", np.ones((64, 64), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("keep", [0.6, 0.02, 10])
def test_truncated_gguf_is_named_with_the_fix(tmp_path, capsys, keep):
    whole = _gguf(tmp_path / "whole.gguf").read_bytes()
    cut = tmp_path / "SmolLM2-135M.gguf"
    cut.write_bytes(whole[:int(keep * len(whole)) if keep < 1 else keep])
    assert main(["eval", "perplexity", "--model-file", str(cut), "--quiet"]) == 2
    one_line_error(capsys, str(cut), "truncated", "fetch it again")


def test_not_a_gguf_file(tmp_path, capsys):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"<html>rate limited</html>" * 10)
    assert main(["eval", "perplexity", "--model-file", str(fake), "--quiet"]) == 2
    one_line_error(capsys, str(fake), "not a GGUF file")


# ------------------------------------------------------------------------------------------
# --calib-text / --eval-text: checked before the model load, for every command that reads them
# ------------------------------------------------------------------------------------------
TEXT_COMMANDS = {
    "demo": ["demo"],
    "compare": ["compare", "--methods", "fp,insertquant", "--settings", "W8A8"],
    "eval": ["eval", "perplexity"],
    "quantize": ["quantize", "--recipe", "recipes/hf/smollm2-135m.yaml", "--out", "OUT"],
    "analyze": ["analyze"],
}


def _bad_text(tmp_path, kind: str):
    path = tmp_path / f"{kind}.txt"
    if kind == "empty":
        path.write_text("")
    elif kind == "blank":
        path.write_text(" \n\t\n")
    elif kind == "short":
        path.write_text("To be, or not to be.")
    elif kind == "latin1":
        path.write_bytes(("Der B\xe4r " * 400).encode("latin-1"))
    return path


TEXT_ERRORS = {"empty": "empty", "blank": "empty", "short": "fewer than the 512 tokens", "latin1": "not UTF-8"}


@pytest.mark.parametrize("command", list(TEXT_COMMANDS))
@pytest.mark.parametrize("kind", list(TEXT_ERRORS))
def test_bad_calib_text_fails_before_the_model_load(tmp_path, capsys, no_model_load, command, kind):
    text = _bad_text(tmp_path, kind)
    argv = [a.replace("OUT", str(tmp_path / "o")) for a in TEXT_COMMANDS[command]]
    assert main(argv + ["--calib-text", str(text), "--quiet"]) == 2
    line = one_line_error(capsys, "--calib-text", str(text), TEXT_ERRORS[kind])
    if kind == "short":
        assert "calibration.seq_len" in line and "longer text" in line
    if kind == "latin1":
        assert "0xe4" in line and "convert it to UTF-8" in line


def test_bad_eval_text_fails_before_the_model_load(tmp_path, capsys, no_model_load):
    text = _bad_text(tmp_path, "short")
    assert main(["eval", "perplexity", "--eval-text", str(text), "--quiet"]) == 2
    one_line_error(capsys, "--eval-text", str(text), "fewer than the 512 tokens", "--seq-len")
    assert main(["analyze", "--text", str(_bad_text(tmp_path, "latin1")), "--quiet"]) == 2
    one_line_error(capsys, "--text", "latin1.txt", "not UTF-8")


def test_calib_text_that_is_no_txt_file(tmp_path, capsys, no_model_load):
    assert main(["demo", "--calib-text", str(tmp_path / "missing.txt"), "--quiet"]) == 2
    one_line_error(capsys, "missing.txt", "neither a text asset")
    (tmp_path / "calib.md").write_text("# notes\n" * 200)
    assert main(["demo", "--calib-text", str(tmp_path / "calib.md"), "--quiet"]) == 2
    one_line_error(capsys, "calib.md", "expected a .txt file")


# ------------------------------------------------------------------------------------------
# images
# ------------------------------------------------------------------------------------------
def _photos(folder, n: int = 3, corrupt: str = "truncated"):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (40, 40), (40 * i, 90, 200 - 30 * i)).save(folder / f"photo{i}.jpg", quality=90)
    bad = folder / "broken.jpg"
    if corrupt == "truncated":  # a download cut short: a valid JPEG header, half the data
        data = (folder / "photo0.jpg").read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    else:  # not an image at all
        bad.write_bytes(b"\x00\x01 this is not a JPEG" * 20)
    return bad


@pytest.mark.parametrize("corrupt", ["truncated", "garbage"])
def test_corrupt_jpeg_in_analyze_images_is_named(tmp_path, capsys, corrupt):
    bad = _photos(tmp_path / "imgs", corrupt=corrupt)
    rc = main(["analyze", "--model", "timm:vit_tiny_patch16_224", "--no-pretrained", "--images",
               str(tmp_path / "imgs"), "--num-images", "2", "--out", str(tmp_path / "rep"), "--quiet", "--threads", "1"])
    assert rc == 2
    one_line_error(capsys, str(bad), "not a readable image", "replace or remove the file")
    assert not (tmp_path / "rep").exists()


def test_corrupt_jpeg_in_imagenet_folder_is_named(tmp_path, capsys):
    pytest.importorskip("timm")
    bad = _photos(tmp_path / "in" / "val" / "n01440764")
    rc = main(["eval", "imagenet", "--model", "timm:vit_tiny_patch16_224", "--no-pretrained", "--data",
               str(tmp_path / "in"), "--batch-size", "2", "--quiet", "--threads", "1"])
    assert rc == 2
    one_line_error(capsys, str(bad), "not a readable image")


# ------------------------------------------------------------------------------------------
# Karpathy split files (Flickr30k retrieval): checked before the model load
# ------------------------------------------------------------------------------------------
def _entry(i: int, split: str = "test", drop: tuple = ()) -> dict:
    entry = {"filename": f"{i}.jpg", "split": split,
             "sentences": [{"raw": f"caption {k} of image {i}", "tokens": []} for k in range(5)]}
    return {k: v for k, v in entry.items() if k not in drop}


KARPATHY_VARIANTS = {
    "not json": (b'{"images": [', "not valid JSON"),
    "not utf-8": ('{"images": [], "dataset": "fl\xe9"}'.encode("latin-1"), "not UTF-8"),
    "top-level list": ([_entry(0)], "top level is a list, not an object"),
    "no images": ({"dataset": "flickr30k"}, "no 'images' field"),
    "images not a list": ({"images": {"0": _entry(0)}}, "'images' is a dict, not a list"),
    "entry not an object": ({"images": ["0.jpg"]}, "images[0] is a str, not an object"),
    "missing split": ({"images": [_entry(0), _entry(1, drop=("split",))]}, "images[1] has no 'split' field"),
    "missing sentences": ({"images": [_entry(0, drop=("sentences",))]}, "images[0] has no 'sentences' field"),
    "missing filename": ({"images": [_entry(0, drop=("filename",))]}, "images[0] has no 'filename' field"),
    "sentences not a list": ({"images": [{**_entry(0), "sentences": "a dog"}]}, "images[0].sentences is a str"),
    "empty sentences": ({"images": [{**_entry(0), "sentences": []}]}, "empty 'sentences' list"),
    "sentence without raw": ({"images": [{**_entry(0), "sentences": [{"tokens": ["a"]}]}]},
                             "images[0].sentences[0] has no 'raw' caption"),
    "no test split": ({"images": [_entry(0, "train"), _entry(1, "val")]}, "no images in split 'test'"),
}


@pytest.mark.parametrize("variant", list(KARPATHY_VARIANTS))
def test_malformed_karpathy_json_names_file_and_field(tmp_path, capsys, variant):
    content, expected = KARPATHY_VARIANTS[variant]
    path = tmp_path / "dataset_flickr30k.json"
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    from PIL import Image

    (tmp_path / "flickr30k-images").mkdir()
    for i in range(2):  # the photos are there: only the JSON is wrong
        Image.new("RGB", (32, 32), (90 * i, 60, 120)).save(tmp_path / "flickr30k-images" / f"{i}.jpg")
    # a model that does not exist: the data must be checked (and fail) before any model load
    rc = main(["eval", "retrieval", "--model", "open_clip:no-such-model", "--data", str(tmp_path), "--quiet"])
    assert rc == 2
    line = one_line_error(capsys, str(path), expected)
    if variant == "no test split":
        assert "['train', 'val']" in line and "--split" in line
    if variant.startswith("missing") or variant in ("no images", "top-level list"):
        assert "a Karpathy split file is a JSON object" in line  # the expected layout, in the same line


def test_karpathy_errors_are_data_errors(tmp_path):
    """The library raises :class:`vtquant.errors.DataError` (a ``ValueError``), whatever calls it."""
    from vtquant.errors import DataError, VtquantError
    from vtquant.eval.retrieval import load_flickr30k

    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": [_entry(0, drop=("sentences",))]}))
    with pytest.raises(DataError, match=r"images\[0\] has no 'sentences' field") as err:
        load_flickr30k(str(path))
    assert isinstance(err.value, VtquantError) and isinstance(err.value, ValueError)


# ------------------------------------------------------------------------------------------
# `vtquant eval perplexity --recipe`: the whole recipe, its KV-cache quantization included
# ------------------------------------------------------------------------------------------
WORDS = [f"w{i}" for i in range(60)]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A tiny random Llama with a word-level tokenizer, saved as a transformers directory, and texts."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    from vtquant.adapters.hf_decoder import tiny_config

    root = tmp_path_factory.mktemp("tiny_lm")
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "[PAD]": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>",
                                         pad_token="[PAD]").save_pretrained(root / "model")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(tiny_config(vocab_size=64, max_position_embeddings=1024)).eval() \
        .save_pretrained(root / "model")
    gen = torch.Generator().manual_seed(0)
    for name, n in (("calib", 3000), ("eval", 200)):
        ids = torch.randint(0, len(WORDS), (n,), generator=gen).tolist()
        (root / f"{name}.txt").write_text(" ".join(WORDS[i] for i in ids))
    return root


def test_eval_perplexity_recipe_runs_the_kv_cache_quantization(tiny_lm, tmp_path, monkeypatch):
    import vtquant.api
    from vtquant.core.quant import QuantLinear

    quantized = []
    real_quantize = vtquant.api.quantize_

    def spy(model, recipe, *args, **kwargs):
        quantized.append((model, recipe))
        return real_quantize(model, recipe, *args, **kwargs)

    monkeypatch.setattr(vtquant.api, "quantize_", spy)
    out = tmp_path / "rows.json"
    rc = main(["eval", "perplexity", "--model", str(tiny_lm / "model"), "--recipe",
               "recipes/hf/smollm2-135m-w4a8kv8.yaml", "--calib-text", str(tiny_lm / "calib.txt"),
               "--eval-text", str(tiny_lm / "eval.txt"), "--seq-len", "32", "--eval-chunks", "2",
               "--quiet", "--threads", "1", "--results-file", str(out)])
    assert rc == 0
    (model, recipe), = quantized
    assert recipe.kv_cache is not None and recipe.kv_cache.bits == 8 and recipe.weights.bits == 4
    assert recipe.rotation.enabled and recipe.weights.algorithm == "gptq"
    kv = {m.name: m.out_act for m in model.modules() if isinstance(m, QuantLinear) and m.out_act is not None}
    assert sorted(n[n.index("layers."):] for n in kv) == sorted(f"layers.{i}.self_attn.{p}" for i in range(4)
                                                                for p in ("k_proj", "v_proj"))
    assert all(q.bits == 8 and q.static and q.mode == "quant" for q in kv.values())
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["fp", "insertquant+rotate"]
    assert rows[1]["kv_bits"] == 8 and rows[1]["w_bits"] == 4 and rows[1]["a_bits"] == 8


def test_run_methods_takes_a_whole_recipe(tiny_lm):
    """The library behind it: a Recipe in ``settings`` is run as written, not rebuilt from its bits."""
    from vtquant.config import ActArgs, Recipe, method_recipe
    from vtquant.core.quant import QuantLinear
    from vtquant.llm import prepare_text, run_methods
    from vtquant.models import load_causal_lm

    model, tok, name = load_causal_lm(str(tiny_lm / "model"), quiet=True)
    base = Recipe()
    base.calibration.dataset, base.calibration.seq_len, base.calibration.num_samples = str(tiny_lm / "calib.txt"), 64, 4
    recipe = method_recipe("insertquant", base)  # no KV cache quantization ...
    recipe.kv_cache = ActArgs(bits=6)  # ... until written into the recipe by hand
    setup = prepare_text(tok, base, str(tiny_lm / "eval.txt"), seq_len=32, max_chunks=2, quiet=True)
    rows, results = run_methods(model, setup, base, [("fp", 8, 8), recipe], name, quiet=True, log=lambda s: None,
                                keep_models=True)
    assert [r.method for r in rows] == ["fp", "insertquant"] and rows[1].extra["kv_bits"] == 6
    kv = [m.out_act for m in results[1].model.modules() if isinstance(m, QuantLinear) and m.out_act is not None]
    assert len(kv) == 8 and all(q.bits == 6 for q in kv)


# ------------------------------------------------------------------------------------------
# `vtquant demo --vision --results-file`: result rows, like every other command
# ------------------------------------------------------------------------------------------
def test_demo_vision_writes_result_rows(tmp_path, monkeypatch, capsys):
    import vtquant.eval.fidelity as fidelity

    cos = {"cls_cos_mean": 0.999, "cls_cos_min": 0.998, "patch_cos_mean": 0.997, "patch_cos_min": 0.99}
    seen = {}

    def fake_control(recipe=None, quiet=False, log=print, **kwargs):
        seen["recipe"] = recipe
        row = {"sinks_detected": False, "sink_positions_last_batch": [], "probe_max_ratio": [3.0, 5.5],
               "notes": ["no massive activations"], "all": cos, "held_out": cos, "seconds": 2.0}
        return {"photos": ["a", "b"], "num_photos": 22, "calibration_photos": 8, "img_size": 224,
                "recipe": recipe.name, "models": {"hf:Dinov2Model": dict(row, saliency_pearson_mean=0.99,
                                                                          saliency_pearson_min=0.98),
                                                  "timm:vit_small_patch14_dinov2": row}}

    monkeypatch.setattr(fidelity, "dinov2_control", fake_control)
    out = tmp_path / "rows.json"
    assert main(["demo", "--vision", "--quiet", "--threads", "1", "--results-file", str(out)]) == 0
    assert "| hf:Dinov2Model | none | 5.5 |" in capsys.readouterr().out
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert {r["model"] for r in rows} == {"hf:Dinov2Model", "timm:vit_small_patch14_dinov2"}
    for r in rows:  # the Row layout of every other --results-file
        assert {"model", "method", "w_bits", "a_bits", "act_granularity", "static", "metric", "value",
                "seconds"} <= set(r)
        assert (r["method"], r["w_bits"], r["a_bits"], r["static"]) == ("insertquant", 8, 8, True)
        assert r["sinks_detected"] is False and r["max_probe_ratio"] == 5.5
    hf = {r["metric"]: r["value"] for r in rows if r["model"] == "hf:Dinov2Model"}
    assert hf["cls_cos_mean"] == 0.999 and hf["held_out_patch_cos_min"] == 0.99 and hf["saliency_pearson_min"] == 0.98
    timm = {r["metric"] for r in rows if r["model"] == "timm:vit_small_patch14_dinov2"}
    assert "saliency_pearson_mean" not in timm and "patch_cos_mean" in timm
    assert data["protocol"].startswith("DINOv2-S control") and seen["recipe"].sinks.known_sinks == ["cls", "registers"]
