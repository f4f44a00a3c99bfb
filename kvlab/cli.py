"""The ``kvlab`` command line: calc, compare, inspect, generate, bench, presets.

Every verb prints a readable table by default; with ``--json`` the last line printed is one JSON
object. Errors from the library (ValueError) print ``kvlab: error: <message>`` and exit with 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from kvlab.units import (
    fmt_bytes,
    fmt_context,
    fmt_count,
    fmt_flops,
    parse_context,
    parse_contexts,
    parse_dtype,
    table,
)

RAW = argparse.RawDescriptionHelpFormatter


def _config(spec: str) -> Any:
    from kvlab.bench import resolve_spec

    return resolve_spec(spec)


def _costs(cfg: Any, context: int, dtype: str, batch: int = 1) -> Any:
    from kvlab.costs import costs

    return costs(cfg, context=context, dtype=dtype, batch=batch)


def _emit_json(obj: Any) -> None:
    print(json.dumps(obj, default=str))


def _context_or_default(text: str | None, cfg: Any) -> int:
    return parse_context(text) if text is not None else cfg.max_positions


# -- calc ----------------------------------------------------------------------------------------------
def cmd_calc(args: argparse.Namespace) -> int:
    from kvlab.costs import kv_sharing_report
    from kvlab.sharing import shared_layers, without_sharing

    cfg = _config(args.model)
    ctx = _context_or_default(args.context, cfg)
    sharing = kv_sharing_report(cfg, ctx, parse_dtype(args.dtype), args.batch) if shared_layers(cfg) else None
    if args.no_kv_sharing:
        cfg = without_sharing(cfg)
    c = _costs(cfg, ctx, parse_dtype(args.dtype), args.batch)
    if args.json:
        _emit_json({**c.to_dict(), "source": cfg.source, "kv_sharing": sharing,
                    "kv_sharing_off": bool(args.no_kv_sharing)})
        return 0
    print(f"{c.name}: context {ctx:,} tokens ({fmt_context(ctx)}), batch {c.batch}, weights {c.dtype}, "
          f"KV {c.kv_dtype}" + (", KV sharing OFF (every layer stores its own K/V)" if args.no_kv_sharing else ""))
    if cfg.source:
        print(f"source: {cfg.source}")
    read = c.weight_read_bytes_per_step + c.kv_read_bytes_per_step
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
        *[[f"  {k.replace('_', ' ')} ({'mla' if owners[k] == {'mla'} else 'csa/hca'})", fmt_bytes(v), f"{v:,}"]
          for k, v in parts.items()],
        ["KV bytes/token, full-attention layers", fmt_bytes(c.kv_bytes_per_token), f"{c.kv_bytes_per_token:,}"],
        ["KV bytes/token, window layers (up to window)", fmt_bytes(c.kv_bytes_per_token_window),
         f"{c.kv_bytes_per_token_window:,}"],
        ["KV bytes/token, average at this context", fmt_bytes(avg), f"{avg:,.1f}"],
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
    print(table(["quantity", "value", "exact"], rows))
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


# -- compare -------------------------------------------------------------------------------------------
def compare_data(models: list[str], contexts: list[int], dtype: str, batch: int = 1) -> dict[str, Any]:
    """KV-cache bytes of each model at each context, and ratios to the first model."""
    out = []
    for spec in models:
        cfg = _config(spec)
        cs = [_costs(cfg, ctx, dtype, batch) for ctx in contexts]
        out.append({"model": spec, "name": cfg.name, "max_positions": cfg.max_positions,
                    "params_total": cs[0].params_total, "kv_cache_bytes": [c.kv_cache_bytes for c in cs],
                    "kv_read_bytes_per_step": [c.kv_read_bytes_per_step for c in cs],
                    "kv_state_bytes": cs[0].kv_state_bytes,
                    "attn_flops_per_token": [c.attn_flops_per_token for c in cs],
                    "flops_per_token": [c.flops_per_token for c in cs],
                    "kv_components": [c.kv_components for c in cs],
                    "attn_flops_components": [c.attn_flops_components for c in cs]})
    first, first_flops = out[0]["kv_cache_bytes"], out[0]["flops_per_token"]
    for m in out:
        m["ratio_to_first"] = [(b / f if f else None) for b, f in zip(m["kv_cache_bytes"], first)]
        m["flops_ratio_to_first"] = [(b / f if f else None) for b, f in zip(m["flops_per_token"], first_flops)]
    return {"dtype": dtype, "batch": batch, "contexts": contexts, "models": out}


def plot_compare(data: dict[str, Any], path: str | Path) -> Path:
    """Log-log plot of KV-cache bytes against context, one line per model; written to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ctx = data["contexts"]
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    styles = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D")]
    for i, m in enumerate(data["models"]):
        ls, mk = styles[i % len(styles)]
        ax.plot(ctx, m["kv_cache_bytes"], linestyle=ls, marker=mk, label=m["name"])
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
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def cmd_compare(args: argparse.Namespace) -> int:
    contexts = parse_contexts(args.context)
    data = compare_data(args.models, contexts, parse_dtype(args.dtype), args.batch)
    if args.plot:
        data["plot"] = str(plot_compare(data, args.plot))
    if args.json:
        _emit_json(data)
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
    print(f"KV cache ({data['dtype']}, batch {data['batch']})")
    print(table(heads, rows, left=1))
    print(f"\nratio to {data['models'][0]['name']}")
    print(table(heads, ratios, left=1))
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
    return 0


