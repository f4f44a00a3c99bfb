"""The price of what a block holds besides attention and MLP: norms, the layer scalar, residual scaling (ZAYA1)
and the per-layer embedding gate (PLE, Gemma 3n/4; kvlab/layers/ple.py)."""

from __future__ import annotations

from typing import Any


def block_extra(layer: Any, hidden: int, ple_dim: int | None) -> tuple[int, int]:
    """(params, matmul params) of a block outside attention and MLP: norms, layer scalar, PLE gate."""
    norms = 2 + (2 if layer.sandwich_norm else 0)  # attn/mlp pre-norms, post-norms
    if layer.mlp == "dense+moe":
        norms += 1 + (2 if layer.sandwich_norm else 0)  # MoE pre-norm, post-norms of both branches
    params = norms * hidden + (1 if layer.layer_scalar else 0) + (8 * hidden if layer.residual_scaling else 0)
    mats = 2 * hidden * ple_dim if ple_dim else 0  # PLE gate and projection
    return params + mats + (hidden if ple_dim else 0), mats
