"""``kvlab fit``: the largest context (or batch) that fits a memory budget, what it holds, how fast it runs."""

from __future__ import annotations

import argparse
from typing import Any

from kvlab.cli.common import KV_QUANT_HELP, MODEL_HELP, add_json, emit_json, one_kv_format, report, resolve_config
from kvlab.engines import ENGINES
from kvlab.fit import BUDGETS_GIB, describe, fit, gguf_weights
from kvlab.hardware import HARDWARE_NAMES, get_hardware, roofline
from kvlab.units import fmt_bytes, fmt_context, parse_context, parse_memory, table

NAME = "fit"
HELP = ("largest context for a batch (or largest batch for a context) that fits a memory budget: weights, K/V by "
        "component, per-sequence state and workspace listed apart; --engine prices what a serving engine reserves, "
        "--tp one device of a tensor-parallel group, --hardware a roofline of decode and prefill speed")
EXAMPLE = ("kvlab fit gemma-4-31b --memory 80GiB --batch 1 --engine vllm --hardware h100\n"
           "  kvlab fit llama-3.1-8b --memory 24GiB --kv-quant int4-g32-r128   # an int4 cache with its scales")


def add_arguments(q: argparse.ArgumentParser) -> None:
    q.add_argument("model", help=MODEL_HELP)
    q.add_argument("--memory", help="memory of one device: 80GiB, 80G (binary), 24GB (decimal) (default: the "
                                    "--hardware's memory)")
    how = q.add_mutually_exclusive_group()
    how.add_argument("--batch", type=int, help="sequences; the answer is the largest context (default 1)")
    how.add_argument("--context", help="context length (131072, 128k); the answer is the largest batch")
    q.add_argument("--weights-dtype", help="bf16, fp16, fp32, fp8, int8 (default: the checkpoint's stored dtype, else bf16; a .gguf file or named model: "
                                            "the file's own quantized tensor bytes)")
    q.add_argument("--kv-dtype", help="K/V cache dtype: bf16, fp16, fp32 (default: the weights dtype, bf16 for 8-bit "
                                       "weights), or a quantized format as --kv-quant")
    q.add_argument("--kv-quant", help=KV_QUANT_HELP)
    q.add_argument("--tp", type=int, default=1, help="tensor-parallel devices; figures are per device (default 1)")
    q.add_argument("--engine", help=f"price what a serving engine reserves: {', '.join(ENGINES)}")
    q.add_argument("--hardware", help=f"roofline of decode/prefill speed: {', '.join(HARDWARE_NAMES)} (measured: "
                                      "this machine, as kvlab bench measures it)")
    q.add_argument("--chunk", type=int, default=512, help="prefill chunk of the workspace estimate (default 512)")
    q.add_argument("--table", action="store_true", help="the answer at 24 / 48 / 80 / 141 GiB")
    add_json(q)


def _answer(r: Any) -> str:
    what = "context" if r.solve == "context" else "batch"
    if r.value == 0:
        need = fmt_bytes(r.next.total_bytes) if r.next else "more"
        return (f"does not fit: one {'token' if what == 'context' else 'sequence'} already needs {need} > usable "
                f"{fmt_bytes(r.usable)}")
    if r.limited_by == "max_positions":
        return f"largest context: {r.value:,} ({fmt_context(r.value)}) — the model's max positions; it all fits"
    unit = "tokens" if what == "context" else "sequences"
    return (f"largest {what}: {r.value:,} {unit}; {r.value + 1:,} does not fit ({fmt_bytes(r.next.total_bytes, True)}"
            f" > usable {fmt_bytes(r.usable, True)})")


def _rows(fp: Any, r: Any) -> list[list[str]]:
    rows = [[label, fmt_bytes(b)] for label, b in describe(fp)]
    if fp.engine_kv_bytes is not None:
        rows.append(["physical total", fmt_bytes(fp.physical_bytes)])
    rows.append([f"total ({fp.engine} reservation)" if fp.engine else "total", fmt_bytes(fp.total_bytes)])
    rows.append(["usable", fmt_bytes(r.usable) + (f" ({r.usable / r.memory:.2f} x {fmt_bytes(r.memory)})"
                                                 if r.usable != r.memory else "")])
    return rows


