"""transformers decoder-only LMs: Llama (SmolLM2, LLaMA-2/3), Qwen2, Mistral, Gemma.

Per-architecture knowledge lives in the small :data:`ARCHITECTURES` table keyed
by the HF class name (llm-compressor's mapping idea): where the blocks are, how
the projections are named, and what the norm scale means (Gemma stores
``1 + w``).  Causal LMs make their first token the attention sink whatever it
is (SmolLM2 adds no BOS), so ``first_token`` is offered as a known sink; it is
the first non-padding token of a prompt, and no new token of a cached decoding
step.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from ..config import ConfigError
from ..core.rotation import LayerRotation, RotationSpec
from .base import KnownSinks, ModelAdapter, register_adapter

ARCHITECTURES = {
    "LlamaForCausalLM": {"norm": "rms", "config": "LlamaConfig"},
    "Qwen2ForCausalLM": {"norm": "rms", "config": "Qwen2Config"},
    "MistralForCausalLM": {"norm": "rms", "config": "MistralConfig"},
    "GemmaForCausalLM": {"norm": "rms-plus-one", "config": "GemmaConfig"},
}

_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@register_adapter(*ARCHITECTURES)
class HFDecoderAdapter(ModelAdapter):
    """Adapter for transformers ``*ForCausalLM`` decoders listed in :data:`ARCHITECTURES`."""

    token_layout = "bsd"
    family = "hf-decoder"
    output_kind = "logits"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.arch = ARCHITECTURES[type(model).__name__]

    @property
    def decoder(self) -> nn.Module:
        return self.model.model

    def blocks(self) -> list[nn.Module]:
        return list(self.decoder.layers)

    def block_linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        return {name: block.get_submodule(name) for name in _LINEARS}

    def probe_name(self) -> str:
        return "mlp.down_proj"

    def input_groups(self, block: nn.Module) -> list[list[str]]:
        return [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["mlp.gate_proj", "mlp.up_proj"]]

    def kv_linears(self) -> tuple[str, ...]:
        return ("self_attn.k_proj", "self_attn.v_proj")

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
    def _norm_scale(self, norm: nn.Module) -> torch.Tensor:
        w = norm.weight.data.float()
        return w + 1.0 if self.arch["norm"] == "rms-plus-one" else w

    def _set_norm_identity(self, norm: nn.Module) -> None:
        norm.weight.data.fill_(0.0 if self.arch["norm"] == "rms-plus-one" else 1.0)

    def _untie(self) -> None:
        head, emb = self.model.lm_head, self.decoder.embed_tokens
        if head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr():
            head.weight = nn.Parameter(emb.weight.detach().clone())
        self.model.config.tie_word_embeddings = False
        if hasattr(self.model, "_tied_weights_keys"):
            self.model._tied_weights_keys = None

    def rotation_spec(self) -> RotationSpec:
        cfg = self.model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        layers = []
        for block in self.blocks():
            attn, mlp = block.self_attn, block.mlp
            layers.append(LayerRotation(
                norm_readers=[(block.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj]),
                              (block.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])],
                writers=[attn.o_proj, mlp.down_proj],
                online=[mlp.down_proj],
                value_output=(attn.v_proj, attn.o_proj, head_dim),
            ))
        return RotationSpec(
            hidden=cfg.hidden_size,
            embeddings=[self.decoder.embed_tokens],
            layers=layers,
            final_norm_readers=(self.decoder.norm, [self.model.lm_head]),
            norm_scale=self._norm_scale,
            set_norm_identity=self._set_norm_identity,
            untie=self._untie,
        )

    # --- io ---------------------------------------------------------------------------
    def config_dict(self) -> dict:
        cfg = self.model.config.to_dict()
        return {"model_class": type(self.model).__name__, "config": cfg}

    @classmethod
    def from_config_dict(cls, data: dict) -> nn.Module:
        import transformers

        arch = ARCHITECTURES[data["model_class"]]
        config_cls = getattr(transformers, arch["config"])
        config = config_cls.from_dict(data["config"])
        model_cls = getattr(transformers, data["model_class"])
        return model_cls(config).eval()

    # --- what applications read (vtquant.analyze) -----------------------------------------------
    def attention_spec(self) -> Any:
        """q / k / v / gate projections of each decoder layer, grouped-query shape and the rotary
        embedding's inverse frequencies (LLaMA's "rotate half" convention)."""
        from .spec import AttentionSpec

        cfg = self.model.config
        heads = int(cfg.num_attention_heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        blocks = self.blocks()
        rotary = getattr(self.decoder, "rotary_emb", None)
        inv_freq = getattr(rotary, "inv_freq", None) if rotary is not None else None
        return AttentionSpec(
            q=[b.self_attn.q_proj for b in blocks], k=[b.self_attn.k_proj for b in blocks],
            v=[b.self_attn.v_proj for b in blocks], mlp_in=[b.mlp.gate_proj for b in blocks],
            num_heads=heads, num_kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads),
            head_dim=head_dim, inv_freq=None if inv_freq is None else inv_freq.detach().float().cpu(),
            rope_scaling=float(getattr(rotary, "attention_scaling", 1.0) or 1.0), causal=True)

    def analysis_forward(self, batch: Any, attentions: bool = False) -> tuple:
        """Logits ``[T, V]`` and, with ``attentions`` (eager attention), the maps ``[H, T, T]`` per layer."""
        out = self.model(input_ids=batch, use_cache=False, output_attentions=attentions)
        att = [a[0].float() for a in out.attentions] if attentions and getattr(out, "attentions", None) else None
        return out.logits[0].float(), att


def tiny_config(arch: str = "LlamaForCausalLM", **overrides: Any) -> Any:
    """A tiny random config of a supported architecture (tests and examples)."""
    import transformers

    base = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                tie_word_embeddings=True)
    if arch == "GemmaForCausalLM":
        base["head_dim"] = 16
    base.update(overrides)
    return getattr(transformers, ARCHITECTURES[arch]["config"])(**base)
