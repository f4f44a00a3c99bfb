"""Needle retrieval through quantized K/V caches on a real model (not part of CI): kvlab.eval's needle test (real
text, one sentence ``The secret number of {name} is {number}.`` at each depth, asked for at the end, exact match of
the greedy continuation) run once through the unquantized cache and then through each format, same weights, same
needles (same seed), one model load.

    PYTHONPATH=. .venv/bin/python benchmarks/kv_quant_needle.py smollm2-135m --lengths 1k,2k,4k \\
        --depths 0.1,0.5,0.9 --trials 2 --formats int8-g32,int4-g32-rot --json out/needle.json

Prints, per cache, the accuracy per (length, depth), the overall accuracy (correct / trials, with its exact 95%
Clopper-Pearson interval: a few trials per cell bound the accuracy loosely) and how many answers equal the
unquantized cache's (the same greedy continuation, right or wrong), then one JSON line (also written to --json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from scipy.stats import binomtest

import kvlab
from kvlab.cli.common import add_threads, setup_threads
from kvlab.cli.evaluate import parse_depths
from kvlab.eval import default_corpus, needle_test, with_kv_quant
from kvlab.tokenizer import load_tokenizer
from kvlab.units import parse_contexts, table


def agreement(ref: list[dict], other: list[dict]) -> float:
    """Fraction of trials whose greedy continuation equals the reference's (the same prompts, in the same order)."""
    same = [a["generated"].strip() == b["generated"].strip() for a, b in zip(ref, other, strict=True)]
    return sum(same) / len(same)


def correct_ci(answers: list[dict], level: float = 0.95) -> dict:
    """Correct answers out of all trials and the exact (Clopper-Pearson) interval of the accuracy at ``level``."""
    k, n = sum(bool(a["correct"]) for a in answers), len(answers)
    ci = binomtest(k, n).proportion_ci(confidence_level=level, method="exact")
    return {"correct": k, "trials_total": n, "ci_low": float(ci.low), "ci_high": float(ci.high)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--formats", required=True, help="comma-separated kv_quant formats")
    ap.add_argument("--lengths", default="1k,2k,4k", help="context lengths (tokens, the question included)")
    ap.add_argument("--depths", default="0.1,0.5,0.9", help="needle depths, fractions of the context")
    ap.add_argument("--trials", type=int, default=1, help="needles per (length, depth), each its own name and number")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the results here (after every cache: a partial run keeps what it measured)")
    add_threads(ap)
    args = ap.parse_args()
    setup_threads(args)
    lengths, depths = parse_contexts(args.lengths), parse_depths(args.depths)
    model = kvlab.load(args.model, dtype=torch.float32).eval()
    tok = load_tokenizer(args.model)
    corpus = default_corpus()
    ground = {"model": args.model, "text": corpus.name, "text_sha256": corpus.sha256, "weights": "float32",
              "cache": "float32 + the format", "lengths": lengths, "depths": depths, "trials": args.trials,
              "seed": args.seed, "max_positions": model.config.max_positions,
              "threads": torch.get_num_threads()}
    results: list[dict] = []
    for fmt in ["none", *args.formats.split(",")]:
        m = model if fmt == "none" else with_kv_quant(model, fmt)
        t0 = time.time()
        r = needle_test(m, tok, corpus.text, lengths, depths, args.trials, args.seed)
        row = {"format": fmt, **r.as_dict(), **correct_ci(r.answers), "seconds": time.time() - t0}
        row["same_as_unquantized"] = agreement(results[0]["answers"], r.answers) if results else 1.0
        results.append(row)
        print(f"{fmt:24s} overall {r.overall:.1%}  same answers as unquantized {row['same_as_unquantized']:.0%}  "
              f"({row['seconds']:.0f} s)", file=sys.stderr, flush=True)
        if args.json:
            tmp = Path(args.json + ".tmp")  # replaced whole: a run stopped mid-write keeps the last cache's file
            tmp.write_text(json.dumps({"ground": ground, "results": results}, indent=1))
            tmp.replace(args.json)
    head = ["cache", "length", *(f"depth {d:.0%}" for d in depths)]
    rows = [[r["format"] if i == 0 else "", f"{n:,}", *(f"{a:.0%}" for a in acc)]
            for r in results for i, (n, acc) in enumerate(zip(r["lengths"], r["accuracy"]))]
    print(f"needle retrieval, {args.model}, {corpus.name}: exact match, {args.trials} trial(s) per cell, seed "
          f"{args.seed}")
    print(table(head, rows))
    print(table(["cache", "overall", "correct", "95% CI", "same answers as unquantized", "seconds"],
                [[r["format"], f"{r['overall']:.1%}", f"{r['correct']}/{r['trials_total']}",
                  f"{r['ci_low']:.0%}-{r['ci_high']:.0%}", f"{r['same_as_unquantized']:.0%}", f"{r['seconds']:.0f}"]
                 for r in results]))
    print(json.dumps({"ground": ground, "summary": [{k: r[k] for k in ("format", "overall", "accuracy",
                                                                        "correct", "trials_total", "ci_low", "ci_high",
                                                                        "same_as_unquantized", "seconds")}
                                                     for r in results]}))


if __name__ == "__main__":
    main()
