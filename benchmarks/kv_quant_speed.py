"""Decode speed of quantized K/V caches against the unquantized ones, measured side by side (not part of CI).

For each shape and context: one fp32 prefill (random ids, chunks of 512); the other caches (bf16 model and cache;
int8 / int4 caches of the fp32 model) are filled with that prefill's K/V through their stores' ``append`` (a
quantized store quantizes on write), which saves a prefill per format: a decode step's cost does not depend on
the values. Then decode steps run round-robin over every (format, path) so machine load hits each alike; a
quantized cache is stepped both ways on the same cache: ``dense`` (every step dequantizes whole buffers, as
kvlab did before the blocked decode: ``kvlab.cache.quant.DECODE_BLOCK_BYTES = 0``) and ``blocked`` (the default:
dequantized block by block inside attention, kvlab/layers/blocked.py).

    python benchmarks/kv_quant_speed.py benchmarks/qwen3-100m.json benchmarks/gemma4-e2b-small.json \\
        --context 4k,16k --decode-tokens 24 [--blocks 1024,4096] [--profile int8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from kvlab.bench import machine_info, resolve_spec
from kvlab.cache import quant
from kvlab.cache.storage import WindowKV
from kvlab.model import Model
from kvlab.units import fmt_context, parse_contexts, table


def fill(src, dst, ctx: int, dtype: torch.dtype) -> None:
    """Write the K/V positions ``0..ctx-1`` held by cache ``src`` (plain) into cache ``dst`` through its stores."""
    for s, d in zip(src.layers, dst.layers, strict=True):
        if s is None:
            continue
        rk, rv = s.buf.rows_k, s.buf.rows_v
        if isinstance(s, WindowKV):
            cap = rk.capacity
            held = min(ctx, cap)
            slots = torch.arange(ctx - held, ctx) % cap
            k, v, start = rk.read()[..., slots, :], rv.read()[..., slots, :], ctx - held
        else:
            k, v, start = rk.read(ctx), rv.read(ctx), 0
        d.append(k.to(dtype), v.to(dtype), start)
    dst.seq_len = ctx


def run_shape(spec: str, contexts: list[int], steps: int, formats: list[str], profile: str | None,
              blocks: list[int]) -> list[dict]:
    cfg = resolve_spec(spec)
    models = {torch.float32: Model.from_config(cfg, dtype=torch.float32, seed=0).eval()}
    if "bf16" in formats:
        models[torch.bfloat16] = Model.from_config(cfg, dtype=torch.bfloat16, seed=0).eval()
    rows = []
    for ctx in contexts:
        runs = []  # (label, path, model, cache)
        max_length = ctx + (2 + len(blocks)) * (steps + 2) + 8
        ids = torch.randint(0, cfg.vocab_size, (1, ctx), generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            base = models[torch.float32].new_cache(1, max_length)
            t0 = time.perf_counter()
            for s in range(0, ctx, 512):
                models[torch.float32](ids[:, s:s + 512], cache=base, last_only=True)
            print(f"{cfg.name} {fmt_context(ctx)}: prefill {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            for f in formats:
                if f in ("fp32", "bf16"):
                    dt = torch.float32 if f == "fp32" else torch.bfloat16
                    cache = base if f == "fp32" else models[dt].new_cache(1, max_length)
                    if f != "fp32":
                        fill(base, cache, ctx, dt)
                    runs.append((f, "-", models[dt], cache))
                else:
                    cache = models[torch.float32].new_cache(1, max_length, kv_quant=f)
                    fill(base, cache, ctx, torch.float32)
                    runs.append((f, "dense", models[torch.float32], cache))
                    runs += [(f, f"blocked {b >> 10} KiB", models[torch.float32], cache) for b in blocks]
            times: dict[tuple[str, str], list[float]] = {(r[0], r[1]): [] for r in runs}
            tok = ids[:, -1:]
            block = quant.DECODE_BLOCK_BYTES
            for i in range(steps + 2):  # round-robin; the first two rounds are warm-up
                for label, path, model, cache in runs:
                    quant.DECODE_BLOCK_BYTES = 0 if path == "dense" else int(path.split()[1]) << 10 if " " in path \
                        else block
                    t1 = time.perf_counter()
                    model.decode_step(tok, cache)
                    dt_s = time.perf_counter() - t1
                    if i >= 2:
                        times[(label, path)].append(dt_s)
            quant.DECODE_BLOCK_BYTES = block
            if profile:
                from torch.profiler import ProfilerActivity
                from torch.profiler import profile as prof

                for label, path, model, cache in runs:
                    if label != profile or not path.startswith("blocked"):
                        continue
                    quant.DECODE_BLOCK_BYTES = int(path.split()[1]) << 10
                    with prof(activities=[ProfilerActivity.CPU]) as p:
                        for _ in range(3):
                            model.decode_step(tok, cache)
                    print(f"\nprofile: {cfg.name} {fmt_context(ctx)} {label} {path}, 3 steps", file=sys.stderr)
                    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=18), file=sys.stderr)
        ref = statistics.median(times[("fp32", "-")]) if ("fp32", "-") in times else None
        for (label, path), ts in times.items():
            med = statistics.median(ts)
            rows.append({"model": cfg.name, "context": ctx, "kv": label, "path": path, "steps": len(ts),
                         "step_ms_median": med * 1e3, "decode_tok_s": 1 / med,
                         "step_ms_spread": [min(ts) * 1e3, max(ts) * 1e3],
                         "vs_fp32": None if ref is None else ref / med,
                         "cache_bytes": next(r[3] for r in runs if r[0] == label).nbytes()})
        del runs, base
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shapes", nargs="+")
    ap.add_argument("--context", default="4k,16k")
    ap.add_argument("--decode-tokens", type=int, default=24)
    ap.add_argument("--formats", default="fp32,bf16,int8,int4")
    ap.add_argument("--profile", help="a format to profile (blocked paths) after the timed steps")
    ap.add_argument("--blocks", default=str(quant.DECODE_BLOCK_BYTES >> 10),
                    help="comma-separated block sizes in KiB to step quantized caches with (default: kvlab's)")
    ap.add_argument("--json", help="write the rows to this file")
    a = ap.parse_args()
    formats = [f.strip() for f in a.formats.split(",")]
    rows = []
    for s in a.shapes:
        rows += run_shape(s, parse_contexts(a.context), a.decode_tokens, formats, a.profile,
                          [int(b) << 10 for b in a.blocks.split(",")])
    print(table(["model", "context", "KV cache", "decode path", "tok/s", "step ms (median)", "min-max ms",
                 "vs fp32", "cache"],
                [[r["model"], fmt_context(r["context"]), r["kv"], r["path"], f"{r['decode_tok_s']:.2f}",
                  f"{r['step_ms_median']:.1f}", f"{r['step_ms_spread'][0]:.0f}-{r['step_ms_spread'][1]:.0f}",
                  "-" if r["vs_fp32"] is None else f"{r['vs_fp32']:.2f}x", f"{r['cache_bytes'] / 2**20:.1f} MiB"]
                 for r in rows]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "machine": machine_info(), "argv": sys.argv}, f, indent=1)


if __name__ == "__main__":
    main()
