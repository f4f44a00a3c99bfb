"""The C++ bf16 matrix-vector products (kvlab/layers/bf16_kernel.py, kvlab/layers/linear.py) against torch's bf16
``F.linear`` and an fp32 reference of the same bf16 values; taken only where it applies; tiny models decoding in bf16
with the kernel on and off."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import count_calls, random_model, require_kernel, tiny_config

from kvlab import generate, kinds
from kvlab.config import LayerSpec, ModelConfig
from kvlab.layers import bf16_kernel, cpp_build, f32_kernel, moe_kernel
from kvlab.layers.linear import Linear, linear
from kvlab.layers.moe import MoE


@pytest.fixture
def kernel(monkeypatch):
    require_kernel(monkeypatch, bf16_kernel, "bf16")


def _count_calls(monkeypatch) -> list[tuple[int, int, int]]:
    """Each call's (input rows, in, out) (a proxy in front of the loaded library)."""
    return count_calls(monkeypatch, bf16_kernel, {"kvlab_bf16_linear": lambda a: (a[1], a[2], a[4])})


def _case(n: int, cin: int, cout: int, bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, generator=g).bfloat16()
    w = (torch.randn(cout, cin, generator=g) / cin ** 0.5).bfloat16()
    b = torch.randn(cout, generator=g).bfloat16() if bias else None
    return x, w, b


# in: 37 (4 blocks of 8 + 5), 131 (the 4-accumulator body + 3), 1035 (the body + one block of 8 + 3); out odd
@pytest.mark.parametrize("cin,cout", [(37, 19), (131, 67), (1035, 5)])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("bias", [False, True])
def test_equals_fp32_reference_and_torch(kernel, monkeypatch, n, cin, cout, bias):
    """Every input-row count's path (1-2: four accumulators, 3-4: two, 5-8: one): within half a bf16 step of the
    fp32 products of the same bf16 values (rounded to nearest, not truncated: truncating can miss by a whole step),
    within one step of torch's bf16 ``F.linear``; one kernel call."""
    x, w, b = _case(n, cin, cout, bias)
    calls = _count_calls(monkeypatch)
    got = linear(x, w, b)
    assert calls == [(n, cin, cout)]
    assert got.dtype == torch.bfloat16 and got.shape == (n, cout)
    ref = F.linear(x.float(), w.float(), None if b is None else b.float())
    torch.testing.assert_close(got.float(), ref, rtol=2 ** -8, atol=1e-5)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=2 ** -7, atol=1e-5)


def test_rounds_to_nearest_even(kernel):
    """Sums that fall exactly between two bf16 values round to the even one, as torch's conversion does: 1 + 2^-8
    (between 1 and 1 + 2^-7) -> 1, 1 + 3 * 2^-8 -> 1 + 2^-6; a NaN stays NaN."""
    w = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0]]).bfloat16()
    x = torch.tensor([[1.0, 2 ** -8]]).bfloat16()
    x3 = torch.tensor([[1.0, 3 * 2 ** -8]]).bfloat16()
    assert linear(x, w)[0, 0].item() == 1.0
    assert linear(x3, w)[0, 0].item() == 1 + 2 ** -6
    assert linear(x3, w)[0].float().tolist() == torch.tensor([1 + 3 * 2 ** -8] * 2 + [1.0]).bfloat16().float().tolist()
    nan = torch.tensor([[float("nan"), 1.0]]).bfloat16()
    assert torch.isnan(linear(nan, w)).all()


def test_leading_dims_and_non_contiguous_input(kernel):
    """``x [B, T, in]`` with ``B T <= 8``, and a transposed (non-contiguous) input: the kernel's result, shaped."""
    x, w, b = _case(6, 40, 24, True, seed=2)
    x3 = x.view(2, 3, 40)
    got = linear(x3, w, b)
    assert got.shape == (2, 3, 24)
    torch.testing.assert_close(got.view(6, 24), linear(x, w, b), rtol=0, atol=0)
    xt = x.t().contiguous().t()  # same values, column-major
    assert not xt.is_contiguous() and bf16_kernel.applies(xt, w, b)
    torch.testing.assert_close(linear(xt, w, b), linear(x, w, b), rtol=0, atol=0)


