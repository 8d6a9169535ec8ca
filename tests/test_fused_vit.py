"""The producer-fused ViT block forward on the CPU (int8 codes, torch reference kernels) and its Triton kernels
under Triton's interpreter.  The CUDA side (FP8) is ``tests/test_gpu_fused_vit.py``.

* ``convert_(model, "cpu-int8", fused=True)`` on implanted-sink timm ViTs and an open_clip visual tower
  (insertquant, insertquant+rotate) reproduces the per-Linear modules in float32, and the sinks' rows
  (templates and the protected CLS row in full precision) are what make it right;
* the fused per-token dynamic peer against the unfused one;
* blocks it cannot cover keep their forward, with the reason.
"""
import copy
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import visionmodels as vm

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _quantized(model, method, kinds=("cls", "registers")):
    import vtquant
    from vtquant.config import Recipe, SinkConfig, method_recipe

    q = copy.deepcopy(model)
    calib = [vm.make_images(vm.random_painted(8, s), seed=s) for s in range(3)]
    vtquant.quantize_(q, method_recipe(method, Recipe(sinks=SinkConfig(known_sinks=list(kinds)), ignore=[])), calib,
                      quiet=True)
    return q


_MODELS: dict = {}


def _model(name):
    if name not in _MODELS:
        _MODELS[name] = {"timm": lambda: vm.timm_vit(), "open_clip": lambda: vm.open_clip_tiny().visual}[name]()
    return _MODELS[name]


@pytest.mark.parametrize("family,method", [("timm", "insertquant"), ("timm", "insertquant+rotate"),
                                           ("open_clip", "insertquant")])
def test_fused_vit_matches_per_linear_modules(family, method):
    from vtquant.kernels import convert_
    from vtquant.kernels import fused_vit as fv

    fp = _model(family)
    q = _quantized(fp, method, ("cls", "registers") if family == "timm" else ("cls",))
    unfused = convert_(copy.deepcopy(q), "cpu-int8", fused=False)
    fused = convert_(copy.deepcopy(q), "cpu-int8", fused=True)
    assert not unfused.vtquant.fused
    assert set(fused.vtquant.fused.values()) == {"fused"}, fused.vtquant.fused
    blocks = list(fused.blocks) if family == "timm" else list(fused.transformer.resblocks)
    sites = [b.forward.sites for b in blocks]
    assert any(s["fc2"].detector is not None for s in sites)  # the stage layer runs fused (its probe materialised)
    assert all(s["qkv"].rows == "rows" and s["qkv"].need_fp for s in sites)  # the protected CLS row: full precision
    if method == "insertquant+rotate":
        assert all(s["fc2"].rot is not None for s in sites)
    x = vm.make_images(vm.random_painted(5, 21), seed=21)  # painted patches: content sinks found per image
    with torch.no_grad():
        ref = fp(x)
        a = unfused(x)
        b = fused(x)
    assert [blk.forward.calls for blk in blocks] == [1] * len(blocks)
    assert _rel(b, a) < 1e-4, _rel(b, a)  # float32: the same int8 codes and sums
    if method == "insertquant":
        assert _rel(a, ref) < 0.05
    orig = fv._VSite.write_rows
    fv._VSite.write_rows = lambda *args, **kw: None  # without the sinks' rows the output is far off
    try:
        with torch.no_grad():
            c = fused(x)
    finally:
        fv._VSite.write_rows = orig
    assert _rel(c, a) > 0.1
    fv.unfuse_(fused)
    assert not any(hasattr(b, fv.FUSED_ATTR) or "forward" in b.__dict__ for b in blocks)


def test_fused_vit_dynamic_matches_unfused():
    from vtquant.bench_e2e_vit import dynamic_vit_

    fp = _model("timm")
    a = dynamic_vit_(copy.deepcopy(fp), "cpu-int8", fused=False)
    b = dynamic_vit_(copy.deepcopy(fp), "cpu-int8", fused=True)
    assert set(b._vtquant_fusion_report.values()) == {"fused"}
    x = vm.make_images(vm.random_painted(4, 3), seed=3)
    with torch.no_grad():
        assert _rel(b(x), a(x)) < 2e-3  # int8 rounding: half away from zero (fused) vs half to even


