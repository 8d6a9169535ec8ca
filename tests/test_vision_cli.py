"""`vtquant eval imagenet|retrieval` end to end on the fixtures of test_vision_eval (random weights)."""
from __future__ import annotations

import json

import pytest
import torch

from vtquant.cli import main

from test_vision_eval import make_flickr_fixture, make_imagenet_fixture


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread, immune to contention


def test_cli_eval_imagenet_timm(tmp_path, capsys):
    data = make_imagenet_fixture(tmp_path / "in")
    out = tmp_path / "rows.json"
    rc = main(["eval", "imagenet", "--model", "timm:vit_tiny_patch16_224", "--no-pretrained",
               "--recipe", "recipes/timm/deit_small_patch16_224.yaml", "--data", str(data / "folder"),
               "--batch-size", "6", "--quiet", "--threads", "1", "--results-file", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["metric"]) for r in rows] == [("fp", "top1"), ("fp", "top5"),
                                                          ("insertquant", "top1"), ("insertquant", "top5")]
    assert all(r["images"] == 12 and 0 <= r["value"] <= 100 for r in rows)
    assert rows[2]["w_bits"] == 8 and rows[2]["a_bits"] == 8 and rows[2]["static"] is True
    assert "| insertquant |" in capsys.readouterr().out


def test_cli_eval_retrieval_open_clip(tmp_path):
    data = make_flickr_fixture(tmp_path / "fl")
    out = tmp_path / "rows.json"
    rc = main(["eval", "retrieval", "--model", "open_clip:ViT-S-32", "--no-pretrained",
               "--recipe", "recipes/open_clip/ViT-B-32.yaml", "--data", str(data / "karpathy"),
               "--batch-size", "4", "--quiet", "--threads", "1", "--results-file", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    metrics = [r["metric"] for r in result["rows"] if r["method"] == "insertquant"]
    assert metrics == ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"]
    assert all(r["images"] == 4 and r["captions"] == 20 for r in result["rows"])
    assert set(result["reports"]["insertquant"]) == {"visual", "text"}


def test_cli_vision_errors_name_the_fix(tmp_path, capsys):
    assert main(["eval", "imagenet", "--model", "timm:vit_tiny_patch16_224", "--no-pretrained", "--quiet"]) == 2
    assert "--data" in capsys.readouterr().err
    assert main(["eval", "retrieval", "--model", "resnet50", "--data", str(tmp_path), "--quiet"]) == 2
    assert "timm:NAME" in capsys.readouterr().err
