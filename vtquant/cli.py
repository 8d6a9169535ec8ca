"""The ``vtquant`` command: demo, compare, analyze, quantize, eval, assets.

Every subcommand shows progress on long work (tqdm), takes ``--quiet`` and
``--results-file F`` (JSON ``{"rows": [...]}``, written atomically).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

DEMO_EVAL_CHUNKS = 8
DEMO_SETTINGS = [
    ("fp", 8, 8), ("naive-static", 8, 8), ("dynamic-token", 8, 8), ("insertquant", 8, 8),
    ("insertquant+rotate", 8, 8),
    ("dynamic-token", 4, 8), ("insertquant+rotate", 4, 8),
    ("dynamic-token", 8, 6), ("insertquant+rotate", 8, 6),
]


VISION_CLIP_ASSET = "asset:clip-vit-b16-openai"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-step logs")
    p.add_argument("--results-file", default=None, help="write result rows as JSON to this file")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all available cores)")


def _model_args(p: argparse.ArgumentParser, vision: bool = False) -> None:
    p.add_argument("--model", default="asset:smollm2-135m",
                   help="asset:NAME, a .gguf file or a local transformers directory" +
                   (f"; or a vision model: {VISION_CLIP_ASSET} (with --library), timm:NAME, open_clip:NAME/PRETRAINED, "
                    "hf:PATH; or a vision-language model: asset:clip-smollm2-llava, vlm:PATH" if vision else
                    "; vision-language models (eval vlm): asset:clip-smollm2-llava or vlm:PATH") + " (default: %(default)s)")
    p.add_argument("--model-file", default=None,
                   help="a GGUF model file given by hand (use when the asset cannot be fetched)")
    p.add_argument("--device", default="cpu",
                   help="where the model runs and is calibrated: cpu, cuda, cuda:N (default: %(default)s)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="the model's dtype; calibration buffers follow it (default: %(default)s)")


DTYPES = ("float32", "bfloat16", "float16")


def _target(args: argparse.Namespace):
    """``(torch.device, torch.dtype)`` of ``--device`` / ``--dtype``; one clear error for a device that is not there."""
    import torch

    from .config import ConfigError

    device = getattr(args, "device", "cpu") or "cpu"
    dtype = getattr(torch, getattr(args, "dtype", "float32") or "float32")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"--device {device!r} is not a device name ({exc}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"--device {device}: no such CUDA GPU is visible here; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device}: vtquant runs on cpu or cuda")
    return dev, dtype


def _place(model, args: argparse.Namespace, log):
    """Move a loaded model to ``--device`` / ``--dtype``."""
    import torch

    dev, dtype = _target(args)
    if dev.type != "cpu" or dtype != torch.float32:
        model.to(device=dev, dtype=dtype)
        log(f"model on {dev}, {str(dtype).replace('torch.', '')}")
    return model


def _cpu_only(args: argparse.Namespace, what: str, device_ok: bool = False) -> None:
    """Refuse ``--device`` / ``--dtype`` on a command path that does not place its model yet (instead of ignoring
    them); ``device_ok``: the path takes ``--device`` itself, only ``--dtype`` is refused."""
    from .config import ConfigError

    dev, dtype = _target(args)
    if dev.type != "cpu" and not device_ok:
        raise ConfigError(f"--device {args.device}: {what} runs on the CPU only for now; leave --device out")
    if str(dtype) != "torch.float32":
        raise ConfigError(f"--dtype {args.dtype}: {what} runs in float32 only for now; leave --dtype out")


def _text_args(p: argparse.ArgumentParser, chunks: Optional[int]) -> None:
    p.add_argument("--eval-text", default="austen-lady-susan", help="evaluation text asset or .txt (default: %(default)s)")
    p.add_argument("--calib-text", default=None, help="calibration text asset or .txt (default: the recipe's, shakespeare)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per evaluation chunk (default: %(default)s; 2048 available)")
    p.add_argument("--eval-chunks", type=int, default=chunks,
                   help="evaluate the first N chunks of the text (default: %(default)s; --full for all)")
    p.add_argument("--full", action="store_true", help="evaluate the whole text")
    p.add_argument("--bos", choices=("none", "prepend"), default="none",
                   help="BOS policy: none (nothing prepended) or prepend the tokenizer's BOS (default: %(default)s)")


def _log(args: argparse.Namespace):
    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, flush=True)
    return log


def _base_recipe(args: argparse.Namespace):
    from .config import Recipe
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe) if getattr(args, "recipe", None) else Recipe()
    if getattr(args, "calib_text", None):
        recipe.calibration.dataset = args.calib_text
    return recipe


def _check_texts(args: argparse.Namespace, recipe=None, eval_text: Optional[str] = None,
                 eval_tokens: Optional[int] = None) -> None:
    """Check the local text files a command will read, before the model load (20 s for SmolLM2):
    the calibration text of ``recipe`` and ``eval_text``; assets are not checked (they are pinned)."""
    from .data import check_text

    if recipe is not None:
        cal = recipe.calibration
        role = "--calib-text" if getattr(args, "calib_text", None) else "calibration.dataset of the recipe"
        check_text(cal.dataset, cal.seq_len, role=role,
                   need=f"one calibration window (calibration.seq_len = {cal.seq_len}; lower it in a --recipe "
                        "for a short text)")
    if eval_text is not None:
        role = "--text" if args.command == "analyze" else "--eval-text"
        check_text(eval_text, eval_tokens, role=role, need=f"one {eval_tokens}-token chunk (--seq-len)")


def _load(args: argparse.Namespace, log, **kwargs):
    from .models import load_causal_lm, set_threads

    threads = set_threads(args.threads)
    _, dtype = _target(args)  # a device that is not there fails before the model is loaded
    log(f"loading {args.model_file or args.model} ({threads} threads) ...")
    # read in --dtype directly (a bf16 model is never held in float32 first), then moved to --device
    model, tok, name = load_causal_lm(args.model, args.model_file, quiet=args.quiet, dtype=dtype, **kwargs)
    log(f"loaded {type(model).__name__} in {model.vtquant_load_seconds:.1f} s")
    _place(model, args, log)
    model.vtquant_fp_reference = fp_reference(args.model, args.model_file, name, str(dtype).replace("torch.", ""))
    return model, tok, name


def fp_reference(spec: str, model_file: Optional[str], name: str, dtype: str = "float32") -> str:
    """What the full-precision reference of the result rows is (``fp_reference`` of every row).

    SmolLM2's asset is a GGUF file: its Q4_1 weights dequantized to float32 by transformers, not the
    original bf16 release; a local transformers folder is loaded in float32 as stored.
    """
    import re

    path = model_file or (spec if not spec.startswith("asset:") else None)
    if path is None:
        from .assets import asset_path

        path = str(asset_path(spec.split(":", 1)[1]))
    file = Path(path).name
    if file.endswith(".gguf"):
        kind = re.search(r"[.-](I?Q\d[_A-Z0-9]*|F16|BF16|F32)\.gguf$", file, flags=re.IGNORECASE)
        qtype = kind.group(1).upper() if kind else "of unknown type"
        return (f"{name}: GGUF {qtype} weights ({file}) dequantized to {dtype} by transformers"
                + ("" if qtype in ("F32",) else ", not the original full-precision release"))
    return f"{name}: {path} loaded in {dtype}"


EVAL_METHODS = "fp,naive-static,dynamic-token,insertquant,insertquant+rotate"
VLM_METHODS = EVAL_METHODS
COMPARE_METHODS = "fp,naive-static,dynamic-token,smoothquant,prefix,rotate,insertquant,insertquant+rotate"
COMPARE_SETTINGS = "W8A8,W4A8KV8,W4A4KV4"


def parse_settings(text: str) -> list[tuple[int, int, Optional[int]]]:
    """``"W8A8,W4A8KV4"`` -> ``[(8, 8, None), (4, 8, 4)]`` (KV: key / value cache bits, default fp)."""
    import re

    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        m = re.fullmatch(r"[wW](\d+)[aA](\d+)(?:[kK][vV](\d+))?", part)
        if not m:
            raise ValueError(f"--settings: {part!r} is not of the form W8A8 or W4A8KV8")
        out.append((int(m.group(1)), int(m.group(2)), int(m.group(3)) if m.group(3) else None))
    if not out:
        raise ValueError("--settings: give at least one setting, e.g. W8A8")
    return out


def llmcompressor_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llmcompressor") is not None


def compare_settings(methods: Optional[str], settings: str) -> list[tuple[str, int, int, Optional[int]]]:
    """Methods x bit settings (``fp`` once, first).

    ``methods=None`` is the default list, plus the llm-compressor rows when it is installed.  The
    llm-compressor rows are its own W8A8 recipes: they run once, at the first W8A8 setting.
    """
    from .config import METHOD_NAMES, ConfigError
    from .peers.llmcompressor import METHODS as LLMC

    if methods is None:
        methods = COMPARE_METHODS + ("," + ",".join(LLMC) if llmcompressor_available() else "")
    names = [m.strip() for m in methods.split(",") if m.strip()]
    bad = [m for m in names if m not in METHOD_NAMES + LLMC]
    if bad:
        raise ConfigError(f"--methods: unknown {bad}; choose from {list(METHOD_NAMES + LLMC)}")
    try:
        bits = parse_settings(settings)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if any(m in LLMC for m in names):
        if not llmcompressor_available():
            raise ConfigError(f"--methods {[m for m in names if m in LLMC]} need llm-compressor: "
                              "./tools/setup.sh --llmcompressor (or pip install \"vtquant[llmcompressor]\")")
        if not any(w == 8 and a == 8 and kv is None for w, a, kv in bits):
            raise ConfigError(f"the llm-compressor rows are W8A8 recipes; add W8A8 to --settings "
                              f"(got {settings!r}) or leave them out of --methods")
    out = [("fp", 8, 8, None)] if "fp" in names else []
    for w, a, kv in bits:
        out += [(m, w, a, kv) for m in names if m != "fp" and m not in LLMC]
        if (w, a, kv) == (8, 8, None):
            out += [(m, 8, 8, None) for m in names if m in LLMC and (m, 8, 8, None) not in out]
    return out


def _compare(args: argparse.Namespace, settings, title: str, compare: bool = False, base=None) -> int:
    from .eval.results import format_compare_table, format_table, plot_compare, write_results
    from .llm import prepare_text, run_methods

    log = _log(args)
    start = time.time()
    base = base if base is not None else _base_recipe(args)
    _check_texts(args, base, args.eval_text, args.seq_len)
    model, tok, name = _load(args, log)
    w = base.weights
    if compare and w is not None:
        log(f"weights: {w.algorithm}{' (GPTQ below 8 bits, RTN at 8)' if w.algorithm == 'auto' else ''} "
            f"{w.granularity}{f' (group {w.group_size})' if w.granularity == 'per-group' else ''}"
            f", clip search {'on' if w.clip_search else 'off'}; activation clip search "
            f"{'on' if base.activations is not None and base.activations.clip_search else 'off'}")
    setup = prepare_text(tok, base, args.eval_text, args.seq_len, None if args.full else args.eval_chunks,
                         bos=args.bos, quiet=args.quiet)
    log(f"calibration: {setup.calib_desc}")
    log(f"evaluation: {setup.protocol}")
    rows, results = run_methods(model, setup, base, settings, name, quiet=args.quiet, log=log)
    for row in rows:
        row.extra.setdefault("fp_reference", getattr(model, "vtquant_fp_reference", None))
    fp = next((r.value for r in rows if r.method == "fp"), None)
    print(f"\n{title}: {name}; {setup.protocol}; calibration: {setup.calib_desc}")
    print(format_compare_table(rows, reference=fp) if compare else format_table(rows, reference=fp))
    total = time.time() - start
    print(f"total {total:.0f} s")
    if compare:
        print("peak RSS: whole-process VmHWM while the method ran (reset through /proc/self/clear_refs), "
              "including the full-precision reference model")
    if compare and getattr(args, "plot", None):
        plot_compare(rows, args.plot, title=f"{name}: {setup.protocol.split(' (')[0]}")
        log(f"wrote {args.plot}")
    if args.results_file:
        write_results(args.results_file, rows, protocol=setup.protocol, calibration=setup.calib_desc,
                      total_seconds=round(total, 1),
                      reports={r.recipe.name: r.report.to_dict() for r in results if r.report is not None})
        log(f"wrote {args.results_file}")
    return 0


def _breakdown(args: argparse.Namespace) -> int:
    """``compare --breakdown METHOD@SETTING``: per-layer error of weights / activations / cache alone and together."""
    from .config import ConfigError, method_recipe
    from .eval.layer_errors import format_breakdown, layer_error_breakdown, parts_summary
    from .llm import prepare_text

    method, _, setting = args.breakdown.partition("@")
    try:
        (w, a, kv), = parse_settings(setting or "W8A8")
    except ValueError as err:
        raise ConfigError(f"--breakdown {args.breakdown!r}: {err}; use METHOD@W4A8KV8") from None
    log = _log(args)
    start = time.time()
    base = compare_base_recipe(args)
    recipe = method_recipe(method, base, w_bits=w, a_bits=a, kv_bits=kv)
    _check_texts(args, base, args.eval_text, args.seq_len)
    model, tok, name = _load(args, log)
    setup = prepare_text(tok, base, args.eval_text, args.seq_len, None if args.full else args.eval_chunks,
                         bos=args.bos, quiet=args.quiet)
    result = layer_error_breakdown(model, recipe, setup.calib_batches, setup.eval_chunks, quiet=args.quiet, log=log)
    print(f"\nvtquant compare --breakdown {args.breakdown}: {name}; {setup.protocol}; relative residual-stream "
          "error after each layer over the non-first tokens")
    print(format_breakdown(result))
    for line in parts_summary(result):
        print(line)
    print(f"total {time.time() - start:.0f} s")
    if args.results_file:
        from .fileio import atomic_write_text

        atomic_write_text(Path(args.results_file), json.dumps({"breakdown": args.breakdown, "recipe": recipe.to_dict(),
                                                               **result}, indent=1, default=str))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """SmolLM2-135M, W8A8 (+ W4A8, W8A6): fp, naive-static, dynamic-token, insertquant, insertquant+rotate."""
    if getattr(args, "vision", False):
        return _vision_demo(args)
    return _compare(args, DEMO_SETTINGS, "vtquant demo")


def _vision_demo(args: argparse.Namespace) -> int:
    """``vtquant demo --vision``: the DINOv2-S control (no massive activations: detect none, do no harm)."""
    from .eval.fidelity import dinov2_control
    from .eval.results import write_results
    from .models import set_threads
    from .vision import control_recipe, vision_control_rows

    set_threads(args.threads)
    start = time.time()
    log = _log(args)
    recipe = control_recipe()
    res = dinov2_control(recipe, quiet=args.quiet, log=log)
    total = round(time.time() - start, 1)
    print(f"\nvtquant demo --vision: DINOv2 ViT-S/14 (asset dinov2-s-imgfocus), W8A8 insertquant vs FP on "
          f"{res['num_photos']} bundled photos at {res['img_size']} px ({res['calibration_photos']} for calibration)")
    print("| model | sinks detected | max probe ratio | CLS cos mean (min) | patch cos mean (min) | saliency r mean (min) |")
    print("|---|---|---|---|---|---|")
    for name, row in res["models"].items():
        a = row["all"]
        sal = (f"{row['saliency_pearson_mean']:.4f} ({row['saliency_pearson_min']:.4f})"
               if "saliency_pearson_mean" in row else "- (install onnxruntime)")
        print(f"| {name} | {'yes' if row['sinks_detected'] else 'none'} | {max(row['probe_max_ratio']):.1f} | "
              f"{a['cls_cos_mean']:.4f} ({a['cls_cos_min']:.4f}) | {a['patch_cos_mean']:.4f} ({a['patch_cos_min']:.4f}) "
              f"| {sal} |")
    print(f"total {total:.0f} s")
    if args.results_file:
        write_results(args.results_file, vision_control_rows(res, recipe),
                      protocol=f"DINOv2-S control: cosine of W8A8 vs FP features on {res['num_photos']} bundled photos "
                               f"at {res['img_size']} px", calibration=f"the first {res['calibration_photos']} photos",
                      photos=res["photos"], total_seconds=total,
                      notes={name: row.get("notes") for name, row in res["models"].items()})
        log(f"wrote {args.results_file}")
    return 0


def compare_base_recipe(args: argparse.Namespace):
    """The base recipe of ``vtquant compare``: the --recipe (or the defaults) with the weight and
    clipping options applied; without a --recipe, weights are ``auto`` (GPTQ below 8 bits, RTN at
    8 bits) with per-group scales of 32 columns and the clipping searches are on."""
    import dataclasses

    from .config import ActArgs, WeightArgs

    base = _base_recipe(args)
    given = getattr(args, "recipe", None) is not None
    weights = base.weights or WeightArgs()
    acts = base.activations or ActArgs()
    algorithm = args.weights or (weights.algorithm if given else "auto")
    clip = (args.clip_search == "on") if args.clip_search else (weights.clip_search if given else True)
    act_clip = (args.clip_search == "on") if args.clip_search else (acts.clip_search if given else True)
    changes = {"algorithm": algorithm, "clip_search": clip}
    group = args.group_size if args.group_size is not None else (None if given else 32)
    if group == 0:
        changes.update(granularity="per-channel")
    elif group is not None:
        changes.update(granularity="per-group", group_size=group)
    base.weights = dataclasses.replace(weights, **changes)
    base.activations = dataclasses.replace(acts, clip_search=act_clip and acts.static)
    return base


def is_vision_compare(args: argparse.Namespace) -> bool:
    """``compare --vision`` or ``compare --model asset:clip-vit-b16-openai``."""
    from .eval.vision_compare import CLIP_ASSET

    return bool(getattr(args, "vision", False)) or args.model == CLIP_ASSET


def cmd_compare(args: argparse.Namespace) -> int:
    """Methods x bit settings side by side: one table, JSON rows, a PNG bar chart."""
    if is_vision_compare(args):
        _cpu_only(args, "vtquant compare --vision")
        return _vision_compare(args)
    if args.breakdown:
        return _breakdown(args)
    return _compare(args, compare_settings(args.methods, args.settings or COMPARE_SETTINGS), "vtquant compare",
                    compare=True, base=compare_base_recipe(args))


def vision_compare_base(args: argparse.Namespace):
    """The base recipe of ``compare --vision``: --recipe, else the library's shipped CLIP recipe; weights
    ``auto`` (GPTQ + weight clip search below 8 bits, RTN at 8) unless --weights; per-channel unless
    --group-size; the activation clip search only with ``--clip-search on``."""
    import dataclasses

    from .config import ActArgs, WeightArgs
    from .eval.vision_compare import clip_recipe
    from .recipe import load_recipe

    base = load_recipe(args.recipe) if args.recipe else clip_recipe(args.library)
    weights = base.weights or WeightArgs()
    acts = base.activations or ActArgs()
    changes: dict = {"algorithm": args.weights or "auto",
                     "clip_search": args.clip_search != "off" if args.clip_search else True}
    if args.group_size == 0:
        changes.update(granularity="per-channel")
    elif args.group_size is not None:
        changes.update(granularity="per-group", group_size=args.group_size)
    base.weights = dataclasses.replace(weights, **changes)
    base.activations = dataclasses.replace(acts, clip_search=args.clip_search == "on" and acts.static)
    return base


def _vision_compare(args: argparse.Namespace) -> int:
    """``vtquant compare --vision``: the CLIP ViT-B/16 asset, methods x settings, embedding fidelity on photos."""
    from .config import ConfigError, method_recipe
    from .eval.results import write_results
    from .eval.vision_compare import (CLIP_ASSET, clip_photo_setup, format_vision_breakdown, format_vision_table,
                                      plot_vision_compare, run_vision_compare, target_lines, vision_breakdown,
                                      vision_methods, vision_settings)
    from .models import DEFAULT_MODEL, set_threads

    if args.model not in (DEFAULT_MODEL, CLIP_ASSET):
        raise ConfigError(f"--model {args.model!r}: compare --vision runs the real CLIP ViT-B/16 ({CLIP_ASSET}); "
                          "other image models: vtquant eval imagenet / retrieval")
    log = _log(args)
    threads = set_threads(args.threads)
    start = time.time()
    base = vision_compare_base(args)
    if args.breakdown:
        method, _, setting = args.breakdown.partition("@")
        (w, a), = vision_settings(setting or "W8A8")
        recipes = [method_recipe(method, base, w_bits=w, a_bits=a)]
    else:
        methods, settings = vision_methods(args.methods), vision_settings(args.settings)
    setup = clip_photo_setup(args.library, num_images=args.num_images, quiet=args.quiet)
    name = setup["name"]
    protocol = (f"image-embedding cosine to FP on {len(setup['eval_names'])} held-out bundled photos, "
                f"OpenAI CLIP preprocessing at 224 px")
    calibration = f"{len(setup['calib_names'])} other bundled photos (every third)"
    w = base.weights
    log(f"{name}; {threads} threads; weights {w.algorithm} {w.granularity}, weight clip search "
        f"{'on' if w.clip_search else 'off'} (with GPTQ), activation clip search "
        f"{'on' if base.activations.clip_search else 'off'}; calibration: {calibration}")
    if args.breakdown:
        result = vision_breakdown(setup["model"], setup["embed"], recipes[0], setup["calib_pixels"],
                                  setup["eval_pixels"], quiet=args.quiet, log=log)
        print(f"\nvtquant compare --vision --breakdown {args.breakdown}: {name}; {protocol}; relative residual-stream "
              "error after each block, CLS / patches")
        print(format_vision_breakdown(result))
        print(f"total {time.time() - start:.0f} s")
        if args.results_file:
            from .fileio import atomic_write_text

            atomic_write_text(Path(args.results_file), json.dumps(
                {"breakdown": args.breakdown, "model": name, "protocol": protocol, "calibration": calibration,
                 "calibration_images": setup["calib_names"], "evaluation_images": setup["eval_names"],
                 "recipe": recipes[0].to_dict(), **result}, indent=1, default=str))
        return 0
    meta = dict(protocol=protocol, calibration=calibration, calibration_images=setup["calib_names"],
                evaluation_images=setup["eval_names"], base_recipe=base.to_dict(), threads=threads)

    def partial(rows, reports) -> None:  # a long CPU run keeps what it measured if it is stopped
        if args.results_file:
            write_results(args.results_file, rows, partial=True, **meta, reports=reports)

    rows, reports = run_vision_compare(setup["model"], setup["embed"], setup["calib_pixels"], setup["eval_pixels"],
                                       base, methods, settings, model_name=name, quiet=args.quiet, log=log,
                                       on_row=partial)
    total = time.time() - start
    print(f"\nvtquant compare --vision: {name}; {protocol}; calibration: {calibration}")
    print(format_vision_table(rows))
    for line in target_lines(rows):
        print(line)
    print(f"total {total:.0f} s ({threads} threads)")
    if args.plot:
        plot_vision_compare(rows, args.plot, title=f"{name}: {protocol}")
        log(f"wrote {args.plot}")
    if args.results_file:
        write_results(args.results_file, rows, partial=False, **meta, total_seconds=round(total, 1), reports=reports)
        log(f"wrote {args.results_file}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.task == "linear-probe":
        _cpu_only(args, "vtquant eval linear-probe", device_ok=True)
        return _eval_linear_probe(args)
    if args.task in ("imagenet", "retrieval"):
        _cpu_only(args, f"vtquant eval {args.task}")
        return _vision_eval(args)
    if args.task == "vlm":
        return _eval_vlm(args)
    if args.methods is None:
        args.methods = EVAL_METHODS
    if args.task == "lm-eval":
        return _eval_lm_eval(args)
    if args.checkpoint:
        return _eval_checkpoint(args)
    methods = [m.strip() for m in (args.methods or EVAL_METHODS).split(",") if m.strip()]
    settings = [(m, args.w_bits, args.a_bits) for m in methods]
    base = None
    if args.recipe:  # the whole recipe, as written (weights, activations, KV cache, rotation, sinks)
        base = _base_recipe(args)
        settings = [("fp", 8, 8), base]
    return _compare(args, settings, "vtquant eval perplexity", base=base)


def _eval_vlm(args: argparse.Namespace) -> int:
    """``vtquant eval vlm``: FP vs quantized fidelity of a vision-language model on image + text prompts."""
    _cpu_only(args, "vtquant eval vlm")
    from .config import ConfigError
    from .eval.results import write_results
    from .eval.vlm import evaluate_vlm, format_vlm_table, prepare_vlm_data, vlm_method_recipe
    from .models import set_threads
    from .recipe import load_recipe
    from .vlm_parts import FP_REFERENCE, MODEL_SPEC, is_vlm_spec, load_vlm

    log = _log(args)
    model_spec = MODEL_SPEC if args.model == "asset:smollm2-135m" else args.model
    if not is_vlm_spec(model_spec):
        raise ConfigError(f"--model {args.model!r}: vtquant eval vlm needs {MODEL_SPEC} (the untrained real-parts "
                          "composite) or vlm:PATH (a local transformers LLaVA / SmolVLM / Qwen2-VL folder)")
    if args.new_tokens < 0:
        raise ConfigError(f"--new-tokens {args.new_tokens}: give 0 (no generation) or more")
    base = load_recipe(args.recipe) if args.recipe else None  # a bad recipe fails before the model load
    if base is not None and args.methods is None:
        settings = [None, (f"recipe {base.name}", base)]  # the recipe as written
    else:
        from .config import Recipe

        methods = [m.strip() for m in (args.methods or VLM_METHODS).split(",") if m.strip()]
        if "recipe" in methods and base is None:
            raise ConfigError("--methods recipe: the recipe as written needs --recipe R")
        settings = [(f"recipe {base.name}", base) if m == "recipe" else
                    vlm_method_recipe(m, base or Recipe(), w_bits=args.w_bits, a_bits=args.a_bits) for m in methods]
    threads = set_threads(args.threads)
    start = time.time()
    log(f"loading {model_spec} ({threads} threads) ...")
    parts = load_vlm(model_spec, quiet=args.quiet)
    log(f"loaded {type(parts.model).__name__} in {parts.model.vtquant_load_seconds:.1f} s")
    data = prepare_vlm_data(parts.processor, calib_images=args.calib_images or None,
                            eval_images=args.eval_images or None, quiet=args.quiet)
    reference = FP_REFERENCE if model_spec == MODEL_SPEC else f"{parts.name}: {model_spec} loaded in float32"
    result = evaluate_vlm(parts.model, parts.processor, settings, parts.name, data=data, new_tokens=args.new_tokens,
                          quiet=args.quiet, log=log, fp_reference=reference)
    print(f"\nvtquant eval vlm: {parts.name}; {result.protocol}; calibration: {result.calibration}; "
          f"FP reference: {reference}")
    print(format_vlm_table(result.details))
    total = time.time() - start
    print(f"total {total:.0f} s")
    if args.results_file:
        write_results(args.results_file, result.rows, protocol=result.protocol, calibration=result.calibration,
                      fp_reference=reference, model_info=parts.info, details=result.details,
                      reports=result.reports, total_seconds=round(total, 1))
        log(f"wrote {args.results_file}")
    return 0


def _vision_eval(args: argparse.Namespace) -> int:
    """``vtquant eval imagenet|retrieval``: the FP model and the recipe's quantized copy, one table."""
    from .config import ConfigError
    from .eval.results import format_table, write_results
    from .models import set_threads
    from .recipe import load_recipe
    from .vision import default_vision_recipe, evaluate_imagenet, evaluate_retrieval, load_vision_model

    log = _log(args)
    if not args.data:
        raise FileNotFoundError(f"vtquant eval {args.task} needs --data DIR (see docs/vision.md for the layouts)")
    if ":" not in args.model or args.model.startswith("asset:"):
        raise ConfigError(f"--model {args.model!r}: vision evaluation needs timm:NAME, open_clip:NAME/PRETRAINED "
                          "or hf:PATH")
    threads = set_threads(args.threads)
    recipe = load_recipe(args.recipe) if args.recipe else default_vision_recipe()
    start = time.time()
    data = args.data
    if args.task == "retrieval":  # a malformed split file fails here, before the model load
        from .eval.retrieval import load_flickr30k

        data = load_flickr30k(args.data, split=args.split)
    vmodel = load_vision_model(args.model, pretrained=not args.no_pretrained)
    log(f"loaded {vmodel.name} ({threads} threads)")
    if args.task == "imagenet":
        result = evaluate_imagenet(vmodel, recipe, data, calib_data=args.calib_data, limit=args.limit,
                                   batch_size=args.batch_size, quiet=args.quiet, log=log)
    else:
        result = evaluate_retrieval(vmodel, recipe, data, batch_size=args.batch_size, quiet=args.quiet, log=log)
    print(f"\nvtquant eval {args.task}: {vmodel.name}; {result.protocol}; calibration: {result.calibration}")
    print(format_table(result.rows))
    total = time.time() - start
    print(f"total {total:.0f} s")
    if args.results_file:
        write_results(args.results_file, result.rows, protocol=result.protocol, calibration=result.calibration,
                      total_seconds=round(total, 1), reports=result.reports)
        log(f"wrote {args.results_file}")
    return 0


