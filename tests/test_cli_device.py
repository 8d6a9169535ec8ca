"""``--device`` / ``--dtype`` on the commands that run language models (CPU side)."""
import argparse

import pytest
import torch

from vtquant.cli import DTYPES, _place, build_parser, main
from vtquant.config import ConfigError

REQUIRED = {"quantize": ["--recipe", "r.yaml", "--out", "o"], "eval": ["perplexity"]}


@pytest.mark.parametrize("command", ["demo", "compare", "analyze", "quantize", "eval"])
def test_model_commands_take_device_and_dtype(command):
    parser = build_parser()
    args = parser.parse_args([command, *REQUIRED.get(command, []), "--device", "cuda:1", "--dtype", "bfloat16"])
    assert args.device == "cuda:1" and args.dtype == "bfloat16"
    args = parser.parse_args([command, *REQUIRED.get(command, [])])
    assert args.device == "cpu" and args.dtype == "float32"
    with pytest.raises(SystemExit):
        parser.parse_args([command, *REQUIRED.get(command, []), "--dtype", "int8"])


def test_place_moves_the_model_and_refuses_missing_devices():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    log = []
    for dtype in DTYPES:
        _place(model, argparse.Namespace(device="cpu", dtype=dtype), log.append)
        assert all(p.dtype == getattr(torch, dtype) and p.device.type == "cpu" for p in model.parameters())
    assert any("bfloat16" in m for m in log)
    with pytest.raises(ConfigError, match="not a device name"):
        _place(model, argparse.Namespace(device="gpu0", dtype="float32"), log.append)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no such CUDA GPU"):
            _place(model, argparse.Namespace(device="cuda", dtype="float32"), log.append)
    with pytest.raises(ConfigError, match="cpu or cuda"):
        _place(model, argparse.Namespace(device="meta", dtype="float32"), log.append)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_missing_gpu_is_a_one_line_error(capsys):
    code = main(["eval", "perplexity", "--methods", "fp", "--eval-chunks", "1", "--seq-len", "64", "--device", "cuda",
                 "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--device cuda" in err[0]


def test_language_model_is_read_in_its_dtype(tmp_path, monkeypatch):
    """``--dtype bfloat16``: the checkpoint is read in bf16 by transformers (never held in float32 first)."""
    import transformers

    from vtquant.cli import _load

    seen = {}
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*a, **kw):
        seen["dtype"] = kw.get("dtype")
        return real(*a, **kw)

    from vtquant.adapters.hf_decoder import tiny_config

    folder = tmp_path / "m"
    transformers.LlamaForCausalLM(tiny_config(vocab_size=64)).save_pretrained(folder)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: None)
    args = argparse.Namespace(model=str(folder), model_file=None, quiet=True, threads=1, device="cpu", dtype="bfloat16")
    model, _, _ = _load(args, lambda s: None)
    assert seen["dtype"] == torch.bfloat16 and next(model.parameters()).dtype == torch.bfloat16
    assert "loaded in bfloat16" in model.vtquant_fp_reference
