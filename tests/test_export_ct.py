"""compressed-tensors export (issue 14, part 2): folders that transformers loads with the
compressed-tensors package in a process that never imports vtquant, against vtquant's own model.

A model quantized with ``activations.numerics: compressed-tensors`` (what ``vtquant quantize --format
compressed-tensors`` uses) computes exactly what the exported folder computes (tested: relative logits
error <= 1e-6, measured 0.0); the quantizer's arithmetic is checked op for op against the package's own
``calculate_qparams`` / ``fake_quantize``.  A model with vtquant's own numerics is refused unless
``allow_inexact=True`` (then it differs: [-127, 127] vs [-128, 127], rounding order).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

pytest.importorskip("compressed_tensors")

import vtquant
from vtquant.adapters.hf_decoder import tiny_config
from vtquant.config import ActArgs, Recipe, RotationConfig, WeightArgs, method_recipe
from vtquant.core.quant import ActQuantizer
from vtquant.export_ct import CompressedTensorsExportError, export_compressed_tensors

from sinkmodels import implanted_decoder, token_batches

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread, immune to contention


@pytest.fixture(scope="module")
def fp_model():
    """A tiny random Llama (no implanted sink: the baselines the format holds)."""
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(tiny_config()).eval()


def _asym(recipe: Recipe) -> Recipe:
    out = recipe.replace(activations=dataclasses.replace(recipe.activations, symmetric=False))
    if recipe.kv_cache is not None:
        out = out.replace(kv_cache=dataclasses.replace(recipe.kv_cache, symmetric=False))
    return out


def _ct(recipe: Recipe) -> Recipe:
    return recipe.with_numerics("compressed-tensors")


EXACT = 1e-6  # relative logits error of the loaded folder vs vtquant's own model (measured: 0.0)
CASES = {
    "naive-static-W8A8": lambda: _ct(method_recipe("naive-static", Recipe())),
    "naive-static-W8A8KV8": lambda: _ct(method_recipe("naive-static", Recipe(), kv_bits=8)),
    "naive-static-W8A8KV8-asym": lambda: _ct(_asym(method_recipe("naive-static", Recipe(), kv_bits=8))),
    "W4A16-gptq-g32": lambda: method_recipe("naive-static", Recipe(
        weights=WeightArgs(bits=4, granularity="per-group", group_size=32, algorithm="gptq"))).replace(
        activations=None),
    "smoothquant-W8A8": lambda: _ct(method_recipe("smoothquant", Recipe())),
    "smoothquant-W8A8-asym": lambda: _ct(_asym(method_recipe("smoothquant", Recipe()))),
    "rotate-folded-W8A8": lambda: _ct(method_recipe("rotate", Recipe(rotation=RotationConfig(online=False)))),
    "dynamic-token-W8A8": lambda: _ct(method_recipe("dynamic-token", Recipe(), kv_bits=8)),
    "dynamic-token-W8A8-asym": lambda: _ct(_asym(method_recipe("dynamic-token", Recipe()))),
    "naive-static-W8A8-vtquant-numerics": lambda: method_recipe("naive-static", Recipe()),  # allow_inexact
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _ct_fake_quant(x, args, scale=None, zero=None):
    """compressed-tensors' own quantize-dequantize (static: the given scale / zero; dynamic: its own)."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    qargs = QuantizationArgs(num_bits=args.bits, type="int", symmetric=args.symmetric,
                             strategy="tensor" if args.static else "token", dynamic=not args.static)
    if not args.static:
        scale, zero = compute_dynamic_scales_and_zp(x, qargs, module=None)
    return fake_quantize(x, scale, zero, qargs), scale, zero


@pytest.mark.parametrize("static", [True, False])
@pytest.mark.parametrize("symmetric", [True, False])
def test_numerics_match_compressed_tensors_op_for_op(static, symmetric):
    """The ``compressed-tensors`` numerics against the package itself: scales, zero points and outputs,
    on inputs beyond the calibrated range and on exact rounding ties."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.utils import calculate_qparams

    gen = torch.Generator().manual_seed(3)
    calib = torch.randn(2, 16, 64, generator=gen) * 3 + 0.7
    calib[0, 0, 5] = 250.0  # a massive activation in the calibrated range
    args = ActArgs(granularity="per-tensor" if static else "per-token", static=static, symmetric=symmetric,
                   numerics="compressed-tensors")
    q = ActQuantizer(args)
    x = torch.randn(2, 16, 64, generator=gen) * 4
    x[1, 3, :8] = torch.tensor([-400.0, 400.0, -251.0, 251.0, 0.0, -0.0, 1e-9, -1e-9])  # beyond the range
    if static:
        q.observe(calib.reshape(-1, 64))
        q.finalize()
        qargs = QuantizationArgs(num_bits=8, type="int", symmetric=symmetric, strategy="tensor")
        scale, zero = calculate_qparams(calib.min().reshape(1), calib.max().reshape(1), qargs)
        torch.testing.assert_close(q.scale.reshape(1), scale, atol=0, rtol=0)
        torch.testing.assert_close(q.zero_point.reshape(1), zero.float(), atol=0, rtol=0)
        x[0, 1, :6] = (torch.arange(6) - 2.5) * q.scale - (q.zero_point * q.scale)  # exact .5 ties
        expected, _, _ = _ct_fake_quant(x, args, scale, zero)
    else:
        expected, _, _ = _ct_fake_quant(x, args)
    got = q.fake_quant(x)
    assert torch.equal(got, expected)
    if symmetric:  # the grid is [-128, 127]: an input below the range lands on -128 steps
        assert float((got / (q.scale if static else 1)).min()) <= (-128 if static else 0)


def test_exported_folders_load_without_vtquant(fp_model, tmp_path):
    calib = token_batches(n=4, seed=1)
    held_out = token_batches(n=2, seed=17)
    expected = {}
    for case, recipe in CASES.items():
        q = copy.deepcopy(fp_model)
        vtquant.quantize_(q, recipe(), calib, quiet=True)
        inexact = case.endswith("vtquant-numerics")
        if inexact:
            with pytest.raises(CompressedTensorsExportError, match="numerics: compressed-tensors"):
                export_compressed_tensors(q, tmp_path / case, quiet=True)
        report = export_compressed_tensors(q, tmp_path / case, quiet=True, allow_inexact=inexact)
        assert report.exact is not inexact
        with torch.no_grad():
            own = [q(input_ids=x).logits for x in held_out]
        expected[case] = (held_out, own, report)
    torch.save({case: v[0] for case, v in expected.items()}, tmp_path / "inputs.pt")

    code = """
