"""CPU int8 execution (issue 13, CPU part): the fused forward's CPU producers against the fake quantizer,
the oneDNN int8 matmul against torch._int_mm, the fused per-token dynamic peer against the unfused one,
full-precision sink rows in the fused forward, and the bench's CPU / kernel reporting."""
import copy

import pytest
import torch

import vtquant
from vtquant.config import ActArgs, Recipe, SinkConfig, method_recipe
from vtquant.core.quant import ActQuantizer
from vtquant.core.rotation import fwht_, hadamard_apply, random_hadamard_factors
from vtquant.kernels import convert_
from vtquant.kernels import cpu_quant as cq
from vtquant.kernels import fused as fz
from vtquant.kernels import linear as kl

from sinkmodels import implanted_decoder, token_batches


@pytest.fixture(scope="module")
def fp_model():
    torch.set_num_threads(1)
    return implanted_decoder()


def _quantized(model, method):
    m = copy.deepcopy(model)
    vtquant.quantize_(m, method_recipe(method, Recipe(sinks=SinkConfig(known_sinks=[]))), token_batches(), quiet=True)
    return m


def _fake_codes(x, scale):
    act = ActQuantizer(ActArgs(bits=8))
    act.scale.fill_(scale)
    act.zero_point.zero_()
    act.mode = "quant"
    return torch.round(act.fake_quant(x) / act.scale)  # the fake quantizer's grid points, as codes


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_cpu_producers_are_the_fake_quantizers_codes():
    g = torch.Generator().manual_seed(0)
    scale = float(torch.tensor(0.0123456789))
    x = torch.randn(40, 96, generator=g) * 60 * scale
    x[:8] = (torch.randint(-140, 140, (8, 96), generator=g) + 0.5) * scale  # ties and saturation
    q = cq.static_codes_(x, scale)
    assert q.dtype == torch.int8 and torch.equal(q.float(), _fake_codes(x, scale))
    assert torch.equal(cq.static_codes_(x, scale, u8=True).int() - 128, q.int())
    index = torch.tensor([0, 5])
    assert not cq.static_codes_(x, scale, index).index_select(0, index).any()
    # RMSNorm -> codes: transformers' LlamaRMSNorm, then the fake quantizer
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(96, eps=1e-5)
    norm.weight.data = torch.rand(96, generator=g) + 0.5
    with torch.no_grad():
        assert torch.equal(cq.rmsnorm_codes(x, norm.weight, 1e-5, scale).float(), _fake_codes(norm(x), scale))
    # SiLU * up (-> the online Hadamard) -> codes: the MLP's act_fn(gate) * up, QuantLinear's rotation
    gu = torch.randn(40, 2 * 96, generator=g) * 3
    h = torch.nn.functional.silu(gu[:, :96]) * gu[:, 96:]
    assert torch.equal(cq.silu_mul_codes(gu, scale).float(), _fake_codes(h, scale))
    signs, factors = random_hadamard_factors(96, 0)
    assert torch.equal(cq.silu_mul_codes(gu, scale, rot=(signs, factors)).float(),
                       _fake_codes(hadamard_apply(h, signs, factors), scale))
    # dynamic: the unfused per-token peer's CPU quantizer
    from vtquant.kernels.triton_quant import quant_dynamic_rows

    qd, sd = cq.dynamic_codes_(x)
    qr, sr = quant_dynamic_rows(x, torch.int8)
    assert torch.equal(qd, qr) and torch.equal(sd, sr)


def test_fwht_buffers_bit_identical_to_the_traced_butterfly():
    x = torch.randn(6, 64, 12)
    fast = fwht_(x, 1)
    with torch.enable_grad():  # under autograd the stack-based butterfly runs (the one that is traced)
        slow = fwht_(x.clone().requires_grad_(), 1).detach()
    assert torch.equal(fast, slow)
    assert torch.equal(fwht_(x[:, :1].contiguous(), 1), x[:, :1])  # n = 1: a copy, not the input


def test_onednn_int8_matmul_is_exact_and_reported(fp_model, monkeypatch):
    ok, why = cq.onednn_ok()
    if not ok:
        pytest.skip(f"oneDNN int8 matmul unusable here: {why}")
    monkeypatch.delenv(kl.CPU_KERNEL_ENV, raising=False)
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-127, 128, (33, 64), generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (40, 64), generator=g, dtype=torch.int8)
    s = torch.rand(40, generator=g)
    got = cq.onednn_linear(cq.to_u8_(q.float()), cq.onednn_pack(w), s, None, torch.float32)
    assert torch.equal(got, torch._int_mm(q, w.t()).float().mul_(s))
    # the default: onednn only on CPUs with AMX int8 (measured even with int_mm on AVX-512 VNNI)
    monkeypatch.setattr(cq, "has_amx_int8", lambda: True)
    assert kl.resolve_cpu_kernel() == "onednn"
    monkeypatch.setattr(cq, "has_amx_int8", lambda: False)
    assert kl.resolve_cpu_kernel() == "int_mm"
    fake = _quantized(fp_model, "insertquant")
    batch = token_batches(n=1, seed=7, sink_positions=((0,), (0, 9)))[0]
    models = {(k, f): convert_(copy.deepcopy(fake), "cpu-int8", cpu_kernel=k, fused=f)
              for k in ("onednn", "int_mm") for f in (True, False)}
    with torch.no_grad():
        logits = {k: m(input_ids=batch).logits for k, m in models.items()}
        ran = {k: cq.onednn_kernels(m, input_ids=batch) for k, m in models.items()}
        ref = fake(input_ids=batch).logits
    for k, out in logits.items():
        assert _rel(out, ref) < 1e-5, k  # the same codes, exact int32 sums
    for fused in (True, False):
        assert any(k.startswith("matmul brg_matmul") for k in ran[("onednn", fused)]), ran[("onednn", fused)]
        if not cq.has_amx_int8():  # measured on AVX-512 VNNI; how oneDNN serves the legacy API on AMX is unmeasured
            assert not any(k.startswith("matmul") for k in ran[("int_mm", fused)]), ran[("int_mm", fused)]
            assert ran[("int_mm", fused)].get("gemm_api", 0) > 0  # torch._int_mm: oneDNN's legacy s8 GEMM API
    from vtquant.bench.cpu import kernel_label

    assert "oneDNN qlinear" in kernel_label("insertquant", models[("onednn", True)])
    assert "torch._int_mm" in kernel_label("insertquant", models[("int_mm", False)])


