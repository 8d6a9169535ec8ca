"""``vtquant analyze``: where the massive activations are, on real text (METHOD.md "The phenomenon").

Per layer: the largest |activation| of the residual stream (block output), its
token (position and text) and channel, the median |h|, and their ratio; the
largest per-token peak at the MLP second-linear input (where spikes are born);
the share of attention the sink tokens receive.  Emergence and cancellation
layers come from the same functions the quantizer uses.  Writes a table
(``summary.md``), ``figures.json`` and a PNG plot.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .adapters import get_adapter
from .core.hooks import HookManager
from .core.sinks import find_cancellation_layer, find_emergence_layer, token_peaks
from .recipe import atomic_write_text


@torch.no_grad()
def spike_statistics(model: torch.nn.Module, chunks: torch.Tensor, alpha: float = 64.0,
                     attentions: bool = True) -> dict:
    """Measure per-layer spike statistics of a decoder on ``chunks`` ``[n, T]`` (one forward per chunk)."""
    adapter = get_adapter(model)
    blocks = adapter.blocks()
    n_layers = len(blocks)
    res: dict[int, list] = {i: [] for i in range(n_layers)}
    probe: dict[int, list] = {i: [] for i in range(n_layers)}
    attn_share: dict[int, list] = {i: [] for i in range(n_layers)}
    with HookManager() as hooks:
        for i, block in enumerate(blocks):
            hooks.forward(block, lambda m, inp, out, i=i: res[i].append(adapter.block_output(out)[0].abs().float()))
            lin = block.get_submodule(adapter.probe_name())
            hooks.pre_forward(lin, lambda m, inp, i=i: probe[i].append(token_peaks(inp[0][0]).float()))
        attn_maps = []
        for chunk in chunks:
            out = model(input_ids=chunk.unsqueeze(0), use_cache=False, output_attentions=attentions)
            if attentions and getattr(out, "attentions", None):
                attn_maps.append([a[0].float() for a in out.attentions])
    n = chunks.shape[0]
    peaks = torch.stack([torch.stack(probe[i]) for i in range(n_layers)])  # [L, n, T]
    reference = peaks.flatten(1).median(dim=1).values.clamp_min(1e-12)
    ratios = peaks / reference.view(-1, 1, 1)
    emergence = find_emergence_layer(ratios.flatten(1).max(dim=1).values, alpha)
    sinks = ratios[emergence] > alpha if emergence is not None else torch.zeros_like(ratios[0], dtype=torch.bool)
    layers = []
    sink_rows = []
    sink_norm = []
    for i in range(n_layers):
        h = torch.stack(res[i])  # [n, T, C]
        med = float(h.median())
        tok_peak, tok_chan = h.max(dim=-1)
        flat = int(tok_peak.argmax())
        c, t = divmod(flat, h.shape[1])
        row: dict[str, Any] = {
            "layer": i, "top_value": float(tok_peak.flatten()[flat]), "top_chunk": c, "top_position": t,
            "top_channel": int(tok_chan[c, t]), "median_abs": med,
            "ratio_to_median": float(tok_peak.flatten()[flat]) / max(med, 1e-12),
            "probe_top_ratio": float(ratios[i].max()),
            "probe_top_position": int(ratios[i].flatten().argmax()) % h.shape[1],
            "channels_over_100x_on_top_token": int((h[c, t] > 100 * med).sum()),
        }
        sink_norm.append(float(h.norm(dim=-1)[sinks].mean()) if bool(sinks.any()) else 0.0)
        if attn_maps and bool(sinks.any()):
            shares = []
            for ci in range(n):
                a = attn_maps[ci][i]  # [H, T, T]
                cols = sinks[ci]
                if bool(cols.any()):
                    shares.append(a[:, 1:, :][:, :, cols].sum(-1).mean())
            row["sink_attention_share"] = float(torch.stack(shares).mean()) if shares else None
        layers.append(row)
        for ci in range(n):
            for t in sinks[ci].nonzero().flatten().tolist():
                sink_rows.append({"layer": i, "chunk": ci, "token_position": t,
                                  "channel": int(tok_chan[ci, t]), "value": float(tok_peak[ci, t]),
                                  "ratio_to_median": float(tok_peak[ci, t]) / max(med, 1e-12)})
    cancellation = find_cancellation_layer(torch.tensor(sink_norm), emergence) if emergence is not None else None
    return {"emergence_layer": emergence, "cancellation_layer": cancellation, "alpha": alpha,
            "layers": layers, "sinks": sink_rows,
            "sink_positions": [sinks[ci].nonzero().flatten().tolist() for ci in range(n)],
            "sink_residual_norm": sink_norm}


def _plot(stats: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [r["layer"] for r in stats["layers"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    ax.semilogy(layers, [r["top_value"] for r in stats["layers"]], "o-", label="top |h| (residual)")
    ax.semilogy(layers, [r["median_abs"] for r in stats["layers"]], "s-", label="median |h|")
    ax.semilogy(layers, [r["probe_top_ratio"] for r in stats["layers"]], "^-", label="MLP 2nd-linear input: top token peak / median token peak")
    for key, style in (("emergence_layer", "--"), ("cancellation_layer", ":")):
        if stats[key] is not None:
            ax.axvline(stats[key], color="gray", linestyle=style, label=key.replace("_", " "))
    ax.set_xlabel("layer"), ax.set_title("massive activations"), ax.legend(fontsize=7)
    ax = axes[1]
    shares = [r.get("sink_attention_share") for r in stats["layers"]]
    ax.bar(layers, [s or 0 for s in shares])
    ax.set_ylim(0, 1), ax.set_xlabel("layer"), ax.set_title("attention mass on sink tokens")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def format_spike_table(stats: dict, token_text: Callable[[int, int], str]) -> str:
    lines = ["| layer | top abs(h) | position | token | channel | median abs(h) | ratio | ch >100x | "
             "probe ratio | sink attn share |", "|---" * 10 + "|"]
    for r in stats["layers"]:
        share = r.get("sink_attention_share")
        lines.append(
            f"| {r['layer']} | {r['top_value']:.1f} | {r['top_position']} | {token_text(r['top_chunk'], r['top_position'])!r} | "
            f"{r['top_channel']} | {r['median_abs']:.2f} | {r['ratio_to_median']:.0f} | {r['channels_over_100x_on_top_token']} | "
            f"{r['probe_top_ratio']:.1f} | {'-' if share is None else f'{share:.2f}'} |")
    return "\n".join(lines)


def analyze_llm(model: Any, tokenizer: Any, name: str, args: Any, log: Callable[[str], None]) -> int:
    from .data import load_text
    from .eval.perplexity import make_chunks

    start = time.time()
    ids = torch.tensor(tokenizer(load_text(args.text, quiet=args.quiet))["input_ids"])
    chunks = make_chunks(ids, args.seq_len, args.chunks)
    log(f"analyzing {name} on {chunks.shape[0]} x {args.seq_len} tokens of {args.text} ...")
    stats = spike_statistics(model, chunks, alpha=args.alpha)

    def token_text(chunk: int, pos: int) -> str:
        return tokenizer.decode([int(chunks[chunk, pos])])

    for row in stats["sinks"]:
        row["token_text"] = token_text(row["chunk"], row["token_position"])
    table = format_spike_table(stats, token_text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    header = (f"# vtquant analyze: {name}\n\n{chunks.shape[0]} chunks x {args.seq_len} tokens of {args.text}; "
              f"emergence layer {stats['emergence_layer']}, cancellation layer {stats['cancellation_layer']}; "
              f"sink positions per chunk {stats['sink_positions']} (probe ratio > {args.alpha:g})\n\n")
    atomic_write_text(out / "summary.md", header + table + "\n")
    stats["model"], stats["text"], stats["seconds"] = name, args.text, round(time.time() - start, 1)
    atomic_write_text(out / "figures.json", json.dumps(stats, indent=1))
    _plot(stats, out / "spikes.png", f"{name}: {args.text}, {chunks.shape[0]}x{args.seq_len} tokens")
    print(header + table)
    print(f"\nwrote {out / 'summary.md'}, {out / 'figures.json'}, {out / 'spikes.png'}")
    if args.results_file:
        from .eval.results import Row, write_results

        rows = [Row(name, "fp", None, None, None, None, f"layer{r['layer']}_top_abs", r["top_value"], 0.0)
                for r in stats["layers"]]
        write_results(args.results_file, rows, emergence_layer=stats["emergence_layer"],
                      cancellation_layer=stats["cancellation_layer"])
    return 0
