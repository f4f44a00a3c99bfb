"""``kvlab generate``: text from a checkpoint directory, greedy at temperature 0, optionally streamed."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from kvlab.cli.common import add_dtype_and_json, emit_json
from kvlab.units import parse_dtype

NAME = "generate"
HELP = "generate text from a checkpoint directory (greedy at temperature 0)"
EXAMPLE = 'kvlab generate ./ckpt --prompt "The capital of France is" --max-new-tokens 16 --stream'


def add_arguments(q: argparse.ArgumentParser) -> None:
    q.add_argument("model", help="checkpoint directory (config.json + safetensors [+ tokenizer.json])")
    q.add_argument("--prompt", help="text prompt (needs tokenizer.json in the directory)")
    q.add_argument("--ids", help="prompt as token ids, e.g. 1,2,3 (no tokenizer needed)")
    q.add_argument("--max-new-tokens", type=int, default=32)
    q.add_argument("--temperature", type=float, default=0.0)
    q.add_argument("--top-k", type=int)
    q.add_argument("--top-p", type=float)
    q.add_argument("--seed", type=int)
    q.add_argument("--stop", help="stop token ids, comma-separated")
    q.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    q.add_argument("--device", default="cpu")
    add_dtype_and_json(q, dtype="fp32", json_help="print one JSON object with the ids, text and speed")


def run(args: argparse.Namespace) -> int:
    import torch

    import kvlab
    from kvlab.bench import TORCH_DTYPES, is_checkpoint

    if not is_checkpoint(args.model):
        raise ValueError(f"{args.model!r} is not a checkpoint directory (config.json + *.safetensors)")
    from kvlab.checkpoint import load_tokenizer

    tok = load_tokenizer(args.model)
    if args.ids:
        try:
            ids = [int(x) for x in args.ids.split(",") if x.strip()]
        except ValueError as e:
            raise ValueError(f"--ids {args.ids!r}: expected integers separated by commas, e.g. 1,2,3") from e
        if not ids:
            raise ValueError("--ids is empty")
    elif tok is None:
        raise ValueError(f"{args.model!r} has no tokenizer.json; pass token ids with --ids 1,2,3")
    elif args.prompt is None:
        raise ValueError("give a --prompt (or token ids with --ids)")
    else:
        ids = tok.encode(args.prompt).ids
    model = kvlab.load(args.model, dtype=TORCH_DTYPES[parse_dtype(args.dtype)], device=args.device)
    input_ids = torch.tensor([ids], dtype=torch.long, device=args.device)
    stop = [int(x) for x in args.stop.split(",")] if args.stop else None
    new: list[int] = []
    shown = ""

    def on_token(*cb_args: Any, **_: Any) -> None:
        nonlocal shown
        t = cb_args[-1] if cb_args else None
        if isinstance(t, torch.Tensor):
            new.append(int(t.reshape(-1)[0]))
        elif isinstance(t, int):
            new.append(t)
        else:
            return
        if tok is not None:
            text = tok.decode(new)
            if not text.endswith("\ufffd"):  # wait for a whole character
                print(text[len(shown):], end="", flush=True)
                shown = text
        else:
            print(f"{new[-1]} ", end="", flush=True)

    t0 = time.perf_counter()
    out = kvlab.generate(model, input_ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_tokens=stop,
                         callback=on_token if args.stream and not args.json else None)
    dt = time.perf_counter() - t0
    gen = out[0, len(ids):].tolist()
    text = tok.decode(gen) if tok is not None else None
    if args.json:
        emit_json({"prompt_ids": ids, "output_ids": gen, "text": text, "seconds": dt,
                    "tokens_per_s": len(gen) / dt if dt > 0 else None})
        return 0
    if args.stream:
        print()
    elif text is not None:
        print((args.prompt or "") + text)
    else:
        print(",".join(map(str, gen)))
    print(f"[{len(gen)} tokens in {dt:.2f} s, {len(gen) / dt:.1f} tok/s]", file=sys.stderr)
    return 0
