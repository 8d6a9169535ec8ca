"""Fast Walsh-Hadamard rotation and the producer-fused decoder forward, on the CPU.

* ``hadamard_apply`` (butterfly FWHT for Sylvester factors, matmul for the others) against the dense
  rotation matrix, for the factorisations the rotation code builds (power of two, power of two x Paley);
* the Triton Hadamard kernel through Triton's interpreter (subprocess, as in ``test_gpu_fused.py``);
* ``convert_(model, "cpu-int8", fused=True)`` (int8 codes, reference kernels) against the per-Linear
  modules on an implanted-sink Llama (insertquant, insertquant+rotate), the sink rows exercised;
* the fused per-token dynamic peer against the unfused one.
The CUDA side (FP8, Triton kernels) is ``tests/test_gpu_fused_model.py``.
"""
import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from vtquant.core.rotation import (fwht_, hadamard_apply, hadamard_factors, is_sylvester_factor, kron_apply,
                                   random_hadamard, random_hadamard_factors)

ROOT = Path(__file__).resolve().parents[1]


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("n", [2, 64, 1024, 96, 1792, 3072])
def test_hadamard_apply_matches_dense(n):
    signs, factors = random_hadamard_factors(n, 7)
    x = torch.randn(5, 3, n, dtype=torch.float64)
    dense = random_hadamard(n, 7).double()
    want = x @ dense
    got = hadamard_apply(x, signs.double(), [f.double() for f in factors])
    assert got.shape == x.shape and _rel(got, want) < 1e-6  # factors are stored in float32
    assert _rel(kron_apply(x, signs.double(), [f.double() for f in factors]), want) < 1e-6
    # float32 and bf16 inputs: float32 arithmetic, result in the input dtype
    got32 = hadamard_apply(x.float(), signs, factors)
    assert got32.dtype == torch.float32 and _rel(got32, want) < 1e-6
    gotb = hadamard_apply(x.to(torch.bfloat16), signs, factors)
    assert gotb.dtype == torch.bfloat16 and _rel(gotb, want) < 1e-2


def test_fwht_is_the_sylvester_transform():
    assert hadamard_factors(14336) == (64, 224) and hadamard_factors(4096) == (4096,)
    for n in (2, 8, 256):
        from vtquant.core.rotation import _sylvester

        eye = torch.eye(n, dtype=torch.float64)
        assert torch.allclose(fwht_(eye, 1), _sylvester(n) / n ** 0.5, atol=1e-12)
        assert is_sylvester_factor((_sylvester(n) / n ** 0.5).float())
    assert not is_sylvester_factor(torch.eye(8))
    _, (paley,) = random_hadamard_factors(12, 0)  # Paley order 12: a matmul factor, not a butterfly
    assert not is_sylvester_factor(paley)


