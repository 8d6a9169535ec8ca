"""Orthogonal (randomized Hadamard) rotations of Linear inputs (QuaRot / SpinQuant style).

A rotation ``Q`` of the residual stream is folded offline: embeddings and every
Linear that writes to the residual are multiplied by ``Q`` on their output side,
every Linear that reads a normalized residual absorbs the norm's scale and ``Q``
on its input side (RMSNorm commutes with an orthogonal ``Q`` once its scale is
folded away).  Inputs that cannot be folded (the MLP second-linear input, after
the non-linearity) are rotated online by a :class:`QuantLinear`.  Attention value
/ output projections get a per-head rotation folded into both.

Where the fold is impossible the layout says so and this module works it out:
a *post-norm* (a norm on a sublayer's output before the residual add: Gemma-2/3's
sandwich norms, OLMo-2) normalizes and then scales each channel; ``diag(g) Q`` is
not ``Q diag(g')`` for any ``g'``, so ``Q`` cannot pass through it into the residual
stream.  The residual rotation is then replaced by an online rotation of every
Linear that reads the residual stream (the same quantized inputs get rotated, at
the cost of one Hadamard transform per Linear at inference); the report says so.

The adapter describes the model with a :class:`RotationSpec`; this module does
only the linear algebra.  Hadamard matrices of non-power-of-two orders are built
as Kronecker products of Sylvester and Paley constructions; an order with no known
construction falls back to a seeded random orthogonal factor (logged).
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Optional

import torch
import torch.nn as nn

log = logging.getLogger(__name__)


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True


def _paley1(q: int) -> torch.Tensor:
    """Paley construction I: a Hadamard matrix of order q + 1 for a prime q = 3 mod 4."""
    residues = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if i in residues else -1 for i in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q).unsqueeze(1) - torch.arange(q).unsqueeze(0)) % q
    jac = chi[idx]  # Jacobsthal matrix, skew-symmetric
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = jac
    return s + torch.eye(q + 1, dtype=torch.float64)


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _paley_order(m: int) -> bool:
    return m >= 4 and m % 4 == 0 and _is_prime(m - 1) and (m - 1) % 4 == 3


@lru_cache(maxsize=32)
def hadamard_factors(n: int) -> tuple[int, ...]:
    """Orders whose Kronecker product is ``n``: one power of two and Paley orders, or ``()``."""
    power, odd = 1, n
    while odd % 2 == 0:
        odd //= 2
        power *= 2
    # try one Paley factor m (m = odd * 2^j) times a power of two
    for j in range(0, 20):
        m = odd * 2 ** j
        if m > n:
            break
        if n % m == 0 and (m == 1 or _paley_order(m)):
            return tuple(f for f in (n // m, m) if f > 1)
    # two Paley factors
    for m1 in range(4, n + 1, 4):
        if n % m1 or not _paley_order(m1):
            continue
        rest = n // m1
        for j in range(0, 20):
            m2 = rest // 2 ** j if rest % 2 ** j == 0 else None
            if m2 is None or m2 < 1:
                break
            if m2 == 1 or _paley_order(m2):
                return tuple(f for f in (2 ** j, m1, m2) if f > 1)
    return ()


def hadamard_matrix(n: int) -> Optional[torch.Tensor]:
    """An unnormalized ±1 Hadamard matrix of order ``n`` (float64), or ``None`` if none is known here."""
    if n == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    factors = hadamard_factors(n)
    if not factors:
        return None
    h = torch.ones(1, 1, dtype=torch.float64)
    for f in factors:
        part = _sylvester(f) if f & (f - 1) == 0 else _paley1(f - 1)
        h = torch.kron(h, part)
    return h


def random_hadamard_factors(n: int, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Randomized Hadamard in factored form: ``(signs [n], [F_1, ..., F_k])`` with orthonormal ``F_i``.

    The rotation is ``diag(signs) (F_1 kron ... kron F_k)``.  Orders without a known Hadamard
    construction use the Hadamard matrix of their power-of-two part and a seeded random
    orthogonal matrix for the rest (logged).
    """
    gen = torch.Generator().manual_seed(seed)
    factors: list[torch.Tensor] = []
    if n > 1:
        known = hadamard_factors(n)
        if known:
            for f in known:
                part = _sylvester(f) if f & (f - 1) == 0 else _paley1(f - 1)
                factors.append(part / f ** 0.5)
        else:
            power = n & (-n)
            rest = n // power
            log.info("no Hadamard matrix of order %d known here; using H_%d (x) random orthogonal %d", n, power, rest)
            q, _ = torch.linalg.qr(torch.randn(rest, rest, generator=gen, dtype=torch.float64))
            factors = ([_sylvester(power) / power ** 0.5] if power > 1 else []) + [q]
    else:
        factors = [torch.ones(1, 1, dtype=torch.float64)]
    signs = torch.randint(0, 2, (n,), generator=gen, dtype=torch.float64) * 2 - 1
    return signs.float(), [f.float().contiguous() for f in factors]


