"""The C++ decode kernels inside a compiled decode step (kvlab/compiled.py): the attention over a plain K/V cache
(kvlab/layers/dense_attend.py, the op ``kvlab::dense_attend``) and the bf16 and float32 products
(kvlab/layers/bf16_kernel.py, ``kvlab::bf16_linear``; kvlab/layers/f32_kernel.py, ``kvlab::f32_linear``) and one
token's experts (kvlab/layers/moe_kernel.py, ``kvlab::moe_step``) as custom ops, and DeepSeek V4's hyper-connection
reads and writes (kvlab/layers/mhc_kernel.py, ``kvlab::mhc_read``, ``kvlab::mhc_write``) and CSA / HCA / SWA step
(kvlab/layers/compressed_kernel.py, ``kvlab::v4_step``). A compiled step calls each kernel as often as the eager step
does and gives eager's logits; each op's fake implementation agrees with it (``torch.library.opcheck``); the op attends a layout the
kernel does not read with torch's operations, runs products on more than one thread as ``F.linear`` does and experts
by torch's operations; the V4 step's op reads rows laid out otherwise from a copy.
Inductor's step (which hands the op views of the cache's buffers): tests/test_compile.py."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import count_calls, require_kernel
from test_compressed import config as compressed_config
from test_compressed import layer as compressed_layer
from test_contract import random_model, tiny
from test_moe_kernel import SPECS, _moe

from kvlab.compiled import CompiledStep
from kvlab.layers import bf16_kernel, compressed_kernel, core, dense_attend, f32_kernel, mhc_kernel, moe_kernel


@pytest.fixture
def kernels(monkeypatch):
    require_kernel(monkeypatch, dense_attend, "dense decode-attention")
    require_kernel(monkeypatch, bf16_kernel, "bf16")
    require_kernel(monkeypatch, f32_kernel, "float32 products")


def _steps(model, ids: torch.Tensor, prompt: int, backend: str, attend: list, products: list[list]):
    """A left-padded batch prefilled with ``prompt`` tokens, then decoded eagerly (by a copy of ``model``, which does
    the prefill too) and by the compiled step of ``backend`` (``model``'s first call) on copies of one cache; per step
    the logits and the kernel calls (``attend``, ``products``: counting lists) of each, and the graphs compiled. The
    cache holds exactly ``ids``: the last step fills its last slot."""
    twin = copy.deepcopy(model)
    cache = model.new_cache(ids.shape[0], max_length=ids.shape[1])
    cache.set_padding(torch.tensor([0, 3, 7]))
    step = CompiledStep(model, backend)
    out = []
    with torch.inference_mode():
        twin(ids[:, :prompt], cache=cache)
        other = copy.deepcopy(cache)
        for s in range(prompt, ids.shape[1]):
            row = []
            for fn, c in ((twin.decode_step, cache), (step, other)):
                a, p = len(attend), sum(map(len, products))
                row.append((fn(ids[:, s:s + 1], c), len(attend) - a, sum(map(len, products)) - p))
            out.append(row)
    return out, step.compiles


# full layers in fp32; in bf16 a window ring (wrapped) with sinks, q/k norms and an output gate; aot_eager: the
# functionalized graph inductor compiles (the cache's writes and the op's views of them), no codegen
@pytest.mark.parametrize("example,dtype,backend", [(0, torch.float32, "aot_eager"), (1, torch.bfloat16, "aot_eager")])
def test_compiled_step_calls_the_kernels_as_eager_does(kernels, monkeypatch, example, dtype, backend):
    """Three decode steps of a tiny two-layer GQA model (the second reading the first's K/V): the compiled step calls
    the attention kernel once per layer and step and the products' kernel of the weights' dtype as often as eager
    (every linear layer and the head; the other dtype's never), and its logits are eager's (the same kernels: within
    float rounding). The compiled step is the model's first call (eager runs a copy) and compiles one graph, the last
    step filling the full layers' buffers too (``[B, H, n, D]`` views of ``[B, H, 12, D]`` buffers, contiguous at
    ``n = 12`` only: AOT autograd asked each view whether it is, a guard, one more graph there; kvlab/compiled.py)."""
    cfg = tiny("gqa", example, layers=2)
    with torch.no_grad():
        model = random_model(cfg).to(dtype)
    ids = torch.randint(0, cfg.vocab_size, (3, 12), generator=torch.Generator().manual_seed(5))
    attend = count_calls(monkeypatch, dense_attend, {"kvlab_dense_attend": lambda a: a[9]})
    bf16 = count_calls(monkeypatch, bf16_kernel, {"kvlab_bf16_linear": lambda a: a[1]})
    f32 = count_calls(monkeypatch, f32_kernel, {"kvlab_f32_linear": lambda a: a[1]})
    layers = cfg.layers
    # per layer q, o, gate, up, down (and the output gate's); k, v of the storing layer; the head
    linears = len(layers) * (5 + bool(layers[0].output_gate)) + 2 * sum(s.kv_source is None for s in layers) + 1
    steps, compiles = _steps(model, ids, 9, backend, attend, [bf16, f32])
    for (eager, ea, ep), (compiled, ca, cp) in steps:
        assert ea == ca == len(layers)
        assert ep == cp == linears
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert compiles == 1  # no lazily built state (rotary tables) written by its first call, no guard on the last slot
    assert not (f32 if dtype == torch.bfloat16 else bf16)  # only the weights' dtype's kernel


def _inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    kb, vb = torch.randn(2, 2, 24, 16, generator=gen), torch.randn(2, 2, 24, 16, generator=gen)
    q, mask = torch.randn(2, 6, 1, 16, generator=gen), torch.zeros(2, 1, 1, 19)
    mask[1, ..., :4] = float("-inf")
    return q, kb.narrow(2, 0, 19), vb.narrow(2, 0, 19), mask, torch.randn(6, generator=gen)


def test_dense_op_reads_buffers_and_falls_back_on_other_layouts(kernels, monkeypatch):
    """The op over a buffer's view calls the kernel; over keys transposed in memory (what the kernel does not read) it
    attends by torch's operations without calling it: both equal torch's attention. Its fake agrees (opcheck)."""
    q, k, v, mask, sinks = _inputs()
    calls = count_calls(monkeypatch, dense_attend, {"kvlab_dense_attend": lambda a: a[9]})
    ref = core.attend(q, k, v, mask, 0.25, sinks=sinks)
    torch.testing.assert_close(dense_attend.dense_attend_op(q, k, v, mask, sinks, 0.25), ref, rtol=1e-5, atol=1e-5)
    assert calls == [19]
    kt = k.transpose(-1, -2).contiguous().transpose(-1, -2)
    torch.testing.assert_close(dense_attend.dense_attend_op(q, kt, v, mask, sinks, 0.25), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dense_attend.dense_attend_op(q, kt, v, None, None, 0.25),
                               core.attend(q, k, v, None, 0.25), rtol=1e-5, atol=1e-5)
    assert calls == [19]
    torch.library.opcheck(dense_attend.dense_attend_op, (q, k, v, mask, sinks, 0.25))
    torch.library.opcheck(dense_attend.dense_attend_op, (q.bfloat16(), k.bfloat16(), v.bfloat16(), None, None, 0.25))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_ops_take_the_kernel_on_one_thread_only(kernels, monkeypatch, dtype):
    """``kvlab::bf16_linear`` / ``kvlab::f32_linear`` on one torch thread call their kernel (within one rounding of
    ``F.linear``); on two they are ``F.linear`` exactly, as eager is. Their fakes agree (opcheck)."""
    module, name = (bf16_kernel, "bf16") if dtype == torch.bfloat16 else (f32_kernel, "f32")
    op = getattr(module, f"{name}_linear_op")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 40, generator=gen).to(dtype)
    w, b = (torch.randn(24, 40, generator=gen) / 7).to(dtype), torch.randn(24, generator=gen).to(dtype)
    calls = count_calls(monkeypatch, module, {f"kvlab_{name}_linear": lambda a: a[1]})
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = op(x, w, b)
        assert calls == [3]
        torch.set_num_threads(2)
        assert torch.equal(op(x, w, b), F.linear(x, w, b)) and calls == [3]
        torch.set_num_threads(1)
        torch.library.opcheck(op, (x, w, None))
    finally:
        torch.set_num_threads(threads)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(one.float(), F.linear(x, w, b).float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("name", ["v4", "skip"])  # shared expert, clip and routed scaling; the skip expert
def test_moe_op_compiled_and_on_two_threads(monkeypatch, name):
    """One token's MoE layer compiled (dynamo, fullgraph) calls the kernel once per token as eager does, with eager's
    output; on two threads the op computes by torch's operations without the kernel, within 1e-5 of it (the skip
    expert chosen for some tokens). Its fake agrees (opcheck)."""
    require_kernel(monkeypatch, moe_kernel, "MoE")
    monkeypatch.setattr(moe_kernel, "ROUTE", False)  # eager routes in torch too, as the compiled step does
    with torch.no_grad():
        moe, spec, _, hidden = _moe(name, 3)
    x = torch.randn(12, 1, 1, hidden)
    calls = count_calls(monkeypatch, moe_kernel, {"kvlab_moe_step": lambda a: a[4]})
    compiled = torch.compile(moe, backend="eager", fullgraph=True)
    with torch.no_grad():
        eager = torch.stack([moe(t) for t in x])
        assert calls == [spec.top_k] * 12
        torch.testing.assert_close(torch.stack([compiled(t) for t in x]), eager, rtol=1e-6, atol=1e-6)
        assert len(calls) == 24
        idx, w = moe.choose(x.reshape(12, hidden), None)  # before the routed scaling (the op applies it)
        e, sh = moe.experts, moe.shared
        lin = (None,) * 3 if sh is None else (sh.gate_proj.weight, sh.up_proj.weight, sh.down_proj.weight)
        args = [(t.reshape(1, hidden), i[None], wi[None], e.gate_proj, e.up_proj, e.down_proj, *lin,
                 moe_kernel.ACTIVATIONS[SPECS[name][1]], e.limit, float(spec.routed_scaling))
                for t, i, wi in zip(x, idx, w, strict=True)]
        threads = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            two = torch.stack([moe_kernel.moe_step_op(*a) for a in args])
        finally:
            torch.set_num_threads(threads)
        assert len(calls) == 24
        torch.testing.assert_close(two.view_as(eager), eager, rtol=1e-5, atol=1e-5)
        if spec.skip_expert:
            assert (idx == spec.num_experts).any()
    torch.library.opcheck(moe_kernel.moe_step_op, [a.detach() if torch.is_tensor(a) else a for a in args[0]])


# -- DeepSeek V4: the hyper-connections' reads and writes, the CSA / HCA / SWA step ------------------------------------
V4_KERNELS = {"kvlab_mhc_read": "read", "kvlab_mhc_write": "write", "kvlab_quant_v4_step": "attend"}


@pytest.fixture
def v4_calls(monkeypatch):
    """The mHC and compressed-attention kernels on; a list their calls append their kind to (read / write / attend)."""
    require_kernel(monkeypatch, mhc_kernel, "mHC")
    require_kernel(monkeypatch, compressed_kernel, "compressed-attention")
    calls = count_calls(monkeypatch, mhc_kernel, {k: lambda a, k=k: V4_KERNELS[k] for k in list(V4_KERNELS)[:2]})
    calls2 = count_calls(monkeypatch, compressed_kernel, {"kvlab_quant_v4_step": lambda a: "attend"})
    return calls, calls2


def test_compiled_v4_step_calls_the_kernels_as_eager_does(v4_calls):
    """Five decode steps of a tiny DeepSeek V4 layer (mHC of 2 streams around a CSA layer of ratio 3, its ring full,
    its indexer choosing the one entry, both of 2, then 2 of 3, the last filling the entries' buffer of 9 // 3): the
    compiled step (AOT autograd's graph, aot_eager; one graph for all five) calls the hyper-connections' read and
    write kernels (2 each a layer) and the compressed attention's (one a layer) as often as eager, with eager's logits.
    (A ``[B, n, D]`` view of the entries is contiguous at ``n = 1`` and ``n = 3``, the buffer's rows: AOT autograd
    asked whether it is, a guard, one more graph at each; kvlab/compiled.py. HCA and SWA: the same op without the
    indexer, without entries: opcheck below.)"""
    cfg = compressed_config([compressed_layer("csa", 3)], mhc=2)
    with torch.no_grad():
        model = random_model(cfg, seed=3)
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    cache = model.new_cache(2, max_length=9)
    step = CompiledStep(model, "aot_eager")
    mhc, attend = v4_calls
    with torch.inference_mode():
        model(ids[:, :4], cache=cache)  # window 5: full from position 4 on
        other = copy.deepcopy(cache)
        for s in range(4, 9):
            counts = []
            for fn, c in ((model.decode_step, cache), (step, other)):
                mhc.clear()
                attend.clear()
                counts.append((fn(ids[:, s:s + 1], c), sorted(mhc), len(attend)))
            (eager, em, ea), (compiled, cm, ca) = counts
            assert em == cm == ["read"] * 2 + ["write"] * 2 and ea == ca == 1
            torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert step.compiles == 1


def test_v4_ops_fakes_and_other_layouts(v4_calls):
    """``kvlab::mhc_read``, ``kvlab::mhc_write`` and ``kvlab::v4_step`` agree with their fakes (opcheck); the step's op
    over a buffer's views of the ring and the entries calls the kernel on them, over a ring laid out otherwise (rows
    not back to back) on a copy: the same output."""
    gen = torch.Generator().manual_seed(4)
    n, d = 2, 8
    x = torch.randn(1, 1, n, d, generator=gen)
    w, scale, bias = torch.randn((2 + n) * n, n * d, generator=gen) / 4, torch.rand(3, generator=gen), torch.zeros(8)
    mix, packed = mhc_kernel.read_op(x, w, scale, bias, 3, 1e-6, 1e-6)
    torch.library.opcheck(mhc_kernel.read_op, (x, w, scale, bias, 3, 1e-6, 1e-6))
    torch.library.opcheck(mhc_kernel.write_op, (packed, mix, x))
    b, h, hd = 2, 4, 16
    ring = torch.randn(b, 1, 5, hd, generator=gen)
    entries = torch.randn(b, 12, hd, generator=gen)[:, :9]  # 9 of 12 slots written: a preallocated buffer's view
    ikeys = torch.randn(b, 12, 8, generator=gen)[:, :9]
    args = (torch.randn(b, 1, h * hd, generator=gen), ring, entries, ikeys, torch.randn(b, 1, 2 * 8, generator=gen),
            torch.rand(b, 1, 2, generator=gen), 4, torch.rand(1, 4, generator=gen), torch.rand(1, 4, generator=gen),
            torch.randn(h, generator=gen), h, 1e-6, 0.25)
    _, attend = v4_calls
    want = compressed_kernel.v4_step_op(*args)
    assert attend == ["attend"] and want.shape == (b, 1, h, hd)
    strided = ring.transpose(2, 3).contiguous().transpose(2, 3)  # each row's channels 5 apart
    assert torch.equal(compressed_kernel.v4_step_op(*args[:1], strided, *args[2:]), want)
    torch.library.opcheck(compressed_kernel.v4_step_op, args)  # CSA
    torch.library.opcheck(compressed_kernel.v4_step_op, (*args[:3], None, None, None, 0, *args[7:]))  # HCA
    torch.library.opcheck(compressed_kernel.v4_step_op, (*args[:2], None, None, None, None, 0, None, None, None,
                                                        *args[-3:]))  # SWA, no rotation, no sinks
