"""The price of a layer's MLP: dense (SwiGLU-style, three matrices) or a routed MoE (kvlab/layers/moe.py) with its
router, shared experts and options; or both side by side (``dense+moe``, Gemma 4 26B-A4B)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class MlpCost:
    params: int
    active: int  # params touched by one token
    matmul: int  # matmul params touched by one token
    read: int  # params read by one decode step of the batch (distinct experts)


def mlp_cost(layer: Any, hidden: int, batch: int) -> MlpCost:
    i = layer.intermediate_size
    mats = 3 * i * hidden
    n = mats + ((2 * i + hidden) if layer.mlp_bias else 0)
    if layer.mlp == "dense":
        return MlpCost(n, n, mats, n)
    moe = layer.moe
    assert moe is not None
    e, k, w = moe.num_experts, moe.top_k, moe.expert_size
    expert = 3 * w * hidden
    classes = e + (1 if moe.skip_expert else 0)
    router = router_mm = classes * hidden
    if moe.router_hidden:  # down projection, router MLP (norm, fc1, fc2) and output; biases; carried-state scale
        r = moe.router_hidden
        router_mm = hidden * r + 2 * r * r + classes * r
        router = router_mm + 4 * r + (r if moe.router_carry else 0)
    shared = 3 * moe.shared_width * hidden
    always = (router + shared + (classes if moe.bias_correction else 0) + (hidden if moe.router_norm else 0)
              + (e if moe.expert_scale else 0))
    c = MlpCost(params=always + e * expert, active=always + k * expert, matmul=router_mm + shared + k * expert,
                 read=always + min(e, batch * k) * expert)
    if layer.mlp == "dense+moe":  # the dense MLP beside the experts
        c = MlpCost(c.params + n, c.active + n, c.matmul + mats, c.read + n)
    return c
