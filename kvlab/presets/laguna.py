"""Laguna XS.2 (poolside) and two counterparts that show what its attention budget buys.

``laguna-xs.2``: 40 layers repeating 1 global + 3 sliding (window 512); 48 query heads on the global
layers, 64 on the sliding ones; 8 KV heads of dim 128 everywhere; per-head q/k RMSNorm; a per-head
softplus output gate; layer 0 a dense SwiGLU MLP (8192), layers 1-39 sigmoid-routed MoE (256 experts of
width 512, top-8, correction bias, renormalised, routed scaling 2.5) plus one always-on shared expert
(512). RoPE: global layers YaRN (theta 5e5, factor 32 from 4096, beta 64/1, attention factor 1.0) on half
the head; sliding layers plain theta 1e4 on the whole head. 33.4B parameters, 3.0B active.

``laguna-xs.2-all-global``: every layer global, each keeping its own heads (and the global layers' RoPE).
``laguna-xs.2-uniform-heads``: the same sliding/global pattern with 64 query heads on every layer (the
sliding layers' count; the average, 60, is not a multiple of the 8 KV heads).
"""

from __future__ import annotations

from kvlab.budget import budget
from kvlab.config import GQASpec, LayerSpec, ModelConfig, MoESpec, RopeSpec
from kvlab.presets.registry import preset

LAGUNA_XS2 = ("poolside/Laguna-XS.2 config.json (LagunaForCausalLM; transformers 5.23 LagunaConfig defaults: "
              "hidden 2048, 40 layers, 48 heads, 8 KV heads x 128, window 512, 256 experts top-8 x 512, shared 512, "
              "dense 8192, vocab 100352, context 131072); per-layer heads 48 global / 64 sliding, layer_types "
              "1 full : 3 sliding, full-layer YaRN factor 32 from 4096 (beta 64/1, attention_factor 1.0, partial "
              "0.5), routed scaling 2.5, per-head gating, as quoted in the model card and public configs "
              "(some sources cite YaRN factor 64: check the checkpoint's revision)")

ALL_GLOBAL = ("kvlab counterpart of laguna-xs.2: every layer global, each keeping its own query heads "
              "(base: poolside/Laguna-XS.2 config.json)")
UNIFORM_HEADS = ("kvlab counterpart of laguna-xs.2: its 1 global : 3 sliding pattern with 64 query heads on every "
                 "layer (base: poolside/Laguna-XS.2 config.json)")
GLOBAL_HEADS, SLIDING_HEADS, WINDOW = 48, 64, 512


def _global_rope() -> RopeSpec:
    return RopeSpec(theta=500000.0, partial=0.5, scaling="yarn", factor=32.0, original_max_positions=4096,
                    beta_fast=64.0, beta_slow=1.0, attention_factor=1.0)


def _sliding_rope() -> RopeSpec:
    return RopeSpec(theta=10000.0, partial=1.0)


@preset("laguna-xs.2", LAGUNA_XS2)
def laguna_xs2() -> ModelConfig:
    """Laguna XS.2: 1 global (48 heads) : 3 sliding (64 heads, window 512); 5.06 GiB KV at 128K in bf16."""
    layers = []
    for i in range(40):
        is_global = i % 4 == 0
        moe = None if i == 0 else MoESpec(num_experts=256, top_k=8, expert_size=512, scoring="sigmoid",
                                          norm_topk=True, bias_correction=True, routed_scaling=2.5,
                                          shared_experts=1, shared_size=512)
        layers.append(LayerSpec(
            num_heads=GLOBAL_HEADS if is_global else SLIDING_HEADS, num_kv_heads=8, head_dim=128,
            window=None if is_global else WINDOW, gqa=GQASpec(qk_norm=True), output_gate="softplus", gate_per_head=True,
            rope=_global_rope() if is_global else _sliding_rope(),
            mlp="moe" if moe else "dense", intermediate_size=0 if moe else 8192, moe=moe))
    return ModelConfig(vocab_size=100352, hidden_size=2048, layers=layers, max_positions=131072, norm_eps=1e-6,
                       tie_embeddings=False, name="laguna-xs.2", source=LAGUNA_XS2)


@preset("laguna-xs.2-all-global", ALL_GLOBAL)
def laguna_xs2_all_global() -> ModelConfig:
    """Every layer global, each with its own XS.2 head count: 20.0 GiB KV at 128K in bf16."""
    return budget(laguna_xs2(), pattern="global", rope={"global": _global_rope()}, name="laguna-xs.2-all-global",
                  source=ALL_GLOBAL)


@preset("laguna-xs.2-uniform-heads", UNIFORM_HEADS)
def laguna_xs2_uniform_heads() -> ModelConfig:
    """XS.2's pattern and window with one head count (64) on every layer."""
    return budget(laguna_xs2(), heads=SLIDING_HEADS, name="laguna-xs.2-uniform-heads", source=UNIFORM_HEADS)
