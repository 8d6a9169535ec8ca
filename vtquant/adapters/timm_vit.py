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
from .vision_common import VisionAdapter, layer_scale, ln_layer_rotation, structure_fingerprint

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

    # --- io ---------------------------------------------------------------------------
    def config_dict(self) -> dict:
        """How to rebuild the (unquantized) model: the timm architecture name and/or constructor kwargs.

        A model made by ``timm.create_model(NAME, ...)`` is rebuilt with ``timm.create_model(NAME,
        pretrained=False, **kwargs)``; a ``VisionTransformer`` built directly, from its class with the
        kwargs read off its modules.  Either way the loader checks the rebuilt model's activations against a
        fingerprint taken here, and every tensor shape when it loads the weights.
        """
        import timm

        model = self.model
        cls = type(model)
        arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
        if cls.__name__ == "VisionTransformer":
            kwargs = _vit_kwargs(model)
        elif arch is not None:
            kwargs = {"num_classes": int(model.num_classes)}
        else:
            raise NotImplementedError(
                f"saving a {cls.__name__} built without timm.create_model: its architecture has no name to "
                "rebuild it from; build it with timm.create_model(NAME, ...) and quantize that")
        return {"library": "timm", "timm_version": timm.__version__, "class": f"{cls.__module__}.{cls.__name__}",
                "architecture": arch, "kwargs": kwargs, "fingerprint": structure_fingerprint(model)}

    @classmethod
    def from_config_dict(cls, data: dict) -> nn.Module:
        import timm

        kwargs = dict(data.get("kwargs") or {})
        for key in ("img_size", "patch_size"):
            if isinstance(kwargs.get(key), list):
                kwargs[key] = tuple(kwargs[key])
        if data.get("architecture"):
            model = timm.create_model(data["architecture"], pretrained=False, **kwargs)
        elif data.get("class") == "timm.models.vision_transformer.VisionTransformer":
            from timm.models.vision_transformer import VisionTransformer

            model = VisionTransformer(**kwargs)
        else:
            raise ValueError(f"cannot rebuild timm model {data.get('class')!r}: no architecture name recorded")
        expected = data.get("fingerprint")
        if expected is not None and structure_fingerprint(model) != expected:
            raise ValueError(f"the rebuilt timm model ({data.get('architecture') or data.get('class')}, timm "
                             f"{timm.__version__}; saved with timm {data.get('timm_version')}) differs from the saved "
                             "one in its activations; load it with the timm version that saved it")
        return model.eval()


_TIMM_ACTIVATIONS = {"GELU": "gelu", "QuickGELU": "quick_gelu", "GELUTanh": "gelu_tanh", "SiLU": "silu", "ReLU": "relu"}
"""Activation module class -> the name timm's ``act_layer`` takes."""


def _vit_kwargs(model: nn.Module) -> dict[str, Any]:
    """Constructor kwargs of a timm ``VisionTransformer`` read off its modules (sizes and switches)."""
    block = model.blocks[0]
    pe = model.patch_embed
    mlp_in = getattr(block.mlp, "fc1", None)
    kwargs: dict[str, Any] = {
        "img_size": list(pe.img_size) if pe.img_size is not None else None,
        "patch_size": list(pe.patch_size),
        "in_chans": int(pe.proj.in_channels),
        "num_classes": int(model.num_classes),
        "global_pool": model.global_pool,
        "embed_dim": int(model.embed_dim),
        "depth": len(model.blocks),
        "num_heads": int(block.attn.num_heads),
        "qkv_bias": getattr(getattr(block.attn, "qkv", None), "bias", None) is not None,
        "proj_bias": getattr(block.attn.proj, "bias", None) is not None,
        "class_token": bool(model.has_class_token),
        "reg_tokens": int(getattr(model, "num_reg_tokens", 0) or 0),
        "no_embed_class": bool(model.no_embed_class),
        "pos_embed": "learn" if getattr(model, "pos_embed", None) is not None else "none",
        "pre_norm": not isinstance(model.norm_pre, nn.Identity),
        "fc_norm": not isinstance(model.fc_norm, nn.Identity),
        "final_norm": not (isinstance(model.norm, nn.Identity) and isinstance(model.fc_norm, nn.Identity)),
        "dynamic_img_size": bool(getattr(model, "dynamic_img_size", False)),
        "pool_include_prefix": bool(getattr(model, "pool_include_prefix", False)),
    }
    if mlp_in is not None:
        kwargs["mlp_ratio"] = mlp_in.out_features / model.embed_dim
    act = getattr(block.mlp, "act", None)
    name = type(act).__name__
    if name == "GELU" and getattr(act, "approximate", "none") == "tanh":
        name = "GELUTanh"
    if name in _TIMM_ACTIVATIONS:  # e.g. CLIP towers built with act_layer="quick_gelu"
        kwargs["act_layer"] = _TIMM_ACTIVATIONS[name]
    if not isinstance(getattr(block, "ls1", nn.Identity()), nn.Identity):
        kwargs["init_values"] = 1e-5  # layer scale present (its gamma is loaded from the checkpoint)
    return kwargs
