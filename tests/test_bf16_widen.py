"""Many-row bf16 weight products widened to float32 GEMMs (kvlab/layers/bf16_widen.py, through kvlab/layers/linear.py)
against a float64 reference of the same bf16 values and torch's bf16 ``F.linear``; taken only where it applies; tiny
models of every kind prefilling in bf16 with it on as with it off."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from helpers import random_model
from test_chunk_attend import case, oracle

from kvlab import kinds
from kvlab.config import LayerSpec, ModelConfig
from kvlab.layers import bf16_widen, chunk_attend
from kvlab.layers.core import Step
from kvlab.layers.linear import Linear, linear
from kvlab.layers.moe import GROUPED_MAX, Experts


@pytest.fixture
def widen(monkeypatch):
    """The widened path on (as on a CPU without native bf16, whatever this one has)."""
    monkeypatch.setattr(bf16_widen, "ENABLED", True)
    monkeypatch.setattr(bf16_widen, "NATIVE_BF16", False)


def _spy(monkeypatch) -> list[tuple[int, int, int]]:
    """Each widened call's (input rows, in, out)."""
    calls: list[tuple[int, int, int]] = []
    real = bf16_widen.linear

    def spy(x, weight, bias=None):
        calls.append((x.numel() // x.shape[-1], weight.shape[1], weight.shape[0]))
        return real(x, weight, bias)

    monkeypatch.setattr(bf16_widen, "linear", spy)
    return calls


def _case(n: int, cin: int, cout: int, bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, generator=g).bfloat16()
    w = (torch.randn(cout, cin, generator=g) / cin ** 0.5).bfloat16()
    b = torch.randn(cout, generator=g).bfloat16() if bias else None
    return x, w, b


@pytest.mark.parametrize("n,cin,cout", [(9, 37, 19), (64, 131, 67), (300, 96, 40)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("blocks", [False, True])
def test_equals_float64_reference_and_torch(widen, monkeypatch, n, cin, cout, bias, blocks):
    """Whole and in blocks of output rows (``BLOCK_FLOATS`` cut so the weight takes 3+ blocks): within half a bf16 step
    (plus float32 accumulation) of the float64 products of the same bf16 values, within one step of torch's bf16
    ``F.linear``; one widened call."""
    if blocks:
        monkeypatch.setattr(bf16_widen, "BLOCK_FLOATS", cin * (cout // 3 - 1))
    x, w, b = _case(n, cin, cout, bias)
    calls = _spy(monkeypatch)
    got = linear(x, w, b)
    assert calls == [(n, cin, cout)]
    assert got.dtype == torch.bfloat16 and got.shape == (n, cout)
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    torch.testing.assert_close(got.double(), ref, rtol=2 ** -8, atol=1e-5)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=2 ** -7, atol=1e-5)


def test_rounds_once_to_nearest_even(widen):
    """The float32 sum rounds to bf16 once, nearest even: 1 + 2^-8 -> 1, 1 + 3 * 2^-8 -> 1 + 2^-6 (9 rows)."""
    w = torch.tensor([[1.0, 1.0], [1.0, 0.0]]).bfloat16()
    x = torch.tensor([[1.0, 2 ** -8]] * 5 + [[1.0, 3 * 2 ** -8]] * 4).bfloat16()
    got = linear(x, w).float()
    assert got[:5, 0].tolist() == [1.0] * 5 and got[5:, 0].tolist() == [1 + 2 ** -6] * 4
    assert got[:, 1].tolist() == [1.0] * 9


def test_leading_dims_and_non_contiguous(widen):
    """``x [B, T, in]`` and a transposed weight view: the same values as the 2-D contiguous call, shaped."""
    x, w, b = _case(12, 40, 24, True, seed=2)
    got = linear(x.view(3, 4, 40), w, b)
    assert got.shape == (3, 4, 24)
    torch.testing.assert_close(got.view(12, 24), linear(x, w, b), rtol=0, atol=0)
    wt = w.t().contiguous().t()
    assert not wt.is_contiguous() and bf16_widen.applies(x, wt, b)
    torch.testing.assert_close(linear(x, wt, b), linear(x, w, b), rtol=0, atol=0)


def test_taken_only_where_it_applies(widen, monkeypatch):
    """Up to 8 rows (the decode kernel's), fp32, autograd, a CPU with native bf16, the switch off: not taken."""
    x, w, b = _case(9, 16, 8, True)
    assert bf16_widen.applies(x, w, b)
    assert not bf16_widen.applies(x[:8], w, b)
    assert not bf16_widen.applies(x.float(), w.float(), b.float())
    assert not bf16_widen.applies(x, w, b.float())
    assert not bf16_widen.applies(x, w.clone().requires_grad_(), b)
    with torch.no_grad():
        assert bf16_widen.applies(x, w.clone().requires_grad_(), b)
    monkeypatch.setattr(bf16_widen, "NATIVE_BF16", True)
    assert not bf16_widen.applies(x, w, b)
    monkeypatch.setattr(bf16_widen, "NATIVE_BF16", False)
    monkeypatch.setattr(bf16_widen, "ENABLED", False)
    assert not bf16_widen.applies(x, w, b)


def test_linear_module_widened_and_autograd(widen, monkeypatch):
    """A bf16 :class:`Linear` under ``no_grad`` on 10 rows is widened (one call); with autograd it runs torch's path
    (no call) and its gradients flow."""
    torch.manual_seed(0)
    layer = Linear(45, 29).to(torch.bfloat16)
    x = torch.randn(10, 45).bfloat16()
    calls = _spy(monkeypatch)
    with torch.no_grad():
        got = layer(x)
    assert calls == [(10, 45, 29)]
    torch.testing.assert_close(got, F.linear(x, layer.weight, layer.bias).detach(), rtol=2 ** -7, atol=1e-5)
    layer(x).float().sum().backward()
    assert len(calls) == 1 and layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("window,start,prefix_blocks", [(None, 9, 1), (None, 30, 4), (4, 22, 1), (6, 3, 1)])
def test_chunk_attention_widened(widen, monkeypatch, window, start, prefix_blocks):
    """A bf16 prefill chunk's attention in pieces (prefix + causal square, the prefix whole or in 4 widened blocks of
    keys merged by their log-sum-exps; window blocks) runs in float32 on widened copies: bf16 out, ``[B, T, H, D]``
    memory, within a bf16 rounding of the float64 softmax of the same bf16 values; with the widened path off, None
    (the masked bf16 call)."""
    monkeypatch.setattr(chunk_attend, "MIN_BLOCK", 2)
    monkeypatch.setattr(chunk_attend, "MIN_WIDE_KEYS", 1)
    monkeypatch.setattr(chunk_attend, "WIDE_BLOCK_BYTES", 8 * 2 * 2 * 8 * -(-start // prefix_blocks))  # B Hkv D
    calls = []
    real = chunk_attend._flash
    monkeypatch.setattr(chunk_attend, "_flash", lambda *a, **kw: calls.append(a[1].dtype) or real(*a, **kw))
    t, held = 13, start if window is None else min(start, window)
    q, k, v, qpos, kpos = (a.bfloat16() if a.is_floating_point() else a for a in case(2, 4, 2, t, start, held))
    out = chunk_attend.attend_chunk(q, k, v, Step(start=start, qpos=qpos, pad=None), kpos, window, 0.4)
    assert out is not None and out.dtype == torch.bfloat16 and out.transpose(1, 2).is_contiguous()
    assert calls == ([torch.float32] * (prefix_blocks + 1) if window is None else [])
    ref = oracle(q, k, v, qpos, kpos, window, None, 0.4)
    torch.testing.assert_close(out.double(), ref, rtol=2 ** -8, atol=1e-4)
    monkeypatch.setattr(bf16_widen, "ENABLED", False)
    assert chunk_attend.attend_chunk(q, k, v, Step(start=start, qpos=qpos, pad=None), kpos, window, 0.4) is None


@pytest.mark.parametrize("kind,ple", [(k, False) for k in kinds.KINDS] + [("gqa", True)])
def test_every_kind_prefills_in_bf16_widened_as_torch(widen, monkeypatch, kind, ple):
    """Every attention kind (its first example, 3 layers; GQA also with Gemma 4's PLE), bf16, a batch of 2: a 24-token
    prefill in chunks of 12 into a cache has every bf16 :class:`Linear` run on more than 8 rows (recorded by a hook;
    CCA's value-shift projection runs on one row a sequence) and the LM head widened, and its logits within bf16
    rounding of the same prefill with the widened path off (torch's bf16 ``F.linear``)."""
    ex = kinds.KINDS[kind].examples[0]
    specs = [LayerSpec(attention=kind, intermediate_size=40, **copy.deepcopy(ex)) for _ in range(3)]
    cfg = ModelConfig(vocab_size=61, hidden_size=32, layers=specs, max_positions=256,
                      **({"ple_dim": 4, "ple_vocab_size": 61} if ple else {}))
    model = random_model(cfg, seed=2).to(torch.bfloat16)
    ids = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(5))
    ran: list[tuple[int, int, int]] = []  # (rows, in, out) of each bf16 Linear run on more than 8 rows

    def hook(mod, a, o):
        rows = a[0].numel() // a[0].shape[-1]
        if mod.weight.dtype == torch.bfloat16 and rows > 8:
            ran.append((rows, mod.in_features, mod.out_features))

    for m in model.modules():
        if isinstance(m, Linear):
            m.register_forward_hook(hook)

    def prefill() -> torch.Tensor:
        cache = model.new_cache(2, max_length=32)
        return torch.cat([model(ids[:, s:s + 12], cache=cache) for s in (0, 12)], 1).float()

    with torch.no_grad():
        calls = _spy(monkeypatch)
        on = prefill()
        assert ran and Counter(ran) <= Counter(calls) and len(calls) == len(ran) + 2  # + the LM head, each chunk
        monkeypatch.setattr(bf16_widen, "ENABLED", False)
        calls.clear()
        off = prefill()
    assert not calls
    torch.testing.assert_close(on, off, rtol=0.05, atol=0.05)


def test_moe_prefill_loop_widened(widen, monkeypatch):
    """A prefill's MoE (more than ``GROUPED_MAX E`` choices: the loop over experts) in bf16: each expert with more
    than 8 tokens has its three products widened, and the output is within bf16 rounding of the loop with torch's bf16
    products (the widened path off)."""
    torch.manual_seed(0)
    ex = Experts(4, 24, 40, "silu").to(torch.bfloat16)
    n, k = GROUPED_MAX * 4 // 2 + 8, 2  # past GROUPED_MAX E choices
    x = torch.randn(n, 24).bfloat16()
    idx = torch.randint(0, 4, (n, k), generator=torch.Generator().manual_seed(1))
    w = torch.rand(n, k).bfloat16()
    counts = torch.bincount(idx.reshape(-1), minlength=4).tolist()
    calls = _spy(monkeypatch)
    with torch.no_grad():
        on = ex(x, idx, w)
        monkeypatch.setattr(bf16_widen, "ENABLED", False)
        off = ex(x, idx, w)
    assert sorted(calls) == sorted(c for e in counts if e > 8 for c in ((e, 24, 40), (e, 24, 40), (e, 40, 24)))
    torch.testing.assert_close(on.float(), off.float(), rtol=0.02, atol=0.02)
