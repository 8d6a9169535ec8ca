"""Exact residual-stream rotation of pre-LayerNorm transformers (ViT, CLIP and DINOv2 towers).

QuaRot-style rotation (:mod:`vtquant.core.rotation`) folds ``Q`` into an RMSNorm's readers because
RMSNorm commutes with an orthogonal ``Q`` once its scale is folded away.  LayerNorm also
subtracts the mean over channels, ``C h`` with ``C = I - 1 1^T / d``, and in the rotated basis
``h' = h Q`` that centring is a projection: ``(h C) Q = h' (I - u u^T)`` with
``u = Q^T 1 / sqrt(d)``.  So every LayerNorm that reads the rotated stream becomes a
:class:`ProjectedRMSNorm` (remove the component along ``u``, divide by the RMS: O(d) per token,
no parameters but ``u``), and its affine goes into the readers:

* reader ``y = W LN(h) + c``  ->  ``W' = W diag(w) Q``, ``c' = c + W b`` (``w``, ``b`` the LN's affine);
* writer ``y = W x + c`` into the stream  ->  ``W' = Q^T W``, ``c' = c Q`` (layer scales folded in first);
* the stream's start: embedding tensors (patch projection, class / register / position
  embeddings) get ``Q`` on their channel axis; where a LayerNorm produces the stream (CLIP's
  ``ln_pre``) it becomes a plain LayerNorm followed by an explicit ``Linear`` holding
  ``diag(w) Q`` and ``b Q`` (:class:`NormThenLinear`, outside the blocks, not quantized);
* the stream's end: one ``Q^T`` where the last block's output leaves the block stack
  (:class:`StreamUnrotate`), so the final norm, pooling, heads and the returned hidden states are
  exactly the original ones (intermediate hidden states a model returns stay rotated);
* the MLP's second Linear gets an online Hadamard of its input (as a decoder's ``down_proj``)
  and each head's value / output pair a folded per-head Hadamard.

Everything is exact in exact arithmetic (tests check a float64 tiny model to 1e-5).  The adapter
describes the model with an :class:`LNRotationSpec`; blocks of an unknown shape (post-norm,
parallel, gated attention) are refused by the adapter, not guessed.  ``Q`` is
``random_hadamard(d, seed)``, the same matrix :func:`vtquant.analyze.residual_rotation` returns.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn as nn

from .rotation import _rotate_input_online, random_hadamard, rotate_value_heads_


class ProjectedRMSNorm(nn.Module):
    """LayerNorm's normalization of a rotated stream: ``p = x - (x.u) u``, ``p / sqrt(mean(p^2) + eps)``.

    With ``x = h Q`` and ``u = Q^T 1 / sqrt(d)`` this equals ``((h - mean(h)) / std(h)) Q``: the
    LayerNorm of ``h`` without its affine, rotated.  No affine of its own (folded into the readers).
    """

    def __init__(self, u: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.register_buffer("u", u.detach().clone())
        self.eps = float(eps)

    def extra_repr(self) -> str:
        return f"{self.u.shape[0]}, eps={self.eps:g}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x if dtype in (torch.float32, torch.float64) else x.float()
        u = self.u.to(xf.dtype)
        p = xf - (xf @ u).unsqueeze(-1) * u
        return (p * torch.rsqrt(p.pow(2).mean(dim=-1, keepdim=True) + self.eps)).to(dtype)


class NormThenLinear(nn.Module):
    """A LayerNorm whose output starts the rotated stream: normalization, then ``Linear(diag(w) Q, b Q)``."""

    def __init__(self, norm: nn.LayerNorm, q: torch.Tensor) -> None:
        super().__init__()
        d = q.shape[0]
        w, b = _ln_affine(norm, d)
        ref = getattr(norm, "weight", None)
        dev, dt = (ref.device, ref.dtype) if ref is not None else (q.device, torch.float32)
        self.norm = nn.LayerNorm(d, eps=norm.eps, elementwise_affine=False)
        self.linear = nn.Linear(d, d, bias=True, device=dev, dtype=dt)
        with torch.no_grad():
            qd = q.double().to(w.device)
            self.linear.weight.copy_((w.unsqueeze(1) * qd).T.to(dt))  # y = n diag(w) Q + b Q
            self.linear.bias.copy_((b @ qd).to(dt))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x))


class StreamUnrotate(nn.Module):
    """``h' Q^T``: brings the rotated stream back to the model's own basis where it leaves the blocks."""

    def __init__(self, q: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("q", q.detach().clone())

    def extra_repr(self) -> str:
        return f"{self.q.shape[0]}"

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.q.to(h.dtype).T


def _first_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return value[0]
    return value["last_hidden_state"] if "last_hidden_state" in value else value[0]


def _with_first(value: Any, new: torch.Tensor) -> Any:
    if isinstance(value, torch.Tensor):
        return new
    if isinstance(value, tuple):
        return (new,) + tuple(value[1:])
    if isinstance(value, list):
        return [new] + list(value[1:])
    value.last_hidden_state = new  # a transformers ModelOutput keeps key and attribute in sync
    return value


class _UnrotateOutputHook:
    """Forward hook: un-rotate the first tensor of the module's output (deep-copy safe: reads the module)."""

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> Any:
        return _with_first(output, module.vtquant_unrotate(_first_tensor(output)))


