"""transformers decoder-only LMs: Llama, Mistral, Qwen2/3, Gemma 1/2/3 (text), Phi-3, OLMo-2, and any
``*ForCausalLM`` with the usual module names.

What the transforms need - which norms exist and where they sit, fused or separate projections -
is read from the modules (:mod:`vtquant.adapters.decoder_layout`), not from the class name.  The
small :data:`ARCHITECTURES` table (llm-compressor's mapping idea) lists the classes known here
with their config class and the layout they are expected to have; a model class that is not
listed but has ``model.model.layers[i].self_attn.{q,k,v,o}_proj`` (or ``qkv_proj``) and
``mlp.{gate,up,down}_proj`` (or ``gate_up_proj``) gets the same adapter through a logged
fallback, and every rotation / smoothing of it is checked for equivalence on calibration data
(:mod:`vtquant.core.verify`).

What each layout supports (reasons in :mod:`vtquant.core.rotation` / :mod:`vtquant.core.smooth`):

* ``pre-norm`` (Llama, Mistral, Qwen2/3, Gemma, Phi-3): residual rotation folded into the
  norms' readers, smoothing folded into the norms;
* ``sandwich`` (Gemma-2/3): smoothing folds into the pre-norms; the residual rotation cannot
  pass the post-norms, so the residual readers' inputs are rotated online instead;
* ``post-norm`` (OLMo-2): residual rotation as for ``sandwich``; smoothing refused (the
  Linears read the raw residual, no norm can absorb ``1/s``);
* ``unknown``: quantization only; rotation and smoothing refused.

Causal LMs make their first token the attention sink whatever it is (SmolLM2 adds no BOS), so
``first_token`` is offered as a known sink; it is the first non-padding token of a prompt, and
no new token of a cached decoding step.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import cached_property
from typing import Any, Optional

import torch
import torch.nn as nn

from ..config import ConfigError
from ..core.rotation import LayerRotation, RotationSpec
from .base import KnownSinks, ModelAdapter, register_adapter, register_fallback
from .decoder_layout import DecoderLayout, LayoutError, detect_layout, norm_kind

log = logging.getLogger(__name__)

ARCHITECTURES = {
    "LlamaForCausalLM": {"config": "LlamaConfig", "layout": "pre-norm", "norm": "rms"},
    "MistralForCausalLM": {"config": "MistralConfig", "layout": "pre-norm", "norm": "rms"},
    "Qwen2ForCausalLM": {"config": "Qwen2Config", "layout": "pre-norm", "norm": "rms"},
    "Qwen3ForCausalLM": {"config": "Qwen3Config", "layout": "pre-norm", "norm": "rms"},
    "GemmaForCausalLM": {"config": "GemmaConfig", "layout": "pre-norm", "norm": "rms-plus-one"},
    "Gemma2ForCausalLM": {"config": "Gemma2Config", "layout": "sandwich", "norm": "rms-plus-one"},
    "Gemma3ForCausalLM": {"config": "Gemma3TextConfig", "layout": "sandwich", "norm": "rms-plus-one"},
    "Phi3ForCausalLM": {"config": "Phi3Config", "layout": "pre-norm", "norm": "rms"},
    "Olmo2ForCausalLM": {"config": "Olmo2Config", "layout": "post-norm", "norm": "rms"},
}


def looks_like_decoder(model: nn.Module) -> bool:
    """An unlisted ``*ForCausalLM`` with the module names this adapter reads (the generic path)."""
    if not type(model).__name__.endswith("ForCausalLM"):
        return False
    try:
        detect_layout(model)
    except LayoutError:
        return False
    return True


@register_fallback(looks_like_decoder, "any *ForCausalLM with model.model.layers[i].self_attn.{q,k,v,o}_proj "
                   "(or qkv_proj) and mlp.{gate,up,down}_proj (or gate_up_proj)")
@register_adapter(*ARCHITECTURES)
class HFDecoderAdapter(ModelAdapter):
    """Adapter for transformers ``*ForCausalLM`` decoders (the :data:`ARCHITECTURES` table, or the generic path)."""

    token_layout = "bsd"
    family = "hf-decoder"
    output_kind = "logits"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        name = type(model).__name__
        self.arch: Optional[dict] = ARCHITECTURES.get(name)
        self.layout: DecoderLayout = detect_layout(model)
        if self.arch is None:
            log.warning("%s is not in vtquant's table of decoders: using the generic decoder path (%s); rotation "
                        "and smoothing are checked for equivalence before they are kept", name, self.layout.describe())
        elif self.arch["layout"] != self.layout.kind:
            log.warning("%s: expected a %s layout, found %s; following the modules", name, self.arch["layout"],
                        self.layout.describe())

    @property
    def decoder(self) -> nn.Module:
        """The decoder stack (``embed_tokens``, ``layers``, ``norm``)."""
        return self.model.model

    @property
    def lm_head(self) -> nn.Module:
        """The output projection that reads the final norm (a VLM keeps it outside its language model)."""
        return self.model.lm_head

    def blocks(self) -> list[nn.Module]:
        return list(self.decoder.layers)

    def block_linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        return {name: block.get_submodule(name) for name in self.layout.linears}

    def probe_name(self) -> str:
        return self.layout.mlp_writer

    def input_groups(self, block: nn.Module) -> list[list[str]]:
        return [list(self.layout.attn_readers), list(self.layout.mlp_readers)]

    def kv_linears(self) -> tuple[str, ...]:
        kv = self.layout.key_value
        if kv is None:
            raise ConfigError(f"recipe.kv_cache: {type(self.model).__name__} computes queries, keys and values in one "
                              f"fused projection ({self.layout.attn_readers[0]}); quantizing only its key / value "
                              "rows is not implemented; set kv_cache: null")
        return kv

    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def forward(self, batch: Any) -> Any:
        """One batch: token ids ``[B, T]``, or a mapping (dict, ``BatchEncoding``) with ``input_ids`` and
        optionally ``attention_mask`` (padding; left padding moves the first-token sink, which the
        known-sink hook reads from the mask)."""
        device = next(self.model.parameters()).device
        if isinstance(batch, torch.Tensor):
            return self.model(input_ids=batch.to(device), use_cache=False)
        if isinstance(batch, Mapping) or hasattr(batch, "keys"):
            if "input_ids" not in batch:
                raise ConfigError(f"a calibration batch mapping needs 'input_ids' (got keys {sorted(batch.keys())})")
            inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask") if k in batch}
            return self.model(**inputs, use_cache=False)
        raise ConfigError(f"a calibration batch for {type(self.model).__name__} must be a token id tensor [B, T] "
                          f"or a mapping with input_ids (and attention_mask); got {type(batch).__name__}")

    def known_sink_kinds(self) -> tuple[str, ...]:
        return ("first_token",)

    def known_sink_site(self) -> nn.Module:
        return self.decoder

    def known_sinks_of_call(self, kinds: list[str], args: tuple, kwargs: dict) -> KnownSinks:
        """The first non-padding token of a prompt (left padding read from ``attention_mask``); no
        token of a cached decoding step (its sinks are already in the cache)."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        ref = ids if ids is not None else kwargs.get("inputs_embeds")
        batch, tokens = ref.shape[0], ref.shape[1]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = int(cache.get_seq_length()) if cache is not None else 0
        if "first_token" not in kinds:
            return None, None, past == 0
        known = torch.zeros(batch, tokens, dtype=torch.bool, device=ref.device)
        if past == 0:
            attn = kwargs.get("attention_mask")
            if attn is not None and attn.dim() == 2 and attn.shape[1] == tokens:
                first = attn.long().argmax(dim=1)  # first non-padding token (left padding)
            else:
                first = torch.zeros(batch, dtype=torch.long, device=ref.device)
            known[torch.arange(batch, device=ref.device), first] = True
        return known, None, past == 0

    # --- rotation ---------------------------------------------------------------------
    @cached_property
    def norm_convention(self) -> str:
        """``rms`` or ``rms-plus-one``, measured on the model's final norm (the table's value if unmeasurable)."""
        kind = norm_kind(self.decoder.norm)
        expected = self.arch["norm"] if self.arch is not None else None
        if kind is None:
            if expected is None:
                raise ConfigError(f"{type(self.model).__name__}: its norms are neither x/rms(x)*w nor x/rms(x)*(1+w); "
                                  "rotation and smoothing need one of them: set rotation.enabled: false and use a "
                                  "method without smoothing")
            return expected
        if expected is not None and kind != expected:
            log.warning("%s: norms measured as %s, the table says %s; following the measurement",
                        type(self.model).__name__, kind, expected)
        return kind

    def _norm_scale(self, norm: nn.Module) -> torch.Tensor:
        w = norm.weight.data.float()
        return w + 1.0 if self.norm_convention == "rms-plus-one" else w

    def _set_norm_identity(self, norm: nn.Module) -> None:
        norm.weight.data.fill_(0.0 if self.norm_convention == "rms-plus-one" else 1.0)

    def _untie(self) -> None:
        head, emb = self.lm_head, self.decoder.embed_tokens
        if head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr():
            head.weight = nn.Parameter(emb.weight.detach().clone())
        self.model.config.tie_word_embeddings = False
        if hasattr(self.model, "_tied_weights_keys"):
            self.model._tied_weights_keys = None

    def layer_rotation(self, block: nn.Module) -> LayerRotation:
        """Where the rotation and smoothing of one block fold, from its layout."""
        lay = self.layout
        get = block.get_submodule
        attn_readers = [get(n) for n in lay.attn_readers]
        mlp_readers = [get(n) for n in lay.mlp_readers]
        norm_readers, raw = [], []
        for norm, readers in ((lay.pre_attn_norm, attn_readers), (lay.pre_mlp_norm, mlp_readers)):
            if norm is not None:
                norm_readers.append((get(norm), readers))
            else:
                raw += readers
        value, o_proj = attn_readers[-1], get(lay.attn_writer)
        value_output = (value, o_proj, lay.head_dim) + ((lay.value_rows,) if lay.fused_qkv else ())
        return LayerRotation(
            norm_readers=norm_readers,
            writers=[o_proj, get(lay.mlp_writer)],
            online=[get(lay.mlp_writer)],
            value_output=value_output if lay.head_dim and (not lay.fused_qkv or lay.value_rows) else None,
            raw_readers=raw,
            post_norms=[get(n) for n in (lay.post_attn_norm, lay.post_mlp_norm) if n is not None],
        )

    def rotation_spec(self) -> RotationSpec:
        """The model described for rotation and smoothing (they decide what folds; see the module docstring).

        Raises:
            ConfigError: the layout is ``unknown`` (norms this adapter does not understand).
        """
        lay, name = self.layout, type(self.model).__name__
        if lay.kind == "unknown":
            raise ConfigError(f"{name}: the block layout is not recognized ({lay.describe()}), so rotation and "
                              "smoothing cannot be placed: set rotation.enabled: false and use a method without "
                              "smoothing (insertquant, naive-static, dynamic-token)")
        self.norm_convention  # noqa: B018 - measure (or refuse) before anything is changed
        cfg = self.model.config
        return RotationSpec(
            hidden=int(cfg.hidden_size),
            embeddings=[self.decoder.embed_tokens],
            layers=[self.layer_rotation(block) for block in self.blocks()],
            final_norm_readers=(self.decoder.norm, [self.lm_head]),
            norm_scale=self._norm_scale,
            set_norm_identity=self._set_norm_identity,
            untie=self._untie,
            layout=f"{name}: {lay.describe()}" + ("" if self.arch is not None else " (generic decoder path)"),
            names={m: n for n, m in self.model.named_modules()},
        )

    # --- io ---------------------------------------------------------------------------
    def config_dict(self) -> dict:
        cfg = self.model.config.to_dict()
        return {"model_class": type(self.model).__name__, "config": cfg}

    @classmethod
    def from_config_dict(cls, data: dict) -> nn.Module:
        import transformers

        model_cls = getattr(transformers, data["model_class"], None)
        if model_cls is None:
            raise ValueError(f"transformers has no class {data['model_class']!r} (installed "
                             f"{transformers.__version__})")
        arch = ARCHITECTURES.get(data["model_class"])
        config_cls = getattr(transformers, arch["config"]) if arch is not None else model_cls.config_class
        config = config_cls.from_dict(data["config"])
        return model_cls(config).eval()

    # --- what applications read (vtquant.analyze) -----------------------------------------------
    def attention_spec(self) -> Any:
        """q / k / v / gate projections of each decoder layer, grouped-query shape and the rotary
        embedding's inverse frequencies (LLaMA's "rotate half" convention)."""
        from .spec import AttentionSpec, RowSlice

        cfg = self.model.config
        heads = int(cfg.num_attention_heads)
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        blocks = self.blocks()
        layout = self.layout
        rotary = getattr(self.decoder, "rotary_emb", None)
        inv_freq = getattr(rotary, "inv_freq", None) if rotary is not None else None
        inputs = None
        if layout.fused_qkv:  # Phi-3: one qkv_proj, split into row slices [q | k | v]
            qkv = [b.get_submodule(layout.attn_readers[0]) for b in blocks]
            hq, hk = heads * head_dim, kv_heads * head_dim
            q = [RowSlice(m, 0, hq) for m in qkv]
            k = [RowSlice(m, hq, hq + hk) for m in qkv]
            v = [RowSlice(m, hq + hk, hq + 2 * hk) for m in qkv]
            inputs = qkv
        else:
            q, k, v = ([b.get_submodule(name) for b in blocks] for name in layout.attn_readers)
        attns = [b.get_submodule(layout.attn_readers[0].rpartition(".")[0]) for b in blocks]
        rope_note = layer_inv = None
        if inv_freq is None and rotary is not None:  # Gemma-3: one rotary per layer type (sliding / full)
            layer_inv = [getattr(rotary, f"{getattr(a, 'layer_type', None)}_inv_freq", None) for a in attns]
            if any(f is None for f in layer_inv):
                layer_inv = None
                rope_note = (f"{type(rotary).__name__} keeps no inv_freq this analysis can read: RoPE section "
                             "skipped, attention maps only from the model")
            else:
                layer_inv = [f.detach().float().cpu() for f in layer_inv]
                rope_note = (f"{type(rotary).__name__} uses a different RoPE base per layer type (sliding / full "
                             "attention): the per-frequency RoPE section is skipped (the attention recompute uses "
                             "each layer's own frequencies)")
        norms = {name: [getattr(a, name, None) if not isinstance(getattr(a, name, None), nn.Identity) else None
                        for a in attns] for name in ("q_norm", "k_norm")}
        windows = [getattr(a, "sliding_window", None) for a in attns]
        softcap = getattr(attns[0], "attn_logit_softcapping", None) or getattr(cfg, "attn_logit_softcapping", None)
        scaling = getattr(attns[0], "scaling", None)
        return AttentionSpec(
            q=q, k=k, v=v, mlp_in=[b.get_submodule(layout.mlp_readers[0]) for b in blocks],
            num_heads=heads, num_kv_heads=kv_heads,
            head_dim=head_dim, inv_freq=None if inv_freq is None else inv_freq.detach().float().cpu(),
            rope_scaling=float(getattr(rotary, "attention_scaling", 1.0) or 1.0), causal=True, inputs=inputs,
            rope_note=rope_note,
            q_norm=norms["q_norm"] if any(n is not None for n in norms["q_norm"]) else None,
            k_norm=norms["k_norm"] if any(n is not None for n in norms["k_norm"]) else None,
            scaling=None if scaling is None else float(scaling), softcap=None if softcap is None else float(softcap),
            windows=windows if any(w is not None for w in windows) else None, layer_inv_freq=layer_inv,
            input_label=("normalized attention input" if layout.pre_attn_norm is not None else
                         f"raw residual stream ({layout.kind} layout: no norm in front of the projections)"))

    def analysis_forward(self, batch: Any, attentions: bool = False) -> tuple:
        """Logits ``[T, V]`` and, with ``attentions`` (eager attention), the maps ``[H, T, T]`` per layer."""
        out = self.model(input_ids=batch, use_cache=False, output_attentions=attentions)
        att = [a[0].float() for a in out.attentions] if attentions and getattr(out, "attentions", None) else None
        return out.logits[0].float(), att


