"""One chunked prefill under ``torch.profiler``, kvlab or transformers: self CPU time by operator.

The lane of ``benchmarks/prefill_side_by_side.py`` (random weights scaled as ``kvlab bench`` scales them, seed 0; the
same ids; chunks of 512; kvlab ``last_only=True`` into a preallocated cache, transformers ``DynamicCache`` with
``logits_to_keep=1``; fp32 or ``--dtype bfloat16``, one thread, after a 16-token warm-up), one prefill profiled. Prints the wall time of the
profiled prefill and the top operators by self CPU time (with their input shapes, ``--shapes``).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/prefill_profile.py benchmarks/deepseek-v4-small.json 1k --engine kvlab
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch
import transformers as tf
from torch.profiler import ProfilerActivity, profile

from kvlab.bench import save_random_hf
from kvlab.loading import load
from kvlab.resolve import resolve_spec
from kvlab.shrink import scale_to_fit
from kvlab.units import parse_contexts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("shape", help="a benchmark JSON (benchmarks/*.json)")
    ap.add_argument("context", help="tokens to prefill (1k)")
    ap.add_argument("--engine", choices=["kvlab", "transformers"], default="kvlab")
    ap.add_argument("--top", type=int, default=25, help="operators listed")
    ap.add_argument("--shapes", action="store_true", help="group by input shapes too")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weights and cache")
    args = ap.parse_args(argv)
    ctx = parse_contexts(args.context)[0]
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(1)
    cfg, _ = scale_to_fit(resolve_spec(args.shape))
    ids = torch.randint(0, cfg.vocab_size, (1, ctx), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        save_random_hf(cfg, tmp)
        if args.engine == "kvlab":
            model = load(tmp, dtype=dtype, device="cpu").eval()
        else:
            model = tf.AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).eval()

    def run(x: torch.Tensor) -> torch.Tensor:
        if args.engine == "kvlab":
            cache = model.new_cache(1, max_length=x.shape[1])
            for s in range(0, x.shape[1], 512):
                out = model(x[:, s:s + 512], cache=cache, last_only=True)
            return out
        cache = tf.DynamicCache(config=model.config)
        for s in range(0, x.shape[1], 512):
            out = model(input_ids=x[:, s:s + 512], past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        return out

    with torch.inference_mode():
        run(ids[:, :16])
        with profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes) as prof:
            t0 = time.perf_counter()
            logits = run(ids)
            dt = time.perf_counter() - t0
    print(f"{args.engine} {args.dtype} {ctx} tokens: {dt:.2f} s profiled, last logits sum {logits[0, -1].double().sum():.6f}")
    print(prof.key_averages(group_by_input_shape=args.shapes).table(sort_by="self_cpu_time_total", row_limit=args.top,
                                                                     max_name_column_width=40,
                                                                     max_shapes_column_width=70))
    return 0


if __name__ == "__main__":
    sys.exit(main())
