"""open_clip CLIP: the visual and the text tower, each quantized on its own.

* Layout: open_clip blocks run batch-first (``Transformer.batch_first=True``, the
  default since open_clip 2.2x) or sequence-first (``[T, B, C]``, older releases and
  models built with ``batch_first=False``); the adapter reads ``batch_first`` and
  tells the core, whose masks stay ``[B, T]``.
* Attention: ``nn.MultiheadAttention`` keeps q/k/v in ``in_proj_weight``.  The adapter
  replaces it by :class:`~vtquant.adapters.vision_common.ExplicitMultiheadAttention`
  (same outputs, explicit q/k/v/out Linears), so every matrix of a block is quantized;
  :func:`~vtquant.adapters.vision_common.unquantized_weights` checks that nothing is left.
* Known sinks: the visual CLS token (read by the head: protected); in the text tower
  the first token (start-of-text) and the pooled end-of-text token (protected).

A whole ``CLIP`` has two towers with separate sink mechanisms: quantize it with
:func:`vtquant.vision.quantize_clip_`, which runs the core once per tower.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from .base import KnownSinks, UnsupportedModelError, register_adapter
from .vision_common import (VisionAdapter, layer_scale, ln_layer_rotation, make_attention_explicit_,
                            text_known_sinks)


def _transformer_layout(transformer: nn.Module) -> str:
    return "bsd" if getattr(transformer, "batch_first", True) else "sbd"


def _prepare_tower(transformer: nn.Module) -> int:
    """Explicit q/k/v Linears, and a cast dtype that does not read ``mlp.c_fc.weight``.

    open_clip asks ``resblocks[0].get_weight_dtype()`` (``mlp.c_fc.weight.dtype``) for the cast
    dtype; a quantized Linear keeps int8 codes instead of ``weight``, so the block answers with
    its first LayerNorm's dtype (the model's float dtype) instead.
    """
    for block in transformer.resblocks:
        if hasattr(block, "ln_1"):  # (after rotation ln_1 holds no weight: any float parameter of the block)
            block.get_weight_dtype = lambda block=block: next(
                (p.dtype for p in block.parameters() if p.is_floating_point()), torch.float32)
    return make_attention_explicit_(transformer)


class _OpenCLIPTower(VisionAdapter):
    """What both open_clip towers share: ``transformer.resblocks``, the ``mlp.c_proj`` probe, the layout.

    The tower's open_clip model config is read here, before quantization changes its modules (rotation
    replaces LayerNorms, attention gets explicit q/k/v Linears), for :meth:`config_dict`.
    """

    def _derive_config(self, model: nn.Module) -> dict:
        raise NotImplementedError

    def __init__(self, model: nn.Module) -> None:
        self.open_clip_config = snapshot_config(self._derive_config, model)
        super().__init__(model)
        self.token_layout = _transformer_layout(model.transformer)
        self.replaced_attention = _prepare_tower(model.transformer)

    def blocks(self) -> list[nn.Module]:
        return list(self.model.transformer.resblocks)

    def probe_name(self) -> str:
        return "mlp.c_proj"

    def hidden_size(self) -> int:
        return int(self.model.transformer.width)

    def _start(self) -> dict:
        raise NotImplementedError

    def rotation_spec(self) -> Any:
        """:class:`~vtquant.core.rotation_ln.LNRotationSpec` of the tower (``ResidualAttentionBlock`` blocks)."""
        from ..core.rotation_ln import LNRotationSpec

        layers = []
        for i, block in enumerate(self.blocks()):
            if type(block).__name__ != "ResidualAttentionBlock" or hasattr(block, "ln_1_kv"):
                raise NotImplementedError(f"rotation of open_clip: block {i} is a {type(block).__name__}; only the "
                                          "pre-norm ResidualAttentionBlock self-attention block can be rotated exactly; "
                                          "use rotation.enabled: false")
            attn, mlp = block.attn, block.mlp
            head_dim = attn.embed_dim // attn.num_heads
            layers.append(ln_layer_rotation(
                block.ln_1, [attn.q_proj, attn.k_proj, attn.v_proj], (attn.v_proj, 0, head_dim), attn.out_proj,
                block.ln_2, [mlp.c_fc], mlp.c_proj,
                scales=(layer_scale(block.ls_1, attn.out_proj), layer_scale(block.ls_2, mlp.c_proj))))
        return LNRotationSpec(hidden=self.hidden_size(), root=self.model, layers=layers,
                              end=("output", self.model.transformer), **self._start())


@register_adapter("open_clip.transformer.VisionTransformer")
class OpenCLIPVisualAdapter(_OpenCLIPTower):
    """The image tower (``model.visual``) of an open_clip ``CLIP``."""

    family = "open_clip-visual"

    def _derive_config(self, model: nn.Module) -> dict:
        return visual_config(model)

    def config_dict(self) -> dict:
        """The open_clip config of the image tower (``CLIPVisionCfg`` fields, activation, norm, layout, dtype),
        read before quantization; :meth:`from_config_dict` rebuilds it with open_clip (no download)."""
        return open_clip_model_config("VisionTransformer", visual=self.open_clip_config)

    @classmethod
    def from_config_dict(cls, data: dict) -> nn.Module:
        return build_open_clip(data)

    def prefix_kinds(self) -> list[tuple[str, str, int]]:
        return [("cls", "cls", 0)] if getattr(self.model, "class_embedding", None) is not None else []

    def _start(self) -> dict:
        from ..core.rotation_ln import is_layer_norm

        m = self.model
        if is_layer_norm(getattr(m, "ln_pre", None)):
            return {"start_norms": [m.ln_pre]}
        return {"start_linears": [m.conv1],
                "start_params": [(m, n) for n in ("class_embedding", "positional_embedding")
                                 if isinstance(getattr(m, n, None), torch.Tensor)]}

    def protected_type_names(self) -> set[str]:
        return {"cls"} if getattr(self.model, "pool_type", "tok") == "tok" else set()


def text_pool_positions(ids: torch.Tensor, pool_type: str, eos_id: Any = None) -> torch.Tensor:
    """Position of the pooled (end-of-text) token per row, as open_clip's ``text_global_pool``."""
    if pool_type == "argmax":
        return ids.argmax(dim=-1)
    if pool_type == "eos" and eos_id is not None:
        return (ids == eos_id).int().argmax(dim=-1)
    if pool_type == "first":
        return torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
    return torch.full((ids.shape[0],), ids.shape[1] - 1, dtype=torch.long, device=ids.device)


