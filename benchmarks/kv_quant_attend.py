"""One decode attention call over a quantized K/V cache against the fp32 one (not part of CI): where a blocked
decode step's time goes, without the rest of the model.

K and V of one layer (``B x Hkv x L x D``, unit normal, seed 0) are written once into plain and quantized buffers
(kvlab/cache/quant.py ``QuantRows``); then ``attend`` (kvlab/layers/core.py) runs one query per head over each,
round-robin (machine load hits each alike), and torch.profiler lists the operators of a few quantized calls.

    PYTHONPATH=. .venv/bin/python benchmarks/kv_quant_attend.py --context 16k --kv-heads 4 --heads 12 --dim 64 \\
        --formats int8-g32,int4-g32 --threads 1 --profile int8-g32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from kv_layer import add_layer_args, layer_tensors, quantized
from torch.profiler import ProfilerActivity, profile

from kvlab.layers.core import attend
from kvlab.units import table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layer_args(ap, calls=15)
    ap.add_argument("--formats", default="int8-g32,int4-g32")
    ap.add_argument("--profile", help="a format whose calls torch.profiler lists")
    a = ap.parse_args()
    q, k, v = layer_tensors(a)
    n, hkv, d = k.shape[2], a.kv_heads, a.dim
    kv = {"fp32": (k, v)}
    for fmt in a.formats.split(","):
        kv[fmt] = tuple(r.view(n) for r in quantized(fmt, k, v))
    times: dict[str, list[float]] = {name: [] for name in kv}
    with torch.inference_mode():
        for i in range(a.calls + 1):
            for name, (kk, vv) in kv.items():
                t = time.perf_counter()
                attend(q, kk, vv, None, d ** -0.5)
                if i:
                    times[name].append(time.perf_counter() - t)
        rows = [{"kv": name, "ms_median": statistics.median(ts) * 1e3, "ms_min": min(ts) * 1e3,
                 "vs_fp32": statistics.median(a / b for a, b in zip(times["fp32"], ts, strict=True))}
                for name, ts in times.items()]
        print(table(["KV cache", "ms per call (median)", "min", "vs fp32"],
                    [[r["kv"], f"{r['ms_median']:.2f}", f"{r['ms_min']:.2f}", f"{r['vs_fp32']:.2f}x"] for r in rows]))
        if a.profile:
            with profile(activities=[ProfilerActivity.CPU]) as p:
                for _ in range(5):
                    attend(q, *kv[a.profile], None, d ** -0.5)
            print(f"\nprofile: {a.profile}, 5 calls")
            print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))
    print(json.dumps({"context": n, "kv_heads": hkv, "heads": a.heads, "dim": d, "load": os.getloadavg(), "rows": rows}))


if __name__ == "__main__":
    main()
