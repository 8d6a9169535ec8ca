"""Layer-level speed of per-tensor static vs per-token dynamic low-bit execution (GPU; CPU for tests).

A random-weight transformer layer with the shapes of a real model (LLaMA-2-7B decoder
layer: hidden 4096, MLP 11008 SwiGLU, 32 heads, causal; ViT-B/16: 768 / 3072 GELU / 12
heads, 197 tokens; ViT-L/14: 1024 / 4096 / 16 heads, 257 tokens), with q/k/v and the MLP's
first Linears fused into one matmul each for every method alike.  Methods:

* ``bf16``: the layer in bfloat16 (``fp32`` on the CPU);
* ``dynamic-token`` (``cuda-fp8`` / ``cuda-int8`` / ``cpu-int8``): per-token absmax scales computed
  on every call by one fused Triton kernel per Linear input, then a row-scaled matmul (FP8:
  ``torch._scaled_mm`` rowwise; int8: a Triton int8 GEMM with the row x column rescale fused in
  its epilogue, the same kernel the static path uses with column scales only);
* ``insertquant`` (same backends): vtquant's :class:`~vtquant.kernels.linear.RealQuantLinear`,
  per-tensor static scales from a calibration pass with the sink rows excluded, sink rows
  (the first token of every sequence) zeroed and their template outputs written by index.

Variants (``--variants``; ``layer_bench`` defaults to ``unfused`` alone, the rows above):

* ``unfused``: the Linear modules as they are (one quantization kernel per Linear input);
* ``fused-producers``: the quantization fused into the kernels that produce the activations
  (RMSNorm -> codes, SiLU(gate) * up -> codes) for both methods: static writes codes with its
  known scale (pure elementwise for SiLU * up), dynamic holds each row in one program to take its
  max first (:class:`FusedStaticLayer`, :class:`FusedDynamicLayer`);
* ``fused-gemm`` (FP8): in addition the gate/up GEMM is a Triton FP8 GEMM with SiLU * up in its
  epilogue, writing the down projection's static codes directly (static) or bf16 plus a per-row
  max, then one elementwise pass (dynamic: a tile never holds a whole row).

``--rounds N`` interleaves N timing rounds of all methods of a backend (bf16 included) and keeps
each round's median, so the static / dynamic ratio comes with its round-to-round spread
(:func:`format_comparison`).  ``--kernel-bench`` times the fused kernels alone.

Prefill: the whole layer on ``batch x seq`` tokens.  Decode: one new token per sequence
against a KV cache of ``seq`` tokens.  Times are medians of CUDA-event-timed repeats after
warm-up; TFLOP/s counts the Linears (2 x tokens x in x out) and attention (4 x B x T x T x D,
halved when causal).  On the GPU each measured call is the replay of a CUDA graph of the
layer, so Python launch overhead (which differs between implementations) is not timed.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ActArgs, WeightArgs
from ..core.quant import QuantLinear
from ..core.sinks import SinkState
from ..core.templates import SinkGuard
from ..kernels.linear import RealQuantLinear
from ..kernels import triton_quant as tq
from ..kernels.triton_quant import FP8_MAX, int8_matmul_scaled, quant_dynamic_rows


@dataclass
class Shape:
    name: str
    hidden: int
    mlp: int
    heads: int
    gated: bool
    causal: bool
    batch: int
    seq: int


SHAPES = {
    "llama2-7b": Shape("llama2-7b", 4096, 11008, 32, True, True, 8, 512),
    "llama2-7b-16k": Shape("llama2-7b-16k", 4096, 11008, 32, True, True, 32, 512),
    "vit-b16": Shape("vit-b16", 768, 3072, 12, False, False, 64, 197),
    "vit-l14": Shape("vit-l14", 1024, 4096, 16, False, False, 32, 257),
    "tiny": Shape("tiny", 64, 128, 4, True, True, 2, 32),
}


class SynthLayer(nn.Module):
    """A pre-norm transformer layer with fused qkv and fused gate/up Linears."""

    def __init__(self, s: Shape) -> None:
        super().__init__()
        self.s = s
        self.norm1 = nn.RMSNorm(s.hidden)
        self.qkv = nn.Linear(s.hidden, 3 * s.hidden, bias=False)
        self.o = nn.Linear(s.hidden, s.hidden, bias=False)
        self.norm2 = nn.RMSNorm(s.hidden)
        self.up = nn.Linear(s.hidden, (2 if s.gated else 1) * s.mlp, bias=False)
        self.down = nn.Linear(s.mlp, s.hidden, bias=False)
        for lin in (self.qkv, self.o, self.up, self.down):
            nn.init.normal_(lin.weight, std=lin.in_features ** -0.5)

    def attend(self, qkv_out: torch.Tensor, b: int, t: int, kv: Optional[tuple]) -> torch.Tensor:
        """Attention of the fused q/k/v projection's output; returns the o-projection's input."""
        d = self.s.hidden
        h, hd = self.s.heads, d // self.s.heads
        qkv = qkv_out.view(b, t, 3, h, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if kv is not None:
            k = torch.cat([kv[0], k], dim=2)
            v = torch.cat([kv[1], v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.s.causal and kv is None)
        return out.transpose(1, 2).reshape(b, t, d)

    def attention(self, x: torch.Tensor, kv: Optional[tuple]) -> torch.Tensor:
        b, t, _ = x.shape
        return self.o(self.attend(self.qkv(self.norm1(x)), b, t, kv))

    def forward(self, x: torch.Tensor, kv: Optional[tuple] = None) -> torch.Tensor:
        x = x + self.attention(x, kv)
        u = self.up(self.norm2(x))
        if self.s.gated:
            g, u = u.chunk(2, dim=-1)
            a = F.silu(g) * u
        else:
            a = F.gelu(u)
        return x + self.down(a)

    def linears(self) -> dict:
        return {"qkv": self.qkv, "o": self.o, "up": self.up, "down": self.down}

    def flops(self, tokens: int, kv_len: int) -> float:
        lin = sum(2.0 * tokens * m.in_features * m.out_features for m in self.linears().values())
        b = self.s.batch
        q_len = tokens // b
        attn = 4.0 * b * q_len * kv_len * self.s.hidden
        if self.s.causal and q_len == kv_len:
            attn /= 2
        return lin + attn


class DynamicRowLinear(nn.Module):
    """The per-token dynamic peer: row absmax scales computed per call (one fused kernel), row-scaled matmul."""

    def __init__(self, linear: nn.Linear, backend: str) -> None:
        super().__init__()
        self.backend = backend
        w = linear.weight.detach().float()
        qmax = FP8_MAX if backend == "cuda-fp8" else 127.0
        w_scale = (w.abs().amax(dim=1) / qmax).clamp_min(1e-12)
        codes = w / w_scale.unsqueeze(1)
        dtype = torch.float8_e4m3fn if backend == "cuda-fp8" else torch.int8
        self.register_buffer("qweight", (codes if backend == "cuda-fp8" else torch.round(codes)).to(dtype).contiguous())
        self.register_buffer("w_scale", w_scale.reshape(1, -1).contiguous())
        self.dtype = dtype
        self.out_features = linear.out_features

    def matmul(self, q: torch.Tensor, s: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """The row-scaled matmul of codes ``q`` ``[M, K]`` with row scales ``s`` ``[M, 1]``."""
        if self.backend == "cuda-fp8":
            return torch._scaled_mm(q, self.qweight.t(), scale_a=s, scale_b=self.w_scale, out_dtype=torch.bfloat16)
        return int8_matmul_scaled(q, self.qweight, self.w_scale.reshape(-1), s, None, out_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        q, s = quant_dynamic_rows(x2, self.dtype)
        y = self.matmul(q, s, x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


def _static_layer(layer: SynthLayer, backend: str, calib: torch.Tensor, state: SinkState) -> SynthLayer:
    """vtquant per-tensor static: calibrate scales without the sink rows, convert to real kernels."""
    fakes = {}
    for name, lin in layer.linears().items():
        fake = QuantLinear(lin.float(), None, ActArgs(bits=8), name=name)
        fake.guard = SinkGuard(lin.out_features, 1, "fp-row")
        fake.guard.state = state
        fake.guard.recorder = []  # collects the sink rows' inputs during calibration
        fakes[name] = fake
        setattr(layer, name, fake.to(calib.device))
    layer.float()
    with torch.no_grad():
        layer(calib.float())
    for name, fake in fakes.items():
        fake.act.finalize()
        sink_inputs = torch.cat([r[0] for r in fake.guard.recorder]).to(calib.device)
        fake.guard.recorder = None
        fake.guard.template_out[0] = sink_inputs.mean(0) @ fake.weight.detach().float().T
        fake.guard.mode = "template"
        fake.quantize_weights_(WeightArgs(bits=8))  # the calibration pass ran with full-precision weights
        real = RealQuantLinear(fake, backend)
        setattr(layer, name, real.to(calib.device))
    return layer


def _norms_to(layer: SynthLayer, dtype: torch.dtype) -> None:
    """Cast the norms only (quantized modules keep their int8 / FP8 codes and float32 scales)."""
    layer.norm1.to(dtype)
    layer.norm2.to(dtype)


# -- producer-fused variants -------------------------------------------------------------------
VARIANTS = ("unfused", "fused-producers", "fused-gemm")
FUSED_GEMM_MIN_ROWS = 256  # below this (decode) the fused-gemm variants use cuBLAS + the fused SiLU kernel


def _eps(norm: nn.RMSNorm, x: torch.Tensor) -> float:
    return norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps  # what F.rms_norm uses


def _codes_dtype(backend: str) -> torch.dtype:
    return torch.float8_e4m3fn if backend == "cuda-fp8" else torch.int8


def variant_ok(variant: str, backend: str, device: torch.device) -> bool:
    """``fused-gemm`` needs FP8 operands on the GPU (the Triton GEMM); on the CPU its reference runs."""
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r}; choose from {VARIANTS}")
    return variant != "fused-gemm" or backend == "cuda-fp8" or device.type == "cpu"


class FusedStaticLayer(nn.Module):
    """vtquant per-tensor static with the quantization fused into the activations' producers.

    * ``fused-producers``: RMSNorm writes the q/k/v and gate/up inputs as codes directly (one kernel,
      no bf16 normalized tensor, no row max: the scale is known), and SiLU(gate) * up writes the
      down projection's codes directly (a pure elementwise kernel);
    * ``fused-gemm``: in addition the gate/up GEMM (Triton, FP8) applies SiLU * up and the down
      projection's static scale in its epilogue and writes FP8 codes (no bf16 gate/up tensor at all).

    Sinks as in :class:`RealQuantLinear`: the kernels write the sink rows' codes as 0 (the row mask
    read in-kernel instead of an index fill), and the template outputs of q/k/v, o and down are
    written by index.  The gate/up projection's template rows are not written: its sink rows only feed
    the down projection, whose codes for those rows are zeroed and whose outputs are replaced by its
    template, so they cannot reach the output (the generic module path writes them anyway).  The
    o projection is unchanged (its input comes from attention).
    """

    def __init__(self, layer: SynthLayer, state: SinkState, backend: str, gemm: bool) -> None:
        super().__init__()
        if not layer.s.gated:
            raise ValueError("the fused variants implement the SwiGLU (gated) MLP")
        for name, lin in layer.linears().items():
            if not isinstance(lin, RealQuantLinear):
                raise TypeError(f"{name}: expected a RealQuantLinear")
            if lin.guard is not None and (lin.guard.mode != "template" or lin.w_fp is not None):
                raise NotImplementedError(f"{name}: fused variants need stable template sinks (no full-precision rows)")
        self.layer, self.state, self.gemm = layer, state, gemm
        self.dtype = _codes_dtype(backend)

    def forward(self, x: torch.Tensor, kv: Optional[tuple] = None) -> torch.Tensor:
        L, st = self.layer, self.state
        b, t, d = x.shape
        index = st.flat_index() if st.mask_for(x) is not None else None
        zero = st.mask.reshape(-1) if index is not None else None
        qkv, up, down = L.qkv, L.up, L.down
        q = tq.rmsnorm_quant_static(x.reshape(-1, d), L.norm1.weight, _eps(L.norm1, x), qkv._a_scale_value,
                                    self.dtype, zero)
        y = qkv._matmul(q, qkv.qweight, qkv.out_scale, qkv.bias, x.dtype)
        if index is not None:
            qkv._write_sinks(y, None, index, st)
        x = x + L.o(L.attend(y, b, t, kv))
        q = tq.rmsnorm_quant_static(x.reshape(-1, d), L.norm2.weight, _eps(L.norm2, x), up._a_scale_value,
                                    self.dtype, zero)
        if self.gemm and q.shape[0] >= FUSED_GEMM_MIN_ROWS:
            qd = tq.swiglu_matmul_static(q, up.qweight, up.out_scale, down._a_scale_value, self.dtype, zero)
        else:
            gu = up._matmul(q, up.qweight, up.out_scale, up.bias, x.dtype)
            qd = tq.silu_mul_quant_static(gu, down._a_scale_value, self.dtype, zero)
        y = down._matmul(qd, down.qweight, down.out_scale, down.bias, x.dtype)
        if index is not None:
            down._write_sinks(y, None, index, st)
        return x + y.reshape(b, t, d)


class FusedDynamicLayer(nn.Module):
    """The per-token dynamic peer fused as far as a per-row scale allows (fair counterpart).

    * ``fused-producers``: RMSNorm + row max + codes in one kernel (the row in registers), and
      SiLU(gate) * up + row max + codes in one kernel per row (the 11008-wide row in registers);
    * ``fused-gemm``: the gate/up GEMM (Triton, FP8) applies the row / column scales and SiLU * up in
      its epilogue, writes bf16 ``h`` and folds each tile's row max into a per-row max (atomics); one
      elementwise pass then writes the codes.  A GEMM tile never holds a whole row, so the codes
      cannot be written by the GEMM itself (that is what a static scale buys).
    """

    def __init__(self, layer: SynthLayer, backend: str, gemm: bool) -> None:
        super().__init__()
        if not layer.s.gated:
            raise ValueError("the fused variants implement the SwiGLU (gated) MLP")
        self.layer, self.gemm = layer, gemm
        self.dtype = _codes_dtype(backend)

    def forward(self, x: torch.Tensor, kv: Optional[tuple] = None) -> torch.Tensor:
        L = self.layer
        b, t, d = x.shape
        q, s = tq.rmsnorm_quant_dynamic(x.reshape(-1, d), L.norm1.weight, _eps(L.norm1, x), self.dtype)
        x = x + L.o(L.attend(L.qkv.matmul(q, s, x.dtype), b, t, kv))
        q, s = tq.rmsnorm_quant_dynamic(x.reshape(-1, d), L.norm2.weight, _eps(L.norm2, x), self.dtype)
        if self.gemm and q.shape[0] >= FUSED_GEMM_MIN_ROWS:
            qd, sd = tq.swiglu_matmul_dynamic(q, L.up.qweight, L.up.w_scale, s, self.dtype)
        else:
            qd, sd = tq.silu_mul_quant_dynamic(L.up.matmul(q, s, x.dtype), self.dtype)
        return x + L.down.matmul(qd, sd, x.dtype).reshape(b, t, d)


def _timer(device: torch.device) -> Callable[[Callable[[], None], int], float]:
    def run(fn: Callable[[], None], repeats: int) -> float:
        for _ in range(3):
            fn()
        if device.type == "cuda":
            # replay a CUDA graph of the layer: times the GPU work, not Python's launch overhead
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            run_once = graph.replay
            for _ in range(3):
                run_once()
            torch.cuda.synchronize()
            times = []
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                run_once()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            return statistics.median(times)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    return run


@torch.no_grad()
def layer_bench(shape: Shape, device: str, backends: list[str], repeats: int = 20, seed: int = 0,
                variants: tuple = ("unfused",), rounds: int = 1) -> list[dict]:
    """Measure every method on one layer shape; returns result dicts (one per method, variant and phase).

    ``variants``: ``unfused`` (the Linear modules as they are), ``fused-producers``, ``fused-gemm``
    (see :class:`FusedStaticLayer` / :class:`FusedDynamicLayer`).  ``rounds``: every method of a
    backend (bf16 included) is timed once per round, rounds interleaved (order reversed on odd rounds);
    a row's time is the median over rounds and ``*_seconds_rounds`` keeps each round's median.
    """
    dev = torch.device(device)
    torch.manual_seed(seed)
    ref_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    base = SynthLayer(shape).to(dev)
    b, t, d = shape.batch, shape.seq, shape.hidden
    # the sink: the first token of every sequence is one constant, massive vector (as in real LLMs)
    sink = torch.randn(d, device=dev) * 50.0
    x = torch.randn(b, t, d, device=dev)
    x[:, 0] = sink
    x = x.to(ref_dtype)
    calib = torch.randn(b, t, d, device=dev)
    calib[:, 0] = sink
    known = torch.zeros(b, t, dtype=torch.bool, device=dev)
    known[:, 0] = True
    timer = _timer(dev)
    hd = d // shape.heads
    # decode: one token per sequence against a KV cache of t tokens (no sinks among new tokens)
    kv = (torch.randn(b, shape.heads, t, hd, device=dev, dtype=ref_dtype),
          torch.randn(b, shape.heads, t, hd, device=dev, dtype=ref_dtype))
    x1 = x[:, -1:].contiguous()

    def measure(name: str, layer: Callable, state: Optional[SinkState]) -> tuple:
        if state is not None:
            state.reset(known)
            state.flat_index()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        prefill = timer(lambda: layer(x), repeats)
        peak = torch.cuda.max_memory_allocated() / 2 ** 20 if dev.type == "cuda" else None
        if state is not None:
            state.reset(None)
        decode = timer(lambda: layer(x1, kv), repeats)
        print(f"  {shape.name} {name}: prefill {prefill * 1e3:.3f} ms, decode {decode * 1e3:.3f} ms", flush=True)
        return prefill, decode, peak

    def make_row(method: str, backend: str, variant: str, meas: list) -> dict:
        prefill = statistics.median(m[0] for m in meas)
        decode = statistics.median(m[1] for m in meas)
        peaks = [m[2] for m in meas if m[2] is not None]
        row = {"shape": shape.name, "method": method, "backend": backend, "tokens": b * t,
               "prefill_seconds": prefill, "prefill_tokens_per_s": b * t / prefill,
               "prefill_tflops": base.flops(b * t, t) / prefill / 1e12,
               "decode_seconds": decode, "decode_tokens_per_s": b / decode,
               "peak_mem_mb": max(peaks) if peaks else None, "variant": variant}
        if len(meas) > 1:
            row["prefill_seconds_rounds"] = [m[0] for m in meas]
            row["decode_seconds_rounds"] = [m[1] for m in meas]
        return row

    ref = SynthLayer(shape).to(dev)
    ref.load_state_dict(base.state_dict())
    ref = ref.to(ref_dtype)
    ref_method, ref_backend = ("bf16", "cuda-bf16") if dev.type == "cuda" else ("fp", "cpu-fp32")
    y_ref = ref(x).float()
    ref_meas: list = []
    rows: list = []
    groups = [[]] if not backends else []
    for backend in backends:
        dyn = SynthLayer(shape).to(dev)
        dyn.load_state_dict(base.state_dict())
        for name, lin in dyn.linears().items():
            setattr(dyn, name, DynamicRowLinear(lin, backend))
        _norms_to(dyn, ref_dtype)
        st = SinkState("bsd")
        stat = SynthLayer(shape).to(dev)
        stat.load_state_dict(base.state_dict())
        st.reset(known)
        stat = _static_layer(stat, backend, calib, st)
        _norms_to(stat, ref_dtype)
        entries = [(ref_method, ref_backend, "unfused", ref, None)]
        for variant in variants:
            if variant_ok(variant, backend, dev):
                fwd = dyn if variant == "unfused" else FusedDynamicLayer(dyn, backend, variant == "fused-gemm")
                entries.append(("dynamic-token", backend, variant, fwd, None))
        for variant in variants:
            if variant_ok(variant, backend, dev):
                fwd = stat if variant == "unfused" else FusedStaticLayer(stat, st, backend, variant == "fused-gemm")
                entries.append(("insertquant", backend, variant, fwd, st))
        meas: list = [[] for _ in entries]
        for r in range(rounds):
            order = list(range(len(entries)))
            for i in (order if r % 2 == 0 else order[::-1]):
                method, bk, variant, fwd, state = entries[i]
                name = f"{method} {bk}" + ("" if variant == "unfused" else f" [{variant}]") + (
                    f" (round {r + 1})" if rounds > 1 else "")
                meas[i].append(measure(name, fwd, state))
        ref_meas += meas[0]
        for (method, bk, variant, fwd, state), m in zip(entries[1:], meas[1:]):
            row = make_row(method, bk, variant, m)
            if state is None:
                row["rel_error"] = float((fwd(x).float() - y_ref).norm() / y_ref.norm())
            else:
                state.reset(known)
                y = fwd(x).float()
                row["rel_error"] = float((y[:, 1:] - y_ref[:, 1:]).norm() / y_ref[:, 1:].norm())
            rows.append(row)
        del dyn, stat, entries
    for _ in groups:  # no backend asked: the reference alone
        for r in range(rounds):
            ref_meas.append(measure(f"{ref_method} {ref_backend}", ref, None))
    rows.insert(0, make_row(ref_method, ref_backend, "unfused", ref_meas))
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = ["| shape | method | backend | variant | prefill tok/s | x bf16 | TFLOP/s | decode tok/s | x bf16 | peak MB | rel. error |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    ref = {}
    for r in rows:
        if r["method"] in ("bf16", "fp"):
            ref[r["shape"]] = r
    for r in rows:
        base = ref[r["shape"]]
        err = r.get("rel_error")
        peak = r.get("peak_mem_mb")
        lines.append(
            f"| {r['shape']} | {r['method']} | {r['backend']} | {r.get('variant', 'unfused')} | "
            f"{r['prefill_tokens_per_s']:.0f} | "
            f"{base['prefill_seconds'] / r['prefill_seconds']:.2f} | {r['prefill_tflops']:.0f} | "
            f"{r['decode_tokens_per_s']:.0f} | {base['decode_seconds'] / r['decode_seconds']:.2f} | "
            f"{'-' if peak is None else f'{peak:.0f}'} | {'-' if err is None else f'{err:.4f}'} |")
    return "\n".join(lines)


def format_comparison(rows: list[dict]) -> str:
    """Static vs dynamic per shape / backend / variant: prefill ms and the dynamic / static time ratio
    (> 1: static faster), as the median over rounds and its range (the rounds' spread is the noise)."""
    lines = ["| shape | backend | variant | bf16 ms | dynamic ms | static ms | dynamic / static (median, min-max over rounds) | static x bf16 |",
             "|---|---|---|---|---|---|---|---|"]
    ref = {r["shape"]: r for r in rows if r["method"] in ("bf16", "fp")}
    dyn = {(r["shape"], r["backend"], r.get("variant")): r for r in rows if r["method"] == "dynamic-token"}
    for r in rows:
        if r["method"] != "insertquant":
            continue
        key = (r["shape"], r["backend"], r.get("variant"))
        dr = dyn.get(key)
        if dr is None:
            continue
        s_rounds = r.get("prefill_seconds_rounds", [r["prefill_seconds"]])
        d_rounds = dr.get("prefill_seconds_rounds", [dr["prefill_seconds"]])
        ratios = [a / b for a, b in zip(d_rounds, s_rounds)]
        lines.append(
            f"| {r['shape']} | {r['backend']} | {r.get('variant', 'unfused')} | {ref[r['shape']]['prefill_seconds'] * 1e3:.3f} | "
            f"{dr['prefill_seconds'] * 1e3:.3f} | {r['prefill_seconds'] * 1e3:.3f} | "
            f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}) | "
            f"{ref[r['shape']]['prefill_seconds'] / r['prefill_seconds']:.2f} |")
    return "\n".join(lines)


