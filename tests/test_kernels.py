"""Real int8 execution (vtquant.kernels) against the fake-quant model it was converted from."""
import copy

import pytest
import torch

import vtquant
from vtquant.config import Recipe, SinkConfig, method_recipe
from vtquant.kernels import RealQuantLinear, convert_
from vtquant.bench.gpu import SHAPES, layer_bench
from vtquant.kernels.linear import UnsupportedConversionError
from vtquant.kernels.triton_quant import quant_dynamic_rows, quant_static

from sinkmodels import SINK_ID, implanted_decoder, token_batches


@pytest.fixture(scope="module")
def fp_model():
    torch.set_num_threads(1)
    return implanted_decoder()


def _quantized(model, method, **sinks):
    m = copy.deepcopy(model)
    vtquant.quantize_(m, method_recipe(method, Recipe(sinks=SinkConfig(known_sinks=[], **sinks))),
                      token_batches(), quiet=True)
    return m


@pytest.mark.parametrize("method", ["naive-static", "insertquant", "insertquant+rotate"])
def test_real_int8_matches_fake_quant(fp_model, method):
    batch = token_batches(n=1, seed=7, sink_positions=((0,), (0, 9)))[0]
    fake = _quantized(fp_model, method)
    with torch.no_grad():
        expected = fake(input_ids=batch).logits
    real = convert_(fake, "cpu-int8")
    assert all(isinstance(real.model.layers[i].mlp.down_proj, RealQuantLinear) for i in range(6))
    assert real.model.layers[0].self_attn.q_proj.group is not None  # q/k/v share one int8 matmul
    with torch.no_grad():
        got = real(input_ids=batch).logits
    # identical int8 codes; only the float32 accumulation order differs
    err = (got - expected).abs().max().item()
    print(f"[{method}] real vs fake max |diff| {err:.2e}")
    assert err < 1e-4


def test_real_int8_sinks_and_cached_decoding(fp_model):
    real = convert_(_quantized(fp_model, "insertquant"), "cpu-int8")
    ids = token_batches(n=1, batch=1, seq=20, seed=3, sink_positions=((0,),))[0]
    with torch.no_grad():
        full = real(input_ids=ids).logits[0, -1]
        assert real.vtquant.sink_positions() == [[0]]
        out = real(input_ids=ids[:, :12], use_cache=True)
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        for t in range(12, 20):
            out = real(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True)
            cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    assert (out.logits[0, -1] - full).abs().max().item() < 1e-3


def test_conversion_errors_name_the_problem(fp_model):
    dyn = _quantized(fp_model, "dynamic-token")
    with pytest.raises(UnsupportedConversionError, match="per-tensor static"):
        convert_(dyn, "cpu-int8")
    w4 = copy.deepcopy(fp_model)
    vtquant.quantize_(w4, method_recipe("insertquant", Recipe(sinks=SinkConfig(known_sinks=[])), w_bits=4),
                      token_batches(), quiet=True)
    with pytest.raises(UnsupportedConversionError, match="W8 per-channel"):
        convert_(w4, "cpu-int8")
    with pytest.raises(UnsupportedConversionError, match="not quantized by vtquant"):
        convert_(copy.deepcopy(fp_model), "cpu-int8")
    if not torch.cuda.is_available():
        with pytest.raises(UnsupportedConversionError, match="CUDA"):
            convert_(_quantized(fp_model, "insertquant"), "cuda-fp8")


def test_quantizer_fallbacks_match_reference():
    x = torch.randn(33, 100) * 4
    q = quant_static(x, 0.05, torch.int8)
    assert torch.equal(q, torch.round(x / 0.05).clamp(-127, 127).to(torch.int8))
    qd, s = quant_dynamic_rows(x, torch.int8)
    assert torch.allclose(s.squeeze(1), x.abs().amax(1) / 127)
    assert (qd.float() * s - x).abs().max() <= s.max() / 2 + 1e-6


def test_layer_bench_runs_on_cpu():
    rows = layer_bench(SHAPES["tiny"], "cpu", ["cpu-int8"], repeats=1)
    methods = [r["method"] for r in rows]
    assert methods == ["fp", "dynamic-token", "insertquant"]
    for r in rows[1:]:
        assert r["rel_error"] < 0.1, r


# -- cpu-int8: fused fbgemm kernel vs the torch._int_mm fallback --------------------------------
from vtquant.kernels import linear as kl  # noqa: E402


def _close(got, ref, rel=1e-5):
    return (got - ref).abs().max().item() <= rel * ref.abs().max().item()


@pytest.mark.parametrize("arch,method,group_max_n", [("LlamaForCausalLM", "insertquant", None),
                                                     ("LlamaForCausalLM", "insertquant+rotate", None),
                                                     ("LlamaForCausalLM", "insertquant", 64),  # runs
                                                     ("Qwen2ForCausalLM", "insertquant", 64)])  # biases
