"""End-to-end prefill of a whole (truncated) decoder: bf16 vs dynamic and vtquant static low-bit kernels.

Issue 13's measurement: a transformers ``LlamaForCausalLM`` with the shapes of a real model
(``--model-shape``: llama-2-7b, llama-3-8b, llama-3-70b), truncated to ``--layers`` blocks, random
weights, and an implanted massive-activation sink (the mechanism of ``tests/sinkmodels.py``: the
sink token's embedding carries a trigger channel, one MLP neuron of the emergence layer writes
``--spike`` into a residual channel, a later layer cancels it; keys read that channel, so the
token is also an attention sink).  The model is calibrated *where it sits* (the GPU, in bf16) by
``vtquant.quantize_`` (``--pipeline sequential`` runs the calibration block by block), then
converted to real kernels.  Rows (each timed on the same prefill of ``--tokens`` tokens):

* ``bf16``: the model as built;
* ``dynamic-token``: every block Linear replaced by a per-token dynamic FP8 (int8) Linear (one fused
  Triton kernel for the row scales, then a row-scaled ``_scaled_mm``), the usual peer;
* ``insertquant``: ``quantize_`` (W8A8 per-tensor static, sinks clamped and inserted) +
  ``convert_(model, "cuda-fp8")``;
* ``insertquant+rotate``: the same with the QuaRot-style rotation (online Hadamard at ``down_proj``).

By default (``--fused``) both 8-bit models run the producer-fused block forward
(:mod:`vtquant.kernels.fused`): RMSNorm / SiLU * up / attention output write the codes (static: a
known scale, sink rows zeroed in the same kernel; dynamic: the row max in the same kernel), q/k/v and
gate/up are one GEMM each, sink rows are written by index, attention runs through SDPA, and the rotated
model's online Hadamard is fused with SiLU * up and the quantization (:mod:`vtquant.kernels.triton_hadamard`).
``--no-fused`` gives the per-Linear modules of the earlier rows.  ``--profile`` adds the top CUDA
kernels of one forward per method (``torch.profiler``) to each row.

Each row reports the median eager forward time of the decoder (``model.model``; no head) measured
with CUDA events after warm-up, so Python overhead and host synchronisations of a module are part of
the time (this is the model as users run it, not a CUDA graph of one layer as in the layer bench),
TFLOP/s over the Linears and causal attention, the ratio to bf16 and to dynamic-token, the relative
error of the logits of the last 256 tokens against bf16, and for calibrated rows the calibration time and the
peak GPU memory of calibration.

Usage::

    python -m vtquant.bench_e2e --model-shape llama-2-7b --layers 8 --tokens 4096 --results-file out.json
    python -m vtquant.bench_e2e --model-shape vit-b16-clip --batch 256   # ViT encoders: vtquant.bench_e2e_vit
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import time
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from .bench.gpu import DynamicRowLinear

SHAPES = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                       vocab_size=32000),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                       vocab_size=128256, rope_theta=500000.0),
    "llama-3-70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                        vocab_size=128256, rope_theta=500000.0),
    "small": dict(hidden_size=512, intermediate_size=3584, num_attention_heads=8, num_key_value_heads=2,
                  vocab_size=512),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=64),
}
"""Model shapes (``tiny`` is for tests on the CPU, ``small`` for GPU tests: 3584 = 16 x 224 takes the Triton
Hadamard kernel)."""

SINK_ID, TRIGGER_CHANNEL, SPIKE_CHANNEL = 1, 3, 7
METHODS = ("bf16", "dynamic-token", "insertquant", "insertquant+rotate")


@torch.no_grad()
def implanted_llama(shape: str, layers: int, device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
                    spike: float = 4000.0, emergence: int = 1, cancellation: Optional[int] = None,
                    seed: int = 0) -> nn.Module:
    """A random ``LlamaForCausalLM`` of ``shape`` with ``layers`` blocks and an implanted sink (token ``SINK_ID``)."""
    import transformers

    if layers < 3:
        raise ValueError("the implanted sink needs at least 3 layers (emergence, attention sink, cancellation)")
    cancellation = layers - 1 if cancellation is None else cancellation
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(num_hidden_layers=layers, max_position_embeddings=16384,
                                   tie_word_embeddings=False, **SHAPES[shape])
    with torch.device(device):  # random init where the model will run (fast on a GPU)
        model = transformers.LlamaForCausalLM(cfg).to(dtype).eval()
    emb = model.model.embed_tokens.weight
    emb[:, TRIGGER_CHANNEL] = 0.0
    emb[:, SPIKE_CHANNEL] = 0.0
    emb[SINK_ID, TRIGGER_CHANNEL] = 1.0
    for block in model.model.layers:
        for writer in (block.self_attn.o_proj, block.mlp.down_proj):
            writer.weight[TRIGGER_CHANNEL] = 0.0
            writer.weight[SPIKE_CHANNEL] = 0.0
    probe_ids = torch.tensor([[SINK_ID, 5, 6, 7]], device=device)

    def neuron_input(mlp: nn.Module, neuron: int, layer: nn.Module, channel: Optional[int] = None) -> tuple:
        seen: dict = {}

        def at_down(m: nn.Module, inputs: tuple) -> None:
            seen.setdefault("x", float(inputs[0][0, 0, neuron]))

        def at_layer(m: nn.Module, args: tuple, kwargs: dict) -> None:
            seen.setdefault("h", float((args[0] if args else kwargs["hidden_states"])[0, 0, channel or 0]))

        h1 = mlp.down_proj.register_forward_pre_hook(at_down)
        h2 = layer.register_forward_pre_hook(at_layer, with_kwargs=True)
        model(input_ids=probe_ids, use_cache=False)
        h1.remove(), h2.remove()
        return seen["x"], seen["h"]

    gain, neuron = 4.0, 5
    mlp = model.model.layers[emergence].mlp
    for lin in (mlp.gate_proj, mlp.up_proj):
        lin.weight[neuron] = 0.0
        lin.weight[neuron, TRIGGER_CHANNEL] = gain
    mlp.down_proj.weight[:, neuron] = 0.0
    act, _ = neuron_input(mlp, neuron, model.model.layers[emergence])
    mlp.down_proj.weight[SPIKE_CHANNEL, neuron] = spike / act
    for block in model.model.layers[emergence + 1:cancellation + 1]:
        k = block.self_attn.k_proj.weight
        k[:, SPIKE_CHANNEL] = 0.5 * torch.sign(torch.randn(k.shape[0], device=device)).to(k.dtype)
        block.self_attn.q_proj.weight[:, SPIKE_CHANNEL] = 0.0
    neuron2 = 9
    mlp = model.model.layers[cancellation].mlp
    for lin in (mlp.gate_proj, mlp.up_proj):
        lin.weight[neuron2] = 0.0
        lin.weight[neuron2, SPIKE_CHANNEL] = 1.0
    mlp.down_proj.weight[:, neuron2] = 0.0
    act, resid = neuron_input(mlp, neuron2, model.model.layers[cancellation], SPIKE_CHANNEL)
    mlp.down_proj.weight[SPIKE_CHANNEL, neuron2] = -0.95 * resid / act
    return model


def token_batches(n: int, seq: int, vocab: int, seed: int = 1, batch: int = 1) -> list[torch.Tensor]:
    """Random token ids (>= 2) with the sink token first in every row."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(2, vocab, (batch, seq), generator=gen)
        ids[:, 0] = SINK_ID
        out.append(ids)
    return out


