"""Templates, clamp-and-insert and residual restoration (docs/method.md steps 3-5).

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

from typing import Callable, Optional

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
        device: where the buffers live (the guarded Linear's device).
        dtype: dtype of the template outputs (the Linear's compute dtype; default float32).
    """

    def __init__(self, out_features: int, num_types: int, mode: str = "template",
                 exclude_from_calibration: bool = True, device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        if mode not in ("template", "fp-row", "clamp", "off"):
            raise ValueError(f"SinkGuard mode {mode!r}; use template, fp-row, clamp or off")
        self.mode = mode
        self.num_types = num_types
        self.exclude_from_calibration = exclude_from_calibration
        self.register_buffer("template_out", torch.zeros(num_types, out_features, device=device,
                                                         dtype=dtype or torch.float32))
        self.register_buffer("template_cosine", torch.zeros(num_types, device=device))
        self.register_buffer("template_ok", torch.ones(num_types, dtype=torch.bool, device=device))
        self.state: Optional[SinkState] = None
        self.recorder: Optional[list] = None

    def extra_repr(self) -> str:
        cos = ", ".join(f"{c:.3f}" for c in self.template_cosine.tolist())
        text = f"mode={self.mode}, templates={self.num_types}, cos_to_mean=[{cos}]"
        if self.mode == "template" and not bool(self.template_ok.all()):
            text += f", fp-row types={(~self.template_ok).nonzero().flatten().tolist()}"
        return text

    # ---- the sink-row policy: one place for fake quantization, real kernels and ONNX export ----
    # Every mode but ``off`` zeroes the sink rows of the quantized input (the per-tensor scale sees
    # only semantic tokens).  The sink rows of the output are then, per template type:
    #   template type (``template`` mode, ``template_ok``): the pre-computed ``W t + b``;
    #   full-precision type (``fp-row`` mode, or a type without a stable template): ``x_sink W^T + b``;
    #   neither (``clamp``): left as the zero row's output (the bias).
    @property
    def zeroes_inputs(self) -> bool:
        """Sink rows are zeroed in the quantized input."""
        return self.mode != "off"

    @property
    def writes_rows(self) -> bool:
        """Sink rows of the output are overwritten (template or full-precision rows)."""
        return self.mode in ("template", "fp-row")

    def template_types(self) -> torch.Tensor:
        """bool ``[K]``: types whose output rows are the inserted template."""
        if self.mode == "template":
            return self.template_ok
        return torch.zeros_like(self.template_ok)

    def fp_types(self) -> torch.Tensor:
        """bool ``[K]``: types whose output rows are the Linear applied to the full-precision input row."""
        if self.mode == "fp-row":
            return torch.ones_like(self.template_ok)
        if self.mode == "template":
            return ~self.template_ok
        return torch.zeros_like(self.template_ok)

    def rows_through_weight(self, sink_inputs: torch.Tensor, flat_mask: torch.Tensor,
                            state: SinkState) -> torch.Tensor:
        """The sink input rows that are multiplied by the (quantized) weight in full precision."""
        types = state.types.reshape(-1)[flat_mask].clamp_min(0)
        return sink_inputs[self.fp_types()[types]]

    def sink_outputs(self, types: torch.Tensor, sink_inputs: Optional[torch.Tensor],
                     linear: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype,
                     template_rows: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """Output rows of the sinks of ``types`` ``[S]`` per the policy above (``None``: rows stay).

        Args:
            types: template type of each sink row.
            sink_inputs: their full-precision input rows ``[S, in]`` (rotated like the Linear's input);
                may be ``None`` where no type is computed in full precision (fused kernels).
            linear: the Linear in full precision on input rows (quantized weight, no activation quantization).
            dtype: output dtype.
            template_rows: ``template_out[types]`` if already gathered (real kernels cache it per sink set).
        """
        if self.mode == "fp-row":
            return linear(sink_inputs).to(dtype)
        if self.mode != "template":
            return None
        out = template_rows if template_rows is not None else self.template_out.to(dtype)[types]
        fp = self.fp_types()[types]
        if bool(fp.any()):  # types whose input is not constant here: full-precision rows
            out = out.clone()
            out[fp] = linear(sink_inputs[fp]).to(dtype)
        return out

    def write_sink_rows(self, y_rows: torch.Tensor, sink_inputs: torch.Tensor, flat_mask: torch.Tensor,
                        state: SinkState, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """Return ``y_rows`` with the sink rows replaced according to the policy."""
        types = state.types.reshape(-1)[flat_mask] if state.types is not None else torch.zeros(
            int(flat_mask.sum()), dtype=torch.long, device=flat_mask.device)
        if self.recorder is not None:
            self.recorder.append((sink_inputs.detach().float().cpu(), types.cpu()))
        out = self.sink_outputs(types.clamp_min(0), sink_inputs,
                                lambda rows: F.linear(rows, weight, None if bias is None else bias.to(rows.dtype)),
                                y_rows.dtype)
        if out is None:
            return y_rows
        y_rows = y_rows.clone()
        y_rows[flat_mask] = out
        return y_rows


class ResidualRestore(nn.Module):
    """Replaces the sinks' residual-stream rows by their calibrated template at a block output.

    Args:
        hidden: residual width.
        num_types: template types K.
        device: where the buffers live (the block's device).
        dtype: dtype of the residual template (the residual stream's dtype; default float32).
    """

    def __init__(self, hidden: int, num_types: int, device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.register_buffer("template", torch.zeros(num_types, hidden, device=device, dtype=dtype or torch.float32))
        self.register_buffer("restore_type", torch.ones(num_types, dtype=torch.bool, device=device))
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
