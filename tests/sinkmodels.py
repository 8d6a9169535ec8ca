"""Tests-only: tiny random decoders with an implanted massive-activation ("sink") mechanism.

A chosen token id carries a trigger channel in its embedding; at the emergence
layer one MLP neuron fires only on that trigger and writes a massive value into
a fixed residual channel (``SPIKE_CHANNEL``); at the cancellation layer another
neuron reads that channel and writes it back out.  Keys read the spike channel
so the sink token also becomes an attention sink, as in real LLMs.

Works on every decoder family of :data:`FAMILIES`: fused projections (Phi-3's
``qkv_proj`` / ``gate_up_proj``: the neuron's gate and up rows are the two halves of
``gate_up_proj``, the key rows follow the query rows of ``qkv_proj``), and post-norms
(Gemma-2/3's sandwich norms, OLMo-2): the MLP output is normalized before the residual
add, so the size of the write is set by the post-norm's scale of the spike channel, not
by the down-projection.  Where the MLP reads the raw residual (OLMo-2: trigger 1.0, not
~sqrt(d) after a norm) the trigger gain is raised so the neuron fires as strongly.
"""
from __future__ import annotations

import torch
import transformers

from vtquant.adapters.decoder_layout import norm_kind
from vtquant.adapters.hf_decoder import tiny_config

SINK_ID = 1
TRIGGER_CHANNEL = 3
SPIKE_CHANNEL = 7
SPIKE_VALUE = 400.0

FAMILIES = ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GemmaForCausalLM",
            "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM", "Olmo2ForCausalLM"]


