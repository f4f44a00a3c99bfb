"""Memory preflight: the calculator's bytes (kvlab.costs) against the memory available, before allocating.

A cache or model that cannot fit is refused with :class:`~kvlab.errors.InsufficientMemoryError` naming both
figures and the options that would fit (a smaller batch, a shorter context, a sliding window on the full-attention
layers, a quantized cache), instead of dying in the allocator. Available memory is ``psutil``'s available RAM on the
CPU and ``torch.cuda.mem_get_info`` on a GPU. Importing this module does not import torch. Inside ``with forced():`` (the CLI's ``--force``) nothing is refused.
Activations and allocator overhead are not counted: the figure is a lower bound of what the run needs.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator
from typing import Any

from . import kinds
from .costs import costs, dtype_bytes
from .errors import InsufficientMemoryError
from .units import fmt_bytes, fmt_context

_FORCE: contextvars.ContextVar[bool] = contextvars.ContextVar("kvlab_preflight_force", default=False)
WINDOWS = (32768, 16384, 8192, 4096, 2048, 1024)
QUANT_OPTIONS = (("int8", "8-bit"), ("int4", "4-bit"))  # the first that fits is offered


@contextlib.contextmanager
def forced() -> Iterator[None]:
    """Skip the preflight inside this block (the CLI's ``--force``: try anyway)."""
    token = _FORCE.set(True)
    try:
        yield
    finally:
        _FORCE.reset(token)


def available_bytes(device: Any = "cpu") -> int:
    """Memory that can be allocated now on ``device``: free GPU memory, or the RAM available without swapping."""
    if str(device).startswith("cuda"):
        import torch  # only for a CUDA device: the CLI's preflight runs before anything loads torch

        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    import psutil

    return int(psutil.virtual_memory().available)


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")  # a torch.dtype or a name


def weight_bytes(cfg: Any, dtype: Any) -> int:
    """Bytes of ``cfg``'s parameters in ``dtype`` (the calculator's parameter count)."""
    return costs(cfg, context=1, dtype=_dtype_name(dtype)).params_total * _elt(dtype)


def _elt(dtype: Any) -> int:
    return dtype_bytes(_dtype_name(dtype))[1]


def kv_bytes(cfg: Any, batch: int, context: int, dtype: Any, kv_quant: Any = None) -> int:
    """The calculator's K/V cache bytes of ``batch`` sequences preallocated to ``context`` positions (stored as
    ``kv_quant`` when given)."""
    return costs(cfg, context=context, dtype=_dtype_name(dtype), batch=batch, kv_quant=kv_quant).kv_cache_bytes


def _largest(fits: Any, lo: int, hi: int) -> int | None:
    """The largest n in [lo, hi] with fits(n) (fits is monotone decreasing), or None."""
    if hi < lo or not fits(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def options_that_fit(cfg: Any, batch: int, context: int, dtype: Any, budget: int, kv_quant: Any = None) -> list[str]:
    """What would fit in ``budget`` bytes of K/V: a smaller batch, a shorter context, a window, a quantized cache."""
    out: list[str] = []
    b = _largest(lambda n: kv_bytes(cfg, n, context, dtype, kv_quant) <= budget, 1, batch - 1)
    if b is not None:
        out.append(f"--batch {b} ({fmt_bytes(kv_bytes(cfg, b, context, dtype, kv_quant))} of KV)")
    c = _largest(lambda n: kv_bytes(cfg, batch, n, dtype, kv_quant) <= budget, 1, context - 1)
    if c is not None:
        c = c // 1024 * 1024 if c >= 1024 else c
        out.append(f"--context {fmt_context(c)} ({fmt_bytes(kv_bytes(cfg, batch, c, dtype, kv_quant))} of KV)")
    full = [i for i, x in enumerate(cfg.layers) if kinds.takes(x.attention, "window") and x.window is None]
    for w in (w for w in WINDOWS if w < context):
        try:
            windowed = cfg.replace_layers(lambda i, x, w=w: dataclasses.replace(x, window=w) if i in full else x)
        except ValueError:
            break
        if full and (kv := kv_bytes(windowed, batch, context, dtype, kv_quant)) <= budget:
            out.append(f"a sliding window of {w} on the {len(full)} full-attention layers ({fmt_bytes(kv)} of KV)")
            break
    if kv_quant is None:
        for fmt, label in QUANT_OPTIONS:
            if (kv := kv_bytes(cfg, batch, context, dtype, fmt)) <= budget:
                out.append(f"a {label} quantized KV cache, kv_quant={fmt!r} ({fmt_bytes(kv)})")
                break
    return out


def check_memory(cfg: Any, batch: int, context: int, dtype: Any, device: Any = "cpu",
                 weights: bool = False, what: str = "", kv_quant: Any = None) -> int:
    """Refuse (InsufficientMemoryError) when the K/V cache of ``batch`` x ``context`` (stored as ``kv_quant`` when
    given; plus ``cfg``'s weights when ``weights``) would need more than the memory available on ``device``;
    returns the bytes needed otherwise."""
    kv = kv_bytes(cfg, batch, context, dtype, kv_quant)
    w = weight_bytes(cfg, dtype) if weights else 0
    need = kv + w
    if _FORCE.get():
        return need
    avail = available_bytes(device)
    if need <= avail:
        return need
    parts = (f"{fmt_bytes(w)} of weights + {fmt_bytes(kv)} of KV cache" if weights else f"{fmt_bytes(kv)} of KV cache")
    name = what or getattr(cfg, "name", "the model")
    if w >= avail:
        fit = "; the weights alone do not fit: use a smaller dtype or a smaller model"
    else:
        options = options_that_fit(cfg, batch, context, dtype, avail - w, kv_quant)
        fit = f"; options that fit: {'; '.join(options)}" if options else "; no smaller batch or context fits"
    raise InsufficientMemoryError(
        f"{name}: batch {batch} x context {fmt_context(context)} in {_dtype_name(dtype)} needs at least "
        f"{fmt_bytes(need)} ({parts}), but only {fmt_bytes(avail)} is available on {device}{fit}; "
        "pass --force to try anyway")


__all__ = ["available_bytes", "check_memory", "forced", "kv_bytes", "options_that_fit", "weight_bytes"]
