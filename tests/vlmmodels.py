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
    sinks = trig > trig.max() / 2
    gain = 4.0
    mlp.gate_proj.weight[n1, LM_TRIGGER] = gain
    mlp.up_proj.weight[n1, LM_TRIGGER] = gain
    if mlp.gate_proj.bias is not None:  # MLP biases (mlp_bias): a threshold, silent below it
        thr = (float(trig[sinks].min()) + float(trig[~sinks].max())) / 2
        mlp.gate_proj.weight[n1, LM_TRIGGER] = 4 * gain  # steep, as below
        mlp.gate_proj.bias[n1] = -4 * gain * thr
        mlp.up_proj.bias[n1] = 0.0
        mlp.down_proj.bias[[LM_TRIGGER, LM_SPIKE]] = 0.0
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
    if mlp.gate_proj.bias is not None:
        spike_in = _capture(mlp, run)[:, LM_SPIKE]
        big = spike_in > spike_in.max() / 2
        mlp.gate_proj.weight[n2, LM_SPIKE] = 4.0  # steep: SiLU's negative tail stays ~0 below the threshold
        mlp.gate_proj.bias[n2] = -4.0 * (float(spike_in[big].min()) + float(spike_in[~big].max())) / 2
        mlp.up_proj.bias[n2] = 0.0
        mlp.down_proj.bias[[LM_TRIGGER, LM_SPIKE]] = 0.0
    h = _capture(layers[LM_CANCELLATION], run)[:, LM_SPIKE]
    sinks = h.abs() > LM_SPIKE_VALUE / 4
    act2 = _capture(mlp.down_proj, run)[:, n2][sinks]
    mlp.down_proj.weight[LM_SPIKE, n2] = -0.95 * float(h[sinks].mean()) / float(act2.mean())


@torch.no_grad()
def implant_projector(first: nn.Linear, second: nn.Linear, features: torch.Tensor, value: float = 1.0,
                      channel: int = vm.TRIGGER, out_channel: int = LM_TRIGGER, clear: bool = True) -> None:
    """One projector neuron that fires on the vision trigger (``features``: the projector's input rows
    on a probe batch, vision ``channel`` large on painted patches) and writes ``value`` into ``LM_TRIGGER``.

    ``first`` reads the vision features (its columns of the mechanism channels are cleared, so nothing
    else reacts to them), ``second`` writes the image-token embeddings (its mechanism rows cleared)."""
    n = 3
    if clear:
        first.weight[:, [channel, vm.SPIKE]] = 0.0
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
    second.weight[out_channel, n] = value / (k * (float(z[hi].mean()) - thr))


def prompts(painted: Sequence[Sequence[int]], n_image_tokens: int, seed: int = 0,
            image_tokens_of: Callable[[Sequence[int]], list] = None) -> tuple[torch.Tensor, list]:
    """Token ids ``[N, T]`` (first token ``SINK_ID``, ``TEXT_BEFORE`` words, the image tokens, ``TEXT_AFTER``
    words) and the expected language-model sinks of each row (first token + painted image tokens)."""
    gen = torch.Generator().manual_seed(seed)
    t = 1 + TEXT_BEFORE + n_image_tokens + TEXT_AFTER
    ids = torch.randint(2, VOCAB - 4, (len(painted), t), generator=gen)  # the top 4 ids are special
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
    implant_language(lambda: model(**vlm_inputs(probe)), model.model.language_model)
    return model


def llava_batch(painted: Sequence[Sequence[int]], seed: int = 0) -> dict:
    """One image + text batch (``expected``: the language model's sinks per row; ``vision_expected``:
    the vision tower's: CLS and the painted patches)."""
    ids, expected = prompts(painted, LLAVA_IMAGE_TOKENS, seed=seed)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": vm.make_images(painted, seed=seed),
            "expected": expected, "vision_expected": vm.expected_positions(painted, [0], 1)}


# ------------------------------------------------------------------------------------------
# Idefics3 (SmolVLM): SigLIP-like vision tower (no CLS), pixel shuffle 2x2 + one Linear connector
# ------------------------------------------------------------------------------------------
IDEFICS3_SCALE = 2
CLEAN, CLEAN_VALUE = 11, 20.0  # a vision channel the last block writes on painted patches only
IDEFICS3_IMAGE_TOKENS = vm.GRID * vm.GRID // IDEFICS3_SCALE ** 2  # 4 tokens of 2 x 2 patches


