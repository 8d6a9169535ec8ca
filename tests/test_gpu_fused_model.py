"""The producer-fused decoder forward and the Triton Hadamard kernel on CUDA (skipped without a GPU).

Run on the H200 through the device tool (``bash tools/gpu_e2e.sh fused``).  The CPU side of the same code
(int8 codes, torch reference kernels) is tested in ``tests/test_fused_forward.py``.
"""
import copy

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("n", [14336, 4096, 3584, 3072])
def test_hadamard_kernel_matches_torch(n):
    from vtquant.core.rotation import random_hadamard, random_hadamard_factors
    from vtquant.kernels import triton_hadamard as th

    torch.manual_seed(n)
    signs, factors = random_hadamard_factors(n, 3)
    x = torch.randn(300, n, device="cuda", dtype=torch.bfloat16)
    got = th.hadamard_cuda(x, signs.cuda(), [f.cuda() for f in factors])
    assert got is not None, f"{n}: the Triton kernel should cover factors {[f.shape[0] for f in factors]}"
    if n <= 4096:  # dense reference
        ref = x.double() @ random_hadamard(n, 3).double().cuda()
    else:
        ref = th._torch_rotate(x, signs.cuda(), [f.cuda() for f in factors]).double()
    assert _rel(got, ref) < 4e-3  # bf16 output rounding
    # fused SiLU * up -> rotate -> static codes, sink rows zero
    gu = torch.randn(300, 2 * n, device="cuda", dtype=torch.bfloat16) * 2
    zero = torch.zeros(300, dtype=torch.bool, device="cuda")
    zero[[0, 17]] = True
    for dtype in (torch.float8_e4m3fn, torch.int8):
        q = th.silu_mul_hadamard_quant(gu, signs.cuda(), [f.cuda() for f in factors], 0.01, dtype, zero)
        r = th.ref_silu_mul_hadamard_quant(gu, signs.cuda(), [f.cuda() for f in factors], 0.01, dtype, zero)
        assert q.dtype == dtype and (q[zero].float() == 0).all()
        if dtype == torch.int8:
            diff = (q.int() - r.int()).abs()
            assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.01
        else:
            assert _rel(q, r) < 0.02


def _quantized(method, layers=4):
    import vtquant
    from vtquant.bench_e2e import _cast_outside_quantizers_, implanted_llama, token_batches
    from vtquant.config import Recipe, method_recipe

    base = implanted_llama("small", layers, "cuda", torch.bfloat16, spike=2000.0)
    recipe = method_recipe(method, Recipe())
    model = copy.deepcopy(base)
    if recipe.rotation.enabled:
        model.float()
    report = vtquant.quantize_(model, recipe, token_batches(4, 256, 512, seed=1), quiet=True)
    assert report.calib_sink_positions and all(p[:1] == [0] for p in report.calib_sink_positions)
    _cast_outside_quantizers_(model, torch.bfloat16)
    return base, model


@pytest.mark.parametrize("method", ["insertquant", "insertquant+rotate"])
def test_fused_static_model_matches_unfused(method):
    from vtquant.bench_e2e import token_batches
    from vtquant.kernels import convert_

    base, model = _quantized(method)
    unfused = convert_(copy.deepcopy(model), "cuda-fp8", fused=False)
    fused = convert_(copy.deepcopy(model), "cuda-fp8", fused=True)
    n_fused = sum(v == "fused" for v in fused.vtquant.fused.values())
    assert n_fused >= 2, fused.vtquant.fused  # a stage layer (sink detector) keeps its forward
    x = token_batches(1, 512, 512, seed=3)[0].cuda()
    with torch.no_grad():
        ref = base(input_ids=x, use_cache=False).logits
        a = unfused(input_ids=x, use_cache=False).logits
        b = fused(input_ids=x, use_cache=False).logits
    calls = [blk.forward.calls for blk in fused.model.layers if hasattr(blk, "_vtquant_fused")]
    assert calls == [1] * n_fused
    err_a, err_b, diff = _rel(a, ref), _rel(b, ref), _rel(b, a)
    print(f"{method}: unfused err {err_a:.4f}, fused err {err_b:.4f}, fused vs unfused {diff:.4f}")
    # same codes up to rounding flips (the fused RMSNorm keeps float32 where the unfused one rounds to bf16):
    # the two models must be closer to each other than to bf16, and the fused one no less accurate
    assert diff < max(0.05, 0.6 * err_a) and err_b < 1.15 * err_a + 0.01


def test_fused_dynamic_matches_unfused():
    from vtquant.bench_e2e import dynamic_token_, implanted_llama, token_batches

    base = implanted_llama("small", 4, "cuda", torch.bfloat16, spike=2000.0)
    a = dynamic_token_(copy.deepcopy(base), "cuda-fp8")
    b = dynamic_token_(copy.deepcopy(base), "cuda-fp8", fused=True)
    x = token_batches(1, 512, 512, seed=3)[0].cuda()
    with torch.no_grad():
        ref = base(input_ids=x, use_cache=False).logits
        la = a(input_ids=x, use_cache=False).logits
        lb = b(input_ids=x, use_cache=False).logits
    print(f"dynamic: unfused err {_rel(la, ref):.4f}, fused err {_rel(lb, ref):.4f}, diff {_rel(lb, la):.4f}")
    assert _rel(lb, la) < max(0.05, 0.6 * _rel(la, ref)) and _rel(lb, ref) < 1.15 * _rel(la, ref) + 0.01
