"""Parsing and formatting of sizes: context lengths ("128k"), bytes, counts, FLOPs, plain tables."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from fractions import Fraction

_CONTEXT_RE = re.compile(r"^\s*(\d+(?:\.\d+)?|\d[\d_]*)\s*([kKmMgG]?)\s*$")
_SCALE = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}

DTYPE_ALIASES = {
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp16": "float16", "f16": "float16", "float16": "float16", "half": "float16",
    "fp32": "float32", "f32": "float32", "float32": "float32", "float": "float32",
}


MAX_CONTEXT = 2**53  # the largest length every consumer (JSON readers, float plots) holds exactly


def parse_context(text: str | int) -> int:
    """One context length: ``131072``, ``128k`` (x1024), ``1m`` (x1024**2), ``32K``, ``1.5k``; exact (no float
    rounding) and at most ``MAX_CONTEXT`` tokens."""
    if isinstance(text, bool):
        raise TypeError(f"context length {text!r}: expected a positive integer such as 131072, 128k or 1m")
    if isinstance(text, int):
        value = text
    else:
        if "," in str(text):
            raise ValueError(f"context length {text!r}: expected a single length here, not a list")
        m = _CONTEXT_RE.match(str(text))
        if not m:
            raise ValueError(f"context length {text!r}: expected a positive integer such as 131072, 128k or 1m")
        number, suffix = m.group(1).replace("_", ""), m.group(2).lower()
        if len(number) > 40:  # far past MAX_CONTEXT; Fraction of a huge literal would be slow
            shown = f"{str(text)[:20]}...({len(number)} digits)"
            raise ValueError(f"context length {shown} is larger than the largest supported {MAX_CONTEXT:,} tokens")
        exact = Fraction(number) * _SCALE[suffix]
        if exact.denominator != 1:
            raise ValueError(f"context length {text!r} is not a whole number of tokens ({float(exact)})")
        value = int(exact)
    if value < 1:
        raise ValueError(f"context length {text!r}: must be at least 1 token")
    if value > MAX_CONTEXT:
        raise ValueError(f"context length {text!r} is larger than the largest supported {MAX_CONTEXT:,} tokens")
    return value


def parse_number(text: str | float, name: str, low: float = 0.0, low_open: bool = True) -> float:
    """A finite number above ``low`` (or at least ``low``) from a command-line value; ValueError naming ``name``."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"{name} {text!r}: expected a number") from None
    if not math.isfinite(value) or (value <= low if low_open else value < low):
        raise ValueError(f"{name} {text!r}: expected a finite number {'>' if low_open else '>='} {low:g}")
    return value


def parse_contexts(text: str | int | Iterable[str | int]) -> list[int]:
    """A comma-separated list of context lengths (``"8k,32k,1m"``) or an iterable of them."""
    if isinstance(text, (str, int)):
        parts = [p for p in str(text).split(",")]
    else:
        parts = list(text)
    if not parts or any(str(p).strip() == "" for p in parts):
        raise ValueError(f"context list {text!r}: expected lengths separated by commas, e.g. 8k,32k,128k")
    return [parse_context(p if isinstance(p, int) else p.strip()) for p in parts]


def parse_dtype(text: str) -> str:
    """Canonical dtype name: ``bf16`` -> ``bfloat16``, ``fp32`` -> ``float32``, ``fp16`` -> ``float16``."""
    key = str(text).strip().lower().removeprefix("torch.")
    if key not in DTYPE_ALIASES:
        raise ValueError(f"dtype {text!r}: allowed: bf16, fp16, fp32 (or bfloat16, float16, float32)")
    return DTYPE_ALIASES[key]


def fmt_context(n: int) -> str:
    """The shortest exact spelling of a context length: 131072 -> ``128k``, 1048576 -> ``1m``."""
    if n >= 1024**2 and n % 1024**2 == 0:
        return f"{n // 1024**2}m"
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024}k"
    return str(n)


def fmt_bytes(n: float, exact: bool = False, short: bool = False) -> str:
    """Binary units with 2 decimals (``5.06 GiB``); ``exact`` appends the byte count; ``short`` drops trailing
    zeros for axis labels (``128 MiB``, ``1.5 GiB``)."""
    sign = "-" if n < 0 else ""
    a = abs(n)
    spec = "g" if short else ".2f"
    if a < 1024:
        text = f"{sign}{a:.0f} B" if a == int(a) else f"{sign}{a:{spec}} B"
        return text
    for unit, scale in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if a >= scale:
            text = f"{sign}{a / scale:{spec}} {unit}"
            break
    if exact:
        text += f" ({int(n):,} B)"
    return text


def fmt_count(n: float) -> str:
    """A count with a decimal suffix: 8.03B, 760.50M, 12.30K, 999."""
    sign = "-" if n < 0 else ""
    a = abs(n)
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if a >= scale:
            return f"{sign}{a / scale:.2f}{unit}"
    return f"{sign}{a:.0f}" if a == int(a) else f"{sign}{a:.2f}"


def fmt_flops(n: float) -> str:
    """FLOPs with a decimal prefix: ``32.70 GFLOP``."""
    a = abs(n)
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("KFLOP", 1e3)):
        if a >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} FLOP"


def fmt_rate(n: float, unit: str) -> str:
    """A rate with a decimal prefix: ``12.3 Ktok/s``, ``18.4 GB/s``."""
    a = abs(n)
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if a >= scale:
            return f"{n / scale:.2f} {prefix}{unit}"
    return f"{n:.2f} {unit}"


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], left: int = 1, align: str | None = None) -> str:
    """A plain aligned text table; the first ``left`` columns are left-aligned, the rest right.

    ``align`` (one ``l``/``r`` per column) overrides ``left``.
    """
    cells = [[str(h) for h in headers]] + [[("" if c is None else str(c)) for c in r] for r in rows]
    ncol = max(len(r) for r in cells)
    cells = [r + [""] * (ncol - len(r)) for r in cells]
    widths = [max(len(r[i]) for r in cells) for i in range(ncol)]
    how = (align or "").ljust(ncol, "r") if align else "l" * left + "r" * max(0, ncol - left)

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, how)).rstrip()

    out = [line(cells[0]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


_MEMORY_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?)([bB]?)\s*$")
_MEMORY_UNITS = "80GiB, 80G (binary: GiB), 24GB (decimal: 10^9 bytes), 512MiB, 1.5TiB or a byte count"


def parse_memory(text: str | int) -> int:
    """A memory size in bytes: ``80GiB``/``80G``/``80gi`` (x1024**3), ``24GB`` (x10**9), ``512MiB``, ``1.5TiB``, ``123``.

    A unit with ``i`` or without ``B`` is binary (as nvidia-smi and torch report sizes); ``GB``/``MB``/``TB`` are
    decimal. ValueError names the text and the allowed spellings.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value = float(text)
    else:
        m = _MEMORY_RE.match(str(text))
        if not m:
            raise ValueError(f"memory size {text!r}: expected {_MEMORY_UNITS}")
        number, prefix, binary, byte = m.groups()
        if binary and not prefix:  # "80iB"
            raise ValueError(f"memory size {text!r}: expected {_MEMORY_UNITS}")
        power = " kmgt".index(prefix.lower()) if prefix else 0
        scale = 1000**power if byte and not binary else 1024**power
        value = float(number) * scale
    if value < 1:
        raise ValueError(f"memory size {text!r}: must be at least 1 byte")
    return int(value)
