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

# ORT and PyTorch compute the same int8 grid, but their float arithmetic differs by round-off
# (summation order of the MatMuls, exp / rsqrt implementations).  A pre-rounding value within that
# round-off of a .5 boundary may land on the neighbouring code, and one flipped code moves every later
# activation of its token a little: comparing the logits end to end measures how many flips this CPU
# happened to produce.  Measured for insertquant+rotate (same graph, ORT 1.30-1.32): on AMD EPYC no code
# flipped and every logit agreed within 1e-5; on an Intel Xeon with AMX one code of 724,992 flipped and
# moved 19 % of the logits by more than 1e-5 (max 3e-3), while the quantizer inputs agreed within 5e-5
# codes once the graph's codes were injected.  So the graph is compared with the model where the
# rounding model says what may differ (:func:`compare_graph_with_model`), end to end only as a sanity
# check.
U = 2.0 ** -24  # unit round-off of float32
TIE_ULPS = 8  # ORT may quantize x * (1 / s) where PyTorch divides: a tie may go either way within a few ulps
LOGIT_ROUNDOFF = 1e-4  # injected PyTorch vs ORT logits, relative to max |logit| (measured: ~2e-7)


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


LLM_BATCHES = [(2, 32), (3, 20), (1, 48), (2, 32)]  # (batch, tokens); the sink token at position 0


def _llm_inputs():
    return [token_batches(n=1, batch=b, seq=t, seed=40 + i)[0] for i, (b, t) in enumerate(LLM_BATCHES)]


def _with_quantizer_outputs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list]:
    """A copy of ``model`` whose outputs also hold every ``QuantizeLinear``'s input and codes."""
    from onnx import TensorProto, helper

    aug = copy.deepcopy(model)
    consts = _named_constants(aug.graph)
    qnodes = [n for n in aug.graph.node if n.op_type == "QuantizeLinear"]
    for node in qnodes:
        codes = TensorProto.UINT8 if consts[node.input[2]].dtype == np.uint8 else TensorProto.INT8
        aug.graph.output.append(helper.make_tensor_value_info(node.input[0], TensorProto.FLOAT, None))
        aug.graph.output.append(helper.make_tensor_value_info(node.output[0], codes, None))
    return aug, qnodes


def reassociation_bound(q) -> float:
    """Largest difference (in codes) of a quantizer input between two float32 evaluations of the
    same model on the same codes: each reduction of length n on the path of the residual stream
    (every block's attention over the tokens and its MatMuls over hidden and MLP width, their errors
    added into the residual stream) contributes at most n * u of the magnitude, and a quantizer
    input is at most qmax codes: 2 * u * L * qmax (2: the two evaluations)."""
    cfg = q.config
    longest = max(t for _, t in LLM_BATCHES)
    path = cfg.num_hidden_layers * (cfg.hidden_size + cfg.intermediate_size + 2 * longest)
    return 2 * U * path * 127