class DynamicTokenLinear(DynamicRowLinear):
    """The layer bench's per-token dynamic Linear (row absmax scales per call, row-scaled GEMM) with
    the Linear's bias, for whole models."""

    def __init__(self, linear: nn.Linear, backend: str = "cuda-fp8") -> None:
        super().__init__(linear, backend)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def dynamic_token_(model: nn.Module, backend: str = "cuda-fp8", fused: bool = False) -> nn.Module:
    """Replace every block Linear of a Llama-style model by a :class:`DynamicTokenLinear` (in place);
    ``fused``: then run the blocks through the producer-fused forward (:func:`vtquant.kernels.fused.fuse_dynamic_`)."""
    from .core.modules import replace_module
    from .kernels.fused import decoder_layout, fuse_dynamic_

    layout = decoder_layout(model) if fused else None
    for block in model.model.layers:
        for name, module in list(block.named_modules()):
            if isinstance(module, nn.Linear):
                replace_module(block, name, DynamicTokenLinear(module, backend))
    if fused:
        fuse_dynamic_(model, layout)
    return model


def profile_top(fn: Callable[[], Any], top: int = 12) -> list[dict]:
    """The ``top`` CUDA kernels of one call of ``fn`` by GPU time (torch.profiler), as rows."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        fn()
        torch.cuda.synchronize()
    # kernels only: an aten:: op's self device time is its kernels' time again
    events = [e for e in prof.key_averages() if getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0)) > 0
              and not e.key.startswith("aten::")]

    def dev(e: Any) -> float:
        return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)))

    total = sum(dev(e) for e in events) or 1.0
    events.sort(key=dev, reverse=True)
    return [{"name": e.key[:90], "us": round(dev(e), 1), "share": round(dev(e) / total, 3), "calls": e.count}
            for e in events[:top] if dev(e) > 0]


def prefill_flops(cfg: Any, layers: int, tokens: int) -> float:
    """Linears (2 x tokens x in x out) and causal attention (2 x tokens^2 x hidden, QK and PV halved)."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    head_dim = d // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * head_dim
    linear = 2 * tokens * (d * (d + 2 * kv) + d * d + 3 * d * f)
    attention = 2 * tokens * tokens * d  # 4 T^2 D, causal halves it
    return float(layers * (linear + attention))


