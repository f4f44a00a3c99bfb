"""A prefill chunk's attention in pieces (kvlab/layers/chunk_attend.py) equals the masked attention it replaces.

The oracle is the softmax written out in float64 under :func:`kvlab.layers.core.visible_mask` (causal, window, left
padding). Odd chunk lengths, starts before / at / past the window, one and several K/V heads, left-padded rows; then
whole models (a window layer, a global layer, a layer reading another's K/V): chunked prefill and decode equal the
full forward with the pieces taken, and a padded row equals the row alone.
"""

from __future__ import annotations

import pytest
import torch

from kvlab.config import LayerSpec, ModelConfig
from kvlab.layers import bf16_widen, chunk_attend
from kvlab.layers.core import Step, visible_mask
from kvlab.model import Model


def oracle(q, k, v, qpos, kpos, window, pad, scale):
    """Masked softmax attention in float64: q ``[B, H, T, D]``, k/v ``[B, Hkv, L, D]``."""
    g = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = (q.double() @ k.transpose(-1, -2)) * scale
    ok = visible_mask(qpos, kpos, window, pad)[:, None]
    return torch.softmax(s.masked_fill(~ok, float("-inf")), -1) @ v


def case(b, h, hkv, t, start, held, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = held + t
    q = torch.randn(b, t, h, d, generator=gen).transpose(1, 2)  # [B, T, H, D] memory, as Attention makes it
    k, v = torch.randn(b, hkv, n, d, generator=gen), torch.randn(b, hkv, n, d, generator=gen)
    return q, k, v, torch.arange(start, start + t), torch.arange(start - held, start + t)


@pytest.mark.parametrize("h,hkv", [(8, 1), (4, 2), (3, 3)])
@pytest.mark.parametrize("t,start", [(5, 1), (13, 9), (7, 30)])
def test_prefix_and_square_equal_the_masked_attention(h, hkv, t, start):
    q, k, v, qpos, kpos = case(1, h, hkv, t, start, held=start)
    step = Step(start=start, qpos=qpos, pad=None)
    out = chunk_attend.attend_chunk(q, k, v, step, kpos, None, 0.3)
    assert out is not None
    assert out.transpose(1, 2).is_contiguous()  # [B, T, H, D] memory: o_proj reads it without a copy
    torch.testing.assert_close(out.double(), oracle(q, k, v, qpos, kpos, None, None, 0.3), atol=2e-6, rtol=0)


@pytest.mark.parametrize("window", [4, 6, 9])
@pytest.mark.parametrize("start", [3, 6, 9, 22])  # the ring not yet full, exactly full, past it
@pytest.mark.parametrize("padded", [False, True])
def test_window_blocks_equal_the_masked_attention(monkeypatch, window, start, padded):
    monkeypatch.setattr(chunk_attend, "MIN_BLOCK", 2)
    t, held = 13, min(start, window)
    q, k, v, qpos, kpos = case(2, 4, 2, t, start, held)
    pad = torch.tensor([0, 5]) if padded else None
    step = Step(start=start, qpos=qpos, pad=pad)
    out = chunk_attend.attend_chunk(q, k, v, step, kpos, window, 0.5)  # a window shorter than the chunk: blocks
    assert out is not None and step.masks  # (the step's mask, sliced)
    torch.testing.assert_close(out.double(), oracle(q, k, v, qpos, kpos, window, pad, 0.5), atol=2e-6, rtol=0)


def test_a_window_reaching_every_key_takes_prefix_and_square(monkeypatch):
    """Window 20 over 9 held keys and a chunk of 7: every query sees all; the split runs, no mask is built."""
    q, k, v, qpos, kpos = case(1, 4, 1, 7, 9, held=9)
    step = Step(start=9, qpos=qpos, pad=None)
    out = chunk_attend.attend_chunk(q, k, v, step, kpos, 20, 0.5)
    assert out is not None and not step.masks
    torch.testing.assert_close(out.double(), oracle(q, k, v, qpos, kpos, 20, None, 0.5), atol=2e-6, rtol=0)


def test_where_the_pieces_do_not_apply_the_masked_call_runs(monkeypatch):
    q, k, v, qpos, kpos = case(2, 4, 2, 5, 8, held=8)
    pad = torch.tensor([0, 3])
    assert chunk_attend.attend_chunk(q, k, v, Step(8, qpos, pad), kpos, None, 0.5) is None  # padding, no window
    rotated = torch.cat((kpos[3:8], kpos[:3], kpos[8:]))  # a ring in slot order
    assert chunk_attend.attend_chunk(q, k, v, Step(8, qpos, None), rotated, None, 0.5) is None
    assert chunk_attend.attend_chunk(q[:, :, :1], k[:, :, :9], v[:, :, :9], Step(8, qpos[:1], None), kpos[:9], None,
                                     0.5) is None  # a decode step
    assert chunk_attend.attend_chunk(q.half(), k.half(), v.half(), Step(8, qpos, None), kpos, None,
                                     0.5) is None  # float16
    monkeypatch.setattr(bf16_widen, "NATIVE_BF16", True)  # bf16 widened only without native bf16 (tests/test_bf16_widen.py)
    assert chunk_attend.attend_chunk(q.bfloat16(), k.bfloat16(), v.bfloat16(), Step(8, qpos, None), kpos, None,
                                     0.5) is None
    assert chunk_attend.attend_chunk(q, k, v[..., :4], Step(8, qpos, None), kpos, None, 0.5) is None  # narrower V
    q, k, v, qpos, kpos = case(1, 4, 1, 5, 0, held=0)
    assert chunk_attend.attend_chunk(q, k, v, Step(0, qpos, None), kpos, None, 0.5) is None  # the first chunk


def mixed(window: int = 5) -> ModelConfig:
    """Gemma 4's pattern in miniature: window layers, a global layer of wider heads, layers reading their K/V."""
    def spec(**kw):
        base = {"attention": "gqa", "num_heads": 4, "num_kv_heads": 1, "head_dim": 8, "intermediate_size": 24,
                "gqa": {"qk_norm": True, "v_norm": True}}
        return LayerSpec(**{**base, **kw})
    layers = [spec(window=window), spec(head_dim=16, num_kv_heads=2, rope={"partial": 0.25}), spec(window=window),
              spec(window=window, kv_source=2), spec(head_dim=16, num_kv_heads=2, rope={"partial": 0.25}, kv_source=1)]
    return ModelConfig(vocab_size=61, hidden_size=32, layers=layers, max_positions=128)


@pytest.mark.parametrize("chunk", [5, 7, 11])
@pytest.mark.parametrize("max_length", [40, None], ids=["preallocated", "growing"])
def test_chunked_prefill_in_pieces_equals_the_full_forward(monkeypatch, chunk, max_length):
    monkeypatch.setattr(chunk_attend, "MIN_BLOCK", 2)
    taken = []
    split, blocks = chunk_attend.prefix_and_square, chunk_attend.window_blocks

    def spy_split(*a, **kw):
        taken.append("split")
        return split(*a, **kw)

    def spy_blocks(*a, **kw):
        out = blocks(*a, **kw)
        taken.append("blocks" if out is not None else "masked")
        return out

    monkeypatch.setattr(chunk_attend, "prefix_and_square", spy_split)
    monkeypatch.setattr(chunk_attend, "window_blocks", spy_blocks)
    model = Model.from_config(mixed(), seed=0, std=0.1).eval()
    ids = torch.randint(0, 61, (1, 34), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(1, max_length=max_length)
        outs = [model(ids[:, s:min(s + chunk, 30)], cache=cache) for s in range(0, 30, chunk)]
        outs += [model(ids[:, s:s + 1], cache=cache) for s in range(30, 34)]
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=0)
    assert "split" in taken and "blocks" in taken


def test_a_left_padded_batch_in_window_blocks_equals_each_row_alone(monkeypatch):
    monkeypatch.setattr(chunk_attend, "MIN_BLOCK", 2)
    model = Model.from_config(mixed(window=4), seed=0, std=0.1).eval()
    ids = torch.randint(0, 61, (2, 27), generator=torch.Generator().manual_seed(2))
    pad = torch.tensor([0, 6])
    mask = (torch.arange(27)[None] >= pad[:, None]).long()
    with torch.no_grad():
        cache = model.new_cache(2, max_length=27)
        cache.set_padding(pad)
        inc = torch.cat([model(ids[:, s:s + 9], cache=cache) for s in range(0, 27, 9)], 1)
        full = model(ids, attention_mask=mask)
        for r, p in enumerate(pad.tolist()):
            torch.testing.assert_close(inc[r, p:], full[r, p:], atol=1e-5, rtol=0)
            torch.testing.assert_close(model(ids[r:r + 1, p:])[0], full[r, p:], atol=1e-5, rtol=0)
