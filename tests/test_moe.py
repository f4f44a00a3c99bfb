"""MoE routing against a plain per-token implementation written out in the test."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvlab.config import MoESpec
from kvlab.layers.moe import MoE


@pytest.fixture(autouse=True, scope="module")
def _no_grad():
    """Inference only, without leaking the global grad mode into other test modules."""
    with torch.no_grad():
        yield


def naive(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    s = moe.spec
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        logits = moe.router.weight @ x[n]
        scores = logits.softmax(-1) if s.scoring == "softmax" else logits.sigmoid()
        choice = scores + (moe.router_bias if s.bias_correction else 0)
        chosen = sorted(range(s.num_experts), key=lambda e: -float(choice[e]))[: s.top_k]
        w = torch.stack([scores[e] for e in chosen])
        if s.norm_topk:
            w = w / w.sum()
        for e, we in zip(chosen, w * s.routed_scaling):
            g, u, d = moe.experts.gate_proj[e], moe.experts.up_proj[e], moe.experts.down_proj[e]
            out[n] += we * (d @ (F.silu(g @ x[n]) * (u @ x[n])))
        if moe.shared is not None:
            out[n] += moe.shared(x[n])
    return out


@pytest.mark.parametrize("spec", [
    MoESpec(num_experts=6, top_k=2, expert_size=8, scoring="softmax", norm_topk=False),
    MoESpec(num_experts=6, top_k=3, expert_size=8, scoring="softmax", norm_topk=True, shared_experts=1),
    MoESpec(num_experts=8, top_k=2, expert_size=8, scoring="sigmoid", bias_correction=True, routed_scaling=2.5,
            shared_experts=2, shared_size=4),
    MoESpec(num_experts=4, top_k=1, expert_size=8, scoring="sigmoid", norm_topk=True),
])
def test_moe_matches_per_token_reference(spec):
    torch.manual_seed(0)
    moe = MoE(16, spec)
    for p in moe.parameters():
        p.normal_(0, 0.3)
    x = torch.randn(2, 7, 16)
    out = moe(x)
    torch.testing.assert_close(out.reshape(-1, 16), naive(moe, x.reshape(-1, 16)), atol=1e-5, rtol=1e-5)


def test_bias_changes_the_choice_not_the_weights():
    torch.manual_seed(1)
    spec = MoESpec(num_experts=4, top_k=1, expert_size=4, scoring="sigmoid", bias_correction=True, norm_topk=False)
    moe = MoE(8, spec)
    for p in moe.parameters():
        p.normal_(0, 0.3)
    x = torch.randn(5, 8)
    moe.router_bias.copy_(torch.tensor([0.0, 0.0, 100.0, 0.0]))  # forces expert 2
    idx, w = moe.route(x)
    assert idx.flatten().tolist() == [2] * 5
    torch.testing.assert_close(w[:, 0], (x @ moe.router.weight.T).sigmoid()[:, 2])
