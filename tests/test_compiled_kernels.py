"""The C++ decode kernels inside a compiled decode step (kvlab/compiled.py): the attention over a plain K/V cache
(kvlab/layers/dense_attend.py, the op ``kvlab::dense_attend``) and the bf16 products (kvlab/layers/bf16_kernel.py,
``kvlab::bf16_linear``) as custom ops. A compiled step calls each kernel as often as the eager step does and gives
eager's logits; each op's fake implementation agrees with it (``torch.library.opcheck``); the op attends a layout the
kernel does not read with torch's operations, and runs bf16 products on more than one thread as ``F.linear`` does.
Inductor's step (which hands the op views of the cache's buffers): tests/test_compile.py."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import count_calls, require_kernel
from test_contract import random_model, tiny

from kvlab.compiled import CompiledStep
from kvlab.layers import bf16_kernel, core, dense_attend


@pytest.fixture
def kernels(monkeypatch):
    require_kernel(monkeypatch, dense_attend, "dense decode-attention")
    require_kernel(monkeypatch, bf16_kernel, "bf16")


def _steps(model, ids: torch.Tensor, prompt: int, backend: str, attend: list, products: list):
    """A left-padded batch prefilled with ``prompt`` tokens, then decoded eagerly and by the compiled step of
    ``backend`` on copies of one cache; per step the logits and the kernel calls (``attend``, ``products``: the
    counting lists) of each."""
    cache = model.new_cache(ids.shape[0], max_length=ids.shape[1] + 1)
    cache.set_padding(torch.tensor([0, 3, 7]))
    step = CompiledStep(model, backend)
    out = []
    with torch.inference_mode():
        model(ids[:, :prompt], cache=cache)
        other = copy.deepcopy(cache)
        for s in range(prompt, ids.shape[1]):
            row = []
            for fn, c in ((model.decode_step, cache), (step, other)):
                a, p = len(attend), len(products)
                row.append((fn(ids[:, s:s + 1], c), len(attend) - a, len(products) - p))
            out.append(row)
    return out


# full layers in fp32 (dynamo's graph); in bf16 a window ring (wrapped) with sinks, q/k norms and an output gate,
# aot_eager: the functionalized graph inductor compiles (the cache's writes and the op's views of them), no codegen
@pytest.mark.parametrize("example,dtype,backend", [(0, torch.float32, "eager"), (1, torch.bfloat16, "aot_eager")])
def test_compiled_step_calls_the_kernels_as_eager_does(kernels, monkeypatch, example, dtype, backend):
    """Three decode steps of a tiny two-layer GQA model (the second reading the first's K/V): the compiled step calls
    the attention kernel once per layer and step and, in bf16, the bf16 kernel for as many products as eager (none in
    fp32), and its logits are eager's (the same kernels: within float rounding)."""
    cfg = tiny("gqa", example, layers=2)
    with torch.no_grad():
        model = random_model(cfg).to(dtype)
    ids = torch.randint(0, cfg.vocab_size, (3, 12), generator=torch.Generator().manual_seed(5))
    attend = count_calls(monkeypatch, dense_attend, {"kvlab_dense_attend": lambda a: a[9]})
    products = count_calls(monkeypatch, bf16_kernel, {"kvlab_bf16_linear": lambda a: a[1]})
    for (eager, ea, ep), (compiled, ca, cp) in _steps(model, ids, 9, backend, attend, products):
        assert ea == ca == len(cfg.layers)
        assert ep == cp and (ep > 0) == (dtype == torch.bfloat16)  # every linear layer and the head, in bf16
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


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


def test_bf16_op_takes_the_kernel_on_one_thread_only(kernels, monkeypatch):
    """The op on one torch thread calls the kernel (within one bf16 rounding of ``F.linear``); on two it is
    ``F.linear`` exactly, as eager is. Its fake agrees (opcheck)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 40, generator=gen).bfloat16()
    w, b = (torch.randn(24, 40, generator=gen) / 7).bfloat16(), torch.randn(24, generator=gen).bfloat16()
    calls = count_calls(monkeypatch, bf16_kernel, {"kvlab_bf16_linear": lambda a: a[1]})
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = bf16_kernel.bf16_linear_op(x, w, b)
        assert calls == [3]
        torch.set_num_threads(2)
        assert torch.equal(bf16_kernel.bf16_linear_op(x, w, b), F.linear(x, w, b)) and calls == [3]
        torch.set_num_threads(1)
        torch.library.opcheck(bf16_kernel.bf16_linear_op, (x, w, None))
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(one.float(), F.linear(x, w, b).float(), rtol=1e-2, atol=1e-2)