def test_taken_only_where_it_applies(kernel, monkeypatch):
    """fp32, more than 8 rows, a transposed weight, a wrongly typed bias, autograd, several threads, the switch off:
    torch's ``F.linear``, no kernel call."""
    x, w, b = _case(2, 16, 8, True)
    assert bf16_kernel.applies(x, w, b)
    assert not bf16_kernel.applies(x.float(), w.float(), b.float())
    assert not bf16_kernel.applies(torch.randn(9, 16).bfloat16(), w, b)
    assert not bf16_kernel.applies(torch.randn(2, 8).bfloat16(), w.t())
    assert not bf16_kernel.applies(x, w, b.float())
    assert not bf16_kernel.applies(x, w.clone().requires_grad_(), b)
    with torch.no_grad():
        assert bf16_kernel.applies(x, w.clone().requires_grad_(), b)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert not bf16_kernel.applies(x, w, b)
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(bf16_kernel, "ENABLED", False)
    assert not bf16_kernel.applies(x, w, b)


def test_linear_module_kernel_and_autograd(kernel, monkeypatch):
    """A bf16 :class:`Linear` under ``no_grad`` takes the kernel (one call) and equals ``nn.Linear``'s result within
    one bf16 step; with autograd it runs torch's path (no call) and its gradients flow."""
    torch.manual_seed(0)
    layer = Linear(45, 29).to(torch.bfloat16)
    plain = torch.nn.Linear(45, 29).to(torch.bfloat16)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(3, 45).bfloat16()
    calls = _count_calls(monkeypatch)
    with torch.no_grad():
        got = layer(x)
    assert calls == [(3, 45, 29)]
    torch.testing.assert_close(got, plain(x).detach(), rtol=2 ** -7, atol=1e-5)
    out = layer(x)
    assert len(calls) == 1
    out.float().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("moe,batch", [(False, 2), (True, 2), (True, 1)])
def test_tiny_model_decodes_in_bf16_with_the_kernel_as_without(kernel, monkeypatch, moe, batch):
    """A tiny dense model (GQA, a shared-K/V layer) and one with an MoE layer, in bf16: a batch decodes 12 greedy
    tokens with the kernels on as with them off (the same tokens), the logits of a decode step within bf16 rounding of
    the kernels-off ones; a decode step takes the bf16 kernel for every projection and the LM head, one row per
    sequence, but for a batch of one the MoE layer's shared expert, which goes with its experts into the MoE kernel's
    bf16 call (kvlab/layers/moe_kernel.py)."""
    require_kernel(monkeypatch, moe_kernel, "MoE")
    torch.manual_seed(0)
    model = random_model(tiny_config(moe=moe), seed=1).to(torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (batch, 7), generator=torch.Generator().manual_seed(3))
    moe_calls = count_calls(monkeypatch, moe_kernel, {"kvlab_moe_step_bf16": lambda a: a[4]})
    with torch.no_grad():
        on = generate(model, ids, max_new_tokens=12, temperature=0.0)
        cache = model.new_cache(batch, max_length=32)
        model(ids, cache=cache)
        calls = _count_calls(monkeypatch)
        moe_calls.clear()
        step_on = model(on[:, 7:8], cache=cache)
        linears = sum(isinstance(m, Linear) for m in model.modules())
        in_moe = sum(3 for m in model.modules() if isinstance(m, MoE) and m.shared is not None) if batch == 1 else 0
        assert len(calls) == linears + 1 - in_moe and all(c[0] == batch for c in calls)  # + the LM head
        assert (calls[-1][2], calls[-1][1]) == model.head_weight.shape
        assert len(moe_calls) == (1 if moe and batch == 1 else 0)
        monkeypatch.setattr(bf16_kernel, "ENABLED", False)
        monkeypatch.setattr(moe_kernel, "ENABLED", False)
        off = generate(model, ids, max_new_tokens=12, temperature=0.0)
        cache = model.new_cache(batch, max_length=32)
        model(ids, cache=cache)
        step_off = model(on[:, 7:8], cache=cache)
    assert len(calls) == linears + 1 - in_moe
    assert torch.equal(on, off)
    torch.testing.assert_close(step_on.float(), step_off.float(), rtol=0.02, atol=0.02)


