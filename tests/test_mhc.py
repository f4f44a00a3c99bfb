"""mHC (manifold-constrained hyper-connections) as a residual technique on a plain kvlab model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import random_model, tiny_config

import kvlab
from kvlab.layers import mhc_kernel
from kvlab.layers.mhc import HyperConnection, HyperHead, sinkhorn, sinkhorn_by_rows, sinkhorn_in_place
from kvlab.model import Model


@pytest.fixture
def no_grad():
    with torch.no_grad():
        yield


def mhc_config(streams=4, **kw):
    return dataclasses.replace(tiny_config(**kw), mhc_streams=streams)


@pytest.mark.parametrize("n", [2, 4, 6])
def test_sinkhorn_doubly_stochastic_fp32(n):
    logits = torch.randn(3, 5, n, n, generator=torch.Generator().manual_seed(n))
    m = sinkhorn(logits.to(torch.bfloat16), iters=20, eps=1e-6)
    assert m.dtype == torch.float32
    assert bool((m >= 0).all())
    torch.testing.assert_close(m.sum(-1), torch.ones(3, 5, n), atol=1e-5, rtol=0)
    torch.testing.assert_close(m.sum(-2), torch.ones(3, 5, n), atol=1e-5, rtol=0)


@pytest.mark.parametrize("n", [2, 4, 6])
def test_sinkhorn_in_place_is_the_same_arithmetic(n):
    """The in-place form (no autograd: an eager decode step) against the whole-matrix form autograd takes: its row
    sums add eps second, not last, so it is within a few units in the last place (3e-7), over logits from 0.1 to 30
    times a normal draw; the autograd form still carries a gradient, and without autograd ``sinkhorn`` is this form
    when the C++ kernel is off (on, it is within 3e-7 of the autograd form too)."""
    gen = torch.Generator().manual_seed(n)
    logits = torch.cat([torch.randn(200, 1, n, n, generator=gen) * s for s in (0.1, 1, 3, 10, 30)], dim=1)
    whole = sinkhorn(logits.clone().requires_grad_(True), iters=20, eps=1e-6)
    assert whole.grad_fn is not None
    fast = sinkhorn_in_place(logits, iters=20, eps=1e-6)
    torch.testing.assert_close(fast, whole.detach(), atol=3e-7, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(sinkhorn(logits, iters=20, eps=1e-6), whole.detach(), atol=3e-7, rtol=0)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(mhc_kernel, "ENABLED", False)  # no C++ kernel (kvlab/layers/mhc_kernel.py): this form
            assert torch.equal(sinkhorn(logits, iters=20, eps=1e-6), fast)


@pytest.mark.parametrize("n", [2, 4, 6])
def test_sinkhorn_by_rows_is_the_same_arithmetic(n):
    """The form compiled steps use (one row per tensor) against the whole-matrix form autograd takes: equal to the
    last bit for n <= 4 (torch adds a column's values in order), within float rounding beyond; within 3e-7 of the
    in-place form an eager step takes."""
    logits = torch.randn(3, 5, n, n, generator=torch.Generator().manual_seed(n)) * 3
    whole = sinkhorn(logits.clone().requires_grad_(True), iters=20, eps=1e-6).detach()
    rows = sinkhorn_by_rows(logits, iters=20, eps=1e-6)
    if n <= 4:
        assert torch.equal(rows, whole)
    torch.testing.assert_close(rows, whole, atol=1e-6, rtol=0)
    torch.testing.assert_close(rows, sinkhorn_in_place(logits, iters=20, eps=1e-6), atol=3e-7, rtol=0)


def test_compiled_sinkhorn_runs_one_loop_per_iteration():
    """Inductor (C++ on the CPU) turns the compiled Sinkhorn of a decode step (``[1, 1, 4, 4]``) into one loop per
    iteration, a column normalisation fused with the next row normalisation, plus the softmax and the output:
    ``iters + 2`` loops at most (inductor's generated kernel count), where the whole-matrix form takes a loop per
    normalisation (``2 iters + 1``); and the same values as eager."""
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config
    from torch._inductor import metrics

    iters = 5
    logits = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 3
    torch._dynamo.reset()
    metrics.reset()
    with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
        out = torch.compile(sinkhorn, backend="inductor", fullgraph=True)(logits, iters, 1e-6)
    assert 1 <= metrics.generated_kernel_count <= iters + 2 < 2 * iters + 1
    torch.testing.assert_close(out, sinkhorn(logits, iters, 1e-6), atol=1e-6, rtol=0)


def test_bf16_model_keeps_mhc_in_fp32(no_grad):
    cfg = mhc_config()
    model = Model.from_config(cfg, dtype=torch.bfloat16)
    seen = []
    for mod in model.modules():
        if isinstance(mod, HyperConnection):
            orig = mod.maps
            mod.maps = lambda x, _o=orig: seen.append(_o(x)) or seen[-1]
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "hc_" in n)
    assert model.embed.weight.dtype == torch.bfloat16
    out = model(torch.randint(0, cfg.vocab_size, (2, 9)))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert len(seen) == 2 * cfg.num_layers
    for pre, post, m in seen:
        assert pre.dtype == post.dtype == m.dtype == torch.float32
        torch.testing.assert_close(m.sum(-1), torch.ones_like(m.sum(-1)), atol=1e-5, rtol=0)
        torch.testing.assert_close(m.sum(-2), torch.ones_like(m.sum(-2)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kernel", [False, True])
def test_hyper_connection_matches_transformers(no_grad, monkeypatch, kernel):
    """Read, write and head against transformers' modules, with the C++ kernel (kvlab/layers/mhc_kernel.py) off and
    on; on, it sums ``W x`` in another order, so the written streams (|x| up to ~4) are within a few ulp, 4e-6."""
    monkeypatch.setattr(mhc_kernel, "ENABLED", kernel)
    from transformers.models.deepseek_v4.configuration_deepseek_v4 import DeepseekV4Config
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import (
        DeepseekV4HyperConnection,
        DeepseekV4HyperHead,
    )

    hf_cfg = DeepseekV4Config(hidden_size=24, hc_mult=3, hc_sinkhorn_iters=7, hc_eps=1e-6, rms_norm_eps=1e-6)
    g = torch.Generator().manual_seed(0)
    ref, ours = DeepseekV4HyperConnection(hf_cfg), HyperConnection(3, 24, 7, 1e-6, 1e-6)
    for name_ref, name_ours in (("fn", "hc_fn"), ("base", "hc_bias"), ("scale", "hc_scale")):
        w = torch.randn(getattr(ref, name_ref).shape, generator=g)
        getattr(ref, name_ref).copy_(w)
        getattr(ours, name_ours).copy_(w)
    x = torch.randn(2, 5, 3, 24, generator=g)
    post, comb, collapsed = ref(x)
    c2, (post2, comb2) = ours.read(x)
    torch.testing.assert_close(c2, collapsed, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(post2, post, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(comb2, comb, atol=1e-6, rtol=1e-5)
    out = torch.randn(2, 5, 24, generator=g)
    expect = post.unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(comb.transpose(-1, -2), x)
    atol = 4e-6 if kernel else 1e-6
    torch.testing.assert_close(HyperConnection.write((post2, comb2), out, x), expect, atol=atol, rtol=1e-5)
    head_ref, head = DeepseekV4HyperHead(hf_cfg), HyperHead(3, 24, 1e-6, 1e-6)
    for name_ref, name_ours in (("hc_fn", "hc_fn"), ("hc_base", "hc_bias"), ("hc_scale", "hc_scale")):
        w = torch.randn(getattr(head_ref, name_ref).shape, generator=g)
        getattr(head_ref, name_ref).copy_(w)
        getattr(head, name_ours).copy_(w)
    torch.testing.assert_close(head(x), head_ref(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 4])
def test_cached_equals_uncached_and_prefix(no_grad, chunk):
    cfg = mhc_config(moe=True)
    model = random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (3, 17), generator=torch.Generator().manual_seed(1))
    pad = torch.tensor([0, 3, 8])
    mask = (torch.arange(17)[None] >= pad[:, None]).long()
    full = model(ids, attention_mask=mask)
    cache = model.new_cache(3, max_length=20)
    cache.set_padding(pad)
    inc = torch.cat([model(ids[:, s:s + chunk], cache=cache) for s in range(0, 17, chunk)], 1)
    for r, p in enumerate(pad.tolist()):
        torch.testing.assert_close(inc[r, p:], full[r, p:], atol=1e-5, rtol=0)
        torch.testing.assert_close(model(ids[r:r + 1, p:])[0], full[r, p:], atol=1e-5, rtol=0)
    plain = model(ids[:1])
    for n in (1, 6, 16):
        torch.testing.assert_close(model(ids[:1, :n]), plain[:, :n], atol=1e-5, rtol=0)
    torch.testing.assert_close(model(ids[:1], last_only=True)[:, 0], plain[:, -1], atol=1e-5, rtol=0)


def test_mhc_model_trains():
    cfg = mhc_config(shared=False)
    model = Model.from_config(cfg, seed=0, std=0.05)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.randint(0, cfg.vocab_size, (4, 24), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(12):
        logits = model(data[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), data[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    assert all(p.grad is not None for n, p in model.named_parameters() if "hc_" in n)


def test_calculator_counts_mhc():
    cfg = mhc_config(streams=3)
    model = Model.from_config(cfg)
    plain = dataclasses.replace(cfg, mhc_streams=None)
    c, c0 = kvlab.costs(cfg, context=64, dtype="float32"), kvlab.costs(plain, context=64, dtype="float32")
    assert c.params_total == model.num_parameters()
    n_hc = sum(p.numel() for n, p in model.named_parameters() if "hc_" in n)
    assert c.params_mhc == n_hc == c.params_total - c0.params_total
    assert c.mhc_flops_per_token > 2 * (n_hc - 3 * 2 * cfg.num_layers)  # projections alone, plus mixing
    assert c.flops_per_token - c0.flops_per_token == c.mhc_flops_per_token
    assert c.kv_cache_bytes == c0.kv_cache_bytes
    bf = kvlab.costs(cfg, context=64, dtype="bf16")
    bf0 = kvlab.costs(plain, context=64, dtype="bf16")
    assert bf.weight_read_bytes_per_step - bf0.weight_read_bytes_per_step == 4 * n_hc  # kept in fp32
    assert any("mHC" in a for a in c.assumptions)


def test_mhc_validation():
    with pytest.raises(ValueError, match="mhc_streams"):
        dataclasses.replace(tiny_config(), mhc_streams=0)
    with pytest.raises(ValueError, match="ple_dim"):
        dataclasses.replace(tiny_config(), mhc_streams=2, ple_dim=8)
