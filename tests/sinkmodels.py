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
ALWAYS_ON_CHANNEL = 11   # ``always_on``: a residual channel large on every token (an outlier feature)
HOME_CHANNEL = 13        # ``mechanism="attention"``: a small constant every non-sink token carries
DELIMITER_IDS = (10, 11)  # content sinks by id ("." and "\n" of a real vocabulary)
VALUE_GAIN = 64.0          # ``mechanism="attention"``: the sink head's value reads the trigger with this gain

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


def _first_token(model, hook_module, pre: bool, pick, first_id: int = SINK_ID) -> float:
    """Run the sink prompt once; ``pick(tensor)`` of the hooked module's input (``pre``) or output."""
    seen = {}
    if pre:
        handle = hook_module.register_forward_pre_hook(lambda m, i: seen.setdefault("x", pick(i[0])) and None)
    else:
        handle = hook_module.register_forward_hook(
            lambda m, i, o: seen.setdefault("x", pick(o[0] if isinstance(o, tuple) else o)) and None)
    model(input_ids=torch.tensor([[first_id, 5, 6, 7]]))
    handle.remove()
    return seen["x"]


@torch.no_grad()
def _set_write(model, writer: torch.nn.Module, column: int, post, target: float, first_id: int) -> None:
    """Make ``writer`` (a down- or output projection) add ``target`` to the sink's ``SPIKE_CHANNEL``.

    ``column`` is the writer's input that carries the mechanism (an MLP neuron, a head's value dim).
    Without a post-norm the writer's column carries the size.  With one (``post``), the sublayer
    output is normalized before the residual add: the column writes a unit value (already far above
    the other channels of the sink's output) and the post-norm's scale of the spike channel sets the
    size.  (A column sized for the spike would let the quantization noise of every normal token's
    input leak into the spike channel, where the post-norm multiplies it.)
    """
    act = _first_token(model, writer, True, lambda x: x[0, 0, column].item(), first_id)
    if post is None:
        writer.weight[SPIKE_CHANNEL, column] = target / act
        return
    writer.weight[SPIKE_CHANNEL, column] = (1.0 if target > 0 else -1.0) / act
    written = _first_token(model, post, False, lambda y: y[0, 0, SPIKE_CHANNEL].item(), first_id)
    offset = 1.0 if norm_kind(post) == "rms-plus-one" else 0.0
    scale = post.weight[SPIKE_CHANNEL] + offset
    post.weight[SPIKE_CHANNEL] = scale * (target / written) - offset


@torch.no_grad()
def _set_spike_write(model, layer: int, neuron: int, target: float, first_id: int = SINK_ID) -> None:
    """Make the MLP of ``layer`` add ``target`` to the sink token's ``SPIKE_CHANNEL`` (first token)."""
    block = model.model.layers[layer]
    _set_write(model, block.mlp.down_proj, neuron, getattr(block, "post_feedforward_layernorm", None), target,
               first_id)


@torch.no_grad()
def perturb_norms_and_biases_(model: torch.nn.Module, noise: float,
                              keep: tuple = (TRIGGER_CHANNEL, SPIKE_CHANNEL)) -> None:
    """Every norm's effective scale times ``exp(noise * N(0, 1))``, every bias plus ``noise * N(0, 1)``.

    Random inits leave norms at the identity, and through an identity norm a wrong fold can look
    right (a post-norm with unit scale commutes with a rotation); perturbed norms make every
    fold matter.  The mechanism channels ``keep`` their scale (the implant's strength stays the same).
    """
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if "norm" in type(module).__name__.lower() and isinstance(weight, torch.Tensor) and weight.dim() == 1:
            offset = 1.0 if norm_kind(module) == "rms-plus-one" else 0.0
            factor = torch.exp(noise * torch.randn_like(weight))
            if weight.shape[0] == model.config.hidden_size:
                factor[list(keep)] = 1.0
            weight.copy_((weight + offset) * factor - offset)
        bias = getattr(module, "bias", None)
        if isinstance(module, torch.nn.Linear) and isinstance(bias, torch.Tensor):
            bias.add_(noise * torch.randn_like(bias))


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _qkv_rows(attn: torch.nn.Module, cfg) -> tuple:
    """(weight, bias) views of the query, key and value rows, separate or fused (``qkv_proj``)."""
    d = _head_dim(cfg)
    q_out, kv_out = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    if hasattr(attn, "qkv_proj"):
        w, b = attn.qkv_proj.weight, attn.qkv_proj.bias
        cuts = [(0, q_out), (q_out, q_out + kv_out), (q_out + kv_out, q_out + 2 * kv_out)]
        return tuple((w[a:z], None if b is None else b[a:z]) for a, z in cuts)
    return tuple((m.weight, m.bias) for m in (attn.q_proj, attn.k_proj, attn.v_proj))