def _gate_up(mlp: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate and up weight rows (views), separate or fused (``gate_up_proj``: gate first, then up)."""
    if hasattr(mlp, "gate_up_proj"):
        w = mlp.gate_up_proj.weight
        half = w.shape[0] // 2
        return w[:half], w[half:]
    return mlp.gate_proj.weight, mlp.up_proj.weight


def _query_key(attn: torch.nn.Module, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and key weight rows (views), separate or fused (``qkv_proj``: q, then k, then v)."""
    if hasattr(attn, "qkv_proj"):
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        q_out, kv_out = cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim
        w = attn.qkv_proj.weight
        return w[:q_out], w[q_out:q_out + kv_out]
    return attn.q_proj.weight, attn.k_proj.weight


def _first_token(model, hook_module, pre: bool, pick) -> float:
    """Run the sink prompt once; ``pick(tensor)`` of the hooked module's input (``pre``) or output."""
    seen = {}
    if pre:
        handle = hook_module.register_forward_pre_hook(lambda m, i: seen.setdefault("x", pick(i[0])) and None)
    else:
        handle = hook_module.register_forward_hook(
            lambda m, i, o: seen.setdefault("x", pick(o[0] if isinstance(o, tuple) else o)) and None)
    model(input_ids=torch.tensor([[SINK_ID, 5, 6, 7]]))
    handle.remove()
    return seen["x"]


@torch.no_grad()
def _set_spike_write(model, layer: int, neuron: int, target: float) -> None:
    """Make the MLP of ``layer`` add ``target`` to the sink token's ``SPIKE_CHANNEL`` (first token).

    Without a post-norm the down-projection column carries the size.  With one, the MLP output is
    normalized before the residual add: the neuron writes a unit value (already far above the
    other channels of the sink's MLP output) and the post-norm's scale of the spike channel sets
    the size.  (A down-projection column sized for the spike would let the quantization noise of
    every normal token's neuron leak into the spike channel, where the post-norm multiplies it.)
    """
    block = model.model.layers[layer]
    down = block.mlp.down_proj
    act = _first_token(model, down, True, lambda x: x[0, 0, neuron].item())
    post = getattr(block, "post_feedforward_layernorm", None)
    if post is None:
        down.weight[SPIKE_CHANNEL, neuron] = target / act
        return
    down.weight[SPIKE_CHANNEL, neuron] = (1.0 if target > 0 else -1.0) / act
    written = _first_token(model, post, False, lambda y: y[0, 0, SPIKE_CHANNEL].item())
    offset = 1.0 if norm_kind(post) == "rms-plus-one" else 0.0
    scale = post.weight[SPIKE_CHANNEL] + offset
    post.weight[SPIKE_CHANNEL] = scale * (target / written) - offset


@torch.no_grad()
def perturb_norms_and_biases_(model: torch.nn.Module, noise: float) -> None:
    """Every norm's effective scale times ``exp(noise * N(0, 1))``, every bias plus ``noise * N(0, 1)``.

    Random inits leave norms at the identity, and through an identity norm a wrong fold can look
    right (a post-norm with unit scale commutes with a rotation); perturbed norms make every
    fold matter.  The two mechanism channels keep their scale (the implant's strength stays the same).
    """
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if "norm" in type(module).__name__.lower() and isinstance(weight, torch.Tensor) and weight.dim() == 1:
            offset = 1.0 if norm_kind(module) == "rms-plus-one" else 0.0
            factor = torch.exp(noise * torch.randn_like(weight))
            if weight.shape[0] == model.config.hidden_size:
                factor[[TRIGGER_CHANNEL, SPIKE_CHANNEL]] = 1.0
            weight.copy_((weight + offset) * factor - offset)
        bias = getattr(module, "bias", None)
        if isinstance(module, torch.nn.Linear) and isinstance(bias, torch.Tensor):
            bias.add_(noise * torch.randn_like(bias))


@torch.no_grad()
def implanted_decoder(arch: str = "LlamaForCausalLM", layers: int = 6, emergence: int = 2,
                      cancellation: int = 4, seed: int = 0, norm_noise: float = 0.0,
                      **overrides) -> torch.nn.Module:
    """A tiny random ``arch`` model whose token ``SINK_ID`` becomes a sink at ``emergence``.

    ``norm_noise`` > 0 perturbs every norm and bias first (:func:`perturb_norms_and_biases_`).
    """
    torch.manual_seed(seed)
    cfg = tiny_config(arch, num_hidden_layers=layers, **overrides)
    model = getattr(transformers, arch)(cfg).eval()
    if norm_noise:
        perturb_norms_and_biases_(model, norm_noise)
    emb = model.model.embed_tokens.weight
    emb[:, TRIGGER_CHANNEL] = 0.0
    emb[:, SPIKE_CHANNEL] = 0.0
    emb[SINK_ID, TRIGGER_CHANNEL] = 1.0
    for block in model.model.layers:  # keep the two mechanism channels clean for normal tokens
        for writer in (block.self_attn.o_proj, block.mlp.down_proj):
            writer.weight[TRIGGER_CHANNEL] = 0.0
            writer.weight[SPIKE_CHANNEL] = 0.0
    mlp = model.model.layers[emergence].mlp
    # a normalized input carries the trigger at ~sqrt(d); the raw residual (OLMo-2) at 1.0
    trigger = _first_token(model, mlp, True, lambda x: x[0, 0, TRIGGER_CHANNEL].item())
    gain = 4.0 if trigger >= 2.0 else 32.0 / trigger
    neuron = 5
    gate, up = _gate_up(mlp)
    gate[neuron] = 0.0
    up[neuron] = 0.0
    gate[neuron, TRIGGER_CHANNEL] = gain
    up[neuron, TRIGGER_CHANNEL] = gain
    mlp.down_proj.weight[:, neuron] = 0.0
    _set_spike_write(model, emergence, neuron, SPIKE_VALUE)
    # keys see the spike channel: the sink token becomes the attention sink
    for block in model.model.layers[emergence + 1:cancellation + 1]:
        q, k = _query_key(block.self_attn, cfg)
        k[:, SPIKE_CHANNEL] = 0.5 * torch.sign(torch.randn(k.shape[0]))
        q[:, SPIKE_CHANNEL] = 0.0
    # cancellation neuron
    mlp = model.model.layers[cancellation].mlp
    neuron2 = 9
    gate, up = _gate_up(mlp)
    gate[neuron2] = 0.0
    up[neuron2] = 0.0
    # the neuron reads the spike channel: ~sqrt(d) after a norm, SPIKE_VALUE in the raw residual (OLMo-2)
    spike_in = _first_token(model, mlp, True, lambda x: x[0, 0, SPIKE_CHANNEL].item())
    read = 1.0 if abs(spike_in) < 50.0 else 8.0 / abs(spike_in)
    gate[neuron2, SPIKE_CHANNEL] = read
    up[neuron2, SPIKE_CHANNEL] = read
    mlp.down_proj.weight[:, neuron2] = 0.0
    h = _first_token(model, model.model.layers[cancellation], True, lambda x: x[0, 0, SPIKE_CHANNEL].item())
    _set_spike_write(model, cancellation, neuron2, -0.95 * h)
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
