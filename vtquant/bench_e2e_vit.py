"""End-to-end encoder forward of a CLIP ViT at real shapes: bf16 vs dynamic and vtquant static FP8 (issue 13, vision).

The vision sibling of :mod:`vtquant.bench_e2e` (``python -m vtquant.bench_e2e --model-shape vit-b16-clip`` lands
here).  A timm CLIP image tower at its real shape (``vit-b16-clip``: ``vit_base_patch16_clip_224``, width 768,
12 blocks; ``vit-l14-clip``: ``vit_large_patch14_clip_224``, width 1,024, 24 blocks; ``vit-tiny``: a small one for
tests), random weights, with an implanted massive-activation sink on the CLS token (the mechanism of
``tests/visionmodels.py``: the CLS embedding carries a trigger channel, a pair of MLP neurons of the emergence
block writes ``--spike`` into a residual channel, a neuron of a later block cancels it exactly; nothing else
writes those channels).  The model is calibrated where it sits (the GPU, bf16; the rotated method in float32) by
``vtquant.quantize_`` (W8A8 per-tensor static, known sink ``cls``), converted with ``convert_(model, "cuda-fp8")``
(the producer-fused ViT block forward, :mod:`vtquant.kernels.fused_vit`) and timed on one batch of ``--batch``
random images.  Rows:

* ``bf16``: timm's model as built (SDPA attention);
* ``dynamic-token``: every block Linear a per-token dynamic FP8 Linear, blocks fused the same way
  (:func:`vtquant.kernels.fused_vit.fuse_vit_dynamic_`: the row max inside the producer kernels);
* ``insertquant`` / ``insertquant+rotate``: vtquant's static FP8 model (the rotated one with the LayerNorm
  rotation and the online Hadamard at ``fc2``).

Each row: the median over ``--repeats`` eager calls of ``model.forward_features`` (patch embedding, blocks, final
norm) after warm-up (CUDA events), TFLOP/s over the Linears, attention and the patch projection, ratios to bf16
and to dynamic-token, the relative error of the features and of the CLS row against bf16, how many blocks ran
fused, and with ``--profile`` the top CUDA kernels of one forward.  ``--cuda-graph`` also times a CUDA-graph
replay of the forward where it can be captured (a forward with host synchronisations, such as vtquant's sink
detection, cannot be).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import time
from typing import Optional

import torch
import torch.nn as nn

from .bench_e2e import DynamicTokenLinear, _cast_outside_quantizers_, _time, profile_top

SHAPES = {
    "vit-b16-clip": dict(arch="vit_base_patch16_clip_224"),
    "vit-l14-clip": dict(arch="vit_large_patch14_clip_224"),
    "vit-tiny": dict(kwargs=dict(img_size=32, patch_size=8, embed_dim=64, depth=6, num_heads=4, pre_norm=True,
                                 class_token=True, global_pool="token", num_classes=0)),
}
METHODS = ("bf16", "dynamic-token", "insertquant", "insertquant+rotate")
TRIGGER, SPIKE = 3, 7
TRIG = 20.0


def build_vit(shape: str, device: str = "cuda", dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    import timm
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    spec = SHAPES[shape]
    if "arch" in spec:
        model = timm.create_model(spec["arch"], pretrained=False, num_classes=0)
    else:
        model = VisionTransformer(**spec["kwargs"])
    return model.to(device=device, dtype=dtype).eval()


@torch.no_grad()
def implant_cls_sink(model: nn.Module, spike: float = 1000.0, emergence: int = 2, cancellation: Optional[int] = None,
                     emerge_act: float = 1000.0) -> None:
    """Implant the CLS massive activation (emergence at block ``emergence``, cancelled at ``cancellation``)."""
    blocks = list(model.blocks)
    cancellation = len(blocks) - 2 if cancellation is None else cancellation
    size = model.patch_embed.img_size
    probe = torch.randn(4, 3, *size, device=model.cls_token.device, dtype=model.cls_token.dtype,
                        generator=torch.Generator(device=model.cls_token.device).manual_seed(99))
    conv = model.patch_embed.proj
    for ch in (TRIGGER, SPIKE):
        conv.weight[ch] = 0.0
        if conv.bias is not None:
            conv.bias[ch] = 0.0
        model.pos_embed[..., ch] = 0.0
    model.cls_token[..., SPIKE] = 0.0
    model.cls_token[..., TRIGGER] = TRIG
    for block in blocks:  # the two channels are clean: no writer touches them, fc1 ignores the trigger
        for w in (block.attn.proj, block.mlp.fc2):
            for ch in (TRIGGER, SPIKE):
                w.weight[ch] = 0.0
                if w.bias is not None:
                    w.bias[ch] = 0.0
        block.mlp.fc1.weight[:, TRIGGER] = 0.0
        block.mlp.fc1.weight[:, SPIKE] = 0.0

    def capture(module: nn.Module, column: int, tokens: int) -> torch.Tensor:
        seen: dict = {}

        def hook(m, args):
            seen.setdefault("x", args[0].reshape(-1, tokens, args[0].shape[-1])[..., column].float().clone())

        h = module.register_forward_pre_hook(hook)
        model.forward_features(probe)
        h.remove()
        return seen["x"]  # [B, T]

    t = model.patch_embed.num_patches + model.num_prefix_tokens
    fc1, fc2 = blocks[emergence].mlp.fc1, blocks[emergence].mlp.fc2
    n1, n1b = 5, 6
    for n in (n1, n1b):
        fc1.weight[n] = 0.0
        fc1.bias[n] = 0.0
        fc2.weight[:, n] = 0.0
    z = capture(fc1, TRIGGER, t)
    zs, zn = float(z[:, 0].min()), float(z[:, 1:].max())
    if not zs > zn + 0.5:
        raise RuntimeError(f"the CLS trigger is not separable at block {emergence} ({zs:.2f} vs {zn:.2f})")
    thr = (zs + zn) / 2
    gain = 3 * emerge_act / (zs - thr)
    fc1.weight[n1, TRIGGER] = gain
    fc1.bias[n1] = -gain * thr
    fc1.weight[n1b, TRIGGER] = gain
    fc1.bias[n1b] = -gain * thr - emerge_act
    fc2.weight[SPIKE, n1] = spike / emerge_act
    fc2.weight[SPIKE, n1b] = -spike / emerge_act
    # cancellation: a neuron reads the spike channel and writes it back out
    blk = blocks[cancellation]
    fc1, fc2 = blk.mlp.fc1, blk.mlp.fc2
    n2 = 9
    fc1.weight[n2] = 0.0
    fc1.bias[n2] = 0.0
    fc2.weight[:, n2] = 0.0
    h = capture(blk, SPIKE, t)  # the residual entering the block
    u = capture(fc1, SPIKE, t)
    us, un = float(u[:, 0].min()), float(u[:, 1:].max())
    thr2 = (us + un) / 2
    gain2 = 2.0 / (us - thr2)
    fc1.weight[n2, SPIKE] = gain2
    fc1.bias[n2] = -gain2 * thr2
    act = capture(fc2, n2, t)
    fc2.weight[SPIKE, n2] = -float(h[:, 0].mean()) / float(act[:, 0].mean())


def dynamic_vit_(model: nn.Module, backend: str = "cuda-fp8", fused: bool = True) -> nn.Module:
    """Every block Linear a per-token dynamic Linear; ``fused``: the fused ViT block forward."""
    from .core.modules import replace_module
    from .kernels.fused_vit import fuse_vit_dynamic_

    for block in model.blocks:
        for name, module in list(block.named_modules()):
            if isinstance(module, nn.Linear):
                replace_module(block, name, DynamicTokenLinear(module, backend))
    if fused:
        fuse_vit_dynamic_(model, list(model.blocks))
    return model


def encoder_flops(model: nn.Module, batch: int) -> float:
    t = model.patch_embed.num_patches + model.num_prefix_tokens
    m = batch * t
    lin = sum(mod.in_features * mod.out_features for blk in model.blocks for mod in blk.modules()
              if isinstance(mod, nn.Linear))
    c = model.embed_dim
    attention = 4 * batch * t * t * c * len(model.blocks)
    conv = model.patch_embed.proj
    patch = 2 * batch * model.patch_embed.num_patches * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] * c
    return float(2 * m * lin + attention + patch)


def host_syncs(fn) -> dict:
    """Where one call of ``fn`` synchronises with the GPU (``torch.cuda.set_sync_debug_mode``) and how long the
    host takes to issue it (perf_counter from a synchronised start to the return, then to the GPU's end)."""
    import collections
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode(1)
        try:
            t0 = time.perf_counter()
            fn()
            t1 = time.perf_counter()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
    where = collections.Counter(f"{w.filename.rsplit('/', 2)[-1]}:{w.lineno}" for w in caught
                                if "synchroniz" in str(w.message))
    return {"host_syncs": dict(where), "host_issue_ms": round((t1 - t0) * 1e3, 2),
            "host_total_ms": round((t2 - t0) * 1e3, 2)}


def host_profile(fn, top: int = 14) -> list[str]:
    """The host functions of one call of ``fn`` by their own time (cProfile), as text lines."""
    import cProfile
    import io
    import pstats

    torch.cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    fn()
    pr.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(top)
    return [line for line in buf.getvalue().splitlines() if line.strip()][-top - 1:]


def _graph_time(fn, repeats: int) -> tuple[Optional[float], str]:
    """CUDA-graph replay time of ``fn`` (median), or ``(None, why not)``."""
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return _time(g.replay, torch.device("cuda"), repeats), ""
    except Exception as exc:  # noqa: BLE001 - reported in the row
        torch.cuda.synchronize()
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"


def vit_bench(shape: str = "vit-b16-clip", batch: int = 256, device: str = "cuda", methods: tuple = METHODS,
              calib_batches: int = 4, calib_batch: int = 16, repeats: int = 10, spike: float = 1000.0,
              backend: Optional[str] = None, fused: bool = True, profile: bool = False,
              cuda_graph: bool = False, quiet: bool = True, seed: int = 0, block_graphs: bool = False) -> list[dict]:
    import vtquant
    from .config import Recipe, SinkConfig, method_recipe
    from .kernels import convert_

    dev = torch.device(device)
    backend = backend or ("cuda-fp8" if dev.type == "cuda" else "cpu-int8")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    base = build_vit(shape, device, torch.float32, seed)
    implant_cls_sink(base, spike=spike)
    base32 = base
    base = copy.deepcopy(base32).to(dtype)
    size = base.patch_embed.img_size
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randn(calib_batch, 3, *size, generator=gen) for _ in range(calib_batches)]
    x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(2)).to(device=dev, dtype=dtype)
    flops = encoder_flops(base, batch)

    def feats(model: nn.Module, inp: torch.Tensor = x) -> torch.Tensor:
        return model.forward_features(inp)

    with torch.no_grad():
        ref = feats(base).float()
    rows: list[dict] = []
    timings: dict = {}
    for method in methods:
        row: dict = {"model_shape": shape, "batch": batch, "tokens": int(ref.shape[1]), "method": method,
                     "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                     "backend": "bf16" if method == "bf16" else backend, "torch": torch.__version__}
        if method == "bf16":
            model = base
        elif method == "dynamic-token":
            model = dynamic_vit_(copy.deepcopy(base), backend, fused=fused)
            row["fused_blocks"] = sum(v == "fused" for v in getattr(model, "_vtquant_fusion_report", {}).values())
        else:
            recipe = method_recipe(method, Recipe(sinks=SinkConfig(known_sinks=["cls"]), ignore=[]))
            calib_dtype = torch.float32 if recipe.rotation.enabled else dtype
            model = copy.deepcopy(base32 if calib_dtype == torch.float32 else base)
            row["calib_dtype"] = str(calib_dtype).replace("torch.", "")
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            report = vtquant.quantize_(model, recipe, [c.to(device=dev, dtype=calib_dtype) for c in calib],
                                       quiet=quiet)
            if calib_dtype != dtype:
                _cast_outside_quantizers_(model, dtype)
            row.update(calib_seconds=round(time.perf_counter() - t0, 2), emergence_layer=report.emergence_layer,
                       calib_images=calib_batches * calib_batch,
                       cls_sink_found=bool(report.calib_sink_positions) and all(
                           p[:1] == [0] for p in report.calib_sink_positions))
            convert_(model, backend, fused=fused)
            rep = getattr(model.vtquant, "fused", None) or {}
            row["fused_blocks"] = sum(v == "fused" for v in rep.values())
            reasons = sorted({v for v in rep.values() if v != "fused"})
            if reasons:
                row["not_fused"] = reasons
        with torch.no_grad():
            out = feats(model).float()
            row["feature_err_vs_bf16"] = round(float((out - ref).norm() / ref.norm()), 5)
            row["cls_err_vs_bf16"] = round(float((out[:, 0] - ref[:, 0]).norm() / ref[:, 0].norm()), 5)
            seconds = _time(lambda: feats(model), dev, repeats)
            if profile and dev.type == "cuda":
                row["profile"] = profile_top(lambda: feats(model), top=14)
                row.update(host_syncs(lambda: feats(model)))
                row["host_profile"] = host_profile(lambda: feats(model))
            if cuda_graph and dev.type == "cuda" and method not in ("bf16", "dynamic-token") and row.get("host_syncs"):
                row["graph_error"] = (f"not captured: {sum(row['host_syncs'].values())} host synchronisations per "
                                      "forward (sink detection)")
            elif cuda_graph and dev.type == "cuda":
                xs = x.clone()
                g_seconds, why = _graph_time(lambda: feats(model, xs), repeats)
                row["graph_seconds"] = None if g_seconds is None else round(g_seconds, 5)
                if why:
                    row["graph_error"] = why
                else:
                    timings[method + "/graph"] = g_seconds
            if block_graphs and dev.type == "cuda" and method not in ("bf16", "dynamic-token"):
                from .kernels import fused_vit as fv

                fv.BLOCK_GRAPHS = True
                try:
                    feats(model)  # eager on the graph buffers (warm-up), then capture
                    bg = _time(lambda: feats(model), dev, repeats)
                    outg = feats(model).float()
                finally:
                    fv.BLOCK_GRAPHS = False
                fw = [getattr(b, "forward", None) for b in model.blocks]
                row.update(block_graph_seconds=round(bg, 5),
                           graphed_blocks=sum(bool(getattr(f, "graphs", None)) for f in fw),
                           block_graph_vs_eager=round(float((outg - out).norm() / out.norm()), 6),
                           block_graph_errors=sorted({f.graph_error for f in fw if getattr(f, "graph_error", "")}))
                timings[method + "/block-graphs"] = bg
                if "bf16" in timings:
                    row["block_graph_x_bf16"] = round(timings["bf16"] / bg, 3)
                if "dynamic-token" in timings:
                    row["block_graph_x_dynamic"] = round(timings["dynamic-token"] / bg, 3)
        timings[method] = seconds
        row.update(seconds=round(seconds, 5), tflops=round(flops / seconds / 1e12, 1), images_per_s=round(batch / seconds))
        if "bf16" in timings:
            row["x_bf16"] = round(timings["bf16"] / seconds, 3)
            if method + "/graph" in timings and "bf16/graph" in timings:
                row["graph_x_bf16_graph"] = round(timings["bf16/graph"] / timings[method + "/graph"], 3)
                row["graph_x_bf16_eager"] = round(timings["bf16"] / timings[method + "/graph"], 3)
        if "dynamic-token" in timings and method != "dynamic-token":
            row["x_dynamic"] = round(timings["dynamic-token"] / seconds, 3)
        rows.append(row)
        if model is not base:
            del model
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def format_rows(rows: list[dict]) -> str:
    cols = ["model_shape", "method", "fused_blocks", "seconds", "images_per_s", "tflops", "x_bf16", "x_dynamic",
            "feature_err_vs_bf16", "cls_err_vs_bf16", "graph_seconds", "block_graph_seconds", "block_graph_x_bf16",
            "block_graph_x_dynamic", "graphed_blocks", "block_graph_vs_eager", "calib_seconds"]
    lines = [" | ".join(cols)]
    for r in rows:
        lines.append(" | ".join(str(r.get(c, "")) for c in cols))
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-shape", default="vit-b16-clip", choices=sorted(SHAPES))
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--device", default="cuda")
    p.add_argument("--backend", default=None)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--calib-batches", type=int, default=4)
    p.add_argument("--calib-batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--spike", type=float, default=1000.0)
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--cuda-graph", action="store_true", help="also time a CUDA-graph replay where it can be captured")
    p.add_argument("--block-graphs", action="store_true",
                   help="also time the static models with each block (but the stage layer) replayed as a CUDA graph")
    p.add_argument("--results-file", default=None)
    args, _ = p.parse_known_args(argv)
    rows = vit_bench(args.model_shape, args.batch, args.device, tuple(args.methods.split(",")), args.calib_batches,
                     args.calib_batch, args.repeats, args.spike, args.backend, args.fused, args.profile,
                     args.cuda_graph, block_graphs=args.block_graphs)
    print(format_rows(rows))
    for r in rows:
        if r.get("graph_error"):
            print(f"  {r['method']}: no CUDA graph ({r['graph_error']})")
        if r.get("host_syncs") is not None:
            print(f"  {r['method']}: host syncs {r['host_syncs']}, host issue {r['host_issue_ms']} ms of {r['host_total_ms']} ms")
        for line in r.get("host_profile", []):
            print(f"  {r['method']:<20} host {line}")
        if r.get("not_fused"):
            print(f"  {r['method']}: blocks not fused: {r['not_fused']}")
        for k in r.get("profile", []):
            print(f"  {r['method']:<20} {k['share']:6.1%} {k['us']:10.1f} us  x{k['calls']:<4} {k['name']}")
    if args.results_file:
        with open(args.results_file, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
