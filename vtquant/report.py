"""The ``vtquant analyze`` report: PNG figures, a self-contained ``report.html``, ``figures.json``, a text summary.

Everything drawn or printed here is read from the ``figures`` dict that
:func:`vtquant.analyze.analyze_model` measured; nothing is typed in.
"""
from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any, Optional

import torch

from .fileio import atomic_write_text


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    plt = _plt()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def _arr(rows: list) -> Optional[torch.Tensor]:
    """List over layers of per-head lists (``None`` for missing layers) -> ``[L, H]`` with NaN holes."""
    width = next((len(r) for r in rows if r is not None), None)
    if width is None:
        return None
    return torch.tensor([r if r is not None else [float("nan")] * width for r in rows], dtype=torch.float)


def _pos(values: list) -> list:
    """Values for a log axis: non-positive / missing -> NaN (not drawn)."""
    return [v if v is not None and v > 0 else float("nan") for v in values]


def _mark_layers(ax: Any, figures: dict) -> None:
    for key, style in (("emergence_layer", "--"), ("cancellation_layer", ":")):
        if figures.get(key) is not None:
            ax.axvline(figures[key], color="gray", linestyle=style, linewidth=1, label=key.replace("_", " "))


def _heat(ax: Any, data: torch.Tensor, title: str, cmap: str = "viridis", center: bool = False,
          xlabel: str = "head") -> None:
    import numpy as np

    arr = data.numpy()
    kwargs: dict = {"aspect": "auto", "cmap": cmap, "origin": "lower", "interpolation": "nearest"}
    if center:
        lim = float(np.nanmax(np.abs(arr))) if np.isfinite(arr).any() else 1.0
        kwargs.update(vmin=-lim, vmax=lim)
    im = ax.imshow(arr, **kwargs)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel("layer", fontsize=8)
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)


# ------------------------------------------------------------------------------------------
def _detected_maps(plt: Any, det: dict, vision: dict, figures: dict, path: Path, max_images: int = 8) -> Path:
    """Per image: the patch grid of the detection quantity (log scale) over the image, detected sinks boxed."""
    from matplotlib.patches import Rectangle

    maps = det["_maps"]
    imgs = figures.get("_images")
    n_img = min(max_images, maps.shape[0])
    cols = min(4, n_img)
    rows_ = math.ceil(n_img / cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(3.0 * cols, 3.2 * rows_), squeeze=False)
    logm = maps[:n_img].clamp_min(1e-3).log10()
    vmin, vmax = float(logm.min()), float(logm.max())
    gh, gw = vision["grid"]
    h_img, w_img = vision["image_size"]
    names = figures.get("input_names") or []
    im = None
    for j, ax in enumerate(axes.flatten()):
        ax.axis("off")
        if j >= n_img:
            continue
        if imgs is not None:
            ax.imshow(imgs[j].numpy(), extent=(0, w_img, h_img, 0))
        im = ax.imshow(logm[j].numpy(), extent=(0, w_img, h_img, 0), cmap="magma",
                       alpha=0.6 if imgs is not None else 1.0, vmin=vmin, vmax=vmax, interpolation="nearest")
        info = det["images"][j]
        for r, c in info["patches"]:
            ax.add_patch(Rectangle((c * w_img / gw, r * h_img / gh), w_img / gw, h_img / gh, fill=False,
                                   edgecolor="cyan", linewidth=1.2))
        chans = sorted(set(info["channels"]), key=info["channels"].count, reverse=True)[:2]
        ax.set_title((f"{names[j]}\n" if j < len(names) else f"image {j}\n")
                     + f"{info['count']} sinks" + (f", channel {'/'.join(map(str, chans))}" if chans else ""),
                     fontsize=7)
    if im is not None:
        fig.colorbar(im, ax=axes.flatten().tolist(), fraction=0.02, pad=0.01, label="log10 ||h - mu|| (patch)")
    fig.suptitle(f"{det['map_quantity']}; cyan: sinks found by the quantizer's rule ({det['rule']})", fontsize=8)
    return _save(fig, path)


