"""One config shrinker for the demo, the benchmark and the trainer: every preset shrinks to a small model that
runs, every sub-spec (MoE, MLA, CSA/HCA compression, PLE) shrinks with it, and the benchmark's budget keeps the
KV cache."""

import math

import pytest
import torch

from kvlab.config import ModelConfig, uniform_layers
from kvlab.costs import costs
from kvlab.model import Model
from kvlab.presets import get_preset, presets
from kvlab.shrink import TINY, scale_to_fit, shrink, tiny
from kvlab.train.config import scale_model


def pattern(cfg: ModelConfig) -> list[tuple]:
    """What the shrinker keeps: each layer's kind, whether it has a window, its K/V source, its MLP kind."""
    return [(x.attention, x.window is None, x.kv_source, x.mlp, x.compress and x.compress.ratio) for x in cfg.layers]


@pytest.mark.parametrize("name", presets())
def test_every_preset_shrunk_is_small_and_runs(name):
    big = get_preset(name)
    cfg = tiny(big)
    with torch.device("meta"):
        meta = Model(cfg)
    n = sum(p.numel() for p in meta.parameters())
    assert n == costs(cfg, context=1).params_total < 5_000_000
    assert pattern(cfg) == pattern(big) and cfg.hidden_size == TINY["hidden_size"]
    model = Model.from_config(cfg, seed=0).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids)
    assert logits.shape == (2, 11, cfg.vocab_size) and torch.isfinite(logits).all()
    assert logits.std() > 0


def test_every_sub_spec_shrinks():
    v4 = tiny(get_preset("deepseek-v4-flash"))  # the demo's old copy kept CompressSpec: 280M parameters
    csa = next(x for x in v4.layers if x.attention == "csa")
    c = csa.compress
    assert (c.q_lora_rank, c.o_lora_rank, c.index_heads, c.index_topk, c.index_head_dim) == (16, 16, 2, 8, 8)
    assert (csa.num_heads * csa.head_dim) % c.o_groups == 0
    v32 = tiny(get_preset("deepseek-v3.2"))
    m = v32.layers[0].mla
    assert (m.kv_lora_rank, m.q_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim) == (16, 16, 8, 8, 8)
    assert (m.index_heads, m.index_head_dim, m.index_topk) == (2, 8, 8) and v32.layers[0].head_dim == 16
    moe = next(x.moe for x in v32.layers if x.moe is not None)  # 256 experts in 8 groups, top 4 groups, top-8
    assert (moe.num_experts, moe.top_k, moe.n_group, moe.topk_group) == (4, 2, 4, 4)
    gemma = tiny(get_preset("gemma-4-e2b"))
    assert (gemma.ple_dim, gemma.ple_rows) == (8, 97)
    zaya = tiny(get_preset("zaya1-8b"))
    assert {x.moe.router_hidden for x in zaya.layers} == {16}


def test_embed_scale_keeps_its_ratio_to_sqrt_hidden():
    gemma = get_preset("gemma-4-e2b")
    assert gemma.embed_scale == pytest.approx(math.sqrt(gemma.hidden_size))
    assert shrink(gemma, hidden_size=64).embed_scale == pytest.approx(8.0)
    cfg = ModelConfig(vocab_size=50, hidden_size=64, embed_scale=2.0,
                      layers=uniform_layers(1, num_heads=2, num_kv_heads=1, head_dim=8, intermediate_size=16))
    assert shrink(cfg, hidden_size=16).embed_scale == pytest.approx(1.0)


def test_heads_rules():
    llama = get_preset("llama-3.1-8b")  # 32 heads, 8 KV heads
    assert {(x.num_heads, x.num_kv_heads) for x in shrink(llama, num_heads=8).layers} == {(8, 2)}
    assert {(x.num_heads, x.num_kv_heads) for x in shrink(llama, max_kv_heads=2).layers} == {(8, 2)}
    assert {(x.num_heads, x.num_kv_heads) for x in shrink(llama, num_heads=4, num_kv_heads=4).layers} == {(4, 4)}
    v3 = shrink(get_preset("deepseek-v3"), num_heads=8, num_kv_heads=4, head_dim=16)  # MLA keeps its one latent
    assert {(x.num_heads, x.num_kv_heads, x.head_dim) for x in v3.layers} == {(8, 1, 16)}


def test_trainer_scales_a_preset_with_the_shrinker():
    cfg = scale_model(get_preset("deepseek-v3"), {"num_layers": 4, "hidden_size": 64, "head_dim": 16, "num_heads": 4,
                                                 "num_experts": 8, "expert_size": 32, "intermediate_size": 64,
                                                 "latent": 32, "vocab_size": 50, "max_positions": 64})
    m = cfg.layers[0].mla
    assert (cfg.num_layers, m.kv_lora_rank, m.qk_rope_head_dim) == (4, 32, 8)
    assert costs(cfg, context=1).params_total < 1_000_000
    with pytest.raises(ValueError, match="num_layers=99"):
        scale_model(get_preset("llama-3.1-8b"), {"num_layers": 99})


def test_bad_sizes_are_named():
    with pytest.raises(ValueError, match=r"unknown size\(s\) \['depth'\]"):
        shrink(get_preset("llama-3.1-8b"), depth=2)
    with pytest.raises(ValueError, match="hidden_size=0: must be a positive integer"):
        shrink(get_preset("llama-3.1-8b"), hidden_size=0)


# -- the benchmark's budget ----------------------------------------------------------------------------------
def test_scale_to_fit_keeps_the_kv_cache():
    big = ModelConfig(vocab_size=262144, hidden_size=4096, max_positions=8192, name="big",
                      layers=uniform_layers(8, num_heads=32, num_kv_heads=8, head_dim=128, intermediate_size=14336,
                                            window=None))
    budget = 600 * 1024**2
    small, notes = scale_to_fit(big, budget_bytes=budget)
    assert costs(small, context=1, dtype="float32").params_total * 4 <= budget
    assert costs(big, context=1, dtype="float32").params_total * 4 > budget
    assert small.num_layers == 8 and small.vocab_size == 32768 and small.hidden_size < 4096
    assert costs(small, context=8192).kv_cache_bytes == costs(big, context=8192).kv_cache_bytes
    assert any("vocab" in n for n in notes) and any("hidden" in n for n in notes)
    small_one = ModelConfig(vocab_size=101, hidden_size=64, name="small",
                            layers=uniform_layers(2, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=96))
    assert scale_to_fit(small_one) == (small_one, [])


def test_scale_to_fit_truncates_layers_last():
    big = ModelConfig(vocab_size=1000, hidden_size=256, max_positions=512, name="deep",
                      layers=uniform_layers(64, num_heads=32, num_kv_heads=32, head_dim=128, intermediate_size=64))
    small, notes = scale_to_fit(big, budget_bytes=10 * 1024**2)
    assert small.num_layers < 64 and any("layers 64 ->" in n for n in notes)
    assert costs(small, context=1, dtype="float32").params_total * 4 <= 10 * 1024**2




def test_scale_to_fit_keeps_group_routing_valid():
    cfg, notes = scale_to_fit(get_preset("deepseek-v3"), 2**30)  # 256 experts in 8 groups -> 8 (top_k)
    moe = next(x.moe for x in cfg.layers if x.moe is not None)
    assert moe.num_experts == moe.top_k == 8 and moe.topk_group * (8 // moe.n_group) >= 8
    assert costs(cfg, context=1).params_total * 4 <= 2**30 and any("experts" in n for n in notes)
