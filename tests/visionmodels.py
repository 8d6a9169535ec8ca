"""Tests-only: tiny random vision / CLIP towers with an implanted massive-activation mechanism.

Chosen tokens carry a trigger value in channel ``TRIGGER`` of their embedding: the CLS
token, chosen register tokens (their learned embedding) or the patches of an image
that are painted bright in the red channel (the patch embedding's ``TRIGGER`` row
reads the patch's mean red value; every other patch stays near 0).  At the
emergence block one MLP neuron fires only on the trigger and writes ``SPIKE_VALUE``
into residual channel ``SPIKE``; at the cancellation block another neuron reads that
channel and writes it back out (exactly: every sink carries the same spike).  Nothing else writes or reads the two channels, so
the sink set of every input is known from how the input was built.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn

TRIGGER = 3
SPIKE = 7
SPIKE_VALUE = 400.0
TRIG = 20.0         # trigger value written into the embedding of a sink token
BRIGHT = 2.0        # red value of a painted ("background") patch
IMG, PATCH = 32, 8  # 4 x 4 = 16 patches
GRID = IMG // PATCH
EMERGENCE, CANCELLATION = 2, 4
WEIGHT_GAIN = 0.5    # block Linear weights ~ N(0, (WEIGHT_GAIN^2) / fan_in)
EMERGE_ACT = 1000.0 # the emergence neuron's activation on a sink (typical token peak ~0.1-1)


def make_images(painted: Sequence[Sequence[int]], seed: int = 0) -> torch.Tensor:
    """``[N, 3, IMG, IMG]`` noise images; image ``i`` has the patches ``painted[i]`` painted bright."""
    gen = torch.Generator().manual_seed(seed)
    x = 0.5 * torch.randn(len(painted), 3, IMG, IMG, generator=gen)
    for i, patches in enumerate(painted):
        for p in patches:
            r, c = divmod(p, GRID)
            x[i, 0, r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH] = BRIGHT
    return x


def random_painted(n: int, seed: int, max_per_image: int = 3) -> list[list[int]]:
    """Per image 0..max_per_image distinct painted patches at random positions."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(0, max_per_image + 1, (1,), generator=gen))
        out.append(sorted(torch.randperm(GRID * GRID, generator=gen)[:k].tolist()))
    return out


def expected_positions(painted: Sequence[Sequence[int]], prefix_sinks: Sequence[int], num_prefix: int) -> list:
    return [sorted(list(prefix_sinks) + [num_prefix + p for p in patches]) for patches in painted]


# ------------------------------------------------------------------------------------------
@torch.no_grad()
def _trigger_patch_conv(conv: nn.Conv2d) -> None:
    conv.weight[TRIGGER] = 0.0
    conv.weight[SPIKE] = 0.0
    conv.weight[TRIGGER, 0] = TRIG / (BRIGHT * conv.weight.shape[-1] * conv.weight.shape[-2])
    if conv.bias is not None:
        conv.bias[TRIGGER] = 0.0
        conv.bias[SPIKE] = 0.0


@torch.no_grad()
def _set_token(vec: torch.Tensor, sink: bool) -> None:
    vec[..., TRIGGER] = TRIG if sink else 0.0
    vec[..., SPIKE] = 0.0


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


