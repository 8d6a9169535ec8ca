"""Tests-only: tiny random decoders with an implanted massive-activation ("sink") mechanism.

A chosen token id carries a trigger channel in its embedding; at the emergence
layer one MLP neuron fires only on that trigger and writes a massive value into
a fixed residual channel (``SPIKE_CHANNEL``); at the cancellation layer another
neuron reads that channel and writes it back out.  Keys read the spike channel
so the sink token also becomes an attention sink, as in real LLMs.
"""
from __future__ import annotations

import torch
import transformers

from vtquant.adapters.hf_decoder import tiny_config

SINK_ID = 1
TRIGGER_CHANNEL = 3
SPIKE_CHANNEL = 7
SPIKE_VALUE = 400.0


@torch.no_grad()
def implanted_decoder(arch: str = "LlamaForCausalLM", layers: int = 6, emergence: int = 2,
                      cancellation: int = 4, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random ``arch`` model whose token ``SINK_ID`` becomes a sink at ``emergence``."""
    torch.manual_seed(seed)
    cfg = tiny_config(arch, num_hidden_layers=layers, **overrides)
    model = getattr(transformers, arch)(cfg).eval()
    emb = model.model.embed_tokens.weight
    emb[:, TRIGGER_CHANNEL] = 0.0
    emb[:, SPIKE_CHANNEL] = 0.0
    emb[SINK_ID, TRIGGER_CHANNEL] = 1.0
    for block in model.model.layers:  # keep the two mechanism channels clean for normal tokens
        for writer in (block.self_attn.o_proj, block.mlp.down_proj):
            writer.weight[TRIGGER_CHANNEL] = 0.0
            writer.weight[SPIKE_CHANNEL] = 0.0
    gain = 4.0
    mlp = model.model.layers[emergence].mlp
    neuron = 5
    mlp.gate_proj.weight[neuron] = 0.0
    mlp.up_proj.weight[neuron] = 0.0
    mlp.gate_proj.weight[neuron, TRIGGER_CHANNEL] = gain
    mlp.up_proj.weight[neuron, TRIGGER_CHANNEL] = gain
    mlp.down_proj.weight[:, neuron] = 0.0
    # measure the neuron's activation on the sink token, then scale the write to SPIKE_VALUE
    acts = {}
    handle = mlp.down_proj.register_forward_pre_hook(lambda m, i: acts.setdefault("x", i[0][0, 0, neuron].item()) and None)
    model(input_ids=torch.tensor([[SINK_ID, 5, 6, 7]]))
    handle.remove()
    mlp.down_proj.weight[SPIKE_CHANNEL, neuron] = SPIKE_VALUE / acts["x"]
    # keys see the spike channel: the sink token becomes the attention sink
    for block in model.model.layers[emergence + 1:cancellation + 1]:
        k = block.self_attn.k_proj.weight
        k[:, SPIKE_CHANNEL] = 0.5 * torch.sign(torch.randn(k.shape[0]))
        q = block.self_attn.q_proj.weight
        q[:, SPIKE_CHANNEL] = 0.0
    # cancellation neuron
    mlp = model.model.layers[cancellation].mlp
    neuron2 = 9
    mlp.gate_proj.weight[neuron2] = 0.0
    mlp.up_proj.weight[neuron2] = 0.0
    mlp.gate_proj.weight[neuron2, SPIKE_CHANNEL] = 1.0
    mlp.up_proj.weight[neuron2, SPIKE_CHANNEL] = 1.0
    mlp.down_proj.weight[:, neuron2] = 0.0
    acts.clear()
    res = {}
    handle = mlp.down_proj.register_forward_pre_hook(lambda m, i: acts.setdefault("x", i[0][0, 0, neuron2].item()) and None)
    handle2 = model.model.layers[cancellation].register_forward_pre_hook(
        lambda m, i: res.setdefault("h", i[0][0, 0, SPIKE_CHANNEL].item()) and None)
    model(input_ids=torch.tensor([[SINK_ID, 5, 6, 7]]))
    handle.remove(), handle2.remove()
    mlp.down_proj.weight[SPIKE_CHANNEL, neuron2] = -0.95 * res["h"] / acts["x"]
    return model


def token_batches(n: int = 4, batch: int = 2, seq: int = 32, vocab: int = 64, seed: int = 1,
                  sink_positions=((0,),)) -> list[torch.Tensor]:
    """Random token batches (ids >= 2) with ``SINK_ID`` placed at the given positions per row."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(2, vocab, (batch, seq), generator=gen)
        for b in range(batch):
            for p in sink_positions[(i * batch + b) % len(sink_positions)]:
                ids[b, p] = SINK_ID
        out.append(ids)
    return out


def rel_logit_error(ref: torch.nn.Module, model: torch.nn.Module, batches) -> float:
    """Relative L2 error of ``model``'s logits against ``ref``'s over ``batches`` of token ids."""
    num = den = 0.0
    with torch.no_grad():
        for x in batches:
            a, b = ref(input_ids=x).logits, model(input_ids=x).logits
            num += float((a - b).pow(2).sum())
            den += float(a.pow(2).sum())
    return (num / den) ** 0.5
