"""FP-vs-quantized fidelity of a vision-language model on image + text prompts (``vtquant eval vlm``).

Data (:func:`vlm_pairs`): the real photos bundled with scikit-image / scikit-learn / matplotlib
(:func:`vtquant.eval.fidelity.sample_photos`), split as in ``tools/clip_fidelity.py``: every third
photo (0, 3, 6, ...) calibrates, the others are held out for evaluation.  Each photo gets a prompt
from :data:`PROMPTS` (fixed question / caption templates) and, as the assistant's answer, a sentence
of a bundled text: Shakespeare for calibration, Jane Austen's *Lady Susan* for evaluation (a
different text, as in ``vtquant eval perplexity``).  The pairs go through the model's own processor
and chat template (one ``<image>`` in the user turn), one image + text pair per batch.

Metrics (:func:`evaluate_vlm`), against the full-precision model on the held-out pairs:

* ``next_token_agreement``: the share of positions where the quantized model's argmax equals FP's,
  over every position from the last image token to the end (the text after the image, teacher forced);
* ``logit_rel_error``: ``||logits_q - logits_fp|| / ||logits_fp||`` over the same positions (mean over pairs);
* ``greedy_agreement``: greedy generation (``generate(do_sample=False, use_cache=True)``, the KV cache)
  of ``new_tokens`` tokens after the prompt: the share of FP's tokens reproduced before the first
  difference (mean over prompts); ``greedy_exact``: the share of prompts generated identically;
* sinks found per tower on the held-out pairs (quantized models): in the vision tower the sink
  patches per image (CLS excluded), in the language model the sinks on the first token, on image
  tokens and on other text tokens per sequence.
"""
from __future__ import annotations

import copy
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ..config import Recipe
from ..errors import DataError
from .results import Row, row_for

#: Fixed prompt templates (questions and caption requests), used in turn.
PROMPTS = (
    "Describe this image.",
    "What is in this picture?",
    "Write a short caption for this photo.",
    "What colors do you see in this image?",
    "What is the main object in this image?",
    "Is this photo taken indoors or outdoors?",
    "What could this picture be used for?",
    "Give this image a title.",
)
CALIB_TEXT = "shakespeare"
EVAL_TEXT = "austen-lady-susan"
METRICS = ("next_token_agreement", "logit_rel_error", "greedy_agreement", "greedy_exact")


def split_photos(photos: list) -> tuple[list, list]:
    """Calibration: every third photo (index 0, 3, 6, ...); evaluation: the others."""
    calib = [p for i, p in enumerate(photos) if i % 3 == 0]
    held = [p for i, p in enumerate(photos) if i % 3 != 0]
    return calib, held


