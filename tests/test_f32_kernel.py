"""The C++ float32 matrix-vector products (kvlab/layers/f32_kernel.py, kvlab/layers/linear.py) against a float64
reference and torch's ``F.linear``; taken only where it applies; tiny models decoding with the kernel on and off."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import count_calls, random_model, require_kernel, tiny_config

from kvlab import generate, kinds
from kvlab.config import LayerSpec, ModelConfig
from kvlab.layers import f32_kernel, moe_kernel
from kvlab.layers.linear import Linear, linear
from kvlab.layers.moe import MoE


@pytest.fixture
def kernel(monkeypatch):
    require_kernel(monkeypatch, f32_kernel, "float32")


def _count_calls(monkeypatch) -> list[tuple[int, int, int]]:
    """Each call's (input rows, in, out) (a proxy in front of the loaded library)."""
    return count_calls(monkeypatch, f32_kernel, {"kvlab_f32_linear": lambda a: (a[1], a[2], a[4])})


def _case(n: int, cin: int, cout: int, bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, generator=g)
    w = torch.randn(cout, cin, generator=g) / cin ** 0.5
    b = torch.randn(cout, generator=g) if bias else None
    return x, w, b


# in: 37 (4 blocks of 8 + 5), 131 (the 4-accumulator body + 3), 1035 (the body + one block of 8 + 3); out odd
@pytest.mark.parametrize("cin,cout", [(37, 19), (131, 67), (1035, 5)])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("bias", [False, True])
def test_equals_float64_reference_and_torch(kernel, monkeypatch, n, cin, cout, bias):
    """Every input-row count's path (1-2: four accumulators, 3-4: two, 5-8: one): within float32 rounding of the
    float64 products of the same values and of torch's ``F.linear``; one kernel call."""
    x, w, b = _case(n, cin, cout, bias)
    calls = _count_calls(monkeypatch)
    got = linear(x, w, b)
    assert calls == [(n, cin, cout)]
    assert got.dtype == torch.float32 and got.shape == (n, cout)
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_leading_dims_and_non_contiguous_input(kernel):
    """``x [B, T, in]`` with ``B T <= 8``, and a transposed (non-contiguous) input: the kernel's result, shaped."""
    x, w, b = _case(6, 40, 24, True, seed=2)
    got = linear(x.view(2, 3, 40), w, b)
    assert got.shape == (2, 3, 24)
    torch.testing.assert_close(got.view(6, 24), linear(x, w, b), rtol=0, atol=0)
    xt = x.t().contiguous().t()  # same values, column-major
    assert not xt.is_contiguous() and f32_kernel.applies(xt, w, b)
    torch.testing.assert_close(linear(xt, w, b), linear(x, w, b), rtol=0, atol=0)


def test_taken_only_where_it_applies(kernel, monkeypatch):
    """bf16 / float64, more than 8 rows, a transposed weight, a wrongly typed bias, autograd, several threads, the
    switch off: torch's path, no kernel call."""
    x, w, b = _case(2, 16, 8, True)
    assert f32_kernel.applies(x, w, b)
    assert not f32_kernel.applies(x.bfloat16(), w.bfloat16(), b.bfloat16())
    assert not f32_kernel.applies(x.double(), w.double(), b.double())
    assert not f32_kernel.applies(torch.randn(9, 16), w, b)
    assert not f32_kernel.applies(torch.randn(2, 8), w.t())
    assert not f32_kernel.applies(x, w, b.double())
    assert not f32_kernel.applies(x, w.clone().requires_grad_(), b)
    with torch.no_grad():
        assert f32_kernel.applies(x, w.clone().requires_grad_(), b)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert not f32_kernel.applies(x, w, b)
    finally:
        torch.set_num_threads(threads)
    calls = _count_calls(monkeypatch)
    linear(torch.randn(9, 16), w, b)
    assert calls == []
    monkeypatch.setattr(f32_kernel, "ENABLED", False)
    assert not f32_kernel.applies(x, w, b)


def test_linear_module_kernel_and_autograd(kernel, monkeypatch):
    """A :class:`Linear` under ``no_grad`` takes the kernel (one call) and equals ``nn.Linear``'s result; with
    autograd it runs torch's path (no call) and its gradients flow."""
    torch.manual_seed(0)
    layer = Linear(45, 29)
    plain = torch.nn.Linear(45, 29)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(3, 45)
    calls = _count_calls(monkeypatch)
    with torch.no_grad():
        got = layer(x)
    assert calls == [(3, 45, 29)]
    torch.testing.assert_close(got, plain(x).detach(), rtol=1e-5, atol=1e-6)
    out = layer(x)
    assert len(calls) == 1
    out.sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("moe,batch", [(False, 2), (True, 1)])