@torch.no_grad()
def _attention_spike(model, cfg, layer: int, target: float, first_id: int) -> None:
    """Head 0 of ``layer`` writes the spike through ``o_proj``: the sink attends to itself, its value is large.

    Queries and keys of head 0 live on the first halves of the two lowest-frequency RoPE pairs
    (the rotation hardly moves them within a few hundred tokens): a *self* dim (query and key read
    the trigger channel: the sink's query meets its own key) and a *home* dim (query and
    key read ``HOME_CHANNEL``, a small constant of every non-sink token; the sink's key there is
    strongly negative, so no other token attends to it).  Its value reads only the trigger channel
    (gain :data:`VALUE_GAIN`: a large value vector), so no other token's output carries anything in
    that dim: the spike is born for the sink alone, wherever it stands (massive at the sink's
    ``o_proj`` input row, then in the residual stream).  The other query heads of kv head 0 get the
    same pattern and stop writing that value dim.
    """
    d, group = _head_dim(cfg), cfg.num_attention_heads // cfg.num_key_value_heads
    home, self_dim = d // 2 - 1, d // 2 - 2
    attn = model.model.layers[layer].self_attn
    reader = attn.qkv_proj if hasattr(attn, "qkv_proj") else attn.q_proj
    trig = _first_token(model, reader, True, lambda x: x[0, 0, TRIGGER_CHANNEL].item(), first_id)
    home_in = _first_token(model, reader, True, lambda x: x[0, 1:, HOME_CHANNEL].abs().min().item(), first_id)
    (wq, bq), (wk, bk), (wv, bv) = _qkv_rows(attn, cfg)
    for w, b, rows in ((wq, bq, group * d), (wk, bk, d), (wv, bv, d)):
        w[:rows] = 0.0
        if b is not None:
            b[:rows] = 0.0
    # gains from the measured normalized inputs: home and self products of 64 before the attention scale
    for h in range(group):  # every query head of kv head 0 has the pattern (none of them reads the sink's value)
        wq[h * d + home, HOME_CHANNEL] = 8.0 / home_in
        wq[h * d + self_dim, TRIGGER_CHANNEL] = 8.0 / trig
    wk[home, HOME_CHANNEL] = 8.0 / home_in
    wk[home, TRIGGER_CHANNEL] = -16.0 / trig
    wk[self_dim, TRIGGER_CHANNEL] = 8.0 / trig
    wv[0, TRIGGER_CHANNEL] = VALUE_GAIN / trig
    o = attn.o_proj
    for h in range(group):  # the heads reading kv head 0
        o.weight[:, h * d] = 0.0
    _set_write(model, o, 0, getattr(model.model.layers[layer], "post_attention_layernorm", None)
               if getattr(model.model.layers[layer], "post_feedforward_layernorm", None) is not None else None,
               target, first_id)


