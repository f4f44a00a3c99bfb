"""A prefill chunk's bf16 weight products, one call at a time: widened to float32 GEMMs (kvlab/layers/bf16_widen.py)
against torch's bf16 ``F.linear`` (and, at up to 8 rows, the C++ matrix-vector kernel, kvlab/layers/bf16_kernel.py),
with torch's float32 ``F.linear`` on float32 weights beside (outside CI).

For each model (a ``benchmarks/*.json`` shape, a preset or an installed model; built on the meta device: shapes
only), every distinct weight shape of its :class:`kvlab.layers.linear.Linear` layers, with each ``--rows`` count of
input rows: random bf16 copies of the weight totalling ``--cycle-mb`` (read from memory, not cache; at most
``--calls`` of them a round, the paths in turns), ``--repeats`` rounds after a warm-up, median microseconds a call.
Per model and row count: the sum over one layer set's calls (each shape's median x its count) and the ratios. This
is the measurement behind ``bf16_widen.MIN_ROWS``. Prints a table, writes JSON (``--out``).

    PYTHONPATH=$PWD nice -n 10 flock /tmp/kvlab-heavy.lock .venv/bin/python benchmarks/bf16_gemm.py \\
        benchmarks/qwen3-100m.json --rows 4 8 9 12 16 64 512 --threads 1 --out /tmp/bf16_gemm.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kvlab.layers import bf16_kernel, bf16_widen
from kvlab.layers.linear import Linear
from kvlab.model import Model
from kvlab.resolve import resolve_spec

PATHS = ("torch_bf16", "kernel", "widened", "torch_fp32")


def shapes(spec: str) -> dict[tuple[int, int], int]:
    """``{(out, in): count}`` of the model's linear layers (the LM head apart: a prefill chunk's runs on its last
    row)."""
    with torch.device("meta"):
        model = Model(resolve_spec(spec))
    out: dict[tuple[int, int], int] = {}
    for m in model.modules():
        if isinstance(m, Linear):
            out[tuple(m.weight.shape)] = out.get(tuple(m.weight.shape), 0) + 1
    return out


def time_shape(shape: tuple[int, int], rows: int, cycle_mb: float, calls: int, repeats: int) -> dict[str, float]:
    """Median microseconds a call of each path on ``shape`` with ``rows`` input rows (``kernel``: None past 8)."""
    n = max(2, int(cycle_mb * 2**20 // (shape[0] * shape[1] * 2)) + 1)
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(shape, generator=g).bfloat16() for _ in range(n)]
    wf = [w.float() for w in ws[:max(2, n // 2)]]  # the same bytes cycled: half the copies
    x = torch.randn(rows, shape[1], generator=g).bfloat16()
    xf = x.float()
    paths = {"torch_bf16": lambda w: F.linear(x, w), "widened": lambda w: bf16_widen.linear(x, w),
             "torch_fp32": lambda w: F.linear(xf, w)}
    if rows <= bf16_kernel.MAX_ROWS and bf16_kernel.applies(x, ws[0]):
        paths["kernel"] = lambda w: bf16_kernel.linear(x, w)
    times: dict[str, list[float]] = {k: [] for k in paths}
    pos = dict.fromkeys(paths, 0)
    for _ in range(repeats + 1):  # the first round warms up
        for name, f in paths.items():
            pool = wf if name == "torch_fp32" else ws
            k = min(calls, len(pool))
            t0 = time.perf_counter()
            for i in range(k):
                f(pool[(pos[name] + i) % len(pool)])
            pos[name] += k
            times[name].append((time.perf_counter() - t0) / k * 1e6)
    return {k: statistics.median(times[k][1:]) if k in times else None for k in PATHS}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--rows", type=int, nargs="+", default=[8, 9, 16, 64, 512], help="input rows (a chunk's tokens)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cycle-mb", type=float, default=48.0, help="bf16 weights cycled per shape (past the caches)")
    ap.add_argument("--calls", type=int, default=16, help="calls a round and path at most")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bf16_gemm.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True).stdout.strip()
    rec = {"commit": commit, "utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "threads": a.threads,
           "load_before": os.getloadavg(), "native_bf16": bf16_widen.NATIVE_BF16, "models": {}}
    for spec in a.models:
        per = {}
        for rows in a.rows:
            lines = []
            tot: dict[str, float | None] = dict.fromkeys(PATHS, 0.0)
            for shape, count in shapes(spec).items():
                us = time_shape(shape, rows, a.cycle_mb, a.calls, a.repeats)
                lines.append({"shape": list(shape), "count": count, "us": us})
                for k in PATHS:
                    tot[k] = None if tot[k] is None or us[k] is None else tot[k] + us[k] * count
            per[rows] = {"shapes": lines, "layers_us": tot}
        rec["models"][spec] = per
    rec["load_after"] = os.getloadavg()
    a.out.write_text(json.dumps(rec, indent=1))
    print(f"commit {commit}, {rec['utc']} UTC, {a.threads} thread(s), load {rec['load_before'][0]:.2f} -> "
          f"{rec['load_after'][0]:.2f}, native bf16: {rec['native_bf16']}")
    print("| model | rows | linear layers' calls | torch bf16 ms | kernel ms | widened ms | torch fp32 ms |"
          " bf16 / widened |")
    print("|---|---|---|---|---|---|---|---|")
    for spec, per in rec["models"].items():
        for rows, r in per.items():
            t = r["layers_us"]
            cells = " | ".join("-" if t[k] is None else f"{t[k] / 1e3:.3f}" for k in PATHS)
            n = sum(ln["count"] for ln in r["shapes"])
            print(f"| {spec} | {rows} | {n} | {cells} | {t['torch_bf16'] / t['widened']:.2f}x |")
    print(json.dumps({"out": str(a.out), "commit": commit}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
