"""Every decoder family a user brings (issue 11 items 1-2), on tiny random configs with the implanted sink.

Per family: the layout read from the modules; detection exact on the implanted token;
clamp-and-insert with quantization off within tolerance of FP (through the generic checker of
:mod:`vtquant.core.verify`); naive-static vs insertquant W8A8 logit error; rotation and smoothing
either verified equivalent or refused with a message naming why.  Then: deliberately mismatched
layouts are refused (and the model given back unchanged), the generic ``*ForCausalLM`` path, and
the checker's own measure.  Models have perturbed norms and biases (``norm_noise``): through an
identity norm a wrong fold can look right.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import logging

import pytest
import torch
import transformers

import vtquant
from vtquant.adapters import get_adapter
from vtquant.adapters.hf_decoder import HFDecoderAdapter
from vtquant.config import ActArgs, ConfigError, Recipe, RotationConfig, SinkConfig, method_recipe
from vtquant.core import verify
from vtquant.core.quant import QuantLinear
from vtquant.errors import VtquantError

from sinkmodels import FAMILIES, SINK_ID, implanted_decoder, rel_logit_error, token_batches

pytestmark = pytest.mark.usefixtures("one_thread")

LAYOUT = {"LlamaForCausalLM": "pre-norm", "MistralForCausalLM": "pre-norm", "Qwen2ForCausalLM": "pre-norm",
          "Qwen3ForCausalLM": "pre-norm", "GemmaForCausalLM": "pre-norm", "Gemma2ForCausalLM": "sandwich",
          "Gemma3ForCausalLM": "sandwich", "Phi3ForCausalLM": "pre-norm", "Olmo2ForCausalLM": "post-norm"}
QK_NORM = {"Qwen3ForCausalLM", "Gemma3ForCausalLM", "Olmo2ForCausalLM"}
NORM_NOISE = 0.3
ROTATE_ONLY = Recipe(method="insertquant", weights=None, activations=None,
                     rotation=RotationConfig(enabled=True), sinks=SinkConfig(enabled=False))
NO_QUANT = Recipe(method="insertquant", weights=None, activations=None, sinks=SinkConfig(known_sinks=[]))


@functools.lru_cache(maxsize=None)
def _model(arch: str) -> torch.nn.Module:
    return implanted_decoder(arch, norm_noise=NORM_NOISE)


def _quantized(arch: str, recipe: Recipe, calib=None, adapter_cls=None):
    q = copy.deepcopy(_model(arch))
    adapter = adapter_cls(q) if adapter_cls is not None else None
    report = vtquant.quantize_(q, recipe, calib or token_batches(), quiet=True, adapter=adapter)
    return q, report


def _state(model: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model: torch.nn.Module, before: dict) -> bool:
    after = model.state_dict()
    return set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before) \
        and getattr(model, "vtquant", None) is None


# ---------------------------------------------------------------------------------------------
# per family
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", FAMILIES)
def test_layout_read_from_the_modules(arch):
    model = _model(arch)
    adapter = get_adapter(model)
    assert isinstance(adapter, HFDecoderAdapter) and adapter.arch is not None
    layout = adapter.layout
    assert layout.kind == LAYOUT[arch], layout.describe()
    assert layout.fused_qkv == layout.fused_mlp == (arch == "Phi3ForCausalLM")
    assert layout.qk_norm == (arch in QK_NORM)
    assert adapter.norm_convention == ("rms-plus-one" if arch.startswith("Gemma") else "rms")
    linears = adapter.block_linears(adapter.blocks()[0])
    assert len(linears) == (4 if arch == "Phi3ForCausalLM" else 7)
    assert all(isinstance(m, torch.nn.Linear) for m in linears.values())
    spec = adapter.rotation_spec()
    layer = spec.layers[0]
    assert len(layer.post_norms) == (0 if LAYOUT[arch] == "pre-norm" else 2)
    assert len(layer.norm_readers) == (0 if LAYOUT[arch] == "post-norm" else 2)
    assert bool(layer.raw_readers) == (LAYOUT[arch] == "post-norm")


@pytest.mark.parametrize("arch", FAMILIES)
def test_detection_and_w8a8(arch, capsys):
    calib = token_batches(sink_positions=((0,), (0, 5)))
    q, report = _quantized(arch, method_recipe("insertquant", Recipe()), calib)
    assert (report.emergence_layer, report.cancellation_layer) == (2, 4), report.probe_max_ratio
    ids = token_batches(n=1, batch=3, seed=8, sink_positions=((0,), (0, 11), (0, 4, 20)))[0]
    with torch.no_grad():
        q(input_ids=ids)
    assert q.vtquant.sink_positions() == [(row == SINK_ID).nonzero().flatten().tolist() for row in ids]
    n_linears = len(get_adapter(_model(arch)).layout.linears) * len(q.model.layers)
    assert len(q.vtquant.plan.targets) == n_linears
    assert sum(isinstance(m, QuantLinear) for m in q.modules()) == n_linears

    naive, _ = _quantized(arch, method_recipe("naive-static", Recipe()), calib)
    evals = token_batches(n=2, seed=13)
    err_insert, err_naive = rel_logit_error(_model(arch), q, evals), rel_logit_error(_model(arch), naive, evals)
    with capsys.disabled():
        print(f"\n[families] {arch}: W8A8 relative logit error naive-static {err_naive:.4f}, "
              f"insertquant {err_insert:.4f}")
    assert err_insert < err_naive / 2, f"{arch}: insertquant {err_insert:.4f} vs naive {err_naive:.4f}"


@pytest.mark.parametrize("arch", FAMILIES)
def test_clamp_and_insert_without_quantization(arch):
    fp = _model(arch)
    evals = token_batches(n=1, seed=7)[0]
    reference = verify.snapshot(get_adapter(fp), evals)
    q, report = _quantized(arch, NO_QUANT)  # calibration sinks are first tokens, as in real causal LMs
    assert "template" in report.layer_modes.values() and report.restore_layer == 4
    result = verify.check_equivalence(q.vtquant.adapter, reference, evals, "clamp-and-insert (quantization off)")
    assert result.ok and result.error < 1e-3, result.note()
    with torch.no_grad():  # the guards were really active on this batch
        q(input_ids=evals)
    assert q.vtquant.sink_positions() == [(row == SINK_ID).nonzero().flatten().tolist() for row in evals]


@pytest.mark.parametrize("arch", FAMILIES)
def test_rotation_verified_or_moved_online(arch):
    q, report = _quantized(arch, ROTATE_ONLY)
    check = report.equivalence["rotation"]
    assert check["ok"] and check["output_error"] < 1e-4 and check["worst_block_error"] < 1e-4, check
    assert any(n.startswith("equivalence check (rotation)") for n in report.notes)
    ids = token_batches(n=1, seed=5)[0]
    with torch.no_grad():
        err = float((_model(arch)(input_ids=ids).logits - q(input_ids=ids).logits).abs().max())
    assert err < 1e-4
    reader = q.model.layers[0].get_submodule(get_adapter(_model(arch)).layout.attn_readers[0])
    moved = [n for n in report.notes if n.startswith("rotation: residual rotation not folded")]
    assert check["residual_folded"] == (LAYOUT[arch] == "pre-norm")
    if LAYOUT[arch] == "pre-norm":  # folded: no online rotation on the attention input, norms the identity
        assert not moved and not reader.has_input_rotation
        assert not torch.allclose(q.model.embed_tokens.weight, _model(arch).model.embed_tokens.weight)
    else:  # post-norms: refused as a fold, the readers' inputs rotated online, said in the report
        assert len(moved) == 1 and "post-norms" in moved[0] and "per-channel scale" in moved[0]
        assert reader.has_input_rotation
        assert torch.equal(q.model.embed_tokens.weight, _model(arch).model.embed_tokens.weight)


@pytest.mark.parametrize("arch", FAMILIES)
def test_smoothquant_verified_or_refused(arch):
    recipe = method_recipe("smoothquant", Recipe())
    if LAYOUT[arch] == "post-norm":
        model = copy.deepcopy(_model(arch))
        before = _state(model)
        with pytest.raises(ConfigError, match="no norm in front of them") as err:
            vtquant.quantize_(model, recipe, token_batches(), quiet=True)
        assert "smoothquant is refused" in str(err.value) and "Use another method" in str(err.value)
        assert _unchanged(model, before)
        return
    q, report = _quantized(arch, recipe)
    check = report.equivalence["smoothquant"]
    assert check["ok"] and check["output_error"] < 1e-4, check
    assert q.vtquant.plan.smoothquant["equivalence"]["ok"]
    assert any(n.startswith("equivalence check (smoothquant smoothing)") for n in report.notes)


def test_insertquant_rotate_w8a8_on_post_norm_families():
    """The transform the issue saw explode silently (2.6e85 on a real Gemma) is now equivalent and useful."""
    calib = token_batches(sink_positions=((0,), (0, 5)))
    evals = token_batches(n=2, seed=13)
    for arch in ("Gemma2ForCausalLM", "Olmo2ForCausalLM"):
        q, report = _quantized(arch, method_recipe("insertquant+rotate", Recipe()), calib)
        naive, _ = _quantized(arch, method_recipe("naive-static", Recipe()), calib)
        assert report.equivalence["rotation"]["ok"]
        assert rel_logit_error(_model(arch), q, evals) < rel_logit_error(_model(arch), naive, evals) / 2


@pytest.mark.parametrize("arch", ["Gemma2ForCausalLM", "Olmo2ForCausalLM", "Phi3ForCausalLM"])
def test_checkpoint_keeps_online_rotations(arch, tmp_path):
    """The online rotations that replace the residual fold (and Phi-3's fused head rotation) survive save / load."""
    q, _ = _quantized(arch, method_recipe("insertquant+rotate", Recipe()))
    reader = get_adapter(_model(arch)).layout.attn_readers[0]
    assert (f"layers.0.{reader}" in q.vtquant.plan.online_rotation) == (LAYOUT[arch] != "pre-norm")
    loaded = vtquant.load(vtquant.save(q, tmp_path / "ckpt"))
    ids = token_batches(n=1, seed=3)[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, q(input_ids=ids).logits, rtol=0, atol=0)


def test_fused_qkv_refuses_kv_cache_quantization():
    recipe = dataclasses.replace(method_recipe("insertquant", Recipe()), kv_cache=ActArgs())
    model = copy.deepcopy(_model("Phi3ForCausalLM"))
    with pytest.raises(ConfigError, match="fused projection"):
        vtquant.quantize_(model, recipe, token_batches(n=1), quiet=True)
    assert getattr(model, "vtquant", None) is None


# ---------------------------------------------------------------------------------------------
# deliberately mismatched layouts must be refused
# ---------------------------------------------------------------------------------------------
class _GemmaAsLlama(HFDecoderAdapter):
    """The issue's real failure: a sandwich-norm model registered on the LLaMA (pre-norm) description."""

    def __init__(self, model):
        super().__init__(model)
        self.layout = dataclasses.replace(self.layout, kind="pre-norm", pre_mlp_norm="post_attention_layernorm",
                                          post_attn_norm=None, post_mlp_norm=None)


class _OmitsANorm(HFDecoderAdapter):
    """The MLP readers are listed without their norm (so neither its scale nor Q reaches them)."""

    def layer_rotation(self, block):
        layer = super().layer_rotation(block)
        layer.norm_readers = layer.norm_readers[:1]
        return layer


class _SwapsReaders(HFDecoderAdapter):
    """Readers misnamed: the attention norm said to feed gate/up and the MLP norm q/k/v."""

    def layer_rotation(self, block):
        layer = super().layer_rotation(block)
        (n1, r1), (n2, r2) = layer.norm_readers
        layer.norm_readers = [(n1, r2), (n2, r1)]
        return layer


MISMATCHES = [("rotate", "Gemma2ForCausalLM", _GemmaAsLlama), ("smoothquant", "Gemma2ForCausalLM", _GemmaAsLlama),
              ("rotate", "Gemma3ForCausalLM", _GemmaAsLlama), ("smoothquant", "Gemma3ForCausalLM", _GemmaAsLlama),
              ("rotate", "LlamaForCausalLM", _OmitsANorm),  # (smoothing fewer groups is still exact)
              ("rotate", "Qwen3ForCausalLM", _SwapsReaders), ("smoothquant", "Phi3ForCausalLM", _SwapsReaders)]


@pytest.mark.parametrize("method,arch,adapter_cls", MISMATCHES,
                         ids=[f"{m}-{a[:-11]}-{c.__name__[1:]}" for m, a, c in MISMATCHES])
def test_mismatched_layout_is_refused(arch, adapter_cls, method):
    model = copy.deepcopy(_model(arch))
    before = _state(model)
    with pytest.raises(verify.EquivalenceError) as err:
        vtquant.quantize_(model, method_recipe(method, Recipe()), token_batches(), quiet=True,
                          adapter=adapter_cls(model))
    msg = str(err.value)
    transform = "rotation" if method == "rotate" else "smoothquant smoothing"
    assert msg.startswith(f"{transform} does not preserve the function of {arch}: block ")
    assert err.value.transform == transform and not err.value.result.ok
    assert err.value.result.first_bad_block is not None and err.value.result.error > 1e-2
    assert ("rotation.enabled: false" if method == "rotate" else "use another method") in msg
    assert isinstance(err.value, VtquantError) and isinstance(err.value, ConfigError)
    assert _unchanged(model, before)  # the pipeline's rollback gave the model back


# ---------------------------------------------------------------------------------------------
# the generic *ForCausalLM path
# ---------------------------------------------------------------------------------------------
class TinyNewDecoderForCausalLM(transformers.LlamaForCausalLM):
    """An unlisted class with the usual module names."""


def test_generic_decoder_path(caplog):
    torch.manual_seed(0)
    model = TinyNewDecoderForCausalLM(_model("LlamaForCausalLM").config).eval()
    model.load_state_dict(_model("LlamaForCausalLM").state_dict())
    with caplog.at_level(logging.WARNING, logger="vtquant.adapters.hf_decoder"):
        adapter = get_adapter(model)
    assert type(adapter) is HFDecoderAdapter and adapter.arch is None
    assert "generic decoder path" in caplog.text and "TinyNewDecoderForCausalLM" in caplog.text
    report = vtquant.quantize_(model, method_recipe("insertquant+rotate", Recipe()), token_batches(), quiet=True)
    assert report.emergence_layer == 2 and report.equivalence["rotation"]["ok"]
    assert "(generic decoder path)" in model.vtquant.adapter.rotation_spec().layout


def test_generic_path_with_unknown_norms_refuses_transforms():
    model = TinyNewDecoderForCausalLM(_model("LlamaForCausalLM").config).eval()
    for block in model.model.layers:
        block.mystery_layernorm = transformers.models.llama.modeling_llama.LlamaRMSNorm(model.config.hidden_size)
    adapter = get_adapter(model)
    assert adapter.layout.kind == "unknown" and "mystery_layernorm" in adapter.layout.describe()
    for method in ("rotate", "smoothquant"):
        with pytest.raises(ConfigError, match="not recognized"):
            vtquant.quantize_(copy.deepcopy(model), method_recipe(method, Recipe()), token_batches(n=1), quiet=True)
    vtquant.quantize_(model, method_recipe("naive-static", Recipe()), token_batches(n=1), quiet=True)  # still quantizes


def test_other_causal_lms_still_refused():
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2)
    from vtquant.adapters import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="also takes any \\*ForCausalLM"):
        get_adapter(transformers.GPT2LMHeadModel(cfg))


