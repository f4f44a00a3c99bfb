"""``kvlab compare``: KV-cache bytes and FLOPs of several models over several contexts, ratios, a log-log plot."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kvlab.archplot import plot_architecture
from kvlab.cli.common import (
    MODEL_HELP,
    add_kv_dtype,
    add_price_dtype_and_json,
    costs_of,
    emit_json,
    kv_options,
    output_file,
    parse_price_dtype,
    resolve_config,
)
from kvlab.units import fmt_bytes, fmt_context, fmt_count, fmt_flops, parse_contexts, table

NAME = "compare"
HELP = "KV-cache bytes of several models over several contexts, with ratios and a plot"
EXAMPLE = ("kvlab compare llama-3.1-8b gemma-4-e2b --context 8k,32k,128k,1m --plot out/compare.png "
           "--kv-quant int8,int4-g32")


def add_arguments(q: argparse.ArgumentParser) -> None:
    q.add_argument("models", nargs="+", help=MODEL_HELP)
    q.add_argument("--context", default="8k,32k,128k,1m", help="comma-separated lengths (default 8k,32k,128k,1m)")
    q.add_argument("--batch", type=int, default=1)
    q.add_argument("--plot", type=output_file("--plot"), help="write a log-log PNG plot of KV bytes against context here")
    q.add_argument("--arch-plot", type=output_file("--arch-plot"),
                   help="write the models' layer stacks side by side (PNG) here")
    add_price_dtype_and_json(q)
    add_kv_dtype(q, several=True)


def compare_data(models: list[str], contexts: list[int], dtype: str, batch: int = 1, kv_dtype: str | None = None,
                 kv_quants: list[str] | None = None) -> dict[str, Any]:
    """KV-cache bytes of each model at each context (unquantized, then one row per ``kv_quants`` format), and
    ratios to the first model."""
    out = []
    for spec in models:
        cfg = resolve_config(spec)
        for q in [None, *(kv_quants or [])]:
            cs = [costs_of(cfg, ctx, dtype, batch, kv_dtype, q) for ctx in contexts]
            out.append(_model_row(spec, cfg, cs, q))
    first, first_flops = out[0]["kv_cache_bytes"], out[0]["flops_per_token"]
    for m in out:
        m["ratio_to_first"] = [(b / f if f else None) for b, f in zip(m["kv_cache_bytes"], first)]
        m["flops_ratio_to_first"] = [(b / f if f else None) for b, f in zip(m["flops_per_token"], first_flops)]
    return {"dtype": out[0]["dtype"], "kv_dtype": out[0]["kv_dtype"], "batch": batch, "contexts": contexts, "models": out}


def _model_row(spec: str, cfg: Any, cs: list[Any], kv_quant: str | None) -> dict[str, Any]:
    name = cfg.name if kv_quant is None else f"{cfg.name} [{cs[0].kv_quant}]"
    return {"model": spec, "name": name, "dtype": cs[0].dtype, "kv_dtype": cs[0].kv_dtype, "kv_quant": cs[0].kv_quant, "max_positions": cfg.max_positions,
                    "params_total": cs[0].params_total, "kv_cache_bytes": [c.kv_cache_bytes for c in cs],
                    "kv_read_bytes_per_step": [c.kv_read_bytes_per_step for c in cs],
                    "kv_state_bytes": cs[0].kv_state_bytes,
                    "attn_flops_per_token": [c.attn_flops_per_token for c in cs],
                    "flops_per_token": [c.flops_per_token for c in cs],
                    "kv_components": [c.kv_components for c in cs],
                    "attn_flops_components": [c.attn_flops_components for c in cs]}


MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p"]
LINESTYLES = ["-", "--", "-.", ":"]


def plot_labels(data: dict[str, Any]) -> list[str]:
    """One label per model: its name, or the spec it came from (a path) when two models share a name."""
    names = [m["name"] for m in data["models"]]
    return [m["model"] if names.count(m["name"]) > 1 else m["name"] for m in data["models"]]


def plot_compare(data: dict[str, Any], path: str | Path) -> Path:
    """Log-log plot of KV-cache bytes against context, one line per model; written to ``path``.

    Readable with many models: a distinct colour (tab10, then tab20) and marker per model, the legend outside the
    axes, and contexts past a model's max positions drawn hollow on a dotted line.
    """
    import matplotlib.pyplot as plt

    fig = compare_figure(data)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def compare_figure(data: dict[str, Any]) -> Any:
    """The matplotlib figure of :func:`plot_compare`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ctx = data["contexts"]
    n = len(data["models"])
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    fig, ax = plt.subplots(figsize=(8.5, 5.5), dpi=120)
    beyond_any = False
    for i, (m, label) in enumerate(zip(data["models"], plot_labels(data))):
        colour, mk, ls = cmap(i % cmap.N), MARKERS[i % len(MARKERS)], LINESTYLES[(i // len(MARKERS)) % 4]
        inside = [(c, b) for c, b in zip(ctx, m["kv_cache_bytes"]) if c <= m["max_positions"]]
        past = [(c, b) for c, b in zip(ctx, m["kv_cache_bytes"]) if c > m["max_positions"]]
        if inside:
            ax.plot(*zip(*inside), linestyle=ls, marker=mk, color=colour, label=label)
        if past:
            beyond_any = True
            joined = inside[-1:] + past
            ax.plot(*zip(*joined), linestyle=":", color=colour, label=None if inside else label)
            ax.plot(*zip(*past), linestyle="none", marker=mk, markerfacecolor="white", color=colour)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xticks(ctx, [fmt_context(c) for c in ctx])
    ticks = [2**k for k in range(20, 50, 2)]
    lo = min(min(b for b in m["kv_cache_bytes"] if b) for m in data["models"] if any(m["kv_cache_bytes"]))
    hi = max(max(m["kv_cache_bytes"]) for m in data["models"])
    ticks = [t for t in ticks if lo / 4 <= t <= hi * 4] or ticks
    ax.set_yticks(ticks, [fmt_bytes(t).replace(".00", "") for t in ticks])
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel(f"KV cache ({data['dtype']}, batch {data['batch']})")
    ax.set_title("KV-cache size against context")
    ax.grid(True, which="major", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if beyond_any:
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], linestyle=":", marker="o", markerfacecolor="white", color="grey"))
        labels.append("past the model's max positions")
    ax.legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return fig