@torch.no_grad()
def compare_graph_with_model(q, path, inputs) -> dict:
    """Check an exported graph against the PyTorch quantized model ``q`` from the rounding model.

    At every ``QuantizeLinear`` (in the order the model calls its quantizers):

    1. the graph's codes are ``round(x / s)`` of the graph's own input ``x`` with the model's scale
       ``s`` (ties within ``TIE_ULPS`` ulps either way): a wrong scale or zero point fails here;
    2. PyTorch, run with the graph's codes injected at every quantizer (so no flip propagates), feeds
       each quantizer an input within :func:`reassociation_bound` codes of the graph's: a missing sink
       row (a spike where the model zeroes it), a wrong weight or a wrong template upstream fails here;
    3. the injected PyTorch logits equal the graph's to ``LOGIT_ROUNDOFF`` (the last layers, the head).

    Returns the measured worst cases and, without injection, how many codes differ (the flips).
    """
    graph = onnx.load(str(path))
    aug, qnodes = _with_quantizer_outputs(graph)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(aug.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    consts = _named_constants(graph.graph)
    qlins = [m for m in q.modules() if isinstance(m, QuantLinear) and m.act is not None and m.act.mode == "quant"]
    assert len(qnodes) == len(qlins)
    bound = reassociation_bound(q)
    worst = {"ort_tie_flips": 0, "input_delta_codes": 0.0, "logit_diff": 0.0, "flipped_codes": 0, "codes": 0}
    for k, (node, m) in enumerate(zip(qnodes, qlins)):
        graph_scale = float(consts[node.input[1]])
        assert graph_scale == float(m.act.scale), f"{m.name}: graph scale {graph_scale} != model {float(m.act.scale)}"
    for x in inputs:
        outs = sess.run(None, {"input_ids": x.numpy()})
        logits_ort = torch.from_numpy(outs[0])
        x_ort = [torch.from_numpy(outs[1 + 2 * k]).double() for k in range(len(qnodes))]
        c_ort = [torch.from_numpy(outs[2 + 2 * k].astype(np.float64)) for k in range(len(qnodes))]
        seen: list = []

        def injected(xin, k, act):
            seen.append((k, xin.detach().double().reshape(x_ort[k].shape)))
            return ((c_ort[k] - float(act.zero_point)) * float(act.scale)).to(xin.dtype).reshape(xin.shape)

        for k, m in enumerate(qlins):
            m.act.fake_quant = lambda xin, k=k, act=m.act: injected(xin, k, act)
        try:
            logits_inj = q(input_ids=x).logits
        finally:
            for m in qlins:
                del m.act.fake_quant
        assert [k for k, _ in seen] == list(range(len(qlins))), "the model called its quantizers in another order"
        for (k, x_pt), m in zip(seen, qlins):
            s, zero = float(m.act.scale), float(m.act.zero_point)
            qmin, qmax = m.act.qrange
            u_ort, u_pt = x_ort[k] / s, x_pt / s  # in codes
            # 1. the graph rounds its own inputs with the model's grid (float64 here: exact quotients)
            expected = (torch.round(u_ort) + zero).clamp(qmin, qmax)
            flip = expected != c_ort[k]
            if bool(flip.any()):
                boundary = torch.floor(u_ort[flip]) + 0.5
                ulp = torch.from_numpy(np.spacing(np.abs(u_ort[flip].numpy()).astype(np.float32)).astype(np.float64))
                assert bool(((u_ort[flip] - boundary).abs() <= TIE_ULPS * ulp).all()) and \
                    bool(((expected - c_ort[k])[flip].abs() == 1).all()), \
                    f"{m.name}: {int(flip.sum())} codes are not round(x / scale) of the graph's input"
                worst["ort_tie_flips"] += int(flip.sum())
            # 2. same codes upstream: the inputs agree to float round-off (clipped to the grid as Clip does)
            delta = (u_ort.clamp(qmin - zero, qmax - zero) - u_pt.clamp(qmin - zero, qmax - zero)).abs()
            worst["input_delta_codes"] = max(worst["input_delta_codes"], float(delta.max()))
            assert float(delta.max()) <= bound, (
                f"{m.name}: quantizer input differs by {float(delta.max()):.3g} codes (bound {bound:.3g}) at "
                f"{(delta > bound).nonzero()[:4].tolist()} (batch, token, channel)")
            # without injection PyTorch would round its own input: count the codes that would flip
            own = (torch.round(u_pt) + zero).clamp(qmin, qmax)
            worst["flipped_codes"] += int((own != c_ort[k]).sum())
            worst["codes"] += own.numel()
            assert bool(((own - c_ort[k]).abs() <= 1).all())
        # 3. the float parts after the last quantizer
        diff = float((logits_inj - logits_ort).abs().max() / logits_ort.abs().max())
        worst["logit_diff"] = max(worst["logit_diff"], diff)
        assert diff <= LOGIT_ROUNDOFF, f"logits differ by {diff:.3g} x max |logit| with the graph's codes injected"
    worst["bound"] = bound
    return worst


def test_onnxruntime_matches_pytorch_quantized_model(exported, fp_model):
    method, q, path = exported
    inputs = _llm_inputs()
    with torch.no_grad():
        for x in inputs:
            ref = q(input_ids=x).logits
            assert q.vtquant.sink_positions() == [[0]] * x.shape[0]
            with export_mode(q):  # the exportable forward is the default forward, bit for bit
                torch.testing.assert_close(q(input_ids=x).logits, ref, atol=0, rtol=0)
    stats = compare_graph_with_model(q, path, inputs)
    # end to end, the plain graph (flips propagate here): it is the quantized model, not the FP one
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got, ref, ref_fp = [], [], []
    with torch.no_grad():
        for x in inputs:
            got.append(torch.from_numpy(sess.run(["logits"], {"input_ids": x.numpy()})[0]).flatten())
            ref.append(q(input_ids=x).logits.flatten())
            ref_fp.append(fp_model(input_ids=x).logits.flatten())
    got, ref, ref_fp = torch.cat(got), torch.cat(ref), torch.cat(ref_fp)
    err_q, err_fp = _rel_l2(got, ref), _rel_l2(got, ref_fp)
    print(f"[{method}] ORT vs PyTorch: quantizer inputs within {stats['input_delta_codes']:.1e} codes (bound "
          f"{stats['bound']:.1e}); {stats['flipped_codes']} of {stats['codes']} codes flipped by round-off, "
          f"{stats['ort_tie_flips']} ties; injected logits within {stats['logit_diff']:.1e}; end to end rel L2 "
          f"{err_q:.1e} (vs FP {err_fp:.1e})")
    assert err_fp > 3 * err_q
    assert "forward" not in vars(next(m for m in q.modules() if isinstance(m, QuantLinear)))


def _scale_one_quantizer(path, out, factor: float) -> None:
    """The graph at ``path`` with one activation scale (a middle layer's MLP input) multiplied by ``factor``."""
    model = onnx.load(str(path))
    qnodes = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    node = next((n for n in qnodes if "layers.3/mlp/down_proj" in n.name), qnodes[len(qnodes) // 2])
    name = node.input[1]
    producers = {n.output[0]: n for n in model.graph.node if n.op_type in ("Identity", "Constant")}
    while name in producers and producers[name].op_type == "Identity":
        name = producers[name].input[0]
    for init in model.graph.initializer:
        if init.name == name:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(factor), init.name))
            break
    else:
        tensor = producers[name].attribute[0].t
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * np.float32(factor), tensor.name))
    onnx.save(model, str(out))


def test_graph_check_fails_on_a_wrong_scale(exported, tmp_path):
    """The comparison is not blind: a scale 2 % off in one QuantizeLinear / DequantizeLinear pair fails it."""
    method, q, path = exported
    _scale_one_quantizer(path, tmp_path / "wrong-scale.onnx", 1.02)
    with pytest.raises(AssertionError, match="graph scale|not round"):
        compare_graph_with_model(q, tmp_path / "wrong-scale.onnx", _llm_inputs()[:1])


def test_graph_check_fails_without_the_sink_rows(exported, tmp_path, monkeypatch):
    """... and so does a graph that forgot the sink rows (no zeroing, no template, no restore)."""
    import vtquant.export as export

    method, q, path = exported
    monkeypatch.setattr(export, "_known_rows", lambda state, x=None: [])
    with pytest.warns(UserWarning, match="outside the known positions"):  # calibration did see the sink
        bad = export_onnx(q, token_batches(n=1, seed=3)[0], tmp_path / "no-sinks.onnx")
    monkeypatch.undo()
    with pytest.raises(AssertionError, match="quantizer input differs"):
        compare_graph_with_model(q, bad, _llm_inputs()[:1])


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
