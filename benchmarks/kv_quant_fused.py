"""A fused dequantize-attend decode call compiled by inductor, against kvlab's blocked quantized attention and fp32
SDPA (not part of CI; an experiment toward docs/kv-quantization.md "Decode speed", not yet kvlab's decode path).

K and V of one layer (``B x Hkv x L x D``, unit normal, seed 0) are written once into fp32 tensors and into kvlab's
quantized buffers (kvlab/cache/quant.py ``QuantRows``, int8 / int4 per token, group ``g``, fp16 scales, no residual);
then, round-robin after a warm-up: fp32 ``scaled_dot_product_attention``; kvlab's ``attend`` over the buffers'
readers (blocked: codes cast into a float32 block, matrix products); and :func:`fused` over the same codes and
scales through ``torch.compile`` (inductor, C++ on the CPU). :func:`fused` writes the products as elementwise
multiply-and-sum so inductor emits one loop that reads each int8 code (int4: nibble) and its scale, multiplies by the
query and reduces: no float32 copy of the codes exists. Its output is checked against kvlab's path (max abs diff).

    PYTHONPATH=. .venv/bin/python benchmarks/kv_quant_fused.py --context 16k --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from kvlab.cache.quant import QuantRows
from kvlab.costs.quant import Buffer, parse_quant
from kvlab.layers.core import attend
from kvlab.layers.fused import values
from kvlab.units import parse_context, table


def fused(qf: torch.Tensor, kc: torch.Tensor, ks: torch.Tensor, vc: torch.Tensor, vs: torch.Tensor, scale: float,
          int4: bool) -> torch.Tensor:
    """``qf [B, Hkv, G, D]`` float32 against quantized K/V (codes and per-token scales) -> ``[B, Hkv, G, D]``."""
    k = values(kc, ks, int4)
    s = (qf[:, :, :, None, :] * k[:, :, None]).sum(-1) * scale  # [B, Hkv, G, L]: reduction over D, no bmm
    p = torch.softmax(s, -1)
    v = values(vc, vs, int4)
    return (p[..., None] * v[:, :, None]).sum(-2)


def fused_int4_split(qf: torch.Tensor, kc: torch.Tensor, ks: torch.Tensor, vc: torch.Tensor, vs: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """:func:`fused` for int4 with each byte's two nibbles kept apart (even / odd channels) instead of interleaved
    back into ``D`` channels: the query split into its even and odd channels, the output's halves interleaved at the
    end (``[B, Hkv, G, D]``, small)."""
    b, h, g, d = qf.shape
    n, ng = kc.shape[2], ks.shape[-1]
    half = d // ng // 2
    qe = qf[..., 0::2].reshape(b, h, g, 1, ng, half)
    qo = qf[..., 1::2].reshape(b, h, g, 1, ng, half)
    lo = ((kc & 15).float() - 8).view(b, h, 1, n, ng, half)
    hi = ((kc >> 4).float() - 8).view(b, h, 1, n, ng, half)
    s = ((qe * lo + qo * hi).sum(-1) * ks.float()[:, :, None]).sum(-1) * scale  # [B, Hkv, G, L]
    p = torch.softmax(s, -1)
    pw = (p[..., None] * vs.float()[:, :, None])[..., None]  # [B, Hkv, G, L, groups, 1]
    oe = (pw * ((vc & 15).float() - 8).view(b, h, 1, n, ng, half)).sum(3)
    oo = (pw * ((vc >> 4).float() - 8).view(b, h, 1, n, ng, half)).sum(3)
    return torch.stack((oe, oo), -1).reshape(b, h, g, d)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", default="16k")
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--group", type=int, default=32)
    ap.add_argument("--calls", type=int, default=20, help="timed calls per path after one warm-up")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    n, hkv, d = parse_context(a.context), a.kv_heads, a.dim
    g = a.heads // hkv
    gen = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, hkv, n, d, generator=gen), torch.randn(1, hkv, n, d, generator=gen)
    q = torch.randn(1, a.heads, 1, d, generator=gen)
    qf, scale = q.view(1, hkv, g, d), d ** -0.5
    # only the number of positions is a symbol (a new length must not recompile); head count, channels and groups
    # stay constants, which inductor needs to vectorise the reduction over channels (dynamic=True: ~40x slower)
    compiled = torch.compile(fused, dynamic=False)
    split = torch.compile(fused_int4_split, dynamic=False)
    paths = {"fp32 SDPA": lambda: F.scaled_dot_product_attention(qf, k, v, scale=scale)}
    info = {}
    with torch.inference_mode():
        for bits in (8, 4):
            fmt = f"int{bits}-g{a.group}"
            rows = [QuantRows(Buffer("kv", name, hkv, 0, d, key=name == "k"), parse_quant(fmt), (1, hkv),
                              torch.float32, "cpu") for name in "kv"]
            for r, x in zip(rows, (k, v), strict=True):
                r.resize(n, 0)
                r.write(0, x)
            kr, vr = rows
            kview, vview = kr.view(n), vr.view(n)
            args = (qf, kr.codes, kr.scales, vr.codes, vr.scales, scale, bits == 4)
            for t in args[1:5]:
                torch._dynamo.mark_dynamic(t, 2)
            t0 = time.perf_counter()
            out = compiled(*args)
            first = time.perf_counter() - t0
            blocked = attend(q, kview, vview, None, scale).view(1, hkv, g, d)
            info[fmt] = {"first_call_s": first, "max_abs_diff_vs_blocked": (out - blocked).abs().max().item()}
            paths[f"{fmt} blocked (kvlab)"] = lambda kv=kview, vv=vview: attend(q, kv, vv, None, scale)
            paths[f"{fmt} fused (compiled)"] = lambda args=args: compiled(*args)
            if bits == 4:
                t0 = time.perf_counter()
                out = split(*args[:6])
                info[f"{fmt} split"] = {"first_call_s": time.perf_counter() - t0,
                                        "max_abs_diff_vs_blocked": (out - blocked).abs().max().item()}
                paths[f"{fmt} fused, nibbles apart"] = lambda args=args: split(*args[:6])
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
    for fmt, x in info.items():
        print(f"{fmt}: first compiled call {x['first_call_s']:.1f} s, max |fused - blocked| "
              f"{x['max_abs_diff_vs_blocked']:.2e}")
    print(json.dumps({"context": n, "kv_heads": hkv, "heads": a.heads, "dim": d, "group": a.group,
                      "threads": torch.get_num_threads(), "load": os.getloadavg(), "rows": rows, "compile": info}))


if __name__ == "__main__":
    main()
