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


@pytest.mark.parametrize("n", [14336, 4096, 3584, 2048])
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


def _block_io(model, x, feed=None, only=None):
    """Inputs and outputs of every block in one forward; ``feed`` {i: hidden} replaces block ``only``'s input."""
    ins, outs, hooks = {}, {}, []
    for i, blk in enumerate(model.model.layers):
        def pre(m, args, kwargs, i=i):
            if feed is not None and i == only:
                args = (feed[i],) + tuple(args[1:]) if args else args
                if not args:
                    kwargs = dict(kwargs, hidden_states=feed[i])
            ins[i] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
            return args, kwargs

        def post(m, args, out, i=i):
            outs[i] = (out[0] if isinstance(out, tuple) else out).detach().clone()

        hooks += [blk.register_forward_pre_hook(pre, with_kwargs=True), blk.register_forward_hook(post)]
    try:
        with torch.no_grad():
            logits = model(input_ids=x, use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()
    return ins, outs, logits


@pytest.mark.parametrize("method", ["insertquant", "insertquant+rotate"])
def test_fused_static_model_matches_unfused(method):
    """Block by block on the same input (random-weight models amplify any rounding difference through
    depth, so whole-model logits are compared for accuracy, not identity)."""
    from vtquant.bench_e2e import token_batches
    from vtquant.kernels import convert_

    base, model = _quantized(method)
    unfused = convert_(copy.deepcopy(model), "cuda-fp8", fused=False)
    fused = convert_(copy.deepcopy(model), "cuda-fp8", fused=True)
    n_fused = sum(v == "fused" for v in fused.vtquant.fused.values())
    assert n_fused == 4, fused.vtquant.fused
    x = token_batches(1, 512, 512, seed=3)[0].cuda()
    with torch.no_grad():
        ref = base(input_ids=x, use_cache=False).logits
    ins, outs, a = _block_io(unfused, x)
    local = []
    for k in range(len(fused.model.layers)):
        _, fouts, _ = _block_io(fused, x, feed=ins, only=k)
        local.append(_rel(fouts[k], outs[k]))
    _, _, b = _block_io(fused, x)
    calls = [blk.forward.calls for blk in fused.model.layers]
    assert all(c >= 1 for c in calls)
    err_a, err_b = _rel(a, ref), _rel(b, ref)
    print(f"{method}: per-block fused vs unfused {[round(v, 4) for v in local]}; logits err vs bf16: "
          f"unfused {err_a:.4f}, fused {err_b:.4f}")
    # bf16 / FP8 rounding flips only (the fused kernels keep float32 where the unfused modules round to bf16);
    # block 0's residual is the small embedding, so its relative difference is the largest
    assert local[0] < 0.1 and max(local[1:]) < 0.03
    assert err_b < 1.1 * err_a + 0.01


def test_fused_dynamic_matches_unfused():
    from vtquant.bench_e2e import dynamic_token_, implanted_llama, token_batches

    base = implanted_llama("small", 4, "cuda", torch.bfloat16, spike=2000.0)
    a = dynamic_token_(copy.deepcopy(base), "cuda-fp8")
    b = dynamic_token_(copy.deepcopy(base), "cuda-fp8", fused=True)
    x = token_batches(1, 512, 512, seed=3)[0].cuda()
    with torch.no_grad():
        ref = base(input_ids=x, use_cache=False).logits
    ins, outs, la = _block_io(a, x)
    local = [_rel(_block_io(b, x, feed=ins, only=k)[1][k], outs[k]) for k in range(4)]
    _, _, lb = _block_io(b, x)
    print(f"dynamic: per-block {[round(v, 4) for v in local]}; err unfused {_rel(la, ref):.4f}, fused {_rel(lb, ref):.4f}")
    assert local[0] < 0.1 and max(local[1:]) < 0.03 and _rel(lb, ref) < 1.1 * _rel(la, ref) + 0.01


def test_kernel_timings():
    """Not a check: prints the fused kernels' times at the Llama-3-8B shape (4,096 tokens) for the notes."""
    import triton

    from vtquant.core.rotation import random_hadamard_factors
    from vtquant.kernels import triton_hadamard as th
    from vtquant.kernels import triton_quant as tq
    from vtquant.kernels.fused import rotary_inplace_

    m, n = 4096, 14336
    gu = torch.randn(m, 2 * n, device="cuda", dtype=torch.bfloat16)
    signs, factors = random_hadamard_factors(n, 1)
    signs, factors = signs.cuda(), [f.cuda() for f in factors]
    t_had = triton.testing.do_bench(lambda: th.silu_mul_hadamard_quant(gu, signs, factors, 0.01, torch.float8_e4m3fn),
                                    return_mode="median")
    t_silu = triton.testing.do_bench(lambda: tq.silu_mul_quant_static(gu, 0.01, torch.float8_e4m3fn),
                                     return_mode="median")
    qkv = torch.randn(m, 6144, device="cuda", dtype=torch.bfloat16)
    cos = torch.randn(1, m, 128, device="cuda", dtype=torch.bfloat16)
    sin = torch.randn(1, m, 128, device="cuda", dtype=torch.bfloat16)
    t_rope = triton.testing.do_bench(lambda: rotary_inplace_(qkv, cos, sin, 40, 128), return_mode="median")
    print(f"kernels at 4096 x 14336: silu*up+Hadamard+FP8 {t_had * 1e3:.1f} us, silu*up+FP8 {t_silu * 1e3:.1f} us; "
          f"rotary q/k in place (4096 x 40 heads) {t_rope * 1e3:.1f} us")


def test_fused_forward_with_dynamic_cache():
    """Prefill into transformers' DynamicCache and decode one token: the fused forward with the cache gives
    the logits of the fused forward without it (keys / values appended, attention over the cached length)."""
    from vtquant.bench_e2e import token_batches
    from vtquant.kernels import convert_

    _, model = _quantized("insertquant")
    fused = convert_(model, "cuda-fp8", fused=True)
    x = token_batches(1, 257, 512, seed=4)[0].cuda()
    with torch.no_grad():
        full = fused(input_ids=x, use_cache=False).logits
        calls = [blk.forward.calls for blk in fused.model.layers]
        out = fused(input_ids=x[:, :-1], use_cache=True)
        step = fused(input_ids=x[:, -1:], past_key_values=out.past_key_values, use_cache=True).logits
    assert [blk.forward.calls for blk in fused.model.layers] == [c + 2 for c in calls]
    assert _rel(out.logits, full[:, :-1]) < 1e-3
    assert _rel(step[:, -1], full[:, -1]) < 0.05  # one decoded token: no sink in it, its own rounding
