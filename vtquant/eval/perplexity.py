"""Token-level perplexity over non-overlapping fixed-length chunks.

Protocol (stated in every output): the text is tokenized once; consecutive,
non-overlapping chunks of ``seq_len`` tokens are scored independently; each chunk
predicts its tokens 2..L from the previous ones, so ``L - 1`` tokens per chunk
count; perplexity = exp(mean negative log-likelihood over all counted tokens).
BOS policy ``none``: nothing is prepended (SmolLM2's tokenizer adds no BOS, so
the chunk's first token, whatever it is, is the sink, and it is not scored);
``prepend``: the tokenizer's BOS token id starts every chunk of ``L - 1`` text
tokens, and every text token is scored (the BOS itself is never a target).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def protocol(seq_len: int, n_chunks: int, bos: str) -> str:
    return (f"token-level perplexity, {n_chunks} non-overlapping chunks x {seq_len} tokens, "
            f"BOS policy: {bos}")


def make_chunks(token_ids: torch.Tensor, seq_len: int, max_chunks: Optional[int], bos: str = "none",
                bos_id: Optional[int] = None) -> torch.Tensor:
    """Cut ``token_ids`` into ``[n, seq_len]`` chunks following the BOS policy."""
    from ..data import chunk_tokens

    if bos not in ("none", "prepend"):
        raise ValueError(f"BOS policy {bos!r}: use 'none' or 'prepend'")
    if bos == "prepend":
        if bos_id is None:
            raise ValueError("BOS policy 'prepend' needs a tokenizer with a BOS token")
        body = chunk_tokens(token_ids, seq_len - 1, max_chunks)
        return torch.cat([torch.full((body.shape[0], 1), bos_id, dtype=body.dtype), body], dim=1)
    return chunk_tokens(token_ids, seq_len, max_chunks)


@torch.no_grad()
def perplexity(model: torch.nn.Module, chunks: torch.Tensor, batch_size: int = 4,
               quiet: bool = False, desc: str = "perplexity") -> float:
    """Perplexity of ``model`` on ``chunks`` ``[n, L]`` (see the module docstring)."""
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, chunks.shape[0], batch_size), desc=desc, disable=quiet, leave=False):
        ids = chunks[start:start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        pred = logits[:, :-1]
        target = ids[:, 1:]
        nll = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="sum")
        total_nll += float(nll)
        total_tokens += target.numel()
    return math.exp(total_nll / total_tokens)
