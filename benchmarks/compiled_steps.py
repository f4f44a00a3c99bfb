"""Eager and compiled decode steps (kvlab/compiled.py, inductor) of one model in one process, stepping in turns, with
the C++ decode kernels in both (kvlab/layers/dense_attend.py, kvlab/layers/bf16_kernel.py,
kvlab/layers/f32_kernel.py, kvlab/layers/moe_kernel.py, DeepSeek V4's kvlab/layers/mhc_kernel.py and
kvlab/layers/compressed_kernel.py: custom ops when compiled); ``--off-lane`` adds a compiled lane with the kernels off (torch's SDPA and F.linear: the compiled step as it
was before the ops). Outside CI.

Per dtype and context: the shape's random weights (scaled as ``kvlab bench`` scales them), a cache of ``context``
random K/V positions (benchmarks/kv_quant_speed.py ``fill``: no prefill), copied per lane; each compiled lane's first
call (trace + compile + one step) timed apart; then ``--steps`` steps per lane in turns, every lane fed the eager
lane's greedy tokens. Reports each lane's median step and tok/s, the eager / compiled ratio per step pair (median),
the largest logit difference from eager, the share of the copy bandwidth (the calculator's bytes read per step, as
``kvlab bench``), the load. The JSON (``--out``) and a last JSON line.

    PYTHONPATH=$PWD nice -n 10 flock /tmp/kvlab-heavy.lock .venv/bin/python benchmarks/compiled_steps.py \\
        benchmarks/qwen3-100m.json --contexts 16k --dtypes float32,bfloat16 --steps 8 --threads 1 --out <json>
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import tempfile
import time

import torch
from kv_quant_speed import fill

from kvlab.bench import TORCH_DTYPES, copy_bandwidth, save_random_hf
from kvlab.compiled import CompiledStep
from kvlab.costs import costs
from kvlab.layers import bf16_kernel, compressed_kernel, dense_attend, f32_kernel, mhc_kernel, moe_kernel
from kvlab.loading import load
from kvlab.resolve import resolve_spec
from kvlab.shrink import scale_to_fit
from kvlab.units import parse_context, table

KERNELS = (dense_attend, bf16_kernel, f32_kernel, moe_kernel, mhc_kernel, compressed_kernel)


def _kernels(on: bool) -> None:
    for k in KERNELS:
        k.ENABLED = on


def run(model, cfg, ctx: int, steps: int, dtype: str, off_lane: bool) -> dict:
    """One dtype and context: each lane's step times, first call, logits' largest difference from eager."""
    lanes = ["eager", "compiled"] + (["compiled_off"] if off_lane else [])
    load0 = os.getloadavg()[0]
    with torch.inference_mode():  # the token too: a tensor made outside it would be guarded as another kind
        tok = torch.tensor([[1]])
        cache = model.new_cache(1, max_length=ctx + steps + 8)  # 8 spare positions (a full plain cache
        # recompiled before 22fac03: docs/performance.md "the last slot"; kept so figures stay comparable)
        fill(cache, cfg, ctx, TORCH_DTYPES[dtype])
        model.decode_step(tok, cache)  # eager first: the step's lazily built tables exist before any trace
        caches = {lane: copy.deepcopy(cache) for lane in lanes}
        fns = {"eager": model.decode_step, "compiled": CompiledStep(model, "inductor")}
        if off_lane:
            fns["compiled_off"] = CompiledStep(model, "inductor")
        first = {}
        for lane in lanes[1:]:  # trace + compile + one step, kept out of the step times (the caches advance alike)
            _kernels(lane == "compiled")
            fns[lane](tok, caches[lane])
            first[lane] = fns[lane].first_call_s
        _kernels(True)
        model.decode_step(tok, caches["eager"])
        graphs = {lane: fns[lane].compiles for lane in lanes[1:]}
        times: dict[str, list[float]] = {lane: [] for lane in lanes}
        diff = dict.fromkeys(lanes[1:], 0.0)
        bw0 = copy_bandwidth()
        for _ in range(steps):
            out = {}
            for lane in lanes:
                _kernels(lane != "compiled_off")
                t = time.perf_counter()
                out[lane] = fns[lane](tok, caches[lane])
                times[lane].append(time.perf_counter() - t)
            _kernels(True)
            for lane in lanes[1:]:
                diff[lane] = max(diff[lane], (out[lane].float() - out["eager"].float()).abs().max().item())
            tok = out["eager"][:, -1].argmax(-1, keepdim=True)
        bw1 = copy_bandwidth()
        graphs = {lane: fns[lane].compiles - graphs[lane] for lane in lanes[1:]}  # in the timed steps: 0
    c = costs(cfg, context=ctx + steps // 2, dtype=dtype)
    read = c.weight_read_bytes_per_step + c.kv_read_bytes_per_step
    med = {lane: statistics.median(times[lane]) for lane in lanes}
    row = {"context": ctx, "dtype": dtype, "steps": steps, "threads": torch.get_num_threads(),
           "read_bytes_per_step": read, "copy_gb_s": [bw0 / 1e9, bw1 / 1e9], "load": [load0, os.getloadavg()[0]]}
    for lane in lanes:
        row[f"{lane}_ms"] = med[lane] * 1e3
        row[f"{lane}_tok_s"] = 1 / med[lane]
        row[f"{lane}_of_copy_bw"] = read / med[lane] / min(bw0, bw1)
        row[f"{lane}_steps_s"] = times[lane]
        if lane != "eager":
            row[f"{lane}_first_call_s"] = first[lane]
            row[f"{lane}_max_logit_diff"] = diff[lane]
            row[f"{lane}_graphs_in_steps"] = graphs[lane]
            row[f"eager_over_{lane}"] = statistics.median(
                e / x for e, x in zip(times["eager"], times[lane], strict=True))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shape")
    ap.add_argument("--contexts", default="16k")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--steps", type=int, default=8, help="decode steps per lane")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--off-lane", action="store_true", help="also a compiled lane with the kernels off")
    ap.add_argument("--out")
    a = ap.parse_args()
    bad = [d for d in a.dtypes.split(",") if d not in TORCH_DTYPES]
    if bad:
        ap.error(f"--dtypes: {bad[0]!r} is not one of {sorted(TORCH_DTYPES)}")
    torch.set_num_threads(a.threads)
    if any(k.library() is None for k in KERNELS):
        raise SystemExit("a C++ kernel is off (KVLAB_{DENSE,BF16,F32,MOE,MHC,COMPRESSED}_KERNEL=0) or did not build")
    cfg, _ = scale_to_fit(resolve_spec(a.shape))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, capture_output=True,
                            text=True).stdout.strip()
    rows = []
    for dtype in a.dtypes.split(","):
        with tempfile.TemporaryDirectory(prefix="compiled-steps-") as tmp:
            save_random_hf(cfg, tmp)
            model = load(tmp, dtype=TORCH_DTYPES[dtype], device="cpu").eval()
        for ctx in a.contexts.split(","):
            rows.append({"shape": a.shape, "commit": commit,
                         **run(model, cfg, parse_context(ctx), a.steps, dtype, a.off_lane)})
            print(json.dumps({k: v for k, v in rows[-1].items() if not k.endswith("steps_s")}), flush=True)
            if a.out:
                with open(a.out, "w") as f:
                    json.dump({"rows": rows}, f, indent=1)
    lanes = [x[:-3] for x in rows[0] if x.endswith("_ms")]
    print(table(["dtype", "context", *(f"{x} ms" for x in lanes), *(f"eager / {x}" for x in lanes[1:]),
                 *(f"{x} first s" for x in lanes[1:]), "max |logit diff|", "copy GB/s", "load"],
                [[r["dtype"], str(r["context"]), *(f"{r[f'{x}_ms']:.1f}" for x in lanes),
                  *(f"{r[f'eager_over_{x}']:.2f}x" for x in lanes[1:]),
                  *(f"{r[f'{x}_first_call_s']:.0f}" for x in lanes[1:]),
                  f"{max(r[f'{x}_max_logit_diff'] for x in lanes[1:]):.1e}",
                  "-".join(f"{x:.1f}" for x in r["copy_gb_s"]), "-".join(f"{x:.1f}" for x in r["load"])]
                 for r in rows]))
    print(json.dumps({"rows": [{k: v for k, v in r.items() if not k.endswith("steps_s")} for r in rows]}))


if __name__ == "__main__":
    main()