import sys, torch
from transformers import AutoModelForCausalLM
torch.set_num_threads(1)
inputs = torch.load(sys.argv[1])
out = {}
for case, xs in inputs.items():
    model = AutoModelForCausalLM.from_pretrained(sys.argv[2] + "/" + case)
    assert type(model.config.quantization_config).__name__ == "CompressedTensorsConfig"
    with torch.no_grad():
        out[case] = [model(input_ids=x).logits for x in xs]
assert not any(name == "vtquant" or name.startswith("vtquant.") for name in sys.modules)
torch.save(out, sys.argv[1] + ".out")
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # vtquant is not importable there
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "inputs.pt"), str(tmp_path)], cwd=tmp_path,
                          capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"}, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "inputs.pt.out")
    errors = {case: max(_rel(g, o) for g, o in zip(got[case], v[1])) for case, v in expected.items()}
    print(errors)
    for case, (xs, own, report) in expected.items():
        config = json.loads((tmp_path / case / "config.json").read_text())["quantization_config"]
        assert config["quant_method"] == "compressed-tensors" and config["format"] == report.quantization_format
        if report.exact:
            assert errors[case] <= EXACT, f"{case}: {errors[case]} > {EXACT}"
    assert errors["naive-static-W8A8-vtquant-numerics"] > EXACT  # vtquant's own grid: what the option fixes
    assert any("NOT EXACT" in n for n in expected["naive-static-W8A8-vtquant-numerics"][2].notes)
    assert expected["W4A16-gptq-g32"][2].quantization_format == "pack-quantized"
    assert expected["naive-static-W8A8"][2].quantization_format == "int-quantized"
    kv = json.loads((tmp_path / "naive-static-W8A8KV8" / "config.json").read_text())["quantization_config"]
    assert kv["config_groups"]["group_1"]["output_activations"]["strategy"] == "tensor"


def test_insertquant_is_refused_with_what_the_format_cannot_hold(tmp_path):
    q = implanted_decoder()
    vtquant.quantize_(q, method_recipe("insertquant", Recipe()), token_batches(n=2), quiet=True)
    with pytest.raises(CompressedTensorsExportError) as err:
        export_compressed_tensors(q, tmp_path / "out", quiet=True)
    text = str(err.value)
    for words in ("sink detection", "templates", "residual restore", "--format hf", "naive-static"):
        assert words in text, words
    assert not (tmp_path / "out").exists()


def test_online_rotation_and_foreign_folders_are_refused(fp_model, tmp_path):
    q = copy.deepcopy(fp_model)
    vtquant.quantize_(q, method_recipe("rotate", Recipe()), token_batches(n=2), quiet=True)
    with pytest.raises(CompressedTensorsExportError, match="rotation.online: false"):
        export_compressed_tensors(q, tmp_path / "out", quiet=True)
    with pytest.raises(CompressedTensorsExportError, match="not quantized by vtquant"):
        export_compressed_tensors(copy.deepcopy(fp_model), tmp_path / "out", quiet=True)
    q = copy.deepcopy(fp_model)
    vtquant.quantize_(q, method_recipe("naive-static", Recipe()).with_numerics("compressed-tensors"),
                      token_batches(n=2), quiet=True)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(CompressedTensorsExportError, match="not a vtquant compressed-tensors export"):
        export_compressed_tensors(q, tmp_path / "mine", quiet=True)
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]
    first = export_compressed_tensors(q, tmp_path / "ct", quiet=True)
    export_compressed_tensors(q, tmp_path / "ct", quiet=True)  # an earlier export is replaced
    assert "vtquant_export.json" in os.listdir(tmp_path / "ct") and first.method == "naive-static"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct", "mine"]  # no temporary folders left


def test_cli_refuses_what_the_format_cannot_hold_before_quantizing(tmp_path, monkeypatch, capsys):
    import vtquant.models
    from vtquant.cli import main

    def no_load(*args, **kwargs):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(vtquant.models, "load_causal_lm", no_load)
    recipe = tmp_path / "r.yaml"
    for text in ("method: insertquant\n", "method: naive-static\nrotation: {enabled: true}\n"):
        recipe.write_text("version: 1\n" + text)
        assert main(["quantize", "--recipe", str(recipe), "--out", str(tmp_path / "ct"), "--format",
                     "compressed-tensors", "--quiet"]) != 0
        err = capsys.readouterr().err
        assert "nothing was quantized" in err and ("--format hf" in err or "rotation.online: false" in err)
    assert not (tmp_path / "ct").exists()