@torch.no_grad()
def implant(run: Callable[[], object], blocks: list, parts: Callable, emergence: int = EMERGENCE,
            cancellation: int = CANCELLATION) -> None:
    """Implant the emergence and cancellation neurons.

    Args:
        run: runs the model on a probe input holding sink tokens.
        blocks: the transformer blocks in order.
        parts: ``block -> (fc1, fc2, [residual writers])``.
    """
    for block in blocks:  # weights of a trained scale (std 1/sqrt(fan_in)), so that every block matters
        for mod in block.modules():
            if isinstance(mod, nn.Linear):
                nn.init.normal_(mod.weight, std=WEIGHT_GAIN * mod.weight.shape[1] ** -0.5)
                if mod.bias is not None:
                    nn.init.normal_(mod.bias, std=0.02)
            if hasattr(mod, "in_proj_weight") and mod.in_proj_weight is not None:
                nn.init.normal_(mod.in_proj_weight, std=WEIGHT_GAIN * mod.in_proj_weight.shape[1] ** -0.5)
    for block in blocks:  # the two channels are clean: nothing writes them, fc1 ignores the trigger
        fc1, fc2, writers = parts(block)
        for w in writers:
            w.weight[TRIGGER] = 0.0
            w.weight[SPIKE] = 0.0
            if w.bias is not None:
                w.bias[TRIGGER] = 0.0
                w.bias[SPIKE] = 0.0
        fc1.weight[:, TRIGGER] = 0.0

    def capture(module: nn.Module) -> dict:
        store: dict = {}

        def hook(m, a, kw):
            store.setdefault("x", _rows(a[0] if a else next(iter(kw.values()))).clone())

        h = module.register_forward_pre_hook(hook, with_kwargs=True)
        store["handle"] = h
        return store

    # emergence neurons: a pair that fires on the trigger only; their difference saturates at
    # EMERGE_ACT, so every sink gets the same spike (and the cancellation removes it exactly)
    fc1, fc2, _ = parts(blocks[emergence])
    n1, n1b = 5, 6
    for n in (n1, n1b):
        fc1.weight[n] = 0.0
        fc1.bias[n] = 0.0
        fc2.weight[:, n] = 0.0
    cap = capture(fc1)
    run()
    cap["handle"].remove()
    z = cap["x"][:, TRIGGER]
    hi = z > z.max() / 2
    zs, zn = float(z[hi].min()), float(z[~hi].max())
    assert zs > zn + 1.0, f"trigger not separable at the emergence input ({zs:.2f} vs {zn:.2f})"
    thr = (zs + zn) / 2
    gain = 3 * EMERGE_ACT / (zs - thr)  # the weakest sink reaches 3 x EMERGE_ACT
    fc1.weight[n1, TRIGGER] = gain
    fc1.bias[n1] = -gain * thr
    fc1.weight[n1b, TRIGGER] = gain
    fc1.bias[n1b] = -gain * thr - EMERGE_ACT
    fc2.weight[SPIKE, n1] = SPIKE_VALUE / EMERGE_ACT
    fc2.weight[SPIKE, n1b] = -SPIKE_VALUE / EMERGE_ACT

    # cancellation neuron: reads the spike channel, writes the spike back out
    fc1, fc2, _ = parts(blocks[cancellation])
    n2 = 9
    fc1.weight[n2] = 0.0
    fc1.bias[n2] = 0.0
    fc2.weight[:, n2] = 0.0
    cap_in = capture(fc1)
    cap_res = capture(blocks[cancellation])
    run()
    cap_in["handle"].remove(), cap_res["handle"].remove()
    h = cap_res["x"][:, SPIKE]
    sinks = h.abs() > SPIKE_VALUE / 4
    u = cap_in["x"][:, SPIKE]
    us, un = float(u[sinks].min()), float(u[~sinks].max())
    thr2 = (us + un) / 2
    gain2 = 2.0 / (us - thr2)
    fc1.weight[n2, SPIKE] = gain2
    fc1.bias[n2] = -gain2 * thr2
    cap = capture(fc2)
    run()
    cap["handle"].remove()
    act2 = cap["x"][:, n2][sinks]
    fc2.weight[SPIKE, n2] = -float(h[sinks].mean()) / float(act2.mean())


# ------------------------------------------------------------------------------------------
# timm
# ------------------------------------------------------------------------------------------
def timm_vit(registers: int = 0, sink_cls: bool = True, sink_registers: Sequence[int] = (), seed: int = 0,
             depth: int = 6, num_classes: int = 10) -> nn.Module:
    """A tiny random timm ``VisionTransformer`` (32 px, 8 px patches, width 64) with an implanted sink."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=64, depth=depth, num_heads=4,
                              mlp_ratio=4.0, num_classes=num_classes, reg_tokens=registers,
                              global_pool="token").eval()
    with torch.no_grad():
        nn.init.normal_(model.patch_embed.proj.weight, std=0.05)
        _trigger_patch_conv(model.patch_embed.proj)
        model.pos_embed[..., TRIGGER] = 0.0
        model.pos_embed[..., SPIKE] = 0.0
        _set_token(model.cls_token[0, 0], sink_cls)
        for r in range(registers):
            _set_token(model.reg_token[0, r], r in sink_registers)
    probe = make_images([[1, 6], [], [15]], seed=99)
    implant(lambda: model(probe), list(model.blocks), lambda b: (b.mlp.fc1, b.mlp.fc2, [b.attn.proj, b.mlp.fc2]))
    return model


# ------------------------------------------------------------------------------------------
# open_clip
# ------------------------------------------------------------------------------------------
TEXT_CTX, TEXT_VOCAB = 16, 100
SOT, EOT = TEXT_VOCAB - 2, TEXT_VOCAB - 1  # EOT is the largest id: open_clip pools at argmax


def open_clip_tiny(seed: int = 0, batch_first: bool = True, sink_cls: bool = True) -> nn.Module:
    """ViT-B-32's architecture at a tiny size (6 visual / 6 text blocks of width 64), both towers implanted."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg=open_clip.CLIPVisionCfg(layers=6, width=64, head_width=16, patch_size=PATCH, image_size=IMG),
        text_cfg=open_clip.CLIPTextCfg(context_length=TEXT_CTX, vocab_size=TEXT_VOCAB, width=64, heads=4, layers=6),
    ).eval()
    if not batch_first:  # run sequence-first, as open_clip releases before 2.2x do
        for tower in (model.visual.transformer, model.transformer):
            tower.batch_first = False
            for blk in tower.resblocks:
                blk.attn.batch_first = False
    v = model.visual
    with torch.no_grad():
        nn.init.normal_(v.conv1.weight, std=0.05)
        _trigger_patch_conv(v.conv1)
        v.positional_embedding[:, TRIGGER] = 0.0
        v.positional_embedding[:, SPIKE] = 0.0
        _set_token(v.class_embedding, sink_cls)
        emb = model.token_embedding.weight
        emb[:, TRIGGER] = 0.0
        emb[:, SPIKE] = 0.0
        emb[SOT, TRIGGER] = TRIG
        emb[EOT, TRIGGER] = TRIG
        model.positional_embedding[:, TRIGGER] = 0.0
        model.positional_embedding[:, SPIKE] = 0.0
    parts = lambda b: (b.mlp.c_fc, b.mlp.c_proj, [b.attn.out_proj, b.mlp.c_proj])  # noqa: E731
    probe = make_images([[1, 6], [], [15]], seed=99)
    implant(lambda: model.encode_image(probe), list(v.transformer.resblocks), parts)
    texts = make_texts([5, 9, 14], seed=99)
    implant(lambda: model.encode_text(texts), list(model.transformer.resblocks), parts)
    return model


