"""What every verb shares: the model and dtype arguments, config/cost lookups, JSON output, the report stream.

The convention every verb follows: a readable table on standard output by default; with ``--json`` standard
output holds only one JSON object, and tables, notices and progress bars go to standard error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from kvlab import threads
from kvlab.costs import costs, dtype_bytes
from kvlab.costs.quant import resolve_kv_quant
from kvlab.preflight import check_memory
from kvlab.resolve import is_checkpoint, resolve_spec
from kvlab.units import parse_context, parse_dtype, parse_number

MODEL_HELP = ("preset name (see `kvlab presets`), checkpoint directory (transformers layout or a `kvlab train` run), "
              ".gguf file, named model (smollm2-135m, gemma-3-270m), or kvlab ModelConfig .json file")


def add_dtype_and_json(parser: argparse.ArgumentParser, dtype: str = "bf16",
                       json_help: str = "print one JSON object on stdout") -> None:
    """``--dtype`` (default ``dtype``) and ``--json``."""
    parser.add_argument("--dtype", default=dtype, help=f"bf16, fp16 or fp32 (default {dtype})")
    add_json(parser, json_help)


def add_price_dtype_and_json(parser: argparse.ArgumentParser) -> None:
    """``--dtype`` of the weights a calculator verb prices (8-bit weights too) and ``--json``."""
    parser.add_argument("--dtype", help="weights: bf16, fp16, fp32, fp8 or int8 (default: the dtype the checkpoint "
                        "stores, its config.json's dtype, else bf16; the K/V cache follows it, bf16 for 8-bit "
                        "weights, unless --kv-dtype / --kv-quant)")
    add_json(parser)


def parse_price_dtype(text: str | None) -> str | None:
    """A dtype the calculator prices (bf16, fp16, fp32, fp8, int8 and their long names), canonical; None (not
    given): the model's own, as ``kvlab.costs`` picks it."""
    return None if text is None else dtype_bytes(str(text).strip())[0]


THREADS_HELP = ("compute threads (default: $KVLAB_THREADS, else the CPUs this process may use that other work leaves "
                "idle: affinity, cgroup quota, physical cores, load average; kvlab/threads.py)")


def add_threads(parser: argparse.ArgumentParser) -> None:
    """``--threads``: the compute threads; the CLI sets them (or the default) before the verb runs."""
    parser.add_argument("--threads", type=int, help=THREADS_HELP)


def setup_threads(args: argparse.Namespace) -> None:
    """For a verb with ``--threads``: OMP_WAIT_POLICY=PASSIVE on a busy machine (before torch loads, unless the
    user set it), then torch's thread count: ``--threads`` or the default (kvlab/threads.py)."""
    if not hasattr(args, "threads"):
        return

    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads {args.threads}: must be a positive integer")
    plan = threads.machine()
    if args.threads is None and not os.environ.get(threads.ENV):
        threads.prepare_openmp(plan)
    threads.apply(args.threads, plan)


def add_json(parser: argparse.ArgumentParser, help: str = "print one JSON object on stdout") -> None:
    """``--json``: standard output holds only the JSON object; tables and notices go to standard error."""
    parser.add_argument("--json", action="store_true", help=help)


def resolve_config(spec: str) -> Any:
    """A ModelConfig from a preset name, checkpoint directory or ModelConfig .json file."""
    return resolve_spec(spec)


def costs_of(cfg: Any, context: int, dtype: str, batch: int = 1, kv_dtype: str | None = None,
             kv_quant: Any = None) -> Any:
    return costs(cfg, context=context, dtype=dtype, batch=batch, kv_dtype=kv_dtype, kv_quant=kv_quant)


KV_QUANT_HELP = ("quantized K/V cache: int8, int4, fp8, fp4 with options -gN (group), -rN (full-precision residual "
                 "of the last N tokens), -kc (keys per channel, KIVI), -rot (Hadamard-rotated keys), -asym (zero "
                 "points), -rope (rotary channels exact), e.g. int4-g32-r64; or the preset deepseek-v4; per layer "
                 "or component, items joined by '+': int4-g32+0-1=int8+5=none+k_pe=none+3.c_kv=fp8 (layers 0-1 "
                 "int8, layer 5 unquantized, k_pe exact everywhere, layer 3's c_kv fp8)")


def add_kv_dtype(parser: argparse.ArgumentParser, several: bool = False) -> None:
    """``--kv-dtype`` (the cache's full-precision dtype, default ``--dtype``) and ``--kv-quant``."""
    parser.add_argument("--kv-dtype", help="dtype of the K/V cache (and of a quantized cache's residual and exact "
                        "parts): bf16, fp16, fp32, or a quantized format as --kv-quant (default: --dtype)")
    parser.add_argument("--kv-quant", help=KV_QUANT_HELP + (" (comma-separated: one row each)" if several else ""))


