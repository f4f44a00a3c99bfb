"""The C++ RoPE rows of a decode step (kvlab/layers/rows_kernel.py, through kvlab/layers/rope.py) against a float64
reference and torch's operators; taken only where they apply; a tiny model with q/k norms and partial RoPE decoding
with the kernel on and off (the same logits, bit for bit)."""

from __future__ import annotations

import pytest
import torch
from helpers import count_calls, random_model, require_kernel, tiny_config

from kvlab import generate
from kvlab.config import RopeSpec
from kvlab.kinds.gqa import GQASpec
from kvlab.layers import rows_kernel
from kvlab.layers.rope import Rotary, apply_rope, rotate_part


@pytest.fixture
def kernel(monkeypatch):
    require_kernel(monkeypatch, rows_kernel, "rows")


def _calls(monkeypatch) -> list[str]:
    return count_calls(monkeypatch, rows_kernel, {"kvlab_rope": lambda a: "rope"})


@pytest.mark.parametrize("tokens_first", [True, False])
@pytest.mark.parametrize("partial", [1.0, 0.5])
@pytest.mark.parametrize("b,t", [(1, 1), (2, 3)])
def test_rope_equals_torch(kernel, monkeypatch, tokens_first, partial, b, t):
    """Whole and partial rotation, tokens-first and heads-first layouts, a batch whose rows sit at other positions:
    the same products and sums as :func:`rotate_part` (equal up to float32 rounding) and within float32 rounding of
    the float64 rotation; one call."""
    g = torch.Generator().manual_seed(1)
    d, h = 64, 3
    rot = Rotary(RopeSpec(theta=10000.0, partial=partial), d)
    pos = torch.arange(t)[None] + torch.tensor([[5], [900]])[:b]
    cos, sin = rot(pos)
    x = torch.randn((b, t, h, d) if tokens_first else (b, h, t, d), generator=g)
    calls = _calls(monkeypatch)
    with torch.no_grad():
        got = apply_rope(x, cos, sin, tokens_first=tokens_first)
    assert calls == ["rope"] and got.shape == x.shape
    half = cos.shape[-1] // 2
    c, s = (cos[:, :, None, :half], sin[:, :, None, :half]) if tokens_first else (cos[:, None, :, :half],
                                                                                  sin[:, None, :, :half])
    torch.testing.assert_close(got, rotate_part(x, c, s), rtol=1e-6, atol=1e-6)
    ref = rotate_part(x.double(), c.double(), s.double())
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


def test_taken_only_where_it_applies(kernel, monkeypatch):
    """bf16, autograd, a non-contiguous input, more tokens than a decode step, tables of another batch, the switch
    off: torch's operators, no call."""
    x = torch.randn(1, 1, 4, 16)
    cos, sin = Rotary(RopeSpec(), 16)(torch.zeros(1, 1, dtype=torch.long))
    assert rows_kernel.rope_applies(x, cos, sin, True)
    assert not rows_kernel.rope_applies(x.requires_grad_(), cos, sin, True)
    with torch.no_grad():
        assert rows_kernel.rope_applies(x, cos, sin, True)
    x = x.detach()
    assert not rows_kernel.rope_applies(torch.randn(1, 1, 4, 32)[..., :16], cos, sin, True)
    assert not rows_kernel.rope_applies(torch.randn(1, 9, 4, 16), *Rotary(RopeSpec(), 16)(torch.zeros(1, 9).long()),
                                        True)
    assert not rows_kernel.rope_applies(torch.randn(2, 1, 4, 16), cos, sin, True)
    assert not rows_kernel.rope_applies(x.bfloat16(), cos, sin, True)
    calls = _calls(monkeypatch)
    apply_rope(torch.randn(2, 1, 4, 16), cos.expand(2, 1, 16), sin.expand(2, 1, 16), tokens_first=True)
    assert calls == []
    monkeypatch.setattr(rows_kernel, "ENABLED", False)
    assert not rows_kernel.rope_applies(x, cos, sin, True)


@pytest.mark.parametrize("batch", [1, 2])
def test_tiny_model_decodes_with_the_kernel_as_without(kernel, monkeypatch, batch):
    """A tiny model with q/k norms and partial RoPE: 10 greedy tokens with the kernel on as with it off, a decode
    step's logits equal (the same roundings as torch's operators); the step takes the kernel for every rotation (q
    and k of each layer that makes K/V, q of the one that shares them)."""
    model = random_model(tiny_config(gqa=GQASpec(qk_norm=True), rope=RopeSpec(theta=10000.0, partial=0.5)), seed=2)
    ids = torch.randint(0, model.config.vocab_size, (batch, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        on = generate(model, ids, max_new_tokens=10, temperature=0.0)
        cache = model.new_cache(batch, max_length=32)
        model(ids, cache=cache)
        calls = _calls(monkeypatch)
        step_on = model(on[:, 6:7], cache=cache)
        layers = len(model.layers)
        assert calls.count("rope") == 2 * layers - 1
        monkeypatch.setattr(rows_kernel, "ENABLED", False)
        off = generate(model, ids, max_new_tokens=10, temperature=0.0)
        cache = model.new_cache(batch, max_length=32)
        model(ids, cache=cache)
        step_off = model(on[:, 6:7], cache=cache)
    assert torch.equal(on, off)
    assert torch.equal(step_on, step_off)
