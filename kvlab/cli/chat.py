"""``kvlab chat``: a conversation with a model, one user message per line of standard input.

Each turn renders the whole history with the model's chat template, generates the reply (streamed to standard
output) until an end-of-turn token, and keeps the reply in the history for the next turn.
"""

from __future__ import annotations

import argparse
import sys
import time

import kvlab
from kvlab.cli.common import add_dtype_and_json, emit_json
from kvlab.cli.generate import MODEL_HELP, add_sampling_arguments, kv_quant_of, load, stop_ids

NAME = "chat"
HELP = "talk with a model turn by turn (one message per line of stdin; its chat template; the history is kept)"
EXAMPLE = 'printf "Name a colour.\\nAnd another one?\\n" | kvlab chat smollm2-135m'


def add_arguments(q: argparse.ArgumentParser) -> None:
    q.add_argument("model", help=MODEL_HELP)
    q.add_argument("--system", help="system message opening the conversation")
    add_sampling_arguments(q)
    add_dtype_and_json(q, dtype="fp32", json_help="print one JSON object with the whole conversation at the end")


def run(args: argparse.Namespace) -> int:
    import torch

    from kvlab.tokenizer import TextStream

    kv_quant = kv_quant_of(args, "chat")
    model, tok = load(args)
    if tok is None:
        raise ValueError(f"{str(args.model)!r} has no tokenizer.json: kvlab chat needs the model's tokenizer")
    if tok.chat_template is None:
        raise ValueError(f"{str(args.model)!r} has no chat template (a base model?): use kvlab generate --prompt")
    max_new = 256 if args.max_new_tokens is None else args.max_new_tokens
    stops = stop_ids(args, tok)
    history = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    turns = []
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        message = line.rstrip("\n")
        if not message.strip():
            continue
        history.append({"role": "user", "content": message})
        ids = tok.encode_chat(history)
        if len(ids) + max_new > model.config.max_positions:
            raise ValueError(f"the conversation ({len(ids)} tokens) + --max-new-tokens {max_new} exceeds the model's "
                             f"max_positions={model.config.max_positions}")
        stream = None if args.json else TextStream(tok, lambda s: print(s, end="", flush=True), stops)
        t0 = time.perf_counter()
        out = kvlab.generate(model, torch.tensor([ids], device=args.device), max_new_tokens=max_new,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                             stop_tokens=stops, callback=stream, kv_quant=kv_quant)
        dt = time.perf_counter() - t0
        gen = out[0, len(ids):].tolist()
        reply = tok.decode(gen[:-1] if gen and gen[-1] in stops else gen)
        history.append({"role": "assistant", "content": reply})
        turns.append({"user": message, "assistant": reply, "prompt_tokens": len(ids), "new_tokens": len(gen),
                      "seconds": dt})
        if not args.json:
            print(flush=True)
            print(f"[{len(gen)} tokens in {dt:.2f} s]", file=sys.stderr)
    if args.json:
        emit_json({"turns": turns, "messages": history})
    return 0