def _eval_linear_probe(args: argparse.Namespace) -> int:
    """``vtquant eval linear-probe``: Fashion-MNIST linear-probe and k-NN top-1, FP (and --recipe quantized)."""
    from .eval.linear_probe import CLIP_ASSET_SPEC, run_fashion_mnist_probe
    from .eval.results import format_table, write_results
    from .models import DEFAULT_MODEL, set_threads

    log = _log(args)
    threads = set_threads(args.threads)
    model = CLIP_ASSET_SPEC if args.model == DEFAULT_MODEL else args.model
    start = time.time()
    rows, meta = run_fashion_mnist_probe(
        model, library=args.library, pretrained=not args.no_pretrained, data_dir=args.data,
        train_size=args.train_size or None, test_size=args.test_size or None, k=args.knn_k, recipe=args.recipe,
        methods=[m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None,
        w_bits=args.w_bits, a_bits=args.a_bits, batch_size=args.batch_size, device=args.device,
        tf32=args.tf32 == "on", quiet=args.quiet, log=log)
    print(f"\nvtquant eval linear-probe: {meta['model']}; Fashion-MNIST {meta['train_images']} train / "
          f"{meta['test_images']} test images; {threads} threads, {args.device} ({meta['dtype']}"
          + (f", TF32 {'on' if meta['tf32'] else 'off'}" if "tf32" in meta else "") + ")"
          + (f"; calibration: {meta['calibration']}" if "calibration" in meta else ""))
    print(format_table(rows))
    print(f"total {time.time() - start:.0f} s")
    if args.results_file:
        write_results(args.results_file, rows, **meta)
        log(f"wrote {args.results_file}")
    return 0


def _eval_checkpoint(args: argparse.Namespace) -> int:
    from . import api
    from .data import text_token_ids
    from .eval.perplexity import make_chunks, perplexity, protocol
    from .eval.results import format_table, row_for, write_results

    log = _log(args)
    _check_texts(args, None, args.eval_text, args.seq_len)
    model, tok, name = _checkpoint_and_tokenizer(args, log)
    ids = text_token_ids(tok, args.eval_text, args.seq_len, role="--eval-text",
                         need=f"one {args.seq_len}-token chunk (--seq-len)", quiet=args.quiet)
    chunks = make_chunks(ids, args.seq_len, None if args.full else args.eval_chunks, args.bos, tok.bos_token_id)
    t0 = time.time()
    ppl = perplexity(model, chunks, quiet=args.quiet)
    rows = [row_for(getattr(model.vtquant, "recipe", None), name, "perplexity", ppl, time.time() - t0,
                    checkpoint=str(args.checkpoint), fp_reference=getattr(model.vtquant, "fp_reference", None))]
    print(f"{protocol(args.seq_len, chunks.shape[0], args.bos)}; checkpoint {args.checkpoint}")
    print(format_table(rows))
    if args.results_file:
        write_results(args.results_file, rows)
    return 0


def _checkpoint_and_tokenizer(args: argparse.Namespace, log):
    """The checkpoint of ``--checkpoint`` and its tokenizer: the one saved in it, else the ``--model``'s
    (which then has to be loaded, only for its tokenizer)."""
    from . import api
    from .checkpoint import load_tokenizer

    _target(args)  # a device that is not there fails before the checkpoint is loaded
    model = _place(api.load(args.checkpoint), args, log)
    tok = load_tokenizer(args.checkpoint)
    name = Path(args.checkpoint).name
    if tok is None:
        log(f"{args.checkpoint} holds no tokenizer: loading --model {args.model_file or args.model} for its tokenizer")
        _, tok, name = _load(args, log)
    return model, tok, name


def _eval_lm_eval(args: argparse.Namespace) -> int:
    """``vtquant eval lm-eval``: lm-evaluation-harness tasks (default: the local Austen tasks) on a
    checkpoint, or on full precision and the --methods / --recipe quantized in memory."""
    import copy

    from . import api
    from .config import method_recipe
    from .eval.lm_eval_bridge import VtquantLM, result_rows, run_lm_eval
    from .eval.results import format_table, write_results
    from .llm import prepare_text

    log = _log(args)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    start = time.time()
    if args.checkpoint:
        model, tok, name = _checkpoint_and_tokenizer(args, log)
        entries = [(getattr(model.vtquant, "recipe", None), lambda: model)]
        reference = getattr(model.vtquant, "fp_reference", None)
    else:
        fp_model, tok, name = _load(args, log)
        reference = fp_model.vtquant_fp_reference
        base = _base_recipe(args)
        if args.recipe:
            recipes = [None, base]
        else:
            recipes = [None if m == "fp" else method_recipe(m, base, w_bits=args.w_bits, a_bits=args.a_bits)
                       for m in (m.strip() for m in (args.methods or EVAL_METHODS).split(",")) if m]
        setup = prepare_text(tok, base, args.eval_text, args.seq_len, 1, quiet=args.quiet) \
            if any(r is not None for r in recipes) else None

        def quantized(recipe):
            def build():
                if recipe is None:
                    return fp_model
                model = copy.deepcopy(fp_model)
                report = api.quantize_(model, recipe, setup.calib_batches, quiet=args.quiet)
                log(f"quantized {recipe.display_method} in {report.seconds:.1f} s")
                return model
            return build

        entries = [(r, quantized(r)) for r in recipes]
    rows = []
    for recipe, build in entries:
        model = build()
        label = "fp" if recipe is None else recipe.display_method
        lm = VtquantLM(model=model, tokenizer=tok, batch_size=args.lm_batch_size, max_length=args.seq_len,
                       quiet=args.quiet)
        t0 = time.time()
        results = run_lm_eval(lm, tasks, include_path=args.include_path, limit=args.limit, quiet=args.quiet)
        rows += result_rows(results, recipe, name, time.time() - t0, fp_reference=reference,
                            **({"checkpoint": str(args.checkpoint)} if args.checkpoint else {}))
        log(f"{label}: lm-eval {','.join(tasks)} in {time.time() - t0:.1f} s")
    print(f"\nvtquant eval lm-eval: {name}; tasks {', '.join(tasks)}; right-padded batches of {args.lm_batch_size}, "
          f"max length {args.seq_len}; FP reference: {reference}")
    print(format_table(rows))
    print(f"total {time.time() - start:.0f} s")
    if args.results_file:
        write_results(args.results_file, rows, tasks=tasks, fp_reference=reference)
        log(f"wrote {args.results_file}")
    return 0


def _quantize_vision(args: argparse.Namespace, recipe, log):
    """`vtquant quantize` on a vision model: the real CLIP ViT-B/16 image tower (``--model
    asset:clip-vit-b16-openai --library ...``) or ``timm:`` / ``open_clip:`` / ``hf:`` (every tower; an
    image-text model's text tower is calibrated on one caption per calibration image)."""
    import torch

    from .analyze import load_images
    from .models import set_threads
    from .vision import _calib_indices, load_vision_model, quantize_towers_

    threads = set_threads(args.threads)
    log(f"loading {args.model} ({threads} threads) ...")
    tokenizer = None
    if args.model == VISION_CLIP_ASSET:
        from .convert.clip_onnx import clip_preprocess, load_clip_vit_b16

        model, preprocess = load_clip_vit_b16(args.library, quiet=args.quiet), clip_preprocess()
        fp_reference = f"clip-vit-b16-openai ({args.library}): the asset's int8 ONNX weights dequantized to float32"
    else:
        vm = load_vision_model(args.model, pretrained=not args.no_pretrained)
        model, preprocess, tokenizer = vm.model, vm.preprocess, vm.tokenizer
        fp_reference = f"{vm.name}: " + ("random weights (--no-pretrained)" if args.no_pretrained else
                                         "the library's pretrained weights in float32")
    _place(model, args, log)  # --device / --dtype: calibration runs where the model sits (pixels follow it)
    from .adapters import ModelAdapter
    from .vision import model_towers

    if len(model_towers(model)) > 1 and not hasattr(ModelAdapter.adapter_class(model), "model_config_dict"):
        from .config import ConfigError

        raise ConfigError(f"{args.model}: a {type(model).__name__} cannot be saved as one checkpoint yet (open_clip "
                          "CLIPs can); quantize its towers in Python (vtquant.vision.quantize_clip_) instead")
    photos = load_images(args.calib_data)
    cal = recipe.calibration
    idx = _calib_indices(len(photos), cal.num_samples, cal.seed)
    pixels = torch.stack([preprocess(photos[i][1]) for i in idx])
    images = list(torch.split(pixels, cal.batch_size))
    texts = None
    if tokenizer is not None:
        captions = [f"a photo of {photos[i][0].split(':')[-1].rsplit('.', 1)[0].replace('_', ' ')}." for i in idx]
        texts = [tokenizer(captions[s:s + cal.batch_size]) for s in range(0, len(captions), cal.batch_size)]
    log(f"calibrating on {len(idx)} images" + (" and one caption each" if texts is not None else ""))
    reports = quantize_towers_(model, recipe, images=images, texts=texts, quiet=args.quiet)
    for name, report in reports.items():
        print(f"[{name}] {report.summary()}")
    handles = [getattr(model, "vtquant", None)] if getattr(model, "vtquant", None) is not None else [
        m.vtquant for _, m in model.named_modules() if getattr(m, "vtquant", None) is not None]
    for handle in handles:
        handle.fp_reference = fp_reference
    return model, {name: r.to_dict() for name, r in reports.items()}


def cmd_quantize(args: argparse.Namespace) -> int:
    from . import api
    from .analyze import is_vision_spec
    from .data import sample_windows, text_token_ids
    from .vlm_parts import is_vlm_spec
    import torch

    log = _log(args)
    if is_vlm_spec(args.model):
        _cpu_only(args, "vtquant quantize on a vision-language model")
        return _quantize_vlm(args, log)
    if not args.out:
        from .config import ConfigError

        raise ConfigError("vtquant quantize needs --out DIR (where the checkpoint goes)")
    recipe = _base_recipe(args)
    if args.model == VISION_CLIP_ASSET or is_vision_spec(args.model):
        _target(args)  # a device that is not there fails before the model is loaded
        if args.format not in ("auto", "vtquant", "hf"):
            from .config import ConfigError

            raise ConfigError(f"--format {args.format} is for transformers decoders; vision models are saved with "
                              "--format auto (hf for transformers towers, vtquant for timm / open_clip)")
        model, reports = _quantize_vision(args, recipe, log)
        api.save(model, args.out, format=args.format)
        print(f"saved {args.out}")
        if args.results_file:
            from .eval.results import write_results

            write_results(args.results_file, [], report=reports)
        return 0
    if args.format == "compressed-tensors":
        from .export_ct import CompressedTensorsExportError, recipe_refusal

        problem = recipe_refusal(recipe)
        if problem is not None:
            raise CompressedTensorsExportError(f"--format compressed-tensors: {problem} (nothing was quantized)")
    if args.format == "compressed-tensors" and (recipe.activations is not None or recipe.kv_cache is not None):
        # quantize with the format's own activation grid and arithmetic, so the exported folder computes
        # exactly what vtquant's model computes (vtquant.export_ct)
        recipe = recipe.with_numerics("compressed-tensors")
        log("activations use compressed-tensors numerics (the format's int grid), so the export is exact")
    _check_texts(args, recipe)
    model, tok, name = _load(args, log)
    cal = recipe.calibration
    ids = text_token_ids(tok, cal.dataset, cal.seq_len, role="calibration text",
                         need=f"one calibration window (calibration.seq_len = {cal.seq_len})", quiet=args.quiet)
    batches = list(torch.split(sample_windows(ids, cal.seq_len, cal.num_samples, cal.seed), cal.batch_size))
    report = api.quantize_(model, recipe, batches, quiet=args.quiet)
    print(report.summary())
    model.vtquant.fp_reference = model.vtquant_fp_reference
    export = None
    if args.format == "compressed-tensors":
        from .export_ct import export_compressed_tensors

        export = export_compressed_tensors(model, args.out, tokenizer=tok, quiet=args.quiet)
        print(f"wrote a compressed-tensors folder ({export.quantization_format}) to {args.out}")
        for note in export.notes:
            print(f"note: {note}")
    else:
        api.save(model, args.out, format=args.format, tokenizer=tok)
        print(f"saved {args.out}")
    if args.results_file:
        from .eval.results import write_results

        write_results(args.results_file, [], report=report.to_dict(),
                      **({"export": export.to_dict()} if export is not None else {}))
    return 0


def _quantize_vlm(args: argparse.Namespace, log) -> int:
    """``vtquant quantize --model asset:clip-smollm2-llava|vlm:PATH``: one recipe over the vision tower, the
    projector and the language model, calibrated on image + text pairs; prints the per-part report."""
    from .config import ConfigError
    from .eval.results import write_results
    from .eval.vlm import prepare_vlm_data
    from .models import set_threads
    from .recipe import load_recipe
    from .vlm import quantize_vlm_
    from .vlm_parts import load_vlm

    if args.out:
        raise ConfigError("--out: saving a quantized vision-language model is not supported yet (its part adapters "
                          "have no checkpoint format); drop --out to quantize and print the per-part report, or "
                          "measure it with vtquant eval vlm --recipe R")
    recipe = load_recipe(args.recipe)
    threads = set_threads(args.threads)
    log(f"loading {args.model} ({threads} threads) ...")
    parts = load_vlm(args.model, quiet=args.quiet)
    data = prepare_vlm_data(parts.processor, calib_images=args.calib_images or None, eval_images=1,
                            quiet=args.quiet)
    report = quantize_vlm_(parts.model, recipe, [p.batch for p in data.calib], quiet=args.quiet)
    print(f"calibration: {data.calib_desc}")
    print(report.summary())
    if args.results_file:
        write_results(args.results_file, [], report=report.to_dict(), calibration=data.calib_desc,
                      model_info=parts.info)
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from .analyze import (BUNDLED_PHOTOS, analysis_rows, analyze_llm, analyze_vision, is_vision_spec,
                          load_image_tower, load_images)
    from .eval.results import write_results
    from .models import set_threads
    from .recipe import load_recipe
    from .report import summary_text

    log = _log(args)
    recipe = load_recipe(args.recipe) if args.recipe else None
    command = "vtquant " + " ".join(getattr(args, "argv", None) or sys.argv[1:])
    restoration = not args.no_restoration
    if is_vision_spec(args.model):  # timm:NAME, open_clip:NAME/PRETRAINED, hf:PATH or the DINOv2-S control
        _target(args)  # a device that is not there fails before the model is loaded
        photos = load_images(args.images)  # a bad image file fails here, before the model load
        set_threads(args.threads)
        model, preprocess, name = load_image_tower(args.model, pretrained=not args.no_pretrained, quiet=args.quiet)
        _place(model, args, log)
        if recipe is None and args.model == "asset:clip-vit-b16-openai":  # its shipped recipe (model-relative detection)
            from .eval.vision_compare import clip_recipe

            recipe = clip_recipe("hf")
        figures = analyze_vision(model, preprocess, name, photos, source=args.images or BUNDLED_PHOTOS,
                                 num_images=args.num_images, calib_images=args.calib_images, alpha=args.alpha,
                                 recipe=recipe, restoration=restoration, out=args.out, command=command,
                                 quiet=args.quiet, log=log)
    else:
        if restoration:
            from .config import Recipe, method_recipe

            checked = recipe if recipe is not None else method_recipe("insertquant+rotate", Recipe())
            if args.calib_text:
                checked.calibration.dataset = args.calib_text
            _check_texts(args, checked)
        _check_texts(args, None, args.text, args.seq_len)
        model, tok, name = _load(args, log, attn_implementation="eager")
        figures = analyze_llm(model, tok, name, text=args.text, seq_len=args.seq_len, chunks=args.chunks,
                              alpha=args.alpha, recipe=recipe, calib_text=args.calib_text,
                              calib_windows=args.calib_windows, restoration=restoration, out=args.out,
                              command=command, quiet=args.quiet, log=log)
    print(summary_text(figures))
    out = Path(args.out)
    print(f"\nwrote {out / 'report.html'}, {out / 'figures.json'}, {out / 'summary.txt'} and the PNGs beside them")
    if args.results_file:
        write_results(args.results_file, analysis_rows(figures), emergence_layer=figures["emergence_layer"],
                      cancellation_layer=figures["cancellation_layer"])
        log(f"wrote {args.results_file}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Real low-bit speed: CPU (SmolLM2, one subprocess per method) or GPU (layer shapes)."""
    from .eval.results import write_results

    log = _log(args)
    if args.device == "cuda":
        from .bench.gpu import SHAPES, check_quantizers, format_rows, gpu_rows, layer_bench
        from .config import ConfigError
        import torch

        if not torch.cuda.is_available():
            print("vtquant bench --device cuda: no CUDA GPU visible here", file=sys.stderr)
            return 2
        shapes = [n for n in args.shapes.split(",") if n]
        unknown = [n for n in shapes if n not in SHAPES]
        if unknown:
            raise ConfigError(f"--shapes: unknown {unknown}; choose from {sorted(SHAPES)}")
        check_quantizers()
        results = []
        for name in shapes:
            results += layer_bench(SHAPES[name], "cuda", args.backends.split(","), args.repeats)
        print(format_rows(results))
        rows = gpu_rows(results)
    else:
        from .bench.cpu import CpuBenchSettings, cpu_bench, cpu_rows, format_cpu_table

        settings = CpuBenchSettings(model=args.model, model_file=args.model_file, prompt_len=args.prompt_len,
                                    decode_tokens=args.decode_tokens, repeats=args.repeats,
                                    ppl_chunks=args.ppl_chunks, threads=args.threads, interleave=args.interleave)
        results = cpu_bench([m.strip() for m in args.methods.split(",") if m.strip()], settings, log=log)
        print("\n" + format_cpu_table(results, settings))
        rows = cpu_rows(results)
    if args.results_file:
        write_results(args.results_file, rows)
        log(f"wrote {args.results_file}")
    return 0


def cmd_assets(args: argparse.Namespace) -> int:
    from . import assets

    if args.add:
        path = assets.add_archive(args.add[0], args.add[1], quiet=args.quiet)
        print(f"added {args.add[0]} -> {path}")
    if args.fetch:
        for name in args.fetch:
            print(f"{name}: {assets.fetch(name, quiet=args.quiet)}")
    rows = assets.list_assets()
    print(f"cache: {assets.home()}")
    print("| asset | package | kind | cached | path | description |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['package']}=={r['version']} | {r['kind']} | {'yes' if r['cached'] else 'no'} | "
              f"{r['path'] if r['cached'] else '-'} | {r['description']} |")
    if args.results_file:
        from .fileio import atomic_write_text

        atomic_write_text(Path(args.results_file), json.dumps({"assets": rows}, indent=1, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vtquant", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="the main job: SmolLM2, all methods, one table (no arguments needed)")
    _model_args(p), _text_args(p, DEMO_EVAL_CHUNKS), _common(p)
    p.add_argument("--vision", action="store_true",
                   help="run the vision control instead: DINOv2-S (asset dinov2-s-imgfocus), FP vs W8A8 on bundled photos")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("compare", help="the peers side by side: methods x bit settings, one table + JSON + PNG")
    _model_args(p), _text_args(p, DEMO_EVAL_CHUNKS), _common(p)
    p.add_argument("--methods", default=None, help=f"comma-separated methods (default: {COMPARE_METHODS}, "
                   "plus llmcompressor-sq-static,llmcompressor-sq-gptq-dynamic when llm-compressor is installed: "
                   "./tools/setup.sh --llmcompressor)")
    p.add_argument("--settings", default=None, help="comma-separated bit settings W<w>A<a>[KV<kv>], "
                   f"e.g. W8A8,W4A8KV8 (default: {COMPARE_SETTINGS}; --vision: W8A8,W8A6,W4A8)")
    p.add_argument("--recipe", default=None, help="base recipe: calibration, sinks, smoothquant_alpha, ignore, "
                   "weight and clipping options (default: the built-in defaults + the options below)")
    p.add_argument("--weights", choices=("rtn", "gptq", "auto"), default=None,
                   help="weight quantizer for every method (default: auto = GPTQ below 8 bits, RTN at 8 bits; "
                   "or the --recipe's)")
    p.add_argument("--group-size", type=int, default=None,
                   help="per-group weight scales of this many input columns; 0 = per-channel (default: 32, or the "
                   "--recipe's)")
    p.add_argument("--clip-search", choices=("on", "off"), default=None,
                   help="weight and activation clipping search (default: on, or the --recipe's; --vision: the "
                   "weight search on where GPTQ runs, the activation search only with on)")
    p.add_argument("--plot", default=None, help="write a PNG bar chart of perplexity to this file")
    p.add_argument("--breakdown", default=None, metavar="METHOD@SETTING",
                   help="instead of the table: per-layer error analysis of one method and setting (e.g. "
                   "insertquant+rotate@W4A8KV8): weights only, activations only, cache only and all together")
    p.add_argument("--vision", action="store_true",
                   help="the real CLIP ViT-B/16 image tower (asset clip-vit-b16-openai; also chosen by --model "
                   "asset:clip-vit-b16-openai) on the bundled photos: image-embedding cosine to FP and "
                   "nearest-neighbour agreement per method and setting (docs/clip_b16.md)")
    p.add_argument("--library", choices=("hf", "open_clip", "timm"), default="hf",
                   help="--vision: library that builds the CLIP tower; its shipped recipe is the base (default: %(default)s)")
    p.add_argument("--num-images", type=int, default=None,
                   help="--vision: score only the first N of the 15 held-out photos (default: all)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("analyze", help="measure the sink mechanism and its restoration: report.html, figures.json, summary")
    _model_args(p), _common(p)
    p.add_argument("--text", default="austen-lady-susan", help="text asset or .txt to analyze (default: %(default)s)")
    p.add_argument("--chunks", type=int, default=4, help="number of 512-token chunks (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--alpha", type=float, default=64.0, help="sink ratio threshold (default: %(default)s)")
    p.add_argument("--out", default="vtquant-analysis", help="output directory (default: %(default)s)")
    p.add_argument("--recipe", default=None,
                   help="recipe of the restoration section (default: insertquant+rotate W8A8)")
    p.add_argument("--calib-text", default=None, help="calibration text (default: the recipe's, shakespeare)")
    p.add_argument("--calib-windows", type=int, default=8,
                   help="calibration windows for the restoration section (default: %(default)s)")
    p.add_argument("--no-restoration", action="store_true", help="skip section 5 (no quantized copies)")
    p.add_argument("--images", default=None, help="vision --model (timm:NAME, open_clip:NAME/PRETRAINED, hf:PATH, "
                   "asset:clip-vit-b16-openai or control = the DINOv2-S asset): a folder of images (default: the "
                   "bundled photos)")
    p.add_argument("--num-images", type=int, default=6, help="vision: images analysed (default: %(default)s)")
    p.add_argument("--calib-images", type=int, default=8,
                   help="vision: other images calibrating the restoration section (default: %(default)s)")
    p.add_argument("--no-pretrained", action="store_true", help="vision: random weights (smoke tests only)")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("quantize", help="quantize with a recipe and save a checkpoint (vtquant.load reads it)")
    _model_args(p, vision=True), _common(p)
    p.add_argument("--recipe", required=True, help="YAML recipe (e.g. recipes/hf/smollm2-135m.yaml)")
    p.add_argument("--out", default=None, help="output directory (required, except for vision-language models: "
                   "--model asset:clip-smollm2-llava or vlm:PATH, which print their per-part report and save nothing)")
    p.add_argument("--calib-images", type=int, default=8,
                   help="vision-language models: calibration photos with prompts, at most 8 (default: %(default)s)")
    p.add_argument("--calib-text", default=None, help="LLMs: calibration text asset or .txt (default: the recipe's)")
    p.add_argument("--format", choices=("auto", "hf", "vtquant", "compressed-tensors"), default="auto",
                   help="auto: hf for transformers models (LLMs, HF vision towers), vtquant for timm / open_clip. "
                   "hf: a transformers folder (config.json with quantization_config, tokenizer, W4 packed) that "
                   "vtquant.load reads and the model's from_pretrained (AutoModelForCausalLM for LLMs) loads once "
                   "vtquant is imported. "
                   "vtquant: model.safetensors + vtquant.json + recipe.yaml, read by vtquant.load only. "
                   "compressed-tensors (LLMs): llm-compressor's format, which transformers with the compressed-tensors "
                   "package (and vLLM) load without vtquant; the activations are then quantized with the format's "
                   "numerics (activations.numerics: compressed-tensors), so the folder computes exactly what vtquant's "
                   "model computes; naive-static, dynamic-token, smoothquant, rotate with rotation.online: false, "
                   "weight-only; insertquant / prefix are refused (default: %(default)s)")
    p.add_argument("--library", choices=("hf", "open_clip", "timm"), default="open_clip",
                   help=f"vision: the library that builds --model {VISION_CLIP_ASSET} (its image tower; default: "
                   "%(default)s)")
    p.add_argument("--calib-data", default=None,
                   help="vision: a folder of calibration images (default: the bundled photos); calibration.num_samples "
                   "of them are drawn with calibration.seed")
    p.add_argument("--no-pretrained", action="store_true", help="vision: random weights (smoke tests only)")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("eval", help="evaluate: perplexity (LLMs), imagenet (top-1/5), retrieval (Flickr30k R@k), "
                       "lm-eval (lm-evaluation-harness tasks), vlm (image + text FP-vs-quantized fidelity)")
    p.add_argument("task", choices=("perplexity", "imagenet", "retrieval", "linear-probe", "lm-eval", "vlm"))
    _model_args(p), _text_args(p, DEMO_EVAL_CHUNKS), _common(p)
    p.add_argument("--recipe", default=None, help="quantize with this recipe and compare with fp")
    p.add_argument("--checkpoint", default=None, help="evaluate a checkpoint saved by `vtquant quantize`")
    p.add_argument("--methods", default=None,
                   help=f"methods to compare when no --recipe / --checkpoint is given (default: {EVAL_METHODS}); "
                   "linear-probe: the methods scored beside fp, derived from --recipe or the default CLIP recipe "
                   "(default: only the --recipe as written); "
                   "vlm: with --recipe, the methods derived from it (each part's section; 'recipe': as written)")
    p.add_argument("--w-bits", type=int, default=8)
    p.add_argument("--a-bits", type=int, default=8)
    p.add_argument("--data", default=None, help="imagenet / retrieval: dataset directory (docs/vision.md lists the layouts); "
                   "vision --model: timm:NAME, open_clip:NAME/PRETRAINED or hf:PATH")
    p.add_argument("--calib-data", default=None, help="imagenet: calibration images (default: a seeded sample of --data)")
    p.add_argument("--split", default="test", help="retrieval: Karpathy split (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="imagenet / retrieval: images per batch (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="imagenet: evaluate the first N images only; "
                   "lm-eval: the first N documents of each task")
    p.add_argument("--tasks", default="austen_rolling,austen_next_sentence",
                   help="lm-eval: comma-separated tasks (default: %(default)s, local tasks made from the bundled "
                   "Lady Susan text)")
    p.add_argument("--include-path", default=None, help="lm-eval: a folder of task YAMLs to add")
    p.add_argument("--lm-batch-size", type=int, default=4,
                   help="lm-eval: requests per forward pass, right-padded (default: %(default)s)")
    p.add_argument("--no-pretrained", action="store_true", help="vision: random weights (smoke tests only)")
    vg = p.add_argument_group(f"vlm (image + text fidelity; --model asset:clip-smollm2-llava, the untrained "
                              "real-parts composite, or vlm:PATH; docs/vlm.md)")
    vg.add_argument("--calib-images", type=int, default=8,
                    help="vlm: calibration photos, at most 8 (every third bundled photo; default: %(default)s)")
    vg.add_argument("--eval-images", type=int, default=0,
                    help="vlm: held-out photos evaluated, 0 = all 15 (default: %(default)s)")
    vg.add_argument("--new-tokens", type=int, default=16,
                    help="vlm: greedy tokens generated per prompt with the KV cache, 0 = none (default: %(default)s)")
    lp = p.add_argument_group("linear-probe (Fashion-MNIST; --model asset:clip-vit-b16-openai by default, or "
                              "timm: / open_clip: / hf:; --data: a folder with the idx files, default the asset)")
    lp.add_argument("--library", choices=("hf", "open_clip", "timm"), default="hf",
                    help="library that builds asset:clip-vit-b16-openai (default: %(default)s)")
    lp.add_argument("--train-size", type=int, default=10000, help="probe training images, 0 = all 60k (default: %(default)s)")
    lp.add_argument("--test-size", type=int, default=2000, help="test images, 0 = all 10k (default: %(default)s)")
    lp.add_argument("--knn-k", type=int, default=20, help="k-NN neighbours (default: %(default)s)")
    # linear-probe: --device (above) is the device of the feature extraction, the calibration and the fake quantization
    lp.add_argument("--tf32", choices=("on", "off"), default="off",
                    help="--device cuda: TF32 matmuls (default: %(default)s: fp32 throughout)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="real low-bit speed: fp32/bf16 vs per-token dynamic int8 vs vtquant static")
    p.add_argument("--model", default="asset:smollm2-135m", help="CPU: the model (default: %(default)s)")
    p.add_argument("--model-file", default=None, help="CPU: a GGUF model file given by hand")
    p.add_argument("--prompt-len", type=int, default=512, help="prefill tokens (default: %(default)s)")
    p.add_argument("--decode-tokens", type=int, default=32, help="decode steps (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (default: %(default)s)")
    p.add_argument("--ppl-chunks", type=int, default=4,
                   help="CPU: Austen chunks for the fake vs real perplexity check (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all available cores)")
    p.add_argument("--methods", default="fp,bf16,dynamic-token,dynamic-token-fused,insertquant,insertquant+rotate",
                   help="CPU methods to compare (also: insertquant-unfused)")
    p.add_argument("--interleave", action="store_true",
                   help="CPU: all methods in one process, prefill timed in interleaved rounds (shared machines)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cpu: SmolLM2; cuda: layer shapes")
    p.add_argument("--shapes", default="llama2-7b,llama2-7b-16k,vit-b16,vit-l14", help="GPU layer shapes")
    p.add_argument("--backends", default="cuda-fp8,cuda-int8", help="GPU backends")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--results-file", default=None)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("assets", help="list the real assets and what is cached; fetch or add them")
    p.add_argument("--fetch", nargs="*", default=None, metavar="NAME", help="fetch these assets now")
    p.add_argument("--add", nargs=2, metavar=("NAME", "ARCHIVE"), help="add a pre-downloaded archive to the cache")
    _common(p)
    p.set_defaults(func=cmd_assets)
    return parser


def user_errors() -> tuple[type, ...]:
    """What the command reports as one line ``vtquant CMD: error: ...`` (exit status 2) instead of a
    traceback: problems the user can fix, whose messages name the problem and the fix."""
    from .adapters import UnsupportedModelError
    from .errors import VtquantError  # ConfigError, AssetError, CheckpointError, DataError...

    return (VtquantError, UnsupportedModelError, FileNotFoundError, IsADirectoryError, NotADirectoryError,
            PermissionError)


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    errors = user_errors()
    try:
        return int(args.func(args) or 0)
    except errors as err:
        message = " ".join(str(err).split())  # one line, whatever the message's own line breaks
        print(f"vtquant {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
