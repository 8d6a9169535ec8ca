"""Producer-fused quantization (RMSNorm -> codes, SiLU * up -> codes, SwiGLU GEMM epilogue -> codes).

The GPU kernels themselves are checked on the GPU by ``vtquant.bench.gpu.check_fused`` (run at the start of
every GPU bench).  Here, on the CPU: the pure-PyTorch references and the CPU fallback / dispatch
logic, the fused layer variants of the layer bench against the unfused modules, and (where Triton is
installed) the Triton kernels themselves through Triton's interpreter (``TRITON_INTERPRET=1``, in a
subprocess because the interpreter is chosen when the kernels are defined).
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vtquant.core.sinks import SinkState
from vtquant.bench import gpu as gb
from vtquant.kernels import triton_quant as tq

ROOT = Path(__file__).resolve().parents[1]


def _half_away(y):
    return torch.sign(y) * torch.floor(y.abs() + 0.5)


def test_references_and_cpu_fallbacks():
    torch.manual_seed(0)
    x = torch.randn(9, 48) * 3
    x[2] *= 30
    w = torch.rand(48) + 0.5
    eps = 1e-5
    zero = torch.zeros(9, dtype=torch.bool)
    zero[[0, 5]] = True
    normed = torch.nn.RMSNorm(48, eps=eps)
    normed.weight.data.copy_(w)
    y = normed(x).detach()
    # static: codes = sat(round_half_away(norm(x) / s)), sink rows zero
    got = tq.rmsnorm_quant_static(x, w, eps, 0.02, torch.int8, zero)  # CPU tensor: the reference path
    want = _half_away(y / 0.02).clamp(-127, 127)
    want[zero] = 0
    assert got.dtype == torch.int8
    assert (got.float() - want).abs().max() <= 1  # x / s vs x * (1 / s): at most one tie apart
    assert (got[zero] == 0).all()
    got8 = tq.rmsnorm_quant_static(x, w, eps, 0.02, torch.float8_e4m3fn, zero)
    assert got8.dtype == torch.float8_e4m3fn and (got8[zero].float() == 0).all()
    assert torch.allclose(got8[~zero].float(), (y[~zero] / 0.02).clamp(-448, 448), rtol=0.07, atol=2 ** -9)
    # dynamic: per-row absmax scale; the row max maps to qmax
    q, s = tq.rmsnorm_quant_dynamic(x, w, eps, torch.int8)
    assert torch.allclose(s, y.abs().amax(1, keepdim=True) / 127)
    assert (q.abs().amax(1) == 127).all()
    # SiLU * up
    gu = torch.randn(9, 2 * 40) * 2
    h = F.silu(gu[:, :40]) * gu[:, 40:]
    got = tq.silu_mul_quant_static(gu, 0.01, torch.int8, zero)
    want = _half_away(h / 0.01).clamp(-127, 127)
    want[zero] = 0
    assert (got.float() - want).abs().max() <= 1
    q, s = tq.silu_mul_quant_dynamic(gu, torch.int8)
    assert torch.allclose(s, h.abs().amax(1, keepdim=True) / 127)
    assert ((q.float() * s - h).abs() <= s / 2 + 1e-6).all()
    # the SwiGLU GEMM (CPU: reference path; int8 codes also fall back there)
    a = torch.randint(-127, 128, (9, 128), dtype=torch.int8)
    wq = torch.randint(-127, 128, (2 * 40, 128), dtype=torch.int8)
    cs = torch.rand(80) * 1e-4
    ref_h = F.silu((a.float() @ wq.float().T * cs)[:, :40]) * (a.float() @ wq.float().T * cs)[:, 40:]
    assert torch.allclose(tq.ref_swiglu_matmul(a, wq, cs), ref_h, rtol=1e-5, atol=1e-6)
    got = tq.swiglu_matmul_static(a, wq, cs, 0.01, torch.int8, zero)
    want = _half_away(ref_h / 0.01).clamp(-127, 127)
    want[zero] = 0
    assert (got.float() - want).abs().max() <= 1
    rs = torch.rand(9, 1) + 0.5
    q, s = tq.swiglu_matmul_dynamic(a, wq, cs, rs, torch.int8)
    hb = tq.ref_swiglu_matmul(a, wq, cs, rs).to(torch.bfloat16).float()
    assert torch.allclose(s, hb.abs().amax(1, keepdim=True) / 127)


def test_variant_rules():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert gb.variant_ok("fused-gemm", "cuda-fp8", cuda)
    assert not gb.variant_ok("fused-gemm", "cuda-int8", cuda)  # the Triton GEMM takes FP8 codes
    assert gb.variant_ok("fused-producers", "cuda-int8", cuda)
    with pytest.raises(ValueError, match="variant"):
        gb.variant_ok("fused-everything", "cuda-fp8", cuda)
    with pytest.raises(ValueError, match="gated"):
        gb.FusedDynamicLayer(gb.SynthLayer(gb.SHAPES["vit-b16"]), "cpu-int8", False)


def _tiny_layers():
    shape = gb.SHAPES["tiny"]
    torch.manual_seed(0)
    base = gb.SynthLayer(shape)
    b, t, d = shape.batch, shape.seq, shape.hidden
    sink = torch.randn(d) * 50
    x = torch.randn(b, t, d)
    x[:, 0] = sink
    calib = torch.randn(b, t, d)
    calib[:, 0] = sink
    known = torch.zeros(b, t, dtype=torch.bool)
    known[:, 0] = True
    st = SinkState("bsd")
    st.reset(known)
    stat = gb.SynthLayer(shape)
    stat.load_state_dict(base.state_dict())
    stat = gb._static_layer(stat, "cpu-int8", calib, st)
    dyn = gb.SynthLayer(shape)
    dyn.load_state_dict(base.state_dict())
    for name, lin in dyn.linears().items():
        setattr(dyn, name, gb.DynamicRowLinear(lin, "cpu-int8"))
    return x, known, st, stat, dyn


@torch.no_grad()
def test_fused_layers_match_unfused_modules(monkeypatch):
    monkeypatch.setattr(gb, "FUSED_GEMM_MIN_ROWS", 0)  # exercise the fused-gemm branch at 64 rows
    x, known, st, stat, dyn = _tiny_layers()
    st.reset(known)
    y_unfused = stat(x)
    for gemm in (False, True):
        st.reset(known)
        y = gb.FusedStaticLayer(stat, st, "cpu-int8", gemm)(x)
        # same codes up to rounding ties (x * (1/s) vs x / s, and no rounding of h between steps)
        rel = ((y - y_unfused).norm() / y_unfused.norm()).item()
        assert rel < 2e-3, rel
        # the sink rows carry the templates (o and down templates written by index)
        assert torch.allclose(y[:, 0], y_unfused[:, 0], rtol=1e-4, atol=1e-4)
    # decode: no sinks among the new tokens
    st.reset(None)
    x1 = x[:, -1:].contiguous()
    assert torch.allclose(gb.FusedStaticLayer(stat, st, "cpu-int8", False)(x1), stat(x1), rtol=1e-3, atol=1e-3)
    y_dyn = dyn(x)
    for gemm in (False, True):
        y = gb.FusedDynamicLayer(dyn, "cpu-int8", gemm)(x)
        rel = ((y - y_dyn).norm() / y_dyn.norm()).item()
        assert rel < 2e-3, rel


def test_fused_static_rejects_full_precision_sink_rows():
    _, _, st, stat, _ = _tiny_layers()
    stat.down.guard.mode = "fp-row"
    with pytest.raises(NotImplementedError, match="template"):
        gb.FusedStaticLayer(stat, st, "cpu-int8", False)


def test_layer_bench_variants_and_rounds_on_cpu(monkeypatch):
    monkeypatch.setattr(gb, "FUSED_GEMM_MIN_ROWS", 0)
    rows = gb.layer_bench(gb.SHAPES["tiny"], "cpu", ["cpu-int8"], repeats=1, variants=gb.VARIANTS, rounds=2)
    got = [(r["method"], r["variant"]) for r in rows]
    assert got == [("fp", "unfused")] + [(m, v) for m in ("dynamic-token", "insertquant") for v in gb.VARIANTS]
    by = {(r["method"], r["variant"]): r for r in rows}
    for v in gb.VARIANTS[1:]:
        for m in ("dynamic-token", "insertquant"):
            assert abs(by[(m, v)]["rel_error"] - by[(m, "unfused")]["rel_error"]) < 2e-3
    assert all(len(r["prefill_seconds_rounds"]) == 2 for r in rows[1:])
    assert len(rows[0]["prefill_seconds_rounds"]) == 2
    text = gb.format_comparison(rows)
    assert text.count("| tiny | cpu-int8 |") == 3
    assert "fused-producers" in gb.format_rows(rows)
    # the default (what `vtquant bench --device cuda` asks for) keeps the old rows
    rows = gb.layer_bench(gb.SHAPES["tiny"], "cpu", ["cpu-int8"], repeats=1)
    assert [r["method"] for r in rows] == ["fp", "dynamic-token", "insertquant"]


_INTERPRETED = textwrap.dedent('''
    import torch
    from vtquant.kernels import triton_quant as tq
    assert tq.HAVE_TRITON and tq._interpreting()
    torch.manual_seed(0)

    def same(got, ref, dtype):
        g, r = got.float(), ref.float()
        if dtype == torch.int8:
            assert ((g - r).abs() <= 1).all() and (g != r).float().mean() < 0.02
            return
        # the interpreter's float32 -> e4m3 cast does not carry a mantissa overflow into the exponent:
        # a value that rounds up to a power of two comes out smaller (half of it, or the largest
        # subnormal at the normal range's bottom), and subnormals may land one step (2^-9) off.
        pow2 = torch.frexp(r)[0].abs() == 0.5
        below = (g * r > 0) & (g.abs() < r.abs()) & (g.abs() >= r.abs() / 2 - 2.0 ** -9)
        ok = (g == r) | ((g - r).abs() <= 2.0 ** -9) | (pow2 & below)
        assert ok.all(), (g[~ok][:5], r[~ok][:5])

    for dtype in (torch.int8, torch.float8_e4m3fn):
        for n in (64, 100):
            x = (torch.randn(7, n) * 3).to(torch.bfloat16)
            w = (torch.rand(n) + 0.5).to(torch.bfloat16)
            z = torch.tensor([1, 0, 0, 1, 0, 0, 0], dtype=torch.bool)
            same(tq.rmsnorm_quant_static(x, w, 1e-6, 0.02, dtype, z), tq.ref_rmsnorm_quant_static(x, w, 1e-6, 0.02, dtype, z), dtype)
            same(tq.rmsnorm_quant_static(x, None, 1e-6, 0.02, dtype), tq.ref_rmsnorm_quant_static(x, None, 1e-6, 0.02, dtype), dtype)
            q, s = tq.rmsnorm_quant_dynamic(x, w, 1e-6, dtype)
            rq, rs = tq.ref_rmsnorm_quant_dynamic(x, w, 1e-6, dtype)
            same(q, rq, dtype)
            assert torch.allclose(s, rs, rtol=1e-5)
            gu = (torch.randn(7, 2 * n) * 2).to(torch.bfloat16)
            same(tq.silu_mul_quant_static(gu, 0.01, dtype, z), tq.ref_silu_mul_quant_static(gu, 0.01, dtype, z), dtype)
            for single in (True, False):
                q, s = tq.silu_mul_quant_dynamic(gu, dtype, single=single)
                rq, rs = tq.ref_silu_mul_quant_dynamic(gu, dtype)
                same(q, rq, dtype)
                assert torch.allclose(s, rs, rtol=1e-5)
    # the SwiGLU GEMM with FP8 operands (the interpreter's bf16 dot is not usable); M, NH not tile multiples
    f8 = torch.float8_e4m3fn
    M, K, NH = 40, 256, 48
    q = (torch.randn(M, K) * 4).to(f8)
    w = (torch.randn(2 * NH, K) * 4).to(f8)
    cs = torch.rand(2 * NH) * 0.01 + 0.001
    z = torch.zeros(M, dtype=torch.bool)
    z[::9] = True
    same(tq.swiglu_matmul_static(q, w, cs, 0.05, f8, z), tq._zero(tq._codes(tq.ref_swiglu_matmul(q, w, cs) * 20.0, f8), z), f8)
    rs_in = torch.rand(M, 1) + 0.5
    got, gs = tq.swiglu_matmul_dynamic(q, w, cs, rs_in, f8)
    rq, rs = tq._row_codes(tq.ref_swiglu_matmul(q, w, cs, rs_in).to(torch.bfloat16), f8)
    # the interpreter's float32 -> bf16 cast of h differs from torch's by up to one bf16 ulp
    assert torch.allclose(gs, rs, rtol=1e-2)
    deq, ref = got.float() * gs, tq.ref_swiglu_matmul(q, w, cs, rs_in)
    assert ((deq - ref).norm() / ref.norm()) < 0.1
    print("interpreted kernels OK")
''')


def test_triton_kernels_interpreted():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "interpreted kernels OK" in out.stdout