def run(args: argparse.Namespace) -> int:
    kv_dtype, kv_quant = one_kv_format(args, "fit")  # --kv-dtype int8 is a quantized format, as in calc
    cfg = resolve_config(args.model)
    gguf = gguf_weights(args.model) if args.weights_dtype is None else None
    wd = args.weights_dtype or cfg.dtype or "bf16"
    kv = kv_dtype or ("float16" if gguf else None)
    w_bytes = gguf["weight_bytes"] if gguf else None
    spec = args.model if gguf else cfg  # fit reads the file's weight bytes itself
    hw = get_hardware(args.hardware, "float32" if wd in ("fp32", "float32") else "bfloat16") if args.hardware else None
    if args.memory is not None:
        memory = parse_memory(args.memory)
    elif hw is not None:
        memory = hw.memory
    elif not args.table:
        raise ValueError("--memory: give the memory of one device (80GiB, 24GB ...) or a --hardware")
    context = parse_context(args.context) if args.context is not None else None
    kw = {"batch": args.batch if context is None else None, "context": context, "weights_dtype": args.weights_dtype,
          "kv_dtype": kv_dtype, "tp": args.tp, "engine": args.engine, "chunk": args.chunk, "kv_quant": kv_quant}
    out = report(args)
    data: dict[str, Any] = {"model": cfg.name}
    if args.table:
        mems = [g * 1024**3 for g in BUDGETS_GIB]
        results = [fit(spec, m, **kw) for m in mems]
        data["table"] = [x.to_dict() for x in results]
        first = results[0]
        what = "context" if first.solve == "context" else "batch"
        given = f"batch {args.batch or 1}" if what == "context" else f"context {context:,}"
        print(f"{cfg.name}: largest {what} per device memory ({given}, weights {first.weights_dtype}, K/V "
              f"{first.kv_dtype}{f' quantized {first.kv_quant}' if kv_quant else ''}{f', tp {args.tp}' if args.tp > 1 else ''}"
              f"{f', {args.engine} reservation' if args.engine else ''})", file=out)
        rows = []
        for r in results:
            fp = r.fits
            row = [fmt_bytes(r.memory), f"{r.value:,}" + (" (max)" if r.limited_by == "max_positions" else "")]
            if fp is None:
                row += ["-"] * (6 if args.engine else 5)
            else:
                row += [fmt_bytes(fp.weights_bytes), fmt_bytes(fp.kv_bytes), fmt_bytes(fp.state_bytes),
                        fmt_bytes(fp.workspace_bytes)]
                if args.engine:
                    row.append(fmt_bytes(fp.engine_kv_bytes))
                row.append(fmt_bytes(fp.total_bytes))
            if hw is not None and fp is not None:
                rl = roofline(cfg, hw, fp.context, fp.batch, wd, kv, args.tp, args.chunk, w_bytes, kv_quant)
                row.append(f"{rl.decode_tok_s_per_sequence:,.1f} ({rl.decode_bound})")
            rows.append(row)
        heads = ["memory", f"largest {what}", "weights", "K/V", "state", "workspace"]
        heads += ([f"{args.engine} K/V"] if args.engine else []) + ["total"]
        heads += [f"decode tok/s/seq on {hw.name}"] if hw is not None else []
        print(table(heads, rows), file=out)
        print("\nassumptions:\n" + "\n".join(f"  - {a}" for a in first.assumptions), file=out)
        if args.json:
            emit_json(data)
        return 0

    r = fit(spec, memory, **kw)
    data["fit"] = r.to_dict()
    print(f"{cfg.name} on {fmt_bytes(memory)}{' per device' if args.tp > 1 else ''}: weights {r.weights_dtype}, "
          f"K/V {r.kv_dtype}{f' quantized {r.kv_quant}' if kv_quant else ''}, " + (f"batch {args.batch or 1}" if r.solve == "context" else f"context {context:,}")
          + (f", tp {args.tp}" if args.tp > 1 else "") + (f", {args.engine}" if args.engine else ""), file=out)
    print(_answer(r), file=out)
    if r.fits is not None:
        fp = r.fits
        print(f"\nheld at {fp.context:,} tokens x {fp.batch} sequence{'s' if fp.batch > 1 else ''}"
              + (f" (one of {args.tp} devices)" if args.tp > 1 else ""), file=out)
        print(table(["", "bytes"], _rows(fp, r)), file=out)
        for note in fp.replication:
            print(f"replicated: {note}", file=out)
        if fp.engine is not None:
            extra = fp.engine_kv_bytes - fp.kv_bytes - fp.state_bytes
            print(f"{fp.engine} reserves {fmt_bytes(fp.engine_kv_bytes)} for K/V where {fmt_bytes(fp.kv_bytes + fp.state_bytes)}"
                  f" are physically needed ({'+' if extra >= 0 else '-'}{fmt_bytes(abs(extra))}): "
                  + "; ".join(fp.engine_details) + "; the rules are under assumptions", file=out)
        if hw is not None:
            rl = roofline(cfg, hw, fp.context, fp.batch, wd, kv, args.tp, args.chunk, w_bytes, kv_quant)
            data["roofline"] = rl.to_dict()
            pre = "not priced" if rl.prefill_s is None else f"{rl.prefill_s:,.2f} s ({rl.prefill_bound}-bound)"
            print(f"\nroofline on {hw.label}: decode {rl.decode_tok_s_per_sequence:,.1f} tok/s per sequence, "
                  f"{rl.decode_tok_s_aggregate:,.1f} tok/s aggregate ({rl.decode_bound}-bound, "
                  f"{fmt_bytes(rl.decode_bytes)} read per step); prefill of the batch: {pre}", file=out)
            r.assumptions += rl.assumptions
    print("\nassumptions:\n" + "\n".join(f"  - {a}" for a in r.assumptions), file=out)
    if args.json:
        data["fit"]["assumptions"] = r.assumptions
        emit_json(data)
    return 0
