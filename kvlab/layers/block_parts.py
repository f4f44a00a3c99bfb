"""The pieces of a block besides its attention (kvlab/kinds) and its residual strategy (kvlab/layers/residual.py).

- :func:`post_norm`: sandwich norms (Gemma 2/3/4 ``post_attention`` / ``post_feedforward`` norms) normalise a
  branch's output before the residual add; ``nn.Identity`` without them.
- :func:`feed_forward`: the MLP side, ``h = ffn(block, x, carry)`` from the stream ``x [B, T, D]`` as the norms read
  it: one pre-norm and a gated MLP or an MoE (routed, or hash-routed: kvlab/layers/moe.py), or, for
  ``mlp='dense+moe'`` (Gemma 4 26B-A4B), a dense MLP and an MoE side by side on the same input, each with its own
  pre-norm and post-norm, summed.
- :func:`outputs`: what is applied, in order, to the block's output stream: per-layer embeddings (PLE, Gemma 3n/4:
  ``x + ple(x, p_l)``, kvlab/layers/ple.py) and the layer scalar (Gemma 4: ``x * s``).

Each builder registers its modules on the block under their checkpoint names (``mlp_norm``, ``mlp``, ``moe_norm``,
``moe``, ``post_dense_norm``, ``post_moe_norm``, ``ple``, ``layer_scalar``) and returns stateless functions of the
block, so a block holds no flag of these techniques and a module replaced on the block is the one called.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..config import LayerSpec, ModelConfig
from .mlp import GatedMLP
from .moe import MoE
from .norm import RMSNorm
from .ple import PLELayer

FeedForward = Callable[[nn.Module, torch.Tensor, Any], torch.Tensor]
Output = Callable[[nn.Module, torch.Tensor, Any], torch.Tensor]


def post_norm(spec: LayerSpec, config: ModelConfig) -> nn.Module:
    """A branch's output norm: an RMSNorm with sandwich norms, else ``nn.Identity``."""
    if spec.sandwich_norm:
        return RMSNorm(config.hidden_size, config.norm_eps, config.norm_offset)
    return nn.Identity()


def _single(block: nn.Module, x: torch.Tensor, carry: Any) -> torch.Tensor:
    return block.mlp(block.mlp_norm(x), carry=carry)


def _dense_and_moe(block: nn.Module, x: torch.Tensor, carry: Any) -> torch.Tensor:
    h = block.mlp(block.mlp_norm(x), carry=carry)
    e = block.moe(block.moe_norm(x), router_input=x if block.moe.spec.router_norm else None, carry=carry)
    return block.post_dense_norm(h) + block.post_moe_norm(e)


def feed_forward(block: nn.Module, spec: LayerSpec, config: ModelConfig) -> FeedForward:
    """Register the MLP side of ``spec`` on ``block``; the function computing it (before ``post_mlp_norm``)."""
    hidden, eps, off = config.hidden_size, config.norm_eps, config.norm_offset
    block.mlp_norm = RMSNorm(hidden, eps, off)
    if spec.mlp == "moe":
        block.mlp = MoE(hidden, spec.moe, spec.activation, eps, vocab=config.vocab_size)
    else:
        block.mlp = GatedMLP(hidden, spec.intermediate_size, spec.activation, spec.mlp_bias)
    block.moe = None
    if spec.mlp != "dense+moe":
        return _single
    block.moe_norm = RMSNorm(hidden, eps, off)
    block.moe = MoE(hidden, spec.moe, spec.activation, eps, vocab=config.vocab_size)
    block.post_dense_norm, block.post_moe_norm = post_norm(spec, config), post_norm(spec, config)
    return _dense_and_moe


def _ple(block: nn.Module, x: torch.Tensor, ple_input: Any) -> torch.Tensor:
    return x + block.ple(x, ple_input)


def _layer_scalar(block: nn.Module, x: torch.Tensor, ple_input: Any) -> torch.Tensor:
    return x * block.layer_scalar


def outputs(block: nn.Module, spec: LayerSpec, config: ModelConfig) -> tuple[Output, ...]:
    """Register the block's output pieces (PLE, layer scalar) on ``block``; the functions applying them, in order.
    ``block.ple`` / ``block.layer_scalar`` are None when absent."""
    out: list[Output] = []
    block.ple = None
    if config.ple_dim is not None:
        block.ple = PLELayer(config.hidden_size, config.ple_dim, spec.activation, config.norm_eps, config.norm_offset)
        out.append(_ple)
    block.layer_scalar = None
    if spec.layer_scalar:
        block.layer_scalar = nn.Parameter(torch.ones(1))
        out.append(_layer_scalar)
    return tuple(out)


__all__ = ["feed_forward", "outputs", "post_norm"]