def make_plots(figures: dict, out: Path, token_labels: Optional[list] = None) -> dict[str, Path]:
    """Draw every figure the measurements allow; returns ``{key: png path}``."""
    plt = _plt()
    out = Path(out)
    paths: dict[str, Path] = {}
    spikes = figures["spikes"]
    layers = [r["layer"] for r in spikes["layers"]]

    # 1a. per-layer line plot
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    ax = axes[0]
    ax.semilogy(layers, [r["top"][0]["value"] for r in spikes["layers"]], "o-", label="top |h| (block output)")
    ax.semilogy(layers, [r["median_abs"] for r in spikes["layers"]], "s-", label="median |h|")
    ax.semilogy(layers, [r["probe_top_ratio"] for r in spikes["layers"]], "^-",
                label="MLP 2nd-linear input: top token peak / median token peak")
    _mark_layers(ax, figures)
    ax.set_xlabel("layer (block output)"), ax.set_title("massive activations per layer"), ax.legend(fontsize=7)
    ax = axes[1]
    share = _arr(figures.get("geometry", {}).get("attention_share", [])) if figures.get("geometry") else None
    if share is not None:
        ax.bar(layers, share.nanmean(1).nan_to_num(0).tolist(), color="tab:orange")
        ax.set_ylim(0, 1)
    ax.set_xlabel("layer"), ax.set_title("attention mass on the sink tokens (mean over heads)")
    fig.tight_layout()
    paths["spikes"] = _save(fig, out / "spikes.png")

    # 1b. heatmap layer x token
    peak0 = spikes.get("_tok_peak0")
    vision = figures.get("vision")
    if vision and not token_labels:
        token_labels = vision.get("labels")
    if peak0 is not None:
        n_tok = peak0.shape[1] if vision else min(64, peak0.shape[1])
        fig, ax = plt.subplots(figsize=(13, 5.5))
        im = ax.imshow(peak0[:, :n_tok].clamp_min(1e-3).log10().numpy(), aspect="auto", origin="lower", cmap="magma",
                       interpolation="nearest")
        fig.colorbar(im, ax=ax, label="log10 max_c |h|")
        if token_labels:
            step = max(1, math.ceil(n_tok / 64))
            ticks = list(range(0, n_tok, step))
            if vision:  # every prefix token and every sink of the first image gets its tick
                ticks = sorted(set(ticks) | set(range(vision["num_prefix"])) | set(spikes["sink_positions"][0]))
            ax.set_xticks(ticks)
            ax.set_xticklabels([repr(token_labels[t])[1:-1][:8] for t in ticks], rotation=90, fontsize=6)
        ax.set_xlabel("token (first image: prefix tokens, then patches (row,col))" if vision else
                      "token (first input, first positions)"), ax.set_ylabel("layer")
        ax.set_title("per-token peak |h| of the residual stream (layer x token)")
        fig.tight_layout()
        paths["spike_heatmap"] = _save(fig, out / "spike_heatmap.png")

    # 1c. vision: per-image patch grid of the peak |h| at the map layer, overlaid on the image
    if vision and vision.get("_patch_maps") is not None:
        maps = vision["_patch_maps"]
        imgs = figures.get("_images")
        n_img = min(8, maps.shape[0])
        cols = min(4, n_img)
        rows_ = math.ceil(n_img / cols)
        fig, axes = plt.subplots(rows_, cols, figsize=(3.4 * cols, 3.6 * rows_), squeeze=False)
        logm = maps[:n_img].clamp_min(1e-3).log10()
        vmin, vmax = float(logm.min()), float(logm.max())
        gh, gw = vision["grid"]
        from matplotlib.patches import Rectangle

        im = None
        for j, ax in enumerate(axes.flatten()):
            ax.axis("off")
            if j >= n_img:
                continue
            h_img, w_img = vision["image_size"]
            if imgs is not None:
                ax.imshow(imgs[j].numpy(), extent=(0, w_img, h_img, 0))
            im = ax.imshow(logm[j].numpy(), extent=(0, w_img, h_img, 0), cmap="magma", alpha=0.6 if imgs is not None
                           else 1.0, vmin=vmin, vmax=vmax, interpolation="nearest")
            for rc in vision["sink_patches"][j]:
                r, c = rc
                ax.add_patch(Rectangle((c * w_img / gw, r * h_img / gh), w_img / gw, h_img / gh, fill=False,
                                       edgecolor="cyan", linewidth=1.5))
            prefix = ", ".join(f"{p['label']} {_fmt(float(v), 3)}" for p, v in
                               zip(vision["prefix"], vision["_prefix_values"][j].tolist()))
            names = figures.get("input_names") or []
            ax.set_title((f"{names[j]}\n" if j < len(names) else f"image {j}\n") + (prefix or "no prefix tokens"),
                         fontsize=7)
        if im is not None:
            fig.colorbar(im, ax=axes.flatten().tolist(), fraction=0.02, pad=0.01, label="log10 max_c |h| (patch)")
        fig.suptitle(f"{vision['map_quantity']}; cyan boxes: sink patches (alpha {figures['spikes']['alpha']:g})",
                     fontsize=9)
        paths["patch_maps"] = _save(fig, out / "patch_maps.png")

    # 1d. vision: the quantizer's detection (model-relative rule): per-image map of the detection quantity
    det = figures.get("detection")
    if vision and det is not None and det.get("_maps") is not None:
        paths["detected_sinks"] = _detected_maps(plt, det, vision, figures, out / "detected_sinks.png")

    # 2. constant vectors
    cv = figures.get("constant_vectors")
    if cv:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        tnames = spikes.get("type_names") or []
        for name, rows in cv.items():
            k_types = max((len(r["types"]) for r in rows), default=0)
            for k in range(k_types):
                if not any(r["types"][k] for r in rows):
                    continue
                tn = tnames[k] if k < len(tnames) else f"type {k}"
                pc = [r["types"][k]["pairwise_cosine"] if r["types"][k] else float("nan") for r in rows]
                sp = [r["types"][k]["relative_spread"] if r["types"][k] else float("nan") for r in rows]
                axes[0].plot(layers, pc, "o-", ms=3, label=f"sinks, {name}, {tn}")
                axes[1].semilogy(layers, _pos(sp), "o-", ms=3, label=f"{name}, {tn}")
            axes[0].plot(layers, [r["semantic_pairwise_cosine"] for r in rows], "x:", label=f"semantic tokens, {name}")
        for ax in axes:
            _mark_layers(ax, figures)
            ax.set_xlabel("layer"), ax.legend(fontsize=7)
        axes[0].set_title("cosine of normalized states across inputs (pairwise)")
        axes[0].set_ylim(-0.1, 1.05)
        axes[1].set_title("relative spread of the template ||x - mean|| / ||mean||")
        fig.tight_layout()
        paths["constant_vectors"] = _save(fig, out / "constant_vectors.png")

    # 3. geometry heatmaps
    geo = figures.get("geometry")
    if geo:
        panels = [("key_norm_ratio", "W_K: ||k_sink|| / ||k_semantic|| (kv head)", "viridis", False, "kv head"),
                  ("attention_share", "attention share on the sink (head)", "viridis", False, "head"),
                  ("query_alignment", "W_Q: cos(q_semantic, k_sink), pre-RoPE", "coolwarm", True, "head"),
                  ("value_norm_ratio", "W_V: ||v_sink|| / ||v_semantic|| (kv head)", "viridis", False, "kv head"),
                  ("value_gain_ratio", "W_V gain ||Wx||/||x||: sink / semantic", "viridis", False, "kv head"),
                  ("value_low_energy_sink", "W_V: sink energy share in lower-half singular dirs", "viridis", False, "kv head")]
        fig, axes = plt.subplots(2, 3, figsize=(14, 8))
        for ax, (key, title, cmap, center, xl) in zip(axes.flatten(), panels):
            data = _arr(geo.get(key, []))
            if data is None:
                ax.axis("off")
                continue
            _heat(ax, data, title, cmap, center, xl)
        fig.tight_layout()
        paths["geometry"] = _save(fig, out / "geometry.png")

    # 4. RoPE
    rope = figures.get("rope")
    if rope:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        es, et = _arr([None if e is None else torch.tensor(e).mean(0).tolist() for e in rope["pair_energy_sink"]]), \
            _arr([None if e is None else torch.tensor(e).mean(0).tolist() for e in rope["pair_energy_semantic"]])
        sel = _active_layers(figures)
        period = rope["pair_period_tokens"]
        ax = axes[0]
        if es is not None:
            ax.loglog(period, es[sel].nanmean(0).tolist(), "o-", ms=3, label="sink key")
            ax.loglog(period, et[sel].nanmean(0).tolist(), "x-", ms=3, label="semantic keys (mean)")
        ax.axvline(rope["context_tokens"], color="gray", linestyle="--", label="analysed context length")
        ax.set_xlabel("RoPE pair period (tokens); right = low frequency"), ax.set_ylabel("share of key energy")
        ax.set_title(f"key energy per frequency pair (layers {_range_text(sel)})", fontsize=9), ax.legend(fontsize=7)
        ax = axes[1]
        ds, dt = _arr(rope["logit_drift_sink"]), _arr(rope["logit_drift_semantic"])
        if ds is not None:
            ax.semilogy(layers, _pos(ds.nanmean(1).tolist()), "o-", label="sink key")
            ax.semilogy(layers, _pos(dt.nanmean(1).tolist()), "x-", label="semantic keys")
        _mark_layers(ax, figures)
        ax.set_xlabel("layer"), ax.set_ylabel("mean |change of logit| (nats)")
        ax.set_title(f"attention-logit change when the key moves by {rope['shifts'][0]}..{rope['shifts'][-1]} tokens",
                     fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths["rope"] = _save(fig, out / "rope.png")

    # 5. restoration
    res = figures.get("restoration")
    if res and res.get("variants"):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
        for label, v in res["variants"].items():
            line = axes[0].semilogy(layers, _pos(v["hidden_error_semantic"]), "o-", ms=3, label=label)[0]
            if v.get("hidden_error_sink") and v["hidden_error_sink"][0] is not None:
                axes[1].semilogy(layers, _pos(v["hidden_error_sink"]), "o-", ms=3, color=line.get_color(), label=label)
        for ax, what in zip(axes, ("semantic tokens", "sink tokens")):
            _mark_layers(ax, figures)
            ax.set_xlabel("layer"), ax.set_ylabel("||h_q - h_fp|| / ||h_fp||")
            ax.set_title(f"hidden-state relative error, {what}", fontsize=9), ax.legend(fontsize=7)
        fig.tight_layout()
        paths["restoration_error"] = _save(fig, out / "restoration_error.png")

        fp_share = _arr(res.get("fp_attention_share") or [])
        variants = [(lbl, v) for lbl, v in res["variants"].items() if v.get("attention_share") is not None]
        if fp_share is not None and variants:
            fig, axes = plt.subplots(1, 1 + len(variants), figsize=(4.2 * (1 + len(variants)), 4.2))
            _heat(axes[0], fp_share, "FP: attention share on sink columns", "viridis")
            for ax, (lbl, v) in zip(axes[1:], variants):
                diff = torch.tensor(v["attention_share"]) - fp_share
                _heat(ax, diff, f"{lbl}\nminus FP", "coolwarm", center=True)
            fig.tight_layout()
            paths["attention_diff"] = _save(fig, out / "attention_diff.png")
        crop_fp = res.get("_fp_crop")
        if crop_fp is not None and variants:
            layer = _crop_layer(figures)
            fig, axes = plt.subplots(1, 1 + len(variants), figsize=(4.2 * (1 + len(variants)), 4))
            im = axes[0].imshow(crop_fp[layer].numpy(), cmap="viridis", vmin=0, vmax=1)
            axes[0].set_title(f"FP attention, layer {layer} (mean over heads)", fontsize=9)
            fig.colorbar(im, ax=axes[0], fraction=0.046)
            for ax, (lbl, v) in zip(axes[1:], variants):
                d = (v["_crop"][layer] - crop_fp[layer]).numpy()
                lim = max(float(abs(d).max()), 1e-6)
                im = ax.imshow(d, cmap="coolwarm", vmin=-lim, vmax=lim)
                ax.set_title(f"{lbl} minus FP", fontsize=8)
                fig.colorbar(im, ax=ax, fraction=0.046)
            for ax in axes:
                ax.set_xlabel("key position"), ax.set_ylabel("query position")
            fig.tight_layout()
            paths["attention_maps"] = _save(fig, out / "attention_maps.png")
        tt = res.get("template_transfer")
        if tt:
            fig, axes = plt.subplots(1, 2, figsize=(12, 4))
            k_types = max((len(r["types"]) for r in tt["layers"]), default=0)
            for k in range(k_types):
                g = lambda key: [r["types"][k][key] if r["types"][k] else float("nan") for r in tt["layers"]]  # noqa: E731
                axes[0].plot(layers, g("eval_cosine_to_calib_template"), "o-", ms=3, label=f"type {k}: to the calibration template")
                axes[0].plot(layers, g("eval_cosine_to_eval_template"), "x:", label=f"type {k}: to its own corpus' mean")
                axes[1].semilogy(layers, _pos(g("key_rel_error")), "o-", ms=3, label=f"type {k}: key, calibration template")
                axes[1].semilogy(layers, _pos(g("value_rel_error")), "s-", ms=3, label=f"type {k}: value, calibration template")
                axes[1].semilogy(layers, _pos(g("key_rel_error_in_distribution")), "x:", label=f"type {k}: key, own-corpus mean")
            for ax in axes:
                _mark_layers(ax, figures)
                ax.set_xlabel("layer"), ax.legend(fontsize=7)
            axes[0].set_title(f"sinks of the analysed text vs template from {res.get('calibration')}", fontsize=9)
            axes[1].set_title("relative error of the inserted key / value rows", fontsize=9)
            fig.tight_layout()
            paths["template_transfer"] = _save(fig, out / "template_transfer.png")
    return paths


def _active_layers(figures: dict) -> list[int]:
    """Layers between emergence (exclusive) and cancellation (inclusive), else all."""
    n = figures["num_layers"]
    e, c = figures.get("emergence_layer"), figures.get("cancellation_layer")
    if e is None:
        return list(range(n))
    end = c if c is not None else n - 1
    sel = list(range(e + 1, end + 1))
    return sel or list(range(n))


def _crop_layer(figures: dict) -> int:
    sel = _active_layers(figures)
    return sel[len(sel) // 2]


def _range_text(values: list[int]) -> str:
    return f"{values[0]}-{values[-1]}" if values else "-"


# ------------------------------------------------------------------------------------------
def _fmt(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, float):
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        return f"{x:.{digits}g}"
    return str(x)


def _span(values: list) -> str:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return f"{_fmt(min(vals))}-{_fmt(max(vals))}" if vals else "-"


def key_numbers(figures: dict) -> dict:
    """Compact per-section numbers (over the layers where the sink is active) for the summary and the report."""
    sel = _active_layers(figures)
    spikes = figures["spikes"]
    out: dict = {"active_layers": _range_text(sel)}
    tops = [spikes["layers"][i]["top"][0] for i in sel]
    out["top_value"] = _span([t["value"] for t in tops])
    out["top_channels"] = sorted({t["channel"] for t in tops})
    out["top_positions"] = sorted({t["token_position"] for t in tops})
    out["median_abs"] = _span([spikes["layers"][i]["median_abs"] for i in sel])
    out["ratio_to_median"] = _span([t["ratio_to_median"] for t in tops])
    cv = figures.get("constant_vectors") or {}
    for name, rows in cv.items():
        out[f"sink_pairwise_cosine_{name}"] = _span([r["types"][0]["pairwise_cosine"] if r["types"] and r["types"][0]
                                                    else None for r in (rows[i] for i in sel)])
        out[f"semantic_pairwise_cosine_{name}"] = _span([rows[i]["semantic_pairwise_cosine"] for i in sel])
        out[f"template_spread_{name}"] = _span([r["types"][0]["relative_spread"] if r["types"] and r["types"][0]
                                               else None for r in (rows[i] for i in sel)])
    geo = figures.get("geometry")
    if geo:
        def layer_mean(key: str) -> list:
            a = _arr(geo.get(key, []))
            return [] if a is None else [float(a[i].nanmean()) for i in sel]

        for key in ("attention_share", "key_norm_ratio", "query_alignment", "query_alignment_baseline",
                    "query_alignment_rope", "query_alignment_rope_baseline", "value_norm_ratio", "value_gain_ratio",
                    "value_low_energy_sink", "value_low_energy_semantic", "value_null_fraction_sink",
                    "value_null_fraction_semantic"):
            if key in geo:
                out[key] = _span(layer_mean(key))
        a = _arr(geo.get("attention_share", []))
        if a is not None:
            out["attention_share_all_layers"] = _span([float(a[i].nanmean()) for i in range(a.shape[0])])
    rope = figures.get("rope")
    if rope:
        def rmean(key: str) -> list:
            return [float(torch.tensor(rope[key][i]).mean()) for i in sel if rope[key][i] is not None]

        out["rope_low_frequency_share_sink"] = _span(rmean("low_frequency_share_sink"))
        out["rope_low_frequency_share_semantic"] = _span(rmean("low_frequency_share_semantic"))
        out["rope_logit_drift_sink"] = _span(rmean("logit_drift_sink"))
        out["rope_logit_drift_semantic"] = _span(rmean("logit_drift_semantic"))
    res = figures.get("restoration")
    if res and res.get("variants"):
        out["fp_perplexity"] = res.get("fp_perplexity")
        fp_share = _arr(res.get("fp_attention_share") or [])
        vrows = {}
        for label, v in res["variants"].items():
            row = {"perplexity": v.get("perplexity"),
                   "hidden_error_semantic_max": max(v["hidden_error_semantic"]),
                   "hidden_error_semantic_last": v["hidden_error_semantic"][-1],
                   "hidden_error_sink_max": max(x for x in v["hidden_error_sink"] if x is not None)
                   if v["hidden_error_sink"][0] is not None else None,
                   "calibrate_and_measure_seconds": v.get("seconds")}
            if fp_share is not None and v.get("attention_share") is not None:
                d = (torch.tensor(v["attention_share"]) - fp_share).abs()
                row["attention_share_max_abs_diff"] = float(d[d.isfinite()].max())
                row["attention_share_mean_abs_diff"] = float(d[d.isfinite()].mean())
            vrows[label] = row
        out["variants"] = vrows
        tt = res.get("template_transfer")
        if tt:
            rows = [tt["layers"][i]["types"][0] for i in sel if tt["layers"][i]["types"] and tt["layers"][i]["types"][0]]
            out["transfer_eval_cosine_to_calib_template"] = _span([r["eval_cosine_to_calib_template"] for r in rows])
            out["transfer_template_cosine_calib_vs_eval"] = _span([r["template_cosine_calib_vs_eval"] for r in rows])
            out["transfer_key_rel_error"] = _span([r["key_rel_error"] for r in rows])
            out["transfer_value_rel_error"] = _span([r["value_rel_error"] for r in rows])
            out["transfer_key_rel_error_in_distribution"] = _span([r["key_rel_error_in_distribution"] for r in rows])
    return out


def _per_type_cosines(figures: dict, name: str = "attention_input") -> dict:
    """Sink type name -> span of the pairwise cosine across inputs over the active layers."""
    rows = (figures.get("constant_vectors") or {}).get(name) or []
    sel = _active_layers(figures)
    names = figures["spikes"].get("type_names") or []
    out = {}
    for t, tn in enumerate(names):
        vals = [rows[i]["types"][t]["pairwise_cosine"] for i in sel
                if i < len(rows) and t < len(rows[i]["types"]) and rows[i]["types"][t]]
        if vals:
            out[tn] = _span(vals)
    return out


def detection_text(figures: dict) -> str:
    """One paragraph: what the quantizer's own detection found on the analysed images."""
    det = figures["detection"]
    counts = [im["count"] for im in det["images"]]
    if not det["stages"]:
        return (f"The quantizer's detection (rule {det['rule']}, calibrated on {len(det.get('calibration_images', []))} "
                "other images) found no sinks: no probe fired.")
    stages = ", ".join(f"{k} at {det['sites'].get(k, 'probe')} {v} (threshold {det['thresholds'][k]:g})"
                       for k, v in det["stages"].items())
    chans = ", ".join(f"{c} ({n})" for c, n in list(det["channel_counts"].items())[:3]) or "-"
    return (f"The quantizer's detection (rule {det['rule']}; stages {stages}; calibrated on "
            f"{len(det.get('calibration_images', []))} other images) marks {det['count_mean']:g} sinks per image beyond "
            f"the prefix tokens ({min(counts)}-{max(counts)}); their channel (largest |h - mu| at the main layer "
            f"{det['main_layer']}): {chans}. Map: {det['map_quantity']}.")


def summary_text(figures: dict) -> str:
    """A short plain-text summary of the measurements."""
    k = key_numbers(figures)
    vision = figures.get("vision")
    positions = figures["spikes"]["sink_positions"]
    if vision:
        gh, gw = vision["grid"]
        head = (f"vtquant analyze: {figures.get('model', figures['model_class'])} on {figures['chunks'][0]} images x "
                f"{figures['chunks'][1]} tokens ({vision['num_prefix']} prefix + {gh}x{gw} patches) of "
                f"{figures.get('text', 'the given images')} ({figures.get('seconds')} s)")
        where = f"sink tokens per image {figures['spikes'].get('sink_tokens', positions)}"
        top_tokens = sorted({figures['spikes']['layers'][i]['top'][0]['token'] for i in _active_layers(figures)})
        at = f"token(s) {top_tokens}"
    else:
        head = (f"vtquant analyze: {figures.get('model', figures['model_class'])} on {figures['chunks'][0]} x "
                f"{figures['chunks'][1]} tokens of {figures.get('text', 'the given inputs')} ({figures.get('seconds')} s)")
        where = f"sink positions per input {positions}"
        at = f"position(s) {k['top_positions']}"
    lines = [head,
             f"1. spikes: emergence layer {figures['emergence_layer']}, cancellation layer {figures['cancellation_layer']} "
             f"(layer i = output of block i); {where}; in layers {k['active_layers']} "
             f"top |h| {k['top_value']} in channel(s) {k['top_channels']} at {at}, "
             f"median |h| {k['median_abs']}, ratio {k['ratio_to_median']}"]
    if figures["emergence_layer"] is None:
        ratios = [r["probe_top_ratio"] for r in figures["spikes"]["layers"]]
        j = max(range(len(ratios)), key=lambda i: ratios[i])
        lines.append(f"   no massive activations: the largest MLP second-linear input token peak is {_fmt(ratios[j])}x the "
                     f"median token peak (layer {j}), below alpha = {figures['spikes']['alpha']:g}: no sinks, "
                     "emergence layer None")
    if vision and figures.get("detection") is not None:
        names = figures.get("input_names") or []
        det = figures["detection"]
        lines.append("   detection (the quantizer's rule): " + detection_text(figures))
        for j, im in enumerate(det["images"]):
            lines.append(f"     {names[j] if j < len(names) else j}: {im['count']} sinks at "
                         + (" ".join(f"({r},{c})" for r, c in im["patches"]) or "-")
                         + (f"; channel(s) {sorted(set(im['channels']), key=im['channels'].count, reverse=True)}"
                            if im["channels"] else ""))
    what_in = figures.get("projection_input", "normalized attention input")
    if vision and "sink_pairwise_cosine_attention_input" in k:
        per_type = _per_type_cosines(figures) or {"no sinks": "-"}
        lines.append(f"2. constant vectors (layers {k['active_layers']}): sinks' {what_in}s, pairwise "
                     "cosine across images per sink type: " + "; ".join(f"{n} {v}" for n, v in per_type.items())
                     + f" (non-sink tokens {k['semantic_pairwise_cosine_attention_input']})")
    elif "sink_pairwise_cosine_attention_input" in k:
        lines.append(f"2. constant vectors (layers {k['active_layers']}): sinks' {what_in}s, pairwise "
                     f"cosine across inputs {k['sink_pairwise_cosine_attention_input']} (semantic tokens "
                     f"{k['semantic_pairwise_cosine_attention_input']}); template relative spread "
                     f"{k['template_spread_attention_input']}")
    if "attention_share" in k:
        keys = (figures.get("geometry") or {}).get("keys_measured")
        lines.append(f"3. geometry (layers {k['active_layers']}, mean over heads{'; keys ' + keys if keys else ''}): "
                     "attention share on the sink "
                     f"{k['attention_share']} (all layers {k['attention_share_all_layers']}); W_K key norm ratio "
                     f"{k['key_norm_ratio']}; W_Q cos(q, k_sink) {k['query_alignment']} vs semantic keys "
                     f"{k['query_alignment_baseline']} (after RoPE {k.get('query_alignment_rope', '-')} vs "
                     f"{k.get('query_alignment_rope_baseline', '-')}); W_V value norm ratio {k['value_norm_ratio']}, "
                     f"gain ratio {k.get('value_gain_ratio', '-')}, lower-half singular energy "
                     f"{k.get('value_low_energy_sink', '-')} (semantic {k.get('value_low_energy_semantic', '-')}), "
                     f"null-space fraction {k.get('value_null_fraction_sink', '-')} (semantic "
                     f"{k.get('value_null_fraction_semantic', '-')})")
    if figures.get("rope_skipped"):
        lines.append(f"4. RoPE: skipped: {figures['rope_skipped']}")
    if "rope_low_frequency_share_sink" in k:
        lines.append(f"4. RoPE: sink key energy in low-frequency pairs (period > context) "
                     f"{k['rope_low_frequency_share_sink']} (semantic {k['rope_low_frequency_share_semantic']}); "
                     f"logit change when the key moves {k['rope_logit_drift_sink']} nats (semantic "
                     f"{k['rope_logit_drift_semantic']})")
    if "variants" in k:
        if vision:
            lines.append(f"5. restoration (calibrated on {figures['restoration'].get('calibration')}; hidden-state error "
                         "vs FP on the analysed images):")
        else:
            lines.append(f"5. restoration (calibrated on {figures['restoration'].get('calibration')}; fp perplexity "
                         f"{_fmt(k['fp_perplexity'], 4)} on the analysed chunks):")
        for label, v in k["variants"].items():
            lines.append(f"   {label}: " + ("" if vision else f"perplexity {_fmt(v['perplexity'], 4)}; ")
                         + "hidden error semantic max "
                         f"{_fmt(v['hidden_error_semantic_max'])} (last layer {_fmt(v['hidden_error_semantic_last'])}), "
                         f"sink max {_fmt(v['hidden_error_sink_max'])}"
                         + (f"; attention share on sinks |diff| max {_fmt(v.get('attention_share_max_abs_diff'))} mean "
                            f"{_fmt(v.get('attention_share_mean_abs_diff'))}" if not vision else ""))
        if "transfer_key_rel_error" in k:
            lines.append(f"   template transfer (layers {k['active_layers']}): cosine of analysed-text sinks to the "
                         f"calibration template {k['transfer_eval_cosine_to_calib_template']}; key rel. error "
                         f"{k['transfer_key_rel_error']} (own-corpus mean {k['transfer_key_rel_error_in_distribution']}), "
                         f"value rel. error {k['transfer_value_rel_error']}")
    variants = (figures.get("restoration") or {}).get("variants") or {}
    first = next(iter(variants.items()), None)
    if first is not None and first[1].get("report", {}).get("probes"):
        lines.append(f"6. the quantizer's detection ({first[0]}, on the calibration corpus):")
        lines += ["   " + line for line in detection_lines(first[1]["report"]["probes"])]
    lines += [f"note: {n}" for n in figures.get("notes", [])]
    return "\n".join(lines)


def detection_lines(probes: list) -> list:
    """The quantizer's per-probe detection summary (``QuantReport.detection_lines``) from a saved report."""
    from .core.pipeline import QuantReport

    return QuantReport(method="", probes=probes).detection_lines()


# ------------------------------------------------------------------------------------------
SECTION_TEXT = {
    "spikes": ("1. Spikes", "Per layer (output of block i), the largest |activation| of the residual stream, its "
               "token and channel, the median |h| and their ratio. The emergence layer is the block whose MLP "
               "second-linear input spikes (same rule as the quantizer); the cancellation layer is the block whose "
               "output lowers the sinks' residual norm the most."),
    "constant_vectors": ("2. Constant vectors", "The sinks' normalized states (inputs of the attention and MLP "
                         "projections) compared across inputs: mean pairwise cosine (1 = the same vector whatever "
                         "the text), and the relative spread of the template (their mean). Semantic tokens as baseline."),
    "geometry": ("3. Projection geometry", "Per layer and head. W_K: norm of the sink's key over the mean semantic "
                 "key norm, and the attention share the sink receives (non-sink query rows after it). W_Q: cosine of "
                 "semantic queries with the sink key (pre-RoPE), against the mean cosine with semantic keys. W_V: "
                 "the sink value's norm over semantic values, the gain ||W_V x|| / ||x|| relative to semantic tokens, "
                 "and the share of the sink input's row-space energy in the lower half of W_V's singular directions "
                 "(value-state drain / spectral null space)."),
    "rope": ("4. RoPE stability", "Energy of the sink key per RoPE frequency pair (pair i, i + d/2), the share in "
             "low-frequency pairs whose period exceeds the analysed context, and the mean absolute change of the "
             "attention logit (nats) when the key moves by 1-128 positions, sink key vs semantic keys."),
    "restoration": ("5. Restoration evidence", "Quantized copies of the model, calibrated on a different corpus: the "
                    "recipe with clamp + insert, the same with clamp only (no insertion, no residual restore), and "
                    "naive per-tensor static. Hidden states are compared with FP per layer (rotated models are "
                    "un-rotated exactly); attention on the FP sink columns; and the templates of the calibration "
                    "corpus measured on the analysed corpus."),
}


def _table(headers: list, rows: list) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(path: Optional[Path], alt: str) -> str:
    if path is None or not Path(path).exists():
        return ""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(Path(path).name)}</figcaption></figure>'


def render_html(figures: dict, plots: dict, title: str) -> str:
    k = key_numbers(figures)
    vision = figures.get("vision")
    parts = [f"<h1>{html.escape(title)}</h1>",
             "<p class=meta>" + html.escape(f"{figures['model_class']} ({figures['adapter']}), {figures['num_layers']} "
                                            f"layers; {figures['chunks'][0]} inputs x {figures['chunks'][1]} tokens of "
                                            f"{figures.get('text', '-')}; {figures.get('seconds')} s. Layer i = output of "
                                            "block i (transformers hidden_states index i + 1). Every number and plot "
                                            "below is measured by this run.") + "</p>",
             "<pre class=summary>" + html.escape(summary_text(figures)) + "</pre>"]
    if figures.get("command"):
        parts.append("<p>command: <code>" + html.escape(figures["command"]) + "</code></p>")
    # 1
    h, text = SECTION_TEXT["spikes"]
    parts += [f"<h2>{h}</h2><p>{html.escape(text)}</p>", _img(plots.get("spikes"), "spikes"),
              _img(plots.get("spike_heatmap"), "heatmap")]
    if vision:
        gh, gw = vision["grid"]
        parts.append("<p>" + html.escape(
            f"Tokens: {', '.join(p['label'] for p in vision['prefix']) or 'no prefix tokens'} then {gh} x {gw} patches "
            f"labelled (row, col) in the order the patch embedding flattens them (token layout "
            f"{vision['token_layout']}). Patch grids below: {vision['map_quantity']}, on a log scale, overlaid on the "
            "model's input image (min-max scaled for display); sink patches boxed; the prefix tokens' values in "
            "each title.") + "</p>")
        parts.append(_img(plots.get("patch_maps"), "patch maps"))
        det = figures.get("detection")
        if det is not None:
            parts.append("<h3>Sinks found by the quantizer's detection</h3><p>" + html.escape(detection_text(figures))
                         + "</p>")
            parts.append(_img(plots.get("detected_sinks"), "detected sinks"))
            names = figures.get("input_names") or []
            parts.append(_table(["image", "sinks", "patches (row, col)", "channels"],
                                [[names[j] if j < len(names) else j, im["count"],
                                  " ".join(f"({r},{c})" for r, c in im["patches"]) or "-",
                                  ", ".join(f"{c} x{im['channels'].count(c)}" for c in
                                            sorted(set(im["channels"]), key=im["channels"].count, reverse=True)) or "-"]
                                 for j, im in enumerate(det["images"])]))
        if figures["emergence_layer"] is None:
            ratios = [r["probe_top_ratio"] for r in figures["spikes"]["layers"]]
            j = max(range(len(ratios)), key=lambda i: ratios[i])
            parts.append("<p><b>" + html.escape(
                f"No massive activations in this model on these images: the largest MLP second-linear input token "
                f"peak is {_fmt(ratios[j])}x the median token peak (layer {j}), below alpha = "
                f"{figures['spikes']['alpha']:g}. No sinks, emergence layer None; sections 3 and the template "
                "transfer have nothing to measure.") + "</b></p>")
    rows = []
    for r in figures["spikes"]["layers"]:
        t = r["top"][0]
        rows.append([r["layer"], _fmt(t["value"]), t["token_position"], repr(t["token"]), t["channel"],
                     _fmt(r["median_abs"]), _fmt(t["ratio_to_median"]), r["channels_over_100x_on_top_token"],
                     _fmt(r["probe_top_ratio"]), ", ".join(f"{_fmt(x['value'])}@{x['token_position']}/c{x['channel']}"
                                                          for x in r["top"][1:])])
    parts.append(_table(["layer", "top |h|", "position", "token", "channel", "median |h|", "ratio", "ch >100x",
                         "probe ratio", "next (value@pos/channel)"], rows))
    # 2
    if figures.get("constant_vectors"):
        h, text = SECTION_TEXT["constant_vectors"]
        if figures.get("projection_input"):
            text += f" Here the projections read the {figures['projection_input']}."
        parts += [f"<h2>{h}</h2><p>{html.escape(text)}</p>", _img(plots.get("constant_vectors"), "constant vectors")]
        rows = []
        cv = figures["constant_vectors"]
        first = next(iter(cv.values()))
        for i, r in enumerate(first):
            cells = [r["layer"]]
            for name in cv:
                t0 = cv[name][i]["types"][0] if cv[name][i]["types"] else None
                cells += [_fmt(t0["pairwise_cosine"]) if t0 else "-", _fmt(t0["relative_spread"]) if t0 else "-",
                          _fmt(cv[name][i]["semantic_pairwise_cosine"])]
            rows.append(cells)
        heads = ["layer"]
        for name in cv:
            heads += [f"{name}: sink cos", f"{name}: spread", f"{name}: semantic cos"]
        if vision:  # one column pair per sink type (CLS, registers, content patches)
            names = figures["spikes"].get("type_names") or []
            ai = cv.get("attention_input") or first
            used = [t for t in range(len(names)) if any(t < len(r["types"]) and r["types"][t] for r in ai)]
            heads = ["layer"] + [f"{names[t]}: {x}" for t in used for x in ("count", "pairwise cos", "spread")] + \
                ["non-sink pairwise cos"]
            rows = [[r["layer"]] + [c for t in used for c in (
                (r["types"][t]["count"], _fmt(r["types"][t]["pairwise_cosine"]), _fmt(r["types"][t]["relative_spread"]))
                if r["types"][t] else ("-", "-", "-"))] + [_fmt(r["semantic_pairwise_cosine"])] for r in ai]
            parts.append("<p>Attention input per sink type:</p>")
        parts.append(_table(heads, rows))
    # 3
    geo = figures.get("geometry")
    if geo:
        h, text = SECTION_TEXT["geometry"]
        if geo.get("keys_measured"):
            text += f" Queries and keys: {geo['keys_measured']}."
        parts += [f"<h2>{h}</h2><p>{html.escape(text)}</p>", _img(plots.get("geometry"), "geometry")]
        keys = [x for x in ("attention_share", "key_norm_ratio", "query_alignment", "query_alignment_baseline",
                            "query_alignment_rope", "value_norm_ratio", "value_gain_ratio", "value_low_energy_sink",
                            "value_low_energy_semantic") if x in geo]
        arrs = {x: _arr(geo[x]) for x in keys}
        rows = [[i] + [_fmt(float(arrs[x][i].nanmean())) if arrs[x] is not None else "-" for x in keys]
                for i in range(figures["num_layers"])]
        parts.append("<p>Per layer, mean over heads (per-head values in figures.json):</p>" + _table(["layer"] + keys, rows))
    # 4
    if figures.get("rope_skipped") and not figures.get("rope"):
        parts.append(f"<h2>{SECTION_TEXT['rope'][0]}</h2><p>Skipped: " + html.escape(figures["rope_skipped"]) + "</p>")
    if figures.get("rope"):
        h, text = SECTION_TEXT["rope"]
        parts += [f"<h2>{h}</h2><p>{html.escape(text)}</p>", _img(plots.get("rope"), "rope")]
        rope = figures["rope"]
        rows = []
        for i in range(figures["num_layers"]):
            if rope["low_frequency_share_sink"][i] is None:
                continue
            rows.append([i, _fmt(float(torch.tensor(rope["low_frequency_share_sink"][i]).mean())),
                         _fmt(float(torch.tensor(rope["low_frequency_share_semantic"][i]).mean())),
                         _fmt(float(torch.tensor(rope["top4_pair_share_sink"][i]).mean())),
                         _fmt(float(torch.tensor(rope["logit_drift_sink"][i]).mean())),
                         _fmt(float(torch.tensor(rope["logit_drift_semantic"][i]).mean()))])
        parts.append(_table(["layer", "sink low-freq share", "semantic low-freq share", "sink top-4 pair share",
                             "sink logit drift (nats)", "semantic logit drift (nats)"], rows))
    # 5
    res = figures.get("restoration")
    if res and res.get("variants"):
        h, text = SECTION_TEXT["restoration"]
        parts += [f"<h2>{h}</h2><p>{html.escape(text)}</p>"]
        rows = [["fp", _fmt(res.get("fp_perplexity"), 4), "-", "-", "-", "-", "-"]]
        for label, v in k["variants"].items():
            rows.append([label, _fmt(v["perplexity"], 4), _fmt(v["hidden_error_semantic_max"]),
                         _fmt(v["hidden_error_semantic_last"]), _fmt(v["hidden_error_sink_max"]),
                         _fmt(v.get("attention_share_max_abs_diff")), _fmt(v.get("calibrate_and_measure_seconds"))])
        parts.append(_table(["variant", "perplexity (analysed chunks)", "hidden err semantic (max over layers)",
                             "hidden err semantic (last layer)", "hidden err sink (max)",
                             "attention share |diff| max", "seconds"], rows))
        parts += [_img(plots.get("restoration_error"), "hidden error"), _img(plots.get("attention_diff"), "attention diff"),
                  _img(plots.get("attention_maps"), "attention maps"), _img(plots.get("template_transfer"), "transfer")]
        if "transfer_key_rel_error" in k:
            parts.append("<p>" + html.escape(
                f"Template transfer ({res.get('calibration')} -> {figures.get('text')}), layers {k['active_layers']}: "
                f"cosine of the analysed text's sinks to the calibration template {k['transfer_eval_cosine_to_calib_template']}; "
                f"cosine between the two corpora's templates {k['transfer_template_cosine_calib_vs_eval']}; relative error of "
                f"the inserted key {k['transfer_key_rel_error']} (own-corpus template {k['transfer_key_rel_error_in_distribution']}), "
                f"value {k['transfer_value_rel_error']}.") + "</p>")
    if figures.get("notes"):
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in figures["notes"]) + "</ul>")
    style = ("body{font-family:sans-serif;max-width:1400px;margin:1em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;font-size:12px;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;"
             "text-align:right}th{background:#f0f0f0}img{max-width:100%}figure{margin:.5em 0}"
             "pre.summary{white-space:pre-wrap;background:#f7f7f7;padding:.6em;font-size:12px}.meta{color:#555}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>" + "\n".join(parts) + "</body></html>")


def write_report(figures: dict, out: Path, title: str = "vtquant analyze", token_labels: Optional[list] = None) -> dict:
    """Write ``figures.json``, the PNGs, ``report.html`` (PNGs embedded) and ``summary.txt`` into ``out``."""
    from .analyze import public

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots = make_plots(figures, out, token_labels)
    atomic_write_text(out / "figures.json", json.dumps(public(figures), indent=1))
    atomic_write_text(out / "report.html", render_html(figures, plots, title))
    atomic_write_text(out / "summary.txt", summary_text(figures) + "\n")
    return {"plots": plots, "html": out / "report.html", "json": out / "figures.json", "summary": out / "summary.txt"}
