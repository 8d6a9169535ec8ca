"""Sink-token detection and the per-forward sink state (docs/method.md step 2 and 4; paper App. on detection).

A *sink* is a token whose peak |activation| at a probe point (the input of an
MLP's second Linear) is ``alpha`` times the typical token peak.  The typical
peak (``reference``) is the median per-token peak measured on calibration data,
so detection works on single tokens during cached decoding as well as on
whole prompts.  The sink set of a forward pass is the union of every stage's
detections plus positions an adapter knows (first token, CLS, registers); it
is frozen for all later layers of that pass.  Tokens already in a KV cache
were computed with their sink handling, so a token stays a sink for its life.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn


def token_peaks(x: torch.Tensor) -> torch.Tensor:
    """Per-token peak ``max_c |x|`` over the last (channel) axis."""
    return x.detach().abs().amax(dim=-1)


class SinkState:
    """The sink set of the forward pass in flight, shared by every guard of one model.

    Masks are kept as ``[batch, tokens]`` whatever the model's layout; ``layout``
    (``"bsd"`` batch-first or ``"sbd"`` sequence-first) says how to read a
    Linear input.

    Attributes:
        mask: bool ``[B, T]`` of sinks for the tokens of this call (``None`` before any is known).
        types: long ``[B, T]`` template type of each sink, ``-1`` elsewhere.
        found_by: dict stage -> bool ``[B, T]`` of what each stage detected (for reports).
        num_types: number of template types ``K``.
        det_templates: per stage name, ``[K, C]`` detection templates for least-squares assignment.
        num_known_types: vision-style fixed types: known sinks keep the adapter's type, content sinks
            share type ``num_known_types`` (``None``: LLM prompts, types by order / least squares).
        generation: bumped whenever the sink set may change (caches key on it).
    """

    def __init__(self, layout: str = "bsd", num_types: int = 1) -> None:
        if layout not in ("bsd", "sbd"):
            raise ValueError(f"layout must be 'bsd' or 'sbd', got {layout!r}")
        self.layout = layout
        self.num_types = num_types
        self.det_templates: dict[str, torch.Tensor] = {}
        # fixed-type mode (vision adapters): known sinks carry the types the adapter gives them
        # (CLS, each register), every content-detected sink gets type ``num_known_types``
        self.num_known_types: Optional[int] = None
        self.known_types: Optional[torch.Tensor] = None
        self.active = True
        self.is_prefill = True
        self.generation = 0  # bumps whenever the sink set may change
        self.mask: Optional[torch.Tensor] = None
        self.types: Optional[torch.Tensor] = None
        self.found_by: dict[str, torch.Tensor] = {}
        self._index_key: Optional[tuple] = None
        self._index: Optional[torch.Tensor] = None
        self.reset()

    def reset(self, known: Optional[torch.Tensor] = None, is_prefill: bool = True,
              known_types: Optional[torch.Tensor] = None) -> None:
        """Start a new forward pass; ``known`` is a bool ``[B, T]`` of adapter-known sinks.

        ``known_types`` (long ``[B, T]``) fixes the template type of each known sink (vision:
        CLS, each register); without it known sinks are typed by order, as in LLM prompts.
        """
        self.generation += 1
        self.mask = None if known is None else known.clone()
        self.types = None
        self.known_types = None
        self.found_by: dict[str, torch.Tensor] = {}
        self.is_prefill = is_prefill
        if known is not None:
            self.found_by["known"] = known.clone()
            if known_types is not None:
                self.known_types = torch.where(known, known_types.long(), torch.full_like(known_types.long(), -1))
                self.types = self.known_types.clone()
            else:
                self.types = self._order_types(self.mask)

    # ---- geometry helpers -------------------------------------------------------------
    def batch_tokens(self, x: torch.Tensor) -> tuple[int, int]:
        if x.dim() == 2:
            return 1, x.shape[0]
        if self.layout == "bsd":
            return x.shape[0], x.shape[1]
        return x.shape[1], x.shape[0]

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """Flatten a Linear input to ``[B*T, C]`` in ``[B, T]`` mask order."""
        if x.dim() == 2:
            return x
        if self.layout == "sbd":
            x = x.transpose(0, 1)
        return x.reshape(-1, x.shape[-1])

    def unrows(self, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if like.dim() == 2:
            return rows
        if self.layout == "bsd":
            return rows.reshape(*like.shape[:-1], rows.shape[-1])
        b, t = like.shape[1], like.shape[0]
        return rows.reshape(b, t, rows.shape[-1]).transpose(0, 1)

    def mask_for(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The current sink mask if it matches ``x``'s tokens and holds any sink, else ``None``."""
        if not self.active or self.mask is None:
            return None
        if tuple(self.mask.shape) != self.batch_tokens(x):
            return None
        if self.flat_index() is None:  # cached per sink set: no device sync on every Linear
            return None
        return self.mask

    # ---- updates ----------------------------------------------------------------------
    def _order_types(self, mask: torch.Tensor) -> torch.Tensor:
        order = torch.cumsum(mask.long(), dim=1) - 1
        types = torch.where(mask, order.clamp(max=self.num_types - 1), torch.full_like(order, -1))
        return types

    def add(self, stage: str, new: torch.Tensor, features: Optional[torch.Tensor] = None) -> None:
        """Union ``new`` (bool ``[B, T]``) into the sink set and (re)assign template types.

        Assignment follows the paper: in order of position when a sequence holds exactly
        ``K`` sinks (in a prompt), otherwise the template type with the least squared
        error between the token's probe features and that stage's detection template.
        """
        self.found_by[stage] = new.clone() if stage not in self.found_by else self.found_by[stage] | new
        self.mask = new.clone() if self.mask is None else (self.mask | new)
        self.generation += 1
        if self.num_known_types is not None:  # fixed types: known keep theirs, content sinks share one
            content = min(self.num_known_types, self.num_types - 1)
            types = torch.where(self.mask, torch.full_like(self.mask, content, dtype=torch.long),
                                torch.full_like(self.mask, -1, dtype=torch.long))
            if self.known_types is not None:
                types = torch.where(self.known_types >= 0, self.known_types, types)
            self.types = types
            return
        types = self._order_types(self.mask)
        det = self.det_templates.get(stage)
        if det is not None and features is not None and self.num_types > 1:
            counts = self.mask.sum(dim=1)
            lse = (features.unsqueeze(-2) - det.to(features)).pow(2).sum(-1).argmin(-1)  # [B, T]
            use_lse = (~((counts == self.num_types) & self.is_prefill)).unsqueeze(1) & self.mask
            types = torch.where(use_lse, lse, types)
        self.types = types

    def flat_index(self) -> Optional[torch.Tensor]:
        """Flat ``[B*T]`` row indices of the current sinks (cached until the set changes), or ``None``."""
        mask = self.mask
        if mask is None:
            return None
        key = (self.generation, mask._version)
        if self._index_key != key:
            self._index_key = key
            self._index = mask.reshape(-1).nonzero().squeeze(1)
        return self._index if self._index.numel() else None

    def positions(self) -> list[list[int]]:
        """Sink positions per batch row for the current pass."""
        if self.mask is None:
            return []
        return [row.nonzero().flatten().tolist() for row in self.mask]


