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


def _from_karpathy(json_path: Path, split: str, image_dir: Optional[Path]) -> RetrievalSet:
    data = json.loads(json_path.read_text())
    if "images" not in data:
        raise ValueError(f"{json_path}: not a Karpathy split file (no 'images' list)")
    root = image_dir
    if root is None:
        for cand in (json_path.parent / "flickr30k-images", json_path.parent / "images", json_path.parent):
            if cand.is_dir():
                root = cand
                break
    images, captions, owner = [], [], []
    for entry in data["images"]:
        if entry.get("split") != split:
            continue
        path = root / entry.get("filepath", "") / entry["filename"]
        if not path.exists():
            raise FileNotFoundError(f"{json_path}: image {entry['filename']} not found under {root}; "
                                    "put the photos in flickr30k-images/ beside the JSON or pass the image folder")
        sents = [s["raw"] if isinstance(s, dict) else str(s) for s in entry["sentences"]][:5]
        for s in sents:
            captions.append(s)
            owner.append(len(images))
        images.append(path)
    if not images:
        raise ValueError(f"{json_path}: no images in split {split!r}")
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
        raise ValueError(f"{root}: a datasets retrieval layout needs 'image' and 'caption' columns, has {ds.column_names}")
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
        FileNotFoundError: neither layout was found (the message shows both).
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
    from PIL import Image

    feats_i, feats_t = [], []
    for s in tqdm(range(0, len(rset.images), batch_size), desc="encode images", disable=quiet, leave=False):
        batch = []
        for src in rset.images[s:s + batch_size]:
            img = Image.open(src) if isinstance(src, (str, Path)) else src
            batch.append(preprocess(img.convert("RGB")))
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
