"""ImageNet / Flickr30k evaluators on generated fixtures in the real on-disk formats (no download).

* ImageNet: an ImageFolder of WordNet-id folders and the datasets layouts (``save_to_disk`` and
  the hub's ``data/validation-*.parquet`` shards); every class has its own solid colour, so an
  "oracle" classifier that reads the colour must score top-1 = 100 % when the loader maps
  folders / labels to the standard ImageNet indices, and a shifted one must score 0 %.
* Flickr30k: a small ``dataset_flickr30k.json`` (Karpathy format: train / val / test entries,
  5 sentences each) with its photos, and a datasets layout; a CLIP-like "oracle" encoder
  makes every caption name its image's colour, so R@1 is 100 % both ways.
* The chunked recall is checked against a naive full-matrix reference on random features.
"""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from vtquant.eval.imagenet import (imagenet_class_names, imagenet_wnids, load_imagenet, loader, topk_accuracy,
                                   zero_shot_classifier, zero_shot_logits)
from vtquant.eval.retrieval import load_flickr30k, recall_at_k, retrieval_metrics

WNIDS = ["n01440764", "n01443537", "n02085620", "n04037443"]  # tench, goldfish, Chihuahua, racer
COLOURS = [(230, 20, 20), (20, 230, 20), (20, 20, 230), (230, 230, 20)]


def _to_tensor(img):
    import numpy as np

    return torch.from_numpy(np.asarray(img.convert("RGB").resize((8, 8)), dtype=np.float32)).permute(2, 0, 1) / 255


def _colour_index(images: torch.Tensor) -> torch.Tensor:
    mean = images.mean(dim=(2, 3))  # [B, 3]
    ref = torch.tensor(COLOURS, dtype=torch.float32) / 255
    return torch.cdist(mean, ref).argmin(dim=1)


def _image(colour, seed):
    gen = torch.Generator().manual_seed(seed)
    noise = (torch.rand(24, 24, 3, generator=gen) * 20).to(torch.uint8)
    base = torch.tensor(colour, dtype=torch.uint8).view(1, 1, 3).expand(24, 24, 3)
    return Image.fromarray((base.int() + noise.int() - 10).clamp(0, 255).to(torch.uint8).numpy())


@pytest.fixture(scope="module")
def imagenet_dirs(tmp_path_factory):
    return make_imagenet_fixture(tmp_path_factory.mktemp("imagenet"))


def make_imagenet_fixture(root):
    """4 classes x 3 images: ImageFolder (``folder/val/<wnid>``), ``hf_disk`` and ``hf_parquet``."""
    folder = root / "folder"
    records = {"image": [], "label": []}
    wnids = imagenet_wnids()
    for c, (wnid, colour) in enumerate(zip(WNIDS, COLOURS)):
        (folder / "val" / wnid).mkdir(parents=True)
        for i in range(3):
            img = _image(colour, 10 * c + i)
            img.save(folder / "val" / wnid / f"ILSVRC2012_val_{c}{i:07d}.JPEG", quality=95)
            records["image"].append(img)
            records["label"].append(wnids.index(wnid))
    import datasets

    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=wnids)})
    ds = datasets.Dataset.from_dict(records, features=feats)
    ds.save_to_disk(str(root / "hf_disk"))
    (root / "hf_parquet" / "data").mkdir(parents=True)
    ds.to_parquet(str(root / "hf_parquet" / "data" / "validation-00000-of-00001.parquet"))
    return root


def _oracle(images):
    """Logits [B, 1000] that put the mass on the ImageNet index of the image's colour."""
    wnids = imagenet_wnids()
    idx = torch.tensor([wnids.index(WNIDS[c]) for c in _colour_index(images)])
    return torch.nn.functional.one_hot(idx, 1000).float()


@pytest.mark.parametrize("layout", ["folder", "hf_disk", "hf_parquet"])
def test_imagenet_layouts_and_topk(imagenet_dirs, layout):
    ds = load_imagenet(str(imagenet_dirs / layout), _to_tensor)
    assert len(ds) == 12
    assert ds.class_names[:2] == ["tench", "goldfish"]  # the names timm ships, by standard index
    res = topk_accuracy(_oracle, loader(ds, batch_size=5), quiet=True)
    assert res == {"top1": 100.0, "top5": 100.0, "images": 12}
    shifted = topk_accuracy(lambda x: _oracle(x).roll(1, dims=1), loader(ds, batch_size=5), quiet=True)
    assert shifted["top1"] == 0.0
    # the right class is second: top-5 still finds it
    second = topk_accuracy(lambda x: _oracle(x) * 0.5 + _oracle(x).roll(1, dims=1), loader(ds, 5), quiet=True)
    assert (second["top1"], second["top5"]) == (0.0, 100.0)


def test_imagenet_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="ImageFolder"):
        load_imagenet(str(tmp_path), _to_tensor)


