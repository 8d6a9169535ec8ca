"""timm Vision Transformers: ViT / DeiT / AugReg, DINOv2 (with and without registers), EVA.

timm builds the token sequence as ``[CLS, (distillation), registers..., patches]``
(``num_prefix_tokens`` in total, ``num_reg_tokens`` registers).  Each prefix token
is a known sink kind with its own template type (``cls``, ``dist``, ``register0``...);
high-norm background patches of models trained without registers are found by
content per image (docs/method.md "Vision").  The blocks run batch-first
(``[B, T, C]``); attention uses one fused ``qkv`` Linear (EVA may use separate
``q_proj``/``k_proj``/``v_proj``), the MLP ``fc1 -> act -> fc2`` (or SwiGLU
``fc1_g``/``fc1_x`` -> ``fc2``); the probe is ``mlp.fc2``.  timm is imported by
nobody here: the adapter reads the module tree only.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .base import register_adapter
from .vision_common import VisionAdapter, layer_scale, ln_layer_rotation

TIMM_CLASSES = (
    "timm.models.vision_transformer.VisionTransformer",
    "timm.models.deit.VisionTransformerDistilled",
    "timm.models.eva.Eva",
)


def _fold_separate_qkv_bias(attn: nn.Module) -> None:
    """EVA's fused ``qkv`` keeps its bias in ``q_bias``/``k_bias``/``v_bias`` and calls ``F.linear`` on
    ``qkv.weight`` directly, bypassing the module; fold the biases into ``qkv`` (same outputs) so the
    Linear is really called and can be quantized."""
    qkv, q_bias = getattr(attn, "qkv", None), getattr(attn, "q_bias", None)
    if not isinstance(qkv, nn.Linear) or q_bias is None:
        return
    k_bias = attn.k_bias if getattr(attn, "k_bias", None) is not None else torch.zeros_like(q_bias)
    fused = nn.Linear(qkv.in_features, qkv.out_features, bias=True, device=qkv.weight.device, dtype=qkv.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(qkv.weight)
        fused.bias.copy_(torch.cat((q_bias, k_bias, attn.v_bias)))
    attn.qkv = fused
    attn.q_bias = None
    attn.k_bias = None
    attn.v_bias = None


@register_adapter(*TIMM_CLASSES)
class TimmViTAdapter(VisionAdapter):
    """Adapter for timm ``VisionTransformer`` (incl. DINOv2 / registers), distilled DeiT and ``Eva``."""

    family = "timm-vit"
    offers_registers = True

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        for block in self.blocks():
            _fold_separate_qkv_bias(block.attn)
        probe = self.probe_name()
        for i, block in enumerate(self.blocks()):
            try:
                block.get_submodule(probe)
            except AttributeError:
                raise ValueError(f"{type(model).__name__} block {i} has no {probe!r}: this timm block shape is "
                                 "not supported (ViT/DeiT/DINOv2/EVA with an mlp.fc2 are); add an adapter") from None

    def blocks(self) -> list[nn.Module]:
        return list(self.model.blocks)

    def probe_name(self) -> str:
        return "mlp.fc2"

    def hidden_size(self) -> int:
        return int(self.model.embed_dim)

    def rotation_spec(self) -> Any:
        """:class:`~vtquant.core.rotation_ln.LNRotationSpec` of a pre-norm timm ViT (``Block``: ViT, DeiT, DINOv2,
        CLIP towers); EVA and other block shapes are refused."""
        from ..core.rotation_ln import LNRotationSpec, check_layer_norms, is_identity, is_layer_norm

        m = self.model
        layers = []
        for i, block in enumerate(self.blocks()):
            kind = f"{type(block).__module__}.{type(block).__name__}"
            if kind != "timm.models.vision_transformer.Block":
                raise NotImplementedError(f"rotation of timm {type(m).__name__}: block {i} is a {type(block).__name__}, "
                                          "only the pre-norm vision_transformer.Block can be rotated exactly; use "
                                          "rotation.enabled: false")
            attn, mlp = block.attn, block.mlp
            fc2 = mlp.fc2
            readers = [lin for name, lin in mlp.named_children() if isinstance(lin, nn.Linear) and lin is not fc2]
            heads = is_identity(getattr(attn, "norm", None)) and getattr(attn, "gate", None) is None
            head_dim = getattr(attn, "head_dim", None) or attn.proj.in_features // attn.num_heads
            layers.append(ln_layer_rotation(
                block.norm1, [attn.qkv], (attn.qkv, 2 * attn.proj.in_features, head_dim), attn.proj, block.norm2,
                readers, fc2, scales=(layer_scale(block.ls1, attn.proj), layer_scale(block.ls2, fc2)), heads=heads))
        start_params = [(m, n) for n in ("cls_token", "dist_token", "reg_token", "pos_embed")
                        if isinstance(getattr(m, n, None), torch.Tensor)]
        start_norms, start_linears = [], []
        if is_layer_norm(getattr(m, "norm_pre", None)):
            start_norms, start_params = [m.norm_pre], []
        elif is_layer_norm(getattr(m.patch_embed, "norm", None)):
            start_norms = [m.patch_embed.norm]
        elif is_identity(getattr(m, "norm_pre", None)) and is_identity(getattr(m.patch_embed, "norm", None)):
            start_linears = [m.patch_embed.proj]
        else:
            check_layer_norms([m.norm_pre, m.patch_embed.norm], "the stream start")
        return LNRotationSpec(hidden=self.hidden_size(), root=m, layers=layers, start_params=start_params,
                              start_linears=start_linears, start_norms=start_norms, end=("input", m.norm))

    def prefix_kinds(self) -> list[tuple[str, str, int]]:
        out, pos = [], 0
        if getattr(self.model, "cls_token", None) is not None:
            out.append(("cls", "cls", pos))
            pos += 1
        if getattr(self.model, "dist_token", None) is not None:
            out.append(("cls", "dist", pos))  # DeiT distillation token: read by the head_dist
            pos += 1
        reg = getattr(self.model, "reg_token", None)  # Eva keeps no num_reg_tokens attribute
        n_reg = int(reg.shape[1]) if reg is not None else int(getattr(self.model, "num_reg_tokens", 0) or 0)
        for r in range(n_reg):
            out.append(("registers", f"register{r}", pos))
            pos += 1
        return out

    @property
    def output_kind(self) -> str:  # type: ignore[override]
        """``class-logits`` with a classifier head (``num_classes > 0``), else ``features``."""
        return "class-logits" if int(getattr(self.model, "num_classes", 0) or 0) > 0 else "features"
