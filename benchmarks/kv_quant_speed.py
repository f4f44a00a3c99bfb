"""Decode speed of quantized K/V caches against the unquantized ones, measured side by side (not part of CI).

For each shape and context, every cache (fp32; bf16 model and cache; int8 / int4 caches of the fp32 model) is
filled with the same random K/V (unit normal) through its stores' ``append`` (a quantized store quantizes on
write) instead of a prefill -- a decode step's cost does not depend on the values, and a 16K prefill per format
would cost minutes (``kvlab bench --kv-dtype`` runs the real prefill). Then decode steps run round-robin over every (format, path) so machine load hits each alike; a
quantized cache is stepped both ways on the same cache: ``before`` (every step dequantizes whole buffers with
:func:`read_before`, ``QuantRows.read`` as it was at commit eb7aabd, before the blocked decode; MLA, CSA/HCA/SWA
and sink-token windows read every buffer so until commit 5eebaba) and ``blocked N KiB``
(dequantized block by block inside attention, kvlab/layers/blocked.py, blocks of N KiB; kvlab's default 4096)
and, with ``--fused``, ``fused`` (int8 / int4 codes attended by one torch.compile kernel, kvlab/layers/fused.py,
where it applies; elsewhere the blocked path); with ``--cpp``, ``C++`` (the hand-written kernel,
kvlab/layers/cpu_attend.py, kvlab's default where it applies; off on every other path); with ``--compile``, each format again through kvlab's compiled decode
step (kvlab/compiled.py, inductor) on caches of its own (``compiled``; quantized: ``compiled blocked`` and, with
``--fused``, ``compiled fused``, a cache made with ``fused=True``; with ``--cpp``, ``compiled C++``), its compiles
in the warm-up rounds.

    python benchmarks/kv_quant_speed.py benchmarks/qwen3-100m.json benchmarks/gemma4-e2b-small.json \\
        --context 4k,16k --decode-tokens 24 [--blocks 1024,4096] [--profile int8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from kvlab.bench import machine_info
from kvlab.cache import quant
from kvlab.compiled import CompiledStep
from kvlab.layers import cpu_attend, fused
from kvlab.model import Model
from kvlab.resolve import resolve_spec
from kvlab.units import fmt_context, parse_contexts, table


def read_before(self, n: int | None = None, rows: slice | None = None) -> torch.Tensor:
    """``QuantRows.read`` at commit eb7aabd (the whole buffer dequantized at once), kept to measure against."""
    cap = self.capacity
    n = cap if n is None else n

    def sl(t):
        t = t if rows is None else t[rows]
        return t.narrow(-2, 0, n)

    c = sl(self.codes)
    c = quant.unpack4(c) if self.spec.bits == 4 else c.view(quant._FP8[self.spec.fmt]) if quant.spec_is_fp8(
        self.spec) else c
    if self.span > 1:
        s = (self.scales if rows is None else self.scales[rows]).repeat_interleave(self.span, -2)[..., :n, :]
        z = None if self.zeros is None else (self.zeros if rows is None else self.zeros[rows]
                                             ).repeat_interleave(self.span, -2)[..., :n, :]
        out = quant.code_values(c, self.spec) * s.float()
        out = out if z is None else out + z.float()
    else:
        g = c.reshape(*c.shape[:-1], self.dq // self.group, self.group)
        out = quant.dequantize(g, sl(self.scales), None if self.zeros is None else sl(self.zeros), self.spec, -1)
        out = out.reshape(c.shape)
    if self.block:
        out = quant.rotate(out, self.block)
    out = out.to(self.dtype)
    if self.residual_slots and self.n:
        p0 = max(self.quantized_end(self.n), self.n - cap)
        if self.n > p0:
            vals = self.res.index_select(-2, self._slots(p0, self.n, out.device, self.residual_slots))
            out.index_copy_(out.dim() - 2, self._slots(p0, self.n, out.device, cap if self.ring else None),
                            vals if rows is None else vals[rows])
    if self.tail_dim:
        out = torch.cat((out, sl(self.tail)), dim=-1)
    return out


def view_before(self, n: int, heads: bool = False) -> torch.Tensor:
    """``QuantRows.view`` on the ``before`` path: the whole buffer dequantized by :func:`read_before`."""
    t = read_before(self, n)
    return t[:, None] if heads else t


def fill(cache, cfg, ctx: int, dtype: torch.dtype) -> None:
    """Write random values (seed 0, the same for every cache) at positions ``0..ctx-1`` of every storing layer:
    K/V (GQA, CCA, sink window), the latent and rotary key (MLA; DSA's indexer keys), the window ring, the
    compressed entries and indexer keys (CSA/HCA/SWA; the partial block left as zeros)."""
    from kvlab.cache.compressed import CompressedStore
    from kvlab.cache.latent import LatentStore

    gen = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    for store, spec in zip(cache.layers, cfg.layers, strict=True):
        if store is None:
            continue
        if isinstance(store, LatentStore):
            m = spec.mla
            store.append(rnd(1, ctx, m.kv_lora_rank), rnd(1, ctx, m.qk_rope_head_dim), 0)
            if store.index_keys is not None:
                store.append_index(rnd(1, ctx, m.index_head_dim), 0)
        elif isinstance(store, CompressedStore):
            store.window.append(rnd(1, 1, ctx, spec.head_dim), rnd(1, 1, ctx, 0), 0)
            for pool in (store.pool, store.index):
                if pool is not None and ctx // pool.ratio:
                    n = ctx // pool.ratio
                    pool.reserve(n)
                    pool.rows.write(0, rnd(1, n, pool.dim))
        else:
            store.append(rnd(1, spec.num_kv_heads, ctx, spec.head_dim), rnd(1, spec.num_kv_heads, ctx, spec.value_dim), 0)
    cache.seq_len = ctx


def run_shape(spec: str, contexts: list[int], steps: int, formats: list[str], profile: str | None,
              blocks: list[int], before: bool = True, with_fused: bool = False, compile: bool = False,
              cpp: bool = False) -> list[dict]:
    cfg = resolve_spec(spec)
    models = {torch.float32: Model.from_config(cfg, dtype=torch.float32, seed=0).eval()}
    if "bf16" in formats:
        models[torch.bfloat16] = Model.from_config(cfg, dtype=torch.bfloat16, seed=0).eval()
    compiled = {dt: CompiledStep(m, "inductor") for dt, m in models.items()} if compile else {}
    rows = []
    for ctx in contexts:
        runs = []  # (label, path, model, cache)
        max_length = ctx + (2 + len(blocks)) * (steps + 2) + 8
        with torch.inference_mode():
            for f in formats:
                if f in ("fp32", "bf16"):
                    dt = torch.float32 if f == "fp32" else torch.bfloat16
                    cache = models[dt].new_cache(1, max_length)
                    fill(cache, cfg, ctx, dt)
                    runs.append((f, "-", models[dt], cache))
                    if compile:  # its own cache, stepped by the compiled decode step only
                        cache = models[dt].new_cache(1, max_length)
                        fill(cache, cfg, ctx, dt)
                        runs.append((f, "compiled", models[dt], cache))
                else:
                    cache = models[torch.float32].new_cache(1, max_length, kv_quant=f)
                    fill(cache, cfg, ctx, torch.float32)
                    if before:
                        runs.append((f, "before", models[torch.float32], cache))
                    runs += [(f, f"blocked {b >> 10} KiB", models[torch.float32], cache) for b in blocks]
                    if with_fused:
                        runs.append((f, "fused", models[torch.float32], cache))
                    if cpp:
                        runs.append((f, "C++", models[torch.float32], cache))
                    lanes = ["compiled blocked"] + ["compiled fused"] * with_fused + ["compiled C++"] * cpp
                    for lane in lanes if compile else ():
                        c = models[torch.float32].new_cache(1, max_length, kv_quant=f, fused=lane == "compiled fused")
                        fill(c, cfg, ctx, torch.float32)
                        runs.append((f, lane, models[torch.float32], c))
            times: dict[tuple[str, str], list[float]] = {(r[0], r[1]): [] for r in runs}
            tok = torch.tensor([[1]])
            block, view, native = quant.DECODE_BLOCK_BYTES, quant.QuantRows.view, cpu_attend.ENABLED
            for i in range(steps + 2):  # round-robin; the first two rounds are warm-up
                for label, path, model, cache in runs:
                    quant.DECODE_BLOCK_BYTES = int(path.split()[1]) << 10 if path.startswith("blocked") else block
                    quant.QuantRows.view = view_before if path == "before" else view
                    fused.ENABLED = path == "fused"
                    cpu_attend.ENABLED = path.endswith("C++")
                    step = compiled[next(p.dtype for p in model.parameters())] if path.startswith("compiled") \
                        else model.decode_step
                    t1 = time.perf_counter()
                    step(tok, cache)
                    dt_s = time.perf_counter() - t1
                    quant.QuantRows.view = view
                    fused.ENABLED = False
                    if i >= 2:
                        times[(label, path)].append(dt_s)
            quant.DECODE_BLOCK_BYTES, cpu_attend.ENABLED = block, native
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
        ref = times.get(("fp32", "-"))
        for (label, path), ts in times.items():
            med = statistics.median(ts)
            paired = None if ref is None else statistics.median(a / b for a, b in zip(ref, ts, strict=True))
            rows.append({"model": cfg.name, "context": ctx, "kv": label, "path": path, "steps": len(ts),
                         "step_ms_median": med * 1e3, "decode_tok_s": 1 / med,
                         "step_ms_spread": [min(ts) * 1e3, max(ts) * 1e3],
                         "vs_fp32": paired,
                         "cache_bytes": next(r[3] for r in runs if r[0] == label).nbytes()})
        del runs
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
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    ap.add_argument("--no-before", action="store_true", help="skip the whole-buffer 'before' path")
    ap.add_argument("--fused", action="store_true",
                    help="also step quantized caches with kvlab/layers/fused.py (torch.compile; its first steps, "
                         "compiling, fall in the warm-up rounds)")
    ap.add_argument("--cpp", action="store_true",
                    help="also step quantized caches with the hand-written C++ kernel (kvlab/layers/cpu_attend.py), "
                         "and with --compile a 'compiled C++' lane; every other path runs with it off")
    ap.add_argument("--compile", action="store_true",
                    help="also step every format through kvlab's compiled decode step (inductor) on caches of its own: "
                         "'compiled' / 'compiled blocked' and, with --fused, 'compiled fused' (a cache made with "
                         "fused=True); the compiles fall in the warm-up rounds")
    ap.add_argument("--json", help="write the rows to this file")
    a = ap.parse_args()
    formats = [f.strip() for f in a.formats.split(",")]
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"load average before: {os.getloadavg()}", file=sys.stderr)
    rows = []
    for s in a.shapes:
        rows += run_shape(s, parse_contexts(a.context), a.decode_tokens, formats, a.profile,
                          [int(b) << 10 for b in a.blocks.split(",")], not a.no_before, a.fused, a.compile, a.cpp)
    print(table(["model", "context", "KV cache", "decode path", "tok/s", "step ms (median)", "min-max ms",
                 "vs fp32", "cache"],
                [[r["model"], fmt_context(r["context"]), r["kv"], r["path"], f"{r['decode_tok_s']:.2f}",
                  f"{r['step_ms_median']:.1f}", f"{r['step_ms_spread'][0]:.0f}-{r['step_ms_spread'][1]:.0f}",
                  "-" if r["vs_fp32"] is None else f"{r['vs_fp32']:.2f}x", f"{r['cache_bytes'] / 2**20:.1f} MiB"]
                 for r in rows]))
    print(f"load average after: {os.getloadavg()}; vs fp32 = median over rounds of the fp32 step time over this "
          "path's in the same round", file=sys.stderr)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "machine": machine_info(), "argv": sys.argv, "load": os.getloadavg()}, f,
                      indent=1)


if __name__ == "__main__":
    main()