def test_zero_shot_classifier_with_an_oracle_text_encoder(imagenet_dirs):
    """Zero-shot classification: the prompt ensemble of a class whose name matches the colour wins."""
    names = imagenet_class_names()
    target_names = {names[imagenet_wnids().index(w)]: c for c, w in enumerate(WNIDS)}
    vocab = {n: i for i, n in enumerate(names)}

    def tokenizer(texts):  # each prompt -> id of the class name it contains
        return torch.tensor([next(vocab[n] for n in sorted(vocab, key=len, reverse=True) if n in t) for t in texts])

    def encode_text(ids):  # class name -> colour embedding (+ template-independent)
        out = torch.full((len(ids), 3), 0.01)
        for j, i in enumerate(ids.tolist()):
            if names[i] in target_names:
                out[j] = torch.tensor(COLOURS[target_names[names[i]]], dtype=torch.float32) / 255
        return out

    def encode_image(x):
        return x.mean(dim=(2, 3))

    classes = [names[imagenet_wnids().index(w)] for w in WNIDS]
    templates = ["a photo of a {}.", "a bad photo of the {}."]
    clf = zero_shot_classifier(encode_text, tokenizer, classes, templates, quiet=True)
    assert clf.shape == (3, 4)
    ds = load_imagenet(str(imagenet_dirs / "folder"), _to_tensor)
    wn = imagenet_wnids()
    remap = {wn.index(w): c for c, w in enumerate(WNIDS)}
    ds.items = [(p, remap[t]) for p, t in ds.items]
    res = topk_accuracy(zero_shot_logits(encode_image, clf), loader(ds, 6), quiet=True)
    assert res["top1"] == 100.0


# ------------------------------------------------------------------------------------------
def _naive_recall(img, txt, owner, ks=(1, 5, 10)):
    sims = img @ txt.T  # [N, M] in full
    out = {}
    i2t = []
    for i in range(img.shape[0]):
        order = sims[i].argsort(descending=True).tolist()
        i2t.append(min(order.index(j) for j in range(txt.shape[0]) if owner[j] == i))
    t2i = []
    for j in range(txt.shape[0]):
        order = sims[:, j].argsort(descending=True).tolist()
        t2i.append(order.index(int(owner[j])))
    for k in ks:
        out[f"i2t_r{k}"] = 100.0 * sum(r < k for r in i2t) / len(i2t)
    for k in ks:
        out[f"t2i_r{k}"] = 100.0 * sum(r < k for r in t2i) / len(t2i)
    return out


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_recall_matches_naive_full_matrix(chunk):
    gen = torch.Generator().manual_seed(0)
    n = 40
    img = torch.nn.functional.normalize(torch.randn(n, 16, generator=gen), dim=-1)
    owner = torch.arange(n).repeat_interleave(5)
    txt = torch.nn.functional.normalize(img[owner] + 0.9 * torch.randn(5 * n, 16, generator=gen), dim=-1)
    got = recall_at_k(img, txt, owner, chunk=chunk)
    ref = _naive_recall(img, txt, owner)
    for key, value in ref.items():
        assert got[key] == pytest.approx(value), key
    assert 0 < got["i2t_r1"] < 100 and 0 < got["t2i_r1"] < 100  # not a degenerate case


COLOUR_WORDS = ["red", "green", "blue", "yellow"]


@pytest.fixture(scope="module")
def flickr_dirs(tmp_path_factory):
    return make_flickr_fixture(tmp_path_factory.mktemp("flickr"))


def make_flickr_fixture(root):
    """6 images (train, val, 4 x test), 5 captions each: ``karpathy/`` (JSON + photos) and ``hf_disk``."""
    kar = root / "karpathy"
    (kar / "flickr30k-images").mkdir(parents=True)
    entries, records = [], {"image": [], "caption": [], "split": []}
    splits = ["train", "val", "test", "test", "test", "test"]
    for i, split in enumerate(splits):
        c = i % 4
        img = _image(COLOURS[c], 100 + i)
        fname = f"{1000 + i}.jpg"
        img.save(kar / "flickr30k-images" / fname, quality=95)
        caps = [f"a {COLOUR_WORDS[c]} thing number {k}" for k in range(5)]
        entries.append({"filename": fname, "imgid": i, "split": split,
                        "sentences": [{"raw": s, "tokens": s.split(), "imgid": i, "sentid": 5 * i + k}
                                      for k, s in enumerate(caps)]})
        records["image"].append(img)
        records["caption"].append(caps)
        records["split"].append(split)
    (kar / "dataset_flickr30k.json").write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
    import datasets

    datasets.Dataset.from_dict(records, features=datasets.Features({
        "image": datasets.Image(), "caption": datasets.Sequence(datasets.Value("string")),
        "split": datasets.Value("string")})).save_to_disk(str(root / "hf_disk"))
    return root


@pytest.mark.parametrize("layout", ["karpathy", "hf_disk"])
def test_flickr_layouts_and_recall(flickr_dirs, layout):
    rset = load_flickr30k(str(flickr_dirs / layout))
    assert len(rset.images) == 4 and len(rset.captions) == 20  # the test split only, 5 captions each
    assert rset.caption_image == [i for i in range(4) for _ in range(5)]

    def tokenizer(texts):
        return torch.tensor([COLOUR_WORDS.index(t.split()[1]) for t in texts])

    def encode_text(ids):
        return torch.tensor(COLOURS, dtype=torch.float32)[ids] / 255

    def encode_image(x):
        return x.mean(dim=(2, 3))

    res = retrieval_metrics(rset, encode_image, encode_text, _to_tensor, tokenizer, batch_size=3, chunk=2, quiet=True)
    # the 4 test images have 4 different colours (2, 3, 0, 1), so the oracle ranks the right pairs first
    assert res["i2t_r1"] == 100.0 and res["t2i_r1"] == 100.0
    assert (res["images"], res["captions"]) == (4, 20)


def test_flickr_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset_flickr30k.json"):
        load_flickr30k(str(tmp_path))
