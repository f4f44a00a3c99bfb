"""The fused quantized attention (kvlab/layers/fused.py) against kvlab's blocked path over the same buffers and
against attention over the whole dequantized buffers: int8 and int4 in both score layouts (thin heads, wide rows),
int4 with its nibbles split (an even group) and dequantized in the loop (an odd one), scales that do not fold, a left-padded batch,
sink logits, padded slots, several p.v chunks. Traced with the ``eager`` backend (the same functions inductor
compiles; benchmarks/kv_quant_fused.py checks inductor's output against the blocked path)."""

import pytest
import torch

from kvlab.cache import quant
from kvlab.cache.quant import QuantRows
from kvlab.costs.quant import Buffer, parse_quant
from kvlab.layers import blocked, cpu_attend, fused

B, HKV, G, D, N = 2, 2, 3, 16, 37


def _readers(fmt: str, vfmt: str | None = None):
    gen = torch.Generator().manual_seed(1)
    out = []
    for name, f in zip("kv", (fmt, vfmt or fmt), strict=True):
        r = QuantRows(Buffer("kv", name, HKV, 0, D, key=name == "k"), parse_quant(f), (B, HKV), torch.float32, "cpu")
        r.resize(N + 7, 0)
        r.write(0, torch.randn(B, HKV, 30, D, generator=gen))  # written in two chunks, as a prefill then steps
        r.write(30, torch.randn(B, HKV, N - 30, D, generator=gen))
        r.fused = True
        out.append(r.view(N))
    return out


@pytest.fixture
def small(monkeypatch):
    monkeypatch.setattr(quant, "DECODE_BLOCK_BYTES", 4 * D * B * HKV * 8)  # 8 positions a block: 5 blocks
    monkeypatch.setattr(fused, "BACKEND", "eager")
    monkeypatch.setattr(fused, "BUCKET", 8)  # 37 positions attended as 40, the last 3 slots masked
    monkeypatch.setattr(fused, "CHUNK", 16)  # p.v summed over 2 chunks of 16 positions and the last 8
    monkeypatch.setattr(fused, "_COMPILED", {})
    monkeypatch.setattr(cpu_attend, "ENABLED", False)  # the C++ kernel (first when on) off: the fused path tested


def _check(monkeypatch, fmt, vfmt, with_sinks, want_layout):
    k, v = _readers(fmt, vfmt)
    assert fused.layout(D, k.rows.spec.fmt == "int4", k.rows.group) == want_layout
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(B, HKV * G, 1, D, generator=gen)
    mask = torch.zeros(B, 1, 1, N)
    mask[0, ..., :7] = float("-inf")  # row 0 left-padded by 7 positions
    sinks = torch.randn(HKV * G, generator=gen) if with_sinks else None
    out = blocked.attend_blocked(q, k, v, mask, D ** -0.5, sinks)
    assert len(fused._COMPILED) == 1 and next(iter(fused._COMPILED))[1] == want_layout, "the fused kernel did not run"
    monkeypatch.setattr(fused, "ENABLED", False)
    k.rows.fused = False
    ref = blocked.attend_blocked(q, k, v, mask, D ** -0.5, sinks)
    assert len(fused._COMPILED) == 1
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    kd, vd = k.dense().repeat_interleave(G, 1), v.dense().repeat_interleave(G, 1)  # the buffers dequantized whole
    s = (q @ kd.transpose(-1, -2)) * D ** -0.5 + mask
    if sinks is None:
        want = torch.softmax(s, -1) @ vd
    else:
        sk = sinks.view(1, -1, 1, 1).expand(B, -1, 1, 1)
        want = torch.softmax(torch.cat((s, sk), -1), -1)[..., :-1] @ vd
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert (out - vd.mean(-2, keepdim=True)).abs().max() > 1e-2  # not a uniform average: the scores matter


@pytest.mark.parametrize("with_sinks", [False, True])
@pytest.mark.parametrize("fmt,vfmt,wide,want", [
    ("int8-g8", None, False, "heads"), ("int8-g8", None, True, "rows"),
    ("int8-g1", "int8-g4", True, "rows"),  # g1: 16 groups x 3 heads (the blocked path does not fold them)
    ("int4-g8", None, False, "heads4"), ("int4-g16-s32", "int4-g1", True, "rows4"), ("int4-g1", "int4-g8", False, "heads"),
    ("int4-g1", None, True, "rows")])
def test_fused_equals_blocked_and_dequantized(small, monkeypatch, fmt, vfmt, wide, want, with_sinks):
    monkeypatch.setattr(fused, "WIDE", D if wide else 4 * D)
    _check(monkeypatch, fmt, vfmt, with_sinks, want)


@pytest.mark.parametrize("fmt", ["int8-g8-r4", "int4-g8-rot", "int8-g8-kc", "fp8-g8", "int8-g8-asym"])
def test_fused_leaves_other_buffers_to_the_blocked_path(small, fmt):
    k, v = _readers(fmt)
    assert not fused.applies(k, v)
    k, v = _readers("int8-g8")
    assert fused.applies(k, v)
    k.rows.fused = False  # a cache made without fused=True
    assert not fused.applies(k, v)


def test_fused_cache_decode_equals_blocked(small, monkeypatch):
    """``model.new_cache(..., fused=True)``: a left-padded batch decoded through a tiny model (a KV head read by a
    shared layer too) gives the blocked cache's logits, eager and inside a compiled decode step (the kernel traced
    into the step's graph over the whole preallocated buffer); the shared layer reads the producer's codes."""
    from helpers import random_model, tiny_config

    model = random_model(tiny_config(shared=True, layers=2))
    ids = torch.randint(0, 97, (2, 22), generator=torch.Generator().manual_seed(4))
    calls = []
    attend = fused.attend
    monkeypatch.setattr(fused, "attend", lambda *a: calls.append(torch.compiler.is_compiling()) or attend(*a))
    caches = [model.new_cache(2, max_length=30, kv_quant="int8-g8", fused=f) for f in (True, False, True)]
    with torch.inference_mode():
        for c in caches:
            c.set_padding(torch.tensor([0, 5]))
            model(ids[:, :20], cache=c)
        step = torch.compile(model.decode_step, fullgraph=True, backend="eager", dynamic=False)
        for s in range(20, 22):
            fast, ref = model(ids[:, s:s + 1], cache=caches[0]), model(ids[:, s:s + 1], cache=caches[1])
            torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
            third = step(ids[:, s:s + 1], caches[2]) if s == 21 else model(ids[:, s:s + 1], cache=caches[2])
            torch.testing.assert_close(third, ref, rtol=1e-5, atol=1e-5)  # one compiled step: one trace
    assert False in calls and True in calls, "the fused kernel did not run, eager and compiled"


def test_fused_cache_bad_input():
    from helpers import random_model, tiny_config

    model = random_model(tiny_config(shared=False, layers=1))
    with pytest.raises(ValueError, match="fused='yes': must be True or False"):
        model.new_cache(1, 8, kv_quant="int8", fused="yes")
    with pytest.raises(ValueError, match="fused=True: the cache holds no quantized buffer"):
        model.new_cache(1, 8, fused=True)
