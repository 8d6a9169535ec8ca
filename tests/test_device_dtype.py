"""Calibration where the model sits, in its dtype (issue 13, part 1).

``quantize_`` calibrates a model on the CPU or a GPU in float32 / bfloat16 / float16; every module
the pipeline adds (detectors, guards, residual restore, detection templates, activation quantizers,
online rotation factors) is created beside the Linear or block it serves, templates in the model's
dtype.  On the CPU these tests run the low-precision dtypes; the ``cuda`` ones run where a GPU is
(through the device tool), with the same expectations.
"""
from __future__ import annotations

import copy

import pytest
import torch

import vtquant
from vtquant.config import Recipe, method_recipe
from vtquant.core.quant import QuantLinear
from vtquant.core.templates import ResidualRestore, SinkGuard
from vtquant.kernels import convert_

from sinkmodels import implanted_decoder, rel_logit_error, token_batches

MIXED_POSITIONS = ((0,), (0, 5), (3,), (7, 12))
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

pytestmark = pytest.mark.usefixtures("one_thread")


def _quantized(model, method, calib, **kwargs):
    q = copy.deepcopy(model)
    report = vtquant.quantize_(q, method_recipe(method, Recipe()), calib, quiet=True, **kwargs)
    return q, report


def _error(ref, model, batches, device) -> float:
    return rel_logit_error(ref, model, [b.to(device) for b in batches])