def tiny_config(arch: str = "LlamaForCausalLM", **overrides: Any) -> Any:
    """A tiny random config of a supported architecture (tests and examples).

    Gemma-2 / Gemma-3 get a sliding window shorter than the test sequences and alternating
    sliding / full layers, Gemma-2 its logit soft-capping; token ids out of the tiny vocabulary
    (Phi-3's and OLMo-2's defaults) are set to 0.
    """
    import transformers

    base = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                tie_word_embeddings=True)
    if arch in ("GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Qwen3ForCausalLM"):
        base["head_dim"] = 16
    if arch in ("Gemma2ForCausalLM", "Gemma3ForCausalLM"):
        base.update(sliding_window=8, query_pre_attn_scalar=16)
    if arch == "Gemma2ForCausalLM":
        base.update(attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    if arch in ("Phi3ForCausalLM", "Olmo2ForCausalLM"):  # their default token ids lie outside the tiny vocabulary
        base.update(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    base.update(overrides)
    if arch in ("Gemma2ForCausalLM", "Gemma3ForCausalLM") and "layer_types" not in overrides:
        base["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention"
                               for i in range(base["num_hidden_layers"])]
    config = getattr(transformers, ARCHITECTURES[arch]["config"])(**base)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value >= config.vocab_size and key not in overrides:
            setattr(config, key, 0)
    return config
