"""Measured == calculated: the cache's bytes after a run equal the calculator's, layer by layer."""

from __future__ import annotations

import pytest
import torch
from helpers import ATTENTION_VARIANTS, random_model, tiny_config

import kvlab


@pytest.fixture(autouse=True, scope="module")
def _no_grad():
    """Inference only, without leaking the global grad mode into other test modules."""
    with torch.no_grad():
        yield


@pytest.mark.parametrize("variant", sorted(ATTENTION_VARIANTS))
@pytest.mark.parametrize("max_length,batch", [(3, 1), (17, 2), (40, 3)])
def test_cache_bytes_equal_calculator(variant, max_length, batch):
    cfg = tiny_config(**ATTENTION_VARIANTS[variant])
    model = random_model(cfg)
    cache = model.new_cache(batch, max_length=max_length)
    ids = torch.randint(0, cfg.vocab_size, (batch, max_length))
    model(ids[:, : max_length - 1], cache=cache)
    model(ids[:, max_length - 1:], cache=cache)
    c = kvlab.costs(cfg, context=max_length, dtype=torch.float32, batch=batch)
    assert cache.nbytes() == c.kv_cache_bytes
    assert cache.per_layer_nbytes() == [lc.kv_bytes for lc in c.per_layer]
    if cfg.layers[-1].kv_source is not None:
        assert cache.per_layer_nbytes()[-1] == 0  # the sharing layer holds nothing


def test_bf16_cache_and_window_bytes_by_hand():
    cfg = tiny_config(window=5).replace_layers(lambda i, s: s)
    model = random_model(cfg).to(torch.bfloat16)
    cache = model.new_cache(2, max_length=64)
    model(torch.randint(0, 97, (2, 64)), cache=cache)
    # two producing window layers: K and V, [2, 2 kv heads, 5 slots, 16] at 2 bytes
    assert cache.nbytes() == 2 * 2 * (2 * 2 * 5 * 16) * 2
    assert cache.nbytes() == kvlab.costs(cfg, context=64, dtype="bf16", batch=2).kv_cache_bytes


def test_growing_cache_never_exceeds_window():
    cfg = tiny_config(window=6, shared=False)
    model = random_model(cfg)
    cache = model.new_cache(1)  # no max_length: storage grows
    for _ in range(20):
        model(torch.randint(0, 97, (1, 1)), cache=cache)
    assert all(s.buf.k.shape[2] == 6 for s in cache.layers)