def _check_placement(model, device: torch.device, dtype: torch.dtype) -> None:
    """Every tensor of the quantized model is on ``device``; templates are in the model's dtype."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        assert t.device.type == device.type, f"{name} on {t.device}"
    guards = restores = 0
    for module in model.modules():
        if isinstance(module, SinkGuard):
            assert module.template_out.dtype == dtype
            guards += 1
        if isinstance(module, ResidualRestore):
            assert module.template.dtype == dtype
            restores += 1
        if isinstance(module, QuantLinear):
            assert module.compute_dtype == dtype
            for f in module.rot_factors:
                assert f.device.type == device.type
    state = model.vtquant.state
    if state is not None:
        for det in state.det_templates.values():
            assert det.device.type == device.type
    assert guards > 0 and restores == 1


def _insertquant_beats_naive(fp, calib, evalb, device, dtype, **kwargs):
    errors = {}
    for method in ("naive-static", "insertquant", "insertquant+rotate"):
        q, report = _quantized(fp, method, calib, **kwargs)
        with torch.no_grad():
            logits = q(input_ids=evalb[0].to(device)).logits
        assert logits.dtype == dtype and bool(torch.isfinite(logits).all()), method
        errors[method] = _error(fp, q, evalb, device)
        if method.startswith("insertquant"):
            assert report.emergence_layer == 2
            _check_placement(q, torch.device(device), dtype)
    assert errors["insertquant"] < 0.6 * errors["naive-static"], errors
    assert errors["insertquant+rotate"] < 0.6 * errors["naive-static"], errors
    return errors


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_cpu(dtype):
    fp = implanted_decoder().to(dtype)
    calib = token_batches(n=4, sink_positions=MIXED_POSITIONS)
    _insertquant_beats_naive(fp, calib, token_batches(n=2, seed=7), "cpu", dtype)


def test_bf16_real_int8_kernels_cpu():
    fp = implanted_decoder().to(torch.bfloat16)
    calib = token_batches(n=4, sink_positions=MIXED_POSITIONS)
    q, _ = _quantized(fp, "insertquant", calib)
    evalb = token_batches(n=2, seed=7)
    fake = _error(fp, q, evalb, "cpu")
    convert_(q, "cpu-int8")
    real = _error(fp, q, evalb, "cpu")
    assert real < 1.5 * fake + 1e-3, (real, fake)


def test_quantized_model_moves_with_its_modules():
    """Calibrated in bf16 on the CPU, converted to float32 later: templates and caches follow."""
    fp = implanted_decoder().to(torch.bfloat16)
    q, _ = _quantized(fp, "insertquant+rotate", token_batches(n=4, sink_positions=MIXED_POSITIONS))
    q.float()
    _check_placement(q, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        assert torch.isfinite(q(input_ids=token_batches(n=1)[0]).logits).all()


# ---- on a GPU (run through the device tool; skipped elsewhere) ---------------------------------
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_calibrate_on_cuda(dtype):
    fp = implanted_decoder().to("cuda", dtype)
    calib = token_batches(n=4, sink_positions=MIXED_POSITIONS)
    _insertquant_beats_naive(fp, calib, token_batches(n=2, seed=7), "cuda", dtype)


@cuda
def test_sequential_offload_to_cuda():
    """Model kept on the CPU, blocks run on the GPU one at a time: same detection, model stays home."""
    fp = implanted_decoder().to(torch.bfloat16)
    calib = token_batches(n=4, sink_positions=MIXED_POSITIONS)
    on_cpu, r_cpu = _quantized(fp, "insertquant+rotate", calib)
    offloaded, r_gpu = _quantized(fp, "insertquant+rotate", calib, pipeline="sequential", device="cuda")
    assert {t.device.type for t in offloaded.state_dict().values()} == {"cpu"}
    assert r_gpu.emergence_layer == r_cpu.emergence_layer and r_gpu.calib_sink_positions == r_cpu.calib_sink_positions
    assert r_gpu.layer_modes == r_cpu.layer_modes
    offloaded.cuda()
    evalb = token_batches(n=2, seed=7)
    assert _error(fp.cuda(), offloaded, evalb, "cuda") < 1.5 * _error(fp.cpu(), on_cpu, evalb, "cpu") + 1e-3


@cuda
@pytest.mark.parametrize("backend", ["cuda-fp8", "cuda-int8"])
def test_cuda_calibrated_model_runs_real_kernels(backend):
    if backend == "cuda-fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability 8.9+")
    fp = implanted_decoder().to("cuda", torch.bfloat16)
    q, _ = _quantized(fp, "insertquant", token_batches(n=4, sink_positions=MIXED_POSITIONS))
    evalb = token_batches(n=2, seed=7)
    fake = _error(fp, q, evalb, "cuda")
    convert_(q, backend)
    real = _error(fp, q, evalb, "cuda")
    assert real < 2.0 * fake + 2e-2, (real, fake)


def test_e2e_bench_runs_tiny_on_cpu():
    """The end-to-end bench (``python -m vtquant.bench_e2e``) at a tiny shape, calibrated with offload."""
    from vtquant.bench_e2e import e2e_bench

    rows = e2e_bench("tiny", layers=4, tokens=64, device="cpu", calib_batches=2, calib_len=32, repeats=1,
                     offload=True)
    by_method = {r["method"]: r for r in rows}
    assert set(by_method) == {"bf16", "dynamic-token", "insertquant", "insertquant+rotate"}
    assert by_method["insertquant"]["emergence_layer"] == 1 and by_method["insertquant"]["sinks_found"]
    assert by_method["insertquant"]["logit_err_vs_bf16"] < 0.05
    assert by_method["insertquant"]["pipeline"] == "sequential+offload"


def test_calib_only_bench_runs_tiny_on_cpu():
    """``bench_e2e --calib-only``: calibration alone, sequential, at several depths (the 70B memory check's rows)."""
    from vtquant.bench_e2e import calib_memory_bench

    rows = [calib_memory_bench("tiny", layers, "cpu", "insertquant", calib_batches=2, calib_len=16) for layers in (3, 5)]
    assert [r["layers"] for r in rows] == [3, 5] and all(r["sinks_found"] for r in rows)
    assert all(r["pipeline"] == "sequential+offload" and r["calib_tokens"] == 32 for r in rows)
    assert rows[1]["params_b"] > rows[0]["params_b"] or rows[1]["model_gib"] >= rows[0]["model_gib"]
