"""GPTQ (vtquant.core.gptq): format, equivalence with RTN, error reduction, clip search, Hessian."""
from __future__ import annotations

import inspect
import logging

import pytest
import torch

from vtquant.config import WeightArgs
from vtquant.core.gptq import DEFAULT_CLIP_GRID, HessianAccumulator, gptq_quantize, search_weight_clip
from vtquant.core.quant import dequantize_weight, quantize_weight

pytestmark = pytest.mark.usefixtures("one_thread")  # small matrices: one thread, immune to contention

N, IN, OUT = 2048, 64, 32


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _correlated_inputs(seed: int = 0, n: int = N, in_f: int = IN) -> torch.Tensor:
    """X = Z A: strongly correlated input channels (random mixing A)."""
    g = _gen(seed)
    return torch.randn(n, in_f, generator=g) @ torch.randn(in_f, in_f, generator=g)


def _hessian(x: torch.Tensor) -> torch.Tensor:
    return 2.0 / x.shape[0] * (x.T.double() @ x.double()).float()


def _out_err(x: torch.Tensor, w: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> float:
    """||X W^T - X Wq^T||^2."""
    return float(((x.double() @ (w.double() - dequantize_weight(codes, scale).double()).T) ** 2).sum())


def _args(bits: int, granularity: str, group_size: int = 16) -> WeightArgs:
    return WeightArgs(bits=bits, granularity=granularity, group_size=group_size)


def _rtn_clipped(w: torch.Tensor, args: WeightArgs, clip: torch.Tensor):
    """Independent RTN with scale = clip * absmax / qmax (reference for the clip tests)."""
    out_f, in_f = w.shape
    gsize = in_f if args.granularity == "per-channel" else args.group_size
    qmax = 2 ** (args.bits - 1) - 1
    wg = w.view(out_f, in_f // gsize, gsize)
    scale = wg.abs().amax(-1).clamp_min(1e-12) / qmax * clip  # the order quantize_weight(clip=) uses
    codes = torch.clamp(torch.round(wg / scale.unsqueeze(-1)), -qmax - 1, qmax).to(torch.int8)
    return codes.view(out_f, in_f), scale


def _clip_objective(w: torch.Tensor, H, args: WeightArgs, clip: torch.Tensor) -> torch.Tensor:
    """Per (row, group) dW_g H_gg dW_g^T of the clipped RTN weight (dense, loop over groups)."""
    codes, scale = _rtn_clipped(w, args, clip)
    dw = (w - dequantize_weight(codes, scale)).double()
    groups = scale.shape[1]
    gsize = w.shape[1] // groups
    Hd = torch.eye(w.shape[1], dtype=torch.float64) if H is None else H.double()
    cols = []
    for g in range(groups):
        sl = slice(g * gsize, (g + 1) * gsize)
        cols.append(((dw[:, sl] @ Hd[sl, sl]) * dw[:, sl]).sum(-1))
    return torch.stack(cols, dim=1)


def _naive_gptq(w: torch.Tensor, H: torch.Tensor, args: WeightArgs, act_order: bool = False,
                percdamp: float = 0.01):
    """Textbook sequential GPTQ/OBQ in float64: explicit H^-1, eliminated column by column.

    No Cholesky trick, no lazy blocks; group scales from the current (fully updated) weights.
    """
    out_f, in_f = w.shape
    gsize = in_f if args.granularity == "per-channel" else args.group_size
    qmax = 2 ** (args.bits - 1) - 1
    W, H = w.double().clone(), H.double().clone()
    scale = W.view(out_f, -1, gsize).abs().amax(-1).clamp_min(1e-12) / qmax  # static: original weight
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += percdamp * torch.diag(H).mean() * torch.eye(in_f, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    static = args.granularity == "per-channel" or act_order
    order = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(in_f)
    codes = torch.zeros(out_f, in_f, dtype=torch.float64)
    for q in order.tolist():
        g = q // gsize
        if not static and q % gsize == 0:
            scale[:, g] = W[:, q:q + gsize].abs().amax(-1).clamp_min(1e-12) / qmax
        c = torch.clamp(torch.round(W[:, q] / scale[:, g]), -qmax - 1, qmax)
        codes[:, q] = c
        err = (W[:, q] - c * scale[:, g]) / Hinv[q, q]
        W -= err[:, None] * Hinv[q, :][None, :]
        Hinv = Hinv - Hinv[:, q:q + 1] @ Hinv[q:q + 1, :] / Hinv[q, q]
    return codes.to(torch.int8), scale.float()


@pytest.fixture(scope="module")
def setup():
    x = _correlated_inputs(0)
    w = torch.randn(OUT, IN, generator=_gen(1))
    return x, w, _hessian(x)


# ---------------------------------------------------------------------------------------------
# format
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("granularity", ["per-channel", "per-group"])
@pytest.mark.parametrize("bits", [4, 8])
def test_format_matches_quantize_weight(setup, bits, granularity, act_order):
    x, w, H = setup
    args = _args(bits, granularity)
    w_before, H_before = w.clone(), H.clone()
    codes, scale = gptq_quantize(w, H, args, act_order=act_order)
    ref_codes, ref_scale = quantize_weight(w, args)
    assert codes.shape == ref_codes.shape and codes.dtype == ref_codes.dtype == torch.int8
    assert scale.shape == ref_scale.shape and scale.dtype == ref_scale.dtype
    qmax = 2 ** (bits - 1) - 1
    assert int(codes.min()) >= -qmax - 1 and int(codes.max()) <= qmax
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert torch.equal(w, w_before) and torch.equal(H, H_before)  # inputs untouched
    assert dequantize_weight(codes, scale).shape == w.shape
    if granularity == "per-channel" or act_order:  # static scales = RTN's (absmax of the original weight)
        torch.testing.assert_close(scale, ref_scale)


def test_half_precision_and_strided_weights(setup):
    x, w, H = setup
    w16 = w.half()
    before = w16.clone()
    codes, scale = gptq_quantize(w16, H.half(), _args(4, "per-group"))
    assert torch.equal(w16, before) and codes.dtype == torch.int8 and scale.dtype == torch.float32
    wt = w.T.contiguous().T  # same values, column-major storage
    for args in (_args(4, "per-group"), _args(4, "per-channel")):
        assert torch.equal(gptq_quantize(wt, H, args)[0], gptq_quantize(w, H, args)[0])
        assert torch.equal(search_weight_clip(wt, H, args), search_weight_clip(w, H, args))


# ---------------------------------------------------------------------------------------------
# equivalence with RTN when inputs are uncorrelated
# ---------------------------------------------------------------------------------------------
# With a diagonal H (identity, or any positive diagonal), (H + damp I)^-1 and its Cholesky
# factor are diagonal, so the OBS update W[:, j:] -= err_j / [H^-1]_jj [H^-1]_{j, j:} touches
# no other column: every column is plainly rounded, i.e. GPTQ == RTN bit for bit.  A non-constant
# diagonal also makes act_order permute the columns, checking the inverse permutation.
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("granularity", ["per-channel", "per-group"])
def test_diagonal_hessian_equals_rtn(setup, granularity, act_order):
    _, w, _ = setup
    args = _args(4, granularity)
    ref_codes, ref_scale = quantize_weight(w, args)
    for H in (torch.eye(IN), torch.diag(torch.rand(IN, generator=_gen(2)) + 0.1)):
        codes, scale = gptq_quantize(w, H, args, act_order=act_order, blocksize=16)
        assert torch.equal(codes, ref_codes)
        assert torch.equal(scale, ref_scale)


@pytest.mark.parametrize("granularity", ["per-channel", "per-group"])
def test_white_noise_inputs_nearly_rtn(setup, granularity):
    # White-noise inputs: H = 2/n X^T X = 2I + O(1/sqrt(n)) off-diagonal, so the error feedback is
    # tiny and only codes sitting next to a rounding boundary move, by one step at most.
    _, w, _ = setup
    x = torch.randn(4 * N, IN, generator=_gen(3))
    args = _args(4, granularity)
    codes, scale = gptq_quantize(w, _hessian(x), args)
    ref_codes, ref_scale = quantize_weight(w, args)
    diff = (codes.int() - ref_codes.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.05
    torch.testing.assert_close(scale, ref_scale, rtol=1e-2, atol=0)
    assert _out_err(x, w, codes, scale) <= 1.02 * _out_err(x, w, ref_codes, ref_scale)


# ---------------------------------------------------------------------------------------------
# error reduction on correlated inputs, and agreement with textbook GPTQ
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("granularity", ["per-channel", "per-group"])
def test_gptq_beats_rtn_on_correlated_inputs(setup, granularity, act_order):
    x, w, H = setup
    args = _args(4, granularity)
    codes, scale = gptq_quantize(w, H, args, act_order=act_order)
    rtn = _out_err(x, w, *quantize_weight(w, args))
    gptq = _out_err(x, w, codes, scale)
    assert gptq < 0.8 * rtn, (gptq / rtn)  # measured: ~0.46-0.50


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("granularity", ["per-channel", "per-group"])
def test_matches_textbook_gptq(setup, granularity, act_order):
    # Lazy blocks + Cholesky-inverse trick (float32) vs explicit sequential elimination of H^-1
    # (float64); blocksize 24 is not a multiple of the group size (16), so groups start inside
    # blocks and straddle block ends: their scales need the in-block and pending lazy updates.
    x, w, H = setup
    args = _args(4, granularity)
    codes, scale = gptq_quantize(w, H, args, act_order=act_order, blocksize=24)
    ref_codes, ref_scale = _naive_gptq(w, H, args, act_order=act_order)
    assert float((codes != ref_codes).float().mean()) < 0.01  # only float-rounding ties may differ
    torch.testing.assert_close(scale, ref_scale, rtol=1e-3, atol=0)


def test_blocksize_does_not_change_result(setup):
    x, w, H = setup
    args = _args(4, "per-group")
    codes, scale = gptq_quantize(w, H, args, blocksize=128)
    for bs in (1, 5, 20):
        c, s = gptq_quantize(w, H, args, blocksize=bs)
        assert float((c != codes).float().mean()) < 0.01
        torch.testing.assert_close(s, scale, rtol=1e-4, atol=0)


# ---------------------------------------------------------------------------------------------
# clip search
# ---------------------------------------------------------------------------------------------
def _outlier_weight(seed: int = 4) -> torch.Tensor:
    g = _gen(seed)
    w = torch.randn(OUT, IN, generator=g)
    rows = torch.arange(0, OUT, 2)
    w[rows, torch.randint(0, IN, (len(rows),), generator=g)] *= 6.0  # one large outlier in every other row
    return w


@pytest.mark.parametrize("use_h", [True, False])
@pytest.mark.parametrize("granularity", ["per-channel", "per-group"])
def test_clip_search_is_optimal_on_its_grid(setup, granularity, use_h):
    _, _, H = setup
    H = H if use_h else None
    w = _outlier_weight()
    args = _args(3, granularity)
    clip = search_weight_clip(w, H, args)
    groups = 1 if granularity == "per-channel" else IN // 16
    assert clip.shape == (OUT, groups) and clip.dtype == torch.float32
    assert torch.isin(clip, torch.tensor(DEFAULT_CLIP_GRID, dtype=torch.float32)).all()
    chosen = _clip_objective(w, H, args, clip)
    plain = _clip_objective(w, H, args, torch.ones_like(clip))
    assert (chosen <= plain * (1 + 1e-6)).all()  # never worse than absmax
    for c in DEFAULT_CLIP_GRID:  # and no grid ratio does better (brute force)
        assert (chosen <= _clip_objective(w, H, args, torch.full_like(clip, c)) * (1 + 1e-5) + 1e-9).all()
    assert (clip < 1).any()


@pytest.mark.parametrize("granularity", ["per-channel", "per-group"])
def test_clip_search_reduces_output_error(setup, granularity):
    x, _, H = setup
    w = _outlier_weight()
    args = _args(3, granularity)
    clip = search_weight_clip(w, H, args)
    assert float((clip < 1).float().mean()) > 0.25
    rtn = _out_err(x, w, *quantize_weight(w, args))
    assert _out_err(x, w, *_rtn_clipped(w, args, clip)) < 0.9 * rtn  # measured ~0.53 / ~0.64
    gptq = _out_err(x, w, *gptq_quantize(w, H, args))
    gptq_clip = _out_err(x, w, *gptq_quantize(w, H, args, clip=clip))
    assert gptq_clip < 0.95 * gptq  # measured ~0.59 / ~0.80
    # with a diagonal H GPTQ is RTN, so clip= must give exactly the clipped RTN
    codes, scale = gptq_quantize(w, torch.eye(IN), args, clip=clip)
    ref_codes, ref_scale = _rtn_clipped(w, args, clip)
    assert torch.equal(codes, ref_codes)
    torch.testing.assert_close(scale, ref_scale)


@pytest.mark.skipif("clip" not in inspect.signature(quantize_weight).parameters,
                    reason="quantize_weight has no clip= argument")
@pytest.mark.parametrize("granularity", ["per-channel", "per-group"])
def test_clip_means_the_same_for_rtn_and_gptq(granularity):
    # a clip from search_weight_clip can go to RTN (quantize_weight(clip=)) or to GPTQ: with a
    # diagonal H both must give bit-identical codes and scales
    w = _outlier_weight()
    args = _args(3, granularity)
    clip = search_weight_clip(w, None, args)
    codes, scale = gptq_quantize(w, torch.eye(IN), args, clip=clip)
    ref_codes, ref_scale = quantize_weight(w, args, clip=clip)
    assert torch.equal(codes, ref_codes) and torch.equal(scale, ref_scale)


def test_clip_search_keeps_absmax_for_gaussian_8bit(setup):
    _, w, H = setup
    clip = search_weight_clip(w, H, _args(8, "per-channel"), grid=(1.0, 0.5))
    assert (clip == 1.0).all()  # halving the range at 8 bits clips many weights: never chosen


# ---------------------------------------------------------------------------------------------
# Hessian accumulation
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_accumulator_matches_direct_hessian(dtype):
    g = _gen(5)
    chunks = [torch.randn(3, 7, 16, generator=g), torch.randn(5, 16, generator=g),
              torch.randn(0, 16), torch.randn(2, 2, 4, 16, generator=g).to(torch.bfloat16)]
    acc = HessianAccumulator(16, dtype=dtype)
    for c in chunks:
        acc.add(c)
    rows = torch.cat([c.float().reshape(-1, 16) for c in chunks]).double()
    assert acc.num_rows == rows.shape[0] == 3 * 7 + 5 + 16
    H = acc.hessian()
    assert H.dtype == torch.float32 and H.shape == (16, 16)
    torch.testing.assert_close(H, (2.0 / rows.shape[0] * rows.T @ rows).float(), rtol=1e-5, atol=1e-6)


def test_accumulator_errors():
    acc = HessianAccumulator()
    acc.add(torch.zeros(0, 8))  # empty: ignored, nothing counted
    assert acc.num_rows == 0
    with pytest.raises(RuntimeError, match="no input rows"):
        acc.hessian()
    acc.add(torch.ones(2, 8))
    with pytest.raises(ValueError, match="expected 8"):
        acc.add(torch.ones(2, 9))
    torch.testing.assert_close(acc.hessian(), torch.full((8, 8), 2.0))


# ---------------------------------------------------------------------------------------------
# degenerate Hessians
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("granularity", ["per-channel", "per-group"])
def test_dead_columns(setup, granularity, act_order, caplog):
    x, w, _ = setup
    x = x.clone()
    x[:, [3, 40]] = 0.0  # inputs that never fire: H_jj == 0
    H = _hessian(x)
    args = _args(4, granularity)
    codes, scale = gptq_quantize(w, H, args, act_order=act_order)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert (codes[:, [3, 40]] == 0).all()  # their weights are dropped (as in the reference)
    if granularity == "per-channel" or act_order:  # static scales: dead weights still count (as RTN)
        torch.testing.assert_close(scale, quantize_weight(w, args)[1])
    torch.testing.assert_close(scale, _naive_gptq(w, H, args, act_order=act_order)[1], rtol=1e-3, atol=0)
    assert _out_err(x, w, codes, scale) < 0.8 * _out_err(x, w, *quantize_weight(w, args))
    clip = search_weight_clip(w, H, args)
    assert torch.isfinite(clip).all()
    with caplog.at_level(logging.WARNING, logger="vtquant.core.gptq"):  # H_jj = 1 keeps H definite:
        codes, scale = gptq_quantize(w, H, args, act_order=act_order, percdamp=0.0)  # no extra damping
    assert "damping" not in caplog.text and torch.isfinite(scale).all()
    assert torch.isfinite(dequantize_weight(*gptq_quantize(w, H, args, clip=clip))).all()


def _indefinite_hessian(neg: float) -> torch.Tensor:
    """I + 2 u u^T - neg v v^T (u, v orthonormal +-1 patterns): eigenvalue 1 - neg along v."""
    u = torch.ones(IN) / IN ** 0.5
    v = torch.tensor([1.0, -1.0] * (IN // 2)) / IN ** 0.5
    return torch.eye(IN) + 2.0 * torch.outer(u, u) - neg * torch.outer(v, v)


def test_not_positive_definite_retries_with_more_damping(setup, caplog):
    _, w, _ = setup
    H = _indefinite_hessian(1.05)  # eigenvalue -0.05: damping 0.01 fails, 0.1 x mean(diag) works
    with caplog.at_level(logging.WARNING, logger="vtquant.core.gptq"):
        codes, scale = gptq_quantize(w, H, _args(4, "per-channel"))
    assert "needed damping" in caplog.text
    assert torch.isfinite(dequantize_weight(codes, scale)).all()


def test_not_positive_definite_raises_clear_error(setup):
    _, w, _ = setup
    with pytest.raises(RuntimeError, match=r"weight shape \[32, 64\].*more samples"):
        gptq_quantize(w, _indefinite_hessian(1000.0), _args(4, "per-channel"))


def test_argument_checks(setup):
    _, w, H = setup
    with pytest.raises(ValueError, match="divisible"):
        gptq_quantize(w, H, _args(4, "per-group", group_size=24))
    with pytest.raises(ValueError, match="Hessian has shape"):
        gptq_quantize(w, H[:10, :10], _args(4, "per-channel"))
    with pytest.raises(ValueError, match="clip has shape"):
        gptq_quantize(w, H, _args(4, "per-group"), clip=torch.ones(OUT, 1))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        gptq_quantize(w, H, _args(4, "per-channel"), clip=torch.zeros(OUT, 1))
    with pytest.raises(ValueError, match="NaN"):
        gptq_quantize(w, torch.full_like(H, float("nan")), _args(4, "per-channel"))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        search_weight_clip(w, H, _args(4, "per-channel"), grid=(1.0, 1.5))
