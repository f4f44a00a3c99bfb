"""What every verb shares: the model and dtype arguments, config/cost lookups, JSON output, the report stream.

The convention every verb follows: a readable table on standard output by default; with ``--json`` standard
output holds only one JSON object, and tables, notices and progress bars go to standard error.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

from kvlab.units import parse_context, parse_dtype

MODEL_HELP = ("preset name (see `kvlab presets`), checkpoint directory (transformers layout or a `kvlab train` run), "
              ".gguf file, named model (smollm2-135m, gemma-3-270m), or kvlab ModelConfig .json file")


def add_dtype_and_json(parser: argparse.ArgumentParser, dtype: str = "bf16",
                       json_help: str = "print one JSON object on stdout") -> None:
    """``--dtype`` (default ``dtype``) and ``--json``."""
    parser.add_argument("--dtype", default=dtype, help=f"bf16, fp16 or fp32 (default {dtype})")
    add_json(parser, json_help)


def add_json(parser: argparse.ArgumentParser, help: str = "print one JSON object on stdout") -> None:
    """``--json``: standard output holds only the JSON object; tables and notices go to standard error."""
    parser.add_argument("--json", action="store_true", help=help)


def resolve_config(spec: str) -> Any:
    """A ModelConfig from a preset name, checkpoint directory or ModelConfig .json file."""
    from kvlab.bench import resolve_spec

    return resolve_spec(spec)


def costs_of(cfg: Any, context: int, dtype: str, batch: int = 1, kv_dtype: str | None = None,
             kv_quant: Any = None) -> Any:
    from kvlab.costs import costs

    return costs(cfg, context=context, dtype=dtype, batch=batch, kv_dtype=kv_dtype, kv_quant=kv_quant)


KV_QUANT_HELP = ("quantized K/V cache: int8, int4, fp8, fp4 with options -gN (group), -rN (full-precision residual "
                 "of the last N tokens), -kc (keys per channel, KIVI), -rot (Hadamard-rotated keys), -asym (zero "
                 "points), -rope (rotary channels exact), e.g. int4-g32-r64; or the preset deepseek-v4")


def add_kv_dtype(parser: argparse.ArgumentParser, several: bool = False) -> None:
    """``--kv-dtype`` (the cache's full-precision dtype, default ``--dtype``) and ``--kv-quant``."""
    parser.add_argument("--kv-dtype", help="dtype of the K/V cache (and of a quantized cache's residual and exact "
                        "parts): bf16, fp16, fp32, or a quantized format as --kv-quant (default: --dtype)")
    parser.add_argument("--kv-quant", help=KV_QUANT_HELP + (" (comma-separated: one row each)" if several else ""))


def kv_options(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """``(kv_dtype, [kv_quant formats])`` from ``--kv-dtype`` / ``--kv-quant``; a quantized format given as
    ``--kv-dtype`` (``--kv-dtype int8``) is a ``--kv-quant`` (priced with its scales), a float dtype the cache's."""
    from kvlab.costs.quant import resolve_kv_quant

    kv_dtype = args.kv_dtype
    quants = [q.strip() for q in (args.kv_quant or "").split(",") if q.strip()]
    if kv_dtype is not None:
        try:
            kv_dtype = parse_dtype(kv_dtype)
        except ValueError:
            kv_dtype = None
        if kv_dtype not in ("bfloat16", "float16", "float32", "float64"):
            quants, kv_dtype = [args.kv_dtype.strip(), *quants], None
    for q in quants:
        resolve_kv_quant(q)  # a named error now, before any work
    return kv_dtype, quants


def context_or_default(text: str | None, cfg: Any) -> int:
    """``--context`` parsed, or the model's max positions when not given."""
    return parse_context(text) if text is not None else cfg.max_positions


def emit_json(obj: Any) -> None:
    """The one JSON object of a ``--json`` run, on standard output."""
    print(json.dumps(obj, default=str), flush=True)


def report(args: argparse.Namespace) -> TextIO:
    """Where tables and notices go: standard output, or standard error when ``--json`` is given."""
    return sys.stderr if getattr(args, "json", False) else sys.stdout