def test_tiny_model_decodes_with_the_kernel_as_without(kernel, monkeypatch, moe, batch):
    """A tiny dense model and one with an MoE layer, float32: 12 greedy tokens with the kernel on as with it off (the
    same tokens), a decode step's logits within float32 rounding of the kernel-off ones; a decode step takes the
    kernel for every projection and the LM head, one row per sequence (but an MoE layer's shared expert at batch 1,
    which goes with its experts into the MoE kernel)."""
    require_kernel(monkeypatch, moe_kernel, "MoE")
    model = random_model(tiny_config(moe=moe), seed=1)
    ids = torch.randint(0, model.config.vocab_size, (batch, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        on = generate(model, ids, max_new_tokens=12, temperature=0.0)
        cache = model.new_cache(batch, max_length=32)
        model(ids, cache=cache)
        calls = _count_calls(monkeypatch)
        step_on = model(on[:, 7:8], cache=cache)
        linears = sum(isinstance(m, Linear) for m in model.modules())
        in_moe = sum(3 for m in model.modules() if isinstance(m, MoE) and m.shared is not None) if batch == 1 else 0
        assert len(calls) == linears + 1 - in_moe and all(c[0] == batch for c in calls)  # + the LM head
        assert (calls[-1][2], calls[-1][1]) == model.head_weight.shape
        monkeypatch.setattr(f32_kernel, "ENABLED", False)
        off = generate(model, ids, max_new_tokens=12, temperature=0.0)
        cache = model.new_cache(batch, max_length=32)
        model(ids, cache=cache)
        step_off = model(on[:, 7:8], cache=cache)
    assert torch.equal(on, off)
    torch.testing.assert_close(step_on, step_off, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("trans", [False, True])
@pytest.mark.parametrize("n", [1, 3, 8])
def test_grouped_equals_einsum(kernel, n, trans):
    """Per-group products (``kvlab_f32_grouped``) of odd sizes (37 inputs: the 8-wide body and a tail), the groups'
    weights a strided slice of a bigger tensor (MLA's ``W_uk`` / ``W_uv`` of ``kv_b_proj``), ``x`` a strided view and
    ``out`` a strided slice: within float32 rounding of the float64 ``einsum``; nothing outside ``out`` written."""
    g = torch.Generator().manual_seed(n)
    full = torch.randn(3, 13 + 6, 37, generator=g)
    w = full[:, 6:]  # [3, 13, 37], groups 19 x 37 apart
    k = 13 if trans else 37
    x = torch.randn(n, 3, k + 5, generator=g)[..., 2:2 + k]
    buf = torch.zeros(n, 3, (37 if trans else 13) + 4)
    out = buf[..., 1:-3]
    got = f32_kernel.grouped(x, w, trans=trans, out=out)
    want = torch.einsum("ngr,grc->ngc" if trans else "ngc,grc->ngr", x.double(), w.double())
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert buf[..., :1].abs().sum() == 0 and buf[..., -3:].abs().sum() == 0
    torch.testing.assert_close(f32_kernel.grouped(x, w, trans=trans), got, rtol=0, atol=0)


def test_grouped_taken_only_where_it_applies(kernel, monkeypatch):
    """bf16, 9 rows, weight rows not contiguous, groups that do not match, autograd, two threads, the switch off."""
    x, w = torch.randn(2, 3, 16), torch.randn(3, 5, 16)
    assert f32_kernel.grouped_applies(x, w)
    assert not f32_kernel.grouped_applies(x.bfloat16(), w.bfloat16())
    assert not f32_kernel.grouped_applies(torch.randn(9, 3, 16), w)
    assert not f32_kernel.grouped_applies(x, torch.randn(3, 16, 5).transpose(1, 2))
    assert not f32_kernel.grouped_applies(torch.randn(2, 4, 16), w)
    assert not f32_kernel.grouped_applies(x.requires_grad_(), w)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert not f32_kernel.grouped_applies(x.detach(), w)
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(f32_kernel, "GROUPED", False)
    assert not f32_kernel.grouped_applies(x.detach(), w)


@pytest.mark.parametrize("kind", ["mla", "csa"])
def test_decode_step_grouped_as_einsum(kernel, monkeypatch, kind):
    """A float32 decode step of tiny MLA layers (absorbed: ``W_uk`` into the query, ``W_uv`` on the latent output):
    two grouped calls a layer, logits within 1e-5 of the ``einsum`` path (``GROUPED`` off, no call); CSA layers'
    grouped output projection keeps its einsum (no call either way: kvlab/layers/compressed.py says why)."""
    spec = kinds.KINDS[kind].examples[0]
    cfg = ModelConfig(vocab_size=61, hidden_size=32, max_positions=64,
                      layers=[LayerSpec(attention=kind, intermediate_size=40, **spec) for _ in range(2)])
    model = random_model(cfg, seed=2)
    ids = torch.randint(0, 61, (1, 9), generator=torch.Generator().manual_seed(1))
    steps = {}
    calls = count_calls(monkeypatch, f32_kernel, {"kvlab_f32_grouped": lambda a: a[5]})
    with torch.no_grad():
        for on in (True, False):
            monkeypatch.setattr(f32_kernel, "GROUPED", on)
            cache = model.new_cache(1, max_length=16)
            model(ids[:, :8], cache=cache)
            calls.clear()
            steps[on] = model(ids[:, 8:], cache=cache)
            assert calls == ([1, 0] * 2 * on if kind == "mla" else [])  # W_uk (trans), then W_uv
    torch.testing.assert_close(steps[True], steps[False], rtol=1e-5, atol=1e-5)
