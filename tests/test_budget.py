"""Layer-wise attention budgets: the helper, measured == calculated bytes, and Laguna XS.2's published figures."""

from __future__ import annotations

import pytest
import torch
from helpers import random_model, tiny_config

import kvlab
from kvlab.budget import budget, describe_pattern, layer_kinds, parse_pattern
from kvlab.cli import main
from kvlab.config import RopeSpec
from kvlab.presets import get_preset


@pytest.fixture(autouse=True, scope="module")
def _no_grad():
    """Inference only, without leaking the global grad mode into other test modules."""
    with torch.no_grad():
        yield
GiB = 2**30


def _budgeted(layers: int = 8):
    base = tiny_config(shared=False, layers=layers, num_heads=4, num_kv_heads=2)
    return budget(base, "1 global : 3 sliding", window=5, heads={"global": 2, "sliding": 6},
                  rope={"global": RopeSpec(theta=5e5, partial=0.5, scaling="yarn", factor=4.0,
                                           original_max_positions=64)})


def test_budget_follows_the_pattern():
    cfg = _budgeted()
    assert layer_kinds(cfg) == ["global", "sliding", "sliding", "sliding"] * 2
    assert [x.num_heads for x in cfg.layers] == [2, 6, 6, 6] * 2
    assert [x.window for x in cfg.layers] == [None, 5, 5, 5] * 2
    assert [x.rope.scaling for x in cfg.layers] == ["yarn", "default", "default", "default"] * 2
    assert describe_pattern(cfg) == "1 global : 3 sliding"
    assert "budget of custom (1 global : 3 sliding)" in cfg.source
    # the per-layer list form and the window list form give the same model
    kinds = ["global", "sliding", "sliding", "sliding"] * 2
    same = budget(tiny_config(shared=False, layers=8), kinds, window=5, heads=[2, 6, 6, 6] * 2,
                  rope={"global": cfg.layers[0].rope})
    assert same.layers == cfg.layers
    by_windows = budget(tiny_config(shared=False, layers=8), window=[None, 5, 5, 5] * 2, heads=[2, 6, 6, 6] * 2,
                        rope={"global": cfg.layers[0].rope})
    assert by_windows.layers == cfg.layers


def test_parse_pattern_forms():
    assert parse_pattern("3 sliding : 1 full", 6) == ["sliding"] * 3 + ["global", "sliding", "sliding"]
    assert parse_pattern("global", 2) == ["global", "global"]
    assert parse_pattern("2x local, 1 global", 3) == ["sliding", "sliding", "global"]
    assert describe_pattern(["sliding"] * 4 + ["global"]) == "4 sliding : 1 global"


@pytest.mark.parametrize("max_length,batch", [(23, 1), (40, 2)])
def test_cache_bytes_equal_calculator_and_windows_hold_exactly_their_window(max_length, batch):
    cfg = _budgeted()
    model = random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (batch, max_length))
    for cache in (model.new_cache(batch, max_length=max_length), model.new_cache(batch)):  # preallocated, grown
        model(ids[:, :-3], cache=cache)
        for j in range(3, 0, -1):
            model(ids[:, max_length - j:max_length - j + 1], cache=cache)
        c = kvlab.costs(cfg, context=max_length, dtype=torch.float32, batch=batch)
        if cache.max_length:  # preallocated: byte for byte the calculator's
            assert cache.nbytes() == c.kv_cache_bytes
            assert cache.per_layer_nbytes() == [x.kv_bytes for x in c.per_layer]
        for spec, store in zip(cfg.layers, cache.layers):
            if spec.window is not None:
                assert store.buf.k.shape[2] == store.buf.v.shape[2] == spec.window == 5
        # sliding layer by hand: K and V, [batch, 2 kv heads, 5 slots, 16] in fp32
        assert cache.per_layer_nbytes()[1] == 2 * batch * 2 * 5 * 16 * 4


