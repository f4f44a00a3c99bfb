"""kvlab's hand-written C++ decode kernel (kvlab/layers/cpu_attend.py) and its fused dequantize-attend call
(kvlab/layers/fused.py, compiled by inductor) against its blocked quantized attention and fp32 SDPA, one attention
call at a time (not part of CI; docs/kv-quantization.md "Decode speed").

K and V of one layer (``B x Hkv x L x D``, unit normal, seed 0) are written once into fp32 tensors and into kvlab's
quantized buffers (kvlab/cache/quant.py ``QuantRows``, int8 / int4 per token, group ``g``, fp16 scales, no residual);
then, round-robin after a warm-up: fp32 ``scaled_dot_product_attention``; kvlab's ``attend`` over the buffers'
readers, blocked (``attend_blocked``: codes cast into a float32 block, matrix products); and the same ``attend`` with the buffers marked
fused (as ``new_cache(..., fused=True)`` marks them), once per score layout (:func:`kvlab.layers.fused.layout`):
``heads`` (one sweep over the positions per query head) and ``rows`` (the query heads innermost: each key row read
once for all of them); ``4``: int4's nibbles split. The layout kvlab picks for the shape is starred. ``C++``: the
same ``attend`` with the hand-written kernel on (``cpu_attend.ENABLED``; off for every other path). Each fused and
C++ output is checked against the blocked path (max abs diff).

    PYTHONPATH=. .venv/bin/python benchmarks/kv_quant_fused.py --context 16k --threads 1
    PYTHONPATH=. .venv/bin/python benchmarks/kv_quant_fused.py --context 16k --threads 1 --kv-heads 1 --heads 8 --dim 512
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F
from kv_layer import add_layer_args, layer_tensors, quantized

from kvlab.layers import cpu_attend, fused
from kvlab.layers.blocked import attend_blocked as attend
from kvlab.units import table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layer_args(ap, calls=20)
    ap.add_argument("--group", type=int, default=32)
    a = ap.parse_args()
    q, k, v = layer_tensors(a)
    n, hkv, d = k.shape[2], a.kv_heads, a.dim
    g, scale = a.heads // hkv, d ** -0.5
    paths = {"fp32 SDPA": lambda: F.scaled_dot_product_attention(q.view(1, hkv, g, d), k, v, scale=scale)}
    info, chosen = {}, fused.layout
    cpu_attend.ENABLED = True
    if not cpu_attend.available():
        raise SystemExit("the C++ kernel did not build")
    cpu_attend.ENABLED = False  # on only inside the C++ path's calls
    with torch.inference_mode():
        for bits in (8, 4):
            fmt = f"int{bits}-g{a.group}"
            kr, vr = quantized(fmt, k, v)
            kview, vview = kr.view(n), vr.view(n)
            blocked = attend(q, kview, vview, None, scale)
            paths[f"{fmt} blocked"] = lambda kv=kview, vv=vview: attend(q, kv, vv, None, scale)
            best = chosen(d, bits == 4, a.group)

            def native(views=(kview, vview)):
                cpu_attend.ENABLED = True
                try:
                    return attend(q, *views, None, scale)
                finally:
                    cpu_attend.ENABLED = False

            t0 = time.perf_counter()
            out = native()
            info[f"{fmt} C++"] = {"first_call_s": time.perf_counter() - t0,
                                  "max_abs_diff_vs_blocked": (out - blocked).abs().max().item()}
            paths[f"{fmt} C++"] = native
            for how in [x + ("4" if bits == 4 and a.group % 2 == 0 else "") for x in ("heads", "rows")]:

                def call(rows=(kr, vr), views=(kview, vview), how=how):
                    fused.layout = lambda *_: how  # this layout, whatever kvlab would pick
                    for r in rows:  # the same buffers, marked as new_cache(..., fused=True) marks them
                        r.fused = True
                    try:
                        return attend(q, *views, None, scale)
                    finally:
                        fused.layout = chosen
                        for r in rows:
                            r.fused = False

                name = f"{fmt} fused {how}{' *' if how == best else ''}"
                t0 = time.perf_counter()
                out = call()
                info[name] = {"first_call_s": time.perf_counter() - t0,
                              "max_abs_diff_vs_blocked": (out - blocked).abs().max().item()}
                paths[name] = call
        times: dict[str, list[float]] = {p: [] for p in paths}
        for i in range(a.calls + 1):
            for name, fn in paths.items():
                t = time.perf_counter()
                fn()
                if i:
                    times[name].append(time.perf_counter() - t)
    ref = times["fp32 SDPA"]
    rows = [{"path": p, "ms_median": statistics.median(ts) * 1e3, "ms_min": min(ts) * 1e3,
             "vs_fp32": statistics.median(x / y for x, y in zip(ref, ts, strict=True))} for p, ts in times.items()]
    print(table(["path", "ms per call (median)", "min", "vs fp32"],
                [[r["path"], f"{r['ms_median']:.2f}", f"{r['ms_min']:.2f}", f"{r['vs_fp32']:.2f}x"] for r in rows]))
    for name, x in info.items():
        print(f"{name}: first call (compile) {x['first_call_s']:.1f} s, max |{name} - blocked| "
              f"{x['max_abs_diff_vs_blocked']:.2e}")
    print(json.dumps({"context": n, "kv_heads": hkv, "heads": a.heads, "dim": d, "group": a.group,
                      "threads": torch.get_num_threads(), "load": os.getloadavg(), "rows": rows, "compile": info}))


if __name__ == "__main__":
    main()