def check_quantizers() -> None:
    """The fused Triton quantizers against an eager reference, on fresh random data (fails loudly)."""
    from ..kernels import triton_quant as tq

    x = torch.randn(1000, 4096, device="cuda", dtype=torch.bfloat16) * 3
    for dtype in (torch.int8, torch.float8_e4m3fn):
        qmax = tq._qmax(dtype)
        ref = (x.float() / 0.05).clamp(-qmax, qmax)
        ref = (torch.sign(ref) * torch.floor(ref.abs() + 0.5) if dtype == torch.int8 else ref).to(dtype).float()
        got = tq.quant_static(x, 0.05, dtype).float()
        s = x.float().abs().amax(1, keepdim=True) / qmax
        ref_d = (x.float() / s).clamp(-qmax, qmax)
        ref_d = (torch.sign(ref_d) * torch.floor(ref_d.abs() + 0.5) if dtype == torch.int8 else ref_d).to(dtype).float()
        got_d, got_s = tq.quant_dynamic_rows(x, dtype)
        err = (got - ref).abs().max().item()
        err_d = (got_d.float() - ref_d).abs().max().item()
        err_s = ((got_s - s).abs() / s).max().item()
        print(f"quantizer check {dtype}: static max |diff| {err}, dynamic {err_d}, scale rel {err_s:.1e}", flush=True)
        # static codes must match exactly; the dynamic kernel divides by its in-kernel scale, which may
        # differ from the eager division by an ulp: allow one code step (int8) / one FP8 ulp
        step = 1.0 if dtype == torch.int8 else 0.0625 * ref_d.abs().max().item() / 448
        if err > 0 or err_s > 1e-6 or err_d > max(step, 1.0 if dtype == torch.int8 else 32.0):
            raise SystemExit("fused quantizer does not match the reference")
    # the fused int8 GEMM against an exact reference (int32 products are exact in float64 here)
    q = torch.randint(-127, 128, (3000, 4096), dtype=torch.int8, device="cuda")
    w = torch.randint(-127, 128, (2000, 4096), dtype=torch.int8, device="cuda")
    cs, rs = torch.rand(2000, device="cuda"), torch.rand(3000, device="cuda")
    ref = (q.double() @ w.double().T) * cs.double() * rs.double()[:, None]
    got = tq.int8_matmul_scaled(q, w, cs, rs, None, torch.float32).double()
    rel = ((got - ref).norm() / ref.norm()).item()
    print(f"int8 GEMM check: relative error {rel:.2e}", flush=True)
    if not rel < 1e-6:
        raise SystemExit("fused int8 GEMM does not match the reference")
    check_fused()


