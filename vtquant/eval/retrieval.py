"""Flickr30k image-text retrieval (Karpathy 1K test split, 5 captions per image).

Data layouts (``--data DIR``):

* **Karpathy JSON**: ``dataset_flickr30k.json`` (the file of Karpathy's
  neuraltalk splits that most retrieval tools read: ``images[*].filename``,
  ``split``, ``sentences[*].raw``) plus the photos in ``flickr30k-images/`` (or
  beside the JSON); the ``test`` split is the standard 1,000 images / 5,000 captions.
* **datasets**: a ``save_to_disk`` directory or parquet files with an ``image``
  column and a ``caption`` column holding the list of captions (optional
  ``split`` column: rows with ``test`` are kept).

Metrics are named by what is retrieved: ``i2t_r{k}`` = images query, captions are
retrieved (text retrieval); ``t2i_r{k}`` = captions query, images are retrieved.
An image query is correct at ``k`` when any of its 5 captions is in the top ``k``.
Similarities are computed in chunks of queries, so 5K x 1K never needs more
memory than ``chunk`` x (number of candidates).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..data import load_image
from ..errors import DataError

KS = (1, 5, 10)


@torch.no_grad()
def recall_at_k(image_feats: torch.Tensor, text_feats: torch.Tensor, text_image: torch.Tensor,
                ks: Sequence[int] = KS, chunk: int = 256) -> dict:
    """Recall@k in both directions from L2-normalized features, chunked.

    Args:
        image_feats: ``[N, D]``.
        text_feats: ``[M, D]`` (M = 5 N for Flickr30k).
        text_image: ``[M]`` index of the image each caption describes.
        chunk: queries per similarity block.

    Returns:
        ``{"i2t_r1": %, ..., "t2i_r1": %, ...}``.  Ties count against the query (strict ranks).
    """
    n, m = image_feats.shape[0], text_feats.shape[0]
    text_image = text_image.to(torch.long)
    # image -> text: rank of the best-ranked correct caption
    i2t_rank = torch.empty(n, dtype=torch.long)
    for s in range(0, n, chunk):
        sims = image_feats[s:s + chunk] @ text_feats.T  # [c, M]
        rows = torch.arange(s, min(s + chunk, n))
        correct = text_image.unsqueeze(0) == rows.unsqueeze(1)  # [c, M]
        best = sims.masked_fill(~correct, float("-inf")).amax(dim=1, keepdim=True)
        i2t_rank[s:s + chunk] = (sims > best).sum(dim=1)
    # text -> image: rank of the caption's image
    t2i_rank = torch.empty(m, dtype=torch.long)
    for s in range(0, m, chunk):
        sims = text_feats[s:s + chunk] @ image_feats.T  # [c, N]
        gt = sims.gather(1, text_image[s:s + chunk].unsqueeze(1))
        t2i_rank[s:s + chunk] = (sims > gt).sum(dim=1)
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = 100.0 * float((i2t_rank < k).float().mean())
    for k in ks:
        out[f"t2i_r{k}"] = 100.0 * float((t2i_rank < k).float().mean())
    out["rsum"] = sum(out[f"i2t_r{k}"] + out[f"t2i_r{k}"] for k in ks)
    return out


class RetrievalSet:
    """Images (paths or PIL images) and their captions; ``caption_image[j]`` = image of caption ``j``."""

    def __init__(self, images: list, captions: list[str], caption_image: list[int], source: str) -> None:
        self.images, self.captions, self.caption_image, self.source = images, captions, caption_image, source

    def __len__(self) -> int:
        return len(self.images)


KARPATHY_FORMAT = ("a Karpathy split file is a JSON object {\"images\": [{\"filename\": ..., \"split\": "
                   "\"test\", \"sentences\": [{\"raw\": ...}, ...]}, ...]}")


def _karpathy_field(json_path: Path, i: int, entry: Any, key: str, kind: type) -> Any:
    """``entry[key]`` checked to be a ``kind``; else a :class:`DataError` naming the file, entry and field."""
    if not isinstance(entry, dict):
        raise DataError(f"{json_path}: images[{i}] is a {type(entry).__name__}, not an object; {KARPATHY_FORMAT}")
    if key not in entry:
        raise DataError(f"{json_path}: images[{i}] has no {key!r} field (it has {sorted(entry)}); {KARPATHY_FORMAT}")
    value = entry[key]
    if not isinstance(value, kind):
        raise DataError(f"{json_path}: images[{i}].{key} is a {type(value).__name__}, not a {kind.__name__}; "
                        f"{KARPATHY_FORMAT}")
    return value


def _caption(json_path: Path, i: int, j: int, sentence: Any) -> str:
    if isinstance(sentence, str):
        return sentence
    if isinstance(sentence, dict) and isinstance(sentence.get("raw"), str):
        return sentence["raw"]
    raise DataError(f"{json_path}: images[{i}].sentences[{j}] has no 'raw' caption text (got "
                    f"{type(sentence).__name__} {str(sentence)[:60]!r}); {KARPATHY_FORMAT}")


def read_karpathy(json_path: Path) -> list:
    """The ``images`` list of a Karpathy split file, after checking the file is such a file.

    Raises:
        DataError: not UTF-8, not JSON, not an object, no ``images`` list (the message names the file).
    """
    try:
        data = json.loads(Path(json_path).read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise DataError(f"{json_path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
                        f"{KARPATHY_FORMAT}") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{json_path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno}); "
                        f"{KARPATHY_FORMAT}") from None
    if not isinstance(data, dict):
        raise DataError(f"{json_path}: the top level is a {type(data).__name__}, not an object; {KARPATHY_FORMAT}")
    if "images" not in data:
        raise DataError(f"{json_path}: no 'images' field (it has {sorted(data)[:10]}); {KARPATHY_FORMAT}")
    if not isinstance(data["images"], list):
        raise DataError(f"{json_path}: 'images' is a {type(data['images']).__name__}, not a list; {KARPATHY_FORMAT}")
    return data["images"]


def _from_karpathy(json_path: Path, split: str, image_dir: Optional[Path]) -> RetrievalSet:
    entries = read_karpathy(json_path)
    root = image_dir
    if root is None:
        for cand in (json_path.parent / "flickr30k-images", json_path.parent / "images", json_path.parent):
            if cand.is_dir():
                root = cand
                break
    images, captions, owner = [], [], []
    splits: set = set()
    for i, entry in enumerate(entries):
        entry_split = _karpathy_field(json_path, i, entry, "split", str)
        splits.add(entry_split)
        if entry_split != split:
            continue
        filename = _karpathy_field(json_path, i, entry, "filename", str)
        sentences = _karpathy_field(json_path, i, entry, "sentences", list)
        if not sentences:
            raise DataError(f"{json_path}: images[{i}] ({filename}) has an empty 'sentences' list; each image "
                            "needs its captions (5 for Flickr30k)")
        texts = [_caption(json_path, i, j, sentence) for j, sentence in enumerate(sentences[:5])]
        subdir = entry.get("filepath", "")
        path = root / (subdir if isinstance(subdir, str) else "") / filename
        if not path.exists():
            raise FileNotFoundError(f"{json_path}: image {filename} not found under {root}; "
                                    "put the photos in flickr30k-images/ beside the JSON or pass the image folder")
        captions += texts
        owner += [len(images)] * len(texts)
        images.append(path)
    if not images:
        raise DataError(f"{json_path}: no images in split {split!r} (splits in the file: {sorted(splits)}); "
                        "pass --split with one of them")
    return RetrievalSet(images, captions, owner, f"Karpathy {json_path.name} ({split})")


def _from_datasets(root: Path, split: str) -> Optional[RetrievalSet]:
    import datasets

    if (root / "dataset_info.json").exists() or (root / "dataset_dict.json").exists() or (root / "state.json").exists():
        ds = datasets.load_from_disk(str(root))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split] if split in ds else ds[next(iter(ds))]
    else:
        shards = sorted(root.glob("**/*.parquet"))
        if not shards:
            return None
        ds = datasets.load_dataset("parquet", data_files=[str(s) for s in shards], split="train")
    cap_col = "caption" if "caption" in ds.column_names else ("captions" if "captions" in ds.column_names else None)
    if "image" not in ds.column_names or cap_col is None:
        raise DataError(f"{root}: a datasets retrieval layout needs 'image' and 'caption' columns, has {ds.column_names}")
    if "split" in ds.column_names:
        ds = ds.filter(lambda row: row["split"] == split)
    images, captions, owner = [], [], []
    for row in ds:
        caps = row[cap_col]
        caps = [caps] if isinstance(caps, str) else list(caps)[:5]
        for c in caps:
            captions.append(c)
            owner.append(len(images))
        images.append(row["image"])
    return RetrievalSet(images, captions, owner, f"datasets {root} ({split})")


def load_flickr30k(data: str, split: str = "test") -> RetrievalSet:
    """Flickr30k (or any Karpathy-format set) from ``data`` (see the module docstring).

    Raises:
        FileNotFoundError: neither layout was found (the message shows both), or a listed image is missing.
        DataError: a malformed split file (the message names the file, the entry and the field).
    """
    root = Path(data)
    if root.is_file() and root.suffix == ".json":
        return _from_karpathy(root, split, None)
    for name in ("dataset_flickr30k.json", "dataset_coco.json", "dataset.json"):
        if (root / name).exists():
            return _from_karpathy(root / name, split, None)
    if root.is_dir():
        found = _from_datasets(root, split)
        if found is not None:
            return found
    raise FileNotFoundError(
        f"no retrieval data under {root}: expected dataset_flickr30k.json (Karpathy splits) with the photos in "
        f"{root}/flickr30k-images/, or a datasets directory with 'image' and 'caption' columns")


@torch.no_grad()
def encode_retrieval_set(rset: RetrievalSet, encode_image: Callable, encode_text: Callable, preprocess: Callable,
                         tokenizer: Callable, batch_size: int = 64, quiet: bool = False) -> tuple:
    """L2-normalized ``(image_feats [N, D], text_feats [M, D], caption_image [M])``."""
    feats_i, feats_t = [], []
    for s in tqdm(range(0, len(rset.images), batch_size), desc="encode images", disable=quiet, leave=False):
        batch = []
        for src in rset.images[s:s + batch_size]:
            img = load_image(src) if isinstance(src, (str, Path)) else src.convert("RGB")
            batch.append(preprocess(img))
        feats_i.append(encode_image(torch.stack(batch)).float())
    for s in tqdm(range(0, len(rset.captions), batch_size), desc="encode captions", disable=quiet, leave=False):
        feats_t.append(encode_text(tokenizer(rset.captions[s:s + batch_size])).float())
    img = torch.cat(feats_i)
    txt = torch.cat(feats_t)
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    return img, txt, torch.tensor(rset.caption_image)


def retrieval_metrics(rset: RetrievalSet, encode_image: Callable, encode_text: Callable, preprocess: Callable,
                      tokenizer: Callable, batch_size: int = 64, chunk: int = 256, quiet: bool = False) -> dict:
    img, txt, owner = encode_retrieval_set(rset, encode_image, encode_text, preprocess, tokenizer, batch_size, quiet)
    out = recall_at_k(img, txt, owner, chunk=chunk)
    out.update(images=len(rset.images), captions=len(rset.captions))
    return out
