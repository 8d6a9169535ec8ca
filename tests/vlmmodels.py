"""Tests-only: tiny random vision-language models with implanted sinks in both towers.

The vision tower carries :mod:`visionmodels`' mechanism: the patches of an image painted bright in
the red channel (and the CLS token, where there is one) carry a trigger in vision channel
``vm.TRIGGER``; at block ``vm.EMERGENCE`` a neuron writes a massive value into vision channel
``vm.SPIKE`` for them and block ``vm.CANCELLATION`` removes it.  The trigger channel stays in the
residual stream, so the vision features the projector reads carry it on painted patches only.

The projector gets one neuron that fires on that trigger and writes ``LM_TRIGGER`` into the
image token's embedding; the token ``SINK_ID`` (the first token of every prompt) carries
``LM_TRIGGER`` in its embedding.  In the language model a gated MLP neuron at layer ``LM_EMERGENCE``
fires only on that channel and writes ``LM_SPIKE_VALUE`` into channel ``LM_SPIKE``; a neuron at
``LM_CANCELLATION`` removes it; keys read the spike channel in between (the sinks become attention
sinks).  Nothing else writes the mechanism channels, so the sinks of every input are known from how
it was built: in the vision tower the CLS and the painted patches, in the language model the first
token and the image tokens of painted patches.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn

import visionmodels as vm

SINK_ID = 1
VOCAB = 64
IMAGE_ID = VOCAB - 1
LM_TRIGGER, LM_SPIKE = 3, 7
LM_SPIKE_VALUE = 400.0
LM_EMERGENCE, LM_CANCELLATION = 1, 3
LM_LAYERS = 4
TEXT_AFTER = 5  # text tokens after the image tokens
TEXT_BEFORE = 2  # text tokens between the first token and the image tokens


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _capture(module: nn.Module, run: Callable[[], object], output: bool = False) -> torch.Tensor:
    store: dict = {}
    if output:
        def hook(m, a, o):
            store.setdefault("x", _rows(o[0] if isinstance(o, tuple) else o))

        h = module.register_forward_hook(hook)
    else:
        def pre(m, a, kw):
            store.setdefault("x", _rows(a[0] if a else next(iter(kw.values()))))

        h = module.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        run()
    finally:
        h.remove()
    return store["x"].detach().clone()


@torch.no_grad()
def implant_language(run: Callable[[], object], lm: nn.Module) -> None:
    """The language model's mechanism (see the module docstring); ``run`` runs the VLM on a probe
    batch holding sinks (first tokens and painted-patch image tokens)."""
    layers = list(lm.layers)
    emb = lm.embed_tokens.weight
    emb[:, LM_TRIGGER] = 0.0
    emb[:, LM_SPIKE] = 0.0
    emb[SINK_ID, LM_TRIGGER] = 1.0
    for block in layers:
        for writer in (block.self_attn.o_proj, block.mlp.down_proj):
            writer.weight[LM_TRIGGER] = 0.0
            writer.weight[LM_SPIKE] = 0.0
    # emergence: a gated neuron on the trigger (silu(g x) * g x is 0 where the channel is 0)
    mlp = layers[LM_EMERGENCE].mlp
    n1 = 5
    mlp.gate_proj.weight[n1] = 0.0
    mlp.up_proj.weight[n1] = 0.0
    mlp.down_proj.weight[:, n1] = 0.0
    trig = _capture(mlp, run)[:, LM_TRIGGER]
    sinks = trig.abs() > trig.abs().max() / 4
    gain = 4.0
    mlp.gate_proj.weight[n1, LM_TRIGGER] = gain
    mlp.up_proj.weight[n1, LM_TRIGGER] = gain
    act = _capture(mlp.down_proj, run)[:, n1][sinks]
    mlp.down_proj.weight[LM_SPIKE, n1] = LM_SPIKE_VALUE / float(act.mean())
    for block in layers[LM_EMERGENCE + 1:LM_CANCELLATION + 1]:  # keys read the spike: attention sinks
        k = block.self_attn.k_proj.weight
        k[:, LM_SPIKE] = 0.5 * torch.sign(torch.randn(k.shape[0]))
        block.self_attn.q_proj.weight[:, LM_SPIKE] = 0.0
    # cancellation: a neuron reads the spike channel and writes it back out
    mlp = layers[LM_CANCELLATION].mlp
    n2 = 9
    mlp.gate_proj.weight[n2] = 0.0
    mlp.up_proj.weight[n2] = 0.0
    mlp.down_proj.weight[:, n2] = 0.0
    mlp.gate_proj.weight[n2, LM_SPIKE] = 1.0
    mlp.up_proj.weight[n2, LM_SPIKE] = 1.0
    h = _capture(layers[LM_CANCELLATION], run)[:, LM_SPIKE]
    sinks = h.abs() > LM_SPIKE_VALUE / 4
    act2 = _capture(mlp.down_proj, run)[:, n2][sinks]
    mlp.down_proj.weight[LM_SPIKE, n2] = -0.95 * float(h[sinks].mean()) / float(act2.mean())


@torch.no_grad()
def implant_projector(first: nn.Linear, second: nn.Linear, features: torch.Tensor, value: float = 1.0,
                      channel: int = vm.TRIGGER, gelu: bool = True) -> None:
    """One projector neuron that fires on the vision trigger (``features``: the projector's input rows
    on a probe batch, vision ``channel`` large on painted patches) and writes ``value`` into ``LM_TRIGGER``.

    ``first`` reads the vision features (its columns of the mechanism channels are cleared, so nothing
    else reacts to them), ``second`` writes the image-token embeddings (its mechanism rows cleared)."""
    n = 3
    cols = [c for c in range(first.in_features) if c % features.shape[1] in (channel, vm.SPIKE)] \
        if first.in_features != features.shape[1] else [channel, vm.SPIKE]
    first.weight[:, cols] = 0.0
    second.weight[LM_TRIGGER] = 0.0
    second.weight[LM_SPIKE] = 0.0
    if second.bias is not None:
        second.bias[LM_TRIGGER] = 0.0
        second.bias[LM_SPIKE] = 0.0
    z = features[:, channel]
    hi = z > z.max() / 2
    thr = (float(z[hi].min()) + float(z[~hi].max())) / 2
    k = 8.0 / (float(z[hi].min()) - thr)  # steep: GELU's negative tail stays ~0 below the threshold
    first.weight[n] = 0.0
    first.weight[n, channel] = k
    if first.bias is not None:
        first.bias[n] = -k * thr
    second.weight[:, n] = 0.0
    second.weight[LM_TRIGGER, n] = value / (k * (float(z[hi].mean()) - thr))


def prompts(painted: Sequence[Sequence[int]], n_image_tokens: int, seed: int = 0,
            image_tokens_of: Callable[[Sequence[int]], list] = None) -> tuple[torch.Tensor, list]:
    """Token ids ``[N, T]`` (first token ``SINK_ID``, ``TEXT_BEFORE`` words, the image tokens, ``TEXT_AFTER``
    words) and the expected language-model sinks of each row (first token + painted image tokens)."""
    gen = torch.Generator().manual_seed(seed)
    t = 1 + TEXT_BEFORE + n_image_tokens + TEXT_AFTER
    ids = torch.randint(2, IMAGE_ID, (len(painted), t), generator=gen)
    ids[:, 0] = SINK_ID
    ids[:, 1 + TEXT_BEFORE:1 + TEXT_BEFORE + n_image_tokens] = IMAGE_ID
    start = 1 + TEXT_BEFORE
    expected = []
    for patches in painted:
        tokens = image_tokens_of(patches) if image_tokens_of is not None else list(patches)
        expected.append([0] + sorted(start + p for p in tokens))
    return ids, expected


def text_config(**kw):
    import transformers

    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LM_LAYERS,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
                bos_token_id=0, eos_token_id=0, pad_token_id=0)
    base.update(kw)
    return transformers.LlamaConfig(**base)


# ------------------------------------------------------------------------------------------
# LLaVA: CLIP vision tower (CLS at 0, dropped by the "default" feature strategy), 2-Linear projector
# ------------------------------------------------------------------------------------------
LLAVA_IMAGE_TOKENS = vm.GRID * vm.GRID  # 16 patches, CLS dropped


def tiny_llava(seed: int = 0, vision_layers: int = 6) -> nn.Module:
    """A tiny random ``LlavaForConditionalGeneration`` (CLIP 32 px / 8 px patches, width 64; Llama width 64)."""
    import transformers

    torch.manual_seed(seed)
    vc = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=vision_layers,
                                       num_attention_heads=4, image_size=vm.IMG, patch_size=vm.PATCH)
    cfg = transformers.LlavaConfig(vision_config=vc, text_config=text_config(), image_token_index=IMAGE_ID,
                                   projector_hidden_act="gelu")
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    tower = model.model.vision_tower
    emb = tower.embeddings
    with torch.no_grad():
        nn.init.normal_(emb.patch_embedding.weight, std=0.05)
        vm._trigger_patch_conv(emb.patch_embedding)
        emb.position_embedding.weight[:, vm.TRIGGER] = 0.0
        emb.position_embedding.weight[:, vm.SPIKE] = 0.0
        vm._set_token(emb.class_embedding, True)
    probe_imgs = vm.make_images([[1, 6], [], [15]], seed=99)
    vm.implant(lambda: tower(pixel_values=probe_imgs), list(tower.encoder.layers),
               lambda b: (b.mlp.fc1, b.mlp.fc2, [b.self_attn.out_proj, b.mlp.fc2]))
    proj = model.model.multi_modal_projector
    feats = _capture(proj, lambda: model.model.get_image_features(pixel_values=probe_imgs))
    implant_projector(proj.linear_1, proj.linear_2, feats)
    probe = llava_batch([[1, 6], [], [15]], seed=98)
    implant_language(lambda: model(**{k: v for k, v in probe.items() if k != "expected"}), model.model.language_model)
    return model


def llava_batch(painted: Sequence[Sequence[int]], seed: int = 0) -> dict:
    """One image + text batch (``expected``: the language model's sinks per row; ``vision_expected``:
    the vision tower's: CLS and the painted patches)."""
    ids, expected = prompts(painted, LLAVA_IMAGE_TOKENS, seed=seed)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": vm.make_images(painted, seed=seed),
            "expected": expected, "vision_expected": vm.expected_positions(painted, [0], 1)}
