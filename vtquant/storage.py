"""Compact on-disk storage of the full-precision tables a quantized LLM keeps (embeddings, head).

vtquant quantizes the decoder Linears to int8 codes; the token embedding table and the
output head stay in full precision for compute.  In a small model they dominate the
checkpoint (SmolLM2-135M: 49152 x 576 = 28 M parameters, 113 MB in fp32).  With
``vtquant.save(model, path, compact_embeddings=...)`` they are written compactly and turned
back into float at load; nothing else changes:

* ``"bf16"``: the table rounded to bfloat16;
* ``"int8"``: symmetric int8 codes per row (one fp32 scale per token row, ``absmax / 127``).

An output head that is not stored as a tie but is a linear function of the input embedding
(a rotation folds ``Q`` and the final norm's scale into an untied copy: ``H = E Q^T diag(g) Q``)
is not stored at all: the ``[hidden, hidden]`` matrix ``M`` with ``H = E M`` (least squares,
checked to float32 round-off) is stored instead, and the head is rebuilt at load as
``E' M`` from the stored (rounded) embedding ``E'``.  A head that is no such function is
stored in the same compact form as the embedding.  What the loaded model computes differs
from the saved one only by this stated rounding of those tables.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

FORMATS = ("bf16", "int8")
_SCALE = ".__vtq_row_scale"
_FROM_INPUT = ".__vtq_from_input"
_DERIVE_TOL = 1e-5  # relative residual below which the head counts as E @ M


def _key_of(model: nn.Module, module: Optional[nn.Module]) -> Optional[str]:
    if module is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
        return None
    for name, mod in model.named_modules():
        if mod is module:
            return f"{name}.weight" if name else "weight"
    return None


def _tables(model: nn.Module) -> tuple[list[str], Optional[str]]:
    """State-dict keys of the input embedding tables and of the (float) output head."""
    get_in = getattr(model, "get_input_embeddings", None)
    embeds = [get_in()] if callable(get_in) and get_in() is not None else [
        m for m in model.modules() if isinstance(m, nn.Embedding)]
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is not None and not isinstance(head, nn.Linear):  # a QuantLinear head is already int8
        head = None
    keys = [k for k in (_key_of(model, e) for e in embeds) if k is not None]
    return keys, _key_of(model, head)


def _aliases(state: dict) -> dict[str, str]:
    """Keys whose tensor is the same memory as an earlier key (tied weights) -> that key."""
    seen: dict = {}
    out = {}
    for key, t in state.items():
        if t.numel() == 0:
            continue
        ident = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if ident in seen:
            out[key] = seen[ident]
        else:
            seen[ident] = key
    return out


def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: ``(codes int8 [R, C], scale float32 [R])``."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    codes = torch.clamp(torch.round(w / scale.unsqueeze(1)), -127, 127).to(torch.int8)
    return codes, scale


def _encode(key: str, weight: torch.Tensor, fmt: str, out: dict) -> dict:
    if fmt == "int8":
        codes, scale = int8_rows(weight)
        out[key], out[key + _SCALE] = codes.contiguous(), scale.contiguous()
        return {"format": "int8-per-row", "dtype": str(weight.dtype).replace("torch.", "")}
    out[key] = weight.detach().to(torch.bfloat16).contiguous()
    return {"format": "bf16", "dtype": str(weight.dtype).replace("torch.", "")}


def _decoded(key: str, tensors: dict, fmt: str) -> torch.Tensor:
    if fmt == "int8-per-row":
        return tensors[key].float() * tensors[key + _SCALE].float().unsqueeze(1)
    return tensors[key].float()


@torch.no_grad()
def compact_state(model: nn.Module, fmt: str) -> tuple[dict, dict]:
    """The tensors to write and the ``storage`` description for ``vtquant.json``."""
    if fmt not in FORMATS:
        raise ValueError(f"compact_embeddings={fmt!r}: use one of {FORMATS} (or None for full precision)")
    state = model.state_dict()
    aliases = _aliases(state)
    embeds, head = _tables(model)
    embeds = [aliases.get(k, k) for k in embeds]
    out = {k: v.contiguous() for k, v in state.items() if k not in aliases}
    info: dict = {"tensors": {}}
    for key in dict.fromkeys(embeds):
        info["tensors"][key] = _encode(key, state[key], fmt, out)
    if head is not None and aliases.get(head, head) not in info["tensors"]:
        head = aliases.get(head, head)
        weight = state[head].double()
        derived = False
        if embeds and state[embeds[0]].shape[1] == weight.shape[1]:
            emb = state[embeds[0]].double()
            m = torch.linalg.lstsq(emb, weight).solution
            residual = float((emb @ m - weight).norm() / weight.norm().clamp_min(1e-30))
            if residual < _DERIVE_TOL:
                del out[head]
                out[head + _FROM_INPUT] = m.float().contiguous()
                info["tensors"][head] = {"format": "linear-from", "source": embeds[0], "fit_residual": residual,
                                         "dtype": str(state[head].dtype).replace("torch.", "")}
                derived = True
        if not derived:
            info["tensors"][head] = _encode(head, state[head], fmt, out)
    return out, info


def save_compact(model: nn.Module, filename: str, fmt: str) -> dict:
    """Write ``model``'s state to ``filename`` with compact tables; returns the storage description."""
    from safetensors.torch import save_file

    tensors, info = compact_state(model, fmt)
    save_file(tensors, filename)
    return info


@torch.no_grad()
def load_compact(model: nn.Module, filename: str, info: dict, device: str = "cpu") -> None:
    """Fill ``model`` from a file written by :func:`save_compact` (strict: no key missing or left over)."""
    from safetensors.torch import load_file

    tensors = load_file(filename, device=device)
    specs = info["tensors"]
    state = model.state_dict()
    decoded = {}
    for key, spec in specs.items():
        if spec["format"] != "linear-from":
            decoded[key] = _decoded(key, tensors, spec["format"])
    for key, spec in specs.items():
        if spec["format"] == "linear-from":
            decoded[key] = decoded[spec["source"]] @ tensors.pop(key + _FROM_INPUT).float()
    for key in specs:
        tensors.pop(key + _SCALE, None)
        tensors[key] = decoded[key].to(state[key].dtype)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    aliases = _aliases(state)
    missing = [k for k in missing if k not in aliases]
    if missing or unexpected:
        raise RuntimeError(f"{filename}: checkpoint does not match the model (missing {missing}, "
                           f"unexpected {unexpected})")