def test_uncovered_blocks_keep_their_forward():
    from vtquant.kernels import convert_
    from vtquant.kernels.fused_vit import vit_layout

    fp = copy.deepcopy(_model("timm"))
    fp.blocks[1].attn.q_norm = torch.nn.LayerNorm(16)  # q/k norms: not covered
    assert "q/k norms" in vit_layout(fp.blocks[1])[1]
    q = _quantized(fp, "insertquant")
    fused = convert_(copy.deepcopy(q), "cpu-int8", fused=True)
    report = fused.vtquant.fused
    assert report[1] != "fused" and "q/k norms" in report[1] and report[0] == "fused"
    unfused = convert_(copy.deepcopy(q), "cpu-int8", fused=False)
    x = vm.make_images(vm.random_painted(3, 4), seed=4)
    with torch.no_grad():
        assert _rel(fused(x), unfused(x)) < 1e-4


@pytest.mark.skipif(not importlib.util.find_spec("triton"), reason="triton is not installed")
def test_vit_kernels_interpreted():
    code = textwrap.dedent("""
        import torch
        from vtquant.kernels import fused_vit as fv
        from vtquant.kernels import triton_quant as tq
        torch.manual_seed(0)
        n = 48
        ln = torch.nn.LayerNorm(n)
        with torch.no_grad():
            ln.weight.normal_(1, 0.2); ln.bias.normal_(0, 0.2)
        x, y = torch.randn(5, n) * 3, torch.randn(5, n)
        zero = torch.tensor([True, False, False, True, False])
        norm = fv._Norm(ln)
        q, s, h = fv.norm_codes(x, norm, 0.02, torch.int8, zero, add=y)
        assert torch.allclose(h, x + y) and (q[zero] == 0).all()
        r = tq._zero(tq._codes(fv.ref_norm(x + y, norm).float() / 0.02, torch.int8), zero)
        assert int((q.int() - r.int()).abs().max()) <= 1, (q, r)
        q, s, _ = fv.norm_codes(x, norm, None, torch.int8)
        rq, rs = tq._row_codes(fv.ref_norm(x, norm), torch.int8)
        assert torch.allclose(s, rs, rtol=1e-5) and int((q.int() - rq.int()).abs().max()) <= 1
        u = torch.nn.functional.normalize(torch.randn(n), dim=0)
        class P(torch.nn.Module):
            pass
        p = P(); p.u = u; p.eps = 1e-6
        P.__name__ = "ProjectedRMSNorm"
        pn = fv._Norm(p)
        q, _, _ = fv.norm_codes(x, pn, 0.02, torch.int8)
        r = tq._codes(fv.ref_norm(x, pn).float() / 0.02, torch.int8)
        assert int((q.int() - r.int()).abs().max()) <= 1
        f = torch.randn(7, 4 * n) * 2
        for act in ("gelu", "gelu_poly", "gelu_tanh", "quick_gelu", "identity"):
            zr = torch.zeros(7, dtype=torch.bool); zr[2] = True
            q, _ = fv.act_codes(f, act, 0.01, torch.int8, zr)
            r = tq._zero(tq._codes(fv.ref_act(f, act).float() / 0.01, torch.int8), zr)
            assert (q[2] == 0).all() and int((q.int() - r.int()).abs().max()) <= 1, act
            q, s = fv.act_codes(f, act, None, torch.int8)
            rq, rs = tq._row_codes(fv.ref_act(f, act), torch.int8)
            assert torch.allclose(s, rs, rtol=1e-4) and int((q.int() - rq.int()).abs().max()) <= 1, act
            assert torch.allclose(fv.act_values(f, act), fv.ref_act(f, act), atol=1e-5), act
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
