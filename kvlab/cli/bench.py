"""``kvlab bench``: prefill/decode throughput, memory, measured vs calculated cache bytes, bandwidth use."""

from __future__ import annotations

import argparse

from kvlab.cli.common import (
    KV_QUANT_HELP,
    MODEL_HELP,
    add_dtype_and_json,
    add_force,
    add_threads,
    device_arg,
    emit_json,
    positive_number,
    report,
)
from kvlab.units import parse_contexts

NAME = "bench"
HELP = "prefill/decode throughput, memory, measured vs calculated cache bytes, bandwidth use"
EXAMPLE = ("kvlab bench llama-3.1-8b --context 1k,4k --decode-tokens 32 --json\n"
           "  kvlab bench benchmarks/qwen3-100m.json --context 4k,16k --kv-dtype fp32,bf16,int8,int4\n"
           "  kvlab bench ./ckpt --context 4k --vs transformers\n"
           "  kvlab bench benchmarks/qwen3-100m.json --context 1k,16k --kv-dtype fp32,bf16 --compile\n"
           "  kvlab bench benchmarks/qwen3-100m.json --context 16k --kv-dtype fp32,int8,int4 --fused\n"
           "  kvlab bench benchmarks/qwen3-100m.json --context 16k --device cuda --compile --vs transformers")


def add_arguments(q: argparse.ArgumentParser) -> None:
    q.add_argument("model", help=MODEL_HELP + " (a preset is built with random weights, scaled down to fit)")
    q.add_argument("--context", default="4k", help="comma-separated prompt lengths (default 4k)")
    q.add_argument("--decode-tokens", type=int, default=32)
    q.add_argument("--batch", type=int, default=1)
    q.add_argument("--prefill-chunk", type=int, default=512)
    add_threads(q)
    q.add_argument("--kv-dtype", help="comma-separated K/V cache formats, one run each: fp32, bf16, fp16 (the model "
                   "and its cache in that dtype) or a quantized format (the model in --dtype): " + KV_QUANT_HELP)
    q.add_argument("--kv-quant", help="quantized cache formats, comma-separated (appended to --kv-dtype's)")
    q.add_argument("--compile", action="store_true", help="also run the decode step through torch.compile "
                   "(inductor) and print eager and compiled side by side, with the compile time")
    q.add_argument("--fused", action="store_true", help="also decode each quantized cache with fused attention "
                   "(new_cache(fused=True): int8/int4 codes attended by one torch.compile kernel, compiled on the first "
                   "step, reported apart) and print the default (on the CPU: kvlab's C++ kernel) and fused side by "
                   "side (with --compile, both compiled lanes)")
    q.add_argument("--vs", choices=["transformers"], help="run the same loop in transformers and print ratios")
    q.add_argument("--max-weight-gib", type=positive_number("--max-weight-gib"), default=4.0,
                   help="scale a preset down until its weights fit in this many GiB (default 4)")
    q.add_argument("--bandwidth-mib", type=int, default=256,
                   help="buffer size of the copy-bandwidth measurement in MiB (default 256)")
    q.add_argument("--device", type=device_arg, default="cpu", help="where the models and caches run: cpu (default), "
                   "cuda, cuda:N (the clock is read after a device synchronisation, memory from torch.cuda)")
    q.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    add_force(q)
    add_dtype_and_json(q, dtype="fp32", json_help="print all figures as one JSON object on stdout (the card goes to stderr)")


def kv_list(args: argparse.Namespace) -> list[str] | None:
    """The ``--kv-dtype`` and ``--kv-quant`` entries in order; None when neither is given."""
    items = [x.strip() for opt in (args.kv_dtype, args.kv_quant) for x in (opt or "").split(",") if x.strip()]
    return items or None


def run(args: argparse.Namespace) -> int:
    from kvlab.bench import format_card, run_bench

    r = run_bench(args.model, parse_contexts(args.context), decode_tokens=args.decode_tokens, dtype=args.dtype,
                  threads=args.threads, vs=args.vs, batch=args.batch, prefill_chunk=args.prefill_chunk,
                  weight_budget=int(args.max_weight_gib * 1024**3), bandwidth_bytes=args.bandwidth_mib * 1024**2,
                  progress=not args.no_progress, kv_dtypes=kv_list(args), compile=args.compile, device=args.device,
                  fused=args.fused)
    print(format_card(r), file=report(args))
    if args.json:
        emit_json(r)
    return 0
