"""The linear layer of kvlab's modules: ``nn.Linear`` (same parameters, state-dict names and numerics) whose few-row
bf16 and float32 products on the CPU -- one decode step's -- run as one C++ call (kvlab/layers/bf16_kernel.py,
kvlab/layers/f32_kernel.py; in a compiled step their custom ops), and whose many-row bf16 products on a CPU without
native bf16 -- a prefill chunk's -- as float32 GEMMs over widened copies (kvlab/layers/bf16_widen.py); everything else
(autograd, other devices, many rows in a compiled step), ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import bf16_kernel, bf16_widen, f32_kernel


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x [..., in], weight [out, in], bias [out])`` -> ``[..., out]``, by the bf16 kernel (few rows) or
    widened to float32 (many rows), float32 by the float32 kernel (few rows) where they apply."""
    if f32_kernel.applies(x, weight, bias):
        return f32_kernel.linear(x, weight, bias)
    if bf16_kernel.applies(x, weight, bias):
        return bf16_kernel.linear(x, weight, bias)
    if bf16_widen.applies(x, weight, bias):
        return bf16_widen.linear(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear``; x ``[..., in]`` -> ``[..., out]`` through :func:`linear` (bf16: the kernel or widened; few-row
    float32: its kernel)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


__all__ = ["Linear", "linear"]
