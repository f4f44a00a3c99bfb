"""Whole decode steps in bf16 with the C++ bf16 kernel (kvlab/layers/bf16_kernel.py) on and off, beside fp32, under one
load (outside CI).

Per ``SPEC:CONTEXT`` (a ``benchmarks/*.json`` shape with random weights, std 0.02, or an installed model such as
``smollm2-135m`` with its own weights): the fp32 model and its bf16 copy prefill the same random ids (chunks of 512),
the bf16 cache is copied, then three lanes decode ``--steps`` greedy tokens taking turns step by step: fp32, bf16 with
the kernels off (torch's ``F.linear`` and MoE paths), bf16 with them on (``kvlab.layers.bf16_kernel.ENABLED`` and the
MoE kernel's, kvlab/layers/moe_kernel.py, switched per step; the fp32 lane with its MoE kernel on).
Reports each lane's median step, on / off, and bf16 / fp32 with the kernel on and off; whether the two bf16 lanes
chose the same tokens and how far their logits were apart; the copy bandwidth before and after, the load. Prints a
table, writes JSON (``--out``).

    PYTHONPATH=$PWD nice -n 10 flock /tmp/kvlab-heavy.lock .venv/bin/python benchmarks/bf16_steps.py \\
        benchmarks/qwen3-100m.json:1k smollm2-135m:1k --steps 16 --threads 1 --out /tmp/bf16_steps.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch

from kvlab.bench import copy_bandwidth
from kvlab.layers import bf16_kernel, moe_kernel
from kvlab.loading import load
from kvlab.model import Model
from kvlab.resolve import resolve_spec
from kvlab.units import parse_context


def models(spec: str) -> tuple[Model, Model]:
    """The fp32 model of ``spec`` (a shape: random weights; else loaded) and its bf16 copy."""
    if spec.endswith(".json"):
        fp32 = Model.from_config(resolve_spec(spec), seed=0, std=0.02)
    else:
        fp32 = load(spec, dtype=torch.float32, device="cpu")
    fp32 = fp32.eval()
    return fp32, copy.deepcopy(fp32).to(torch.bfloat16)


def run(spec: str, context: int, steps: int) -> dict:
    fp32, bf16 = models(spec)
    ids = torch.randint(0, fp32.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    caches, last = {}, {}
    t0 = time.perf_counter()
    for name, m in (("fp32", fp32), ("bf16", bf16)):
        c = m.new_cache(1, max_length=context + steps + 1)
        for s in range(0, context, 512):
            out = m(ids[:, s:s + 512], cache=c, last_only=True)
        caches[name], last[name] = c, out
    prefill_s = time.perf_counter() - t0
    caches["bf16_off"], last["bf16_off"] = copy.deepcopy(caches["bf16"]), last["bf16"]
    caches["bf16_on"] = caches.pop("bf16")
    last["bf16_on"] = last.pop("bf16")
    lanes = {"fp32": (fp32, True), "bf16_off": (bf16, False), "bf16_on": (bf16, True)}
    times: dict[str, list[float]] = {k: [] for k in lanes}
    toks: dict[str, list[int]] = {k: [] for k in lanes}
    diff = 0.0
    for _ in range(steps):
        for name, (m, on) in lanes.items():
            bf16_kernel.ENABLED = moe_kernel.ENABLED = on  # (the MoE kernel's bf16 call too; fp32: its default)
            tok = last[name][:, -1].argmax(-1, keepdim=True)
            t = time.perf_counter()
            last[name] = m.decode_step(tok, caches[name])
            times[name].append(time.perf_counter() - t)
            toks[name].append(int(tok))
        diff = max(diff, (last["bf16_on"].float() - last["bf16_off"].float()).abs().max().item())
    bf16_kernel.ENABLED = moe_kernel.ENABLED = True
    med = {k: statistics.median(v[1:]) * 1e3 for k, v in times.items()}  # the first step apart
    nbytes = {"fp32": sum(p.numel() * 4 for p in fp32.parameters()), "bf16": sum(p.numel() * 2 for p in bf16.parameters())}
    return {"spec": spec, "context": context, "steps": steps, "prefill_s": prefill_s, "median_ms": med,
            "min_ms": {k: min(v[1:]) * 1e3 for k, v in times.items()}, "weight_bytes": nbytes,
            "on_over_off": med["bf16_off"] / med["bf16_on"], "fp32_over_bf16_on": med["fp32"] / med["bf16_on"],
            "fp32_over_bf16_off": med["fp32"] / med["bf16_off"], "same_tokens": toks["bf16_on"] == toks["bf16_off"],
            "max_logit_diff_on_off": diff}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", metavar="SPEC:CONTEXT")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("bf16_steps.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, capture_output=True,
                            text=True).stdout.strip()
    rec = {"commit": commit, "utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "threads": a.threads,
           "kernel_loaded": bf16_kernel.library() is not None, "runs": []}
    with torch.inference_mode():
        for r in a.runs:
            spec, _, ctx = r.rpartition(":")
            load_before, bw_before = os.getloadavg()[0], copy_bandwidth() / 1e9
            res = run(spec, parse_context(ctx), a.steps)
            res.update(load=[load_before, os.getloadavg()[0]], copy_gbs=[bw_before, copy_bandwidth() / 1e9])
            rec["runs"].append(res)
            a.out.write_text(json.dumps(rec, indent=1))
    print(f"commit {commit}, {rec['utc']} UTC, {a.threads} thread(s), kernel loaded: {rec['kernel_loaded']}")
    print("| model | context | load | copy GB/s | fp32 ms | bf16 off ms | bf16 on ms | **on / off** | fp32 / bf16 off |"
          " **fp32 / bf16 on** | same tokens | max logit diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for x in rec["runs"]:
        m = x["median_ms"]
        print(f"| {x['spec']} | {x['context']} | {x['load'][0]:.1f}-{x['load'][1]:.1f} | {x['copy_gbs'][0]:.1f} / "
              f"{x['copy_gbs'][1]:.1f} | {m['fp32']:.1f} | {m['bf16_off']:.1f} | {m['bf16_on']:.1f} | "
              f"{x['on_over_off']:.2f}x | {x['fp32_over_bf16_off']:.2f}x | {x['fp32_over_bf16_on']:.2f}x | "
              f"{x['same_tokens']} | {x['max_logit_diff_on_off']:.3g} |")
    print(json.dumps({"out": str(a.out), "commit": commit}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