def text_sentences(name: str, *, min_words: int = 6, max_words: int = 30, quiet: bool = True) -> list[str]:
    """Sentences of a bundled text (or ``.txt`` file) of ``min_words``..``max_words`` words, whitespace
    normalized, in order (the first 5 % of the text, where Project Gutenberg's header sits, skipped)."""
    from ..data import load_text

    text = load_text(name, quiet=quiet)
    text = text[len(text) // 20:]
    parts = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
    out = [s for s in parts if min_words <= len(s.split()) <= max_words and not re.search(r"[_*\[\]<>#@]", s)]
    if not out:
        raise DataError(f"text {name}: no sentence of {min_words}-{max_words} words; give a longer prose text")
    return out


@dataclass
class VLMPair:
    """One image + text example: photo name, prompt, answer and the processor's batch (``[1, ...]``)."""

    name: str
    prompt: str
    answer: str
    batch: dict
    prompt_batch: dict  # the same without the answer, ending with the assistant turn's start (for generate)


def chat_text(processor: Any, prompt: str, answer: Optional[str]) -> str:
    """The chat-templated text of a user turn (``<image>`` then ``prompt``) and, if given, the assistant's
    ``answer``; without an answer it ends with the generation prompt."""
    image_token = getattr(processor, "image_token", "<image>")
    tok = getattr(processor, "tokenizer", processor)
    user = {"role": "user", "content": f"{image_token}\n{prompt}"}
    template = getattr(processor, "chat_template", None) or getattr(tok, "chat_template", None)
    if template is None:
        text = f"USER: {image_token}\n{prompt} ASSISTANT:"
        return text + (f" {answer}" if answer else "")
    if answer is None:
        return tok.apply_chat_template([user], tokenize=False, add_generation_prompt=True, chat_template=template)
    return tok.apply_chat_template([user, {"role": "assistant", "content": answer}], tokenize=False,
                                   chat_template=template)


def vlm_pairs(processor: Any, photos: list, text: str, *, seed: int = 0, prompt_offset: int = 0,
              quiet: bool = True) -> list[VLMPair]:
    """Image + text pairs: each photo with a prompt of :data:`PROMPTS` (in turn from ``prompt_offset``)
    and a seeded sentence of ``text`` as the answer, through the processor (``return_tensors="pt"``)."""
    sentences = text_sentences(text, quiet=quiet)
    g = torch.Generator().manual_seed(int(seed))
    picks = torch.randint(0, len(sentences), (len(photos),), generator=g).tolist()
    pairs = []
    for i, ((name, img), pick) in enumerate(zip(photos, picks)):
        prompt = PROMPTS[(i + prompt_offset) % len(PROMPTS)]
        answer = sentences[pick]
        batch = processor(images=[img], text=[chat_text(processor, prompt, answer)], return_tensors="pt")
        pbatch = processor(images=[img], text=[chat_text(processor, prompt, None)], return_tensors="pt")
        pairs.append(VLMPair(name, prompt, answer, dict(batch), dict(pbatch)))
    return pairs


@dataclass
class VLMData:
    calib: list
    eval: list
    calib_desc: str
    eval_desc: str


def prepare_vlm_data(processor: Any, *, calib_images: Optional[int] = 8, eval_images: Optional[int] = None,
                     seed: int = 0, quiet: bool = True) -> VLMData:
    """Calibration and evaluation pairs from the bundled photos (:func:`split_photos`), at most
    ``calib_images`` / ``eval_images`` of each (``None``: all: 8 and 15)."""
    from .fidelity import sample_photos

    calib_photos, eval_photos = split_photos(sample_photos())
    calib_photos = calib_photos[:calib_images] if calib_images else calib_photos
    eval_photos = eval_photos[:eval_images] if eval_images else eval_photos
    if not calib_photos or not eval_photos:
        raise DataError("no bundled photos: install scikit-image, scikit-learn or matplotlib (vtquant[photos])")
    calib = vlm_pairs(processor, calib_photos, CALIB_TEXT, seed=seed, quiet=quiet)
    ev = vlm_pairs(processor, eval_photos, EVAL_TEXT, seed=seed + 1, prompt_offset=3, quiet=quiet)
    return VLMData(calib, ev,
                   calib_desc=f"{len(calib)} bundled photos (every third) + prompt templates + {CALIB_TEXT} sentences",
                   eval_desc=f"{len(ev)} held-out bundled photos + prompt templates + {EVAL_TEXT} sentences")


# ------------------------------------------------------------------------------------------
# reference and scores
# ------------------------------------------------------------------------------------------
def image_token_id(model: Any) -> int:
    cfg = model.config
    for key in ("image_token_id", "image_token_index"):
        value = getattr(cfg, key, None)
        if value is not None:
            return int(value)
    raise DataError(f"{type(model).__name__}: its config names no image token (image_token_id / image_token_index)")


def _text_span(ids: torch.Tensor, image_id: int) -> slice:
    """Positions from the last image token to the second-to-last token (their next tokens are the text after the image)."""
    where = (ids == image_id).nonzero().flatten()
    start = int(where.max()) if where.numel() else 0
    return slice(start, ids.numel() - 1)


@dataclass
class Reference:
    """FP outputs on the evaluation pairs: logits over each text span and greedy generations."""

    logits: list = field(default_factory=list)
    generations: list = field(default_factory=list)


def _forward(model: Any, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch, use_cache=False).logits[0]


def _generate(model: Any, batch: dict, new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             use_cache=True)
    return out[0, batch["input_ids"].shape[1]:].tolist()


def reference_outputs(model: Any, pairs: list, new_tokens: int) -> Reference:
    ref = Reference()
    image_id = image_token_id(model)
    for pair in pairs:
        span = _text_span(pair.batch["input_ids"][0], image_id)
        ref.logits.append(_forward(model, pair.batch)[span].clone())
        ref.generations.append(_generate(model, pair.prompt_batch, new_tokens) if new_tokens else [])
    return ref


def tower_sinks(model: Any, batch: dict, image_id: int) -> dict:
    """Sink counts of the last forward pass per quantized tower: ``vision``: sink patches per image (prefix
    tokens excluded); ``language``: ``first_token``, ``image_tokens``, ``text_tokens`` of the first sequence."""
    handle = getattr(model, "vtquant", None)
    towers = getattr(handle, "towers", None) or {}
    out: dict = {}
    vis = towers.get("vision")
    if vis is not None and vis.state is not None:
        prefix = {pos for _, _, pos in vis.adapter.prefix_kinds()}
        out["vision_patches"] = [len([p for p in row if p not in prefix]) for row in vis.sink_positions()]
        out["vision_prefix"] = [len([p for p in row if p in prefix]) for row in vis.sink_positions()]
    lang = towers.get("language")
    if lang is not None and lang.state is not None:
        rows = lang.sink_positions()
        ids = batch["input_ids"][0]
        pos = rows[0] if rows else []
        first = int(batch["attention_mask"][0].long().argmax()) if "attention_mask" in batch else 0
        out["lm_first_token"] = int(first in pos)
        out["lm_image_tokens"] = sum(1 for p in pos if p < ids.numel() and int(ids[p]) == image_id)
        out["lm_text_tokens"] = sum(1 for p in pos if p != first and (p >= ids.numel() or int(ids[p]) != image_id))
    return out


def score(model: Any, pairs: list, ref: Reference, new_tokens: int) -> dict:
    """The metrics of :data:`METRICS` and the per-tower sink counts of ``model`` against ``ref``."""
    image_id = image_token_id(model)
    agree = total = 0
    rel, prefix, exact = [], [], []
    sinks: dict = {}
    for pair, ref_logits, ref_gen in zip(pairs, ref.logits, ref.generations):
        span = _text_span(pair.batch["input_ids"][0], image_id)
        logits = _forward(model, pair.batch)[span]
        for key, value in tower_sinks(model, pair.batch, image_id).items():
            sinks.setdefault(key, []).extend(value if isinstance(value, list) else [value])
        agree += int((logits.argmax(-1) == ref_logits.argmax(-1)).sum())
        total += logits.shape[0]
        rel.append(float((logits - ref_logits).norm() / ref_logits.norm()))
        if new_tokens:
            gen = _generate(model, pair.prompt_batch, new_tokens)
            same = 0
            for a, b in zip(gen, ref_gen):
                if a != b:
                    break
                same += 1
            prefix.append(same / max(1, len(ref_gen)))
            exact.append(float(gen == ref_gen))
    out = {"next_token_agreement": agree / max(1, total), "logit_rel_error": sum(rel) / len(rel),
           "positions": total}
    if new_tokens:
        out["greedy_agreement"] = sum(prefix) / len(prefix)
        out["greedy_exact"] = sum(exact) / len(exact)
    out["sinks"] = {k: _summary(v) for k, v in sinks.items()}
    return out


def _summary(values: list) -> dict:
    return {"mean": round(sum(values) / len(values), 2), "min": min(values), "max": max(values), "n": len(values)}


# ------------------------------------------------------------------------------------------
# the comparison
# ------------------------------------------------------------------------------------------
def _quantize_vlm(model: Any, recipe: Recipe, batches: list, quiet: bool) -> Any:
    from ..vlm import quantize_vlm_

    return quantize_vlm_(model, recipe, batches, quiet=quiet)


def vlm_method_recipe(method: str, base: Recipe, *, w_bits: int = 8, a_bits: int = 8) -> Optional[Recipe]:
    """The recipe of a named method for every part of a VLM, derived from ``base`` (``None`` for ``fp``).

    * ``vision`` and ``language``: the method derived from the base's section of that part (or from its
      top level) by :func:`~vtquant.config.method_recipe`; ``+rotate`` rotates the language model, and the
      vision tower only where the base's vision section enables rotation (a LLaVA tower read at layer -2
      refuses it);
    * ``projector`` (no blocks: no sink calibration): a method without sink handling (``naive-static``,
      ``dynamic-token``, ``rotate``'s naive part) is applied to it too; sink-handling methods
      (``insertquant``, ``smoothquant``...) leave it as the base recipe says (full precision without a
      ``towers.projector`` section).
    """
    from ..config import method_recipe
    from ..core.methods import get_method

    if method == "fp":
        return None
    rotate = method.endswith("+rotate") or method == "rotate"
    plain = method[: -len("+rotate")] if method.endswith("+rotate") else method
    plain = "naive-static" if plain == "rotate" else plain
    towers = dict(getattr(base, "towers", None) or {})
    top = copy.copy(base)
    top.towers = None
    out = method_recipe(method, top, w_bits=w_bits, a_bits=a_bits)
    sections = {}
    for name in ("vision", "language"):
        sec = towers.get(name, top)
        rot = rotate and (name == "language" or bool(sec.rotation.enabled))
        sections[name] = method_recipe(plain, sec, w_bits=w_bits, a_bits=a_bits, rotate=rot)
    proj = towers.get("projector")
    if not get_method(plain).handles_sinks and plain != "smoothquant":
        sections["projector"] = method_recipe(plain, proj or top, w_bits=w_bits, a_bits=a_bits)
    elif proj is not None:
        sections["projector"] = copy.deepcopy(proj)
    out.towers = sections
    return out


@dataclass
class VLMEvalResult:
    rows: list
    protocol: str
    calibration: str
    reports: dict
    details: list


def evaluate_vlm(fp_model: Any, processor: Any, settings: list, model_name: str, *, data: VLMData,
                 new_tokens: int = 16, quiet: bool = False, log: Callable[[str], None] = print,
                 quantize: Optional[Callable] = None, fp_reference: Optional[str] = None) -> VLMEvalResult:
    """FP and each quantized setting of ``fp_model`` on ``data.eval``; result rows per metric.

    Args:
        fp_model: the full-precision VLM (left unchanged: each setting quantizes a deep copy).
        processor: its processor (only for the protocol text).
        settings: ``None`` (FP), recipes (each run as written; :func:`vlm_method_recipe` derives the
            named methods) or ``(label, recipe)`` pairs (the label names the row; default: the method).
        model_name: the rows' model name.
        data: :func:`prepare_vlm_data`.
        new_tokens: greedy tokens generated per prompt (0: no generation).
        quantize: ``quantize(model, recipe, batches, quiet)`` (default: :func:`vtquant.vlm.quantize_vlm_`).
    """
    quantize = quantize or _quantize_vlm
    calib_batches = [p.batch for p in data.calib]
    t0 = time.time()
    ref = reference_outputs(fp_model, data.eval, new_tokens)
    ref_seconds = time.time() - t0
    rows, reports, details = [], {}, []
    extra_common = {"fp_reference": fp_reference} if fp_reference else {}
    for setting in settings:
        label, recipe = setting if isinstance(setting, tuple) else (None, setting)
        label = label or ("fp" if recipe is None else recipe.display_method)
        t0 = time.time()
        if recipe is None:
            model, report = fp_model, None
            calib_s = 0.0
        else:
            model = copy.deepcopy(fp_model)
            report = quantize(model, recipe, calib_batches, quiet)
            calib_s = time.time() - t0
        t1 = time.time()
        scores = score(model, data.eval, ref, new_tokens)
        eval_s = time.time() - t1 + (ref_seconds if recipe is None else 0.0)
        calib_sinks = getattr(report, "sinks", None) if report is not None else None
        extra = dict(extra_common, label=label, calib_seconds=round(calib_s, 2), eval_seconds=round(eval_s, 2),
                     positions=scores["positions"], eval_sinks=scores["sinks"])
        if calib_sinks:
            extra["calib_sinks"] = calib_sinks
        methods = getattr(report, "methods", None)
        if methods:
            extra["tower_methods"] = dict(methods)
        for metric in METRICS:
            if metric in scores:
                rows.append(row_for(recipe, model_name, metric, round(scores[metric], 5), calib_s + eval_s, **extra))
        if report is not None:
            reports[label] = report.to_dict() if hasattr(report, "to_dict") else str(report)
        details.append({"method": label, **{k: scores[k] for k in METRICS if k in scores}, "sinks": scores["sinks"],
                        "calib_sinks": calib_sinks, "seconds": round(calib_s + eval_s, 1)})
        log(f"{label:<24} next-token agree {scores['next_token_agreement']:.4f}  logit rel err "
            f"{scores['logit_rel_error']:.4f}" + (f"  greedy {scores['greedy_agreement']:.3f} "
                                                   f"(exact {scores['greedy_exact']:.2f})" if new_tokens else "")
            + f"  sinks {scores['sinks']}  ({calib_s:.0f} s quantize, {eval_s:.0f} s eval)")
        if model is not fp_model:
            del model
    protocol = (f"{data.eval_desc}; next-token agreement and logit error over the text after the image "
                f"({rows[0].extra['positions'] if rows else 0} positions, teacher forced); greedy generation of "
                f"{new_tokens} tokens with the KV cache")
    return VLMEvalResult(rows, protocol, data.calib_desc, reports, details)


def format_vlm_table(details: list) -> str:
    """A markdown table of :func:`evaluate_vlm`'s details: one line per method."""
    lines = ["| method | next-token agree | logit rel err | greedy agree (exact) | vision sink patches / image | "
             "LM sinks / seq: first, image, text |", "|---|---|---|---|---|---|"]
    for d in details:
        s = d["sinks"]
        vis = s.get("vision_patches")
        vis = f"{vis['mean']:.1f} ({vis['min']}-{vis['max']})" if vis else "-"
        lm = "-"
        if "lm_first_token" in s:
            lm = (f"{s['lm_first_token']['mean']:.2f}, {s['lm_image_tokens']['mean']:.1f}, "
                  f"{s['lm_text_tokens']['mean']:.1f}")
        greedy = (f"{d['greedy_agreement']:.3f} ({d['greedy_exact']:.2f})" if "greedy_agreement" in d else "-")
        lines.append(f"| {d['method']} | {d['next_token_agreement']:.4f} | {d['logit_rel_error']:.4f} | {greedy} | "
                     f"{vis} | {lm} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# lm-evaluation-harness
# ------------------------------------------------------------------------------------------
def lm_eval_vlm(model: Any, processor: Any, **kwargs: Any) -> Any:
    """An in-memory (vtquant-quantized or FP) VLM and its processor as lm-eval's ``HFMultimodalLM``
    (``lm_eval --model hf-multimodal``), for ``lm_eval.simple_evaluate(model=...)`` on image-text tasks.

    lm-eval's own class loads weights by name (it would not see the quantization) and, given a
    processor object, does not keep it; this subclass takes both as they are.

    Args:
        model: the VLM (its config names the image token).
        processor: its processor (chat template, image processor, tokenizer).
        **kwargs: ``HFMultimodalLM`` options (``batch_size``, ``max_length``, ``max_images``...).
    """
    from lm_eval.models.hf_vlms import HFMultimodalLM

    class _InMemoryVLM(HFMultimodalLM):
        def __init__(self) -> None:
            self._given_processor = processor
            super().__init__(pretrained=model, **kwargs)

        def _create_tokenizer(self, *args: Any, **kw: Any) -> None:
            self.processor = self._given_processor
            self.tokenizer = getattr(self._given_processor, "tokenizer", self._given_processor)

    return _InMemoryVLM()
