"""Bytes per element of the dtypes kvlab prices, by name or ``torch.dtype`` (without importing torch)."""

from __future__ import annotations

from typing import Any

# name -> bytes per element; aliases map onto these canonical names.
DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2, "float8": 1, "int8": 1, "float64": 8}
DTYPE_ALIASES: dict[str, str] = {
    "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16", "half": "float16",
    "float32": "float32", "fp32": "float32", "float": "float32", "float8": "float8", "fp8": "float8",
    "float8_e4m3fn": "float8", "float8_e5m2": "float8", "int8": "int8", "float64": "float64", "fp64": "float64",
}


def dtype_bytes(dtype: Any) -> tuple[str, int]:
    """``(canonical name, bytes per element)`` for a dtype name or a ``torch.dtype``; ValueError if unknown."""
    key = dtype
    if not isinstance(dtype, str):
        key = str(dtype).removeprefix("torch.") if type(dtype).__name__ == "dtype" else None
    name = DTYPE_ALIASES.get(key.lower()) if isinstance(key, str) else None
    if name is None:
        allowed = ", ".join(sorted(DTYPE_ALIASES))
        raise ValueError(f"dtype={dtype!r}: allowed: {allowed} (or the matching torch.dtype)")
    return name, DTYPE_BYTES[name]
