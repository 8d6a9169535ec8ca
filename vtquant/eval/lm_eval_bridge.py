"""lm-evaluation-harness bridge: a ``vtquant`` model class and result rows for ``vtquant eval lm-eval``.

:class:`VtquantLM` is an lm-eval ``LM`` registered as ``vtquant``: ``model_args`` give a checkpoint
folder (``checkpoint=DIR``: an hf-layout checkpoint carries its tokenizer) or, from Python, a model
object and its tokenizer (``VtquantLM(model=..., tokenizer=...)``, also full-precision models).
``lm_eval --model vtquant`` finds it once vtquant is imported (``import vtquant`` registers a lazy
entry as soon as lm-eval's registry loads).

Protocol (what the numbers mean):

* requests are scored in batches of ``batch_size``, longest first, **right-padded** with an
  ``attention_mask``: the first token of every row stays at position 0, so the first-token sink
  of causal LMs is where calibration saw it, and a row's scores do not depend on its batch;
* ``loglikelihood``: ``context + continuation``, with ``[BOS]`` in front only when ``add_bos_token``
  (default off, as lm-eval's HF model for causal LMs) or when the context is empty (then the
  ``prefix_token_id``); context / continuation split as lm-eval's HF model does (trailing spaces of
  the context move to the continuation; the pair is encoded together);
* ``loglikelihood_rolling``: lm-eval's rolling windows of ``max_length`` tokens, each text starting
  from ``prefix_token_id`` (the BOS, else the EOS).  A text of ``L - 1`` tokens is one window whose
  negative log-likelihood is exactly :func:`vtquant.eval.perplexity.perplexity`'s on the chunk
  ``[BOS] + tokens`` (BOS policy ``prepend``);
* ``generate_until``: greedy decoding with the KV cache, cut at the first stop string.

:func:`write_austen_tasks` writes two local tasks made from the bundled *Lady Susan* text (no
download): ``austen_rolling`` (``loglikelihood_rolling`` over paragraphs) and ``austen_next_sentence``
(``multiple_choice``: the true next sentence of a passage among four).
"""
from __future__ import annotations

import json
import math
import random
import re
import time
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as err:  # pragma: no cover - depends on the install
    raise ImportError("the lm-eval bridge needs lm-evaluation-harness: pip install 'vtquant[deploy]'") from err

TASKS_DIR = Path(__file__).with_name("lm_eval_tasks")
AUSTEN_TASKS = ("austen_rolling", "austen_next_sentence")


