"""Chunked prefill, kvlab checkouts and transformers side by side: tok/s and peak RSS, each lane its own process.

One benchmark shape (``benchmarks/*.json``, random weights scaled as ``kvlab bench`` scales them, saved once per
process with the same seed, so every lane loads the same weights) prefills the same ids (seed 0) in chunks of 512:
kvlab ``model(ids[:, s:s+512], cache=cache, last_only=True)`` into a cache preallocated to the context, transformers
``DynamicCache`` with ``logits_to_keep=1``, fp32 (or ``--dtype bfloat16``: weights and cache), one thread, after a 16-token warm-up. Each lane runs in its own
process, so its peak RSS rise (sampled every 2 ms over the prefill, the cache's allocation included) owes nothing to
an earlier lane; the lanes run in turns, ``--repeats`` times. Besides the wall time, the prefill's process CPU time
(``time.process_time``): where the machine's load exceeds its cores, the wall time includes waits for a core and the
CPU time does not (contention for caches and memory bandwidth stays in both); the medians of both close the table.
``--kvlab`` names one or more checkouts (e.g. main's and a branch's) whose ``kvlab`` each kvlab lane imports.

    PYTHONPATH=$PWD nice -n 10 .venv/bin/python benchmarks/prefill_side_by_side.py benchmarks/qwen3-100m.json 16k \\
        --kvlab /tmp/main-checkout $PWD --repeats 2
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


def lane(shape: str, ctx: int, engine: str, dtype_name: str = "float32") -> dict:
    import gc
    import tempfile

    import torch
    import transformers as tf

    from kvlab.bench import rss_sampler, save_random_hf
    from kvlab.loading import load
    from kvlab.resolve import resolve_spec
    from kvlab.shrink import scale_to_fit

    torch.set_num_threads(1)
    dtype = getattr(torch, dtype_name)
    cfg, _ = scale_to_fit(resolve_spec(shape))
    warm = torch.zeros(1, 16, dtype=torch.long)
    ids = torch.randint(0, cfg.vocab_size, (1, ctx), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        save_random_hf(cfg, tmp)
        if engine == "kvlab":
            model = load(tmp, dtype=dtype, device="cpu").eval()
        else:
            model = tf.AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).eval()

    def kvlab_prefill(x: torch.Tensor) -> torch.Tensor:
        cache = model.new_cache(1, max_length=x.shape[1])
        for s in range(0, x.shape[1], 512):
            out = model(x[:, s:s + 512], cache=cache, last_only=True)
        return out

    def hf_prefill(x: torch.Tensor) -> torch.Tensor:
        cache = tf.DynamicCache(config=model.config)
        for s in range(0, x.shape[1], 512):
            out = model(input_ids=x[:, s:s + 512], past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        return out

    run = kvlab_prefill if engine == "kvlab" else hf_prefill
    with torch.inference_mode():
        run(warm)
        gc.collect()
        with rss_sampler() as mem:
            t0, c0 = time.perf_counter(), time.process_time()
            logits = run(ids)
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"s": dt, "tok_s": ctx / dt, "cpu_s": cpu, "cpu_tok_s": ctx / cpu,
            "peak_rss_rise_mib": (mem["peak"] - mem["start"]) / 2**20, "last_logits_sum": logits[0, -1].double().sum().item()}


def main(argv: list[str] | None = None) -> int:
    from kvlab.units import parse_contexts

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("shape", help="a benchmark JSON (benchmarks/*.json)")
    ap.add_argument("context", help="tokens to prefill (16k)")
    ap.add_argument("--kvlab", nargs="+", default=[os.getcwd()], help="checkouts whose kvlab the kvlab lanes import")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weights and cache")
    ap.add_argument("--lane", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    ctx = parse_contexts(args.context)[0]
    if args.lane:
        print(json.dumps(lane(args.shape, ctx, args.lane, args.dtype)))
        return 0
    shape = str(Path(args.shape).resolve())
    lanes = [(str(Path(k).resolve()), "kvlab") for k in args.kvlab]
    if not args.no_transformers:
        lanes.append((str(Path(args.kvlab[-1]).resolve()), "transformers"))
    rows = []
    for rep in range(args.repeats):
        for root, engine in lanes:
            env = dict(os.environ, PYTHONPATH=root)
            out = subprocess.run([sys.executable, __file__, shape, str(ctx), "--lane", engine, "--dtype", args.dtype], env=env, cwd=root,
                                 check=True, capture_output=True, text=True).stdout
            r = {"repeat": rep, "engine": engine, "checkout": root, "load": os.getloadavg()[0],
                 **json.loads(out.strip().splitlines()[-1])}
            rows.append(r)
            print(f"{engine} {root} rep {rep}: {r['tok_s']:.0f} tok/s ({r['cpu_tok_s']:.0f} per CPU second), "
                  f"{r['peak_rss_rise_mib']:.0f} MiB",
                  file=sys.stderr, flush=True)
    print("| repeat | lane | checkout | tok/s | tok per CPU s | peak RSS rise | load |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['repeat']} | {r['engine']} | {r['checkout']} | {r['tok_s']:.0f} | {r['cpu_tok_s']:.0f} "
              f"| {r['peak_rss_rise_mib']:.0f} MiB | {r['load']:.1f} |")
    for key, what in (("tok_s", "tok/s"), ("cpu_tok_s", "tok per CPU s")):
        med = {(root, engine): statistics.median(r[key] for r in rows if (r["checkout"], r["engine"]) == (root, engine))
               for root, engine in lanes}
        print(f"median {what}: " + ", ".join(f"{engine} {Path(root).name} {m:.0f}" for (root, engine), m in med.items()))
    print(json.dumps({"shape": Path(args.shape).stem, "context": ctx, "dtype": args.dtype, "runs": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
