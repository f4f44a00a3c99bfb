"""Whole eager decode steps with the dense decode-attention kernel (kvlab/layers/dense_attend.py) on and off, in one
process, stepping in turns (outside CI); ``--kernel f32``: the float32 weight-product kernel (kvlab/layers/f32_kernel.py)
on and off instead, ``rows``: the RoPE rows kernel (kvlab/layers/rows_kernel.py), ``route``: the MoE router in
the MoE kernel's call (kvlab/layers/moe_kernel.py ``ROUTE``), ``compressed``: DeepSeek V4's CSA / HCA / SWA step
(kvlab/layers/compressed_kernel.py), ``grouped``: the per-head / per-group products of MLA's absorbed decode and
DeepSeek V4's output groups (kvlab/layers/f32_kernel.py ``GROUPED``), several comma-separated: together.

Per benchmark shape (``benchmarks/*.json``, random weights scaled as ``kvlab bench`` scales them) and context: one
prefill (chunks of 512), its cache copied, then two lanes decode the same tokens in turns, step by step, the kernel
on (``dense_attend.ENABLED``, or the ``--kernel``'s) in one and off (SDPA, or ``F.linear``) in the other; the copy bandwidth before and after. Reports each
lane's median step, the off / on ratio per step pair (median), the largest logit difference between the lanes, and
the share of the copy bandwidth (the calculator's bytes read per step, as ``kvlab bench``). The JSON (``--out``) and
a last JSON line.

    PYTHONPATH=$PWD nice -n 10 flock /tmp/kvlab-heavy.lock .venv/bin/python benchmarks/dense_steps.py \\
        benchmarks/laguna-small.json:16k benchmarks/qwen3-100m.json:16k --steps 12 --threads 1 --out <json>
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time

import torch
from kv_quant_speed import fill

from kvlab.bench import TORCH_DTYPES, copy_bandwidth, save_random_hf
from kvlab.costs import costs
from kvlab.layers import compressed_kernel, dense_attend, f32_kernel, moe_kernel, rows_kernel
from kvlab.loading import load
from kvlab.resolve import resolve_spec
from kvlab.shrink import scale_to_fit
from kvlab.units import parse_context, table

# --kernel: the module and its switch the lanes set
KERNELS = {"dense": (dense_attend, "ENABLED"), "f32": (f32_kernel, "ENABLED"), "rows": (rows_kernel, "ENABLED"),
           "route": (moe_kernel, "ROUTE"), "compressed": (compressed_kernel, "ENABLED"),
           "grouped": (f32_kernel, "GROUPED")}


def run(spec: str, ctx: int, steps: int, dtype: str, kernel: str = "dense", fill_cache: bool = False) -> dict:
    """One shape and context: the two lanes' step times, their logits' largest difference, the bandwidth shares."""
    cfg, _ = scale_to_fit(resolve_spec(spec))
    with tempfile.TemporaryDirectory(prefix="dense-steps-") as tmp:
        save_random_hf(cfg, tmp)
        model = load(tmp, dtype=TORCH_DTYPES[dtype], device="cpu").eval()
    ids = torch.randint(0, cfg.vocab_size, (1, ctx), generator=torch.Generator().manual_seed(0))
    load0 = os.getloadavg()[0]
    with torch.inference_mode():
        cache = model.new_cache(1, max_length=ctx + steps + 2)
        if fill_cache:  # random K/V, no prefill (benchmarks/kv_quant_speed.py)
            fill(cache, cfg, ctx, TORCH_DTYPES[dtype])
            logits = model.decode_step(ids[:, -1:], cache)
        for s in range(0, 0 if fill_cache else ctx, 512):
            logits = model(ids[:, s:s + 512], cache=cache, last_only=True)
        caches = {True: cache, False: copy.deepcopy(cache)}
        times: dict[bool, list[float]] = {True: [], False: []}
        diff = 0.0
        bw0 = copy_bandwidth()
        for _ in range(steps):
            nxt = logits[:, -1].argmax(-1, keepdim=True)  # both lanes decode the on lane's tokens
            out = {}
            for on in (True, False):
                for k in kernel.split(","):
                    setattr(*KERNELS[k], on)
                t = time.perf_counter()
                out[on] = model.decode_step(nxt, caches[on])
                times[on].append(time.perf_counter() - t)
            for k in kernel.split(","):
                setattr(*KERNELS[k], True)
            diff = max(diff, (out[True].float() - out[False].float()).abs().max().item())
            logits = out[True]
        bw1 = copy_bandwidth()
    c = costs(cfg, context=ctx + steps // 2, dtype=dtype)
    read = c.weight_read_bytes_per_step + c.kv_read_bytes_per_step
    on_s, off_s = statistics.median(times[True]), statistics.median(times[False])
    return {"shape": spec, "kernel": kernel, "fill": fill_cache, "context": ctx, "dtype": dtype, "steps": steps, "threads": torch.get_num_threads(),
            "on_ms": on_s * 1e3, "off_ms": off_s * 1e3,
            "off_over_on": statistics.median(b / a for a, b in zip(times[True], times[False], strict=True)),
            "on_steps_s": times[True], "off_steps_s": times[False], "max_logit_diff": diff,
            "read_bytes_per_step": read, "kv_read_bytes_per_step": c.kv_read_bytes_per_step,
            "copy_gb_s": [bw0 / 1e9, bw1 / 1e9], "on_of_copy_bw": read / on_s / min(bw0, bw1),
            "off_of_copy_bw": read / off_s / min(bw0, bw1), "load": [load0, os.getloadavg()[0]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="SHAPE:CONTEXT")
    ap.add_argument("--steps", type=int, default=12, help="decode steps per lane")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kernel", default="dense", help=f"the kernel(s) the two lanes switch, comma-separated: {sorted(KERNELS)}")
    ap.add_argument("--fill", action="store_true", help="a cache of random K/V instead of a prefill (faster at 16K)")
    ap.add_argument("--out")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    for k in a.kernel.split(","):
        if k not in KERNELS:
            raise SystemExit(f"--kernel: {k!r} is not one of {sorted(KERNELS)}")
        if KERNELS[k][0].library() is None:
            raise SystemExit(f"the {k} kernel is off (its KVLAB_*_KERNEL=0) or did not build")
    rows = []
    for r in a.runs:
        spec, ctx = r.rsplit(":", 1)
        rows.append(run(spec, parse_context(ctx), a.steps, a.dtype, a.kernel, a.fill))
        if a.out:
            with open(a.out, "w") as f:
                json.dump({"rows": rows}, f, indent=1)
    print(table(["shape", "context", "on ms", "off ms", "off / on", "on of copy bw", "off of copy bw", "copy GB/s",
                 "max |logit diff|", "load"],
                [[r["shape"], str(r["context"]), f"{r['on_ms']:.2f}", f"{r['off_ms']:.2f}", f"{r['off_over_on']:.2f}x",
                  f"{r['on_of_copy_bw']:.0%}", f"{r['off_of_copy_bw']:.0%}",
                  "-".join(f"{x:.1f}" for x in r["copy_gb_s"]), f"{r['max_logit_diff']:.1e}",
                  "-".join(f"{x:.1f}" for x in r["load"])] for r in rows]))
    print(json.dumps({"rows": [{k: v for k, v in r.items() if not k.endswith("steps_s")} for r in rows]}))


if __name__ == "__main__":
    main()
