"""Routed mixture of experts with top-k choice (GShard/Switch; DeepSeek-V3 scoring options).

Router in fp32. Options: softmax or sigmoid scores, a bias added to the scores for the choice only
(aux-loss-free balancing), renormalised top-k weights, routed scaling, always-on shared experts.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import MoESpec
from .mlp import GatedMLP, activation


class Experts(nn.Module):
    """E gated experts stored as 3-D weights: gate/up ``[E, I, H]``, down ``[E, H, I]``."""

    def __init__(self, num: int, hidden: int, width: int, act: str) -> None:
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(num, width, hidden))
        self.up_proj = nn.Parameter(torch.empty(num, width, hidden))
        self.down_proj = nn.Parameter(torch.empty(num, hidden, width))
        for p in (self.gate_proj, self.up_proj, self.down_proj):
            nn.init.normal_(p, std=0.02)
        self.act = activation(act)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x ``[N, H]``, idx/weights ``[N, k]`` -> ``[N, H]``; loops over experts that got tokens."""
        out = torch.zeros_like(x)
        flat = idx.reshape(-1)
        order = flat.argsort()
        counts = torch.bincount(flat, minlength=self.gate_proj.shape[0]).tolist()
        token_of = order // idx.shape[1]
        w_sorted = weights.reshape(-1)[order]
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            tok = token_of[start:start + n]
            h = x[tok]
            h = self.act(h @ self.gate_proj[e].T) * (h @ self.up_proj[e].T)
            h = (h @ self.down_proj[e].T) * w_sorted[start:start + n, None].to(h.dtype)
            out.index_add_(0, tok, h)
            start += n
        return out


class MoE(nn.Module):
    """x ``[B, T, H]`` -> ``[B, T, H]``."""

    def __init__(self, hidden: int, spec: MoESpec, act: str = "silu") -> None:
        super().__init__()
        self.spec = spec
        self.router = nn.Linear(hidden, spec.num_experts, bias=False)
        if spec.bias_correction:
            self.router_bias = nn.Parameter(torch.zeros(spec.num_experts))
        self.experts = Experts(spec.num_experts, hidden, spec.expert_size, act)
        self.shared = GatedMLP(hidden, spec.shared_width, act) if spec.shared_experts else None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k expert indices and weights ``[N, k]`` for tokens ``x [N, H]`` (fp32 router)."""
        s = self.spec
        logits = x.float() @ self.router.weight.float().T
        scores = logits.softmax(-1) if s.scoring == "softmax" else logits.sigmoid()
        choice = scores + self.router_bias.float() if s.bias_correction else scores
        idx = choice.topk(s.top_k, dim=-1).indices
        w = scores.gather(-1, idx)
        if s.norm_topk:
            w = w / (w.sum(-1, keepdim=True) + (1e-20 if s.scoring == "sigmoid" else 0.0))
        return idx, w * s.routed_scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        idx, w = self.route(flat)
        out = self.experts(flat, idx, w)
        if self.shared is not None:
            out = out + self.shared(flat)
        return out.reshape(shape)