# ---------------------------------------------------------------------------------------------
# the checker's measure
# ---------------------------------------------------------------------------------------------
def test_relative_row_error_sees_every_token():
    ref = torch.ones(8, 4)
    ref[0] *= 1000.0  # a sink row: a global relative L2 would hide an error on every other row
    new = ref.clone()
    new[1:] *= 1.1
    assert verify.relative_row_error(ref, ref) == 0.0
    assert verify.relative_row_error(ref, new) == pytest.approx(0.1)
    assert float((new - ref).norm() / ref.norm()) < 0.01
    tiny = ref.clone()
    tiny[2] = 1e-9  # a row with ~no norm is measured against 10 % of the median row norm
    assert verify.relative_row_error(tiny, tiny + 1e-6) < 1e-4
    assert verify.relative_row_error(ref, ref * float("nan")) != verify.relative_row_error(ref, ref * float("nan"))
    result = verify.EquivalenceResult("x", output_error=float("nan"), block_errors=[0.0])
    assert not result.ok and "NOT equivalent" in result.note()


def test_rotation_tolerance_follows_dtype():
    model = copy.deepcopy(_model("LlamaForCausalLM")).to(torch.bfloat16)
    report = vtquant.quantize_(model, ROTATE_ONLY, token_batches(n=1), quiet=True)
    check = report.equivalence["rotation"]
    assert check["dtype"] == "bfloat16" and check["tolerance"] == verify.TOLERANCE[torch.bfloat16] and check["ok"]
    assert check["quantile"] == 0.95
    # a wrong layout still fails in bfloat16
    model = copy.deepcopy(_model("Gemma2ForCausalLM")).to(torch.bfloat16)
    with pytest.raises(verify.EquivalenceError, match="95th percentile"):
        vtquant.quantize_(model, ROTATE_ONLY, token_batches(n=1), quiet=True, adapter=_GemmaAsLlama(model))


def test_layer_errors_compare_in_the_right_basis_when_the_residual_is_not_folded():
    """Gemma-2: rotation.residual is set but the residual stream stays unrotated (online rotations
    instead): the analysis must not un-rotate it (that gave wrong hidden-state errors silently)."""
    import copy

    import vtquant
    from vtquant.analyze import residual_rotation
    from vtquant.config import Recipe, method_recipe

    from sinkmodels import implanted_decoder, token_batches

    m = implanted_decoder("Gemma2ForCausalLM")
    recipe = method_recipe("insertquant+rotate", Recipe())
    q = copy.deepcopy(m)
    vtquant.quantize_(q, recipe, token_batches(), quiet=True)
    assert q.vtquant.report.equivalence["rotation"]["residual_folded"] is False
    assert residual_rotation(recipe, m.config.hidden_size, q) is None
    llama = implanted_decoder()
    ql = copy.deepcopy(llama)
    vtquant.quantize_(ql, recipe, token_batches(), quiet=True)
    assert residual_rotation(recipe, llama.config.hidden_size, ql) is not None
