"""Per-channel residual scaling (ZAYA1): ``out = (h + b_h) * s_h + (x + b_x) * s_x``.

Replaces the plain residual add ``x + h`` after a block's attention and after its MLP when a layer sets
``residual_scaling``: ``h`` is the branch output, ``x`` the residual stream; all four vectors are learned
per channel (scales start at 1, biases at 0, so an untrained block is the plain add).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn


class ResidualScaling(nn.Module):
    """``(h + out_bias) * out_scale + (x + res_bias) * res_scale`` with learned per-channel vectors (ZAYA1)."""

    param_init: ClassVar[dict[str, str]] = {"out_scale": "ones", "out_bias": "zeros", "res_scale": "ones", "res_bias": "zeros"}

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.out_scale = nn.Parameter(torch.ones(hidden))
        self.out_bias = nn.Parameter(torch.zeros(hidden))
        self.res_scale = nn.Parameter(torch.ones(hidden))
        self.res_bias = nn.Parameter(torch.zeros(hidden))

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``h`` the branch output, ``x`` the residual stream (may be fp32 while ``h`` is not)."""
        return (h + self.out_bias) * self.out_scale + (x + self.res_bias) * self.res_scale

    # the residual-strategy interface (kvlab/layers/residual.py)
    @staticmethod
    def read(x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return x, None

    def write(self, _ctx: None, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self(h, x)
