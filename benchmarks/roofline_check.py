"""The roofline against the benchmark: predicted vs measured decode tokens/s on this machine.

For every benchmark shape (``benchmarks/*.json``) and context, runs ``kvlab bench``'s loop (random weights,
fp32, batch 1), measures this machine as ``--hardware measured`` does (copy bandwidth, matmul FLOP/s), and
prints the roofline's predicted decode tokens/s beside the measured median, their ratio (measured /
predicted) and the bound; one JSON line last.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/roofline_check.py [--context 512,2k] [--decode-tokens 16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from kvlab.bench import run_bench
from kvlab.hardware import measured, roofline
from kvlab.units import fmt_context, parse_contexts, table

HERE = Path(__file__).parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", default="512,2k")
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int)
    ap.add_argument("shapes", nargs="*", help="benchmark JSON files (default benchmarks/*.json)")
    args = ap.parse_args(argv)
    contexts = parse_contexts(args.context)
    shapes = [Path(s) for s in args.shapes] or sorted(HERE.glob("*.json"))
    rows, out = [], []
    for shape in shapes:
        r = run_bench(str(shape), contexts, decode_tokens=args.decode_tokens, dtype="float32", threads=args.threads,
                      progress=False, log=lambda _m: None)
        from kvlab.resolve import resolve_spec
        from kvlab.shrink import scale_to_fit

        cfg, _ = scale_to_fit(resolve_spec(str(shape)))
        hw = measured("float32")  # measured after the run, as close as possible to its conditions
        for x in r["results"]:
            p = roofline(cfg, hw, context=x["context"] + args.decode_tokens // 2, batch=1, weights_dtype="float32")
            ratio = x["decode_tok_s"] / p.decode_tok_s_per_sequence
            rows.append([shape.stem, fmt_context(x["context"]), f"{p.decode_tok_s_per_sequence:.1f}",
                         f"{x['decode_tok_s']:.1f}", f"{ratio:.2f}", p.decode_bound,
                         f"{hw.bandwidth / 1e9:.1f}", f"{r['copy_bandwidth_bytes_s'] / 1e9:.1f}"])
            out.append({"shape": shape.stem, "context": x["context"], "predicted_tok_s": p.decode_tok_s_per_sequence,
                        "measured_tok_s": x["decode_tok_s"], "ratio": ratio, "bound": p.decode_bound,
                        "decode_bytes": p.decode_bytes, "decode_flops": p.decode_flops,
                        "bandwidth_bytes_s": hw.bandwidth, "matmul_flops_s": hw.flops["float32"],
                        "bench_copy_bandwidth_bytes_s": r["copy_bandwidth_bytes_s"]})
    print(table(["shape", "context", "predicted tok/s", "measured tok/s", "measured/predicted", "bound",
                 "copy GB/s (after)", "copy GB/s (bench)"], rows))
    ratios = [o["ratio"] for o in out]
    print(f"\nmeasured / predicted: median {statistics.median(ratios):.2f}, range {min(ratios):.2f}-{max(ratios):.2f}"
          f" over {len(ratios)} runs (fp32, batch 1, {args.decode_tokens} decode tokens, median step)")
    print(json.dumps({"runs": out, "median_ratio": statistics.median(ratios)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
