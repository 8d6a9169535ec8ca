"""Hadamard constructions and function-preserving rotation of tiny decoders (QuaRot-style)."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers

import vtquant
from vtquant.adapters import get_adapter
from vtquant.adapters.hf_decoder import tiny_config
from vtquant.config import Recipe, RotationConfig, SinkConfig
from vtquant.core.quant import QuantLinear
from vtquant.core.rotation import hadamard_factors, hadamard_matrix, random_hadamard, rotate_model_

ARCHS = ["LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM", "GemmaForCausalLM"]
HADAMARD_ORDERS = [12, 20, 24, 48, 64, 72, 576, 1536, 768]
NO_CONSTRUCTION = [86, 172]  # 2*43, 4*43: no Sylvester x Paley factorisation


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread, immune to contention


@pytest.mark.parametrize("n", HADAMARD_ORDERS)
def test_hadamard_matrix_is_hadamard(n):
    h = hadamard_matrix(n)
    assert h is not None and h.shape == (n, n)
    assert bool(((h == 1) | (h == -1)).all())
    gram = h.float() @ h.float().T  # integer sums <= n: exact in float32
    assert torch.equal(gram, n * torch.eye(n))
    prod = 1
    for f in hadamard_factors(n):
        prod *= f
    assert prod == n


@pytest.mark.parametrize("n", HADAMARD_ORDERS)
def test_random_hadamard_is_orthonormal_hadamard(n):
    q = random_hadamard(n, seed=3)
    assert q.dtype == torch.float32 and q.shape == (n, n)
    torch.testing.assert_close(q.double() @ q.double().T, torch.eye(n, dtype=torch.float64), atol=1e-5, rtol=0)
    # a scaled Hadamard: every entry is +-1/sqrt(n)
    torch.testing.assert_close(q.abs(), torch.full((n, n), n ** -0.5), atol=1e-6, rtol=0)
    # seeded: same seed, same matrix; another seed, other signs
    assert torch.equal(q, random_hadamard(n, seed=3))
    assert not torch.equal(q, random_hadamard(n, seed=4))


@pytest.mark.parametrize("n", NO_CONSTRUCTION)
def test_no_construction_known(n):
    assert hadamard_factors(n) == ()
    assert hadamard_matrix(n) is None




def test_odd_order_fallback_is_orthonormal():
    n = 43  # no power-of-two part: the fallback is the random orthogonal factor alone
    q = random_hadamard(n, seed=0)
    torch.testing.assert_close(q.double() @ q.double().T, torch.eye(n, dtype=torch.float64), atol=1e-5, rtol=0)
    assert torch.equal(q, random_hadamard(n, seed=0))


@pytest.mark.parametrize("n", [86, 172])
def test_no_construction_falls_back_to_orthonormal(n):
    q = random_hadamard(n, seed=0)
    assert q.shape == (n, n)
    torch.testing.assert_close(q.double() @ q.double().T, torch.eye(n, dtype=torch.float64), atol=1e-5, rtol=0)
    assert not torch.allclose(q.abs(), torch.full((n, n), n ** -0.5))  # really the random fallback
    assert torch.equal(q, random_hadamard(n, seed=0))


def test_rotating_a_model_whose_mlp_width_has_no_hadamard():
    """The user-visible side: an MLP width of 4*43 (like LLaMA-2-7B's 256*43) cannot be rotated."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_config(intermediate_size=172)).eval()
    rotated = copy.deepcopy(model)
    vtquant.quantize_(rotated, ROTATE_ONLY, [_ids()], quiet=True)
    ids = _ids()
    with torch.no_grad():
        assert float((model(input_ids=ids).logits - rotated(input_ids=ids).logits).abs().max()) < 1e-4


def test_llama2_mlp_width_has_a_construction():
    """11008 = 2 * 5504 and 5503 is a prime = 3 mod 4, so Paley I gives a true Hadamard (no fallback)."""
    assert all(5503 % d for d in range(2, 75)) and 5503 % 4 == 3
    assert hadamard_factors(11008) == (2, 5504)


def test_shipped_recipe_widths_have_constructions():
    """recipes/hf/llama-3-8b.yaml says: MLP 14336 = H_64 x Paley H_224 (223 prime = 3 mod 4); hidden 4096."""
    assert all(223 % d for d in range(2, 15)) and 223 % 4 == 3
    assert hadamard_factors(14336) == (64, 224)
    assert hadamard_factors(4096) == (4096,)


def test_small_orders():
    assert hadamard_matrix(1).tolist() == [[1.0]]
    assert torch.equal(hadamard_matrix(2), torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64))
    assert hadamard_factors(12) == (12,)
    assert hadamard_factors(64) == (64,)


# ---------------------------------------------------------------------------------------------
# rotating whole models
# ---------------------------------------------------------------------------------------------
def _tiny(arch: str) -> torch.nn.Module:
    """A tiny random model whose norms and biases are not the identity, so that folding them matters."""
    torch.manual_seed(0)
    model = getattr(transformers, arch)(tiny_config(arch)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.3 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.add_(0.3 * torch.randn_like(param))
    return model


def _ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(5))


ROTATE_ONLY = Recipe(method="insertquant", weights=None, activations=None,
                     rotation=RotationConfig(enabled=True), sinks=SinkConfig(enabled=False))


@pytest.mark.parametrize("arch", ARCHS)
def test_rotation_preserves_function(arch):
    model = _tiny(arch)
    if arch == "Qwen2ForCausalLM":
        assert model.model.layers[0].self_attn.q_proj.bias is not None  # the case with q/k/v biases
    rotated = copy.deepcopy(model)
    report = vtquant.quantize_(rotated, ROTATE_ONLY, [_ids()], quiet=True)
    assert report.method == "insertquant+rotate"
    ids = _ids()
    with torch.no_grad():
        ref, out = model(input_ids=ids).logits, rotated(input_ids=ids).logits
    err = float((ref - out).abs().max())
    assert err < 1e-4, f"{arch}: rotation changed the logits by {err:.3e}"

    # and it really rotated: embeddings changed, norms folded to the identity, online Hadamard installed
    assert rotated.vtquant.plan.rotation.enabled is True
    assert not torch.allclose(rotated.model.embed_tokens.weight, model.model.embed_tokens.weight)
    identity = 0.0 if arch == "GemmaForCausalLM" else 1.0  # Gemma stores 1 + w
    for block in rotated.model.layers:
        assert bool((block.input_layernorm.weight == identity).all())
        assert bool((block.post_attention_layernorm.weight == identity).all())
        down = block.mlp.down_proj
        assert isinstance(down, QuantLinear) and "online_rotation" in repr(down)
    assert bool((rotated.model.norm.weight == identity).all())
    assert rotated.lm_head.weight.data_ptr() != rotated.model.embed_tokens.weight.data_ptr()  # untied


def test_rotate_model_directly_without_online():
    """rotate_model_ alone (residual + heads, no online part) keeps the function of a plain model."""
    model = _tiny("LlamaForCausalLM")
    rotated = copy.deepcopy(model)
    result = rotate_model_(get_adapter(rotated).rotation_spec(), seed=1, online=False)
    assert result["online"] == {}
    ids = _ids()
    with torch.no_grad():
        err = float((model(input_ids=ids).logits - rotated(input_ids=ids).logits).abs().max())
    assert err < 1e-4
