"""ONNX export (vtquant.export): QDQ graph with the sink insertion as constants, run in onnxruntime."""
from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

import vtquant
from vtquant.config import Recipe, SinkConfig, method_recipe
from vtquant.core.quant import QuantLinear
from vtquant.core.templates import ResidualRestore
from vtquant.export import export_mode, export_onnx

from sinkmodels import implanted_decoder, token_batches

# ORT and PyTorch compute the same int8 grid; a value within float round-off of a rounding
# boundary may land on the neighbouring code (one step of one activation), which moves some
# logits by ~4e-3 (logits are ~1 here).  So: max |diff| <= MAX_ABS, and almost all logits agree
# to float round-off.
MAX_ABS = 2e-2
EXACT = 1e-5
MIN_EXACT_SHARE = 0.97


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread, immune to contention


@pytest.fixture(scope="module")
def fp_model():
    return implanted_decoder()


@pytest.fixture(scope="module", params=["insertquant", "insertquant+rotate"])
def exported(request, fp_model, tmp_path_factory):
    q = copy.deepcopy(fp_model)
    vtquant.quantize_(q, method_recipe(request.param, Recipe()), token_batches(), quiet=True)
    path = export_onnx(q, token_batches(n=1, seed=3)[0], tmp_path_factory.mktemp("onnx") / "model.onnx")
    return request.param, q, path


def _constants(graph: onnx.GraphProto) -> list[np.ndarray]:
    out = [numpy_helper.to_array(t) for t in graph.initializer]
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    out.append(numpy_helper.to_array(attr.t))
    return out


def _has_constant(consts: list[np.ndarray], value: torch.Tensor) -> bool:
    v = value.detach().float().numpy().reshape(-1)
    return any(c.size == v.size and c.dtype == np.float32 and np.array_equal(c.reshape(-1), v) for c in consts)


def test_graph_has_qdq_int8_weights_and_sink_constants(exported):
    method, q, path = exported
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    graph = model.graph
    ops = Counter(n.op_type for n in graph.node)
    qlins = [m for m in q.modules() if isinstance(m, QuantLinear)]
    assert ops["QuantizeLinear"] == len(qlins)  # one static activation QDQ per quantized Linear
    assert ops["DequantizeLinear"] == 2 * len(qlins)  # + one per int8 weight

    inits = {t.name: t for t in graph.initializer}
    weight_dq = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                 and inits[n.input[0]].data_type == onnx.TensorProto.INT8]
    assert len(weight_dq) == len(qlins)
    for node in weight_dq:  # per-axis (output channel) dequantization
        assert [a.i for a in node.attribute if a.name == "axis"] == [0]
    codes = {numpy_helper.to_array(inits[n.input[0]]).tobytes() for n in weight_dq}
    assert codes == {m.qweight.numpy().tobytes() for m in qlins}  # the int8 codes themselves
    act_q = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    scales = {float(numpy_helper.to_array(inits[n.input[1]])) for n in act_q if n.input[1] in inits}
    assert scales == {float(m.act.scale) for m in qlins}  # static per-tensor scales

    consts = _constants(graph)
    guarded = [m for m in qlins if m.guard is not None and m.guard.mode == "template"]
    assert guarded
    for m in guarded:  # template outputs are graph constants
        assert _has_constant(consts, m.guard.template_out[0]), m.name
    restores = [m for m in q.modules() if isinstance(m, ResidualRestore)]
    assert restores and all(_has_constant(consts, r.template[0]) for r in restores)


def test_onnxruntime_matches_pytorch_quantized_model(exported):
    method, q, path = exported
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    diffs = []
    for i, (batch, seq) in enumerate([(2, 32), (3, 20), (1, 48), (2, 32)]):
        x = token_batches(n=1, batch=batch, seq=seq, seed=40 + i)[0]  # the sink token at position 0
        with torch.no_grad():
            ref = q(input_ids=x).logits
            assert q.vtquant.sink_positions() == [[0]] * batch
            with export_mode(q):  # the exportable forward is the default forward, bit for bit
                torch.testing.assert_close(q(input_ids=x).logits, ref, atol=0, rtol=0)
        got = torch.from_numpy(sess.run(["logits"], {"input_ids": x.numpy()})[0])
        assert got.shape == ref.shape
        diffs.append((got - ref).abs().flatten())
    d = torch.cat(diffs)
    share = float((d <= EXACT).float().mean())
    print(f"[{method}] ORT vs PyTorch: max |diff| {d.max():.2e}, {100 * share:.2f} % within {EXACT:g}")
    assert float(d.max()) <= MAX_ABS
    assert share >= MIN_EXACT_SHARE
    # the export left the model's default forward in place
    assert "forward" not in vars(next(m for m in q.modules() if isinstance(m, QuantLinear)))


def test_export_refuses_what_a_static_graph_cannot_express(fp_model, tmp_path):
    content_only = copy.deepcopy(fp_model)
    vtquant.quantize_(content_only, method_recipe("insertquant", Recipe(sinks=SinkConfig(known_sinks=[]))),
                      token_batches(), quiet=True)
    x = token_batches(n=1)[0]
    with pytest.raises(NotImplementedError, match="first_token"):
        export_onnx(content_only, x, tmp_path / "a.onnx")
    dynamic = copy.deepcopy(fp_model)
    vtquant.quantize_(dynamic, method_recipe("dynamic-token", Recipe()), token_batches(n=1), quiet=True)
    with pytest.raises(NotImplementedError, match="static per-tensor"):
        export_onnx(dynamic, x, tmp_path / "b.onnx")
    with pytest.raises(ValueError, match="quantize_"):
        export_onnx(copy.deepcopy(fp_model), x, tmp_path / "c.onnx")
    assert not list(tmp_path.iterdir())