# -- inspect -------------------------------------------------------------------------------------------
def cmd_inspect(args: argparse.Namespace) -> int:
    cfg = _config(args.model)
    ctx = _context_or_default(args.context, cfg)
    c = _costs(cfg, ctx, parse_dtype(args.dtype), args.batch)
    layers = [dict(vars(x)) for x in c.per_layer]
    if args.json:
        _emit_json({"name": c.name, "context": ctx, "dtype": c.dtype, "batch": c.batch,
                    "kv_cache_bytes": c.kv_cache_bytes, "params_total": c.params_total, "layers": layers})
        return 0
    print(f"{c.name}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}; "
          f"context {ctx:,} ({fmt_context(ctx)}), {c.kv_dtype} K/V, batch {c.batch}")
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
    return 0


# -- generate ------------------------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    import kvlab
    from kvlab.bench import TORCH_DTYPES, is_checkpoint

    if not is_checkpoint(args.model):
        raise ValueError(f"{args.model!r} is not a checkpoint directory (config.json + *.safetensors)")
    from kvlab.checkpoint import load_tokenizer

    tok = load_tokenizer(args.model)
    if args.ids:
        try:
            ids = [int(x) for x in args.ids.split(",") if x.strip()]
        except ValueError as e:
            raise ValueError(f"--ids {args.ids!r}: expected integers separated by commas, e.g. 1,2,3") from e
        if not ids:
            raise ValueError("--ids is empty")
    elif tok is None:
        raise ValueError(f"{args.model!r} has no tokenizer.json; pass token ids with --ids 1,2,3")
    elif args.prompt is None:
        raise ValueError("give a --prompt (or token ids with --ids)")
    else:
        ids = tok.encode(args.prompt).ids
    model = kvlab.load(args.model, dtype=TORCH_DTYPES[parse_dtype(args.dtype)], device=args.device)
    input_ids = torch.tensor([ids], dtype=torch.long, device=args.device)
    stop = [int(x) for x in args.stop.split(",")] if args.stop else None
    new: list[int] = []
    shown = ""

    def on_token(*cb_args: Any, **_: Any) -> None:
        nonlocal shown
        t = cb_args[-1] if cb_args else None
        if isinstance(t, torch.Tensor):
            new.append(int(t.reshape(-1)[0]))
        elif isinstance(t, int):
            new.append(t)
        else:
            return
        if tok is not None:
            text = tok.decode(new)
            if not text.endswith("\ufffd"):  # wait for a whole character
                print(text[len(shown):], end="", flush=True)
                shown = text
        else:
            print(f"{new[-1]} ", end="", flush=True)

    t0 = time.perf_counter()
    out = kvlab.generate(model, input_ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_tokens=stop,
                         callback=on_token if args.stream and not args.json else None)
    dt = time.perf_counter() - t0
    gen = out[0, len(ids):].tolist()
    text = tok.decode(gen) if tok is not None else None
    if args.json:
        _emit_json({"prompt_ids": ids, "output_ids": gen, "text": text, "seconds": dt,
                    "tokens_per_s": len(gen) / dt if dt > 0 else None})
        return 0
    if args.stream:
        print()
    elif text is not None:
        print((args.prompt or "") + text)
    else:
        print(",".join(map(str, gen)))
    print(f"[{len(gen)} tokens in {dt:.2f} s, {len(gen) / dt:.1f} tok/s]", file=sys.stderr)
    return 0