def idefics3_token_patches(model: nn.Module) -> list[list[int]]:
    """The patches each image token of the connector's pixel shuffle reads (traced through the shuffle)."""
    index = torch.arange(vm.GRID * vm.GRID, dtype=torch.float32).view(1, -1, 1)
    shuffled = model.model.connector.pixel_shuffle(index, IDEFICS3_SCALE)[0]
    return [[int(v) for v in row] for row in shuffled]


def tiny_idefics3(seed: int = 0, family: str = "Idefics3") -> nn.Module:
    """A tiny random ``Idefics3ForConditionalGeneration`` (``family="SmolVLM"``: ``SmolVLMForConditionalGeneration``,
    the same structure) with implanted sinks.

    The connector has no neuron of its own (pixel shuffle, then one Linear), so it cannot threshold the
    vision trigger; the language model's MLPs get biases (``mlp_bias``) and its mechanism neurons fire
    above a threshold instead."""
    import transformers

    torch.manual_seed(seed)
    vc = getattr(transformers, f"{family}VisionConfig")(hidden_size=64, intermediate_size=256, num_hidden_layers=6,
                                                        num_attention_heads=4, image_size=vm.IMG, patch_size=vm.PATCH)
    cfg = getattr(transformers, f"{family}Config")(vision_config=vc, text_config=text_config(mlp_bias=True).to_dict(),
                                                   image_token_id=IMAGE_ID, scale_factor=IDEFICS3_SCALE, pad_token_id=0)
    model = getattr(transformers, f"{family}ForConditionalGeneration")(cfg).eval()
    tower = model.model.vision_model
    emb = tower.embeddings
    with torch.no_grad():
        nn.init.normal_(emb.patch_embedding.weight, std=0.05)
        vm._trigger_patch_conv(emb.patch_embedding)
        emb.position_embedding.weight[:, vm.TRIGGER] = 0.0
        emb.position_embedding.weight[:, vm.SPIKE] = 0.0
    probe_imgs = vm.make_images([[1, 6], [], [15]], seed=99)
    vm.implant(lambda: tower(pixel_values=probe_imgs), list(tower.encoder.layers),
               lambda b: (b.mlp.fc1, b.mlp.fc2, [b.self_attn.out_proj, b.mlp.fc2]))
    blocks = list(tower.encoder.layers)
    with torch.no_grad():  # the last block's neuron: CLEAN = CLEAN_VALUE on painted patches, exactly 0 elsewhere
        for block in blocks:
            for writer in (block.self_attn.out_proj, block.mlp.fc2):
                writer.weight[CLEAN] = 0.0
                writer.bias[CLEAN] = 0.0
        emb.patch_embedding.weight[CLEAN] = 0.0
        emb.patch_embedding.bias[CLEAN] = 0.0
        emb.position_embedding.weight[:, CLEAN] = 0.0
        last = blocks[-1].mlp
        features = _capture(last.fc1, lambda: tower(pixel_values=probe_imgs))
        implant_projector(last.fc1, last.fc2, features, value=CLEAN_VALUE, out_channel=CLEAN, clear=False)
    proj = model.model.connector.modality_projection.proj
    width = vc.hidden_size
    with torch.no_grad():  # the connector: the LM trigger is the sum of the 4 patches' CLEAN channel
        feats = _capture(proj, lambda: model.model.get_image_features(pixel_values=probe_imgs[:, None]))
        cols = [j * width + c for j in range(IDEFICS3_SCALE ** 2) for c in (vm.TRIGGER, vm.SPIKE, CLEAN)]
        proj.weight[:, cols] = 0.0
        proj.weight[LM_TRIGGER] = 0.0
        proj.weight[LM_SPIKE] = 0.0
        trig = feats[:, [j * width + CLEAN for j in range(IDEFICS3_SCALE ** 2)]]
        one = float(trig.max())  # one painted patch's CLEAN channel after the post-LayerNorm
        for j in range(IDEFICS3_SCALE ** 2):
            proj.weight[LM_TRIGGER, j * width + CLEAN] = 10.0 / one  # saturates the normalized trigger
    probe = idefics3_batch(model, [[1, 6], [], [15]], seed=98)
    implant_language(lambda: model(**vlm_inputs(probe)), model.model.text_model)
    return model


