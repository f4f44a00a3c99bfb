"""``kvlab calc``: parameters, KV-cache bytes, bytes read per decode step and FLOPs of one model at one context."""

from __future__ import annotations

import argparse
from typing import Any

from kvlab.cli.common import (
    MODEL_HELP,
    add_kv_dtype,
    add_price_dtype_and_json,
    context_or_default,
    costs_of,
    emit_json,
    one_kv_format,
    parse_price_dtype,
    resolve_config,
)
from kvlab.costs import kv_sharing_report
from kvlab.gguf_checkpoint import is_gguf, weight_bytes
from kvlab.models import is_named, model_file
from kvlab.presets import presets
from kvlab.sharing import shared_layers, without_sharing
from kvlab.units import fmt_bytes, fmt_context, fmt_count, fmt_flops, table

NAME = "calc"
HELP = "parameters, KV-cache bytes, bytes read per step and FLOPs of one model at one context"
EXAMPLE = ("kvlab calc llama-3.1-8b --context 128k --dtype bf16\n"
           "  kvlab calc qwen3-8b --context 32k --dtype fp8 --kv-quant int4-g32-r64   # fp8 weights, int4 K/V\n"
           "  kvlab calc qwen3-8b --context 32k --kv-quant int4-g32+0-1=int8+35=none   # per layer: '+' items\n"
           "  kvlab calc smollm2-135m --context 8k   # a GGUF: header only, with the file's own weight bytes")


def add_arguments(q: argparse.ArgumentParser) -> None:
    q.add_argument("model", help=MODEL_HELP)
    q.add_argument("--context", help="context length: 131072, 128k, 1m (default: the model's max positions)")
    q.add_argument("--batch", type=int, default=1)
    q.add_argument("--no-kv-sharing", action="store_true",
                   help="price the same model with every layer producing and storing its own K/V")
    add_price_dtype_and_json(q)
    add_kv_dtype(q)


def gguf_weights(spec: str) -> dict[str, Any] | None:
    """The GGUF file's own weight bytes and tensor types (header only), or None when ``spec`` is not a GGUF."""
    if is_named(spec):  # also a preset (gemma-3-270m): the file's row when its package is installed
        try:
            spec = str(model_file(spec))
        except ValueError:
            if spec in presets():
                return None
            raise
    return weight_bytes(spec) if is_gguf(spec) else None


QUANT_FIELDS = ("kv_cache_bytes", "kv_components", "kv_bytes_per_token", "kv_bytes_per_token_window",
                "kv_read_bytes_per_step", "kv_state_bytes")


def quant_rows(plain, quant) -> list[list[str]]:
    """The KV figures unquantized and quantized side by side (calc's second table)."""
    def row(label: str, a: int, b: int) -> list[str]:
        return [label, fmt_bytes(a), fmt_bytes(b), f"{b / a:.3f}x" if a else "-", f"{b:,}"]

    rows = [row("KV cache", plain.kv_cache_bytes, quant.kv_cache_bytes)]
    rows += [row(f"  {k.replace('_', ' ')}", v, quant.kv_components.get(k, 0)) for k, v in plain.kv_components.items()]
    rows += [row("KV bytes/token, full-attention layers", plain.kv_bytes_per_token, quant.kv_bytes_per_token),
             row("KV bytes/token, window layers", plain.kv_bytes_per_token_window, quant.kv_bytes_per_token_window),
             row("K/V read per decode step", plain.kv_read_bytes_per_step, quant.kv_read_bytes_per_step)]
    return rows