# -- bench ---------------------------------------------------------------------------------------------
def cmd_bench(args: argparse.Namespace) -> int:
    from kvlab.bench import format_card, run_bench

    r = run_bench(args.model, parse_contexts(args.context), decode_tokens=args.decode_tokens, dtype=args.dtype,
                  threads=args.threads, vs=args.vs, batch=args.batch, prefill_chunk=args.prefill_chunk,
                  weight_budget=int(args.max_weight_gib * 1024**3), bandwidth_bytes=args.bandwidth_mib * 1024**2,
                  progress=not args.no_progress)
    print(format_card(r))
    if args.json:
        _emit_json(r)
    return 0


# -- train ---------------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from kvlab.train import load_config, train

    cfg = load_config(args.config)  # validated before anything is built or written
    if args.steps is not None:
        if args.steps < 1:
            raise ValueError(f"--steps {args.steps}: must be >= 1")
        cfg.train.steps = args.steps
    if args.seed is not None:
        cfg.train.seed = args.seed
    if args.device is not None:
        cfg.train.device = args.device
    for k in ("steps", "seed", "device"):  # the run directory's train_config.json records the overrides
        if getattr(args, k) is not None:
            cfg.raw["train"][k] = getattr(args, k)
    out = args.out or cfg.out or str(Path("runs") / Path(args.config).stem)
    r = train(cfg, out=out, resume=args.resume, progress=not args.no_progress and not args.json).summary
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports (lines would interleave)
        return 0
    if args.json:
        _emit_json(r)
        return 0
    ev = r["eval"] or {}
    rows = [["model", f"{r['model']} ({fmt_count(r['params'])} parameters)"],
            ["task", f"{r['task']}, seq_len {r['seq_len']}, global batch {r['global_batch']}"],
            ["steps", f"{r['steps']} ({r['steps_this_run']} this run, from step {r['resumed_from']})"],
            ["processes", str(r["processes"])],
            ["final train loss", f"{r['final_loss']:.4f}"],
            ["eval loss / accuracy", f"{ev['eval_loss']:.4f} / {ev['eval_accuracy']:.3f}" if ev else "-"],
            ["tokens/s", f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "-"],
            ["checkpoint", str(r["checkpoint"])]]
    print(table(["run", str(r["out"])], rows, align="ll"))
    return 0


# -- ablate --------------------------------------------------------------------------------------------
def cmd_ablate(args: argparse.Namespace) -> int:
    from kvlab.train.ablate import dry_run, format_dry_run, format_table, load_sweep, preset_path, run_sweep
    from kvlab.train.config import read_file

    if (args.sweep is None) == (args.preset is None):
        raise ValueError("give a sweep file or --preset NAME (one of them)")
    path = preset_path(args.preset) if args.preset else args.sweep
    raw = read_file(path)
    if args.dry_run:  # parse, build and parameter-match every variant; train nothing
        r = dry_run(path)
        if args.json:
            _emit_json(r)
            return 0
        print(format_dry_run(r))
        return 0
    load_sweep(path)  # every variant built and parameter-matched before anything trains
    name = args.preset or Path(args.sweep).stem
    out = args.out or raw.get("out") or str(Path("runs") / ("ablate-" + name.removeprefix("sweep-")))
    r = run_sweep(raw, out=out, progress=not args.no_progress and not args.json, jobs=args.jobs)
    if args.plot:
        from kvlab.train.ablate import plot_sweep

        r["plot"] = str(plot_sweep(r, args.plot))
    if args.markdown:
        Path(args.markdown).write_text(format_table(r, markdown=True) + "\n")
    if args.json:
        _emit_json(r)
        return 0
    print(format_table(r))
    print(f"\n{len(r['rows'])} variants x {len(r['seeds'])} seeds in {r['wall_s']:.0f} s ({r['jobs']} at a time)")
    return 0


