"""ONNX export (vtquant.export): QDQ graph with the sink insertion as constants, run in onnxruntime."""
from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")  # skipped visibly when the onnx extra is not installed
from onnx import numpy_helper  # noqa: E402

import vtquant  # noqa: E402
from vtquant.config import Recipe, SinkConfig, method_recipe  # noqa: E402
from vtquant.core.quant import QuantLinear  # noqa: E402
from vtquant.core.templates import ResidualRestore  # noqa: E402
from vtquant.export import export_mode, export_onnx, static_sinks  # noqa: E402

from sinkmodels import implanted_decoder, token_batches  # noqa: E402

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


# ------------------------------------------------------------------------------------------
# vision encoders: the known sinks are the prefix tokens (CLS, registers)
# ------------------------------------------------------------------------------------------
# Tolerances, relative to the output scale max |y| of the PyTorch quantized model.  ORT and
# PyTorch compute the same int8 grid, but LayerNorm / GELU / softmax differ by float round-off,
# so an activation within round-off of a rounding boundary lands on the neighbouring code in a
# few images; one such flip moves that image's output by up to ~2e-3 x scale (measured: 7 % of
# the images of the timm fixture, max 2.4e-3; open_clip 4 % beyond 1e-4, max 9e-4).  So: every
# image within VIS_MAX, most images within VIS_CLOSE, the median image at float round-off.
VIS_MAX = 1e-2
VIS_CLOSE = 1e-4
VIS_MIN_CLOSE_SHARE = 0.8
VIS_ROUNDOFF = 1e-5


def _timm_reg4():
    import visionmodels as vm

    return vm.timm_vit(registers=4, sink_cls=False, sink_registers=(0, 1, 2, 3))


def _open_clip_visual():
    import visionmodels as vm

    return vm.open_clip_tiny().visual


# name -> (builder, known sink kinds, expected static sinks [(position, type)])
VISION = {
    "timm-vit-reg4": (_timm_reg4, ["cls", "registers"], [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4)]),
    "open_clip-visual": (_open_clip_visual, ["cls"], [(0, 0)]),
}


def _vision_calib():
    import visionmodels as vm

    return [vm.make_images(vm.random_painted(8, s), seed=s) for s in range(4)]  # 0-3 painted patches each


def _clean_images(n, seed):
    import visionmodels as vm

    return vm.make_images([[]] * n, seed=seed)  # no content sink: only the prefix tokens