def run(args: argparse.Namespace) -> int:
    contexts = parse_contexts(args.context)
    kv_dtype, quants = kv_options(args)
    dtype = parse_price_dtype(args.dtype)
    data = compare_data(args.models, contexts, dtype, args.batch, kv_dtype, quants)
    if args.plot:
        data["plot"] = str(plot_compare(data, args.plot))
    if args.arch_plot:
        data["arch_plot"] = str(plot_architecture([resolve_config(m) for m in args.models], args.arch_plot,
                                                  dtype=dtype, titles=plot_labels(data)))
    if args.json:
        emit_json(data)
        return 0
    heads = ["model", "params"] + [fmt_context(c) for c in contexts]
    rows, ratios, beyond = [], [], False
    for m in data["models"]:
        cells = []
        for c, b in zip(contexts, m["kv_cache_bytes"]):
            star = "*" if c > m["max_positions"] else ""
            beyond |= bool(star)
            cells.append(fmt_bytes(b) + star)
        rows.append([m["name"], fmt_count(m["params_total"])] + cells)
        ratios.append([m["name"], ""] + ["-" if r is None else f"{r:.3f}x" for r in m["ratio_to_first"]])
    print(f"KV cache ({data['kv_dtype']}" + (", [quantized format]" if any(m["kv_quant"] != "none" for m in
                                                                             data["models"]) else "")
          + f", batch {data['batch']}; weights {data['dtype']})")
    print(table(heads, rows, left=1))
    print(f"\nratio to {data['models'][0]['name']}")
    print(table(heads, ratios, left=1))
    print("\nK/V bytes read per decoded token (at that context; quantized rows: codes, scales, residual)")
    print(table(heads, [[m["name"], fmt_count(m["params_total"])] + [fmt_bytes(b) for b in m["kv_read_bytes_per_step"]]
                        for m in data["models"]], left=1))
    print("\nattention FLOPs per decoded token (at that context)")
    print(table(heads, [[m["name"], fmt_count(m["params_total"])] + [fmt_flops(f) for f in m["attn_flops_per_token"]]
                        for m in data["models"]], left=1))
    print(f"\nall FLOPs per decoded token (matmuls + attention), and as a fraction of {data['models'][0]['name']}'s")
    print(table(heads, [[m["name"], fmt_count(m["params_total"])]
                        + [fmt_flops(f) + ("" if r is None else f" ({100 * r:.1f}%)")
                           for f, r in zip(m["flops_per_token"], m["flops_ratio_to_first"])]
                        for m in data["models"]], left=1))
    parts = [m for m in data["models"] if any(m["kv_components"]) or any(m["attn_flops_components"])]
    if parts:  # csa / hca / mla models: where the bytes and the attention FLOPs go
        prows = []
        for m in parts:
            for what, key, fmt in (("KV", "kv_components", fmt_bytes), ("attn FLOPs", "attn_flops_components",
                                                                          fmt_flops)):
                names = list(dict.fromkeys(k for d in m[key] for k in d))
                prows += [[m["name"], f"{what}: {k}"] + [fmt(d.get(k, 0)) for d in m[key]]
                          for k in names]
        print("\nby component (summed over the layers)")
        print(table(["model", "component"] + [fmt_context(c) for c in contexts], prows, left=2))
    states = [(m["name"], m["kv_state_bytes"]) for m in data["models"] if m["kv_state_bytes"]]
    if states:
        print("\nincluded above, constant per-sequence state (e.g. CCA conv tails): "
              + ", ".join(f"{n} {fmt_bytes(b)}" for n, b in states))
    if beyond:
        print("\n* beyond the model's max_positions")
    if args.plot:
        print(f"\nplot: {data['plot']}")
    if args.arch_plot:
        print(f"architecture plot: {data['arch_plot']}")
    return 0