@register_adapter("open_clip.transformer.TextTransformer")
class OpenCLIPTextAdapter(_OpenCLIPTower):
    """The text tower of an open_clip ``CLIP`` (``transformer``, ``token_embedding``, ``ln_final``).

    ``model`` is the ``CLIP`` itself (its text tower is not a module of its own) or a
    ``TextTransformer`` (``CustomTextCLIP.text``).
    """

    family = "open_clip-text"

    def __init__(self, model: nn.Module) -> None:
        if not hasattr(model, "token_embedding") or not hasattr(model, "transformer"):
            raise ValueError(f"{type(model).__name__} has no open_clip text tower (token_embedding + transformer)")
        super().__init__(model)

    def _derive_config(self, model: nn.Module) -> dict:
        return text_config(model)

    def config_dict(self) -> dict:
        """The open_clip config of a ``TextTransformer`` (a ``CLIP``'s text tower is saved with its CLIP)."""
        if hasattr(self.model, "text_pool_type"):
            raise NotImplementedError(f"the text tower of an open_clip {type(self.model).__name__} is part of the "
                                      "CLIP itself: save the whole model (vtquant.save(clip, dir)), which holds both "
                                      "towers")
        return open_clip_model_config("TextTransformer", text=self.open_clip_config)

    @classmethod
    def from_config_dict(cls, data: dict) -> nn.Module:
        return build_open_clip(data)

    def known_sink_kinds(self) -> tuple[str, ...]:
        return ("first_token", "eot")

    def _start(self) -> dict:
        m = self.model
        params = [(m.token_embedding, "weight")] + [(m, n) for n in ("positional_embedding", "cls_emb")
                                                    if isinstance(getattr(m, n, None), torch.Tensor)]
        return {"start_params": params}

    def _pool(self) -> tuple[str, Any]:
        pool = getattr(self.model, "text_pool_type", None) or getattr(self.model, "pool_type", "argmax")
        return pool, getattr(self.model, "eos_id", None)

    def known_sink_types(self, kinds: list[str]) -> list[str]:
        return [k for k in ("first_token", "eot") if k in kinds]

    def head_sink_types(self, kinds: list[str]) -> list[int]:
        names = self.known_sink_types(kinds)
        return [names.index("eot")] if "eot" in names else []

    def known_sink_site(self) -> nn.Module:
        return self.model.token_embedding

    def known_sinks_of_call(self, kinds: list[str], args: tuple, kwargs: dict) -> KnownSinks:
        names = self.known_sink_types(kinds)
        if not names:
            return None, None, True
        pool, eos_id = self._pool()
        ids = args[0]
        known, types = text_known_sinks(ids, names, lambda x: text_pool_positions(x, pool, eos_id))
        return known, types, True

    def forward(self, batch: Any) -> Any:
        ids = batch[0] if isinstance(batch, (tuple, list)) else batch
        device = next(self.model.parameters()).device
        encode = getattr(self.model, "encode_text", None) or self.model
        return encode(ids.to(device))

    def input_kind(self) -> str:
        return "tokens"


