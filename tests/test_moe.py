"""MoE routing against a plain per-token implementation written out in the test."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvlab.config import MoESpec
from kvlab.layers.moe import Experts, MoE


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
    MoESpec(num_experts=3, top_k=2, expert_size=13, scoring="softmax", shared_experts=1, shared_size=7),
])
@pytest.mark.parametrize("hidden", [16, 37])
def test_moe_matches_per_token_reference(spec, hidden):
    """Hidden 37 and expert width 13: rows whose strides are not a multiple of 16 bytes (torch's CPU ``grouped_mm``
    refuses them, so another path serves them)."""
    torch.manual_seed(0)
    moe = MoE(hidden, spec)
    for p in moe.parameters():
        p.normal_(0, 0.3)
    x = torch.randn(2, 7, hidden)
    out = moe(x)
    torch.testing.assert_close(out.reshape(-1, hidden), naive(moe, x.reshape(-1, hidden)), atol=1e-5, rtol=1e-5)


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


def per_choice(ex: Experts, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Each (token, choice) through its expert, one at a time; a skip expert (index E) adds nothing."""
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for e, we in zip(idx[n].tolist(), w[n]):
            if e == ex.gate_proj.shape[0]:
                continue
            g, u = ex.gate_proj[e] @ x[n], ex.up_proj[e] @ x[n]
            if ex.limit is not None:
                g, u = g.clamp(max=ex.limit), u.clamp(min=-ex.limit, max=ex.limit)
            out[n] += we.to(x.dtype) * (ex.down_proj[e] @ (F.silu(g) * u))
    return out


@pytest.mark.parametrize("n,k,skip,limit", [(1, 2, False, None), (1, 3, True, 0.5), (3, 2, False, 0.5),
                                            (5, 1, True, None), (8, 2, True, None), (40, 3, True, 0.5)])
def test_grouped_experts_match_per_choice_reference(n, k, skip, limit):
    """Grouped matmuls (the eager decode path) against a loop over each token's choices: experts chosen by no token,
    a skip expert (rows past the last group, never written by grouped_mm), the SwiGLU limit, a decode step (n=1),
    a batch of them, a short chunk; and forward's other paths (gather / dense / loop: taken with autograd on) agree,
    also with a routed scale and a base added (the shared experts' output: one ``addmm`` for one token)."""
    torch.manual_seed(n)
    num = 6
    ex = Experts(num, 16, 8, "silu", limit=limit, skip=skip)
    for p in ex.parameters():
        p.data.normal_(0, 0.5)
    x = torch.randn(n, 16)
    allowed = torch.tensor([e for e in range(num + skip) if e != 2])  # expert 2 gets no token
    idx = torch.stack([allowed[torch.randperm(len(allowed))[:k]] for _ in range(n)])
    w = torch.rand(n, k)
    ref = per_choice(ex, x, idx, w)
    torch.testing.assert_close(ex.grouped(x, idx, w), ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(ex(x, idx, w), ref, atol=1e-5, rtol=1e-5)  # the grouped path
    torch.testing.assert_close(ex(x, idx, w).detach(), ref, atol=1e-5, rtol=1e-5)  # autograd on: the others
    base = torch.randn(n, 16)
    with torch.no_grad():
        torch.testing.assert_close(ex(x, idx, w, 1.5, base), base + 1.5 * ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ex(x, idx, w, 1.5), 1.5 * ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ex(x, idx, w, 1.5, base).detach(), base + 1.5 * ref, atol=1e-5, rtol=1e-5)
    ex16 = ex.to(torch.bfloat16)
    ref16 = per_choice(ex16, x.bfloat16(), idx, w).float()
    torch.testing.assert_close(ex16.grouped(x.bfloat16(), idx, w).float(), ref16, atol=2e-2, rtol=2e-2)
    with torch.no_grad():  # bf16 between E and 4 E choices (n=8): every expert run (dense)
        torch.testing.assert_close(ex16(x.bfloat16(), idx, w).float(), ref16, atol=2e-2, rtol=2e-2)


def test_experts_under_autocast_take_the_autocast_matmuls():
    """Under bf16 autocast (kvlab train's eval and teacher: no grad, fp32 weights, bf16 activations) the experts
    run autocast's matmuls (bf16 out), not grouped_mm (which takes x in the weights' dtype only)."""
    torch.manual_seed(0)
    ex = Experts(4, 16, 8, "silu")
    x, idx, w = torch.randn(3, 16), torch.tensor([[0, 2], [2, 3], [0, 1]]), torch.rand(3, 2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for xin in (x, x.bfloat16()):
            out = ex(xin, idx, w)
            assert out.dtype == torch.bfloat16
            torch.testing.assert_close(out.float(), per_choice(ex, x, idx, w), atol=3e-2, rtol=3e-2)