@pytest.mark.skipif(not __import__("importlib").util.find_spec("triton"), reason="triton is not installed")
def test_triton_hadamard_kernel_interpreted():
    code = textwrap.dedent("""
        import torch
        from vtquant.core.rotation import random_hadamard, random_hadamard_factors
        from vtquant.kernels import triton_hadamard as th
        torch.manual_seed(0)
        for n in (3584, 1024):  # 16 x 224 (Paley), 8 x 128 (Sylvester split)
            s, f = random_hadamard_factors(n, 2)
            plan = th.hadamard_plan(n, s, f, torch.device("cpu"))
            assert plan is not None, n
            x = torch.randn(3, n).to(torch.bfloat16)
            out = torch.empty(3, n)
            th._launch(x, n, plan, False, out, None, None)  # float32 output: the kernel's exact math
            ref = x.double() @ random_hadamard(n, 2).double()
            err = float((out.double() - ref).norm() / ref.norm())
            assert err < 1e-6, (n, err)
        # fused SiLU * up -> rotation -> int8 codes, sink rows zero (the interpreter truncates its bf16
        # rounding of silu(g) * u, so codes may differ by a step or two)
        n = 3584
        s, f = random_hadamard_factors(n, 2)
        gu = torch.randn(4, 2 * n).to(torch.bfloat16)
        zero = torch.tensor([False, True, False, False])
        q = th.silu_mul_hadamard_quant(gu, s, f, 0.01, torch.int8, zero)
        r = th.ref_silu_mul_hadamard_quant(gu, s, f, 0.01, torch.int8, zero)
        assert (q[1] == 0).all() and (q[0] != 0).any()
        d = (q.int() - r.int()).abs()
        assert int(d.max()) <= 3 and float((d > 0).float().mean()) < 0.3, (int(d.max()), float((d > 0).float().mean()))
        assert th.hadamard_plan(11008, *random_hadamard_factors(11008, 0), torch.device("cpu")) is None
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def _quantized_tiny(method):
    import vtquant
    from vtquant.bench_e2e import implanted_llama, token_batches
    from vtquant.config import Recipe, method_recipe

    torch.manual_seed(0)
    base = implanted_llama("tiny", 4, "cpu", torch.float32, spike=200.0)
    model = copy.deepcopy(base)
    report = vtquant.quantize_(model, method_recipe(method, Recipe()), token_batches(4, 32, 64, seed=1), quiet=True)
    assert report.calib_sink_positions and all(p[:1] == [0] for p in report.calib_sink_positions)
    return base, model


@pytest.mark.parametrize("method", ["insertquant", "insertquant+rotate"])
def test_fused_static_forward_matches_per_linear_modules(method):
    from vtquant.bench_e2e import token_batches
    from vtquant.kernels import convert_
    from vtquant.kernels import fused as fz

    base, model = _quantized_tiny(method)
    unfused = convert_(copy.deepcopy(model), "cpu-int8", fused=False)
    fused = convert_(copy.deepcopy(model), "cpu-int8", fused=True)
    report = fused.vtquant.fused
    assert not unfused.vtquant.fused
    assert sum(v == "fused" for v in report.values()) == 4  # the stage layer too (its probe materialised)
    assert sum(b.forward.sites["down"].detector is not None for b in fused.model.layers) == 1
    blocks = [b for b in fused.model.layers if hasattr(b, fz.FUSED_ATTR)]
    policies = {b.forward.sites["qkv"].policy for b in blocks}
    assert "template" in policies  # blocks after the emergence layer insert the sinks' template outputs
    if method == "insertquant+rotate":
        assert all(b.forward.sites["down"].rot is not None for b in blocks)
    x = token_batches(2, 48, 64, seed=5)[0]
    with torch.no_grad():
        ref = base(input_ids=x, use_cache=False).logits
        a = unfused(input_ids=x, use_cache=False).logits
        b = fused(input_ids=x, use_cache=False).logits
    assert [blk.forward.calls for blk in blocks] == [1, 1, 1, 1]
    # float32 model: the same int8 codes and sums; with rotation the fused path's Hadamard sums in another order, so a
    # few codes flip by one step (measured 1.8e-4 on an Intel Xeon, < 1e-4 on AMD EPYC)
    assert _rel(b, a) < (1e-4 if method == "insertquant" else 1e-3), _rel(b, a)
    assert _rel(a, ref) < 0.05
    # with transformers' DynamicCache (the default): prefill and greedy decoding run fused, same tokens
    with torch.no_grad():
        c = fused(input_ids=x, use_cache=True).logits
        assert [blk.forward.calls for blk in blocks] == [2, 2, 2, 2] and _rel(c, a) < 1e-4
        ones = torch.ones_like(x)
        ga = unfused.generate(x, attention_mask=ones, max_new_tokens=4, do_sample=False)
        gb = fused.generate(x, attention_mask=ones, max_new_tokens=4, do_sample=False)
    assert torch.equal(ga, gb) and [blk.forward.calls for blk in blocks] == [6, 6, 6, 6]
    # the sinks' template rows are what make it right: without them the output is far off
    orig = fz._Site.write_sinks
    fz._Site.write_sinks = lambda *args, **kw: None
    try:
        with torch.no_grad():
            d = fused(input_ids=x, use_cache=False).logits
    finally:
        fz._Site.write_sinks = orig
    assert _rel(d, a) > 0.1
    fz.unfuse_(fused)
    assert not any(hasattr(b, fz.FUSED_ATTR) or "forward" in b.__dict__ for b in fused.model.layers)


def test_fused_dynamic_forward_matches_unfused():
    from vtquant.bench_e2e import dynamic_token_, implanted_llama, token_batches

    torch.manual_seed(0)
    base = implanted_llama("tiny", 4, "cpu", torch.float32, spike=200.0)
    a = dynamic_token_(copy.deepcopy(base), "cpu-int8")
    b = dynamic_token_(copy.deepcopy(base), "cpu-int8", fused=True)
    assert sum(v == "fused" for v in b._vtquant_fusion_report.values()) == 4
    x = token_batches(1, 40, 64, seed=5)[0]
    with torch.no_grad():
        la = a(input_ids=x, use_cache=False).logits
        lb = b(input_ids=x, use_cache=False).logits
    assert _rel(lb, la) < 2e-3  # int8 rounding: half away from zero (fused) vs half to even


def test_fused_true_refuses_models_it_cannot_run():
    from vtquant.kernels import convert_
    from vtquant.kernels.linear import UnsupportedConversionError

    _, model = _quantized_tiny("insertquant")
    with pytest.raises(UnsupportedConversionError, match="group_shared_inputs"):
        convert_(copy.deepcopy(model), "cpu-int8", fused=True, group_shared_inputs=False)


def test_fused_forward_batch_and_padding_mask():
    """Several sequences with right padding: the 4-D attention mask reaches SDPA, rotary rows line up."""
    from vtquant.bench_e2e import token_batches
    from vtquant.kernels import convert_

    _, model = _quantized_tiny("insertquant")
    a = convert_(copy.deepcopy(model), "cpu-int8", fused=False)
    b = convert_(copy.deepcopy(model), "cpu-int8", fused=True)
    x = token_batches(1, 40, 64, seed=5, batch=3)[0]
    mask = torch.ones_like(x)
    mask[1, -7:] = 0
    mask[2, -3:] = 0
    with torch.no_grad():
        la = a(input_ids=x, attention_mask=mask, use_cache=False).logits
        lb = b(input_ids=x, attention_mask=mask, use_cache=False).logits
    keep = mask.bool()
    assert all(blk.forward.calls == 1 for blk in b.model.layers)
    assert _rel(lb[keep], la[keep]) < 1e-4
