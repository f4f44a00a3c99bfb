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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_costs_of_a_model_prices_its_own_dtype(dtype):
    """The README's promise: a loaded model is priced in the dtype it holds, without being told."""
    cfg = tiny_config(window=5)
    model = random_model(cfg).to(dtype)
    elt = torch.tensor([], dtype=dtype).element_size()
    c = kvlab.costs(model, context=64, batch=2)
    assert c.dtype == str(dtype).removeprefix("torch.") and c.kv_dtype == c.dtype
    assert model.new_cache(2, max_length=64).nbytes() == c.kv_cache_bytes
    bf16 = kvlab.costs(cfg, context=64, batch=2)  # a bare ModelConfig carries no dtype: bf16
    assert c.kv_cache_bytes * 2 == bf16.kv_cache_bytes * elt
    told = kvlab.costs(model, context=64, batch=2, dtype="fp16")  # told otherwise: what it is told
    assert told.kv_cache_bytes == bf16.kv_cache_bytes and told.dtype == "float16"
    assert kvlab.costs(model, context=64, batch=2, kv_quant="int8").kv_cache_bytes == \
        model.new_cache(2, max_length=64, kv_quant="int8").nbytes()
