"""Gated MLP: SwiGLU / GeGLU (Shazeer 2020, arXiv 2002.05202)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .linear import Linear


def activation(name: str):
    if name == "silu":
        return F.silu
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    raise ValueError(f"activation={name!r}: allowed: silu, gelu_tanh, gelu")


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))``; x ``[..., hidden]`` -> ``[..., hidden]``."""

    def __init__(self, hidden: int, width: int, act: str = "silu", bias: bool = False,
                 limit: float | None = None) -> None:
        super().__init__()
        self.limit = limit  # DeepSeek V4's clipped SwiGLU: gate <= limit, |up| <= limit
        self.gate_proj = Linear(hidden, width, bias=bias)
        self.up_proj = Linear(hidden, width, bias=bias)
        self.down_proj = Linear(width, hidden, bias=bias)
        self.act = activation(act)

    def forward(self, x: torch.Tensor, carry: dict | None = None) -> torch.Tensor:
        """``x [..., hidden]`` -> same; ``carry`` (per-token state between layers) is not read by a dense MLP."""
        if self.limit is None:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        g = self.gate_proj(x).clamp(max=self.limit)
        return self.down_proj(self.act(g) * self.up_proj(x).clamp(min=-self.limit, max=self.limit))
