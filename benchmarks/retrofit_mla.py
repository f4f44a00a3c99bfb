"""GQA -> MLA on a real model with no training: perplexity, KL against the original and KV bytes per token.

    PYTHONPATH=$PWD python benchmarks/retrofit_mla.py smollm2-135m mla:rank=128,rope=32 mla:rank=256,rope=32

Ground: kvlab's default corpus (docstrings of Python standard-library modules, kvlab/eval/corpus.py); the 2-norm
scores and shared-key directions are measured on tokens [2048, 6144) of it (``--calib``), the model is scored on
its first 2,047 tokens after BOS in one 2,048-position window (as ``kvlab eval MODEL --window 2k --vs CKPT``), fp32,
deterministic (no seeds). Prints one markdown row per technique (the sweep table's format) and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import kvlab
from kvlab.eval import kl_divergence, load_corpus
from kvlab.retrofit import apply
from kvlab.tokenizer import load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("techniques", nargs="+")
    ap.add_argument("--window", type=int, default=2048)
    ap.add_argument("--calib", type=int, default=4096, help="calibration tokens after the scored window (0: weights)")
    ap.add_argument("--save", help="directory prefix: also write each converted checkpoint as PREFIX-<technique>")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = kvlab.load(args.model, dtype=torch.float32).eval()
    tok = load_tokenizer(args.model)
    corpus = load_corpus(None)
    ids = tok.encode(corpus.text, special=False)
    prefix = tok.encode("", special=True)
    text = ids[:args.window - len(prefix)]
    calib = torch.tensor(ids[args.window:args.window + args.calib]) if args.calib else None
    base = kvlab.costs(model.config, context=args.window, dtype="bfloat16")
    print(f"model {args.model}; text: {corpus.describe(len(ids))}; scored {len(text)} tokens, window {args.window}; "
          f"calibration tokens {0 if calib is None else calib.numel()}")
    print("| technique | perplexity: own -> converted | KL(own ‖ converted), nats/token | top-1 agreement | "
          "KV bytes/token (bf16) | KV vs original | seconds |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for t in args.techniques:
        t0 = time.perf_counter()
        with torch.no_grad():
            out = apply(model, t, ids=calib)
            k = kl_divergence(model, out.model.eval(), text, args.window, None, prefix)
        c = kvlab.costs(out.model.config, context=args.window, dtype="bfloat16")
        dt = time.perf_counter() - t0
        per_tok = c.kv_cache_bytes / args.window
        row = {"technique": t, "ref_ppl": k.ref_ppl, "ppl": k.variant_ppl, "kl": k.mean_kl, "kl_se": k.kl_se,
               "top1": k.top1, "top1_se": k.top1_se, "kv_bytes_per_token": per_tok,
               "kv_ratio": c.kv_cache_bytes / base.kv_cache_bytes, "seconds": dt, "notes": out.report.notes}
        rows.append(row)
        print(f"| `{t}` | {k.ref_ppl:.2f} -> {k.variant_ppl:.2f} | {k.mean_kl:.3f} ± {k.kl_se:.3f} | "
              f"{k.top1:.1%} ± {k.top1_se:.1%} | {per_tok:,.0f} | {row['kv_ratio']:.3f}x | {dt:.0f} |", flush=True)
        if args.save:
            kvlab.save(out.model, f"{args.save}-{t.replace(':', '-').replace(',', '-').replace('=', '')}", tok,
                       extra={"retrofit.json": out.report.to_dict()})
    print(json.dumps({"model": args.model, "original_kv_bytes_per_token": base.kv_cache_bytes / args.window,
                      "text_sha256": corpus.sha256, "rows": rows}))


if __name__ == "__main__":
    main()