class SinkDetector(nn.Module):
    """Detects sinks from a probe tensor (a Linear's input) and adds them to the shared state.

    Args:
        stage: name of the stage (``stage1``, ``stage2``).
        alpha: ratio threshold on token peak / reference.
        reference: median per-token peak at this probe on calibration data.
    """

    def __init__(self, stage: str, alpha: float, reference: float) -> None:
        super().__init__()
        self.stage = stage
        self.alpha = float(alpha)
        self.register_buffer("reference", torch.tensor(float(reference)))
        self.state: Optional[SinkState] = None

    def extra_repr(self) -> str:
        return f"stage={self.stage}, alpha={self.alpha:g}, reference={float(self.reference):.4g}"

    def ratios(self, x: torch.Tensor, state: SinkState) -> torch.Tensor:
        b, t = state.batch_tokens(x)
        return (token_peaks(state.rows(x)) / self.reference.clamp_min(1e-12)).view(b, t)

    def forward(self, x: torch.Tensor) -> None:
        state = self.state
        if state is None or not state.active:
            return
        ratios = self.ratios(x, state)
        new = ratios > self.alpha
        if bool(new.any()) or state.mask is None:
            b, t = ratios.shape
            feats = None  # the probe's features only where types are assigned by least squares (not fixed types)
            if state.num_known_types is None and self.stage in state.det_templates and state.num_types > 1:
                feats = state.rows(x).detach().float().view(b, t, -1)
            state.add(self.stage, new, features=feats)