@pytest.mark.parametrize("kind,ple", [(k, False) for k in kinds.KINDS] + [("gqa", True)])
def test_every_kind_decodes_in_bf16_with_the_kernel_as_without(kernel, monkeypatch, kind, ple):
    """Every attention kind of the kinds table (its first example, 3 layers; GQA also with per-layer embeddings,
    Gemma 4's PLE), in bf16, a batch of 2: 8 greedy tokens
    with the kernel on as with it off, and in a decode step every linear layer that runs with bf16 weights (counted by
    a hook; none is torch's plain ``nn.Linear``) and the LM head take the kernel, one row per sequence."""
    ex = kinds.KINDS[kind].examples[0]
    specs = [LayerSpec(attention=kind, intermediate_size=40, **copy.deepcopy(ex)) for _ in range(3)]
    cfg = ModelConfig(vocab_size=61, hidden_size=32, layers=specs, max_positions=256,
                      **({"ple_dim": 4, "ple_vocab_size": 61} if ple else {}))
    model = random_model(cfg, seed=2).to(torch.bfloat16)
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(5))
    ran: list[int] = []
    plain: list[str] = []  # torch's nn.Linear run in the step: none (each layer's projections are kvlab's Linear)
    for name, m in model.named_modules():
        if isinstance(m, Linear):
            m.register_forward_hook(lambda mod, a, o: ran.append(1) if mod.weight.dtype == torch.bfloat16 else None)
        elif isinstance(m, torch.nn.Linear):
            m.register_forward_hook(lambda mod, a, o, name=name: plain.append(name))
    with torch.no_grad():
        on = generate(model, ids, max_new_tokens=8, temperature=0.0)
        cache = model.new_cache(2, max_length=32)
        model(ids, cache=cache)
        calls = _count_calls(monkeypatch)
        ran.clear()
        model(on[:, 9:10], cache=cache)
        assert ran and not plain and len(calls) == len(ran) + 1 and all(c[0] == 2 for c in calls)
        monkeypatch.setattr(bf16_kernel, "ENABLED", False)
        off = generate(model, ids, max_new_tokens=8, temperature=0.0)
    assert torch.equal(on, off)


def test_a_changed_header_rebuilds(tmp_path):
    """The build key covers the headers a kernel includes from its folder (kvlab/layers/bf16.h, shared with the MoE
    kernel; f32.h, shared by the f32 and MoE kernels): a changed header gives another key, so another library."""
    assert cpp_build.headers(bf16_kernel.SOURCE) == [bf16_kernel.SOURCE.with_name("bf16.h")]
    assert cpp_build.headers(moe_kernel.SOURCE) == [bf16_kernel.SOURCE.with_name(n) for n in ("bf16.h", "f32.h")]
    assert cpp_build.headers(f32_kernel.SOURCE) == [bf16_kernel.SOURCE.with_name("f32.h")]
    src, hdr = tmp_path / "k.cpp", tmp_path / "bf16.h"
    src.write_text(bf16_kernel.SOURCE.read_text())
    hdr.write_text("// one\n")
    cxx = cpp_build.compiler()
    before = cpp_build.key(cxx, src, ())
    hdr.write_text("// two\n")
    assert cpp_build.key(cxx, src, ()) != before
