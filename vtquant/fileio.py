"""Small file helpers shared by recipes, checkpoints, assets and results: atomic text writes and
streamed sha256 digests."""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Union

CHUNK = 1 << 20


@contextlib.contextmanager
def atomic_output(path: Union[str, Path], mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary sibling path to write ``path``'s content to; on success it gets ``mode`` and
    replaces ``path`` (``os.replace``), on any error it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Union[str, Path], text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling file and ``os.replace``."""
    with atomic_output(path) as tmp:
        tmp.write_text(text)


def sha256_file(path: Union[str, Path]) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()