def vlm_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "pixel_values",
                                                    "pixel_attention_mask", "image_grid_thw", "mm_token_type_ids")}


def idefics3_batch(model: nn.Module, painted: Sequence[Sequence[int]], seed: int = 0) -> dict:
    """One image + text batch: an image per prompt (``pixel_values [N, 1, 3, H, W]``); ``expected``: the
    language model's sinks (first token, image tokens that read a painted patch), ``vision_expected``:
    the vision tower's (the painted patches; no CLS)."""
    token_patches = idefics3_token_patches(model)

    def tokens(patches):
        return [j for j, ps in enumerate(token_patches) if set(ps) & set(patches)]

    ids, expected = prompts(painted, IDEFICS3_IMAGE_TOKENS, seed=seed, image_tokens_of=tokens)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": vm.make_images(painted, seed=seed)[:, None], "expected": expected,
            "vision_expected": vm.expected_positions(painted, [], 0)}


# ------------------------------------------------------------------------------------------
# Qwen2-VL: its own ViT (Conv3d patches of 2 frames, 2-D rotary, no CLS, the images of a batch packed
# into one sequence), a patch merger (LayerNorm, 2 x 2 patches -> Linear, GELU, Linear), M-RoPE decoder
# ------------------------------------------------------------------------------------------
QWEN_MERGE = 2
QWEN_IMAGE_TOKENS = vm.GRID * vm.GRID // QWEN_MERGE ** 2  # 4 tokens of 2 x 2 patches
QWEN_TEMPORAL = 2


