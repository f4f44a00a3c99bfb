"""The C++ rows of a decode step (kvlab/layers/rows_kernel.py: RoPE through kvlab/layers/rope.py, MLA's rotations
written in place, RMS norm through kvlab/layers/norm.py) against a float64 reference and torch's operators; taken
only where they apply; tiny models (q/k norms and partial RoPE; MLA) decoding with the kernel on and off (the same
logits, bit for bit)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import count_calls, random_model, require_kernel, tiny_config

from kvlab import generate, kinds
from kvlab.config import LayerSpec, ModelConfig, RopeSpec
from kvlab.kinds.gqa import GQASpec
from kvlab.layers import rows_kernel
from kvlab.layers.rope import Rotary, apply_rope, rotate, rotate_part


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


@pytest.mark.parametrize("dim", [8, 9, 37, 128, 384, 512, 1000, 2048, 5000])
def test_rms_norm_equals_torch_to_the_bit(kernel, monkeypatch, dim):
    """1, 3 and 8 rows of sizes around torch's sum kernel's chunks (8-wide vectors, 4 interleaved, 16 a chunk: a
    scalar tail, leftover vectors, one and several chunks), values from 1e-3 to 1e3, with a weight, none, and the Gemma
    offset: equal to ``F.rms_norm`` to the bit (a mutation of the summation order, e.g. the leftover vectors into
    another accumulator or the lanes summed first, fails it), one call each."""
    if not rows_kernel.NORM:
        pytest.skip("torch's CPU capability is not AVX2: the norm stays torch's")
    g = torch.Generator().manual_seed(dim)
    calls = count_calls(monkeypatch, rows_kernel, {"kvlab_rms_norm": lambda a: a[1]})
    for rows in (1, 3, 8):
        for _ in range(20):
            x = torch.randn(rows, dim, generator=g) * 10 ** (6 * torch.rand(1, generator=g).item() - 3)
            w = torch.randn(dim, generator=g)
            assert rows_kernel.norm_applies(x, w)
            assert torch.equal(rows_kernel.rms_norm(x, w, 1e-6), F.rms_norm(x, (dim,), w, 1e-6))
            assert torch.equal(rows_kernel.rms_norm(x, None, 1e-5), F.rms_norm(x, (dim,), None, 1e-5))
            assert torch.equal(rows_kernel.rms_norm(x, w, 1e-6, offset=True), F.rms_norm(x, (dim,), 1.0 + w, 1e-6))
    assert calls == [1] * 60 + [3] * 60 + [8] * 60


def test_rms_norm_taken_only_where_it_applies(kernel, monkeypatch):
    """Fewer than 8 channels, more rows than a decode step, bf16, a weight of another size, autograd, two threads, the
    switch off: torch's norm."""
    x, w = torch.randn(2, 16), torch.randn(16)
    assert rows_kernel.norm_applies(x, w) == rows_kernel.NORM
    monkeypatch.setattr(rows_kernel, "NORM", True)
    assert rows_kernel.norm_applies(x, w) and rows_kernel.norm_applies(x, None)
    assert not rows_kernel.norm_applies(torch.randn(2, 7), None)
    assert not rows_kernel.norm_applies(torch.randn(9, 16), w)
    assert not rows_kernel.norm_applies(x.bfloat16(), w)
    assert not rows_kernel.norm_applies(x, torch.randn(17))
    assert not rows_kernel.norm_applies(x.t().contiguous().t()[:, :8], None)
    assert not rows_kernel.norm_applies(x.requires_grad_(), w)
    x = x.detach()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert not rows_kernel.norm_applies(x, w)
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(rows_kernel, "NORM", False)
    assert not rows_kernel.norm_applies(x, w)


@pytest.mark.parametrize("layout", ["deinterleave", "half"])
def test_rope_pairs_equal_rotate_to_the_bit(kernel, layout):
    """Rows at a stride (a projection's heads) rotated into strided rows (a query's or cache row's rotary channels),
    per-row tables and one table for the batch: equal to :func:`kvlab.layers.rope.rotate` to the bit, nothing else
    written."""
    g = torch.Generator().manual_seed(0)
    rot = Rotary(RopeSpec(theta=10000.0), 16)
    for tb in (1, 2):
        cos, sin = rot(torch.tensor([[7], [3000]])[:tb])  # [tb, 1, 16]
        x = torch.randn(2, 3, 40, generator=g)[..., 5:21]  # [2, 3, 16], rows 40 apart
        buf = torch.zeros(2, 3, 30)
        out = buf[..., 10:26]
        assert rows_kernel.pairs_applies(x, cos[:, 0], sin[:, 0], out)
        rows_kernel.rope_pairs(x, cos[:, 0], sin[:, 0], layout, out)
        want = rotate(x, cos[:, :, :8].expand(2, 1, 8), sin[:, :, :8].expand(2, 1, 8), layout)
        assert torch.equal(out, want)
        assert buf[..., :10].abs().sum() == 0 and buf[..., 26:].abs().sum() == 0


@pytest.mark.parametrize("batch", [1, 2])
def test_mla_decode_rows_as_torch(kernel, monkeypatch, batch):
    """Tiny MLA layers (interleaved rotary, as DeepSeek V3): a decode step writes its latent row and rotated query by
    the kernel (two rotations a layer, norms in the call) with the logits and cache of the kernel off, bit for bit,
    over 6 greedy tokens."""
    spec = kinds.KINDS["mla"].examples[0]
    cfg = ModelConfig(vocab_size=61, hidden_size=32, max_positions=64,
                      layers=[LayerSpec(attention="mla", intermediate_size=40, **spec) for _ in range(2)])
    model = random_model(cfg, seed=3)
    assert all(m.spec.mla.rope_interleave for m in model.modules() if hasattr(m, "decode_rows"))
    ids = torch.randint(0, 61, (batch, 5), generator=torch.Generator().manual_seed(2))
    outs, caches = {}, {}
    with torch.no_grad():
        for on in (True, False):
            monkeypatch.setattr(rows_kernel, "ENABLED", on)
            calls = count_calls(monkeypatch, rows_kernel, {"kvlab_rope_pairs": lambda a: "pairs"})
            outs[on] = generate(model, ids, max_new_tokens=6, temperature=0.0)
            cache = model.new_cache(batch, max_length=16)
            model(ids, cache=cache)
            calls.clear()
            caches[on] = (model(outs[on][:, 5:6], cache=cache), cache.layers[0].latent[:, :6].clone())
            assert calls == ["pairs"] * 4 * on
    assert torch.equal(outs[True], outs[False])
    assert torch.equal(caches[True][0], caches[False][0]) and torch.equal(caches[True][1], caches[False][1])