@pytest.fixture(scope="module", params=list(VISION))
def vision_exported(request, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    name = request.param
    build, kinds, _ = VISION[name]
    if name.startswith("timm"):
        pytest.importorskip("timm")
    else:
        pytest.importorskip("open_clip")
    fp = build()
    q = copy.deepcopy(fp)
    vtquant.quantize_(q, method_recipe("insertquant", Recipe(sinks=SinkConfig(known_sinks=kinds))),
                      _vision_calib(), quiet=True)
    # calibration images have bright (content-sink) patches: the exporter says the graph won't guard them
    with pytest.warns(UserWarning, match="outside the known positions"):
        path = export_onnx(q, _clean_images(2, seed=5), tmp_path_factory.mktemp("onnx") / f"{name}.onnx")
    return name, fp, q, path


def _named_constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Initializers and ``Constant`` outputs by name, also through ``Identity`` nodes (shared initializers)."""
    out = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            out[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        elif node.op_type == "Identity" and node.input[0] in out:
            out[node.output[0]] = out[node.input[0]]
    return out


def _rel_l2(a, b) -> float:
    return float((a - b).norm() / b.norm())


def _expected_template_constants(table, static, ok):
    """Per run of consecutive known positions whose type uses the template: ``table[types]``."""
    runs, prev = [], None
    for pos, t in static:
        if not bool(ok[t]):
            prev = None
            continue
        if prev is not None and pos == prev + 1:
            runs[-1].append(t)
        else:
            runs.append([t])
        prev = pos
    return [table[r] for r in runs]


def test_vision_graph_has_qdq_and_prefix_sink_constants(vision_exported):
    name, fp, q, path = vision_exported
    static = VISION[name][2]
    assert static_sinks(q, _clean_images(3, seed=1)) == static  # CLS (+ registers), from the adapter
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    graph = model.graph
    assert [i.name for i in graph.input] == ["pixel_values"] and [o.name for o in graph.output] == ["output"]
    ops = Counter(n.op_type for n in graph.node)
    qlins = [m for m in q.modules() if isinstance(m, QuantLinear)]
    assert ops["QuantizeLinear"] == len(qlins)
    assert ops["DequantizeLinear"] == 2 * len(qlins)
    inits = _named_constants(graph)
    act_q = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert all(n.input[1] in inits and inits[n.input[1]].ndim == 0 for n in act_q)  # scalar (per-tensor)
    assert {float(inits[n.input[1]]) for n in act_q} == {float(m.act.scale) for m in qlins}
    int8_codes = {v.tobytes() for v in inits.values() if v.dtype == np.int8 and v.ndim == 2}
    assert int8_codes == {m.qweight.numpy().tobytes() for m in qlins}

    consts = _constants(graph)
    expected = []
    for m in qlins:
        if m.guard is not None and m.guard.mode == "template":
            expected += _expected_template_constants(m.guard.template_out, static, m.guard.template_ok)
    for r in (m for m in q.modules() if isinstance(m, ResidualRestore)):
        expected += _expected_template_constants(r.template, static, r.restore_type)
    if name.startswith("timm"):  # registers 1..4 use templates; the CLS (read by the head) never does
        assert len(expected) >= 3 and all(c.shape[0] == 4 for c in expected)
    for c in expected:
        assert _has_constant(consts, c)


def test_vision_onnxruntime_matches_pytorch_quantized_model(vision_exported):
    name, fp, q, path = vision_exported
    static = VISION[name][2]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    per_image, gots, refs, fps = [], [], [], []
    for i, batch in enumerate([16, 16, 16, 1, 3]):  # dynamic batch axis (traced with 2)
        x = _clean_images(batch, seed=100 + i)
        with torch.no_grad():
            ref = q(x)
            assert q.vtquant.sink_positions() == [[p for p, _ in static]] * batch  # only the prefix sinks
            ref_fp = fp(x)
        got = torch.from_numpy(sess.run(["output"], {"pixel_values": x.numpy()})[0])
        assert got.shape == ref.shape
        per_image.append((got - ref).abs().flatten(1).amax(1) / ref.abs().max())
        gots.append(got), refs.append(ref), fps.append(ref_fp)
    d = torch.cat(per_image)
    got, ref, ref_fp = torch.cat(gots), torch.cat(refs), torch.cat(fps)
    err_q, err_fp = _rel_l2(got, ref), _rel_l2(got, ref_fp)
    print(f"[{name}] ORT vs PyTorch quantized: per-image max|diff|/scale median {d.median():.1e}, max {d.max():.1e}, "
          f"{100 * float((d <= VIS_CLOSE).float().mean()):.0f} % within {VIS_CLOSE:g}; rel L2 vs quantized "
          f"{err_q:.1e}, vs FP {err_fp:.1e}")
    assert float(d.max()) <= VIS_MAX
    assert float((d <= VIS_CLOSE).float().mean()) >= VIS_MIN_CLOSE_SHARE
    assert float(d.median()) <= VIS_ROUNDOFF
    assert err_fp > 3 * err_q  # the graph is the quantized model, not the FP one
    assert "forward" not in vars(next(m for m in q.modules() if isinstance(m, QuantLinear)))


def test_vision_content_sinks_are_quantized_like_other_tokens(vision_exported):
    """Painted (content-sink) patches: the graph guards only the prefix tokens, i.e. it computes
    the PyTorch model in export mode, not the default forward (which detects and guards them)."""
    import visionmodels as vm

    name, fp, q, path = vision_exported
    n_prefix = VISION[name][2][-1][0] + 1
    painted = vm.random_painted(16, seed=77)
    x = vm.make_images(painted, seed=77)
    with torch.no_grad():
        ref = q(x)
        assert any(len(p) > n_prefix for p in q.vtquant.sink_positions())  # PyTorch found content sinks
        with export_mode(q):
            static_ref = q(x)
        ref_fp = fp(x)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(["output"], {"pixel_values": x.numpy()})[0])
    d = (got - static_ref).abs().flatten(1).amax(1) / static_ref.abs().max()
    assert float(d.max()) <= VIS_MAX and float(d.median()) <= VIS_ROUNDOFF
    print(f"[{name}] images with 0-3 content sinks: rel L2 ORT vs PyTorch quantized {_rel_l2(got, ref):.2e} "
          f"(PyTorch quantized vs FP {_rel_l2(ref, ref_fp):.2e}, ORT vs FP {_rel_l2(got, ref_fp):.2e})")


def test_vision_export_refuses_content_only_sinks(tmp_path):
    pytest.importorskip("timm")
    q = _timm_reg4()
    vtquant.quantize_(q, method_recipe("insertquant", Recipe(sinks=SinkConfig(known_sinks=[]))),
                      _vision_calib(), quiet=True)
    with pytest.raises(NotImplementedError, match="known in advance"):
        export_onnx(q, _clean_images(2, seed=0), tmp_path / "a.onnx")
    assert not list(tmp_path.iterdir())
