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
from .linear import RealQuantLinear
from .triton_quant import FP8_MAX, int8_matmul_scaled, quant_dynamic_rows


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

    def attention(self, x: torch.Tensor, kv: Optional[tuple]) -> torch.Tensor:
        b, t, d = x.shape
        h, hd = self.s.heads, d // self.s.heads
        qkv = self.qkv(self.norm1(x)).view(b, t, 3, h, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if kv is not None:
            k = torch.cat([kv[0], k], dim=2)
            v = torch.cat([kv[1], v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.s.causal and kv is None)
        return self.o(out.transpose(1, 2).reshape(b, t, d))

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        q, s = quant_dynamic_rows(x2, self.dtype)
        if self.backend == "cuda-fp8":
            y = torch._scaled_mm(q, self.qweight.t(), scale_a=s, scale_b=self.w_scale, out_dtype=torch.bfloat16)
        else:
            y = int8_matmul_scaled(q, self.qweight, self.w_scale.reshape(-1), s, None, x.dtype)
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
def layer_bench(shape: Shape, device: str, backends: list[str], repeats: int = 20, seed: int = 0) -> list[dict]:
    """Measure every method on one layer shape; returns result dicts (one per method and phase)."""
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
    rows = []

    def record(method: str, backend: str, layer: nn.Module, state: Optional[SinkState]) -> None:
        if state is not None:
            state.reset(known)
            state.flat_index()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        prefill = timer(lambda: layer(x), repeats)
        peak = torch.cuda.max_memory_allocated() / 2 ** 20 if dev.type == "cuda" else None
        # decode: one token per sequence against a KV cache of t tokens (no sinks among new tokens)
        hd = d // shape.heads
        kv = (torch.randn(b, shape.heads, t, hd, device=dev, dtype=ref_dtype),
              torch.randn(b, shape.heads, t, hd, device=dev, dtype=ref_dtype))
        x1 = x[:, -1:].contiguous()
        if state is not None:
            state.reset(None)
        decode = timer(lambda: layer(x1, kv), repeats)
        print(f"  {shape.name} {method} {backend}: prefill {prefill * 1e3:.3f} ms, decode {decode * 1e3:.3f} ms",
              flush=True)
        rows.append({"shape": shape.name, "method": method, "backend": backend, "tokens": b * t,
                     "prefill_seconds": prefill, "prefill_tokens_per_s": b * t / prefill,
                     "prefill_tflops": base.flops(b * t, t) / prefill / 1e12,
                     "decode_seconds": decode, "decode_tokens_per_s": b / decode, "peak_mem_mb": peak})

    ref = SynthLayer(shape).to(dev)
    ref.load_state_dict(base.state_dict())
    ref = ref.to(ref_dtype)
    record("bf16" if dev.type == "cuda" else "fp", "cuda-bf16" if dev.type == "cuda" else "cpu-fp32", ref, None)
    y_ref = ref(x).float()
    for backend in backends:
        dyn = SynthLayer(shape).to(dev)
        dyn.load_state_dict(base.state_dict())
        for name, lin in dyn.linears().items():
            setattr(dyn, name, DynamicRowLinear(lin, backend))
        _norms_to(dyn, ref_dtype)
        record("dynamic-token", backend, dyn, None)
        rows[-1]["rel_error"] = float((dyn(x).float() - y_ref).norm() / y_ref.norm())
        st = SinkState("bsd")
        stat = SynthLayer(shape).to(dev)
        stat.load_state_dict(base.state_dict())
        st.reset(known)
        stat = _static_layer(stat, backend, calib, st)
        _norms_to(stat, ref_dtype)
        record("insertquant", backend, stat, st)
        st.reset(known)
        y = stat(x).float()
        rows[-1]["rel_error"] = float((y[:, 1:] - y_ref[:, 1:]).norm() / y_ref[:, 1:].norm())
        del dyn, stat
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = ["| shape | method | backend | prefill tok/s | x bf16 | TFLOP/s | decode tok/s | x bf16 | peak MB | rel. error |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    ref = {}
    for r in rows:
        if r["method"] in ("bf16", "fp"):
            ref[r["shape"]] = r
    for r in rows:
        base = ref[r["shape"]]
        err = r.get("rel_error")
        peak = r.get("peak_mem_mb")
        lines.append(
            f"| {r['shape']} | {r['method']} | {r['backend']} | {r['prefill_tokens_per_s']:.0f} | "
            f"{base['prefill_seconds'] / r['prefill_seconds']:.2f} | {r['prefill_tflops']:.0f} | "
            f"{r['decode_tokens_per_s']:.0f} | {base['decode_seconds'] / r['decode_seconds']:.2f} | "
            f"{'-' if peak is None else f'{peak:.0f}'} | {'-' if err is None else f'{err:.4f}'} |")
    return "\n".join(lines)


def check_quantizers() -> None:
    """The fused Triton quantizers against an eager reference, on fresh random data (fails loudly)."""
    from . import triton_quant as tq

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


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shapes", default="llama2-7b,llama2-7b-16k,vit-b16,vit-l14")
    parser.add_argument("--backends", default="cuda-fp8,cuda-int8")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--results-file", default=None)
    args = parser.parse_args(argv)
    if args.device == "cuda":
        print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
        check_quantizers()
    rows = []
    for name in args.shapes.split(","):
        rows += layer_bench(SHAPES[name], args.device, args.backends.split(","), args.repeats)
        print(format_rows([r for r in rows if r["shape"] == name]), flush=True)
    if args.results_file:
        from ..recipe import atomic_write_text
        from pathlib import Path

        atomic_write_text(Path(args.results_file), json.dumps({"rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
