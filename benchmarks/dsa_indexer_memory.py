"""DeepSeek V3.2's DSA indexer on one prefill chunk: peak memory and time of scoring all heads at once vs in blocks.

The indexer (kvlab/layers/mla.py ``DSAIndexer``) scores every visible key for each query:
``sum_h w_h relu(q_h . k / sqrt(d))`` over V3.2's 64 heads x 128 channels. All heads at once, a chunk of T queries over
L keys holds ``[1, 64, T, L]`` fp32 scores three times (scores, scaled, relu); ``DSAIndexer.weighted_scores`` scores
blocks of heads of at most ``SCORE_BYTES``. Each variant runs in its own process (peak RSS rise, sampled every 2 ms),
in turns, random inputs (seed 0), one thread; the two outputs' checksums must agree.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/dsa_indexer_memory.py --keys 4096 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def one(variant: str, keys: int, queries: int) -> dict:
    import gc

    import torch

    from kvlab.bench import rss_sampler
    from kvlab.config import MLASpec
    from kvlab.layers.mla import DSAIndexer

    torch.set_num_threads(1)
    m = MLASpec(kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, q_lora_rank=1536,
                index_heads=64, index_head_dim=128, index_topk=2048)  # DeepSeek V3.2's indexer
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, m.index_heads, queries, m.index_head_dim, generator=g)
    k = torch.randn(1, keys, m.index_head_dim, generator=g)
    w = torch.randn(1, queries, m.index_heads, generator=g)
    idx = DSAIndexer(m, hidden=8)

    def at_once() -> torch.Tensor:  # kvlab's code before the blocks, as it was written
        qk = q.float() @ k.float().transpose(-1, -2)[:, None]
        rel = torch.relu(qk * m.index_head_dim ** -0.5)
        return torch.einsum("bhtl,bth->btl", rel, w)

    fn = at_once if variant == "at_once" else (lambda: idx.weighted_scores(q, k, w))
    with torch.inference_mode():
        gc.collect()
        with rss_sampler() as mem:
            t0 = time.perf_counter()
            out = fn()
            dt = time.perf_counter() - t0
    return {"variant": variant, "keys": keys, "queries": queries, "s": dt,
            "peak_rss_rise_mib": (mem["peak"] - mem["start"]) / 2**20, "checksum": out.double().sum().item()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keys", type=int, default=4096)
    ap.add_argument("--queries", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--one", choices=["at_once", "blocks"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one, args.keys, args.queries)))
        return 0
    rows = []
    for _ in range(args.repeats):
        for variant in ("at_once", "blocks"):
            out = subprocess.run([sys.executable, __file__, "--one", variant, "--keys", str(args.keys), "--queries",
                                  str(args.queries)], check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    print("| variant | keys | queries | s | peak RSS rise MiB | checksum |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['keys']} | {r['queries']} | {r['s']:.2f} | {r['peak_rss_rise_mib']:.0f} | "
              f"{r['checksum']:.6e} |")
    print(json.dumps({"runs": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