def test_cpu_fbgemm_kernel_matches_int_mm_fallback(fp_model, monkeypatch, arch, method, group_max_n):
    monkeypatch.delenv(kl.CPU_KERNEL_ENV, raising=False)
    if group_max_n is not None:  # q/k/v -> [q], [k, v]; gate / up one GEMM each
        monkeypatch.setattr(kl, "FBGEMM_GROUP_MAX_N", group_max_n)
    model = fp_model if arch == "LlamaForCausalLM" else implanted_decoder(arch)
    # two quantizations (deterministic), not a deepcopy: a copied model's sink state is not its own
    fused = convert_(_quantized(model, method), "cpu-int8", cpu_kernel="auto")
    fallback = convert_(_quantized(model, method), "cpu-int8", cpu_kernel="int_mm")
    expected_kernel = "fbgemm" if kl.fbgemm_mode() is not None else "int_mm"
    for name, m in fused.named_modules():
        if isinstance(m, RealQuantLinear):
            assert m.cpu_kernel == expected_kernel, name
    assert all(m.cpu_kernel == "int_mm" for m in fallback.modules() if isinstance(m, RealQuantLinear))
    group = fused.model.layers[0].self_attn.q_proj.group
    assert group is not None
    if expected_kernel == "fbgemm":
        runs = [sizes for sizes, _ in group.fbgemm_chunks()]
        assert runs == ([group.sizes] if group_max_n is None else [group.sizes[:1], group.sizes[1:]])
    batch = token_batches(n=1, seed=7, sink_positions=((0,), (0, 9)))[0]  # sink rows, 2 x 32 rows
    with torch.no_grad():
        got, ref = fused(input_ids=batch).logits, fallback(input_ids=batch).logits
        assert _close(got, ref), (got - ref).abs().max().item()
        # one-row inputs (decode) take torch._int_mm in both
        one, one_ref = fused(input_ids=batch[:1, :1]).logits, fallback(input_ids=batch[:1, :1]).logits
        assert torch.equal(one, one_ref)


def test_cpu_fbgemm_layer_exact_on_saturating_rows(fp_model):
    if kl.fbgemm_mode() is None:
        pytest.skip("fused fbgemm kernel unavailable here (the fallback is covered elsewhere)")
    real = convert_(_quantized(fp_model, "insertquant"), "cpu-int8", group_shared_inputs=False)
    layer = real.model.layers[1].mlp.down_proj
    layer.guard = None  # plain layer: no sink rows
    s = float(layer.a_scale)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 41, layer.in_features, generator=g) * 60 * s
    x[0, 0, :7] = 500 * s  # saturates at +127
    x[1, 2, 3:9] = -500 * s  # saturates at -127 (fbgemm's own quantizer would give -128)
    x[2, :5] = (torch.randint(-130, 130, (5, layer.in_features), generator=g) + 0.5) * layer.a_scale  # ties
    codes = torch.round(x / layer.a_scale).clamp(-127, 127)
    exact = (codes.double() @ layer.qweight.double().t()) * layer.out_scale.double()
    with torch.no_grad():
        got = layer(x)
        layer.cpu_kernel = "int_mm"
        ref = layer(x)
    assert _close(got, ref)
    assert _close(ref, exact.float()) and _close(got, exact.float())


def test_cpu_kernel_forced_fallback(fp_model, monkeypatch):
    fake = _quantized(fp_model, "insertquant")  # copies below only for conversion checks

    def boom(*args, **kwargs):
        raise AssertionError("fbgemm used although int_mm was forced")

    monkeypatch.setattr(kl, "fbgemm_linear", boom)
    monkeypatch.setenv(kl.CPU_KERNEL_ENV, "int_mm")
    real = convert_(copy.deepcopy(fake), "cpu-int8")
    assert real.vtquant.cpu_kernel == "int_mm"
    assert "cpu_kernel=int_mm" in repr(real.model.layers[0].mlp.down_proj)
    with torch.no_grad():
        real(input_ids=token_batches(n=1)[0])
    with pytest.raises(UnsupportedConversionError, match="cpu kernel"):
        convert_(copy.deepcopy(fake), "cpu-int8", cpu_kernel="cublas")
    # an unusable fused kernel falls back automatically under auto, and is an error when insisted on
    monkeypatch.delenv(kl.CPU_KERNEL_ENV)
    monkeypatch.setattr(kl, "_fbgemm_probe", (None, "probe says no"))
    assert convert_(copy.deepcopy(fake), "cpu-int8", cpu_kernel="auto").vtquant.cpu_kernel == "int_mm"
    with pytest.raises(UnsupportedConversionError, match="probe says no"):
        convert_(copy.deepcopy(fake), "cpu-int8", cpu_kernel="fbgemm")