def kron_apply(x: torch.Tensor, signs: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """``x @ (diag(signs) (F_1 kron ... kron F_k))`` without forming the dense matrix."""
    shape = x.shape
    sizes = [f.shape[0] for f in factors]
    y = (x * signs.to(x.dtype)).reshape(-1, *sizes)
    last = y.dim() - 1  # non-negative axes: the ONNX exporter traces this function and mis-handles -1
    for axis, f in enumerate(factors, start=1):
        if axis == last:
            y = y @ f.to(x.dtype)
        else:
            y = torch.movedim(torch.movedim(y, axis, last) @ f.to(x.dtype), last, axis)
    return y.reshape(shape)


_SYLVESTER_CHECK: dict = {}


def tensor_memo(cache: dict, tensors: tuple, compute: Callable[[], object]) -> object:
    """``compute()`` memoised on the identity (and in-place version) of ``tensors``: entries hold weak
    references, so a new tensor that reuses a freed one's id or memory is never mistaken for it."""
    key = tuple(id(t) for t in tensors)
    hit = cache.get(key)
    if hit is not None:
        refs, versions, value = hit
        if all(r() is t for r, t in zip(refs, tensors)) and versions == tuple(t._version for t in tensors):
            return value
    value = compute()
    if len(cache) > 256:
        cache.clear()
    cache[key] = (tuple(weakref.ref(t) for t in tensors), tuple(t._version for t in tensors), value)
    return value


def is_sylvester_factor(f: torch.Tensor) -> bool:
    """Whether ``f`` is the orthonormal Sylvester Hadamard ``H_n / sqrt(n)`` (n a power of two >= 2).

    Checked once per tensor (memoised on its identity)."""
    n = f.shape[0]
    if f.dim() != 2 or f.shape[1] != n or n < 2 or n & (n - 1):
        return False

    def check() -> bool:
        ref = _sylvester(n) / n ** 0.5
        tol = 1e-6 if f.dtype in (torch.float32, torch.float64) else 1e-2
        return bool(torch.allclose(f.detach().double().cpu(), ref, rtol=0, atol=tol * n ** -0.5))

    return bool(tensor_memo(_SYLVESTER_CHECK, (f,), check))


def fwht_(y: torch.Tensor, axis: int) -> torch.Tensor:
    """Orthonormal Walsh-Hadamard transform (Sylvester order) of ``y`` along ``axis``: ``log2(n)``
    butterfly stages, each one reshape and one add / subtract pass (no ``n x n`` matrix).  Only the
    leading dimension is left symbolic (-1), so an ONNX export keeps a dynamic batch / length there."""
    n = y.shape[axis]
    post = 1
    for d in y.shape[axis + 1:]:
        post *= d
    lead = 1 if axis == 0 else -1
    if axis > 1:  # fold the middle dimensions (static sizes) into the leading one
        lead = -1
    z = y.reshape(lead, n, post)
    if not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
            or (torch.is_grad_enabled() and z.requires_grad)):
        return _fwht_buffers(z, n, post).reshape(y.shape) if axis == 0 else \
            _fwht_buffers(z, n, post).reshape(-1, *y.shape[1:])
    h = 1
    while h < n:
        z4 = z.reshape(-1, n // (2 * h), 2, h, post)
        a, b = z4[:, :, 0], z4[:, :, 1]
        z = torch.stack((a + b, a - b), dim=2).reshape(-1, n, post)
        h *= 2
    z = z * n ** -0.5
    return z.reshape(y.shape) if axis == 0 else z.reshape(-1, *y.shape[1:])


def _fwht_buffers(z: torch.Tensor, n: int, post: int) -> torch.Tensor:
    """:func:`fwht_`'s butterflies written into two ping-pong buffers (``add`` / ``sub`` with ``out=``): the
    same sums in the same order, bit-identical, two passes per stage instead of three (no ``stack``);
    2.1x faster on the CPU (``[512, 128, 12]``, 2 AMD EPYC cores: 0.81 vs 1.69 ms).  Not traced / exported,
    not under autograd (``out=``)."""
    src = z.contiguous()
    dst = torch.empty_like(src)
    h = 1
    while h < n:
        a4 = src.view(-1, n // (2 * h), 2, h, post)
        d4 = dst.view(-1, n // (2 * h), 2, h, post)
        torch.add(a4[:, :, 0], a4[:, :, 1], out=d4[:, :, 0])
        torch.sub(a4[:, :, 0], a4[:, :, 1], out=d4[:, :, 1])
        # the caller's tensor is read, never written
        src, dst = (dst, torch.empty_like(dst)) if src is z else (dst, src)
        h *= 2
    if src is z:  # n == 1
        src = src.clone()
    return src.mul_(n ** -0.5)


def hadamard_apply(x: torch.Tensor, signs: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """The online rotation ``x @ (diag(signs) (F_1 kron ... kron F_k))``, the same map as
    :func:`kron_apply`, computed fast: Sylvester (power-of-two) factors by a butterfly
    Walsh-Hadamard transform (:func:`fwht_`), other factors (Paley orders, random orthogonal) by a
    matmul along their axis; float32 arithmetic for low-precision inputs, result in ``x.dtype``.
    On CUDA the two-factor case (a power of two times one small factor, e.g. 14336 = 64 x 224) runs
    as one Triton kernel (``vtquant.kernels.triton_hadamard``)."""
    if x.is_cuda and x.dim() >= 1 and not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export():
        try:
            from ..kernels.triton_hadamard import hadamard_cuda
        except Exception:  # noqa: BLE001 - no Triton: the torch path below
            hadamard_cuda = None
        if hadamard_cuda is not None:
            out = hadamard_cuda(x, signs, factors)
            if out is not None:
                return out
    shape, dtype = x.shape, x.dtype
    work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    sizes = [f.shape[0] for f in factors]
    y = (x.to(work) * signs.to(device=x.device, dtype=work)).reshape(-1, *sizes)
    last = y.dim() - 1
    for axis, f in enumerate(factors, start=1):
        if is_sylvester_factor(f):
            y = fwht_(y, axis)
        elif axis == last:
            y = y @ f.to(device=x.device, dtype=work)
        else:
            y = torch.movedim(torch.movedim(y, axis, last) @ f.to(device=x.device, dtype=work), last, axis)
    return y.reshape(shape).to(dtype)


def random_hadamard(n: int, seed: int = 0) -> torch.Tensor:
    """Dense orthonormal randomized Hadamard ``[n, n]`` (float32); see :func:`random_hadamard_factors`."""
    signs, factors = random_hadamard_factors(n, seed)
    dense = torch.ones(1, 1, dtype=torch.float64)
    for f in factors:
        dense = torch.kron(dense, f.double())
    return (signs.double().unsqueeze(1) * dense).float()


@dataclass
class LayerRotation:
    """The rotation-relevant pieces of one transformer block.

    Attributes:
        norm_readers: pairs ``(norm module, [Linears reading its output])``.
        writers: Linears that add into the residual stream.
        online: Linears whose input is rotated online (MLP second linear).
        value_output: ``(v_proj, o_proj, head_dim)`` for the per-head rotation, or ``None``;
            a fused projection gives the value rows as a fourth item ``(start, stop)``
            (Phi-3's ``qkv_proj``: the last ``kv_heads * head_dim`` rows).
        raw_readers: Linears that read the residual stream with no norm in front of them
            (OLMo-2's attention and MLP inputs).
        post_norms: norms applied to a sublayer's output before the residual add
            (Gemma-2/3's ``post_attention_layernorm`` / ``post_feedforward_layernorm``, OLMo-2's).
    """

    norm_readers: list = field(default_factory=list)
    writers: list = field(default_factory=list)
    online: list = field(default_factory=list)
    value_output: Optional[tuple] = None
    raw_readers: list = field(default_factory=list)
    post_norms: list = field(default_factory=list)


@dataclass
class RotationSpec:
    """How to rotate a model; built by the adapter.

    Attributes:
        hidden: residual width.
        embeddings: Embedding modules writing to the residual stream.
        layers: one :class:`LayerRotation` per block.
        final_norm_readers: ``(final norm, [head Linears])``.
        norm_scale: returns the effective multiplicative scale vector of a norm module.
        set_norm_identity: makes a norm's scale the identity.
        untie: called first, to untie shared embedding / head weights.
        layout: one line describing the model's layout (for messages).
        names: ``{module: qualified name}`` (for messages).
        input_writers: Linears outside the blocks whose output becomes part of the stream's input
            (a vision-language model's projector writes the image tokens' embeddings): folded like
            the embeddings (output side).
    """

    hidden: int
    embeddings: list
    layers: list
    final_norm_readers: Optional[tuple]
    norm_scale: Callable[[nn.Module], torch.Tensor]
    set_norm_identity: Callable[[nn.Module], None]
    untie: Callable[[], None] = lambda: None
    layout: str = ""
    names: dict = field(default_factory=dict)
    input_writers: list = field(default_factory=list)

    def name(self, module: nn.Module) -> str:
        return self.names.get(module, type(module).__name__)

    def short_names(self, modules: list, limit: int = 4) -> str:
        """``"layers.0.post_attention_layernorm, ... (n in all)"`` for messages."""
        names = [self.name(m) for m in modules]
        text = ", ".join(names[:limit])
        return text + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def residual_fold_blocker(spec: RotationSpec) -> Optional[str]:
    """Why the residual rotation cannot be folded into ``spec``'s model, or ``None`` when it can."""
    post = [n for layer in spec.layers for n in layer.post_norms]
    if post:
        return (f"the sublayer outputs pass through post-norms ({spec.short_names(post)}) that normalize and then "
                "scale each channel before the residual add; a rotation cannot be moved through a per-channel "
                "scale, so the residual stream cannot be rotated by folding")
    return None


@torch.no_grad()
def _fold_reader(linear: nn.Linear, scale: torch.Tensor, q: torch.Tensor) -> None:
    w = linear.weight.data.double()
    scale, q = scale.to(w.device), q.to(w.device)  # the weight's device (a model on the GPU folds there)
    linear.weight.data = ((w * scale.double().unsqueeze(0)) @ q.double()).to(linear.weight.dtype)


@torch.no_grad()
def _fold_writer(linear: nn.Linear, q: torch.Tensor) -> None:
    w = linear.weight.data.double()
    q = q.to(w.device)
    linear.weight.data = (q.double().T @ w).to(linear.weight.dtype)
    if linear.bias is not None:
        linear.bias.data = (linear.bias.data.double() @ q.double()).to(linear.bias.dtype)


@torch.no_grad()
def rotate_value_heads_(v_proj: nn.Linear, o_proj: nn.Linear, head_dim: int, hh: torch.Tensor,
                        rows: Optional[tuple[int, int]] = None) -> None:
    """Per-head rotation ``hh`` of the value states: folded into ``v_proj``'s output rows ``rows``
    (default: all; a fused qkv Linear names its value rows) and ``o_proj``'s input columns.
    Grouped-query attention is fine: each side is viewed in its own number of heads."""
    start, stop = rows if rows is not None else (0, v_proj.out_features)
    hh = hh.double().to(v_proj.weight.device)
    wv = v_proj.weight.data[start:stop].double().view(-1, head_dim, v_proj.in_features)
    v_proj.weight.data[start:stop] = torch.einsum("dk,hdi->hki", hh, wv).reshape(
        stop - start, v_proj.in_features).to(v_proj.weight.dtype)
    if v_proj.bias is not None:
        bv = v_proj.bias.data[start:stop].double().view(-1, head_dim)
        v_proj.bias.data[start:stop] = (bv @ hh.to(bv.device)).reshape(-1).to(v_proj.bias.dtype)
    wo = o_proj.weight.data.double().view(o_proj.out_features, -1, head_dim)
    o_proj.weight.data = (wo @ hh.to(wo.device)).reshape(o_proj.weight.shape).to(o_proj.weight.dtype)


def _rotate_input_online(lin: nn.Linear, seed: int) -> tuple[torch.Tensor, list]:
    """Absorb the online input rotation of seed ``seed + 1`` into ``lin``'s weight; returns its factors."""
    signs, factors = random_hadamard_factors(lin.in_features, seed + 1)
    dev = lin.weight.device
    lin.weight.data = kron_apply(lin.weight.data.double(), signs.double().to(dev),
                                 [f.double().to(dev) for f in factors]).to(lin.weight.dtype)
    return signs, factors


@torch.no_grad()
def rotate_model_(spec: RotationSpec, *, seed: int = 0, residual: bool = True, online: bool = True,
                  heads: bool = True) -> dict:
    """Apply the rotation in place (full-precision weights; the model's function is unchanged).

    When the residual rotation cannot be folded (:func:`residual_fold_blocker`), the Linears that
    read the residual stream are rotated online instead and ``notes`` says so.

    Returns:
        ``{"online": {module: (signs, factors)}, "residual": Q or None, "notes": [str]}``: the online
        input rotations to install in the quantized Linears (their weights already absorbed them),
        the folded residual rotation (rotated h = h @ Q; ``None`` when the residual stream is not
        rotated) and what the report should say.
    """
    spec.untie()
    result: dict = {"online": {}, "residual": None, "notes": []}
    blocker = residual_fold_blocker(spec) if residual else None
    if residual and blocker is None:
        q = random_hadamard(spec.hidden, seed)
        for emb in spec.embeddings:
            emb.weight.data = (emb.weight.data.double() @ q.double().to(emb.weight.device)).to(emb.weight.dtype)
        for lin in spec.input_writers:
            _fold_writer(lin, q)
        for layer in spec.layers:
            for norm, readers in layer.norm_readers:
                scale = spec.norm_scale(norm).detach()
                for lin in readers:
                    _fold_reader(lin, scale, q)
                spec.set_norm_identity(norm)
            for lin in layer.raw_readers:
                _fold_reader(lin, torch.ones(spec.hidden), q)
            for lin in layer.writers:
                _fold_writer(lin, q)
        if spec.final_norm_readers is not None:
            norm, readers = spec.final_norm_readers
            scale = spec.norm_scale(norm).detach()
            for lin in readers:
                _fold_reader(lin, scale, q)
            spec.set_norm_identity(norm)
        result["residual"] = q
    elif residual:
        readers = [lin for layer in spec.layers for _, group in layer.norm_readers for lin in group]
        readers += [lin for layer in spec.layers for lin in layer.raw_readers]
        for lin in readers:
            result["online"][lin] = _rotate_input_online(lin, seed)
        result["notes"].append(
            f"rotation: residual rotation not folded ({spec.layout}): {blocker}; instead the inputs of the "
            f"{len(readers)} Linears that read the residual stream ({spec.short_names(readers, 3)}) are rotated "
            "online (one Hadamard transform each at inference)")
    if online:
        for layer in spec.layers:
            for lin in layer.online:
                result["online"][lin] = _rotate_input_online(lin, seed)
    if heads:
        for layer in spec.layers:
            if layer.value_output is None:
                continue
            v_proj, o_proj, head_dim = layer.value_output[:3]
            start, stop = layer.value_output[3] if len(layer.value_output) > 3 else (0, v_proj.out_features)
            rotate_value_heads_(v_proj, o_proj, head_dim, random_hadamard(head_dim, seed + 2), rows=(start, stop))
    return result