class ResidualDetector(SinkDetector):
    """Detects sinks from the residual stream at a block output (a norm-based, channel-baselined score).

    The score of a token is ``||h_t - mu|| / reference``: ``mu`` is the per-channel median of the
    block output over calibration tokens (so an always-on outlier channel, large on every token,
    neither hides nor fakes a sink) and ``reference`` the median score.  The norm makes the score
    invariant to a rotation of the residual stream (it is computed in whatever basis the stream is in).

    Args:
        stage: name of the stage.
        alpha: ratio threshold (the model-relative fence of this probe).
        reference: median calibration score.
        hidden: residual width (size of ``baseline``).
    """

    def __init__(self, stage: str, alpha: float, reference: float, hidden: int) -> None:
        super().__init__(stage, alpha, reference)
        self.register_buffer("baseline", torch.zeros(hidden))

    def extra_repr(self) -> str:
        return super().extra_repr() + ", site=residual"

    def ratios(self, x: torch.Tensor, state: SinkState) -> torch.Tensor:
        b, t = state.batch_tokens(x)
        rows = state.rows(x).detach()
        scores = (rows.float() - self.baseline.to(rows.device)).norm(dim=-1)
        return (scores / self.reference.clamp_min(1e-12)).view(b, t)


def residual_scores(rows: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """``||h_t - baseline||`` of residual rows ``[N, C]`` (float32)."""
    return (rows.detach().float() - baseline.to(rows.device)).norm(dim=-1)


def robust_fence(ratios: torch.Tensor, k: float, floor: float, min_sigma: float = 0.05) -> tuple[float, float, float]:
    """The model-relative outlier threshold of one probe (docs/method.md: thresholds from the model's own data).

    ``tau = max(floor, exp(median(log r) + k * sigma))`` with ``sigma = 1.4826 * MAD(log r)`` (at least
    ``min_sigma``): a token is an outlier when its log ratio lies ``k`` robust standard deviations
    above the bulk of this probe's tokens.

    Returns:
        ``(tau, median of log r, sigma)``.
    """
    lr = ratios.double().clamp_min(1e-12).log()
    med = float(lr.median())
    sigma = max(float((lr - med).abs().median()) * 1.4826, min_sigma)
    return max(float(floor), float(torch.tensor(med + k * sigma).exp())), med, sigma


def find_emergence_layer(sink_peak_ratio: torch.Tensor, alpha: float) -> Optional[int]:
    """The layer whose probe ratio is largest, if that ratio exceeds ``alpha``.

    Args:
        sink_peak_ratio: ``[L]`` the largest token ratio seen at each layer's probe.
    """
    best = int(torch.argmax(sink_peak_ratio))
    return best if float(sink_peak_ratio[best]) > alpha else None


def find_cancellation_layer(sink_residual_peak: torch.Tensor, emergence: int,
                            min_drop: float = 0.5) -> Optional[int]:
    """The layer (after emergence) whose block output lowers the sinks' residual peak the most.

    It must really cancel the spike: the drop must remove at least ``min_drop`` of the sinks'
    residual norm before it (SmolLM2 and the implanted models: > 90 %).  A spike that only fades
    (the real CLIP ViT-B/16: 61 -> 56 at the last layer) has no cancellation layer, so no residual
    is restored.

    Args:
        sink_residual_peak: ``[L]`` mean over calibration sinks of the peak |h| at each block output.
    """
    if emergence is None or emergence + 1 >= len(sink_residual_peak):
        return None
    drops = sink_residual_peak[emergence:-1] - sink_residual_peak[emergence + 1:]
    best = int(torch.argmax(drops))
    if float(drops[best]) <= min_drop * float(sink_residual_peak[emergence + best]):
        return None
    return emergence + 1 + best


def choose_stage1(
    ratios: torch.Tensor, sink_mask: torch.Tensor, emergence: int, margin: float, min_recall: float
) -> Optional[tuple[int, float, float]]:
    """Earliest layer before emergence that separates the emergence sinks from the rest.

    Args:
        ratios: ``[L, N]`` per-token ratio at each layer's probe over N calibration tokens.
        sink_mask: ``[N]`` tokens detected at the emergence layer.
        emergence: the emergence layer index.
        margin: threshold = margin x (largest non-sink ratio at that layer).
        min_recall: share of sinks the threshold must catch.

    Returns:
        ``(layer, alpha0, recall)`` or ``None`` when no layer qualifies.
    """
    if emergence is None or not bool(sink_mask.any()) or bool(sink_mask.all()):
        return None
    for layer in range(emergence):
        non_sink_max = float(ratios[layer][~sink_mask].max())
        alpha0 = margin * non_sink_max
        recall = float((ratios[layer][sink_mask] > alpha0).float().mean())
        if recall >= min_recall and alpha0 > 1.0:
            return layer, alpha0, recall
    return None
