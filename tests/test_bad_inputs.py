"""Bad input to the quantization API (issue 10): each case gets the clear error or the correct
behaviour, and a model is never left half-quantized.  Checkpoint / asset cases are in
``test_bad_inputs_storage.py``, CLI cases in ``test_bad_inputs_cli.py``."""
from __future__ import annotations

import copy
import json
import logging

import pytest
import torch

import vtquant
from vtquant.config import ConfigError, Recipe, SinkConfig, method_recipe
from vtquant.core.plan import QuantPlan, SinkPlan

from sinkmodels import implanted_decoder, rel_logit_error, token_batches

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fp_model():
    return implanted_decoder()


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_model(model, before_state: dict, before_modules: list) -> None:
    after = model.state_dict()
    assert sorted(after) == sorted(before_state)
    for k, v in before_state.items():
        assert torch.equal(after[k], v), k
    assert [type(m).__name__ for m in model.modules()] == before_modules
    assert getattr(model, "vtquant", None) is None
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, type(m).__name__


@pytest.mark.parametrize("calib", [[], None, iter(())])
def test_empty_calibration_is_refused_and_model_untouched(fp_model, calib):
    m = copy.deepcopy(fp_model)
    before, modules = _state(m), [type(x).__name__ for x in m.modules()]
    with pytest.raises(ConfigError, match="calibration data is (empty|None)"):
        vtquant.quantize_(m, method_recipe("insertquant", Recipe()), calib, quiet=True)
    _same_model(m, before, modules)


@pytest.mark.parametrize("method", ["insertquant", "insertquant+rotate", "smoothquant"])
def test_failure_half_way_leaves_the_model_as_it_was(fp_model, method, monkeypatch):
    """An error after rotation / smoothing and wrapping (here: inside the activation calibration
    pass) gives the model back with its original weights, modules and no hooks."""
    from vtquant.core import pipeline

    m = copy.deepcopy(fp_model)
    before, modules = _state(m), [type(x).__name__ for x in m.modules()]
    ref = token_batches(n=1, seed=5)
    with torch.no_grad():
        logits = m(input_ids=ref[0]).logits
    real_run = pipeline.PassRunner.run

    def failing(self, desc, after=None):
        if desc.startswith("calibrate activation"):
            raise RuntimeError("simulated failure during calibration")
        return real_run(self, desc, after)

    monkeypatch.setattr(pipeline.PassRunner, "run", failing)
    with pytest.raises(RuntimeError, match="simulated failure"):
        vtquant.quantize_(m, method_recipe(method, Recipe()), token_batches(), quiet=True)
    _same_model(m, before, modules)
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=ref[0]).logits, logits, atol=0, rtol=0)
    monkeypatch.undo()
    vtquant.quantize_(m, method_recipe(method, Recipe()), token_batches(), quiet=True)  # usable afterwards
    assert m.vtquant.plan.method == method.split("+")[0]


def test_deepcopy_of_a_quantized_model_has_its_own_sink_state(fp_model):
    """The copy runs on other shapes and finds its own sinks (the hooks used to reset the original's state)."""
    q = copy.deepcopy(fp_model)
    vtquant.quantize_(q, method_recipe("insertquant", Recipe()), token_batches(), quiet=True)
    a = token_batches(n=1, batch=3, seq=40, seed=11, sink_positions=((0,), (0, 9), (0,)))[0]
    b = token_batches(n=1, batch=2, seq=24, seed=12, sink_positions=((0,), (0, 5)))[0]
    with torch.no_grad():
        q(input_ids=a)
        twin = copy.deepcopy(q)
        assert twin.vtquant.state is not q.vtquant.state
        out_twin = twin(input_ids=b).logits
        assert twin.vtquant.sink_positions() == [[0], [0, 5]]
        assert q.vtquant.sink_positions() == [[0], [0, 9], [0]]  # the original's last pass is untouched
        out_q = q(input_ids=b).logits
    torch.testing.assert_close(out_twin, out_q, atol=1e-6, rtol=0)
    assert rel_logit_error(fp_model, twin, [b[:1]]) < 0.05
    twin.vtquant.hooks.remove()  # removing the copy's hooks leaves the original's in place
    with torch.no_grad():
        q(input_ids=a)
    assert q.vtquant.sink_positions() == [[0], [0, 9], [0]]


