"""How a sub-layer's output joins the residual stream: the residual strategies of a block.

Every strategy has the same two steps around a sub-layer ``f`` (attention or MLP) of a block:
``xin, ctx = r.read(x)`` gives ``f``'s input from the stream ``x``; ``x' = r.write(ctx, f(norm(xin)), x)``
adds the output back. Three strategies exist:

- :data:`PLAIN`: ``x' = x + h`` (pre-norm transformers);
- ``ResidualScaling`` (kvlab/layers/scaling.py, ZAYA1): ``x' = (h + b_h) * s_h + (x + b_x) * s_x``;
- ``HyperConnection`` (kvlab/layers/mhc.py, mHC, DeepSeek V4): ``x`` is ``n`` streams ``[B, T, n, D]``; the read is
  a learned mix of them and the write a Sinkhorn-projected mixing plus a weighted copy of ``h``.

:func:`residuals` picks the strategy of one layer from its spec and the model's config and registers its modules
on the block under their checkpoint names (``attn_residual``/``mlp_residual``, ``attn_hc``/``mlp_hc``).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from ..config import LayerSpec, ModelConfig
from .mhc import HyperConnection
from .scaling import ResidualScaling


class Residual(Protocol):
    def read(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]: ...

    def write(self, ctx: Any, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor: ...


class PlainResidual:
    """``x + h``: the sub-layer reads the stream itself."""

    @staticmethod
    def read(x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return x, None

    @staticmethod
    def write(_ctx: None, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x + h


PLAIN = PlainResidual()


def residuals(block: nn.Module, spec: LayerSpec, config: ModelConfig) -> tuple[Residual, Residual]:
    """The (attention, MLP) residual strategies of one block; their modules are registered on ``block``."""
    hidden = config.hidden_size
    if config.mhc_streams is not None:
        hc = (config.mhc_streams, hidden, config.mhc_sinkhorn_iters, config.mhc_eps, config.norm_eps)
        block.attn_hc, block.mlp_hc = HyperConnection(*hc), HyperConnection(*hc)
        return block.attn_hc, block.mlp_hc
    if spec.residual_scaling:
        block.attn_residual, block.mlp_residual = ResidualScaling(hidden), ResidualScaling(hidden)
        return block.attn_residual, block.mlp_residual
    return PLAIN, PLAIN


__all__ = ["PLAIN", "PlainResidual", "Residual", "residuals"]
