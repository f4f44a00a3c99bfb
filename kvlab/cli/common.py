"""What every verb shares: the model and dtype arguments, config/cost lookups, JSON output, the report stream.

The convention every verb follows: a readable table on standard output by default; with ``--json`` standard
output holds only one JSON object, and tables, notices and progress bars go to standard error.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

from kvlab.units import parse_context

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


def costs_of(cfg: Any, context: int, dtype: str, batch: int = 1) -> Any:
    from kvlab.costs import costs

    return costs(cfg, context=context, dtype=dtype, batch=batch)


def context_or_default(text: str | None, cfg: Any) -> int:
    """``--context`` parsed, or the model's max positions when not given."""
    return parse_context(text) if text is not None else cfg.max_positions


def emit_json(obj: Any) -> None:
    """The one JSON object of a ``--json`` run, on standard output."""
    print(json.dumps(obj, default=str), flush=True)


def report(args: argparse.Namespace) -> TextIO:
    """Where tables and notices go: standard output, or standard error when ``--json`` is given."""
    return sys.stderr if getattr(args, "json", False) else sys.stdout
