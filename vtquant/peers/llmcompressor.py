"""llm-compressor (vllm-project/llm-compressor) as an optional peer of ``vtquant compare``.

Two rows, both SmoothQuant (``smoothing_strength`` 0.8, llm-compressor's default mappings:
``input_layernorm -> q/k/v_proj`` and ``post_attention_layernorm -> gate/up_proj``) followed by
int8 quantization of every ``Linear`` except ``lm_head``:

``llmcompressor-sq-static``
    ``QuantizationModifier`` with one config group: int8 weights per output channel,
    symmetric (min-max); int8 input activations per tensor, *static* symmetric, scales from
    calibration with llm-compressor's default static observer for custom schemes (``minmax``).
``llmcompressor-sq-gptq-dynamic``
    ``GPTQModifier(scheme="W8A8")``: GPTQ int8 per-channel weights; int8 input activations
    per token, *dynamic* (computed at every forward).

After :func:`llmcompressor.oneshot` the model stays a normal transformers model whose
``Linear`` modules carry compressed-tensors quantization (``quantization_scheme``,
``weight_scale``, ``input_scale`` for the static row) and run fake quantization
(quantize-dequantize of weights and input activations) in their forward, so
``model(input_ids).logits`` evaluates the quantized model.

Install with ``pip install "vtquant[llmcompressor]"``.  Tested with llmcompressor 0.14.0.1 and
compressed-tensors 0.19.0, both on the versions they require (torch 2.14.0, transformers 5.17.0)
and, installed with ``--no-deps``, on torch 2.14.1 / transformers 5.24.0 / huggingface_hub 2.4.0:
every llmcompressor release caps torch and transformers (0.14.0.1: ``torch<=2.14.0``,
``transformers<=5.17.0``).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import tempfile
from typing import Any

import torch

METHODS = ("llmcompressor-sq-static", "llmcompressor-sq-gptq-dynamic")
"""The two row names this peer produces."""

SMOOTHING_STRENGTH = 0.8
IGNORE = ["lm_head"]
INSTALL_HINT = 'pip install "vtquant[llmcompressor]"'


class _PretokenizedOnly:
    """Stands in for a tokenizer/processor: the calibration data is already tokenized.

    ``oneshot`` otherwise loads ``AutoProcessor.from_pretrained(model.config.name_or_path)``,
    i.e. a hub download for a hub-named model.  Nothing should use it; if something does, say so.
    """

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"llmcompressor asked the processor for {name!r}, but vtquant passes "
                             "pre-tokenized calibration data and no tokenizer")


def _recipe(method: str) -> list:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform import SmoothQuantModifier

    smooth = SmoothQuantModifier(smoothing_strength=SMOOTHING_STRENGTH)
    if method == "llmcompressor-sq-static":
        scheme = QuantizationScheme(
            targets=["Linear"],
            weights=QuantizationArgs(num_bits=8, type="int", strategy="channel", symmetric=True,
                                     dynamic=False),
            input_activations=QuantizationArgs(num_bits=8, type="int", strategy="tensor", symmetric=True,
                                               dynamic=False),
        )
        return [smooth, QuantizationModifier(config_groups={"group_0": scheme}, ignore=list(IGNORE))]
    return [smooth, GPTQModifier(targets="Linear", scheme="W8A8", ignore=list(IGNORE))]


def _calibration_dataset(calib_batches: list[torch.Tensor]):
    from datasets import Dataset

    if not calib_batches:
        raise ValueError("llmcompressor_quantize needs at least one calibration batch")
    rows = torch.cat([b.reshape(-1, b.shape[-1]) for b in calib_batches]).long()
    ids = rows.tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]}), rows.shape


@contextlib.contextmanager
def _local_config_path(model: torch.nn.Module):
    """Point ``model.config.name_or_path`` at a temporary folder holding its config.json.

    ``oneshot`` re-reads the config from ``name_or_path`` to refuse models quantized in another
    format: with a hub name that is a download, with a random model's empty name an error.  A
    model loaded from GGUF keeps ``quantization_config = {"quant_method": "gguf"}`` although
    transformers dequantized its weights on load (plain float ``Linear`` modules), so that entry is
    left out of the copy; any other quantization format is kept, and refused by ``oneshot``.
    """
    config = model.config
    saved = config._name_or_path
    with tempfile.TemporaryDirectory(prefix="vtquant-llmc-") as tmp:
        config.save_pretrained(tmp)
        path = os.path.join(tmp, "config.json")
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if str((data.get("quantization_config") or {}).get("quant_method", "")).lower() == "gguf":
            del data["quantization_config"]
            with open(path, "w", encoding="utf-8") as f:
                json.dump(data, f)
        config._name_or_path = tmp
        try:
            yield
        finally:
            config._name_or_path = saved


def _import_llmcompressor(quiet: bool):
    """Import llm-compressor, or say how to install it.

    Importing it reconfigures loguru (its console handler goes to stdout) and logs a warning on
    machines without an accelerator; with ``quiet`` the first import is silenced and the handler
    then re-pointed at the real stdout.
    """
    first = "llmcompressor" not in sys.modules
    try:
        if quiet and first:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                import llmcompressor
            from llmcompressor.logger import LOGGER_CONFIG, configure_logger

            configure_logger(LOGGER_CONFIG)
        else:
            import llmcompressor
    except ImportError as err:
        raise ImportError(f"the llmcompressor peers need llm-compressor: {INSTALL_HINT}") from err
    return llmcompressor


@contextlib.contextmanager
def _quiet_output(quiet: bool):
    """Silence llm-compressor's logs (loguru, stdout) and progress bars (tqdm, stderr)."""
    if not quiet:
        yield
        return
    from loguru import logger

    names = ("llmcompressor", "compressed_tensors")
    fx_log = logging.getLogger("torch.fx._symbolic_trace")  # "is_fx_tracing will return true ..."
    fx_level = fx_log.level
    for name in names:
        logger.disable(name)
    fx_log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        fx_log.setLevel(fx_level)
        for name in names:
            logger.enable(name)


