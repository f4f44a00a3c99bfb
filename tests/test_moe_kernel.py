"""The C++ one-token MoE (kvlab/layers/moe_kernel.py) against the torch paths (the kernel off) and a per-choice
reference: activations, the SwiGLU clip, the skip expert, shared experts or none; taken only where it applies."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import count_calls, require_kernel

from kvlab.config import MoESpec
from kvlab.layers import moe_kernel
from kvlab.layers.mlp import activation
from kvlab.layers.moe import MoE


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture
def kernel(monkeypatch):
    require_kernel(monkeypatch, moe_kernel, "MoE")


def _count_calls(monkeypatch) -> list[int]:
    """Each call's k (a proxy in front of the loaded library)."""
    return count_calls(monkeypatch, moe_kernel, {"kvlab_moe_step": lambda a: a[4], "kvlab_moe_step_bf16": lambda a: a[4],
                                                 "kvlab_moe_route_step": lambda a: a[5]})


def reference(moe: MoE, x: torch.Tensor, act: str) -> torch.Tensor:
    """One token ``x [H]``: the router's choice, then each chosen expert written out (a skip expert adds nothing)."""
    idx, w = moe.route(x[None])
    e, f, lim = moe.experts, activation(act), moe.spec.swiglu_limit
    out = moe.shared(x) if moe.shared is not None else torch.zeros_like(x)
    for j, we in zip(idx[0].tolist(), w[0]):
        if j >= e.gate_proj.shape[0]:
            continue
        g, u = e.gate_proj[j] @ x, e.up_proj[j] @ x
        if lim is not None:
            g, u = g.clamp(max=lim), u.clamp(-lim, lim)
        out = out + we * (e.down_proj[j] @ (f(g) * u))
    return out


SPECS = {
    "v4": (MoESpec(num_experts=8, top_k=2, expert_size=24, scoring="sqrtsoftplus", norm_topk=True, routed_scaling=1.5,
                   shared_experts=1, shared_size=20, swiglu_limit=0.5, bias_correction=True), "silu"),
    "plain": (MoESpec(num_experts=6, top_k=3, expert_size=12, scoring="softmax", norm_topk=False), "silu"),
    "gelu-tanh": (MoESpec(num_experts=4, top_k=1, expert_size=8, scoring="sigmoid", shared_experts=2, shared_size=5),
                  "gelu_tanh"),
    "gelu": (MoESpec(num_experts=5, top_k=2, expert_size=16, scoring="softmax", routed_scaling=2.0), "gelu"),
    "skip": (MoESpec(num_experts=4, top_k=2, expert_size=8, scoring="softmax", skip_expert=True), "silu"),
    "odd": (MoESpec(num_experts=3, top_k=2, expert_size=13, scoring="softmax", shared_experts=1, shared_size=7,
                    swiglu_limit=1.0), "silu"),
    "laguna": (MoESpec(num_experts=8, top_k=2, expert_size=16, scoring="sigmoid", norm_topk=True, bias_correction=True,
                       routed_scaling=2.5, shared_experts=1, shared_size=16), "silu"),
    "v3": (MoESpec(num_experts=8, top_k=2, expert_size=16, scoring="sigmoid", norm_topk=True, bias_correction=True,
                   routed_scaling=2.5, shared_experts=1, shared_size=16, n_group=4, topk_group=2), "silu"),
}
ROUTED = {"plain", "gelu-tanh", "gelu", "odd", "laguna", "v3", "v4"}  # float32 routing in the call too (route_applies)


def _moe(name: str, seed: int) -> tuple[MoE, MoESpec, str, int]:
    """SPECS[name]'s layer with weights drawn from ``seed`` (hidden 37 for the odd spec, else 36; the skip spec's
    router biased so the skip expert is chosen for some tokens): (moe, spec, activation, hidden)."""
    spec, act = SPECS[name]
    torch.manual_seed(seed)
    hidden = 37 if name == "odd" else 36
    moe = MoE(hidden, spec, act=act)
    for p in moe.parameters():
        p.normal_(0, 0.3)
    if spec.skip_expert:
        moe.router.weight[-1] = 0.3 * moe.router.weight[0]
    return moe, spec, act, hidden


