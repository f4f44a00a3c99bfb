"""Dtype casts that skip the dispatch of a no-op ``.float()`` / ``.to(dtype)`` when the tensor already has the dtype.

An eager decode step of a small model is thousands of tiny operators whose dispatch is its cost (DeepSeek V4:
docs/performance.md); a cast of an fp32 tensor to fp32 returns the tensor itself but still goes through the
dispatcher. The same values either way, and the same graph under ``torch.compile``.
"""

from __future__ import annotations

import torch


def as_fp32(t: torch.Tensor) -> torch.Tensor:
    """``t.float()``, without a call when ``t`` is fp32."""
    return t if t.dtype == torch.float32 else t.float()


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, without a call when ``t`` has ``dtype``."""
    return t if t.dtype == dtype else t.to(dtype)


__all__ = ["as_dtype", "as_fp32"]