def _time(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _cast_outside_quantizers_(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the model's floating parameters and buffers to ``dtype``, except inside vtquant's quantized
    Linears (their scales, templates and biases stay float32 and are cast where they are used)."""
    from .core.quant import QuantLinear

    inside = {id(sub) for m in model.modules() if isinstance(m, QuantLinear) for sub in m.modules()}
    for m in model.modules():
        if id(m) in inside:
            continue
        for name, p in m._parameters.items():
            if p is not None and p.is_floating_point():
                p.data = p.data.to(dtype)
        for name, b in m._buffers.items():
            if b is not None and b.is_floating_point():
                m._buffers[name] = b.to(dtype)


def e2e_bench(shape: str = "llama-2-7b", layers: int = 8, tokens: int = 4096, device: str = "cuda",
              methods: tuple = METHODS, calib_batches: int = 16, calib_len: int = 2048, repeats: int = 10,
              spike: float = 4000.0, pipeline: str = "basic", backend: Optional[str] = None,
              offload: bool = False, quiet: bool = True, seed: int = 0, fused: bool = True,
              profile: bool = False) -> list[dict]:
    """The rows of the module docstring (``backend``: ``cuda-fp8`` on a GPU, ``cpu-int8`` on the CPU).

    ``offload``: calibrate with the model kept on the CPU and its blocks run one at a time on
    ``device`` (``pipeline="sequential"``); the calibrated model then moves to ``device`` to be timed.
    """
    import vtquant
    from .config import Recipe, method_recipe
    from .kernels import convert_

    dev = torch.device(device)
    backend = backend or ("cuda-fp8" if dev.type == "cuda" else "cpu-int8")
    dtype = torch.bfloat16
    base = implanted_llama(shape, layers, device, dtype, spike=spike, seed=seed)
    cfg = base.config
    calib = token_batches(calib_batches, calib_len, cfg.vocab_size, seed=1)
    x = token_batches(1, tokens, cfg.vocab_size, seed=2)[0].to(dev)
    flops = prefill_flops(cfg, layers, tokens)

    def hidden(model: nn.Module) -> torch.Tensor:
        return model.model(input_ids=x, use_cache=False).last_hidden_state

    def logits(model: nn.Module) -> torch.Tensor:  # the head undoes a rotation of the residual basis
        return model.lm_head(hidden(model)[:, -256:]).float()

    with torch.no_grad():
        ref = logits(base)
    rows: list[dict] = []
    timings: dict = {}
    for method in methods:
        row: dict = {"model_shape": shape, "layers": layers, "tokens": tokens, "method": method,
                     "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                     "backend": "bf16" if method == "bf16" else backend, "torch": torch.__version__}
        if method == "bf16":
            model = base
        else:
            model = copy.deepcopy(base)
            if method == "dynamic-token":
                dynamic_token_(model, backend, fused=fused)
                report_fused = getattr(model, "_vtquant_fusion_report", {})
                row["fused_blocks"] = sum(v == "fused" for v in report_fused.values())
            else:
                recipe = method_recipe(method, Recipe())
                # a rotation folded in bf16 spreads the 4,000 spike over every channel and loses the rest of the
                # sink's state to rounding (the equivalence check refuses it): rotated methods calibrate in fp32
                # and run in bf16 (vtquant's own quantizer buffers keep float32 scales)
                calib_dtype = torch.float32 if recipe.rotation.enabled else dtype
                row["calib_dtype"] = str(calib_dtype).replace("torch.", "")
                if calib_dtype != dtype:
                    model.to(calib_dtype)
                if offload:
                    model.cpu()
                resident = 0
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                    resident = torch.cuda.memory_allocated(dev)  # the bf16 reference model, kept for the rows
                    torch.cuda.reset_peak_memory_stats(dev)
                t0 = time.perf_counter()
                report = vtquant.quantize_(model, recipe, calib, quiet=quiet,
                                           pipeline="sequential" if offload else pipeline,
                                           **({"device": dev} if offload else {}))
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                    peak = torch.cuda.max_memory_allocated(dev)
                    row["calib_peak_gib"] = round(peak / 2 ** 30, 2)
                    row["calib_peak_extra_gib"] = round((peak - resident) / 2 ** 30, 2)  # what calibration added
                if offload:
                    model.to(dev)
                if calib_dtype != dtype:
                    _cast_outside_quantizers_(model, dtype)
                row.update(calib_seconds=round(time.perf_counter() - t0, 2),
                           pipeline="sequential+offload" if offload else pipeline,
                           calib_tokens=calib_batches * calib_len, emergence_layer=report.emergence_layer,
                           sinks_found=len(report.calib_sink_positions) > 0 and all(
                               p[:1] == [0] for p in report.calib_sink_positions))
                convert_(model, backend, fused=fused)
                row["fused_blocks"] = sum(v == "fused" for v in (getattr(model.vtquant, "fused", None) or {}).values())
        with torch.no_grad():
            out = logits(model)
            row["logit_err_vs_bf16"] = round(float((out - ref).norm() / ref.norm()), 5)
            seconds = _time(lambda: hidden(model), dev, repeats)
            if profile and dev.type == "cuda":
                row["profile"] = profile_top(lambda: hidden(model))
        timings[method] = seconds
        row.update(seconds=round(seconds, 5), tflops=round(flops / seconds / 1e12, 1))
        if "bf16" in timings:
            row["x_bf16"] = round(timings["bf16"] / seconds, 3)
        if "dynamic-token" in timings and method != "dynamic-token":
            row["x_dynamic"] = round(timings["dynamic-token"] / seconds, 3)
        rows.append(row)
        if model is not base:
            del model
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def calib_memory_bench(shape: str, layers: int, device: str = "cuda", method: str = "insertquant",
                       calib_batches: int = 64, calib_len: int = 2048, spike: float = 4000.0, seed: int = 0,
                       quiet: bool = True) -> dict:
    """Calibration alone, the way a model too large for the GPU is calibrated: the model is built on
    the CPU (bf16; fp32 for rotated methods, as in :func:`e2e_bench`), ``quantize_`` runs the
    sequential pipeline with one block at a time on ``device`` and the cached block inputs there.
    Nothing else is on the GPU, so the row's peak GPU memory is calibration's own: it should not grow
    with the number of layers (issue 13: the 70B shape truncated to 4 and to 8 layers)."""
    import vtquant
    from .config import Recipe, method_recipe

    dev = torch.device(device)
    recipe = method_recipe(method, Recipe())
    calib_dtype = torch.float32 if recipe.rotation.enabled else torch.bfloat16
    t0 = time.perf_counter()
    # random init is fast on the GPU (minutes for a 70B-shape model on CPU cores): build there, then move
    # the model to the CPU, where calibration keeps it; the GPU's peak is reset after the move
    model = implanted_llama(shape, layers, device, calib_dtype, spike=spike, seed=seed).cpu()
    build_s = time.perf_counter() - t0
    calib = token_batches(calib_batches, calib_len, model.config.vocab_size, seed=1)
    params = sum(p.numel() for p in model.parameters())
    row: dict = {"model_shape": shape, "layers": layers, "method": method, "mode": "calibration only",
                 "pipeline": "sequential+offload", "calib_dtype": str(calib_dtype).replace("torch.", ""),
                 "calib_tokens": calib_batches * calib_len, "params_b": round(params / 1e9, 3),
                 "model_gib": round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 30, 2),
                 "build_seconds": round(build_s, 1), "device": str(dev), "torch": torch.__version__}
    if dev.type == "cuda":
        row["device"] = torch.cuda.get_device_name(dev)
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        row["gpu_allocated_before_gib"] = round(torch.cuda.memory_allocated(dev) / 2 ** 30, 3)
    t0 = time.perf_counter()
    report = vtquant.quantize_(model, recipe, calib, quiet=quiet, pipeline="sequential", device=dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        row["calib_peak_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2 ** 30, 2)
        row["calib_peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(dev) / 2 ** 30, 2)
    row.update(calib_seconds=round(time.perf_counter() - t0, 1), emergence_layer=report.emergence_layer,
               sinks_found=len(report.calib_sink_positions) > 0 and all(
                   p[:1] == [0] for p in report.calib_sink_positions))
    del model
    gc.collect()
    return row


def format_rows(rows: list[dict]) -> str:
    cols = ["method", "backend", "fused_blocks", "seconds", "tflops", "x_bf16", "x_dynamic", "logit_err_vs_bf16", "calib_seconds",
            "calib_peak_gib", "calib_peak_extra_gib"]
    lines = [" | ".join(cols)]
    for r in rows:
        lines.append(" | ".join(str(r.get(c, "")) for c in cols))
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    import sys

    args_in = list(sys.argv[1:] if argv is None else argv)
    for i, a in enumerate(args_in):  # vision shapes: the ViT encoder bench (vtquant.bench_e2e_vit)
        shape = a.split("=", 1)[1] if a.startswith("--model-shape=") else (
            args_in[i + 1] if a == "--model-shape" and i + 1 < len(args_in) else None)
        if shape is not None and shape.startswith("vit-"):
            from .bench_e2e_vit import main as vit_main

            return vit_main(args_in)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-shape", default="llama-2-7b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--layers-list", default=None, help="with --calib-only: several depths, e.g. 4,8")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--device", default="cuda")
    p.add_argument("--backend", default=None, help="cuda-fp8 (GPU default), cuda-int8, cpu-int8 (CPU default)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--calib-batches", type=int, default=16)
    p.add_argument("--calib-len", type=int, default=2048)
    p.add_argument("--pipeline", default="basic", choices=["basic", "sequential"])
    p.add_argument("--offload", action="store_true",
                   help="calibrate with the model on the CPU, blocks run one at a time on --device (sequential)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--spike", type=float, default=4000.0)
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                   help="8-bit models run the producer-fused block forward (vtquant.kernels.fused)")
    p.add_argument("--profile", action="store_true", help="add the top CUDA kernels of one forward to each row")
    p.add_argument("--calib-only", action="store_true",
                   help="calibration alone (model built on the CPU, sequential pipeline, one block at a time on "
                        "--device): calibration time and peak GPU memory of each of --methods; --layers may list "
                        "several depths (e.g. 4,8)")
    p.add_argument("--results-file", default=None, help="write the rows as JSON")
    args = p.parse_args(argv)
    if args.calib_only:
        rows = []
        for layers in str(args.layers_list or args.layers).split(","):
            for method in args.methods.split(","):
                if method in ("bf16", "dynamic-token"):
                    continue
                rows.append(calib_memory_bench(args.model_shape, int(layers), args.device, method,
                                               args.calib_batches, args.calib_len, args.spike))
                print(json.dumps(rows[-1]), flush=True)
        if args.results_file:
            with open(args.results_file, "w") as f:
                json.dump(rows, f, indent=1)
        return 0
    rows = e2e_bench(args.model_shape, args.layers, args.tokens, args.device, tuple(args.methods.split(",")),
                     args.calib_batches, args.calib_len, args.repeats, args.spike, args.pipeline, args.backend,
                     offload=args.offload, fused=args.fused, profile=args.profile)
    print(format_rows(rows))
    for r in rows:
        for k in r.get("profile", []):
            print(f"  {r['method']:<20} {k['share']:6.1%} {k['us']:10.1f} us  x{k['calls']:<4} {k['name']}")
    if args.results_file:
        with open(args.results_file, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
