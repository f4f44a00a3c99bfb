"""The opt-in fused quantized attention (kvlab/layers/fused.py) against kvlab's blocked path over the same buffers:
int8 and int4 codes, a left-padded batch, sink logits, several blocks. Traced with the ``eager`` backend (the same
function inductor compiles; benchmarks/kv_quant_fused.py checks inductor's output against the blocked path)."""

import pytest
import torch

from kvlab.cache import quant
from kvlab.cache.quant import QuantRows
from kvlab.costs.quant import Buffer, parse_quant
from kvlab.layers import blocked, fused

B, HKV, G, D, N = 2, 2, 3, 16, 40


def _readers(fmt: str):
    gen = torch.Generator().manual_seed(1)
    out = []
    for name in "kv":
        r = QuantRows(Buffer("kv", name, HKV, 0, D, key=name == "k"), parse_quant(fmt), (B, HKV), torch.float32, "cpu")
        r.resize(N + 4, 0)
        r.write(0, torch.randn(B, HKV, 30, D, generator=gen))  # written in two chunks, as a prefill then steps
        r.write(30, torch.randn(B, HKV, N - 30, D, generator=gen))
        out.append(r.view(N))
    return out


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(quant, "DECODE_BLOCK_BYTES", 4 * D * B * HKV * 8)  # 8 positions a block: 5 blocks
    monkeypatch.setattr(fused, "BACKEND", "eager")


@pytest.mark.parametrize("fmt", ["int8-g8", "int4-g8", "int4-g16-s32"])
@pytest.mark.parametrize("with_sinks", [False, True])
def test_fused_equals_blocked(small_blocks, monkeypatch, fmt, with_sinks):
    k, v = _readers(fmt)
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(B, HKV * G, 1, D, generator=gen)
    mask = torch.zeros(B, 1, 1, N)
    mask[0, ..., :7] = float("-inf")  # row 0 left-padded by 7 positions
    sinks = torch.randn(HKV * G, generator=gen) if with_sinks else None
    ref = blocked.attend_blocked(q, k, v, mask, D ** -0.5, sinks)
    monkeypatch.setattr(fused, "_COMPILED", {})
    monkeypatch.setattr(fused, "ENABLED", True)
    out = blocked.attend_blocked(q, k, v, mask, D ** -0.5, sinks)
    assert len(fused._COMPILED) == 1, "the fused kernel did not run"
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    dense = torch.softmax  # the same against every buffer dequantized whole (ties both paths to read())
    kd, vd = k.dense().repeat_interleave(G, 1), v.dense().repeat_interleave(G, 1)
    s = (q @ kd.transpose(-1, -2)) * D ** -0.5 + mask
    if sinks is None:
        want = dense(s, -1) @ vd
    else:
        sk = sinks.view(1, -1, 1, 1).expand(B, -1, 1, 1)
        want = (dense(torch.cat((s, sk), -1), -1)[..., :-1]) @ vd
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt", ["int8-g8-r4", "int4-g8-rot", "int8-g8-kc", "fp8-g8"])
def test_fused_leaves_other_buffers_to_the_blocked_path(small_blocks, monkeypatch, fmt):
    monkeypatch.setattr(fused, "ENABLED", True)
    k, v = _readers(fmt)
    assert not fused.applies(k, v)
    assert fused.applies(*_readers("int8-g8"))


def test_fused_leaves_wide_layers_to_the_blocked_path(small_blocks, monkeypatch):
    """3 query heads x 16 scale groups per KV head do not fold (``blocked.FOLD_ROWS``): the blocked path runs."""
    monkeypatch.setattr(fused, "ENABLED", True)
    monkeypatch.setattr(fused, "_COMPILED", {})
    k, v = _readers("int8-g1")
    q = torch.randn(B, HKV * G, 1, D, generator=torch.Generator().manual_seed(3))
    blocked.attend_blocked(q, k, v, None, D ** -0.5)
    assert fused._COMPILED == {}
