"""Cross-layer KV sharing: the helpers, the bytes it saves (measured == calculated), cached == uncached.

Golden figures from the Gemma 4 section of REFERENCE.md are recomputed by hand here.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import random_model

import kvlab
from kvlab.config import LayerSpec, ModelConfig, MoESpec, RopeSpec
from kvlab.costs import kv_sharing_report
from kvlab.presets import get_preset
from kvlab.sharing import share_adjacent, share_last, shared_layers, without_sharing


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():  # per test: a module-level set_grad_enabled(False) would leak into other modules
        yield


def run_chunked(model, ids, pad, chunk, max_length):  # as in test_cache_consistency.py
    cache = model.new_cache(ids.shape[0], max_length=max_length)
    cache.set_padding(pad)
    outs = [model(ids[:, s:s + chunk], cache=cache) for s in range(0, ids.shape[1], chunk)]
    return torch.cat(outs, 1), cache


def assert_rows_close(a, b, pad, atol=1e-5):
    for r, p in enumerate(pad.tolist()):
        torch.testing.assert_close(a[r, p:], b[r, p:], atol=atol, rtol=0)

SLIDE = {"window": 4, "head_dim": 8, "rope": RopeSpec(theta=100.0)}
FULL = {"window": None, "head_dim": 16, "rope": RopeSpec(theta=1e4, scaling="proportional", partial=0.25)}


def gemma_like(pattern: str = "SSFSFSF", shared: int = 3, ple: int | None = 8, moe: bool = False,
               wide: bool = True) -> ModelConfig:
    """A plain kvlab config (no checkpoint) with every Gemma 4 option: S = window layer, F = full layer."""
    layers = []
    first = len(pattern) - shared
    for i, kind in enumerate(pattern):
        f = kind == "F"
        width = 48 * (2 if wide and i >= first else 1)
        spec = LayerSpec(num_heads=4, num_kv_heads=1 if f else 2, intermediate_size=width,
                         gqa={"qk_norm": True, "v_norm": True, "k_eq_v": f}, sandwich_norm=True, layer_scalar=True, attn_scale=1.0,
                         activation="gelu_tanh", **(FULL if f else SLIDE))
        if moe and i % 2:
            spec.mlp = "dense+moe"
            spec.moe = MoESpec(num_experts=4, top_k=2, expert_size=16, router_norm=True, expert_scale=True)
        layers.append(spec)
    cfg = ModelConfig(vocab_size=97, hidden_size=32, layers=layers, max_positions=128, embed_scale=32 ** 0.5,
                      final_logit_softcap=10.0, tie_embeddings=True, ple_dim=ple,
                      ple_vocab_size=97 if ple else None)
    return share_last(cfg, shared)


# -- helpers ---------------------------------------------------------------------------------------
def test_share_last_picks_the_last_producer_of_each_type() -> None:
    cfg = gemma_like()
    assert shared_layers(cfg) == [4, 5, 6]
    assert [x.kv_source for x in cfg.layers] == [None, None, None, None, 2, 3, 2]


def test_share_last_errors() -> None:
    base = without_sharing(gemma_like())
    with pytest.raises(ValueError, match=r"share_last\(n=7\): the model has 7 layers; at most 6 can share"):
        share_last(base, 7)
    with pytest.raises(ValueError, match=r"share_last\(n=9\)"):
        share_last(base, 9)
    # the last window layer before the shared ones gets another head layout: the error names both layers
    odd = base.replace_layers(lambda i, s: dataclasses.replace(s, num_kv_heads=4) if i == 3 else s)
    with pytest.raises(ValueError, match=r"layers\[5\] would read the K/V of layers\[3\], but "
                                         r"layers\[5\]\.num_kv_heads=2 differs from layers\[3\]\.num_kv_heads=4"):
        share_last(odd, 3)
    with pytest.raises(ValueError, match=r"layers\[4\] \(full\) has no earlier non-shared layer of its type"):
        share_last(without_sharing(gemma_like("SSSSFSF", shared=3)), 3)


def test_share_adjacent_is_cla_and_checks_layouts() -> None:
    cfg = without_sharing(gemma_like("SSSSS", shared=0))
    cla = share_adjacent(cfg)
    assert [x.kv_source for x in cla.layers] == [None, 0, None, 2, None]
    assert [x.kv_source for x in share_adjacent(cfg, group=3).layers] == [None, 0, 0, None, 3]
    with pytest.raises(ValueError, match=r"share_adjacent\(group=2\): layers\[1\] would read the K/V of layers\[0\], "
                                         r"but layers\[1\]\.num_kv_heads=1 differs from layers\[0\]\.num_kv_heads=2"):
        share_adjacent(without_sharing(gemma_like("SFSF", shared=0)))


def test_without_sharing_leaves_the_rest_and_the_original_alone() -> None:
    cfg = gemma_like()
    off = without_sharing(cfg)
    assert shared_layers(off) == [] and shared_layers(cfg) == [4, 5, 6]
    assert [x.intermediate_size for x in off.layers] == [x.intermediate_size for x in cfg.layers]
    assert off.layers[0] is not cfg.layers[0] and off.layers[0].rope is not cfg.layers[0].rope


# -- bytes -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_length,batch", [(3, 1), (17, 2), (40, 3)])
def test_sharing_layers_hold_nothing_and_sharing_off_holds_the_predicted_difference(max_length, batch) -> None:
    cfg = gemma_like()
    ids = torch.randint(0, cfg.vocab_size, (batch, max_length), generator=torch.Generator().manual_seed(0))
    measured = {}
    for name, c in (("on", cfg), ("off", without_sharing(cfg))):
        model = random_model(c)
        cache = model.new_cache(batch, max_length=max_length)
        model(ids, cache=cache)
        calc = kvlab.costs(c, context=max_length, dtype=torch.float32, batch=batch)
        assert cache.nbytes() == calc.kv_cache_bytes
        assert cache.per_layer_nbytes() == [x.kv_bytes for x in calc.per_layer]
        measured[name] = cache.nbytes()
        if name == "on":
            assert [cache.per_layer_nbytes()[i] for i in shared_layers(c)] == [0, 0, 0]
            assert all(cache.layers[i] is None for i in shared_layers(c))
            predicted = calc.kv_cache_bytes_no_sharing - calc.kv_cache_bytes
    assert measured["off"] - measured["on"] == predicted > 0


def test_parameters_equal_calculator_and_sharing_layers_have_no_kv_weights() -> None:
    for cfg in (gemma_like(), gemma_like(moe=True), without_sharing(gemma_like(ple=None))):
        model = random_model(cfg)
        c = kvlab.costs(cfg, context=16)
        assert model.num_parameters() == c.params_total
        for i in shared_layers(cfg):
            assert not any(n.startswith(f"layers.{i}.attn.{p}") for n, _ in model.named_parameters()
                           for p in ("k_proj", "v_proj", "k_norm"))
    c = kvlab.costs(gemma_like(), context=16)
    assert c.params_ple_table == 97 * 7 * 8


# -- cached == uncached ----------------------------------------------------------------------------
@pytest.mark.parametrize("moe", [False, True])
@pytest.mark.parametrize("chunk", [1, 5, 13])
def test_cached_equals_uncached_for_a_shared_plain_config(moe, chunk) -> None:
    """In float64, so that any difference is a bug, not rounding (scale-1.0 attention and sandwich norms
    amplify fp32 rounding to ~1e-5)."""
    cfg = gemma_like(moe=moe)
    model = random_model(cfg, seed=5).to(torch.float64)
    length = 23  # several windows of 4
    ids = torch.randint(0, cfg.vocab_size, (3, length), generator=torch.Generator().manual_seed(3))
    pad = torch.tensor([0, 4, 9])
    mask = (torch.arange(length)[None] >= pad[:, None]).long()
    full = model(ids, attention_mask=mask)
    inc, cache = run_chunked(model, ids, pad, chunk, length)
    assert_rows_close(inc, full, pad, atol=1e-10)
    for r, p in enumerate(pad.tolist()):  # a padded row gives the logits of the row alone
        torch.testing.assert_close(model(ids[r:r + 1, p:])[0], full[r, p:], atol=1e-10, rtol=0)
    # prefill with last_only skips the all-shared tail for every position but the last: same logits
    cache = model.new_cache(3, max_length=length)
    cache.set_padding(pad)
    last = model(ids, cache=cache, last_only=True)
    torch.testing.assert_close(last[:, 0], full[:, -1], atol=1e-10, rtol=0)


def test_generation_with_sharing_matches_step_by_step_forward() -> None:
    cfg = gemma_like()
    model = random_model(cfg, seed=2)
    ids = torch.randint(0, cfg.vocab_size, (1, 9), generator=torch.Generator().manual_seed(4))
    out = kvlab.generate(model, ids, max_new_tokens=12, prefill_chunk=4)
    seq = ids
    for _ in range(12):
        seq = torch.cat((seq, model(seq)[:, -1].argmax(-1, keepdim=True)), 1)
    assert torch.equal(out, seq)


# -- golden figures (REFERENCE.md, Gemma 4) ------------------------------------------------------
CTX, BF16 = 131072, 2


def test_gemma4_e2b_cache_by_hand() -> None:
    # 35 layers, full at 4, 9, ..., 34; layers 15-34 share; 1 KV head; head_dim 256 sliding / 512 full; window 512
    full, slide = 2 * 512 * BF16, 2 * 256 * BF16  # K + V bytes per position per layer
    without = 7 * full * CTX + 28 * slide * 512
    with_ = 3 * full * CTX + 12 * slide * 512  # producers: layers 0-14 = 3 full + 12 sliding
    c = kvlab.costs("gemma-4-e2b", context=CTX, dtype="bf16")
    assert (c.kv_cache_bytes, c.kv_cache_bytes_no_sharing) == (with_, without)
    assert round(without / 1e9, 2) == 1.89 and round(with_ / 1e9, 2) == 0.81
    r = kv_sharing_report("gemma-4-e2b", CTX)
    assert [round(100 * x["saved_fraction"], 1) for x in r["rows"]] == [57.1, 57.1, 57.1]
    simplified = 20 * 1 * 256 * 2 * BF16 * CTX  # the published ~2.7 GB: 20 shared layers, head_dim 256, no window
    assert r["rows"][1]["saved"] == simplified and round(simplified / 1e9, 2) == 2.68
    cfg = get_preset("gemma-4-e2b")
    assert [cfg.layers[i].kv_source for i in (15, 19, 33, 34)] == [13, 14, 13, 14]
    assert cfg.layers[15].intermediate_size == 12288 and cfg.layers[14].intermediate_size == 6144


def test_gemma4_e4b_cache_by_hand() -> None:
    full, slide = 2 * 2 * 512 * BF16, 2 * 2 * 256 * BF16  # 2 KV heads
    without = 7 * full * CTX + 35 * slide * 512
    with_ = 4 * full * CTX + 20 * slide * 512  # producers: layers 0-23 = 4 full (5, 11, 17, 23) + 20 sliding
    c = kvlab.costs("gemma-4-e4b", context=CTX, dtype="bf16")
    assert (c.kv_cache_bytes, c.kv_cache_bytes_no_sharing) == (with_, without)
    assert round(without / 1e9, 2) == 3.79 and round(with_ / 1e9, 2) == 2.17
    r = kv_sharing_report("gemma-4-e4b", CTX)
    assert r["rows"][2]["head_dim"] == 320 and round(r["rows"][2]["saved"] / 1e9, 2) == 6.04  # the published ~6 GB
    assert round(100 * r["rows"][0]["saved_fraction"], 1) == 42.9


def test_no_kv_sharing_flag(capsys) -> None:
    from kvlab.cli import main

    assert main(["calc", "gemma-4-e2b", "--context", "128k"]) == 0
    out = capsys.readouterr().out
    assert "1.89 GB" in out and "0.81 GB" in out and "2.68 GB" in out and "57.1%" in out
    assert main(["calc", "gemma-4-e2b", "--context", "128k", "--no-kv-sharing", "--json"]) == 0
    import json

    d = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert d["kv_cache_bytes"] == d["kv_cache_bytes_no_sharing"] == 1893728256 and d["kv_sharing_off"]
    assert d["kv_sharing"]["rows"][0]["with_sharing"] == 811597824