def test_batches_with_attention_mask_are_accepted(fp_model):
    """dict / BatchEncoding batches with padding: left padding moves the first-token sink."""
    from transformers import BatchEncoding

    ids = token_batches(n=2, batch=2, seq=24, seed=3)
    left = []
    for x in ids:
        mask = torch.ones_like(x)
        x = x.clone()
        x[1, :4] = 0  # left padding of 4 tokens; the first real token is the sink
        x[1, 4] = 1
        mask[1, :4] = 0
        left.append(BatchEncoding({"input_ids": x, "attention_mask": mask}))
    q = copy.deepcopy(fp_model)
    vtquant.quantize_(q, method_recipe("insertquant", Recipe()), [dict(b) for b in left[:1]] + left[1:], quiet=True)
    with torch.no_grad():
        q(**left[0])
    assert q.vtquant.sink_positions()[1][0] == 4
    with pytest.raises(ConfigError, match="input_ids"):
        vtquant.quantize_(copy.deepcopy(fp_model), method_recipe("insertquant", Recipe()),
                          [{"ids": ids[0]}], quiet=True)
    with pytest.raises(ConfigError, match="token id tensor"):
        vtquant.quantize_(copy.deepcopy(fp_model), method_recipe("insertquant", Recipe()), [[1, 2, 3]], quiet=True)


def test_ignore_entries_that_match_nothing_are_reported(fp_model, caplog):
    q = copy.deepcopy(fp_model)
    with caplog.at_level(logging.WARNING, logger="vtquant.core.pipeline"):
        report = vtquant.quantize_(q, method_recipe("naive-static", Recipe(ignore=["lm_head", "mlp.down_prj"])),
                                   token_batches(), quiet=True)
    assert any("mlp.down_prj" in n and "match no Linear" in n for n in report.notes)
    assert not any("lm_head" in n for n in report.notes)  # lm_head exists (it is just not a block Linear)
    assert "mlp.down_prj" in caplog.text
    assert any(t.endswith("mlp.down_proj") for t in q.vtquant.plan.targets)


def test_ignore_regex(fp_model):
    q = copy.deepcopy(fp_model)
    vtquant.quantize_(q, method_recipe("naive-static", Recipe(ignore=[r"re:layers\.[01]\.self_attn\..*"])),
                      token_batches(), quiet=True)
    targets = set(q.vtquant.plan.targets)
    assert not any(t.startswith(("layers.0.self_attn", "layers.1.self_attn")) for t in targets)
    assert "layers.2.self_attn.q_proj" in targets and "layers.0.mlp.down_proj" in targets


def test_plan_round_trip_and_validation(fp_model):
    q = copy.deepcopy(fp_model)
    vtquant.quantize_(q, method_recipe("insertquant", Recipe()), token_batches(), quiet=True)
    plan = q.vtquant.plan
    assert isinstance(plan, QuantPlan) and isinstance(plan.sinks, SinkPlan)
    again = QuantPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again.to_dict() == json.loads(json.dumps(plan.to_dict()))
    with pytest.raises(Exception):
        plan.method = "fp"  # frozen
    with pytest.raises(ConfigError, match="version"):
        QuantPlan.from_dict({**plan.to_dict(), "version": 99})
    with pytest.raises(ConfigError, match="guard modes"):
        SinkPlan.from_dict({**plan.sinks.to_dict(), "guard_modes": {"layers.0.mlp.down_proj": "bogus"}})
    with pytest.raises(ConfigError, match="'method'"):
        QuantPlan.from_dict({"sinks": None})


def test_unknown_method_names_the_registered_ones():
    with pytest.raises(ConfigError, match="insertquant"):
        Recipe(method="insertquant2")
    from vtquant.config import METHODS

    assert {"fp", "naive-static", "dynamic-token", "insertquant", "smoothquant", "prefix"} <= set(METHODS)


def test_clamp_and_insert_is_measured_and_a_broken_insertion_refused(fp_model, monkeypatch):
    """Clamp-and-insert with quantization off is compared with FP on a calibration batch: measured in
    the report; templates that do not restore the sinks' function are refused and the model is kept."""
    q = copy.deepcopy(fp_model)
    report = vtquant.quantize_(q, method_recipe("insertquant", Recipe()), token_batches(), quiet=True)
    check = report.equivalence["sinks"]
    assert check["output_error"] < 1e-3  # the implanted first-token sink is restored exactly
    assert any(n.startswith("clamp-and-insert with quantization off") for n in report.notes)

    from vtquant.core import templates
    from vtquant.core.verify import EquivalenceError

    real = templates.SinkGuard.sink_outputs

    def zero_templates(self, types, sink_inputs, linear, dtype, template_rows=None):
        out = real(self, types, sink_inputs, linear, dtype, template_rows)
        return None if out is None else torch.zeros_like(out)  # "inserted" rows that carry nothing

    monkeypatch.setattr(templates.SinkGuard, "sink_outputs", zero_templates)
    m = copy.deepcopy(fp_model)
    before, modules = _state(m), [type(x).__name__ for x in m.modules()]
    with pytest.raises(EquivalenceError, match="clamp-and-insert"):
        vtquant.quantize_(m, method_recipe("insertquant", Recipe()), token_batches(), quiet=True)
    _same_model(m, before, modules)