@register_adapter("open_clip.model.CLIP", "open_clip.model.CustomTextCLIP")
class _OpenCLIPTwoTowers(OpenCLIPVisualAdapter):
    """A whole CLIP is two models for the core: say how to quantize it."""

    def __init__(self, model: nn.Module) -> None:  # noqa: D107
        raise UnsupportedModelError(
            f"{type(model).__name__} has two towers with separate sinks: quantize it with "
            "vtquant.vision.quantize_clip_(model, recipe, images=..., texts=...), or one tower with "
            "vtquant.quantize_(model.visual, recipe, calib=images)")

    @classmethod
    def towers(cls, model: nn.Module) -> list:
        """The image tower (``model.visual``) and the text tower (``model.text`` of a ``CustomTextCLIP``,
        else the CLIP's own text modules, whose handle goes on ``model.transformer``)."""
        from .spec import Tower

        text_root = getattr(model, "text", None) or model
        handle = text_root if text_root is not model else model.transformer
        return [Tower("visual", model.visual, OpenCLIPVisualAdapter(model.visual), "images"),
                Tower("text", handle, OpenCLIPTextAdapter(text_root), "tokens")]

    @classmethod
    def encoders(cls, model: nn.Module) -> tuple:
        return model.encode_image, model.encode_text

    @classmethod
    def model_config_dict(cls, model: nn.Module) -> dict:
        """The whole CLIP's open_clip config for a checkpoint: each tower's config as its adapter read it
        before quantization (a tower left unquantized is read now), and the CLIP's own switches."""
        text_root = getattr(model, "text", None) or model
        handles = {"visual": getattr(model.visual, "vtquant", None),
                   "text": getattr(text_root if text_root is not model else model.transformer, "vtquant", None)}
        roots = {"visual": model.visual, "text": text_root if text_root is not model else model.transformer}
        for name, h in handles.items():
            if h is None and any(isinstance(m, nn.MultiheadAttention) for m in roots[name].modules()):
                raise NotImplementedError(
                    f"the {name} tower of this {type(model).__name__} was not prepared by vtquant (only the other tower "
                    "was quantized, with vtquant.quantize_): save the quantized tower itself (vtquant.save(tower, dir)), "
                    "or quantize the model with vtquant.vision.quantize_clip_ (towers=... for one of them)")
        configs = {name: (h.adapter.open_clip_config if h is not None else
                          snapshot_config(visual_config if name == "visual" else text_config,
                                          model.visual if name == "visual" else text_root))
                   for name, h in handles.items()}
        return open_clip_model_config(type(model).__name__, visual=configs["visual"], text=configs["text"], root=model)

    @classmethod
    def from_config_dict(cls, data: dict) -> nn.Module:
        return build_open_clip(data)


# ------------------------------------------------------------------------------------------
# checkpoints: the open_clip model config, read off a tower before quantization, rebuilt on load
# ------------------------------------------------------------------------------------------
_NOT_SAVABLE = "open_clip_config_error"


