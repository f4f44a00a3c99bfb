"""Cached == uncached for random GQA configurations (hypothesis); every kind's contract is tests/test_contract.py."""

from __future__ import annotations

import pytest
import torch
from helpers import random_model, tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

from kvlab.config import GQASpec


@pytest.fixture(autouse=True, scope="module")
def _no_grad():
    """Inference only, without leaking the global grad mode into other test modules."""
    with torch.no_grad():
        yield


def run_chunked(model, ids, pad, chunk, max_length):
    cache = model.new_cache(ids.shape[0], max_length=max_length)
    cache.set_padding(pad)
    outs = [model(ids[:, s:s + chunk], cache=cache) for s in range(0, ids.shape[1], chunk)]
    return torch.cat(outs, 1), cache


def assert_rows_close(a, b, pad, atol=1e-5):
    for r, p in enumerate(pad.tolist()):
        torch.testing.assert_close(a[r, p:], b[r, p:], atol=atol, rtol=0)


def test_decode_differs_when_history_differs():
    """Guard against a cache that ignores its contents: changing an early token changes later logits."""
    cfg = tiny_config(shared=False)
    model = random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    other = ids.clone()
    other[0, 0] = (other[0, 0] + 1) % cfg.vocab_size
    a, _ = run_chunked(model, ids, torch.tensor([0]), 1, 12)
    b, _ = run_chunked(model, other, torch.tensor([0]), 1, 12)
    assert (a[0, -1] - b[0, -1]).abs().max() > 1e-4


@settings(max_examples=25, deadline=None)
@given(
    heads=st.sampled_from([(4, 1), (4, 2), (4, 4), (6, 3)]),
    head_dim=st.sampled_from([8, 16]),
    window=st.one_of(st.none(), st.integers(1, 9)),
    sinks=st.booleans(),
    gate=st.sampled_from([None, "sigmoid", "softplus"]),
    qk_norm=st.booleans(),
    shared=st.booleans(),
    chunk=st.integers(1, 9),
    length=st.integers(2, 26),
    pads=st.lists(st.integers(0, 5), min_size=1, max_size=3),
    seed=st.integers(0, 1000),
)
def test_property_cached_equals_uncached(heads, head_dim, window, sinks, gate, qk_norm, shared, chunk, length, pads,
                                         seed):
    h, hkv = heads
    cfg = tiny_config(shared=shared, num_heads=h, num_kv_heads=hkv, head_dim=head_dim, window=window, sinks=sinks,
                      output_gate=gate, gqa=GQASpec(qk_norm=qk_norm))
    model = random_model(cfg, seed=seed)
    pad = torch.tensor([min(p, length - 1) for p in pads])
    ids = torch.randint(0, cfg.vocab_size, (len(pads), length), generator=torch.Generator().manual_seed(seed))
    mask = (torch.arange(length)[None] >= pad[:, None]).long()
    full = model(ids, attention_mask=mask)
    inc, cache = run_chunked(model, ids, pad, chunk, length + 2)
    assert_rows_close(inc, full, pad)
    for i, spec in enumerate(cfg.layers):
        store = cache.layers[i]
        if spec.kv_source is not None:
            assert store is None
        elif spec.window is not None:
            assert store.buf.k.shape[2] == min(spec.window, length + 2)