@pytest.mark.parametrize("name", list(SPECS))
def test_one_token_equals_torch_paths(kernel, monkeypatch, name):
    """20 single tokens through the kernel, the torch path (the kernel off; its grouped matmuls want widths of whole
    16 bytes, so the odd spec, hidden 37 and widths 13 and 7 for the products' tails, is checked against the reference
    alone) and the reference: within 1e-5; one kernel call per token. The skip spec's router is biased so the skip
    expert is chosen for some tokens."""
    moe, spec, act, hidden = _moe(name, 3)
    x = torch.randn(20, 1, 1, hidden)
    calls = _count_calls(monkeypatch)
    got = torch.stack([moe(t) for t in x])
    assert calls == [spec.top_k] * 20
    ref = torch.stack([reference(moe, t.reshape(-1), act) for t in x]).view_as(got)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    if name != "odd":
        monkeypatch.setattr(moe_kernel, "ENABLED", False)
        torch.testing.assert_close(got, torch.stack([moe(t) for t in x]), atol=1e-5, rtol=1e-5)
        assert len(calls) == 20
    if spec.skip_expert:
        assert any(int(i) == 4 for t in x for i in moe.route(t.reshape(1, -1))[0][0])


@pytest.mark.parametrize("name", ["v4", "gelu-tanh", "skip", "odd"])
def test_bf16_one_token_equals_reference_and_torch_paths(kernel, monkeypatch, name):
    """bf16 experts, shared expert and input (every intermediate float32 in the kernel, the output rounded once):
    within half a bf16 step (plus float32 slack) of the per-choice reference run in float32 on the same bf16 values,
    within bf16 rounding of the torch path (which rounds each product to bf16); one kernel call per token."""
    moe, spec, act, hidden = _moe(name, 4)
    ref_moe = MoE(hidden, spec, act=act)
    ref_moe.load_state_dict({k: v.bfloat16().float() for k, v in moe.state_dict().items()})
    moe.to(torch.bfloat16)
    x = torch.randn(12, 1, 1, hidden).bfloat16()
    calls = _count_calls(monkeypatch)
    got = torch.stack([moe(t) for t in x])
    assert got.dtype == torch.bfloat16 and calls == [spec.top_k] * 12
    monkeypatch.setattr(moe_kernel, "ENABLED", False)
    # the float32 reference routes as the bf16 model does (its router reads the same bf16 values in float32)
    ref = torch.stack([reference(ref_moe, t.reshape(-1).float(), act) for t in x]).view_as(got)
    torch.testing.assert_close(got.float(), ref, rtol=2 ** -8, atol=1e-4)
    if name != "odd":  # torch's grouped matmuls want whole 16-byte rows
        torch.testing.assert_close(got, torch.stack([moe(t) for t in x]), rtol=0.03, atol=0.03)
    assert len(calls) == 12


@pytest.mark.parametrize("name", list(SPECS))
def test_routing_in_the_call_where_it_applies(kernel, monkeypatch, name):
    """A plain float32 router (softmax, sigmoid or sqrt-softplus, the choice bias, DeepSeek V3's group limit,
    renormalised or not) is computed in the call (``kvlab_moe_route_step``: the same experts as ``MoE.route`` for 20
    tokens, within 1e-5 of the reference); a skip expert, hash routing without a token id, expert scales and bf16
    route in torch first."""
    moe, spec, act, hidden = _moe(name, 5)
    names = count_calls(monkeypatch, moe_kernel, {f: (lambda a, f=f: f) for f in (
        "kvlab_moe_step", "kvlab_moe_route_step")})
    x = torch.randn(20, 1, 1, hidden)
    got = torch.stack([moe(t) for t in x])
    assert names == ["kvlab_moe_route_step" if name in ROUTED else "kvlab_moe_step"] * 20
    ref = torch.stack([reference(moe, t.reshape(-1), act) for t in x]).view_as(got)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    if name == "laguna":
        for other in ({"expert_scale": True}, {"hash_routing": True}):
            moe.spec = dataclasses.replace(spec, **other)
            if other.get("expert_scale"):
                moe.expert_scale = torch.nn.Parameter(torch.ones(spec.num_experts))
            assert not moe_kernel.route_applies(x[0].reshape(1, -1), moe)
        moe.spec = spec
        assert moe_kernel.route_applies(x[0].reshape(1, -1), moe)
        monkeypatch.setattr(moe_kernel, "ROUTE", False)  # the switch: torch's routing, the experts in the call
        names.clear()
        torch.testing.assert_close(moe(x[0]), got[0], atol=1e-5, rtol=1e-5)
        assert names == ["kvlab_moe_step"]
        assert not moe_kernel.route_applies(x[0].reshape(1, -1).bfloat16(), moe.to(torch.bfloat16))


