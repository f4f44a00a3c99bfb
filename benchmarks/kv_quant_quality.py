"""Quality of quantized K/V caches on a real model (not part of CI): perplexity, KL divergence and top-1 agreement of
each format against the unquantized cache, on the same tokens, and the format's KV bytes at 32K from the calculator.

    PYTHONPATH=. .venv/bin/python benchmarks/kv_quant_quality.py smollm2-135m --tokens 1024 \\
        --formats int8,int4-g32,int4-g32-r64 --json out.json --plot docs/img/kv-quant-smollm2.png

The reference and every format run in lockstep over kvlab.eval's windows (BOS prefix, chunked prefill through each
model's own cache; ``with_kv_quant``: same weights, quantized cache), so the reference's log-probabilities are
computed once and held one chunk at a time (Gemma's 262K vocabulary: 1 MiB per token). With ``--window`` shorter
than ``--tokens`` the text is cut into back-to-back windows, each scored on its own, and the spread of each figure
over the windows (sd over texts) is reported beside its standard error over tokens. ``--replot a.json,b.json``
redraws ``--plot`` from saved results without measuring.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

import kvlab
from kvlab.cli.common import add_threads, setup_threads
from kvlab.costs import costs
from kvlab.eval import default_corpus, with_kv_quant
from kvlab.eval.perplexity import plan_windows, scored_logits


class Timed:
    """An iterator that adds the time spent producing each item to ``seconds``."""

    def __init__(self, it: Iterator):
        self.it, self.seconds = it, 0.0

    def __iter__(self) -> Timed:
        return self

    def __next__(self):
        t0 = time.time()
        try:
            return next(self.it)
        finally:
            self.seconds += time.time() - t0


def summarize(fmt: str, kl: list[torch.Tensor], top: list[torch.Tensor], nll: list[torch.Tensor],
              nll_ref: torch.Tensor, sizes: list[int]) -> dict:
    """Per-token figures (concatenated in text order) -> the row: perplexity, KL mean / se / p99, top-1, and over
    the windows (``sizes`` scored tokens each, those complete so far) each window's KL, top-1 and Δ perplexity."""
    k, t, n = torch.cat(kl), torch.cat(top), torch.cat(nll)
    row = {"format": fmt, "ppl": math.exp(float(n.mean())), "kl_mean": float(k.mean()),
           "kl_se": float(k.std() / math.sqrt(k.numel())) if k.numel() > 1 else 0.0,
           "kl_p99": float(k.quantile(0.99)), "top1": float(t.mean()), "tokens": int(k.numel())}
    wins, at = [], 0
    for s in sizes:
        if at + s > k.numel():
            break
        sl = slice(at, at + s)
        wins.append({"kl": float(k[sl].mean()), "top1": float(t[sl].mean()),
                     "dppl": math.exp(float(n[sl].mean()) - float(nll_ref[sl].mean())) - 1})
        at += s
    row["windows"] = wins
    if len(wins) > 1:
        for key in ("kl", "top1", "dppl"):
            vals = torch.tensor([w[key] for w in wins], dtype=torch.float64)
            row[f"{key}_windows_mean"], row[f"{key}_windows_sd"] = float(vals.mean()), float(vals.std())
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=1024, help="text tokens scored, from the start of the text")
    ap.add_argument("--window", type=int, help="positions per window, BOS included (default: one window of --tokens)")
    ap.add_argument("--formats", help="comma-separated kv_quant formats")
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--json", help="write the results here (rewritten after every chunk: a partial run keeps what it "
                    "measured)")
    ap.add_argument("--plot", help="write KV bytes at 32K against KL divergence here (PNG)")
    ap.add_argument("--replot", help="comma-separated JSON results of this script: draw --plot from them, measure nothing")
    add_threads(ap)
    args = ap.parse_args()
    setup_threads(args)
    if args.replot:
        if not args.plot:
            ap.error("--replot needs --plot")
        runs = [json.loads(Path(p).read_text()) for p in args.replot.split(",")]
        rows = [runs[0]["rows"][0]] + [r for run in runs for r in run["rows"][1:]]
        ground = runs[0]["ground"]
        plot(rows, ground["model"], ground["tokens_scored"], args.plot)
        return
    if not args.formats:
        ap.error("--formats is required")
    fmts = args.formats.split(",")
    torch.manual_seed(0)
    model = kvlab.load(args.model, dtype=torch.float32).eval()
    from kvlab.tokenizer import load_tokenizer

    tok = load_tokenizer(args.model)
    corpus = default_corpus()
    ids = tok.encode(corpus.text, special=False)[:args.tokens]
    prefix = tok.encode("", special=True)
    window = args.window or len(prefix) + len(ids)
    sizes = [w.end - w.score_from for w in plan_windows(len(ids), window, None, len(prefix))]
    gens = [Timed(scored_logits(m, ids, window, None, prefix, args.chunk))
            for m in [model, *(with_kv_quant(model, f) for f in fmts)]]
    ground = {"model": args.model, "text": corpus.describe(len(ids)), "text_sha256": corpus.sha256,
              "tokens_scored": sum(sizes), "window": window, "windows": len(sizes), "window_tokens": sizes,
              "chunk": args.chunk,
              "weights": "float32", "cache": "float32 + the format", "seed": 0, "threads": torch.get_num_threads()}
    bf16 = costs(model.config, 32768, "float32", kv_dtype="bfloat16").kv_cache_bytes
    kv = {f: costs(model.config, 32768, "float32", kv_dtype="bfloat16", kv_quant=f).kv_cache_bytes for f in fmts}
    per = {f: ([], [], []) for f in fmts}  # kl, top-1, nll per chunk
    nll_ref: list[torch.Tensor] = []
    for ref, *outs in zip(*gens, strict=True):
        lp_r, tgt = ref[0].log_softmax(-1), ref[1]
        nll_ref.append(-lp_r.gather(-1, tgt[:, None])[:, 0].double())
        for f, (lv, _) in zip(fmts, outs, strict=True):
            lp_v = lv.log_softmax(-1)
            per[f][0].append((lp_r.exp() * (lp_r - lp_v)).sum(-1).clamp(min=0).double())
            per[f][1].append((lp_r.argmax(-1) == lp_v.argmax(-1)).double())
            per[f][2].append(-lp_v.gather(-1, tgt[:, None])[:, 0].double())
            del lp_v
        n_ref = torch.cat(nll_ref)
        zero = [torch.zeros_like(n_ref)]
        rows = [{**summarize("none", zero, [torch.ones_like(n_ref)], [n_ref], n_ref, sizes), "bits_k": 32,
                 "kv_bytes_32k": costs(model.config, 32768, "float32").kv_cache_bytes, "seconds": gens[0].seconds}]
        rows += [{**summarize(f, *per[f], n_ref, sizes), "kv_bytes_32k": kv[f], "kv_bytes_32k_bf16": bf16,
                  "seconds": g.seconds} for f, g in zip(fmts, gens[1:])]
        print(f"{n_ref.numel()}/{sum(sizes)} tokens: " + ", ".join(f"{r['format']} KL {r['kl_mean']:.5f}"
                                                                   for r in rows[1:]), file=sys.stderr, flush=True)
        if args.json:
            tmp = Path(args.json + ".tmp")  # replaced whole: a run stopped mid-write keeps the last chunk's file
            tmp.write_text(json.dumps({"ground": ground, "rows": rows}, indent=1))
            tmp.replace(args.json)
    print(f"reference: ppl {rows[0]['ppl']:.4f} on {rows[0]['tokens']} tokens in {len(sizes)} window(s) of {window} "
          f"({rows[0]['seconds']:.0f} s)", file=sys.stderr)
    for r in rows[1:]:
        spread = (f"  over {len(sizes)} windows: KL {r['kl_windows_mean']:.5f} sd {r['kl_windows_sd']:.5f}, "
                  f"Δppl sd {100 * r['dppl_windows_sd']:.2f}%" if len(sizes) > 1 else "")
        print(f"{r['format']:24s} ppl {r['ppl']:.4f} ({100 * (r['ppl'] / rows[0]['ppl'] - 1):+.2f}%)  KL "
              f"{r['kl_mean']:.5f} ± {r['kl_se']:.5f}  p99 {r['kl_p99']:.3f}  top-1 {100 * r['top1']:.2f}%  KV@32K "
              f"{r['kv_bytes_32k'] / 2**20:.1f} MiB ({r['seconds']:.0f} s){spread}", file=sys.stderr)
    if args.plot:
        plot(rows, args.model, rows[0]["tokens"], args.plot)


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
