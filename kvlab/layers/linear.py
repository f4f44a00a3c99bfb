"""The linear layer of kvlab's modules: ``nn.Linear`` (same parameters, state-dict names and numerics) whose few-row
bf16 products on the CPU -- one decode step's -- run as one C++ call (kvlab/layers/bf16_kernel.py); everything else,
and whenever the kernel does not apply (fp32, autograd, compiled, more rows, other devices), ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import bf16_kernel


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x [..., in], weight [out, in], bias [out])`` -> ``[..., out]``, by the bf16 kernel where it applies."""
    if bf16_kernel.applies(x, weight, bias):
        return bf16_kernel.linear(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear``; x ``[..., in]`` -> ``[..., out]`` through :func:`linear` (the bf16 kernel where it applies)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


__all__ = ["Linear", "linear"]
