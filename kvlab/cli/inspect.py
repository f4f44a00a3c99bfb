"""``kvlab inspect``: one row per layer (kind, heads, head dims, window, KV source, params, KV bytes, FLOPs)."""

from __future__ import annotations

import argparse

from kvlab.archplot import plot_architecture
from kvlab.cli.common import (
    MODEL_HELP,
    add_kv_dtype,
    add_price_dtype_and_json,
    context_or_default,
    costs_of,
    emit_json,
    one_kv_format,
    output_file,
    parse_price_dtype,
    resolve_config,
)
from kvlab.units import fmt_bytes, fmt_context, fmt_count, fmt_flops, table

NAME = "inspect"
HELP = ("per-layer table: kind, heads, head dims, window, KV source, params, KV bytes, "
        "attention FLOPs of a decode step and of prefill")
EXAMPLE = "kvlab inspect gemma-4-e2b --context 128k --plot out/gemma-4-e2b.png"


def add_arguments(q: argparse.ArgumentParser) -> None:
    q.add_argument("model", help=MODEL_HELP)
    q.add_argument("--context", help="context length (default: the model's max positions)")
    q.add_argument("--batch", type=int, default=1)
    q.add_argument("--plot", type=output_file("--plot"), help="write the layer stack as an architecture diagram (PNG) here")
    add_price_dtype_and_json(q)
    add_kv_dtype(q)


def run(args: argparse.Namespace) -> int:
    cfg = resolve_config(args.model)
    ctx = context_or_default(args.context, cfg)
    dtype = parse_price_dtype(args.dtype)
    kv_dtype, kv_quant = one_kv_format(args, "inspect")
    c = costs_of(cfg, ctx, dtype, args.batch, kv_dtype, kv_quant)
    layers = [dict(vars(x)) for x in c.per_layer]
    plot = None
    if args.plot:
        plot = str(plot_architecture(cfg, args.plot, context=ctx, dtype=dtype))
    if args.json:
        emit_json({"name": c.name, "context": ctx, "dtype": c.dtype, "kv_dtype": c.kv_dtype,
                   "kv_quant": c.kv_quant, "batch": c.batch,
                    "kv_cache_bytes": c.kv_cache_bytes, "params_total": c.params_total, "layers": layers,
                    **({"plot": plot} if plot else {})})
        return 0
    print(f"{c.name}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}; "
          f"context {ctx:,} ({fmt_context(ctx)}), weights {c.dtype}, "
          + (f"K/V {c.kv_quant} (exact parts {c.kv_dtype})" if c.kv_quant != "none" else f"{c.kv_dtype} K/V")
          + f", batch {c.batch}")
    rows = []
    for x in c.per_layer:
        hd = str(x.head_dim) if x.v_head_dim == x.head_dim else f"{x.head_dim}/{x.v_head_dim}"
        rows.append([x.index, x.kind, x.mlp, x.heads, x.kv_heads, hd, "-" if x.window is None else x.window,
                     "-" if x.kv_source is None else x.kv_source, fmt_count(x.params),
                     f"{x.kv_bytes_per_token:,}", fmt_bytes(x.kv_bytes), fmt_flops(x.attn_flops_per_token),
                     fmt_flops(x.prefill_attn_flops)])
    rows.append(["all", "", "", "", "", "", "", "", fmt_count(sum(x.params for x in c.per_layer)),
                 f"{sum(x.kv_bytes_per_token for x in c.per_layer):,}", fmt_bytes(c.kv_cache_bytes),
                 fmt_flops(c.attn_flops_per_token), fmt_flops(c.prefill_attn_flops)])
    print(table(["layer", "kind", "mlp", "heads", "kv heads", "head dim", "window", "kv src", "params",
                 "KV B/token", f"KV @ {fmt_context(ctx)}", "attn FLOP/tok", "prefill attn FLOP"], rows, left=3))
    if plot:
        print(f"\narchitecture plot: {plot}")
    return 0
