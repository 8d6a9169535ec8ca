"""Named real data sets shipped as Debian packages (``apt-get download``), cached like :mod:`vtquant.assets`.

:mod:`vtquant.assets` fetches files out of pinned PyPI archives with pip; a few real data sets are
only packaged for Debian.  A :class:`DebAsset` pins the ``.deb`` (package, version, sha256) and the
sha256 of every file taken out of it.  :func:`fetch_deb` downloads the package with
``apt-get download PKG=VERSION`` into a temporary directory (or takes a ``.deb`` already in
``$VTQUANT_ASSET_ARCHIVES`` / ``download_dir``), verifies it, unpacks its data archive (Python's
``ar`` + ``tarfile``; ``dpkg-deb --fsys-tarfile`` for compressions ``tarfile`` lacks), verifies
each member and moves the assembled directory into ``<vtquant home>/<name>/`` with
:func:`os.replace`, beside an ``asset.json`` that records the provenance.  Nothing half-written is
ever visible; a checksum mismatch leaves the cache untouched.

Offline use: ``apt-get download PKG=VERSION`` on a machine with the Debian archive configured,
then :func:`add_deb_archive` or ``VTQUANT_ASSET_ARCHIVES=<dir holding the .deb>``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import Optional, Union

from . import assets
from .fileio import sha256_file

__all__ = ["DEB_ASSETS", "DebAsset", "add_deb_archive", "deb_asset_path", "fetch_deb", "is_deb_cached"]

_METADATA_FILE = "asset.json"


@dataclasses.dataclass(frozen=True)
class DebAsset:
    """Files out of a pinned Debian package.

    Attributes:
        name: registry key and cache sub-directory.
        package: Debian package name.
        version: exact Debian version (``apt-get download PKG=VERSION``).
        sha256: sha256 of the ``.deb`` file.
        members: ``{path inside the package: sha256}``; each is stored under its base name.
        description: what it is.
    """

    name: str
    package: str
    version: str
    sha256: str
    members: dict
    description: str

    @property
    def deb_name(self) -> str:
        """The file name apt gives the package (``:`` of an epoch escaped as ``%3a``)."""
        return f"{self.package}_{self.version.replace(':', '%3a')}_all.deb"


DEB_ASSETS: dict[str, DebAsset] = {
    a.name: a
    for a in (
        DebAsset(
            name="fashion-mnist",
            package="dataset-fashion-mnist",
            version="0.0~git20200523.55506a9-1",
            sha256="39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0",
            members={
                "usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz":
                    "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
                "usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz":
                    "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
                "usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz":
                    "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
                "usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz":
                    "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
            },
            description="Fashion-MNIST (Zalando, MIT): 70,000 28x28 grayscale product photos, 10 classes, idx format",
        ),
    )
}


def _get(name: str) -> DebAsset:
    try:
        return DEB_ASSETS[name]
    except KeyError:
        raise assets.UnknownAssetError(f"unknown Debian asset {name!r}; known: {', '.join(sorted(DEB_ASSETS))}") from None


def deb_asset_path(name: str) -> Path:
    """``<vtquant home>/<name>``: the directory holding the asset's files (whether or not cached)."""
    return assets.home() / _get(name).name


def is_deb_cached(name: str) -> bool:
    """Whether every member is in the cache and ``asset.json`` records the current pin."""
    asset = _get(name)
    root = deb_asset_path(name)
    if not all((root / PurePosixPath(m).name).is_file() for m in asset.members):
        return False
    try:
        recorded = json.loads((root / _METADATA_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return recorded.get("sha256") == asset.sha256 and recorded.get("members") == asset.members


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"vtquant: {msg}", file=sys.stderr, flush=True)


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _ar_members(deb: Path) -> dict[str, bytes]:
    """The members of a Debian ``ar`` archive (``debian-binary``, ``control.tar.*``, ``data.tar.*``)."""
    data = deb.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise assets.AssetError(f"{deb}: not a Debian package (no ar header)")
    out, pos = {}, 8
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        out[name] = data[pos + 60:pos + 60 + size]
        pos += 60 + size + (size % 2)
    return out


def _data_tar(deb: Path) -> tarfile.TarFile:
    members = _ar_members(deb)
    name = next((n for n in members if n.startswith("data.tar")), None)
    if name is None:
        raise assets.AssetError(f"{deb}: no data.tar member")
    if name in ("data.tar", "data.tar.gz", "data.tar.xz", "data.tar.bz2"):
        return tarfile.open(fileobj=io.BytesIO(members[name]), mode="r:*")
    # e.g. data.tar.zst, which tarfile cannot read: let dpkg-deb decompress it
    try:
        raw = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], check=True, stdout=subprocess.PIPE).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        raise assets.AssetError(f"{deb}: {name} needs dpkg-deb to unpack ({err})") from err
    return tarfile.open(fileobj=io.BytesIO(raw), mode="r:")


