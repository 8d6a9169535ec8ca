"""The vtquant command: argument surface and clear errors (no model downloads here)."""
import json

import pytest

from vtquant.cli import build_parser, main


def test_every_subcommand_takes_quiet_and_results_file():
    parser = build_parser()
    for argv in (["demo"], ["analyze"], ["quantize", "--recipe", "r.yaml", "--out", "o"], ["eval", "perplexity"],
                 ["bench"], ["assets"], ["compare"]):
        args = parser.parse_args(argv + ["--quiet", "--results-file", "x.json"])
        assert args.quiet and args.results_file == "x.json"


def test_demo_defaults_state_the_evaluated_part():
    args = build_parser().parse_args(["demo"])
    assert args.eval_chunks == 8 and args.seq_len == 512 and not args.full and args.bos == "none"


def test_assets_lists_and_writes_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VTQUANT_HOME", str(tmp_path / "home"))
    out = tmp_path / "assets.json"
    assert main(["assets", "--results-file", str(out)]) == 0
    text = capsys.readouterr().out
    assert "smollm2-135m" in text and "austen-lady-susan" in text and "shakespeare" in text
    rows = json.loads(out.read_text())["assets"]
    assert {r["name"] for r in rows} >= {"smollm2-135m", "austen-lady-susan", "shakespeare"}
    assert not any(r["cached"] for r in rows)


def test_missing_model_file_is_a_clear_error(tmp_path, capsys):
    code = main(["eval", "perplexity", "--model-file", str(tmp_path / "nope.gguf"), "--quiet"])
    assert code == 2
    assert "nope.gguf" in capsys.readouterr().err


def test_bad_recipe_key_is_named(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("version: 1\nweigths: {bits: 8}\n")
    code = main(["quantize", "--recipe", str(recipe), "--out", str(tmp_path / "o"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "weigths" in err and "weights" in err
    assert not (tmp_path / "o").exists()


def test_unknown_subcommand_exits():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["frobnicate"])