@register_model("vtquant")
class VtquantLM(LM):
    """An lm-eval model over a vtquant model (or any transformers causal LM) on one device.

    Args:
        checkpoint: a folder written by :func:`vtquant.save` (loaded with :func:`vtquant.load`).
        model: a model object instead (quantized by vtquant or full precision).
        tokenizer: its tokenizer (default: the checkpoint's, or ``model.vtquant.tokenizer``).
        batch_size: requests per forward pass (right-padded).
        max_length: longest input in tokens (default: the config's ``max_position_embeddings``,
            at most 2048).
        add_bos_token: prepend the BOS to loglikelihood contexts (default: no, as lm-eval's HF model).
        max_gen_toks: the default generation length of ``generate_until``.
        device: where the model runs (``cpu`` default).
    """

    def __init__(self, checkpoint: Optional[str] = None, model: Any = None, tokenizer: Any = None,
                 batch_size: Any = 1, max_batch_size: Any = None, max_length: Optional[int] = None,
                 add_bos_token: Optional[bool] = None, max_gen_toks: int = 256, device: Optional[str] = None,
                 quiet: bool = False, **kwargs: Any) -> None:
        super().__init__()
        if (model is None) == (checkpoint is None):
            raise ValueError("VtquantLM: give exactly one of checkpoint=DIR (a vtquant.save folder) or model=...")
        if model is None:
            import vtquant
            from vtquant.checkpoint import load_tokenizer

            model = vtquant.load(checkpoint, device=device)
            if tokenizer is None:
                tokenizer = load_tokenizer(checkpoint)
        if tokenizer is None:
            tokenizer = getattr(getattr(model, "vtquant", None), "tokenizer", None)
        if tokenizer is None:
            raise ValueError("VtquantLM: no tokenizer: pass tokenizer=..., or save the checkpoint with one "
                             "(vtquant.save(model, dir, tokenizer=tok); `vtquant quantize` does)")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self._device = torch.device(device) if device else next(model.parameters()).device
        if device:
            self.model.to(self._device)
        self.batch_size_per_gpu = max(1, int(batch_size)) if str(batch_size).isdigit() else 1
        positions = getattr(model.config, "max_position_embeddings", None) or 2048
        self._max_length = int(max_length) if max_length else min(int(positions), 2048)
        self.add_bos_token = False if add_bos_token is None else str(add_bos_token).lower() in ("1", "true", "yes")
        self.max_gen_toks = int(max_gen_toks)
        self.quiet = quiet
        self.pad_token_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)

    # --- lm-eval's view of the model -------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def prefix_token_id(self) -> int:
        """The token every rolling window and empty context starts from (BOS, else EOS)."""
        tok = self.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", type(self.tokenizer).__name__).replace("/", "__")

    def tok_encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def tok_decode(self, tokens: Iterable[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    # --- scoring ----------------------------------------------------------------------------
    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            continuation = context[-spaces:] + continuation
            context = context[:-spaces]
        whole = self.tok_encode(context + continuation)
        context_enc = self.tok_encode(context)
        continuation_enc = whole[len(context_enc):]
        if (self.add_bos_token and self.tokenizer.bos_token_id is not None) or not context_enc:
            context_enc = [self.prefix_token_id] + context_enc
        return context_enc, continuation_enc

    @torch.no_grad()
    def score_tokens(self, pairs: list[tuple[list[int], list[int]]], desc: str = "scoring") -> list[tuple[float, bool]]:
        """``(sum of log-probabilities of continuation, continuation is the greedy choice)`` per
        ``(context tokens, continuation tokens)`` pair, in the given order."""
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        results: list = [None] * len(pairs)
        batch = self.batch_size_per_gpu
        for start in tqdm(range(0, len(order), batch), desc=desc, disable=self.quiet, leave=False):
            idx = order[start:start + batch]
            rows, conts = [], []
            for i in idx:
                context, continuation = pairs[i]
                if not continuation:
                    raise ValueError("VtquantLM: an empty continuation cannot be scored")
                full = (context + continuation)[-(self.max_length + 1):]
                rows.append(full[:-1])
                conts.append(full[-min(len(continuation), len(full) - 1):])
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for b, r in enumerate(rows):
                ids[b, :len(r)] = torch.tensor(r, dtype=torch.long)
                mask[b, :len(r)] = 1
            logits = self.model(input_ids=ids.to(self._device), attention_mask=mask.to(self._device),
                                use_cache=False).logits
            logprobs = F.log_softmax(logits.float(), dim=-1)
            for b, (i, r, cont) in enumerate(zip(idx, rows, conts)):
                n = len(cont)
                lp = logprobs[b, len(r) - n:len(r)]
                target = torch.tensor(cont, dtype=torch.long, device=lp.device)
                results[i] = (float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
        return results

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*req.args) for req in requests]
        return self.score_tokens(pairs, desc="loglikelihood")

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for r, req in enumerate(requests):
            (text,) = req.args
            for window in get_rolling_token_windows(token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                                                    max_seq_len=self.max_length, context_len=1):
                windows.append(make_disjoint_window(window))
                owner.append(r)
        scores = self.score_tokens(windows, desc="loglikelihood_rolling")
        totals = [0.0] * len(requests)
        for r, (logprob, _) in zip(owner, scores):
            totals[r] += logprob
        return totals

    @torch.no_grad()
    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in tqdm(requests, desc="generate_until", disable=self.quiet or disable_tqdm, leave=False):
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
            ids = ([self.prefix_token_id] if self.add_bos_token else []) + self.tok_encode(context)
            ids = ids[-(self.max_length - max_new):] if self.max_length > max_new else ids[-1:]
            generated = self.model.generate(input_ids=torch.tensor([ids], device=self._device), do_sample=False,
                                            max_new_tokens=max_new, pad_token_id=self.pad_token_id)
            text = self.tok_decode(generated[0, len(ids):].tolist())
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            out.append(text)
        return out


# ------------------------------------------------------------------------------------------
# running tasks and writing rows
# ------------------------------------------------------------------------------------------
def run_lm_eval(lm: VtquantLM, tasks: list[str], *, include_path: Optional[str] = None,
                limit: Optional[float] = None, bootstrap_iters: int = 0, quiet: bool = False) -> dict:
    """``lm_eval.simple_evaluate`` on ``lm`` with local tasks (``include_path`` adds a folder of YAMLs;
    the Austen tasks of :data:`AUSTEN_TASKS` are always available).  Returns lm-eval's results dict."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR)] + ([str(include_path)] if include_path else [])
    manager = TaskManager(include_path=paths, include_defaults=False)
    return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                   bootstrap_iters=bootstrap_iters, log_samples=False,
                                   verbosity="ERROR" if quiet else "WARNING")


def result_rows(results: dict, recipe: Any, model_name: str, seconds: float, **extra: Any) -> list:
    """One :class:`~vtquant.eval.results.Row` per task and metric of lm-eval's ``results``."""
    from .results import row_for

    import lm_eval

    rows = []
    for task, metrics in sorted(results.get("results", {}).items()):
        n_docs = (results.get("n-samples", {}).get(task) or {}).get("effective")
        for key, value in sorted(metrics.items()):
            if not isinstance(value, (int, float)) or key.endswith("_stderr,none") or "," not in key:
                continue
            metric, _, flt = key.partition(",")
            stderr = metrics.get(f"{metric}_stderr,{flt}")
            rows.append(row_for(recipe, model=model_name, metric=f"{task}:{metric}", value=float(value),
                                seconds=round(seconds, 2), task=task, lm_eval_metric=metric, lm_eval_filter=flt,
                                stderr=stderr if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None,
                                n_docs=n_docs, tool=f"lm-eval {lm_eval.__version__}", **extra))
    return rows


# ------------------------------------------------------------------------------------------
# the Austen tasks
# ------------------------------------------------------------------------------------------
def _body(text: str) -> str:
    """The letters of *Lady Susan*, without the Project Gutenberg header / footer."""
    start = text.find("LADY SUSAN VERNON TO MR. VERNON")
    end = text.find("End of the Project Gutenberg")
    return text[start if start >= 0 else 0:end if end > 0 else len(text)]


def _paragraphs(text: str) -> list[str]:
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", _body(text)) if len(p.split()) >= 8]


_ABBREVIATIONS = ("Mr.", "Mrs.", "Dr.", "St.", "Sir.", "Esq.")


def _sentences(paragraph: str) -> list[str]:
    """Sentences of a paragraph (split after . ! ? before a capital; not after Mr. / Mrs. ...)."""
    out: list[str] = []
    for piece in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'])", paragraph):
        if out and out[-1].endswith(_ABBREVIATIONS):
            out[-1] = f"{out[-1]} {piece}"
        else:
            out.append(piece)
    return out


def austen_docs(text: str, *, n_rolling: int = 48, rolling_chars: int = 1200, n_choice: int = 120,
                context_sentences: int = 3, max_sentence_chars: int = 240,
                seed: int = 0) -> tuple[list[dict], list[dict]]:
    """``(rolling docs, multiple-choice docs)`` made from the text, deterministically.

    Rolling docs: consecutive paragraphs joined until ``rolling_chars`` characters, ``n_rolling`` of
    them from the start of the letters.  Multiple choice: ``n_choice`` passages of
    ``context_sentences`` sentences (of 20 to ``max_sentence_chars`` characters) evenly spread over the
    text; the choices are the true next sentence and three sentences drawn (seeded) from elsewhere in
    the text, in a seeded order.
    """
    paragraphs = _paragraphs(text)
    rolling: list[dict] = []
    current = ""
    for p in paragraphs:
        current = f"{current}\n\n{p}" if current else p
        if len(current) >= rolling_chars:
            rolling.append({"text": current[:rolling_chars].rsplit(" ", 1)[0]})
            current = ""
        if len(rolling) == n_rolling:
            break
    sentences = [(k, sent) for k, p in enumerate(paragraphs) for sent in _sentences(p)]
    fits = [20 <= len(sent) <= max_sentence_chars for _, sent in sentences]
    # a passage: context_sentences + 1 consecutive sentences of one paragraph, each of a usable length
    usable = [i for i in range(context_sentences, len(sentences))
              if all(fits[j] and sentences[j][0] == sentences[i][0] for j in range(i - context_sentences, i + 1))]
    pool = [j for j in range(len(sentences)) if fits[j]]
    rng = random.Random(seed)
    choice: list[dict] = []
    step = max(1, len(usable) // max(1, n_choice))
    for k, i in enumerate(usable[::step][:n_choice]):
        others = [j for j in pool if abs(j - i) > context_sentences + 1]
        options = [sentences[i][1]] + [sentences[j][1] for j in rng.sample(others, 3)]
        order = list(range(4))
        rng.shuffle(order)
        choice.append({"id": k, "context": " ".join(sent for _, sent in sentences[i - context_sentences:i]),
                       "choices": [options[o] for o in order], "label": order.index(0)})
    return rolling, choice


def write_austen_data(folder: Any, text: Optional[str] = None, **kwargs: Any) -> dict[str, Path]:
    """Write ``austen_rolling.jsonl`` and ``austen_next_sentence.jsonl`` into ``folder``.

    ``text`` defaults to the ``austen-lady-susan`` asset; ``kwargs`` go to :func:`austen_docs`.
    """
    if text is None:
        from ..data import load_text

        text = load_text("austen-lady-susan", quiet=True)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rolling, choice = austen_docs(text, **kwargs)
    out = {}
    for name, docs in (("austen_rolling", rolling), ("austen_next_sentence", choice)):
        path = folder / f"{name}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
        tmp.replace(path)
        out[name] = path
    return out


def load_jsonl(path: Any) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def docs_as_dataset(path: Any) -> dict:
    """``{"test": datasets.Dataset}`` of a jsonl file (what an lm-eval ``custom_dataset`` returns)."""
    import datasets

    return {"test": datasets.Dataset.from_list(load_jsonl(path))}


def lm_for(model: Any, tokenizer: Any, **kwargs: Any) -> VtquantLM:
    """A :class:`VtquantLM` over an in-memory model (quantized or full precision)."""
    return VtquantLM(model=model, tokenizer=tokenizer, **kwargs)


def timed_eval(lm: VtquantLM, tasks: list[str], **kwargs: Any) -> tuple[dict, float]:
    start = time.time()
    results = run_lm_eval(lm, tasks, **kwargs)
    return results, time.time() - start

