"""A router with a small MLP (ZAYA1): the MoE's router logits computed in a narrow router space.

``r = down(x)`` (``hidden -> router_hidden``, with bias); with ``router_carry`` the previous layer's ``r``
is added, times a learned per-channel scale, and the sum is what the next layer receives; the logits are
``out(gelu(fc2(gelu(fc1(rmsnorm(r))))))`` (``fc1``/``fc2`` square with bias, exact GELU, ``out`` without
bias). See :class:`~kvlab.layers.moe.MoE` for how the choice is made.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .norm import RMSNorm


class RouterMLP(nn.Module):
    """``rmsnorm -> fc1 -> gelu -> fc2 -> gelu`` on the router space (the output projection is ``MoE.router``)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, eps)
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.fc2(F.gelu(self.fc1(self.norm(r)))))
