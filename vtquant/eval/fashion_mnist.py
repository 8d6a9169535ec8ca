"""Fashion-MNIST (Xiao et al. 2017): the real labelled image set available here, read from its idx files.

The data come from the Debian package ``dataset-fashion-mnist`` (asset ``fashion-mnist`` of
:mod:`vtquant.assets_deb`): ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``, 60,000 training
and 10,000 test images, 28 x 28 uint8 grayscale, 10 classes.  :func:`read_idx` parses the idx
format (big-endian magic ``0 0 <dtype> <ndim>``, ``ndim`` big-endian uint32 sizes, then the data),
gzip-compressed or not, with numpy only.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np

ASSET = "fashion-mnist"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: Union[str, os.PathLike]) -> np.ndarray:
    """An idx file (``.gz`` or raw) as a numpy array of its declared type and shape.

    Raises:
        ValueError: a bad magic number, an unknown type code, or a size that does not match the header.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an idx file (magic {data[:4]!r})")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown idx type code 0x{code:02x}")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - offset != expected:
        raise ValueError(f"{path}: header says {dims} x {dtype} ({expected} bytes), file has {len(data) - offset}")
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(dims).astype(dtype.newbyteorder("="))


def load_fashion_mnist(split: str = "train", *, root: Optional[Union[str, os.PathLike]] = None,
                       quiet: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, 28, 28], labels int64 [N])`` of the ``train`` (60k) or ``test`` (10k) split.

    Args:
        split: ``"train"`` or ``"test"``.
        root: a directory holding the four idx files (default: the cached asset, fetched on first use).
        quiet: no progress lines.
    """
    if split not in FILES:
        raise ValueError(f"split {split!r}: use 'train' or 'test'")
    if root is None:
        from ..assets_deb import fetch_deb

        root = fetch_deb(ASSET, quiet=quiet)
    images_file, labels_file = (Path(root) / f for f in FILES[split])
    images, labels = read_idx(images_file), read_idx(labels_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{root}: {split} images {images.shape} and labels {labels.shape} do not pair up")
    return images, labels.astype(np.int64)


def subset_indices(n: int, size: Optional[int], seed: int = 0) -> np.ndarray:
    """Sorted indices of a seeded random subset of ``size`` out of ``n`` (all of them for ``None`` or ``size >= n``)."""
    if size is None or size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:size])


def sample(images: np.ndarray, labels: np.ndarray, n: Optional[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random subset of ``n`` images (see :func:`subset_indices`); the arrays themselves for all."""
    if n is None or n >= len(images):
        return images, labels
    idx = subset_indices(len(images), n, seed)
    return images[idx], labels[idx]