def _tower_common(transformer: nn.Module) -> dict:
    """Activation, norm and layout of a ``Transformer`` of default ``ResidualAttentionBlock`` blocks."""
    from open_clip.transformer import LayerScale, QuickGELU

    blocks = list(transformer.resblocks)
    block = blocks[0]
    if type(block).__name__ != "ResidualAttentionBlock" or hasattr(block, "ln_1_kv"):
        raise NotImplementedError(f"its blocks are {type(block).__name__}s (only the default ResidualAttentionBlock "
                                  "self-attention block is rebuilt from a config)")
    act = block.mlp.gelu
    if isinstance(act, QuickGELU):
        quick, act_kwargs = True, None
    elif isinstance(act, nn.GELU):
        quick, act_kwargs = False, ({"approximate": act.approximate} if act.approximate != "none" else None)
    else:
        raise NotImplementedError(f"its MLP activation is a {type(act).__name__} (QuickGELU or GELU are rebuilt)")
    norm = block.ln_1
    if type(norm).__name__ not in ("LayerNorm", "LayerNormFp32"):
        raise NotImplementedError(f"its norms are {type(norm).__name__}s (open_clip LayerNorm / LayerNormFp32 are "
                                  "rebuilt)")
    width = int(norm.normalized_shape[0])
    mlp_width = int(block.mlp.c_fc.out_features)
    heads = int(block.attn.num_heads)
    return {"common": {"quick_gelu": quick, "norm": type(norm).__name__,
                       "batch_first": bool(getattr(transformer, "batch_first", True)),
                       "dtype": str(next(p for p in block.parameters() if p.is_floating_point()).dtype)},
            "cfg": {"layers": len(blocks), "width": width, "heads": heads, "mlp_ratio": mlp_width / width,
                    "ls_init_value": 1e-5 if isinstance(block.ls_1, LayerScale) else None,  # gamma comes from the weights
                    "act_kwargs": act_kwargs, "norm_kwargs": {"eps": norm.eps} if norm.eps != 1e-5 else None}}


def visual_config(visual: nn.Module) -> dict:
    """The open_clip model config of an unquantized ``VisionTransformer`` (``CLIPVisionCfg`` fields + switches)."""
    from open_clip.transformer import PatchDropout

    if type(visual).__name__ != "VisionTransformer" or getattr(visual, "attn_pool", None) is not None:
        raise NotImplementedError(f"{type(visual).__name__}" + (" with an attentional pooler" if
                                                               getattr(visual, "attn_pool", None) is not None else "")
                                  + " (only open_clip's VisionTransformer without attentional pooling is rebuilt)")
    tower = _tower_common(visual.transformer)
    cfg = tower["cfg"]
    heads = cfg.pop("heads")
    if cfg["width"] % heads:
        raise NotImplementedError(f"width {cfg['width']} is not a multiple of its {heads} heads")
    cfg.update(head_width=cfg["width"] // heads, patch_size=list(visual.patch_size), image_size=list(visual.image_size),
               patch_dropout=float(visual.patch_dropout.prob) if isinstance(visual.patch_dropout, PatchDropout) else 0.0,
               no_ln_pre=isinstance(visual.ln_pre, nn.Identity), final_ln_after_pool=bool(visual.final_ln_after_pool),
               pool_type=str(visual.pool_type), output_tokens=bool(visual.output_tokens))
    return {**tower["common"], "output_dim": int(visual.output_dim), "cfg": cfg}


def text_config(root: nn.Module) -> dict:
    """The open_clip model config of an unquantized text tower: a ``TextTransformer``, or the text modules
    of a ``CLIP`` (``root`` is then the CLIP)."""
    is_clip = hasattr(root, "text_pool_type")
    tower = _tower_common(root.transformer)
    cfg = tower["cfg"]
    proj = root.text_projection
    if proj is None:
        proj_type, proj_bias, out = "none", False, None
    elif isinstance(proj, nn.Linear):
        proj_type, proj_bias, out = "linear", True, int(proj.out_features)
    else:
        proj_type, proj_bias, out = "linear", False, int(proj.shape[1])
    if is_clip and root.positional_embedding.shape[0] != root.context_length:
        raise NotImplementedError("its positional embedding has a class-token row, which a CLIP does not keep")
    if getattr(root, "use_pad_mask", False) or getattr(root, "correct_cls_mask", False):
        raise NotImplementedError("it uses a padding / class mask (not part of open_clip's CLIPTextCfg)")
    cfg.update(context_length=int(root.context_length), vocab_size=int(root.vocab_size),
               embed_cls=getattr(root, "cls_emb", None) is not None, pad_id=int(getattr(root, "pad_id", 0)),
               eos_id=int(root.text_eos_id if is_clip else root.eos_id), no_causal_mask=root.attn_mask is None,
               pool_type=str(root.text_pool_type if is_clip else root.pool_type), proj_type=proj_type,
               proj_bias=proj_bias, output_tokens=bool(getattr(root, "output_tokens", False)))
    return {**tower["common"], "output_dim": out, "cfg": cfg}


def snapshot_config(derive: Any, model: nn.Module) -> dict:
    """``derive(model)``, or ``{_NOT_SAVABLE: why}`` (the tower still quantizes; saving it says why not)."""
    try:
        return derive(model)
    except (NotImplementedError, AttributeError, TypeError, IndexError, StopIteration, ImportError) as err:
        return {_NOT_SAVABLE: f"{type(model).__name__}: {err}"}