def test_budgeted_decode_matches_full_forward():
    cfg = _budgeted()
    model = random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 19))
    full = model(ids)
    cache = model.new_cache(2, max_length=19)
    steps = [model(ids[:, :7], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(7, 19)]
    assert (torch.cat(steps, 1) - full).abs().max().item() < 1e-4


@pytest.mark.parametrize("kwargs,needle", [
    ({"heads": [2, 6, 6]}, "heads has 3 entries; the model has 8 layers"),
    ({"kv_heads": [2] * 9}, "kv_heads has 9 entries; the model has 8 layers"),
    ({"heads": {"global": 2, "sliding": 5}},
     ("layers[1] (sliding): 5 query heads cannot be shared by 2 KV heads: the KV heads must divide the query "
      "heads (e.g. 4 or 6 query heads)")),
    ({"heads": 6, "kv_heads": {"global": 4}}, "layers[0] (global): 6 query heads cannot be shared by 4 KV heads"),
    ({"heads": {"globl": 2}}, "heads: keys must be layer kinds"),
    ({"heads": 0}, "heads for layers[0] (global) = 0: must be a positive integer"),
    ({"window": None}, "layers[1] is a sliding layer but has no window"),
    ({"window": [None, 5, 5]}, "window has 3 entries; the model has 8 layers"),
])
def test_budget_errors_are_clear(kwargs, needle):
    base = tiny_config(shared=False, layers=8, num_heads=4, num_kv_heads=2)
    args = {"window": 5, **kwargs}
    with pytest.raises(ValueError) as e:
        budget(base, "1 global : 3 sliding", **args)
    assert needle in str(e.value)


@pytest.mark.parametrize("pattern,needle", [
    ("1 global : 3 slidin", "unknown layer kind 'slidin'"),
    ("1 global ; 3 sliding", "cannot read"),
    (["global"] * 7, "pattern has 7 entries; the model has 8 layers"),
])
def test_pattern_errors_are_clear(pattern, needle):
    with pytest.raises(ValueError, match=needle):
        budget(tiny_config(shared=False, layers=8), pattern, window=5)


def test_sharing_layers_that_no_longer_match_are_reported():
    base = tiny_config(shared=True, layers=3)  # layer 2 reads layer 1's K/V
    with pytest.raises(ValueError, match=r"budget of custom: the budgeted model is invalid: .*kv_source"):
        budget(base, ["global", "sliding", "global"], window=4)


# -- Laguna XS.2: the published figures, computed by hand ----------------------------------------------
# KV bytes: 2 (K and V) x 8 KV heads x 128 x 2 B (bf16) = 4096 B per position per layer.
#   XS.2 at 131072: 10 global layers x 131072 positions + 30 sliding layers x 512 positions.
#   all-global: 40 layers x 131072 positions.
# Decode attention FLOPs per token: 2 x heads x (d_k + d_v) x keys seen (QK^T and PV multiply-adds).
#   XS.2: 10 x 2 x 48 x 256 x 131072 + 30 x 2 x 64 x 256 x 512.
#   all-global with the same heads: 10 x 2 x 48 x 256 x 131072 + 30 x 2 x 64 x 256 x 131072.
CTX = 131072
XS2_KV = 10 * 4096 * CTX + 30 * 4096 * 512
ALL_GLOBAL_KV = 40 * 4096 * CTX
XS2_FLOPS = 10 * 2 * 48 * 256 * CTX + 30 * 2 * 64 * 256 * 512
ALL_GLOBAL_FLOPS = 10 * 2 * 48 * 256 * CTX + 30 * 2 * 64 * 256 * CTX


def test_laguna_xs2_published_figures():
    xs2 = kvlab.costs("laguna-xs.2", context=CTX, dtype="bfloat16")
    glob = kvlab.costs("laguna-xs.2-all-global", context=CTX, dtype="bfloat16")
    assert xs2.kv_cache_bytes == XS2_KV == 5_431_623_680
    assert glob.kv_cache_bytes == ALL_GLOBAL_KV == 21_474_836_480
    assert round(xs2.kv_cache_bytes / GiB, 2) == 5.06 and glob.kv_cache_bytes / GiB == 20.0
    assert xs2.attn_flops_per_token == XS2_FLOPS == 32_715_571_200
    assert glob.attn_flops_per_token == ALL_GLOBAL_FLOPS == 161_061_273_600
    assert round(xs2.attn_flops_per_token / 1e9, 1) == 32.7 and round(glob.attn_flops_per_token / 1e9) == 161
    # 33.4B total / 3.0B active (published)
    assert round(xs2.params_total / 1e9, 1) == 33.4 and round(xs2.params_active / 1e9, 1) == 3.0
    assert glob.params_total == xs2.params_total  # same heads, same weights: only the windows differ


def test_laguna_counterparts():
    xs2, uni = get_preset("laguna-xs.2"), get_preset("laguna-xs.2-uniform-heads")
    assert describe_pattern(xs2) == describe_pattern(uni) == "1 global : 3 sliding"
    assert [x.num_heads for x in xs2.layers[:4]] == [48, 64, 64, 64]
    assert {x.num_heads for x in uni.layers} == {64}
    assert describe_pattern(get_preset("laguna-xs.2-all-global")) == "1 global"
    u = kvlab.costs(uni, context=CTX, dtype="bf16")
    assert u.kv_cache_bytes == XS2_KV  # query heads cost FLOPs, not cache
    assert u.attn_flops_per_token == 10 * 2 * 64 * 256 * CTX + 30 * 2 * 64 * 256 * 512


def test_budget_prices_another_model():
    """The idea applied to Llama 3.1 8B: 1 global : 3 sliding (window 512), 24/32 query heads."""
    llama = get_preset("llama-3.1-8b")
    cfg = budget(llama, "1 global : 3 sliding", window=512, heads={"global": 24, "sliding": 32})
    c = kvlab.costs(cfg, context=CTX, dtype="bf16")
    assert c.kv_cache_bytes == 8 * 4096 * CTX + 24 * 4096 * 512 == 4 * GiB + 48 * 2**20
    assert c.attn_flops_per_token == 8 * 2 * 24 * 256 * CTX + 24 * 2 * 32 * 256 * 512


def test_inspect_shows_decode_and_prefill_attention_per_layer(capsys):
    assert main(["inspect", "laguna-xs.2", "--context", "128k"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "attn FLOP/tok" in out[1] and "prefill attn FLOP" in out[1]
    c = kvlab.costs("laguna-xs.2", context=CTX, dtype="bf16")
    # global layer: 2 x 48 x 256 x sum_{i<=n} i; sliding: 2 x 64 x 256 x (512*513/2 + (n-512) x 512)
    assert c.per_layer[0].prefill_attn_flops == 2 * 48 * 256 * CTX * (CTX + 1) // 2
    assert c.per_layer[1].prefill_attn_flops == 2 * 64 * 256 * (512 * 513 // 2 + (CTX - 512) * 512)
