"""Loading the models vtquant ships recipes for (through :mod:`vtquant.assets`, never a hub).

``asset:smollm2-135m`` (the default) is the GGUF file of the ``smollm2-135m``
asset, loaded by transformers (weights dequantized to fp32 on load).  A local
``.gguf`` file (``--model-file``) or a local transformers directory work the same.

:func:`load_clip_vit_b16` returns the OpenAI CLIP ViT-B/16 vision tower of the
``clip-vit-b16-openai`` asset (int8 ONNX, dequantized to fp32) in transformers, open_clip or timm.
"""
from __future__ import annotations

import os
import struct
import time
from pathlib import Path
from typing import Any, Optional

import torch

from .errors import DataError

DEFAULT_MODEL = "asset:smollm2-135m"


def load_causal_lm(spec: str = DEFAULT_MODEL, model_file: Optional[str] = None, *, quiet: bool = False,
                   attn_implementation: Optional[str] = None, dtype: Any = None) -> tuple[Any, Any, str]:
    """Load a transformers causal LM and its tokenizer.

    Args:
        spec: ``asset:NAME`` (a vtquant asset holding a GGUF file), a path to a ``.gguf`` file,
            or a local transformers model directory.
        model_file: a GGUF file given by hand; overrides ``spec`` (use when offline).
        quiet: no progress output.
        attn_implementation: e.g. ``eager`` when attention weights are needed.
        dtype: the weights' dtype as loaded (default float32): a bf16 / fp16 model is read in that dtype,
            never held in float32 first.

    Returns:
        ``(model in eval mode, tokenizer, display name)``.
    """
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError("loading LLMs needs transformers and gguf: pip install 'vtquant[hf]'") from err
    from transformers.utils import logging as hf_logging

    if quiet:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    if model_file:
        path = Path(model_file)
        name = path.stem
        if not path.exists():
            raise FileNotFoundError(f"--model-file {model_file}: no such file")
    elif spec.startswith("asset:"):
        from . import assets

        asset = spec.split(":", 1)[1]
        path = assets.fetch(asset, quiet=quiet)
        name = asset
    else:
        path = Path(spec)
        name = path.name
        if not path.exists():
            raise FileNotFoundError(
                f"model {spec!r} not found: give asset:NAME (see `vtquant assets`), a .gguf file or a local "
                "transformers directory (hub names cannot be downloaded here)")
    kwargs: dict = {"dtype": dtype or torch.float32}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    start = time.time()
    if path.suffix == ".gguf":
        check_gguf(path)
        try:
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, **kwargs)
        except (ValueError, KeyError, EOFError, struct.error) as err:
            raise DataError(f"model file {path}: transformers cannot load this GGUF file "
                            f"({type(err).__name__}: {err}); give a GGUF file of a supported architecture "
                            "(Llama, Qwen2, Mistral, Gemma) or a local transformers directory") from None
    else:
        tok = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    model.eval()
    model.vtquant_load_seconds = time.time() - start
    return model, tok, name


def check_gguf(path: Path) -> None:
    """Check a GGUF file's header and that its tensor data is all there (a truncated download
    fails here in milliseconds, named, instead of deep inside transformers).

    Raises:
        DataError: not a GGUF file, or truncated / corrupt (the message says how to get it again).
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise DataError(f"model file {path}: not a GGUF file (it starts with {magic!r}, not b'GGUF'); give a "
                        ".gguf model file or a local transformers directory")
    again = ("the file is truncated or corrupt (an interrupted download?): fetch it again "
             "(vtquant assets --fetch NAME, or download the .gguf again)")
    try:
        import gguf
    except ImportError:  # pragma: no cover - transformers needs gguf for .gguf files and says so
        return
    try:
        reader = gguf.GGUFReader(str(path))
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except (ValueError, IndexError, KeyError, struct.error, OSError) as err:
        raise DataError(f"model file {path} ({size} bytes): {again} [{type(err).__name__}: {err}]") from None
    if end > size:
        raise DataError(f"model file {path}: {size} bytes, but its tensors need {end}; {again}")


def set_threads(threads: Optional[int] = None) -> int:
    """Use ``threads`` CPU threads (default: all cores available to this process)."""
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, threads))
    return torch.get_num_threads()


def load_clip_vit_b16(library: str = "hf", *, quiet: bool = False, onnx_path: Optional[str] = None) -> Any:
    """OpenAI CLIP ViT-B/16 vision tower + 512-d projection (asset ``clip-vit-b16-openai``), fp32, eval mode.

    "FP" is the dequantized int8 ONNX model (see :mod:`vtquant.convert.clip_onnx`).

    Args:
        library: ``"hf"`` (``CLIPVisionModelWithProjection``), ``"open_clip"`` (``ViT-B-16`` visual tower)
            or ``"timm"`` (``vit_base_patch16_clip_224.openai``, quick_gelu).
        quiet: no progress output.
        onnx_path: the asset's ONNX file given by hand (offline use).
    """
    from .convert.clip_onnx import load_clip_vit_b16 as _load

    return _load(library, quiet=quiet, onnx_path=onnx_path)  # type: ignore[arg-type]