def _verify_deb(asset: DebAsset, deb: Path) -> None:
    actual = sha256_file(deb)
    if actual != asset.sha256:
        raise assets.AssetChecksumError(
            f"checksum mismatch for asset {asset.name!r} ({asset.package}={asset.version}) in {deb}:\n"
            f"    expected sha256 {asset.sha256}\n    actual   sha256 {actual}\n"
            "The file is corrupt or not the pinned package version; nothing was written to the cache.")


def _install(asset: DebAsset, deb: Path, quiet: bool) -> Path:
    _verify_deb(asset, deb)
    root = assets.home()
    root.mkdir(parents=True, exist_ok=True)
    final = root / asset.name
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{asset.name}-", dir=root))
    try:
        staging = tmp / "asset"
        staging.mkdir()
        wanted = {m.lstrip("./"): sha for m, sha in asset.members.items()}
        found = set()
        with _data_tar(deb) as tf:
            for ti in tf:
                member = ti.name.lstrip("./") if ti.name.startswith("./") else ti.name
                if member not in wanted:
                    continue
                if not ti.isreg():
                    raise assets.UnsafeArchiveError(f"{deb}: {ti.name} is not a regular file")
                data = tf.extractfile(ti).read()
                if _sha256_bytes(data) != wanted[member]:
                    raise assets.AssetChecksumError(
                        f"{deb}: member {member} has sha256 {_sha256_bytes(data)}, pinned {wanted[member]}")
                (staging / PurePosixPath(member).name).write_bytes(data)
                found.add(member)
        lost = sorted(set(wanted) - found)
        if lost:
            raise assets.AssetError(f"{deb}: no member {lost}")
        meta = {"name": asset.name, "package": asset.package, "version": asset.version, "kind": "deb",
                "sha256": asset.sha256, "archive": deb.name, "members": asset.members}
        (staging / _METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if final.exists():
            os.replace(final, tmp / "old")
        os.replace(staging, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _log(f"{asset.name}: {len(asset.members)} files at {final}", quiet)
    return final


def _candidates(asset: DebAsset, directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    prefix = f"{asset.package}_"
    return sorted(p for p in directory.iterdir() if p.is_file() and p.name.startswith(prefix) and p.suffix == ".deb")


def _apt_download(asset: DebAsset, dest: Path, quiet: bool) -> Path:
    cmd = ["apt-get", "download", f"{asset.package}={asset.version}"]
    _log(f"downloading Debian asset {asset.name!r} with: {' '.join(cmd)}", quiet)
    try:
        proc = subprocess.run(cmd, cwd=dest, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        rc, output = proc.returncode, proc.stdout or ""
    except OSError as err:
        rc, output = -1, str(err)
    found = _candidates(asset, dest) if rc == 0 else []
    if not found:
        tail = [ln for ln in assets._scrub(output).strip().splitlines() if ln.strip()][-3:]
        raise assets.AssetUnavailableError(
            f"could not download Debian asset {asset.name!r}: `{' '.join(cmd)}` "
            + (f"failed with exit status {rc}" if rc else "produced no .deb")
            + (("; apt said:\n    " + "\n    ".join(tail)) if tail else "")
            + f"\nTo provide it by hand: run `{' '.join(cmd)}` where the Debian archive is reachable, then "
            f"set {assets.ENV_ARCHIVES}=<directory holding {asset.deb_name}> or call "
            f"vtquant.assets_deb.add_deb_archive({asset.name!r}, PATH).")
    return found[0]


def fetch_deb(name: str, *, quiet: bool = False, download_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    """The directory holding the asset's files, downloading and caching them if needed.

    Lookup order: the cache; a ``.deb`` in ``$VTQUANT_ASSET_ARCHIVES`` or ``download_dir``;
    ``apt-get download``.  Every ``.deb`` and every member is verified against its pinned sha256.

    Raises:
        vtquant.assets.UnknownAssetError, AssetChecksumError, AssetUnavailableError.
    """
    asset = _get(name)
    if is_deb_cached(name):
        return deb_asset_path(name)
    dirs = [Path(os.path.expanduser(d)) for d in (os.environ.get(assets.ENV_ARCHIVES), download_dir) if d]
    for d in dirs:
        cands = _candidates(asset, d)
        if cands:
            _log(f"using pre-downloaded package {cands[0]}", quiet)
            return _install(asset, cands[0], quiet)
    root = assets.home()
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".tmp-dl-{asset.name}-", dir=root) as tmp:
        os.chmod(tmp, 0o755)  # apt's sandbox user must be able to write there
        return _install(asset, _apt_download(asset, Path(tmp), quiet), quiet)


def add_deb_archive(name: str, deb_path: Union[str, os.PathLike], *, quiet: bool = False) -> Path:
    """Install the asset from a ``.deb`` given by hand (verified), replacing any cached copy."""
    deb = Path(os.path.expanduser(str(deb_path)))
    if not deb.is_file():
        raise FileNotFoundError(f"package for asset {name!r} not found: {deb}")
    return _install(_get(name), deb, quiet)
