"""lm-evaluation-harness bridge (issue 14, part 3), offline: local task YAMLs over jsonl files made from
the bundled Lady Susan text (tests/fixtures/lm_eval), a character tokenizer and tiny implanted decoders."""
from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("lm_eval")

import vtquant
from vtquant import assets
from vtquant.cli import main
from vtquant.config import Recipe, method_recipe
from vtquant.data import sample_windows
from vtquant.eval.lm_eval_bridge import VtquantLM, load_jsonl, run_lm_eval, write_austen_data
from vtquant.eval.perplexity import perplexity

from chartok import VOCAB_SIZE, char_tokenizer
from sinkmodels import implanted_decoder

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread, immune to contention

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "lm_eval"
TASKS = ["tiny_austen_rolling", "tiny_austen_next_sentence"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def models(tok):
    """``{"fp": model, "insertquant": model}``; the BOS (id 1) is the implanted sink token."""
    fp = implanted_decoder(vocab_size=VOCAB_SIZE)
    text = "\n\n".join(d["text"] for d in load_jsonl(FIXTURES / "austen_rolling.jsonl"))
    ids = torch.tensor(tok(text)["input_ids"])
    calib = [torch.cat([torch.ones(4, 1, dtype=torch.long), w], dim=1)  # [BOS] + text, as the bridge feeds it
             for w in torch.split(sample_windows(ids, 63, 8, seed=0), 4)]
    q = copy.deepcopy(fp)
    vtquant.quantize_(q, method_recipe("insertquant", Recipe()), calib, quiet=True)
    assert q.vtquant.plan.sinks is not None
    return {"fp": fp, "insertquant": q}


def _requests(*args_list):
    return [SimpleNamespace(args=args) for args in args_list]


@pytest.mark.parametrize("name", ["fp", "insertquant"])
def test_rolling_loglikelihood_is_perplexity_nll(models, tok, name):
    """A text of L - 1 tokens is one rolling window: [BOS] + text, every text token scored, which is
    eval/perplexity's chunk with BOS policy `prepend`."""
    model = models[name]
    docs = [d["text"] for d in load_jsonl(FIXTURES / "austen_rolling.jsonl")]
    for batch_size in (1, 4):
        lm = VtquantLM(model=model, tokenizer=tok, batch_size=batch_size, quiet=True)
        rolling = lm.loglikelihood_rolling(_requests(*[(d,) for d in docs]))
        for doc, logprob in zip(docs, rolling):
            ids = tok(doc, add_special_tokens=False)["input_ids"]
            chunk = torch.tensor([[tok.bos_token_id] + ids])
            nll = math.log(perplexity(model, chunk, quiet=True)) * len(ids)
            assert abs(-logprob - nll) <= 1e-5 * nll, (batch_size, -logprob, nll)


def test_insertquant_scores_equal_at_batch_4_and_batch_1(models, tok):
    model = models["insertquant"]
    docs = load_jsonl(FIXTURES / "austen_next_sentence.jsonl")
    requests = _requests(*[(d["context"], " " + c) for d in docs for c in d["choices"]])
    single = VtquantLM(model=model, tokenizer=tok, batch_size=1, quiet=True).loglikelihood(requests)
    batched = VtquantLM(model=model, tokenizer=tok, batch_size=4, quiet=True).loglikelihood(requests)
    assert single == batched  # identical, not merely close: every row is computed as if alone
    # the batches were right-padded (lengths differ) and the sink stayed at position 0 of every row
    assert len({len(r.args[0]) + len(r.args[1]) for r in requests[:4]}) > 1
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 40, 41, 42], [1, 43, 3, 3]]), attention_mask=torch.tensor([[1] * 4, [1, 1, 0, 0]]))
    assert [p[:1] for p in model.vtquant.sink_positions()] == [[0], [0]]


def test_eval_lm_eval_command_writes_rows(models, tok, tmp_path, capsys):
    path = vtquant.save(models["insertquant"], tmp_path / "ckpt", tokenizer=tok)
    results = tmp_path / "rows.json"
    code = main(["eval", "lm-eval", "--checkpoint", str(path), "--tasks", ",".join(TASKS), "--include-path",
                 str(FIXTURES), "--lm-batch-size", "4", "--seq-len", "256", "--results-file", str(results), "--quiet"])
    assert code == 0
    rows = json.loads(results.read_text())["rows"]
    by_metric = {r["metric"]: r for r in rows}
    assert set(by_metric) == {"tiny_austen_rolling:word_perplexity", "tiny_austen_rolling:byte_perplexity",
                              "tiny_austen_rolling:bits_per_byte", "tiny_austen_next_sentence:acc",
                              "tiny_austen_next_sentence:acc_norm"}
    row = by_metric["tiny_austen_next_sentence:acc"]
    assert row["method"] == "insertquant" and row["w_bits"] == 8 and row["n_docs"] == 12 and 0 <= row["value"] <= 1
    assert row["tool"].startswith("lm-eval") and row["checkpoint"] == str(path)
    # the same scores through lm-eval's registry by name (`import vtquant` registered "vtquant")
    import lm_eval

    by_name = lm_eval.simple_evaluate(model="vtquant", model_args={"checkpoint": str(path), "quiet": True},
                                      tasks=["tiny_austen_rolling"], task_manager=lm_eval.tasks.TaskManager(
                                          include_path=str(FIXTURES), include_defaults=False),
                                      batch_size=1, log_samples=False, bootstrap_iters=0)
    got = by_name["results"]["tiny_austen_rolling"]["bits_per_byte,none"]
    assert abs(got - by_metric["tiny_austen_rolling:bits_per_byte"]["value"]) < 1e-6  # batch 1 = batch 4


def test_package_tasks_run_on_generated_data(models, tok, tmp_path, monkeypatch):
    """The package's austen_* tasks read $VTQUANT_LM_EVAL_DATA (here: the fixture data)."""
    monkeypatch.setenv("VTQUANT_LM_EVAL_DATA", str(FIXTURES))
    lm = VtquantLM(model=models["fp"], tokenizer=tok, batch_size=4, quiet=True)
    results = run_lm_eval(lm, ["austen_next_sentence"], limit=4, quiet=True)
    assert results["results"]["austen_next_sentence"]["acc,none"] >= 0


def test_fixtures_are_made_from_the_bundled_text(tmp_path):
    if not assets.is_cached("austen-lady-susan"):
        pytest.skip("the austen-lady-susan asset is not cached here")
    out = write_austen_data(tmp_path, n_rolling=6, rolling_chars=180, n_choice=12, context_sentences=2,
                            max_sentence_chars=80)
    for name, path in out.items():
        assert path.read_bytes() == (FIXTURES / path.name).read_bytes(), name
    docs = load_jsonl(out["austen_next_sentence"])
    assert all(len(d["choices"]) == 4 and len(set(d["choices"])) == 4 and 0 <= d["label"] < 4 for d in docs)