def test_not_taken_where_it_does_not_apply(kernel, monkeypatch):
    """Two tokens, two torch threads, float64, autograd and a biased shared expert keep the torch paths."""
    spec, act = SPECS["v4"]
    moe = MoE(16, spec, act=act)
    calls = _count_calls(monkeypatch)
    moe(torch.randn(1, 2, 16))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        moe(torch.randn(1, 1, 16))
    finally:
        torch.set_num_threads(threads)
    moe(torch.randn(1, 1, 16))
    assert calls == [spec.top_k]
    calls.clear()
    moe.double()(torch.randn(1, 1, 16, dtype=torch.float64))
    moe.float()
    with torch.enable_grad():
        moe(torch.randn(1, 1, 16, requires_grad=True))
    moe.shared.up_proj.bias = torch.nn.Parameter(torch.zeros(spec.shared_width))
    moe(torch.randn(1, 1, 16))
    assert calls == []


def test_no_compiler_warns_once_and_falls_back(monkeypatch, tmp_path):
    """No C++ compiler: one warning, then the torch paths (the same output as with the kernel off), nothing built."""
    spec, act = SPECS["v4"]
    torch.manual_seed(4)
    moe = MoE(16, spec, act=act)
    x = torch.randn(3, 1, 1, 16)
    monkeypatch.setattr(moe_kernel, "ENABLED", False)
    want = [moe(t) for t in x]
    monkeypatch.setattr(moe_kernel, "ENABLED", True)
    monkeypatch.setattr(moe_kernel, "KERNEL", moe_kernel.kernel())  # not built yet
    monkeypatch.setenv("CXX", "kvlab-no-such-compiler")
    monkeypatch.setenv("KVLAB_KERNEL_DIR", str(tmp_path))
    with pytest.warns(UserWarning, match="moe_kernel.cpp unavailable .*no C\\+\\+ compiler.*torch paths") as rec:
        got = [moe(t) for t in x]
    assert len([w for w in rec if "unavailable" in str(w.message)]) == 1
    assert all(torch.equal(a, b) for a, b in zip(got, want)) and moe_kernel.KERNEL.lib is None
    assert list(tmp_path.iterdir()) == []


def test_group_limit_in_the_call_keeps_the_best_groups(kernel, monkeypatch):
    """DeepSeek V3's group limit in the call: a router whose best two experts lie in one group while the group of the
    next best sums higher chooses from the best groups only, as ``MoE.route`` does (a mutation that drops the limit, or
    scores a group by its best alone, picks other experts)."""
    moe, spec, act, hidden = _moe("v3", 7)
    moe.spec = dataclasses.replace(spec, n_group=4, topk_group=1)
    moe.router_bias.zero_()
    x = torch.randn(1, 1, hidden)
    logits = torch.tensor([3.0, -4.0, 2.0, 1.9, -1.0, -1.0, -1.0, -1.0])  # group 0: 3 + -4; group 1: 2 + 1.9
    moe.router.weight.copy_(torch.linalg.lstsq(x.reshape(1, -1), logits[None]).solution.T)
    idx, _ = moe.route(x.reshape(1, -1))
    assert sorted(idx[0].tolist()) == [2, 3]
    names = count_calls(monkeypatch, moe_kernel, {"kvlab_moe_route_step": lambda a: "route"})
    torch.testing.assert_close(moe(x), reference(moe, x.reshape(-1), act).view_as(x), atol=1e-5, rtol=1e-5)
    assert names == ["route"]


def test_hash_routing_in_the_call(kernel, monkeypatch):
    """DeepSeek V4's hash-routed layer: with the token's id (``carry['input_ids']``) the call takes the table's experts
    and their sqrt-softplus weights, equal within 1e-5 to torch's routing (``ROUTE`` off) for 20 tokens."""
    moe, spec, act, hidden = _moe("v4", 8)
    moe = MoE(hidden, dataclasses.replace(spec, hash_routing=True), act=act, vocab=50)
    for p in moe.parameters():
        p.normal_(0, 0.3)
    names = count_calls(monkeypatch, moe_kernel, {f: (lambda a, f=f: f) for f in (
        "kvlab_moe_step", "kvlab_moe_route_step")})
    x = torch.randn(20, 1, 1, hidden)
    ids = torch.randint(0, 50, (20, 1, 1))
    got = torch.stack([moe(t, carry={"input_ids": i}) for t, i in zip(x, ids, strict=True)])
    assert names == ["kvlab_moe_route_step"] * 20
    monkeypatch.setattr(moe_kernel, "ROUTE", False)
    want = torch.stack([moe(t, carry={"input_ids": i}) for t, i in zip(x, ids, strict=True)])
    assert names[20:] == ["kvlab_moe_step"] * 20
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
