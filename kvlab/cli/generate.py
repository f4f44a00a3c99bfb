"""``kvlab generate``: text from a model, greedy at temperature 0, optionally streamed; ``--chat`` applies the
model's chat template and stops at the end of the turn."""

from __future__ import annotations

import argparse
import sys
import time

import kvlab
from kvlab.cli.common import (
    add_dtype_and_json,
    add_force,
    add_kv_dtype,
    add_threads,
    device_arg,
    emit_json,
    one_kv_format,
    preflight_checkpoint,
)
from kvlab.costs.quant import quant_name, resolve_kv_quant
from kvlab.units import parse_dtype

NAME = "generate"
HELP = "generate text from a model (checkpoint directory, .gguf file or named model; greedy at temperature 0)"
EXAMPLE = ('kvlab generate smollm2-135m --chat "What is the capital of France?" --stream\n'
           '  kvlab generate smollm2-135m --prompt "def fib(n):" --kv-quant int4-g32-r64-kc-asym   # quantized K/V')
MODEL_HELP = "checkpoint directory (config.json + safetensors [+ tokenizer.json]), .gguf file or named model"


def add_sampling_arguments(q: argparse.ArgumentParser) -> None:
    """Arguments ``generate`` and ``chat`` share: sampling, stop tokens, device, dtype."""
    q.add_argument("--max-new-tokens", type=int, default=None, help="default: 32 (--prompt/--ids), 256 (--chat)")
    q.add_argument("--temperature", type=float, default=0.0)
    q.add_argument("--top-k", type=int)
    q.add_argument("--top-p", type=float)
    q.add_argument("--seed", type=int)
    q.add_argument("--stop", help="stop token ids, comma-separated (default: the model's end-of-turn / EOS ids; "
                                  "'none' to run to --max-new-tokens)")
    q.add_argument("--device", type=device_arg, default="cpu")
    add_kv_dtype(q)
    add_threads(q)
    add_force(q)


def kv_quant_of(args: argparse.Namespace, verb: str) -> str | None:
    """The cache's ``kv_quant`` from ``--kv-quant`` / ``--kv-dtype`` (one format; checked now, before any weight is
    read). A float ``--kv-dtype`` must be ``--dtype``: a kvlab cache holds the model's dtype."""
    kv_dtype, kv_quant = one_kv_format(args, verb)
    if kv_dtype is not None and kv_dtype != parse_dtype(args.dtype):
        raise ValueError(f"--kv-dtype {args.kv_dtype}: kvlab {verb}'s cache holds the model's dtype (--dtype "
                         f"{args.dtype}); give --dtype {args.kv_dtype} for a {args.kv_dtype} cache, or a quantized "
                         "format (--kv-quant int8, int4-g32-r64...)")
    return kv_quant


def add_arguments(q: argparse.ArgumentParser) -> None:
    q.add_argument("model", help=MODEL_HELP)
    q.add_argument("--prompt", help="text prompt, continued as is")
    q.add_argument("--chat", metavar="MESSAGE", help="a user message, rendered with the model's chat template")
    q.add_argument("--system", help="system message for --chat")
    q.add_argument("--ids", help="prompt as token ids, e.g. 1,2,3 (no tokenizer needed)")
    add_sampling_arguments(q)
    q.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    q.add_argument("--compile", action="store_true", help="run the decode step through torch.compile (inductor): "
                   "the first step compiles (reported apart), the steps after run faster")
    add_dtype_and_json(q, dtype="fp32", json_help="print one JSON object with the ids, text and speed")


def stop_ids(args: argparse.Namespace, tok) -> list[int]:
    """``--stop`` parsed, or the tokenizer's own stop ids."""
    if args.stop is None:
        return list(tok.stop_ids) if tok is not None else []
    if args.stop.strip().lower() == "none":
        return []
    try:
        return [int(x) for x in args.stop.split(",") if x.strip()]
    except ValueError as e:
        raise ValueError(f"--stop {args.stop!r}: expected token ids separated by commas, or 'none'") from e


def load(args: argparse.Namespace):
    """The model and its tokenizer (None when a checkpoint directory has no tokenizer.json)."""
    return load_model(args), tokenizer_of(args)


def load_model(args: argparse.Namespace):
    from kvlab.bench import TORCH_DTYPES

    return kvlab.load(args.model, dtype=TORCH_DTYPES[parse_dtype(args.dtype)], device=args.device)


def tokenizer_of(args: argparse.Namespace):
    """The model's tokenizer; None when it has none and token ids are given (a bare GGUF still runs)."""
    from kvlab.tokenizer import TokenizerError, load_tokenizer

    try:
        return load_tokenizer(args.model)
    except TokenizerError:
        if not getattr(args, "ids", None):
            raise
        return None


