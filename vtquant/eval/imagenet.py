"""ImageNet top-1 / top-5: classifiers (timm, HF) and CLIP zero-shot classification.

Data layouts (``--data DIR``):

* **ImageFolder**: ``DIR/val/<class>/*.JPEG`` (or ``DIR/<class>/*``).  Folders named by
  WordNet id (``n01440764``) get the standard ImageNet-1k index (the order timm
  ships), so a subset of classes still scores a 1000-way model correctly;
  other folder names are indexed in sorted order and used as class names.
* **datasets imagenet-1k**: a ``save_to_disk`` directory, or the hub's parquet
  shards (``DIR/data/validation-*.parquet``), with ``image`` and ``label`` columns.

Preprocessing is the model's own eval transform (timm ``resolve_data_config`` +
``create_transform``, open_clip's ``preprocess``, the HF image processor), the
same for the full-precision and the quantized run.  CLIP zero-shot uses OpenAI's
80 ImageNet prompt templates (from open_clip; 7 of them inline as a fallback)
and the class names timm ships (first lemma of each synset).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".JPEG")
_WNID = re.compile(r"^n\d{8}$")
SIMPLE_TEMPLATES = ("itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
                    "a {} in a video game.", "art of the {}.", "a photo of the small {}.")


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k WordNet ids in class-index order (as timm ships them)."""
    from timm.data import ImageNetInfo

    return list(ImageNetInfo().label_names())


def imagenet_class_names() -> list[str]:
    """Readable class names in class-index order: the first lemma of each synset timm ships."""
    from timm.data import ImageNetInfo

    return [d.split(",")[0].strip() for d in ImageNetInfo().label_descriptions()]


def prompt_templates() -> list[Callable[[str], str]]:
    """OpenAI CLIP's 80 ImageNet templates (from open_clip), or 7 of them when open_clip is absent."""
    try:
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

        return list(OPENAI_IMAGENET_TEMPLATES)
    except ImportError:
        return [lambda c, t=t: t.format(c) for t in SIMPLE_TEMPLATES]


class ImageList(torch.utils.data.Dataset):
    """``(path or PIL image, target)`` pairs with a transform."""

    def __init__(self, items: Sequence[tuple[Any, int]], transform: Callable, class_names: list[str],
                 layout: str) -> None:
        self.items = list(items)
        self.transform = transform
        self.class_names = class_names
        self.layout = layout

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from ..data import load_image

        src, target = self.items[i]
        img = load_image(src) if isinstance(src, (str, Path)) else src.convert("RGB")
        return self.transform(img), target


def _image_folder(root: Path) -> Optional[tuple[list, list[str]]]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    if not classes:
        return None
    if all(_WNID.match(c) for c in classes):
        wnids = imagenet_wnids()
        index = {w: i for i, w in enumerate(wnids)}
        unknown = [c for c in classes if c not in index]
        if unknown:
            raise DataError(f"{root}: folders {unknown[:5]} are not ImageNet-1k WordNet ids; name class folders "
                            "by WordNet id (n01440764...) or all by readable names")
        names = imagenet_class_names()
        targets = {c: index[c] for c in classes}
    else:
        names = classes
        targets = {c: i for i, c in enumerate(classes)}
    items = []
    for c in classes:
        for f in sorted((root / c).iterdir()):
            if f.suffix in IMAGE_EXTENSIONS or f.suffix.lower() in IMAGE_EXTENSIONS:
                items.append((f, targets[c]))
    return items, names


def _hf_dataset(root: Path, split: str) -> Optional[Any]:
    try:
        import datasets
    except ImportError:  # pragma: no cover
        return None
    if (root / "dataset_info.json").exists() or (root / "dataset_dict.json").exists() or (root / "state.json").exists():
        ds = datasets.load_from_disk(str(root))
        if isinstance(ds, datasets.DatasetDict):
            key = split if split in ds else ("validation" if "validation" in ds else next(iter(ds)))
            ds = ds[key]
        return ds
    shards = sorted(root.glob(f"**/{split}-*.parquet")) or sorted(root.glob("**/validation-*.parquet"))
    if shards:
        return datasets.load_dataset("parquet", data_files=[str(s) for s in shards], split="train")
    return None


def load_imagenet(data: str, transform: Callable, split: str = "val", limit: Optional[int] = None) -> ImageList:
    """The evaluation images of ``data`` in either supported layout (see the module docstring).

    Raises:
        FileNotFoundError: ``data`` holds neither layout (the message shows both).
    """
    root = Path(data)
    for candidate in (root / split, root / "validation", root):
        found = _image_folder(candidate) if candidate.is_dir() else None
        if found and found[0]:
            items, names = found
            if limit:
                items = items[:limit]
            return ImageList(items, transform, names, f"ImageFolder {candidate}")
    ds = _hf_dataset(root, "validation" if split == "val" else split)
    if ds is not None:
        if limit:
            ds = ds.select(range(min(limit, len(ds))))
        if "label" not in ds.column_names or "image" not in ds.column_names:
            raise DataError(f"{root}: a datasets layout needs 'image' and 'label' columns, has {ds.column_names}")
        try:
            names = list(ds.features["label"].names)
            if len(names) == 1000:
                names = imagenet_class_names()
        except AttributeError:
            names = imagenet_class_names()
        items = [(row["image"], int(row["label"])) for row in ds]
        return ImageList(items, transform, names, f"datasets {root}")
    raise FileNotFoundError(
        f"no ImageNet data under {root}: expected an ImageFolder ({root}/{split}/<wnid>/*.JPEG) or a datasets "
        f"imagenet-1k directory (save_to_disk, or {root}/data/validation-*.parquet)")


def loader(dataset: torch.utils.data.Dataset, batch_size: int = 64, workers: int = 0) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)


@torch.no_grad()
def topk_accuracy(logits_fn: Callable[[torch.Tensor], torch.Tensor], data: torch.utils.data.DataLoader,
                  quiet: bool = False, desc: str = "imagenet") -> dict:
    """``{"top1": %, "top5": %, "images": n}`` of ``logits_fn(images)`` against the targets."""
    correct1 = correct5 = total = 0
    for images, targets in tqdm(data, desc=desc, disable=quiet, leave=False):
        logits = logits_fn(images)
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices.cpu()
        hits = top == targets.view(-1, 1)
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(dim=1).sum())
        total += len(targets)
    if total == 0:
        raise DataError("no evaluation images: check --data")
    return {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total, "images": total}


@torch.no_grad()
def zero_shot_classifier(encode_text: Callable, tokenizer: Callable, class_names: Sequence[str],
                         templates: Optional[Sequence] = None, quiet: bool = False) -> torch.Tensor:
    """``[D, C]`` CLIP zero-shot weights: per class, the normalized mean of the normalized prompt embeddings."""
    templates = templates if templates is not None else prompt_templates()
    weights = []
    for name in tqdm(class_names, desc="zero-shot classifier", disable=quiet, leave=False):
        texts = [t(name) if callable(t) else t.format(name) for t in templates]
        emb = encode_text(tokenizer(texts)).float()
        emb = emb / emb.norm(dim=-1, keepdim=True)
        mean = emb.mean(dim=0)
        weights.append(mean / mean.norm())
    return torch.stack(weights, dim=1)


def zero_shot_logits(encode_image: Callable, classifier: torch.Tensor) -> Callable:
    def logits(images: torch.Tensor) -> torch.Tensor:
        feats = encode_image(images).float()
        feats = feats / feats.norm(dim=-1, keepdim=True)
        return 100.0 * feats @ classifier.to(feats.device)
    return logits