def make_texts(lengths: Sequence[int], seed: int = 0) -> torch.Tensor:
    """``[N, TEXT_CTX]`` ids: SOT, random words, EOT at ``length - 1``, zero padding."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), TEXT_CTX, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, 0] = SOT
        ids[i, 1:n - 1] = torch.randint(1, TEXT_VOCAB - 3, (n - 2,), generator=gen)
        ids[i, n - 1] = EOT
    return ids


# ------------------------------------------------------------------------------------------
# transformers
# ------------------------------------------------------------------------------------------
def hf_clip_vision(seed: int = 0, sink_cls: bool = True) -> nn.Module:
    """A tiny random transformers ``CLIPVisionModel`` with an implanted sink."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=6,
                                        num_attention_heads=4, image_size=IMG, patch_size=PATCH)
    model = transformers.CLIPVisionModel(cfg).eval()
    emb = model.embeddings
    with torch.no_grad():
        nn.init.normal_(emb.patch_embedding.weight, std=0.05)
        _trigger_patch_conv(emb.patch_embedding)
        emb.position_embedding.weight[:, TRIGGER] = 0.0
        emb.position_embedding.weight[:, SPIKE] = 0.0
        _set_token(emb.class_embedding, sink_cls)
    probe = make_images([[1, 6], [], [15]], seed=99)
    implant(lambda: model(pixel_values=probe), list(model.encoder.layers),
            lambda b: (b.mlp.fc1, b.mlp.fc2, [b.self_attn.out_proj, b.mlp.fc2]))
    return model


def hf_dinov2(registers: int = 0, sink_cls: bool = True, sink_registers: Sequence[int] = (), seed: int = 0) -> nn.Module:
    """A tiny random transformers ``Dinov2Model`` (or ``Dinov2WithRegistersModel``) with an implanted sink."""
    import transformers

    torch.manual_seed(seed)
    common = dict(hidden_size=64, num_hidden_layers=6, num_attention_heads=4, mlp_ratio=4, image_size=IMG,
                  patch_size=PATCH)
    if registers:
        model = transformers.Dinov2WithRegistersModel(
            transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **common)).eval()
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**common)).eval()
    emb = model.embeddings
    with torch.no_grad():
        nn.init.normal_(emb.patch_embeddings.projection.weight, std=0.05)
        _trigger_patch_conv(emb.patch_embeddings.projection)
        emb.position_embeddings[..., TRIGGER] = 0.0
        emb.position_embeddings[..., SPIKE] = 0.0
        _set_token(emb.cls_token[0, 0], sink_cls)
        for r in range(registers):
            _set_token(emb.register_tokens[0, r], r in sink_registers)
    probe = make_images([[1, 6], [], [15]], seed=99)
    implant(lambda: model(pixel_values=probe), list(model.encoder.layer),
            lambda b: (b.mlp.fc1, b.mlp.fc2, [b.attention.o_proj, b.mlp.fc2]))
    return model
