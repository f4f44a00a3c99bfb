"""One whole-sequence forward (no chunking, no cache) of a V4-shaped random model: peak memory and time, kvlab vs
transformers, each length in a fresh process.

transformers' CSA gathers the selected compressed entries per query and its eager attention scores every query
against every key, so its memory grows with the square of the length; kvlab processes queries in blocks (window
rows + top-k entries each), so its memory grows linearly. Prints a table and one JSON line last.

    .venv/bin/python benchmarks/deepseek_v4_full_forward.py [--lengths 2048,4096,8192] [--kvlab-lengths 32768]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPEC = Path(__file__).with_name("deepseek-v4-small.json")


def child(impl: str, length: int, ckpt: str) -> None:
    import torch

    torch.set_num_threads(1)
    ids = torch.randint(0, 16384, (1, length), generator=torch.Generator().manual_seed(0))
    if impl == "kvlab":
        import kvlab

        model = kvlab.load(ckpt)
        fwd = lambda: model(ids, last_only=True)
    else:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, experts_implementation="eager").eval()
        fwd = lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1).logits
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.perf_counter()
    with torch.inference_mode():
        fwd()
    dt = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"impl": impl, "length": length, "seconds": dt, "peak_rss_bytes": peak,
                      "rss_before_bytes": base}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="2048,4096,8192", help="lengths run by both")
    ap.add_argument("--kvlab-lengths", default="16384,32768", help="lengths run by kvlab only")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.child[2])
        return
    from kvlab.bench import save_random_hf
    from kvlab.config import ModelConfig
    from kvlab.units import fmt_bytes, table

    rows, out = [], []
    with tempfile.TemporaryDirectory() as ckpt:
        save_random_hf(ModelConfig.load(SPEC), ckpt)
        plan = [(impl, int(n)) for n in args.lengths.split(",") for impl in ("kvlab", "transformers")]
        plan += [("kvlab", int(n)) for n in args.kvlab_lengths.split(",") if n]
        for impl, n in plan:
            p = subprocess.run([sys.executable, __file__, "--child", impl, str(n), ckpt], check=False,
                               capture_output=True, text=True)
            if p.returncode:
                r = {"impl": impl, "length": n, "error": (p.stderr.strip().splitlines() or ["killed"])[-1][:200]}
                rows.append([impl, n, "-", "-", r["error"]])
            else:
                r = json.loads(p.stdout.strip().splitlines()[-1])
                rows.append([impl, n, f"{r['seconds']:.1f} s", fmt_bytes(r["peak_rss_bytes"]),
                             fmt_bytes(r["peak_rss_bytes"] - r["rss_before_bytes"])])
            out.append(r)
            print(rows[-1], file=sys.stderr)
    print(table(["implementation", "tokens", "forward", "peak RSS", "added by the forward"], rows))
    print(json.dumps({"model": str(SPEC.name), "results": out}))


if __name__ == "__main__":
    main()