def run(args: argparse.Namespace) -> int:
    kv_dtype, kv_quant = one_kv_format(args, "calc")
    cfg = resolve_config(args.model)
    ctx = context_or_default(args.context, cfg)
    dtype = parse_price_dtype(args.dtype)
    sharing = kv_sharing_report(cfg, ctx, dtype, args.batch, kv_dtype) if shared_layers(cfg) else None
    if args.no_kv_sharing:
        cfg = without_sharing(cfg)
    c = costs_of(cfg, ctx, dtype, args.batch, kv_dtype, kv_quant)
    plain = costs_of(cfg, ctx, dtype, args.batch, kv_dtype) if kv_quant else None  # the same cache unquantized
    gguf = gguf_weights(args.model)  # a GGUF file (or named model): its own quantized bytes, from the header
    if args.json:
        unq = None if plain is None else {k: getattr(plain, k) for k in QUANT_FIELDS}
        resident = (gguf["weight_bytes"] if gguf is not None else c.weights_bytes) + c.kv_cache_bytes
        emit_json({**c.to_dict(), "resident_bytes": resident, "source": cfg.source, "kv_sharing": sharing,
                    "kv_sharing_off": bool(args.no_kv_sharing), "gguf": gguf, "kv_unquantized": unq})
        return 0
    print(f"{c.name}: context {ctx:,} tokens ({fmt_context(ctx)}), batch {c.batch}, weights {c.dtype}, "
          f"KV {c.kv_dtype}" + (f" quantized {c.kv_quant}" if kv_quant else "")
          + (", KV sharing OFF (every layer stores its own K/V)" if args.no_kv_sharing else ""))
    if cfg.source:
        print(f"source: {cfg.source}")
    read = c.weight_read_bytes_per_step + c.kv_read_bytes_per_step
    weights = gguf["weight_bytes"] if gguf is not None else c.weights_bytes  # a GGUF file: as stored
    resident = weights + c.kv_cache_bytes
    avg = c.kv_cache_bytes / (ctx * c.batch)
    parts = c.kv_components  # csa / hca / mla cache components, summed over the layers
    owners: dict[str, set[str]] = {}  # component -> the attention kinds holding it
    for lc in c.per_layer:
        for k in lc.kv_components:
            owners.setdefault(k, set()).add(lc.kind.split()[0])
    rows = [
        ["parameters, total", fmt_count(c.params_total), f"{c.params_total:,}"],
        ["parameters, embedding", fmt_count(c.params_embedding), f"{c.params_embedding:,}"],
        *([["parameters, PLE table (a lookup, no FLOPs)", fmt_count(c.params_ple_table), f"{c.params_ple_table:,}"],
           ["parameters, PLE all (table, projection, gates)", fmt_count(c.params_ple), f"{c.params_ple:,}"]]
          if c.params_ple_table else []),
        ["parameters, active per token", fmt_count(c.params_active), f"{c.params_active:,}"],
        *([["parameters, mHC maps (fp32)", fmt_count(c.params_mhc), f"{c.params_mhc:,}"]] if c.params_mhc else []),
        ["KV cache", fmt_bytes(c.kv_cache_bytes), f"{c.kv_cache_bytes:,}"],
        *[[f"  {k.replace('_', ' ')} ({'/'.join(sorted(owners[k]))})", fmt_bytes(v), f"{v:,}"]
          for k, v in parts.items()],
        ["KV bytes/token, full-attention layers", fmt_bytes(c.kv_bytes_per_token), f"{c.kv_bytes_per_token:,}"],
        ["KV bytes/token, window layers (up to window)", fmt_bytes(c.kv_bytes_per_token_window),
         f"{c.kv_bytes_per_token_window:,}"],
        ["KV bytes/token, average at this context", fmt_bytes(avg), f"{avg:,.1f}"],
        ["resident memory (weights + K/V + state)", fmt_bytes(resident), f"{resident:,}"],
        [f"  weights ({'as stored in the GGUF file' if gguf is not None else c.dtype})", fmt_bytes(weights),
         f"{weights:,}"],
        ["  K/V" + (" and constant state" if c.kv_state_bytes else ""), fmt_bytes(c.kv_cache_bytes),
         f"{c.kv_cache_bytes:,}"],
        *([["    of which constant state", fmt_bytes(c.kv_state_bytes), f"{c.kv_state_bytes:,}"]]
          if c.kv_state_bytes else []),
        ["bytes read per decode step", fmt_bytes(read), f"{read:,}"],
        ["  weights", fmt_bytes(c.weight_read_bytes_per_step), f"{c.weight_read_bytes_per_step:,}"],
        ["  K/V", fmt_bytes(c.kv_read_bytes_per_step), f"{c.kv_read_bytes_per_step:,}"],
        ["FLOPs per token (decode at context)", fmt_flops(c.flops_per_token), f"{c.flops_per_token:,}"],
        ["  attention", fmt_flops(c.attn_flops_per_token), f"{c.attn_flops_per_token:,}"],
        *[[f"    {k.replace('_', ' ')}", fmt_flops(v), f"{v:,}"] for k, v in c.attn_flops_components.items()],
        ["  other (matmuls)", fmt_flops(c.other_flops_per_token), f"{c.other_flops_per_token:,}"],
        *([["    of which mHC", fmt_flops(c.mhc_flops_per_token), f"{c.mhc_flops_per_token:,}"]]
          if c.mhc_flops_per_token else []),
        ["prefill FLOPs (whole context)", fmt_flops(c.prefill_flops), f"{c.prefill_flops:,}"],
        ["  attention", fmt_flops(c.prefill_attn_flops), f"{c.prefill_attn_flops:,}"],
    ]
    if gguf is not None:
        types = ", ".join(f"{k} x{v}" for k, v in gguf["tensor_types"].items())
        rows += [["weights in the GGUF file (as stored)", fmt_bytes(gguf["weight_bytes"]), f"{gguf['weight_bytes']:,}"],
                 ["  bits per weight; tensor types", f"{gguf['bits_per_weight']:.2f}", types]]
    print(table(["quantity", "value", "exact"], rows))
    if plain is not None:
        print(f"\nKV quantized as {c.kv_quant} beside unquantized {c.kv_dtype}")
        print(table(["quantity", c.kv_dtype, c.kv_quant, "ratio", "exact"], quant_rows(plain, c)))
    if sharing is not None:
        print(f"\nKV sharing: {len(sharing['shared_layers'])} of {sharing['num_layers']} layers read another layer's "
              f"K/V ({', '.join(f'{i}<-{j}' for i, j in sharing['sources'].items())})")
        def both(n: int) -> str:
            return f"{fmt_bytes(n)} = {n / 1e9:.2f} GB"

        srows = [[r["assumption"], both(r["without_sharing"]), both(r["with_sharing"]), both(r["saved"]),
                  f"{100 * r['saved_fraction']:.1f}%"] for r in sharing["rows"]]
        print(table(["KV cache, assumption", "without sharing", "with sharing", "saved", "saved %"], srows))
        print("  the first row is what kvlab allocates (and this table's KV cache line"
              + (" without sharing" if args.no_kv_sharing else "") + "); published savings "
              "(e.g. ~2.7 GB for Gemma 4 E2B at 128K) use a simplified row")
    print("\nassumptions:")
    for a in c.assumptions:
        print(f"  - {a}")
    return 0