def test_fused_cpu_dynamic_peer_equals_unfused():
    from vtquant.bench_e2e import dynamic_token_, implanted_llama

    torch.manual_seed(0)
    base = implanted_llama("tiny", 4, "cpu", torch.float32, spike=200.0)
    for kernel in ("int_mm",) + (("onednn",) if cq.onednn_ok()[0] else ()):
        a = dynamic_token_(copy.deepcopy(base), "cpu-int8")
        b = copy.deepcopy(base)
        layout = fz.decoder_layout(b)  # read before the Linears are replaced
        fz.fuse_dynamic_(dynamic_token_(b, "cpu-int8"), layout, cpu_kernel=kernel)
        assert sum(v == "fused" for v in fz.fused_blocks(b).values()) == 4
        assert {s.cpu_kernel for blk in b.model.layers for s in blk.forward.sites.values()} == {kernel}
        x = token_batches(1, 40, 64, seed=5)[0]
        with torch.no_grad():
            la = a(input_ids=x, use_cache=False).logits
            lb = b(input_ids=x, use_cache=False).logits
        assert all(blk.forward.calls == 1 for blk in b.model.layers)
        assert _rel(lb, la) < 1e-5, (kernel, _rel(lb, la))  # the same codes (division, half to even)


@pytest.mark.parametrize("mode", ["fp-row", "mixed"])
def test_fused_forward_full_precision_sink_rows(fp_model, mode):
    fake = _quantized(fp_model, "insertquant")
    guards = [m.guard for m in fake.modules() if getattr(m, "guard", None) is not None and m.guard.mode == "template"]
    assert guards
    for gd in guards:  # every sink row in full precision, or type 0 only (templates for the others)
        if mode == "fp-row":
            gd.mode = "fp-row"
        else:
            gd.template_ok[0] = False
    a = convert_(copy.deepcopy(fake), "cpu-int8", fused=False)
    b = convert_(copy.deepcopy(fake), "cpu-int8", fused=True)
    assert all(v == "fused" for v in b.vtquant.fused.values()), b.vtquant.fused
    assert any(s.policy == "rows" for blk in b.model.layers for s in blk.forward.sites.values())
    batch = token_batches(n=1, seed=7, sink_positions=((0,), (0, 9)))[0]
    with torch.no_grad():
        la, lb, ref = a(input_ids=batch).logits, b(input_ids=batch).logits, fake(input_ids=batch).logits
    assert _rel(lb, la) < 1e-5 and _rel(lb, ref) < 1e-4
    orig = fz._Site.write_sinks  # the rows written are what make it right
    fz._Site.write_sinks = lambda *args, **kw: None
    try:
        with torch.no_grad():
            lc = b(input_ids=batch).logits
    finally:
        fz._Site.write_sinks = orig
    assert _rel(lc, la) > 1e-3


def test_bench_table_names_cpu_and_kernels():
    from vtquant.bench.cpu import CpuBenchSettings, cpu_rows, format_cpu_table

    feats = cq.cpu_features()
    assert feats["cpu"] and isinstance(feats["flags"], list) and feats["torch_cpu_capability"]
    base = {"model": "m", "prefill_seconds": 0.5, "decode_tokens_per_s": 10.0, "peak_mem_mb": 1.0, "threads": 2,
            **feats}
    results = [dict(base, method="fp", prefill_tokens_per_s=100.0, kernel="aten fp32 GEMM", onednn_ran={}),
               dict(base, method="insertquant", prefill_tokens_per_s=150.0, kernel="oneDNN qlinear",
                    onednn_ran={"matmul brg_matmul:avx512_core_amx": 4, "isa AMX": 1}, fused_blocks="30",
                    perplexity_fake=10.0, perplexity_real=10.01)]
    results[0]["prefill_rounds_s"] = [1.0, 2.0, 1.0]
    results[1]["prefill_rounds_s"] = [0.5, 1.0, 1.0]  # 2x, 2x, 1x the fp row in the same rounds
    text = format_cpu_table(results, CpuBenchSettings())
    assert f"CPU: {feats['cpu']}" in text and "| insertquant | cpu-int8 (fused) | 150 | 1.50 |" in text
    assert "insertquant: oneDNN qlinear; fused blocks 30; oneDNN ran: matmul brg_matmul:avx512_core_amx x4" in text
    assert "oneDNN ISA: AMX" in text
    assert "insertquant prefill speed / other, median of interleaved rounds: fp 2.000" in text
    rows = cpu_rows(results)
    assert rows[-1].extra["kernel"] == "oneDNN qlinear" and rows[-1].extra["cpu"] == feats["cpu"]