def _mismatch(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> tuple[float, float]:
    """(fraction off by more than one code step / FP8 ulp, fraction not identical)."""
    g, r = got.float(), ref.float()
    if dtype == torch.int8:
        bad = (g - r).abs() > 1
    else:
        bad = (g - r).abs() > 0.125 * torch.maximum(g.abs(), r.abs()) + 2.0 ** -9
    bad = bad | ~torch.isfinite(g)
    return bad.float().mean().item(), (g != r).float().mean().item()


def check_fused(m: int = 1000, d: int = 4096, nh: int = 11008) -> None:
    """The producer-fused kernels against their eager references (fresh random data, GPU; fails loudly).

    Elementwise / row kernels: every code within one step (int8) or one FP8 ulp of the reference,
    at most 1 % not identical (float32 rsqrt / sigmoid / division order). Fused GEMM: at most 0.1 %
    beyond one ulp, 5 % not identical (its accumulation order differs from the float32 reference, and
    where g or u nearly cancels that difference is large relative to the value itself), and the
    dequantized codes' error against the float32 ``silu(g) * u`` within 2 % of the reference codes'.
    Each kernel runs before its reference, so an unwritten output cannot inherit the reference's memory.
    """
    failures = []

    def report(name: str, got, ref, dtype, bad_max=0.0, diff_max=0.01, scales=None) -> None:
        bad, diff = _mismatch(got, ref, dtype)
        text = f"fused check {name} {dtype}: beyond one step {bad:.1e}, not identical {diff:.1e}"
        ok = bad <= bad_max and diff <= diff_max
        if scales is not None:
            srel = ((scales[0] - scales[1]).abs() / scales[1]).max().item()
            text += f", scale rel {srel:.1e}"
            ok = ok and srel < (1e-5 if "gemm" not in name else 1e-2)
        print(text + ("" if ok else "  <-- FAIL"), flush=True)
        if not ok:
            failures.append(name)

    eps = torch.finfo(torch.bfloat16).eps
    for dtype in (torch.int8, torch.float8_e4m3fn):
        x = torch.randn(m, d, device="cuda", dtype=torch.bfloat16) * 3
        x[::7] *= 40  # sink-like rows
        w = (torch.rand(d, device="cuda") + 0.5).to(torch.bfloat16)
        zero = torch.rand(m, device="cuda") < 0.05
        scale = 0.02 if dtype == torch.int8 else 0.02 * 127 / 448
        got = tq.rmsnorm_quant_static(x, w, eps, scale, dtype, zero)
        report("rmsnorm static", got, tq.ref_rmsnorm_quant_static(x, w, eps, scale, dtype, zero), dtype)
        got, gs = tq.rmsnorm_quant_dynamic(x, w, eps, dtype)
        rq, rs = tq.ref_rmsnorm_quant_dynamic(x, w, eps, dtype)
        report("rmsnorm dynamic", got, rq, dtype, scales=(gs, rs))
        gu = torch.randn(m, 2 * nh, device="cuda", dtype=torch.bfloat16) * 2
        got = tq.silu_mul_quant_static(gu, scale, dtype, zero)
        report("silu*up static", got, tq.ref_silu_mul_quant_static(gu, scale, dtype, zero), dtype)
        for single in (True, False):
            got, gs = tq.silu_mul_quant_dynamic(gu, dtype, single=single)
            rq, rs = tq.ref_silu_mul_quant_dynamic(gu, dtype)
            report(f"silu*up dynamic ({'row in registers' if single else 'two passes'})", got, rq, dtype,
                   scales=(gs, rs))
    f8 = torch.float8_e4m3fn
    k = d
    q = (torch.randn(m, k, device="cuda") * 60).to(f8)
    wq = (torch.randn(2 * nh, k, device="cuda") * 60).to(f8)
    cs = (torch.rand(2 * nh, device="cuda") + 0.5) * 2e-5
    zero = torch.rand(m, device="cuda") < 0.05
    h_ref = tq.ref_swiglu_matmul(q, wq, cs)
    scale = h_ref.abs().amax().item() / 448 * 0.7
    got = tq.swiglu_matmul_static(q, wq, cs, scale, f8, zero)
    ref = tq._zero(tq._codes(tq.ref_swiglu_matmul(q, wq, cs) * (1.0 / scale), f8), zero)
    report("swiglu gemm static", got, ref, f8, bad_max=1e-3, diff_max=0.05)

    def quant_error(name: str, deq_got, deq_ref, h) -> None:
        keep = ~zero if name.endswith("static") else slice(None)  # static: sink rows are written as 0
        e_got = ((deq_got - h)[keep].norm() / h[keep].norm()).item()
        e_ref = ((deq_ref - h)[keep].norm() / h[keep].norm()).item()
        ok = e_got <= 1.02 * e_ref + 1e-5
        print(f"fused check {name}: quantization error vs float32 h {e_got:.4e} (reference codes {e_ref:.4e})"
              + ("" if ok else "  <-- FAIL"), flush=True)
        if not ok:
            failures.append(name + " error")

    quant_error("swiglu gemm static", got.float() * scale, ref.float() * scale, h_ref)
    rs_in = torch.rand(m, 1, device="cuda") + 0.5
    got, gs = tq.swiglu_matmul_dynamic(q, wq, cs, rs_in, f8)
    h_ref = tq.ref_swiglu_matmul(q, wq, cs, rs_in)
    rq, rs = tq._row_codes(h_ref.to(torch.bfloat16), f8)
    report("swiglu gemm dynamic", got, rq, f8, bad_max=1e-3, diff_max=0.05, scales=(gs, rs))
    quant_error("swiglu gemm dynamic", got.float() * gs, rq.float() * rs, h_ref)
    if failures:
        raise SystemExit(f"fused kernels do not match their references: {failures}")


def kernel_bench(m: int, d: int = 4096, nh: int = 11008) -> list[dict]:
    """Time each fused producer kernel against its unfused sequence at ``m`` tokens (LLaMA-2-7B widths),
    FP8 codes; medians of ``triton.testing.do_bench``."""
    from triton.testing import do_bench

    f8, bf = torch.float8_e4m3fn, torch.bfloat16
    eps = torch.finfo(bf).eps
    x = torch.randn(m, d, device="cuda", dtype=bf)
    w = (torch.rand(d, device="cuda") + 0.5).to(bf)
    gu = torch.randn(m, 2 * nh, device="cuda", dtype=bf)
    g, u = gu.chunk(2, dim=-1)
    qa = (torch.randn(m, d, device="cuda") * 60).to(f8)
    wq = (torch.randn(2 * nh, d, device="cuda") * 60).to(f8)
    cs = (torch.rand(2 * nh, device="cuda") + 0.5) * 2e-5
    sa = torch.full((m, 1), 1.0, device="cuda")
    sb = cs.reshape(1, -1).contiguous()
    s = 0.01

    def mm():
        return torch._scaled_mm(qa, wq.t(), scale_a=sa, scale_b=sb, out_dtype=bf)

    cases = [
        ("rmsnorm->codes static: F.rms_norm + quant_static", lambda: tq.quant_static(F.rms_norm(x, (d,), w, eps), s, f8), 7 * m * d),
        ("rmsnorm->codes static: fused", lambda: tq.rmsnorm_quant_static(x, w, eps, s, f8), 3 * m * d),
        ("rmsnorm->codes dynamic: F.rms_norm + quant_dynamic_rows", lambda: quant_dynamic_rows(F.rms_norm(x, (d,), w, eps), f8), 7 * m * d),
        ("rmsnorm->codes dynamic: fused", lambda: tq.rmsnorm_quant_dynamic(x, w, eps, f8), 3 * m * d),
        ("silu*up->codes static: torch + quant_static", lambda: tq.quant_static(F.silu(g) * u, s, f8), 4 * m * nh + 2 * m * nh + 3 * m * nh + 4 * m * nh),
        ("silu*up->codes static: fused", lambda: tq.silu_mul_quant_static(gu, s, f8), 5 * m * nh),
        ("silu*up->codes dynamic: torch + quant_dynamic_rows", lambda: quant_dynamic_rows(F.silu(g) * u, f8), 4 * m * nh + 2 * m * nh + 3 * m * nh + 4 * m * nh),
        ("silu*up->codes dynamic: fused, row in registers", lambda: tq.silu_mul_quant_dynamic(gu, f8, single=True), 5 * m * nh),
        ("silu*up->codes dynamic: fused, two passes", lambda: tq.silu_mul_quant_dynamic(gu, f8, single=False), 5 * m * nh),
        ("gate/up GEMM alone (_scaled_mm, bf16 out)", mm, None),
        ("gate/up -> codes static: _scaled_mm + fused silu*up", lambda: tq.silu_mul_quant_static(mm(), s, f8), None),
        ("gate/up -> codes static: fused-gemm (Triton epilogue)", lambda: tq.swiglu_matmul_static(qa, wq, cs, s, f8), None),
        ("gate/up -> codes dynamic: _scaled_mm + fused silu*up", lambda: tq.silu_mul_quant_dynamic(mm(), f8), None),
        ("gate/up -> codes dynamic: fused-gemm (epilogue bf16 + row max, then codes)", lambda: tq.swiglu_matmul_dynamic(qa, wq, cs, sa, f8), None),
    ]
    out = []
    print(f"kernel bench, {m} tokens (FP8 codes):", flush=True)
    for name, fn, nbytes in cases:
        fn()
        ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
        row = {"tokens": m, "case": name, "us": ms * 1e3}
        extra = ""
        if nbytes is not None:
            row["gb_per_s"] = nbytes / (ms * 1e-3) / 1e9
            extra = f", {row['gb_per_s']:.0f} GB/s counted"
        else:
            row["tflops"] = 2.0 * m * d * 2 * nh / (ms * 1e-3) / 1e12
            extra = f", {row['tflops']:.0f} TFLOP/s (GEMM flops)"
        if "fused-gemm" in name:  # the autotuner's pick for this shape
            row["config"] = str(getattr(tq._swiglu_mm_kernel, "best_config", None))
            extra += f" [{row['config']}]"
        print(f"  {name}: {ms * 1e3:.1f} us{extra}", flush=True)
        out.append(row)
    return out


def gpu_rows(results: list[dict]) -> list:
    """Result rows of :func:`layer_bench`: three per method (prefill and decode tokens/s, peak MB)."""
    from ..eval.results import Row

    rows = []
    for r in results:
        method = r["method"]
        quant = method not in ("bf16", "fp")
        for metric in ("prefill_tokens_per_s", "decode_tokens_per_s", "peak_mem_mb"):
            rows.append(Row(model=f"layer:{r['shape']}", method=method, w_bits=8 if quant else None,
                            a_bits=8 if quant else None,
                            act_granularity=("per-token" if method == "dynamic-token" else "per-tensor") if quant
                            else None, static=(method != "dynamic-token") if quant else None, metric=metric,
                            value=r[metric], seconds=r["prefill_seconds"],
                            extra={"backend": r["backend"], "prefill_tflops": r["prefill_tflops"],
                                   "rel_error": r.get("rel_error")}))
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shapes", default="llama2-7b,llama2-7b-16k,vit-b16,vit-l14")
    parser.add_argument("--backends", default="cuda-fp8,cuda-int8")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="unfused (the modules as they are), fused-producers, fused-gemm (gated shapes only)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved timing rounds per backend")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--kernel-bench", action="store_true", help="also time the fused kernels alone")
    parser.add_argument("--results-file", default=None)
    args = parser.parse_args(argv)
    if args.device == "cuda":
        print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
        check_quantizers()
    rows, kernels = [], []
    variants = tuple(v for v in args.variants.split(",") if v)
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        vs = variants if shape.gated else tuple(v for v in variants if v == "unfused")
        if args.kernel_bench and args.device == "cuda" and shape.gated:
            kernels += kernel_bench(shape.batch * shape.seq, shape.hidden, shape.mlp)
        rows += layer_bench(shape, args.device, args.backends.split(","), args.repeats, variants=vs,
                            rounds=args.rounds)
        print(format_rows([r for r in rows if r["shape"] == name]), flush=True)
    print(format_rows(rows))
    print(format_comparison(rows))
    if args.results_file:
        from ..fileio import atomic_write_text
        from pathlib import Path

        atomic_write_text(Path(args.results_file), json.dumps({"rows": rows, "kernels": kernels}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