def llmcompressor_quantize(model: torch.nn.Module, calib_batches: list[torch.LongTensor], method: str,
                           quiet: bool = False) -> torch.nn.Module:
    """Quantize a transformers causal LM in place with llm-compressor's ``oneshot``.

    Args:
        model: an in-memory transformers ``PreTrainedModel`` (modified in place: pass a copy to
            keep the full-precision one).  Nothing is loaded from a hub or from disk.
        calib_batches: calibration token windows, ``[batch, seq_len]`` each (as in
            :class:`vtquant.llm.TextSetup`); every row is one calibration sample.
        method: ``llmcompressor-sq-static`` or ``llmcompressor-sq-gptq-dynamic``.
        quiet: silence llm-compressor's and compressed-tensors' logs and progress bars.

    Returns:
        ``model``, with compressed-tensors fake quantization in its ``Linear`` modules.
    """
    if method not in METHODS:
        raise ValueError(f"unknown llmcompressor method {method!r}: use one of {', '.join(METHODS)}")
    llmcompressor = _import_llmcompressor(quiet)
    from llmcompressor import oneshot
    from llmcompressor.core import reset_session

    dataset, (n_samples, seq_len) = _calibration_dataset(calib_batches)
    batch_size = int(calib_batches[0].shape[0]) if calib_batches[0].dim() == 2 else 1
    # oneshot sets TOKENIZERS_PARALLELISM=false for good (and logs it) when unset; undo that afterwards
    tok_par = os.environ.get("TOKENIZERS_PARALLELISM")
    was_training = model.training
    with _quiet_output(quiet):
        try:
            if tok_par is None:
                os.environ["TOKENIZERS_PARALLELISM"] = "false"
            with _local_config_path(model):
                model = oneshot(
                    model=model,
                    processor=_PretokenizedOnly(),  # the data is tokenized: no AutoProcessor download
                    dataset=dataset,
                    recipe=_recipe(method),
                    num_calibration_samples=n_samples,
                    max_seq_length=seq_len,
                    batch_size=batch_size,
                    shuffle_calibration_samples=False,
                    output_dir=None,
                )
        finally:
            reset_session()  # the global session keeps the model and the modifiers' state
            if tok_par is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
    model.train(was_training)
    model.vtquant_peer = {"peer": "llmcompressor", "method": method,
                          "version": getattr(llmcompressor, "__version__", "unknown"),
                          "calibration": f"{n_samples} windows x {seq_len} tokens"}
    return model
