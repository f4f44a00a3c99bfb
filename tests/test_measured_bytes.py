"""Measured == calculated by hand (every kind's measured == calculated contract is tests/test_contract.py)."""

from __future__ import annotations

import pytest
import torch
from helpers import random_model, tiny_config

import kvlab


@pytest.fixture(autouse=True, scope="module")
def _no_grad():
    """Inference only, without leaking the global grad mode into other test modules."""
    with torch.no_grad():
        yield


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
