"""Quality of quantized K/V caches on a real model (not part of CI): perplexity, KL divergence and top-1 agreement of
each format against the unquantized cache, on the same tokens, and the format's KV bytes at 32K from the calculator.

    PYTHONPATH=. .venv/bin/python benchmarks/kv_quant_quality.py smollm2-135m --tokens 1024 \\
        --formats int8,int4-g32,int4-g32-r64 --json out.json --plot docs/img/kv-quant-smollm2.png

The reference's log-probabilities are computed once (kvlab.eval's windows, BOS prefix and chunked prefill through
the cache), then each format runs the same windows through ``with_kv_quant`` (same weights, quantized cache).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

import kvlab
from kvlab.costs import costs
from kvlab.eval import default_corpus, with_kv_quant
from kvlab.eval.perplexity import scored_logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=1024, help="text tokens scored (one window)")
    ap.add_argument("--formats", required=True, help="comma-separated kv_quant formats")
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--plot", help="write KV bytes at 32K against KL divergence here (PNG)")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = kvlab.load(args.model, dtype=torch.float32).eval()
    from kvlab.tokenizer import load_tokenizer

    tok = load_tokenizer(args.model)
    corpus = default_corpus()
    ids = tok.encode(corpus.text, special=False)[:args.tokens]
    prefix = tok.encode("", special=True)
    window = len(prefix) + len(ids)
    t0 = time.time()
    ref = [(lr.log_softmax(-1), tgt) for lr, tgt in scored_logits(model, ids, window, None, prefix, args.chunk)]
    nll_ref = torch.cat([-lp.gather(-1, t[:, None])[:, 0].double() for lp, t in ref])
    rows = [{"format": "none", "bits_k": 32, "kv_bytes_32k": costs(model.config, 32768, "float32").kv_cache_bytes,
             "ppl": math.exp(float(nll_ref.mean())), "kl_mean": 0.0, "kl_se": 0.0, "kl_p99": 0.0, "top1": 1.0,
             "seconds": time.time() - t0}]
    print(f"reference: ppl {rows[0]['ppl']:.4f} on {nll_ref.numel()} tokens ({rows[0]['seconds']:.0f} s)",
          file=sys.stderr, flush=True)
    for fmt in args.formats.split(","):
        t0 = time.time()
        var = with_kv_quant(model, fmt)
        kls, agree, nll = [], [], []
        for (lp_r, tgt), (lv, _) in zip(ref, scored_logits(var, ids, window, None, prefix, args.chunk), strict=True):
            lp_v = lv.log_softmax(-1)
            kls.append((lp_r.exp() * (lp_r - lp_v)).sum(-1).clamp(min=0).double())
            agree.append((lp_r.argmax(-1) == lp_v.argmax(-1)).double())
            nll.append(-lp_v.gather(-1, tgt[:, None])[:, 0].double())
        kl, top = torch.cat(kls), torch.cat(agree)
        c = costs(model.config, 32768, "float32", kv_dtype="bfloat16", kv_quant=fmt)
        rows.append({"format": fmt, "kv_bytes_32k": c.kv_cache_bytes,
                     "kv_bytes_32k_bf16": costs(model.config, 32768, "float32", kv_dtype="bfloat16").kv_cache_bytes,
                     "ppl": math.exp(float(torch.cat(nll).mean())), "kl_mean": float(kl.mean()),
                     "kl_se": float(kl.std() / math.sqrt(kl.numel())), "kl_p99": float(kl.quantile(0.99)),
                     "top1": float(top.mean()), "seconds": time.time() - t0})
        r = rows[-1]
        print(f"{fmt:24s} ppl {r['ppl']:.4f} ({100 * (r['ppl'] / rows[0]['ppl'] - 1):+.2f}%)  KL {r['kl_mean']:.5f} "
              f"± {r['kl_se']:.5f}  top-1 {100 * r['top1']:.2f}%  KV@32K {r['kv_bytes_32k'] / 2**20:.1f} MiB "
              f"({r['seconds']:.0f} s)", file=sys.stderr, flush=True)
        if args.json:  # after every format: a partial run keeps what it measured
            ground = {"model": args.model, "text": corpus.describe(len(ids)), "text_sha256": corpus.sha256,
                      "tokens_scored": int(nll_ref.numel()), "window": window, "chunk": args.chunk,
                      "weights": "float32", "cache": "float32 + the format", "seed": 0}
            with open(args.json, "w") as f:
                json.dump({"ground": ground, "rows": rows}, f, indent=1)
    if args.plot:
        plot(rows, args.model, int(nll_ref.numel()), args.plot)


def plot(rows: list[dict], model: str, tokens: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for r in rows[1:]:
        ax.scatter(r["kv_bytes_32k"] / 2**20, max(r["kl_mean"], 1e-6), s=30)
        ax.annotate(r["format"], (r["kv_bytes_32k"] / 2**20, max(r["kl_mean"], 1e-6)), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    ax.axvline(rows[1]["kv_bytes_32k_bf16"] / 2**20, ls=":", c="grey", label="bf16 cache")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("KV cache at 32K tokens (MiB, calculator; residual and scales included)")
    ax.set_ylabel("KL(unquantized || quantized), nats/token")
    ax.set_title(f"{model}: quantized K/V cache, {tokens} tokens of stdlib docstrings")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