class _UnrotateInputHook:
    """Forward pre-hook: un-rotate the module's first positional input."""

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        return (module.vtquant_unrotate(args[0]),) + tuple(args[1:])


@dataclass
class LNLayerRotation:
    """The rotation-relevant pieces of one pre-LayerNorm block.

    Attributes:
        norm_readers: ``[(LayerNorm, [Linears reading its output])]``.
        writers: Linears that add into the residual stream.
        online: Linears whose input is rotated online (the MLP's second Linear).
        value_output: ``(value Linear, first value row, output Linear, head_dim)`` for the per-head
            rotation, or ``None`` (the value rows of a fused ``qkv`` start at ``2 * width``).
        layer_scales: ``[(module, parameter name, writer Linear)]``: per-channel scales on a writer's
            output, folded into the writer before the rotation (then set to one).
    """

    norm_readers: list = field(default_factory=list)
    writers: list = field(default_factory=list)
    online: list = field(default_factory=list)
    value_output: Optional[tuple] = None
    layer_scales: list = field(default_factory=list)


@dataclass
class LNRotationSpec:
    """How to rotate a pre-LayerNorm tower; built by a vision adapter.

    Attributes:
        hidden: residual width ``d``.
        root: the model (for replacing modules).
        layers: one :class:`LNLayerRotation` per block.
        start_params: ``[(module, name)]``: tensors whose last axis is the residual (class, register,
            position embeddings; an ``nn.Embedding`` is ``(module, "weight")``).
        start_linears: Conv / Linear modules whose output channels are the residual (patch projection).
        start_norms: LayerNorms whose output is the stream's start (replaced by :class:`NormThenLinear`).
        end: ``("output", module)``: the stream is the first output of ``module`` (the block stack,
            the encoder); ``("input", module)``: the first input of ``module`` (the final norm).
        stream_layout: unused by the algebra (the stream's last axis is always the channel axis).
    """

    hidden: int
    root: nn.Module
    layers: list
    start_params: list = field(default_factory=list)
    start_linears: list = field(default_factory=list)
    start_norms: list = field(default_factory=list)
    end: Optional[tuple] = None
    final_norm_readers: Optional[tuple] = None  # the interface smoothing shares with RotationSpec
    layout: str = "pre-LayerNorm tower"  # named in error hints (smoothing, rotation), as RotationSpec.layout
    stream_readers: list = field(default_factory=list)
    """``[(Linear, blocks)]``: Linears outside the tower that read an intermediate hidden state of the
    stream as it is (a LLaVA projector reads layer -2, which stays rotated): their input is ``blocks``
    hidden states side by side, and each block of ``hidden`` input columns gets ``W' = W Q``."""

    @staticmethod
    def norm_scale(norm: nn.Module) -> torch.Tensor:
        """A LayerNorm's multiplicative scale (its weight; ones without affine)."""
        w = getattr(norm, "weight", None)
        return w if w is not None else torch.ones(norm.normalized_shape[-1])

    @staticmethod
    def set_norm_identity(norm: nn.Module) -> None:  # pragma: no cover - LayerNorms are replaced, not reset
        raise NotImplementedError("LayerNorm towers replace their norms (rotation_ln); nothing to reset")

    def untie(self) -> None:
        pass

    def modules_to_replace(self) -> list[nn.Module]:
        return [n for layer in self.layers for n, _ in layer.norm_readers] + list(self.start_norms)


def _locate(root: nn.Module, targets: list[nn.Module]) -> dict[int, tuple[nn.Module, str]]:
    """``{id(module): (parent, attribute name)}`` for every target module under ``root``."""
    want = {id(t) for t in targets}
    found: dict[int, tuple[nn.Module, str]] = {}
    for parent in root.modules():
        for name, child in parent._modules.items():
            if child is not None and id(child) in want and id(child) not in found:
                found[id(child)] = (parent, name)
    missing = [t for t in targets if id(t) not in found]
    if missing:
        raise ValueError(f"rotation: {len(missing)} LayerNorm(s) of the spec are not modules of the model")
    return found