def _checked(config: dict, what: str) -> dict:
    if _NOT_SAVABLE in config:
        raise NotImplementedError(f"saving this quantized open_clip {what} is not supported: {config[_NOT_SAVABLE]}; "
                                  "re-run the quantization instead (calibration takes seconds to minutes)")
    return config


def open_clip_model_config(kind: str, visual: Optional[dict] = None, text: Optional[dict] = None,
                           root: Optional[nn.Module] = None) -> dict:
    """The checkpoint's model config: the class, the towers' configs and the CLIP's own switches."""
    import open_clip

    data: dict = {"library": "open_clip", "open_clip_version": getattr(open_clip, "__version__", "?"), "class": kind}
    if visual is not None:
        data["visual"] = _checked(visual, "image tower")
    if text is not None:
        data["text"] = _checked(text, "text tower")
    if root is not None:  # a two-tower model
        v, t = data["visual"], data["text"]
        for key in ("quick_gelu", "norm", "dtype"):
            if v[key] != t[key]:
                raise NotImplementedError(f"saving this {kind}: its towers differ in {key} ({v[key]} / {t[key]}), "
                                          "which one open_clip config cannot say")
        if t["output_dim"] not in (None, v["output_dim"]):
            raise NotImplementedError(f"saving this {kind}: the towers' embedding widths differ")
        data.update(embed_dim=v["output_dim"], init_logit_bias=0.0 if getattr(root, "logit_bias", None) is not None
                    else None, nonscalar_logit_scale=root.logit_scale.ndim > 0)
    return data


def build_open_clip(data: dict) -> nn.Module:
    """Rebuild the unquantized open_clip model of :func:`open_clip_model_config` (random weights, eval mode),
    and check that the rebuilt towers give the same config again."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg, _build_text_tower, _build_vision_tower

    kind = data["class"]
    first = data.get("visual") or data["text"]
    cast = torch.bfloat16 if first["norm"] == "LayerNormFp32" else None

    def vision_cfg(tower: dict) -> Any:
        cfg = dict(tower["cfg"])
        cfg["patch_size"] = tuple(cfg["patch_size"]) if cfg["patch_size"][0] != cfg["patch_size"][1] else \
            cfg["patch_size"][0]
        cfg["image_size"] = tuple(cfg["image_size"])
        return CLIPVisionCfg(**cfg)

    def text_cfg(tower: dict) -> Any:
        cfg = dict(tower["cfg"])
        return CLIPTextCfg(**cfg)

    if kind in ("CLIP", "CustomTextCLIP"):
        model = getattr(open_clip, kind)(
            embed_dim=data["embed_dim"], vision_cfg=vision_cfg(data["visual"]), text_cfg=text_cfg(data["text"]),
            quick_gelu=first["quick_gelu"], init_logit_bias=data.get("init_logit_bias"),
            nonscalar_logit_scale=bool(data.get("nonscalar_logit_scale")), cast_dtype=cast)
        parts = {"visual": model.visual.transformer,
                 "text": (model.text if kind == "CustomTextCLIP" else model).transformer}
    elif kind == "VisionTransformer":
        model = _build_vision_tower(data["visual"]["output_dim"], vision_cfg(data["visual"]),
                                    data["visual"]["quick_gelu"], cast)
        parts = {"visual": model.transformer}
    elif kind == "TextTransformer":
        model = _build_text_tower(data["text"]["output_dim"] or 0, text_cfg(data["text"]), data["text"]["quick_gelu"],
                                  cast)
        parts = {"text": model.transformer}
    else:
        raise ValueError(f"cannot rebuild open_clip model class {kind!r} (CLIP, CustomTextCLIP, VisionTransformer, "
                         "TextTransformer)")
    for name, transformer in parts.items():
        if not data[name]["batch_first"]:  # sequence-first blocks, as open_clip releases before 2.2x ran
            transformer.batch_first = False
            for block in transformer.resblocks:
                block.attn.batch_first = False
    model = model.to(getattr(torch, first["dtype"].replace("torch.", ""))).eval()
    again = {"visual": lambda: visual_config(model.visual if kind in ("CLIP", "CustomTextCLIP") else model),
             "text": lambda: text_config(model.text if kind == "CustomTextCLIP" else model)}
    for name in parts:
        if again[name]() != data[name]:
            raise ValueError(f"the rebuilt open_clip {kind} (open_clip {getattr(open_clip, '__version__', '?')}; saved "
                             f"with {data.get('open_clip_version')}) differs from the saved one in its {name} tower "
                             "config; load it with the open_clip version that saved it")
    return model
