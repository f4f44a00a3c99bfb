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


def kv_dtype_for(dtype: Any, kv_dtype: Any = None) -> tuple[str, int]:
    """``(name, bytes)`` of the K/V cache's dtype: ``kv_dtype`` when given, else the weights' ``dtype``, except that
    8-bit weights (fp8, int8) cache bf16 activations (weight-only quantization computes in bf16: vLLM's
    ``kv_cache_dtype="auto"`` is the model's activation dtype)."""
    if kv_dtype is not None:
        return dtype_bytes(kv_dtype)
    name, elt = dtype_bytes(dtype)
    return dtype_bytes("bfloat16") if elt == 1 else (name, elt)


def model_dtype(model: Any) -> str | None:
    """The dtype a loaded model's weights (and so its cache) are held in, read without importing torch: the
    token embedding's (what ``Model.new_cache`` allocates in), else the first parameter's; None for anything
    that is not a module with parameters (a ModelConfig, a preset name, a path)."""
    weight = getattr(getattr(model, "embed", None), "weight", None)
    if weight is None:
        params = getattr(model, "parameters", None)
        if not callable(params):
            return None
        weight = next(iter(params()), None)
    dt = getattr(weight, "dtype", None)
    return None if dt is None else dtype_bytes(dt)[0]