def qwen_patch_order() -> list[int]:
    """Row-major patch index (``vm.make_images``' numbering) of each position of Qwen2-VL's patch sequence
    (its processor orders the patches by 2 x 2 merge window)."""
    g, m = vm.GRID, QWEN_MERGE
    return [(bh * m + mh) * g + (bw * m + mw) for bh in range(g // m) for bw in range(g // m)
            for mh in range(m) for mw in range(m)]


def qwen_pixels(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, 3, H, W]`` images -> (flattened patches ``[N * H/P * W/P, 3 * 2 * P * P]``, grid_thw ``[N, 3]``),
    as Qwen2-VL's image processor lays them out (each image repeated over the 2 frames of a temporal patch)."""
    n, c, h, w = images.shape
    p, m, t = vm.PATCH, QWEN_MERGE, QWEN_TEMPORAL
    gh, gw = h // p, w // p
    x = images[:, None].repeat(1, t, 1, 1, 1)  # [N, T, C, H, W]
    x = x.reshape(n, 1, t, c, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)  # N, grid_t, bh, bw, mh, mw, C, T, P, P
    flat = x.reshape(n * gh * gw, c * t * p * p)
    return flat, torch.tensor([[1, gh, gw]] * n)


def tiny_qwen2vl(seed: int = 0) -> nn.Module:
    """A tiny random ``Qwen2VLForConditionalGeneration`` (ViT width 64, 6 blocks, 8 px patches; M-RoPE
    decoder width 64, 4 layers) with implanted sinks: painted patches in the vision tower (no CLS), the
    first token and the image tokens that merge a painted patch in the language model."""
    import transformers

    torch.manual_seed(seed)
    vc = dict(depth=6, embed_dim=64, hidden_size=64, num_heads=4, mlp_ratio=4, in_channels=3, patch_size=vm.PATCH,
              spatial_merge_size=QWEN_MERGE, temporal_patch_size=QWEN_TEMPORAL)
    tc = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LM_LAYERS,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    cfg = transformers.Qwen2VLConfig(vision_config=vc, text_config=tc, image_token_id=IMAGE_ID,
                                     video_token_id=VOCAB - 2, vision_start_token_id=VOCAB - 3,
                                     vision_end_token_id=VOCAB - 4)
    model = transformers.Qwen2VLForConditionalGeneration(cfg).eval()
    visual = model.model.visual
    blocks = list(visual.blocks)
    with torch.no_grad():
        nn.init.normal_(visual.patch_embed.proj.weight, std=0.2)  # no position embedding: patches need scale
        vm._trigger_patch_conv(visual.patch_embed.proj)
    probe_imgs = vm.make_images([[1, 6], [], [15]], seed=99)
    px, grid = qwen_pixels(probe_imgs)
    run_visual = lambda: visual(px, grid_thw=grid)  # noqa: E731
    vm.implant(run_visual, blocks, lambda b: (b.mlp.fc1, b.mlp.fc2, [b.attn.proj, b.mlp.fc2]))
    with torch.no_grad():  # the last block writes CLEAN on painted patches only (see tiny_idefics3)
        for block in blocks:
            for writer in (block.attn.proj, block.mlp.fc2):
                writer.weight[CLEAN] = 0.0
                writer.bias[CLEAN] = 0.0
        visual.patch_embed.proj.weight[CLEAN] = 0.0
        last = blocks[-1].mlp
        implant_projector(last.fc1, last.fc2, _capture(last.fc1, run_visual), value=CLEAN_VALUE, out_channel=CLEAN,
                          clear=False)
    _implant_merger(visual, run_visual, vc["embed_dim"])
    probe = qwen2vl_batch([[1, 6], [], [15]], seed=98)
    implant_language(lambda: model(**vlm_inputs(probe)), model.model.language_model)
    return model


@torch.no_grad()
def _implant_merger(visual: nn.Module, run_visual: Callable[[], object], width: int) -> None:
    """Qwen's patch merger: one GELU neuron on the sum of its 4 patches' CLEAN channel (after ``ln_q``)
    writes ``LM_TRIGGER`` (10: the language model's normalized trigger saturates, every image sink alike)."""
    first, second = visual.merger.mlp[0], visual.merger.mlp[2]
    cols = [j * width + CLEAN for j in range(QWEN_MERGE ** 2)]
    z = _capture(first, run_visual)[:, cols].sum(dim=1)
    first.weight[:, [j * width + c for j in range(QWEN_MERGE ** 2) for c in (vm.TRIGGER, vm.SPIKE, CLEAN)]] = 0.0
    second.weight[LM_TRIGGER] = 0.0
    second.weight[LM_SPIKE] = 0.0
    second.bias[[LM_TRIGGER, LM_SPIKE]] = 0.0
    hi = z > z.max() / 2
    thr = (float(z[hi].min()) + float(z[~hi].max())) / 2
    k = 8.0 / (float(z[hi].min()) - thr)
    n = 3
    first.weight[n] = 0.0
    first.weight[n, cols] = k
    first.bias[n] = -k * thr
    second.weight[:, n] = 0.0
    second.weight[LM_TRIGGER, n] = 10.0 / (k * (float(z[hi].mean()) - thr))


@torch.no_grad()
def _swiglu_neuron(mlp: nn.Module, run: Callable[[], object], read: int, write: int, value: float) -> None:
    """A saturating neuron pair of a biased SwiGLU MLP (Qwen2.5-VL's ViT), as :func:`visionmodels.implant`
    does with GELU: ``silu(y) - silu(y - A)`` with ``y = g (x_read - thr)`` (up = 1) is 0 below the threshold
    and ``A`` on every token above it (the weakest reaches ``3 A``), so channel ``write`` gets exactly
    ``value`` on every sink (``A = vm.EMERGE_ACT``)."""
    a = vm.EMERGE_ACT
    pair = {vm.TRIGGER: (5, 6), vm.SPIKE: (9, 10)}[read] if write != CLEAN else (13, 14)
    for n in pair:
        for lin in (mlp.gate_proj, mlp.up_proj):
            lin.weight[n] = 0.0
            lin.bias[n] = 0.0
        mlp.down_proj.weight[:, n] = 0.0
    x = _capture(mlp, run)[:, read]
    hi = x.abs() > x.abs().max() / 2
    sign = 1.0 if float(x[hi].mean()) > 0 else -1.0
    x = sign * x
    thr = (float(x[hi].min()) + float(x[~hi].max())) / 2
    g = 3 * a / (float(x[hi].min()) - thr)
    for n, offset in zip(pair, (0.0, a)):
        mlp.gate_proj.weight[n, read] = sign * g
        mlp.gate_proj.bias[n] = -g * thr - offset
        mlp.up_proj.bias[n] = 1.0
    mlp.down_proj.weight[write, pair[0]] = value / a
    mlp.down_proj.weight[write, pair[1]] = -value / a


def tiny_qwen25vl(seed: int = 0) -> nn.Module:
    """A tiny random ``Qwen2_5_VLForConditionalGeneration`` (RMSNorm / SwiGLU ViT, one attention window
    covering the 32 px image) with the same implanted sinks as :func:`tiny_qwen2vl`; the ViT's mechanism
    uses thresholded SwiGLU neurons (:func:`_swiglu_neuron`)."""
    import transformers

    torch.manual_seed(seed)
    vc = dict(depth=6, hidden_size=64, intermediate_size=128, num_heads=4, in_channels=3, patch_size=vm.PATCH,
              spatial_merge_size=QWEN_MERGE, temporal_patch_size=QWEN_TEMPORAL, window_size=vm.IMG,
              out_hidden_size=64, fullatt_block_indexes=[2, 5])
    tc = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LM_LAYERS,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    cfg = transformers.Qwen2_5_VLConfig(vision_config=vc, text_config=tc, image_token_id=IMAGE_ID,
                                        video_token_id=VOCAB - 2, vision_start_token_id=VOCAB - 3,
                                        vision_end_token_id=VOCAB - 4)
    model = transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval()
    visual = model.model.visual
    blocks = list(visual.blocks)
    probe_imgs = vm.make_images([[1, 6], [], [15]], seed=99)
    px, grid = qwen_pixels(probe_imgs)
    run_visual = lambda: visual(px, grid_thw=grid)  # noqa: E731
    with torch.no_grad():
        nn.init.normal_(visual.patch_embed.proj.weight, std=0.2)
        vm._trigger_patch_conv(visual.patch_embed.proj)
        visual.patch_embed.proj.weight[CLEAN] = 0.0
        for block in blocks:
            for mod in block.modules():
                if isinstance(mod, nn.Linear):
                    nn.init.normal_(mod.weight, std=vm.WEIGHT_GAIN * mod.weight.shape[1] ** -0.5)
                    nn.init.normal_(mod.bias, std=0.02)
            for writer in (block.attn.proj, block.mlp.down_proj):
                writer.weight[[vm.TRIGGER, vm.SPIKE, CLEAN]] = 0.0
                writer.bias[[vm.TRIGGER, vm.SPIKE, CLEAN]] = 0.0
            for reader in (block.mlp.gate_proj, block.mlp.up_proj):
                reader.weight[:, [vm.TRIGGER, vm.SPIKE, CLEAN]] = 0.0
        _swiglu_neuron(blocks[vm.EMERGENCE].mlp, run_visual, vm.TRIGGER, vm.SPIKE, vm.SPIKE_VALUE)
        _swiglu_neuron(blocks[vm.CANCELLATION].mlp, run_visual, vm.SPIKE, vm.SPIKE, -vm.SPIKE_VALUE)
        _swiglu_neuron(blocks[-1].mlp, run_visual, vm.TRIGGER, CLEAN, CLEAN_VALUE)
    _implant_merger(visual, run_visual, vc["hidden_size"])
    probe = qwen2vl_batch([[1, 6], [], [15]], seed=98)
    implant_language(lambda: model(**vlm_inputs(probe)), model.model.language_model)
    return model


def qwen2vl_batch(painted: Sequence[Sequence[int]], seed: int = 0, model: nn.Module = None) -> dict:
    """One image + text batch as Qwen2-VL's processor makes it (flattened patches, ``image_grid_thw``,
    ``mm_token_type_ids``); ``expected``: the language model's sinks (first token, image tokens whose 2 x 2
    window holds a painted patch); ``vision_expected``: the vision tower's, one packed sequence per batch
    (positions of the painted patches in the patch order of every image, images one after the other)."""
    order = qwen_patch_order()
    windows = [order[4 * j:4 * j + 4] for j in range(QWEN_IMAGE_TOKENS)]

    def tokens(patches):
        return [j for j, ps in enumerate(windows) if set(ps) & set(patches)]

    ids, expected = prompts(painted, QWEN_IMAGE_TOKENS, seed=seed, image_tokens_of=tokens)
    px, grid = qwen_pixels(vm.make_images(painted, seed=seed))
    per = vm.GRID * vm.GRID
    vision = sorted(i * per + order.index(p) for i, patches in enumerate(painted) for p in patches)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": px, "image_grid_thw": grid,
            "mm_token_type_ids": (ids == IMAGE_ID).int(), "expected": expected, "vision_expected": [vision]}
