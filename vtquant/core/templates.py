"""Templates, clamp-and-insert and residual restoration (METHOD.md steps 3-5).

For every quantized Linear in the insertion range a :class:`SinkGuard` holds the
pre-computed output of that Linear for each template type ``k``:
``W t_k^(l) + b`` with ``t_k^(l)`` the mean full-precision input over calibration
sinks.  At run time the sink rows of the quantized input are zeroed (so the
per-tensor scale sees only semantic tokens) and their output rows are replaced
by the template outputs: O(#sinks) work per layer.  Outside the range where the
template is stable (``template_min_cosine``) the guard runs in ``fp-row`` mode:
sink rows are still kept out of the quantized tensor, but their output is the
Linear applied to their full-precision input.

:class:`ResidualRestore` writes the calibrated residual state of the sinks back
at the output of the layer that cancels the spike, so later layers are exact.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .sinks import SinkState


class SinkGuard(nn.Module):
    """Clamp sink rows out of a quantized Linear input and insert their outputs.

    Args:
        out_features: the Linear's output width.
        num_types: template types K.
        mode: ``template`` (insert pre-computed outputs for the types marked in ``template_ok``,
            full-precision rows for the others), ``fp-row`` (compute sink rows in full
            precision), ``clamp`` (zero them and insert nothing: ablation), ``off``.
    """

    def __init__(self, out_features: int, num_types: int, mode: str = "template",
                 exclude_from_calibration: bool = True) -> None:
        super().__init__()
        if mode not in ("template", "fp-row", "clamp", "off"):
            raise ValueError(f"SinkGuard mode {mode!r}; use template, fp-row, clamp or off")
        self.mode = mode
        self.num_types = num_types
        self.exclude_from_calibration = exclude_from_calibration
        self.register_buffer("template_out", torch.zeros(num_types, out_features))
        self.register_buffer("template_cosine", torch.zeros(num_types))
        self.register_buffer("template_ok", torch.ones(num_types, dtype=torch.bool))
        self.state: Optional[SinkState] = None
        self.recorder: Optional[list] = None

    def extra_repr(self) -> str:
        cos = ", ".join(f"{c:.3f}" for c in self.template_cosine.tolist())
        text = f"mode={self.mode}, templates={self.num_types}, cos_to_mean=[{cos}]"
        if self.mode == "template" and not bool(self.template_ok.all()):
            text += f", fp-row types={(~self.template_ok).nonzero().flatten().tolist()}"
        return text

    def rows_through_weight(self, sink_inputs: torch.Tensor, flat_mask: torch.Tensor,
                            state: SinkState) -> torch.Tensor:
        """The sink input rows that :meth:`write_sink_rows` multiplies by the (quantized) weight:
        all of them in ``fp-row`` mode, those of types without a stable template in ``template`` mode."""
        if self.mode == "fp-row":
            return sink_inputs
        if self.mode == "template":
            types = state.types.reshape(-1)[flat_mask].clamp_min(0)
            return sink_inputs[~self.template_ok[types]]
        return sink_inputs[:0]

    def write_sink_rows(self, y_rows: torch.Tensor, sink_inputs: torch.Tensor, flat_mask: torch.Tensor,
                        state: SinkState, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """Return ``y_rows`` with the sink rows replaced according to ``mode``."""
        if self.recorder is not None:
            types = state.types.reshape(-1)[flat_mask] if state.types is not None else torch.zeros(
                int(flat_mask.sum()), dtype=torch.long, device=flat_mask.device)
            self.recorder.append((sink_inputs.detach().float().cpu(), types.cpu()))
        if self.mode == "template":
            types = state.types.reshape(-1)[flat_mask].clamp_min(0)
            out = self.template_out.to(y_rows.dtype)[types]
            unstable = ~self.template_ok[types]
            if bool(unstable.any()):  # types whose input is not constant here: full-precision rows
                out[unstable] = F.linear(sink_inputs[unstable], weight,
                                         None if bias is None else bias.to(sink_inputs.dtype))
        elif self.mode == "fp-row":
            out = F.linear(sink_inputs, weight, None if bias is None else bias.to(sink_inputs.dtype))
        else:  # clamp: the zeroed row's output (bias only) stays
            return y_rows
        y_rows = y_rows.clone()
        y_rows[flat_mask] = out
        return y_rows


class ResidualRestore(nn.Module):
    """Replaces the sinks' residual-stream rows by their calibrated template at a block output."""

    def __init__(self, hidden: int, num_types: int) -> None:
        super().__init__()
        self.register_buffer("template", torch.zeros(num_types, hidden))
        self.register_buffer("restore_type", torch.ones(num_types, dtype=torch.bool))
        self.state: Optional[SinkState] = None
        self.enabled = True

    def extra_repr(self) -> str:
        return (f"templates={self.template.shape[0]}, hidden={self.template.shape[1]}, "
                f"restored types={self.restore_type.nonzero().flatten().tolist()}")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        state = self.state
        if not self.enabled or state is None:
            return hidden
        mask = state.mask_for(hidden)
        if mask is None:
            return hidden
        types_all = state.types.reshape(-1).clamp_min(0)
        flat = mask.reshape(-1) & self.restore_type[types_all]
        if not bool(flat.any()):
            return hidden
        rows = state.rows(hidden).clone()
        rows[flat] = self.template.to(rows.dtype)[types_all[flat]]
        return state.unrows(rows, hidden)


def template_statistics(samples: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """Mean template of ``samples`` ``[N, C]`` and its stability.

    Returns:
        ``(mean [C], mean cosine of samples to the mean, mean relative spread ||x - m|| / ||m||)``.
    """
    mean = samples.mean(dim=0)
    cosine = F.cosine_similarity(samples, mean.unsqueeze(0), dim=-1).mean()
    spread = ((samples - mean).norm(dim=-1) / mean.norm().clamp_min(1e-12)).mean()
    return mean, float(cosine), float(spread)
