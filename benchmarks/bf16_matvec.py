"""A decode step's weight products, one call at a time: the C++ bf16 kernel (kvlab/layers/bf16_kernel.py) against
torch's bf16 and fp32 ``F.linear`` on the linear layers of a model (outside CI).

For each model (a ``benchmarks/*.json`` shape, a preset or an installed model such as ``smollm2-135m``; built on the
meta device: shapes only), every distinct weight shape of its :class:`kvlab.layers.linear.Linear` layers and its LM
head, with ``--rows`` input rows (a decode step of that batch): enough random copies of the weight to pass
``--cycle-mb`` (read from memory, not cache), each call timed over all copies, ``--repeats`` rounds, the three paths
in turns each round (median). Per shape: microseconds a call and GB/s of weights read (the weight's bytes in its
dtype / time); per model: the step's weight-product time (each shape's median x its count) and its GB/s. The copy
bandwidth (kvlab.bench.copy_bandwidth) before and after. Prints a table, writes JSON (``--out``).

    PYTHONPATH=$PWD nice -n 10 flock /tmp/kvlab-heavy.lock .venv/bin/python benchmarks/bf16_matvec.py \\
        benchmarks/qwen3-100m.json benchmarks/laguna-small.json smollm2-135m --threads 1 --out /tmp/bf16_matvec.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kvlab.bench import copy_bandwidth
from kvlab.layers import bf16_kernel
from kvlab.layers.linear import Linear
from kvlab.model import Model
from kvlab.resolve import resolve_spec


def shapes(spec: str) -> dict[tuple[int, int], int]:
    """``{(out, in): count}`` of the model's linear layers and its LM head (MoE experts are not linear layers)."""
    cfg = resolve_spec(spec)
    with torch.device("meta"):
        model = Model(cfg)
    out: dict[tuple[int, int], int] = {}
    for m in model.modules():
        if isinstance(m, Linear):
            out[tuple(m.weight.shape)] = out.get(tuple(m.weight.shape), 0) + 1
    head = tuple(model.head_weight.shape)
    out[head] = out.get(head, 0) + 1
    return out


def time_shape(shape: tuple[int, int], rows: int, cycle_mb: float, repeats: int) -> dict[str, float]:
    """Median microseconds a call of each path on ``shape``, the weights cycled from memory."""
    n = max(2, int(cycle_mb * 2**20 // (shape[0] * shape[1] * 2)) + 1)
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(shape, generator=g).bfloat16() for _ in range(n)]
    wf = [w.float() for w in ws[:max(2, n // 2)]]  # the same bytes cycled: half the copies
    x = torch.randn(rows, shape[1], generator=g).bfloat16()
    xf = x.float()
    assert bf16_kernel.applies(x, ws[0]), "the bf16 kernel does not apply (threads, build?)"
    paths = {"kernel": lambda w: bf16_kernel.linear(x, w), "torch_bf16": lambda w: F.linear(x, w),
             "torch_fp32": lambda w: F.linear(xf, w)}
    times: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(repeats + 1):  # the first round warms up
        for name, f in paths.items():
            weights = wf if name == "torch_fp32" else ws
            t0 = time.perf_counter()
            for w in weights:
                f(w)
            times[name].append((time.perf_counter() - t0) / len(weights) * 1e6)
    return {k: statistics.median(v[1:]) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--rows", type=int, nargs="+", default=[1], help="input rows (batch of one-token decode)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cycle-mb", type=float, default=96.0, help="bf16 weights cycled per shape (past the caches)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("bf16_matvec.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if bf16_kernel.library() is None:
        print("the bf16 kernel is off or did not build", file=sys.stderr)
        return 1
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True).stdout.strip()
    rec = {"commit": commit, "utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "threads": a.threads,
           "load_before": os.getloadavg(), "copy_gbs_before": copy_bandwidth() / 1e9, "models": {}}
    for spec in a.models:
        per = {}
        for rows in a.rows:
            lines, tot = [], dict.fromkeys(("kernel", "torch_bf16", "torch_fp32"), 0.0)
            nbytes = 0
            for shape, count in shapes(spec).items():
                us = time_shape(shape, rows, a.cycle_mb, a.repeats)
                b = shape[0] * shape[1] * 2
                nbytes += b * count
                lines.append({"shape": list(shape), "count": count, "us": us,
                              "gbs": {k: (b * (2 if k == "torch_fp32" else 1)) / v / 1e3 for k, v in us.items()}})
                for k in tot:
                    tot[k] += us[k] * count
            per[rows] = {"shapes": lines, "step_us": tot, "bf16_bytes": nbytes,
                         "step_gbs": {k: nbytes * (2 if k == "torch_fp32" else 1) / v / 1e3 for k, v in tot.items()}}
        rec["models"][spec] = per
    rec["copy_gbs_after"], rec["load_after"] = copy_bandwidth() / 1e9, os.getloadavg()
    a.out.write_text(json.dumps(rec, indent=1))
    print(f"commit {commit}, {rec['utc']} UTC, {a.threads} thread(s), load {rec['load_before'][0]:.2f} -> "
          f"{rec['load_after'][0]:.2f}, copy {rec['copy_gbs_before']:.1f} / {rec['copy_gbs_after']:.1f} GB/s")
    print("| model | rows | shape (out, in) x count | kernel us (GB/s) | torch bf16 us (GB/s) | torch fp32 us (GB/s) |"
          " kernel / bf16 | kernel / fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    for spec, per in rec["models"].items():
        for rows, r in per.items():
            for ln in r["shapes"] + [{"shape": "step", "count": "", "us": r["step_us"], "gbs": r["step_gbs"]}]:
                us, gbs = ln["us"], ln["gbs"]
                label = "whole step" if ln["shape"] == "step" else f"{tuple(ln['shape'])} x {ln['count']}"
                print(f"| {spec} | {rows} | {label} | " + " | ".join(f"{us[k]:.1f} ({gbs[k]:.1f})" for k in us)
                      + f" | {us['torch_bf16'] / us['kernel']:.2f}x | {us['torch_fp32'] / us['kernel']:.2f}x |")
    print(json.dumps({"out": str(a.out), "commit": commit}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
