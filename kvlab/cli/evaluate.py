"""``kvlab eval``: the quality side of a trade-off, measured through the cache on real text.

Perplexity and mean log-likelihood of a model over a text (windows of ``--window`` positions, ``--stride``);
with ``--vs MODEL`` or ``--variant`` (the same weights with other attention windows), the variant's perplexity
and its KL divergence from the model (llama.cpp's convention) on the same tokens; with ``--needle``, retrieval
accuracy of a fact hidden at several depths of contexts of several lengths, as a table and a heat map.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import kvlab
from kvlab.cli.common import (
    add_dtype_and_json,
    add_kv_dtype,
    add_threads,
    device_arg,
    emit_json,
    output_file,
    report,
)
from kvlab.cli.generate import MODEL_HELP, kv_quant_of
from kvlab.units import fmt_context, parse_context, parse_contexts, parse_dtype, table

NAME = "eval"
HELP = "perplexity, KL divergence against a variant, and needle retrieval on real text, through the cache"
EXAMPLE = ("kvlab eval gemma-3-270m --at 1k,2k,4k   |   kvlab eval gemma-3-270m --window 4k --variant global   "
           "|   kvlab eval smollm2-135m --window 2k --variant window=512 --sink-tokens 4   "
           "|   kvlab eval smollm2-135m --needle --lengths 1k,2k --plot out/needle.png   "
           "|   kvlab eval smollm2-135m --tokens 1k --kv-quant int4-g32-r64-kc-asym")


def add_arguments(q: argparse.ArgumentParser) -> None:
    q.add_argument("model", help=MODEL_HELP)
    q.add_argument("--text", help="UTF-8 text file (default: the Python standard library's docstrings, "
                                  "'stdlib-docstrings', which every machine has)")
    q.add_argument("--tokens", help="text tokens to score, from the start of the text (default: one window)")
    q.add_argument("--window", default="1k", help="positions per window, BOS included (default 1k)")
    q.add_argument("--stride", help="text tokens between window starts (default: back to back)")
    q.add_argument("--at", help="perplexity at several lengths from one pass, e.g. 1k,2k,4k: the first N positions of "
                                "one window of the longest (causal attention: the same as a window of N)")
    q.add_argument("--chunk", type=int, default=256, help="prefill chunk: tokens fed to the cache per call")
    who = q.add_mutually_exclusive_group()
    who.add_argument("--vs", metavar="MODEL", help="a variant model (same vocabulary): its perplexity and KL")
    who.add_argument("--variant", help="the same weights with other attention windows: 'window=N' (every layer "
                                       "slides over N positions) or 'global' (no window anywhere); or a quantized "
                                       "K/V cache: 'kv=FORMAT' (e.g. kv=int4-g32-r64-rot; see kvlab calc --help)")
    add_kv_dtype(q)  # --kv-quant FORMAT (or --kv-dtype FORMAT) is --variant kv=FORMAT
    q.add_argument("--sink-tokens", type=int, default=0, metavar="S",
                   help="with --variant window=N: each window layer also keeps the first S positions visible "
                        "(StreamingLLM's attention sinks; default 0)")
    q.add_argument("--needle", action="store_true", help="needle-in-a-haystack retrieval instead of perplexity")
    q.add_argument("--lengths", default="1k,2k,4k", help="needle context lengths (default 1k,2k,4k)")
    q.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths, fractions of the context")
    q.add_argument("--trials", type=int, default=1, help="needle trials per (length, depth), each its own number")
    q.add_argument("--seed", type=int, default=0, help="seed of the needles' names and numbers")
    q.add_argument("--plot", type=output_file("--plot"), help="write the needle heat map (PNG) here")
    q.add_argument("--device", type=device_arg, default="cpu")
    add_threads(q)
    q.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_dtype_and_json(q, dtype="fp32", json_help="print one JSON object with every figure and its ground")


def _variant(spec: str, model: Any, sink_tokens: int = 0) -> Any:
    from kvlab.eval import with_kv_quant, with_window

    s = spec.strip().lower()
    if s.startswith("kv="):
        return with_kv_quant(model, s.split("=", 1)[1])
    if s == "global":
        return with_window(model, None)
    if s.startswith("window="):
        try:
            return with_window(model, parse_context(s.split("=", 1)[1]), sink_tokens)
        except ValueError as e:
            raise ValueError(f"--variant {spec!r}: {e}") from e
    raise ValueError(f"--variant {spec!r}: expected 'window=N', 'global' or 'kv=FORMAT'")


def parse_depths(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise ValueError(f"--depths {text!r}: expected fractions separated by commas, e.g. 0,0.5,1") from e


def run(args: argparse.Namespace) -> int:
    from kvlab.bench import TORCH_DTYPES
    from kvlab.eval import kl_divergence, load_corpus, needle_test, perplexity, perplexity_at, plot_needle
    from kvlab.tokenizer import load_tokenizer

    kv_quant = kv_quant_of(args, "eval")
    if kv_quant is not None:  # the quantized cache is the variant, measured against the unquantized one
        if args.vs is not None or args.variant is not None:
            raise ValueError(f"--kv-quant {kv_quant} with {'--vs' if args.vs is not None else '--variant'}: give one "
                             f"(--kv-quant {kv_quant} is --variant kv={kv_quant}, the quantized cache against the "
                             "unquantized one)")
        args.variant = f"kv={kv_quant}"
    if args.sink_tokens < 0:
        raise ValueError(f"--sink-tokens {args.sink_tokens}: must be a non-negative integer")
    if args.sink_tokens and not (args.variant or "").strip().lower().startswith("window="):
        raise ValueError(f"--sink-tokens {args.sink_tokens}: only with --variant window=N (sink tokens live in window "
                         "layers)")
    out = report(args)
    progress = not args.no_progress
    dtype = TORCH_DTYPES[parse_dtype(args.dtype)]
    corpus = load_corpus(args.text)
    t0 = time.perf_counter()
    model = kvlab.load(args.model, dtype=dtype, device=args.device).eval()
    tok = load_tokenizer(args.model)
    if tok is None:
        raise ValueError(f"{str(args.model)!r} has no tokenizer.json: kvlab eval needs the model's tokenizer")
    variant, vname = None, None
    if args.vs is not None:
        variant, vname = kvlab.load(args.vs, dtype=dtype, device=args.device).eval(), args.vs
    elif args.variant is not None:
        variant = _variant(args.variant, model, args.sink_tokens)
        vname = f"{args.model} ({args.variant}" + (f", {args.sink_tokens} sink tokens)" if args.sink_tokens else ")")
    ids = tok.encode(corpus.text, special=False)
    prefix = tok.encode("", special=True)  # the BOS the tokenizer adds, opening every window
    ground = {"model": str(args.model), "dtype": parse_dtype(args.dtype), "text": corpus.name,
              "provenance": corpus.provenance, "text_sha256": corpus.sha256, "text_tokens": len(ids),
              "bos_prefix": prefix}
    print(f"model: {args.model} ({model.config.name}, {model.num_parameters():,} parameters, {ground['dtype']}); "
          f"loaded in {time.perf_counter() - t0:.1f} s", file=out)
    print(f"text: {corpus.describe(len(ids))}", file=out)
    if args.needle:
        lengths, depths = parse_contexts(args.lengths), parse_depths(args.depths)
        runs = [(str(args.model), model)] + ([(vname, variant)] if variant is not None else [])
        results = {}
        for name, m in runs:
            t1 = time.perf_counter()
            r = needle_test(m, tok, corpus.text, lengths, depths, args.trials, args.seed, progress)
            dt = time.perf_counter() - t1
            results[name] = {**r.as_dict(), "seconds": dt}
            print(f"\nneedle retrieval, {name}: exact-match accuracy, {args.trials} trial(s) per cell, seed "
                  f"{args.seed}; {dt:.1f} s", file=out)
            rows = [[f"{n:,}", *(f"{a:.0%}" for a in row)] for n, row in zip(lengths, r.accuracy)]
            print(table(["length \\ depth", *(f"{d:.0%}" for d in depths)], rows), file=out)
            print(f"overall {r.overall:.1%}", file=out)
            if args.plot:
                path = args.plot if len(runs) == 1 else _suffixed(args.plot, runs.index((name, m)))
                p = plot_needle(r, path, f"{name}: needle in {corpus.name}")
                results[name]["plot"] = str(p)
                print(f"plot: {p}", file=out)
        if args.json:
            emit_json({**ground, "needle": results})
        return 0
    if args.at is not None:
        if variant is not None or args.tokens or args.stride:
            raise ValueError("--at measures one window of the longest length: not with --tokens, --stride, --vs or "
                             "--variant")
        lengths = parse_contexts(args.at)
        t1 = time.perf_counter()
        ps = perplexity_at(model, ids, lengths, prefix, args.chunk, progress)
        dt = time.perf_counter() - t1
        print(f"\nperplexity through the cache at each length: the first N positions of one {max(lengths):,}-position "
              f"window{' (BOS first)' if prefix else ''}; {dt:.1f} s", file=out)
        print(table(["model", "length", "tokens", "perplexity", "± se", "mean log-lik (nats/token)"],
                    [[args.model, f"{n:,}", f"{p.tokens:,}", f"{p.ppl:.4f}", f"{p.ppl_se:.4f}", f"{p.mean_loglik:.5f}"]
                     for n, p in zip(lengths, ps)]), file=out)
        if args.json:
            emit_json({**ground, "perplexity_at": [{"length": n, **p.as_dict()} for n, p in zip(lengths, ps)],
                       "seconds": dt})
        return 0
    window = parse_context(args.window)
    n = min(len(ids), parse_context(args.tokens) if args.tokens else window - len(prefix))
    text = ids[:n]
    stride = parse_context(args.stride) if args.stride else None
    t1 = time.perf_counter()
    if variant is None:
        p = perplexity(model, text, window, stride, prefix, args.chunk, progress)
        dt = time.perf_counter() - t1
        print(f"\nperplexity through the cache: window {window:,} ({fmt_context(window)}), stride {p.stride:,}, "
              f"{p.windows} window(s); {dt:.1f} s", file=out)
        print(table(["model", "tokens", "perplexity", "± se", "mean log-lik (nats/token)"],
                    [[args.model, f"{p.tokens:,}", f"{p.ppl:.4f}", f"{p.ppl_se:.4f}", f"{p.mean_loglik:.5f}"]]),
              file=out)
        if args.json:
            emit_json({**ground, "perplexity": {**p.as_dict(), "seconds": dt}})
        return 0
    k = kl_divergence(model, variant, text, window, stride, prefix, args.chunk, progress)
    dt = time.perf_counter() - t1
    print(f"\nreference vs variant on the same {k.tokens:,} tokens, window {window:,}; {dt:.1f} s", file=out)
    print(table(["model", "perplexity", "mean log-lik"],
                [[args.model, f"{k.ref_ppl:.4f}", f"{-k.ref_nll:.5f}"], [vname, f"{k.variant_ppl:.4f}",
                                                                        f"{-k.variant_nll:.5f}"]]), file=out)
    print(table(["KL(ref || variant), nats/token", "mean", "± se", "median", "p99", "max", "top-1 agreement"],
                [["", f"{k.mean_kl:.6f}", f"{k.kl_se:.6f}", f"{k.median_kl:.6f}", f"{k.p99_kl:.6f}",
                  f"{k.max_kl:.6f}", f"{k.top1:.2%} ± {k.top1_se:.2%}"]]), file=out)
    if args.json:
        emit_json({**ground, "variant": vname, "window": window, "stride": stride,
                   "kl": {**k.as_dict(), "seconds": dt}})
    return 0


def _suffixed(path: str, i: int) -> str:
    p = Path(path)
    return str(p.with_name(f"{p.stem}-{'variant' if i else 'model'}{p.suffix}"))