def _ln_affine(norm: nn.Module, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = getattr(norm, "weight", None)
    b = getattr(norm, "bias", None)
    w = w.detach().double() if w is not None else torch.ones(d, dtype=torch.float64)
    b = b.detach().double() if b is not None else torch.zeros(d, dtype=torch.float64)
    return w, b


@torch.no_grad()
def _fold_ln_reader(lin: nn.Linear, w: torch.Tensor, b: torch.Tensor, q: torch.Tensor,
                    replaced: Optional[list] = None) -> None:
    """``W' = W diag(w) Q``, ``c' = c + W b``."""
    weight = lin.weight.data.double()
    shift = weight @ b.to(weight.device)
    if lin.bias is None:
        lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device),
                                requires_grad=False)
        if replaced is not None:
            replaced.append((lin, "bias", None))
    lin.bias.data = (lin.bias.data.double() + shift).to(lin.bias.dtype)
    lin.weight.data = ((weight * w.to(weight.device).unsqueeze(0)) @ q.to(weight.device)).to(lin.weight.dtype)


@torch.no_grad()
def _rotate_channels_out(module: nn.Module, q: torch.Tensor) -> None:
    """A Conv / Linear whose output channels are the stream: ``W' = Q^T W`` (over dim 0), ``b' = b Q``."""
    weight = module.weight.data
    d = weight.shape[0]
    flat = weight.double().reshape(d, -1)
    module.weight.data = (q.T.to(flat.device) @ flat).reshape(weight.shape).to(weight.dtype)
    if getattr(module, "bias", None) is not None:
        module.bias.data = (module.bias.data.double() @ q.to(flat.device)).to(module.bias.dtype)


@torch.no_grad()
def _fold_layer_scale(module: nn.Module, name: str, writer: nn.Linear) -> None:
    gamma = getattr(module, name).data.double()
    weight = writer.weight.data
    writer.weight.data = (weight.double() * gamma.unsqueeze(1).to(weight.device)).to(weight.dtype)
    if writer.bias is not None:
        writer.bias.data = (writer.bias.data.double() * gamma.to(writer.bias.device)).to(writer.bias.dtype)
    getattr(module, name).data.fill_(1.0)


@torch.no_grad()
def install_unrotate(spec: LNRotationSpec, q: torch.Tensor, hooks: Any) -> nn.Module:
    """Put a :class:`StreamUnrotate` where the stream leaves the blocks, hooked through ``hooks``."""
    kind, module = spec.end
    module.vtquant_unrotate = StreamUnrotate(q.float().to(_device_of(module, q)))
    if kind == "output":
        hooks.forward(module, _UnrotateOutputHook())
    elif kind == "input":
        hooks.pre_forward(module, _UnrotateInputHook())
    else:
        raise ValueError(f"rotation spec end kind {kind!r}: use 'output' or 'input'")
    return module


def _device_of(module: nn.Module, default: torch.Tensor) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return default.device


