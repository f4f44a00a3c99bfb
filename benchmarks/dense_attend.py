"""One decode attention call over a plain K/V cache: the C++ kernel (kvlab/layers/dense_attend.py) against the torch
path it replaces (SDPA's CPU flash kernel; not part of CI).

Per layer shape (query heads x KV heads x head dim, the dense benchmark shapes' attending layers) and context: K and
V ``[1, Hkv, L, D]`` (unit normal, seed 0) as views of a preallocated buffer of ``L + 64`` slots (as a store's),
then ``kvlab.layers.dense_attend.attend`` (what a GQA layer's eager decode step calls) and
``kvlab.layers.core.attend`` (the torch path, SDPA) in turns (machine load hits both alike); the copy
bandwidth (kvlab/bench.py ``copy_bandwidth``) before and after. Reports each path's median ms per call, the K/V
bytes read per second, and the on / off ratio per call pair (median). The JSON (``--out``) and a last JSON line.

    PYTHONPATH=$PWD nice -n 10 flock /tmp/kvlab-heavy.lock .venv/bin/python benchmarks/dense_attend.py \\
        --contexts 4k,16k --threads 1 --out /tmp/dense_attend.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time

import torch

from kvlab.bench import copy_bandwidth
from kvlab.layers import core, dense_attend
from kvlab.units import parse_context, table

SHAPES = {  # name: (query heads, KV heads, head dim)
    "qwen3-100m": (12, 4, 64),
    "laguna-small full": (12, 2, 64),
    "laguna-small window": (16, 2, 64),
    "gemma4-e2b-small full": (8, 1, 512),
    "gemma4-e2b-small window": (8, 1, 256),
}


def _time(fn, calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="4k,16k", help="positions attended (a window layer: 512 whatever is given)")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"of {', '.join(SHAPES)}")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--calls", type=int, default=20, help="timed call pairs after one warm-up")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    if dense_attend.library() is None:
        raise SystemExit("the dense kernel is off (KVLAB_DENSE_KERNEL=0) or did not build")
    bw0, load0 = copy_bandwidth(), os.getloadavg()
    rows = []
    for name in a.shapes.split(","):
        h, hkv, d = SHAPES[name]
        for ctx in a.contexts.split(","):
            n = 512 if "window" in name else parse_context(ctx)
            gen = torch.Generator().manual_seed(0)
            k = torch.randn(1, hkv, n + 64, d, generator=gen).to(dtype).narrow(2, 0, n)
            v = torch.randn(1, hkv, n + 64, d, generator=gen).to(dtype).narrow(2, 0, n)
            q = torch.randn(1, h, 1, d, generator=gen).to(dtype)

            assert dense_attend.applies(q, k, v)
            on = functools.partial(dense_attend.attend, q, k, v, None, d ** -0.5)  # what attend_out calls
            off = functools.partial(core.attend, q, k, v, None, d ** -0.5)  # the torch path: SDPA

            with torch.inference_mode():
                on(), off()
                t_on, t_off = [], []
                for _ in range(a.calls):
                    t_on += _time(on, 1)
                    t_off += _time(off, 1)
            nbytes = 2 * hkv * n * d * k.element_size()
            r = {"shape": name, "heads": h, "kv_heads": hkv, "dim": d, "context": n, "dtype": a.dtype,
                 "kernel_ms": statistics.median(t_on) * 1e3, "sdpa_ms": statistics.median(t_off) * 1e3,
                 "speedup": statistics.median(b / x for x, b in zip(t_on, t_off, strict=True)), "kv_bytes": nbytes}
            r["kernel_gb_s"] = nbytes / r["kernel_ms"] / 1e6
            r["sdpa_gb_s"] = nbytes / r["sdpa_ms"] / 1e6
            rows.append(r)
            if "window" in name:
                break
    bw1, load1 = copy_bandwidth(), os.getloadavg()
    print(table(["layer", "context", "kernel ms", "SDPA ms", "SDPA / kernel", "kernel GB/s", "SDPA GB/s"],
                [[r["shape"], str(r["context"]), f"{r['kernel_ms']:.3f}", f"{r['sdpa_ms']:.3f}", f"{r['speedup']:.2f}x",
                  f"{r['kernel_gb_s']:.1f}", f"{r['sdpa_gb_s']:.1f}"] for r in rows]))
    print(f"copy bandwidth {bw0 / 1e9:.1f} / {bw1 / 1e9:.1f} GB/s (before / after); load {load0[0]:.2f} / {load1[0]:.2f}")
    res = {"threads": a.threads, "dtype": a.dtype, "copy_gb_s": [bw0 / 1e9, bw1 / 1e9], "load": [load0, load1],
           "rows": rows}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