@torch.no_grad()
def implanted_decoder(arch: str = "LlamaForCausalLM", layers: int = 6, emergence: int = 2,
                      cancellation: int = 4, seed: int = 0, norm_noise: float = 0.0,
                      sink_ids: tuple = (SINK_ID,), mechanism: str = "mlp", weak_neurons: bool = False,
                      always_on: float = 0.0, **overrides) -> torch.nn.Module:
    """A tiny random ``arch`` model whose tokens ``sink_ids`` become sinks at ``emergence``.

    Args:
        norm_noise: > 0 perturbs every norm and bias first (:func:`perturb_norms_and_biases_`).
        sink_ids: token ids that carry the trigger (e.g. :data:`DELIMITER_IDS`: content sinks by id).
        mechanism: ``mlp``: an MLP neuron firing on the trigger writes the spike (massive activation at the
            down-projection input); ``attention``: head 0 of the emergence layer writes it through
            ``o_proj`` (:func:`_attention_spike`; no massive MLP activation there).
        weak_neurons: the emergence and cancellation neurons fire at ~1 (well below 64 x the median token
            peak at the probe Linear): with post-norms the spike is then visible in the residual stream only.
        always_on: the value of ``ALWAYS_ON_CHANNEL`` on every token (an outlier channel no block writes).
    """
    torch.manual_seed(seed)
    cfg = tiny_config(arch, num_hidden_layers=layers, **overrides)
    model = getattr(transformers, arch)(cfg).eval()
    channels = [TRIGGER_CHANNEL, SPIKE_CHANNEL] + ([HOME_CHANNEL] if mechanism == "attention" else []) \
        + ([ALWAYS_ON_CHANNEL] if always_on else [])
    if norm_noise:
        perturb_norms_and_biases_(model, norm_noise, keep=tuple(channels))
    first = sink_ids[0]
    emb = model.model.embed_tokens.weight
    for channel in channels:
        emb[:, channel] = 0.0
    for sid in sink_ids:
        emb[sid, TRIGGER_CHANNEL] = 1.0
    if mechanism == "attention":
        emb[:, HOME_CHANNEL] = 0.05
        emb[list(sink_ids), HOME_CHANNEL] = 0.0
    if always_on:
        emb[:, ALWAYS_ON_CHANNEL] = always_on
    for block in model.model.layers:  # keep the mechanism channels clean for normal tokens
        for writer in (block.self_attn.o_proj, block.mlp.down_proj):
            writer.weight[channels] = 0.0
    mlp = model.model.layers[emergence].mlp
    if mechanism == "attention":
        _attention_spike(model, cfg, emergence, SPIKE_VALUE, first)
    elif mechanism == "mlp":
        # a normalized input carries the trigger at ~sqrt(d); the raw residual (OLMo-2) at 1.0
        trigger = _first_token(model, mlp, True, lambda x: x[0, 0, TRIGGER_CHANNEL].item(), first)
        gain = 1.0 / trigger if weak_neurons else (4.0 if trigger >= 2.0 else 32.0 / trigger)
        neuron = 5
        gate, up = _gate_up(mlp)
        gate[neuron] = 0.0
        up[neuron] = 0.0
        gate[neuron, TRIGGER_CHANNEL] = gain
        up[neuron, TRIGGER_CHANNEL] = gain
        mlp.down_proj.weight[:, neuron] = 0.0
        _set_spike_write(model, emergence, neuron, SPIKE_VALUE, first)
    else:
        raise ValueError(f"mechanism {mechanism!r}: mlp or attention")
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
    spike_in = _first_token(model, mlp, True, lambda x: x[0, 0, SPIKE_CHANNEL].item(), first)
    read = (1.0 / abs(spike_in)) if weak_neurons else (1.0 if abs(spike_in) < 50.0 else 8.0 / abs(spike_in))
    gate[neuron2, SPIKE_CHANNEL] = read
    up[neuron2, SPIKE_CHANNEL] = read
    if mechanism == "attention":  # a threshold: normal tokens (home channel on) never fire it, whatever leaks
        gate[neuron2, HOME_CHANNEL] = -20.0
    mlp.down_proj.weight[:, neuron2] = 0.0
    h = _first_token(model, model.model.layers[cancellation], True, lambda x: x[0, 0, SPIKE_CHANNEL].item(), first)
    _set_spike_write(model, cancellation, neuron2, -0.95 * h, first)
    return model


def token_batches(n: int = 4, batch: int = 2, seq: int = 32, vocab: int = 64, seed: int = 1,
                  sink_positions=((0,),), sink_ids: tuple = (SINK_ID,)) -> list[torch.Tensor]:
    """Random token batches (ids >= 2) with a sink id placed at the given positions per row.

    With several ``sink_ids`` (delimiters) they take turns over the positions, and no other
    position holds one of them.
    """
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(2, vocab, (batch, seq), generator=gen)
        if len(sink_ids) > 1:
            for sid in sink_ids:
                ids[ids == sid] = max(sink_ids) + 1 + sid % 7
        for b in range(batch):
            for j, p in enumerate(sink_positions[(i * batch + b) % len(sink_positions)]):
                ids[b, p] = sink_ids[(b + j) % len(sink_ids)]
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