@torch.no_grad()
def rotate_ln_model_(spec: LNRotationSpec, *, seed: int = 0, residual: bool = True, online: bool = True,
                     heads: bool = True, hooks: Any = None,
                     replaced: Optional[list] = None) -> dict:
    """Rotate a pre-LayerNorm tower in place (the function is unchanged; see the module docstring).

    Args:
        spec: the adapter's description.
        seed: ``Q = random_hadamard(d, seed)``; online factors use ``seed + 1``, heads ``seed + 2``
            (as :func:`vtquant.core.rotation.rotate_model_`).
        residual, online, heads: which parts to apply.
        hooks: a :class:`~vtquant.core.hooks.HookManager` that owns the un-rotation hook (required
            with ``residual``).
        replaced: a list receiving ``(parent, name, old module)`` of every replaced LayerNorm (undo).

    Returns:
        ``{"online": {Linear: (signs, factors)}, "residual": Q or None, "notes": []}`` as
        :func:`~vtquant.core.rotation.rotate_model_` (``Q``: the stream's rotation inside the blocks).
    """
    result: dict = {"online": {}, "residual": None, "notes": []}
    d = spec.hidden
    if residual:
        if spec.end is None or hooks is None:
            raise ValueError("rotating a LayerNorm tower's residual stream needs spec.end and a hook manager")
        q = random_hadamard(d, seed).double()
        u = q.T @ torch.ones(d, dtype=torch.float64) / math.sqrt(d)
        where = _locate(spec.root, spec.modules_to_replace())
        for layer in spec.layers:  # layer scales first: they sit on the writers' output channels
            for module, name, writer in layer.layer_scales:
                _fold_layer_scale(module, name, writer)
        for module, name in spec.start_params:
            p = getattr(module, name)
            p.data = (p.data.double() @ q.to(p.device)).to(p.dtype)
        for module in spec.start_linears:
            _rotate_channels_out(module, q)
        for norm in spec.start_norms:
            parent, name = where[id(norm)]
            new = NormThenLinear(norm, q)
            setattr(parent, name, new)
            if replaced is not None:
                replaced.append((parent, name, norm))
        for layer in spec.layers:
            for norm, readers in layer.norm_readers:
                w, b = _ln_affine(norm, d)
                for lin in readers:
                    _fold_ln_reader(lin, w, b, q, replaced)
                parent, name = where[id(norm)]
                dev = _device_of(norm, q)
                setattr(parent, name, ProjectedRMSNorm(u.float().to(dev), norm.eps))
                if replaced is not None:
                    replaced.append((parent, name, norm))
            for lin in layer.writers:
                _rotate_channels_out(lin, q)
        install_unrotate(spec, q, hooks)
        for lin, blocks in spec.stream_readers:
            _fold_stream_reader(lin, q, blocks)
        result["residual"] = q.float()
    if online:
        for layer in spec.layers:
            for lin in layer.online:
                result["online"][lin] = _rotate_input_online(lin, seed)
    if heads:
        for layer in spec.layers:
            if layer.value_output is None:
                continue
            v, offset, o, head_dim = layer.value_output
            rotate_value_heads_(v, o, head_dim, random_hadamard(head_dim, seed + 2),
                                rows=(offset, offset + o.in_features))
    return result


def _fold_stream_reader(lin: nn.Module, q: torch.Tensor, blocks: int) -> None:
    """``y = [h_1 .. h_k] W^T`` read from the rotated stream ``h_i' = h_i Q``: ``W_i' = W_i Q`` per block."""
    d = q.shape[0]
    w = lin.weight.data
    if w.shape[1] != blocks * d:
        raise ValueError(f"stream reader {type(lin).__name__} has {w.shape[1]} input columns, not {blocks} x {d}")
    folded = (w.double().reshape(w.shape[0], blocks, d) @ q.to(w.device)).reshape(w.shape[0], blocks * d)
    lin.weight.data = folded.to(w.dtype)


def apply_ln_rotation_structure_(spec: LNRotationSpec, hooks: Any) -> None:
    """The module structure of a rotated tower without its values (checkpoint loading fills them).

    LayerNorms reading the stream become :class:`ProjectedRMSNorm`, stream-start norms
    :class:`NormThenLinear`, layer scales one, and the un-rotation is installed; every tensor
    (``u``, the readers' weights, ``Q``) then comes from the state dict.
    """
    d = spec.hidden
    eye = torch.eye(d, dtype=torch.float64)
    where = _locate(spec.root, spec.modules_to_replace())
    for layer in spec.layers:
        for module, name, _writer in layer.layer_scales:
            getattr(module, name).data.fill_(1.0)
        for norm, readers in layer.norm_readers:
            parent, name = where[id(norm)]
            setattr(parent, name, ProjectedRMSNorm(torch.zeros(d, device=_device_of(norm, eye)), norm.eps))
            for lin in readers:
                if lin.bias is None:
                    lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype,
                                                        device=lin.weight.device), requires_grad=False)
    for norm in spec.start_norms:
        parent, name = where[id(norm)]
        setattr(parent, name, NormThenLinear(norm, eye))
    install_unrotate(spec, eye, hooks)


# ------------------------------------------------------------------------------------------
# helpers the adapters share
# ------------------------------------------------------------------------------------------
def is_layer_norm(module: Any) -> bool:
    """A LayerNorm over the last axis (``nn.LayerNorm`` or a subclass: timm's, open_clip's)."""
    return isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1


def is_identity(module: Any) -> bool:
    return module is None or isinstance(module, nn.Identity)


def check_layer_norms(norms: list, where: str) -> None:
    bad = [type(n).__name__ for n in norms if not is_layer_norm(n)]
    if bad:
        raise NotImplementedError(f"rotation of {where}: expected LayerNorms reading the residual stream, found "
                                  f"{bad}; this block shape cannot be rotated (use rotation.enabled: false)")