def kv_options(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """``(kv_dtype, [kv_quant formats])`` from ``--kv-dtype`` / ``--kv-quant``; a quantized format given as
    ``--kv-dtype`` (``--kv-dtype int8``) is a ``--kv-quant`` (priced with its scales), a float dtype the cache's."""
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


def one_kv_format(args: argparse.Namespace, verb: str) -> tuple[str | None, str | None]:
    """``(kv_dtype, kv_quant or None)`` for a verb that prices one cache format (calc, inspect, fit): ValueError
    naming the verb when ``--kv-quant`` (with ``--kv-dtype``) gives several."""
    kv_dtype, quants = kv_options(args)
    if len(quants) > 1:
        raise ValueError(f"--kv-quant={','.join(quants)}: {verb} prices one format at a time (kvlab compare takes "
                         "several)")
    return kv_dtype, quants[0] if quants else None


def context_or_default(text: str | None, cfg: Any) -> int:
    """``--context`` parsed, or the model's max positions when not given."""
    return parse_context(text) if text is not None else cfg.max_positions


def emit_json(obj: Any) -> None:
    """The one JSON object of a ``--json`` run, on standard output."""
    print(json.dumps(obj, default=str), flush=True)


def report(args: argparse.Namespace) -> TextIO:
    """Where tables and notices go: standard output, or standard error when ``--json`` is given."""
    return sys.stderr if getattr(args, "json", False) else sys.stdout


# -- argument checks shared by the verbs (argparse ``type=`` functions: a bad value exits with 2, naming it) -------
def arg_type(fn: Callable[[str], Any], name: str) -> Callable[[str], Any]:
    """An argparse ``type=`` from ``fn(text)``, whose ValueError message becomes the argument's error message."""
    def parse(text: str) -> Any:
        try:
            return fn(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = name
    return parse


def check_output_file(text: str, flag: str = "path") -> str:
    """A file path to write: not a directory, and no part of its parent is a file."""
    p = Path(text)
    if p.is_dir():
        raise ValueError(f"{flag} {text!r} is a directory; give a file name")
    _parents_are_dirs(p, flag, text)
    return text


def check_output_dir(text: str, flag: str = "path") -> str:
    """A directory to create or reuse: not a file, and no part of its parent is a file."""
    p = Path(text)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{flag} {text!r} is a file; a directory is needed")
    _parents_are_dirs(p, flag, text)
    return text


def _parents_are_dirs(p: Path, flag: str, text: str) -> None:
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{flag} {text!r}: {str(parent)!r} is a file, not a directory")
            return


def output_file(flag: str) -> Callable[[str], str]:
    return arg_type(lambda t: check_output_file(t, flag), "output file")


def output_dir(flag: str) -> Callable[[str], str]:
    return arg_type(lambda t: check_output_dir(t, flag), "output directory")


def check_device(text: str) -> str:
    """A torch device that exists here (``cpu``, ``cuda``, ``cuda:1``, ``mps``); ValueError naming what is available."""
    if text == "cpu":
        return text
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {text!r}: not a device name; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"--device {text!r}: there is no CUDA device here; use --device cpu")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"--device {text!r}: this machine has {n} CUDA device(s): cuda:0 .. cuda:{n - 1}")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"--device {text!r}: MPS is not available here; use --device cpu")
    elif dev.type != "cpu":
        raise ValueError(f"--device {text!r}: kvlab runs on cpu, cuda or mps")
    return text


device_arg = arg_type(check_device, "device")


def positive_number(flag: str) -> Callable[[str], float]:
    """``type=`` for a finite number > 0 (``nan``, ``inf``, 0 and negatives refused, naming ``flag``)."""
    return arg_type(lambda t: parse_number(t, flag), "number")


def add_force(parser: argparse.ArgumentParser) -> None:
    """``--force``: skip the memory preflight (kvlab/preflight.py) and try anyway."""
    parser.add_argument("--force", action="store_true",
                        help="allocate even when the memory preflight says it will not fit")


def preflight_checkpoint(spec: str, batch: int, context: int, dtype: Any, device: str, kv_quant: Any = None) -> None:
    """The memory preflight of loading checkpoint directory ``spec`` and caching ``batch`` x ``context`` positions
    (quantized as ``kv_quant``), before anything is read (other model kinds are checked when their cache is built)."""
    if not is_checkpoint(spec):
        return
    cfg = resolve_spec(spec)
    check_memory(cfg, batch, min(context, cfg.max_positions), dtype, device, weights=True, what=str(spec),
                 kv_quant=kv_quant)


def describe_error(e: BaseException) -> str:
    """One line for an exception: a ValueError's own message (kvlab's named errors); a file-system error with the
    path and its reason; anything else with its type, as it is not an input kvlab expected."""
    if isinstance(e, ValueError):
        return str(e)
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename!r}: {e.strerror}" if e.filename else e.strerror
    if isinstance(e, MemoryError):
        return "out of memory (the memory preflight let this through: lower the batch or the context)"
    return f"{type(e).__name__}: {e}"