# -- presets -------------------------------------------------------------------------------------------
def cmd_presets(args: argparse.Namespace) -> int:
    from kvlab.presets import get_preset, presets

    rows = []
    for name in presets():
        cfg = get_preset(name)
        rows.append({"name": name, "layers": cfg.num_layers, "hidden": cfg.hidden_size,
                     "max_positions": cfg.max_positions, "source": cfg.source})
    if args.json:
        _emit_json({"presets": rows})
        return 0
    print(table(["preset", "layers", "hidden", "max positions", "source"],
                [[r["name"], r["layers"], r["hidden"], fmt_context(r["max_positions"]), r["source"][:70]]
                 for r in rows], align="lrrrl"))
    return 0


# -- parser --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvlab", formatter_class=RAW,
                                description="KV-cache calculator, inspector, generator and benchmark.",
                                epilog="Example:\n  kvlab calc llama-3.1-8b --context 128k\n"
                                       "  kvlab <verb> --help   (each verb shows its own example)")
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    model_help = "preset name (see `kvlab presets`), checkpoint directory, or kvlab ModelConfig .json file"

    def verb(name: str, helptext: str, example: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=helptext, description=helptext, formatter_class=RAW,
                              epilog=f"Example:\n  {example}")

    def common(q: argparse.ArgumentParser, dtype: str = "bf16", json_help: str = "print one JSON object") -> None:
        q.add_argument("--dtype", default=dtype, help=f"bf16, fp16 or fp32 (default {dtype})")
        q.add_argument("--json", action="store_true", help=json_help)

    q = verb("calc", "parameters, KV-cache bytes, bytes read per step and FLOPs of one model at one context",
             "kvlab calc llama-3.1-8b --context 128k --dtype bf16")
    q.add_argument("model", help=model_help)
    q.add_argument("--context", help="context length: 131072, 128k, 1m (default: the model's max positions)")
    q.add_argument("--batch", type=int, default=1)
    q.add_argument("--no-kv-sharing", action="store_true",
                   help="price the same model with every layer producing and storing its own K/V")
    common(q)
    q.set_defaults(func=cmd_calc)

    q = verb("compare", "KV-cache bytes of several models over several contexts, with ratios and a plot",
             "kvlab compare llama-3.1-8b gemma-4-e2b --context 8k,32k,128k,1m --plot out/compare.png")
    q.add_argument("models", nargs="+", help=model_help)
    q.add_argument("--context", default="8k,32k,128k,1m", help="comma-separated lengths (default 8k,32k,128k,1m)")
    q.add_argument("--batch", type=int, default=1)
    q.add_argument("--plot", help="write a log-log PNG plot of KV bytes against context here")
    common(q)
    q.set_defaults(func=cmd_compare)

    q = verb("inspect", "per-layer table: kind, heads, head dims, window, KV source, params, KV bytes, "
             "attention FLOPs of a decode step and of prefill",
             "kvlab inspect gemma-4-e2b --context 128k")
    q.add_argument("model", help=model_help)
    q.add_argument("--context", help="context length (default: the model's max positions)")
    q.add_argument("--batch", type=int, default=1)
    common(q)
    q.set_defaults(func=cmd_inspect)

    q = verb("generate", "generate text from a checkpoint directory (greedy at temperature 0)",
             'kvlab generate ./ckpt --prompt "The capital of France is" --max-new-tokens 16 --stream')
    q.add_argument("model", help="checkpoint directory (config.json + safetensors [+ tokenizer.json])")
    q.add_argument("--prompt", help="text prompt (needs tokenizer.json in the directory)")
    q.add_argument("--ids", help="prompt as token ids, e.g. 1,2,3 (no tokenizer needed)")
    q.add_argument("--max-new-tokens", type=int, default=32)
    q.add_argument("--temperature", type=float, default=0.0)
    q.add_argument("--top-k", type=int)
    q.add_argument("--top-p", type=float)
    q.add_argument("--seed", type=int)
    q.add_argument("--stop", help="stop token ids, comma-separated")
    q.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    q.add_argument("--device", default="cpu")
    common(q, dtype="fp32", json_help="print one JSON object with the ids, text and speed")
    q.set_defaults(func=cmd_generate)

    q = verb("bench", "prefill/decode throughput, memory, measured vs calculated cache bytes, bandwidth use",
             "kvlab bench llama-3.1-8b --context 1k,4k --decode-tokens 32 --json\n"
             "  kvlab bench ./ckpt --context 4k --vs transformers")
    q.add_argument("model", help=model_help + " (a preset is built with random weights, scaled down to fit)")
    q.add_argument("--context", default="4k", help="comma-separated prompt lengths (default 4k)")
    q.add_argument("--decode-tokens", type=int, default=32)
    q.add_argument("--batch", type=int, default=1)
    q.add_argument("--prefill-chunk", type=int, default=512)
    q.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    q.add_argument("--vs", choices=["transformers"], help="run the same loop in transformers and print ratios")
    q.add_argument("--max-weight-gib", type=float, default=4.0,
                   help="scale a preset down until its weights fit in this many GiB (default 4)")
    q.add_argument("--bandwidth-mib", type=int, default=256,
                   help="buffer size of the copy-bandwidth measurement in MiB (default 256)")
    q.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    common(q, dtype="fp32", json_help="also print all figures as one JSON object on the last line")
    q.set_defaults(func=cmd_bench)

    q = verb("train", "train a small model from scratch (a preset scaled down or a ModelConfig) on synthetic "
             "long-context tasks or local text; atomic checkpoints, exact --resume, data-parallel under torchrun",
             "kvlab train kvlab/train/examples/recall-gqa.toml --out runs/recall --steps 200\n"
             "  kvlab train kvlab/train/examples/recall-gqa.toml --out runs/recall --resume\n"
             "  torchrun --nproc_per_node 2 -m kvlab train CONFIG --out runs/dp   (see docs/training.md)")
    q.add_argument("config", help="training config, JSON or TOML: [model], [task], [train] (docs/training.md)")
    q.add_argument("--out", help="run directory for checkpoints and log.jsonl (default: the config's out, "
                   "else runs/<config name>)")
    q.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    q.add_argument("--steps", type=int, help="override train.steps")
    q.add_argument("--seed", type=int, help="override train.seed")
    q.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override train.device")
    q.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    q.add_argument("--json", action="store_true", help="print one JSON summary object (with the loss of every step)")
    q.set_defaults(func=cmd_train)

    q = verb("ablate", "train parameter-matched variants of one base model over several seeds; table of params, "
             "KV bytes, tokens/s, eval loss and answer accuracy (overall, by distance, by length beyond training; "
             "mean ± std) with Welch's t-test against the baseline",
             "kvlab ablate --preset small --jobs 2 --plot out/ablate-small.png\n"
             "  kvlab ablate --preset small --dry-run   (build and parameter-match every variant, train nothing)\n"
             "  kvlab ablate kvlab/train/examples/sweep-tiny.toml --out runs/ablate-tiny")
    q.add_argument("sweep", nargs="?", help="sweep file, JSON or TOML: base (a training config), variants, seeds, "
                   "probe (kvlab/train/ablate.py)")
    q.add_argument("--preset", help="a built-in sweep by name (kvlab/train/examples/sweep-<name>.toml): small, tiny")
    q.add_argument("--dry-run", action="store_true", help="parse, build and parameter-match every variant (and run "
                   "one forward pass), then stop")
    q.add_argument("--jobs", type=int, default=1, help="runs at a time, each its own process (default 1)")
    q.add_argument("--out", help="directory of the runs (default: the sweep's out, else runs/ablate-<name>)")
    q.add_argument("--plot", help="write a PNG here: accuracy vs KV bytes, loss curves, accuracy by distance and "
                   "by length")
    q.add_argument("--markdown", help="also write the tables as markdown to this file")
    q.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    q.add_argument("--json", action="store_true", help="print one JSON object (rows, per-seed values, probes, "
                   "loss curves)")
    q.set_defaults(func=cmd_ablate)

    q = verb("presets", "list the built-in published configurations", "kvlab presets")
    q.add_argument("--json", action="store_true", help="print one JSON object")
    q.set_defaults(func=cmd_presets)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 usage or input error, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    try:
        return args.func(args) or 0
    except ValueError as e:
        print(f"kvlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kvlab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