def _prompt_ids(args: argparse.Namespace, tok) -> list[int]:
    given = [f"--{k}" for k in ("prompt", "chat", "ids") if getattr(args, k) is not None]
    if len(given) > 1:
        raise ValueError(f"{' and '.join(given)} together: give one prompt (--prompt text, --chat message or --ids)")
    if not given:
        raise ValueError("give a --prompt, a --chat message or token ids with --ids")
    if args.system is not None and args.chat is None:
        raise ValueError("--system goes with --chat")
    if args.ids is not None:
        try:
            ids = [int(x) for x in args.ids.split(",") if x.strip()]
        except ValueError as e:
            raise ValueError(f"--ids {args.ids!r}: expected integers separated by commas, e.g. 1,2,3") from e
        if not ids:
            raise ValueError("--ids is empty")
        return ids
    if tok is None:
        raise ValueError(f"{str(args.model)!r} has no tokenizer.json; pass token ids with --ids 1,2,3")
    if args.chat is not None:
        msgs = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.chat}]
        ids = tok.encode_chat(msgs)
    else:
        ids = tok.encode(args.prompt)
    if not ids:
        flag = "--chat" if args.chat is not None else "--prompt"
        raise ValueError(f"{flag} {getattr(args, flag[2:])!r} encodes to no tokens; give a non-empty prompt")
    return ids


def run(args: argparse.Namespace) -> int:
    import torch

    from kvlab.bench import TORCH_DTYPES
    from kvlab.tokenizer import TextStream

    if args.max_new_tokens is None:
        args.max_new_tokens = 256 if args.chat is not None else 32
    kv_quant = kv_quant_of(args, "generate")
    tok = tokenizer_of(args)
    ids = _prompt_ids(args, tok)
    # the memory preflight (weights + cache), before any weight is read
    preflight_checkpoint(args.model, 1, len(ids) + args.max_new_tokens, TORCH_DTYPES[parse_dtype(args.dtype)],
                         args.device, kv_quant=kv_quant)
    model = load_model(args)
    if len(ids) + args.max_new_tokens > model.config.max_positions:
        raise ValueError(f"prompt of {len(ids)} tokens + --max-new-tokens {args.max_new_tokens} exceeds the model's "
                         f"max_positions={model.config.max_positions}")
    stops = stop_ids(args, tok)
    input_ids = torch.tensor([ids], dtype=torch.long, device=args.device)
    stream = args.stream and not args.json
    if stream and tok is not None:
        callback = TextStream(tok, lambda s: print(s, end="", flush=True), stops)
    elif stream:
        def callback(t):
            print(f"{int(t.reshape(-1)[0])} ", end="", flush=True)
    else:
        callback = None
    t0 = time.perf_counter()
    stats: dict = {}
    out = kvlab.generate(model, input_ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_tokens=stops, callback=callback,
                         compile=args.compile, stats=stats, kv_quant=kv_quant)
    dt = time.perf_counter() - t0
    gen = out[0, len(ids):].tolist()
    shown = gen[:-1] if gen and gen[-1] in stops else gen  # the stop token ends the text, it is not part of it
    text = tok.decode(shown) if tok is not None else None
    if args.json:
        emit_json({"prompt_ids": ids, "output_ids": gen, "text": text, "stopped": len(shown) < len(gen),
                   "kv_quant": quant_name(resolve_kv_quant(kv_quant)),
                   "seconds": dt, "tokens_per_s": len(gen) / dt if dt > 0 else None, **speed(stats)})
        return 0
    if stream:
        print()
    elif text is not None:
        print((args.prompt or "") + text)
    else:
        print(",".join(map(str, gen)))
    sp = speed(stats)
    steady = (f"; {'compiled' if args.compile else 'eager'} decode {sp['decode_tok_s']:.1f} tok/s after a first step "
              f"of {sp['first_step_s']:.2f} s" + (f"; {sp['compiles']} graph(s) compiled" if args.compile else "")
              if sp["decode_tok_s"] is not None else "")
    kv = f"; K/V cache {quant_name(resolve_kv_quant(kv_quant))}" if kv_quant else ""
    print(f"[{len(gen)} tokens in {dt:.2f} s, {len(gen) / dt:.1f} tok/s{steady}{kv}]", file=sys.stderr)
    return 0


def speed(stats: dict) -> dict:
    """``generate``'s stats as reported: the first decode step (the compile, when compiled) apart from the steady
    decode rate of the steps after it (batch 1)."""
    rest = stats["decode_steps"] - 1
    after = stats["decode_s"] - stats["first_step_s"]
    return {"compiled": stats["compiled"], "compiles": stats["compiles"], "prefill_s": stats["prefill_s"],
            "first_step_s": stats["first_step_s"] if stats["decode_steps"] else None,
            "decode_tok_s": rest / after if rest > 0 and after > 0 else None}
