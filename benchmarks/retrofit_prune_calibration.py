"""How much the calibration text moves a training-free head pruning of SmolLM2-135M (``prune-heads:0.67``).

``prune-heads`` keeps the query heads with the largest contribution norm measured on some text (kvlab/retrofit/heads.py).
``kvlab retrofit`` measures it on the first 4,096 tokens of the training text (disjoint from the evaluation corpus);
before commit 8f343d9 it measured on tokens 2,048-6,143 of the evaluation corpus itself. This script converts with
each and measures both as ``kvlab retrofit`` does (perplexity and KL against the original over the first 2,048
positions of the default corpus). Prints one line per calibration, then one JSON line.

    nice -n 10 flock /tmp/kvlab-heavy.lock .venv/bin/python benchmarks/retrofit_prune_calibration.py
"""

from __future__ import annotations

import json
import time

import kvlab
from kvlab.eval.corpus import default_corpus
from kvlab.retrofit import apply
from kvlab.retrofit.report import measure
from kvlab.tokenizer import load_tokenizer
from kvlab.train.text import training_corpus


def main() -> None:
    t0 = time.perf_counter()
    ref = kvlab.load("smollm2-135m").eval()
    tok = load_tokenizer("smollm2-135m")
    ids = tok.encode(default_corpus().text, special=False)
    prefix = tok.encode("", special=True)
    calibrations = {
        "evaluation corpus, tokens 2048-6143 (before 8f343d9)": ids[2048:2048 + 4096],
        "training text, first 4096 tokens (now)": tok.encode(training_corpus().text[:200_000], special=False)[:4096],
    }
    rows = []
    for name, calib in calibrations.items():
        model = apply(ref, "prune-heads:0.67", ids=calib).model
        r = measure(ref, model, ids, prefix, 2048, decode_context=0)
        rows.append({"calibration": name, "ppl": r["ppl"], "kl": r["kl"], "kl_se": r["kl_se"], "top1": r["top1"]})
        print(f"{name:55s} ppl {r['ppl']:8.3f}  KL {r['kl']:.4f} ± {r['kl_se']:.4f}  top-1 {r['top1']:.1%}", flush=True)
    print(json.dumps({"model": "smollm2-135m", "technique": "prune-heads:0.67", "eval_positions": 2048,
                      "rows": rows, "wall_s": time.perf_counter() - t0}))


if __name__ == "__main__":
    main()
