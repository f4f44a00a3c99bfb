"""DeepSeek V3 and V3.2: multi-head latent attention (MLA) with a group-routed MoE; V3.2 adds sparse attention.

``deepseek-v3``: 61 layers, hidden 7168, 128 heads; MLA with q_lora_rank 1536, kv_lora_rank 512, qk_nope 128,
qk_rope 64 (interleaved RoPE), v_head 128 — per token and layer the cache holds 512 + 64 = 576 values, no per-head
K/V; layers 0-2 dense SwiGLU 18432, layers 3-60 MoE: 256 routed experts of width 2048, top-8, sigmoid scores with
correction bias, group-limited (8 groups, best 4), renormalised, routed scaling 2.5, plus 1 shared expert; vocab
129280; YaRN factor 40 from 4096 (beta 32/1, mscale 1.0, mscale_all_dim 1.0: softmax scale 192^-0.5 x
(0.1 ln 40 + 1)^2); 163840 positions.

``deepseek-v3.2``: the same plus DeepSeek sparse attention (DSA): a lightning indexer of 64 heads x 128 scores
every cached token per query and MLA attends to the best 2048. The calculator prices it (indexer keys: 128 values
per token and layer, in the K/V dtype as transformers caches them); the module is kvlab/layers/mla.py's DSAIndexer.
"""

from __future__ import annotations

from kvlab.config import ModelConfig, MoESpec, RopeSpec
from kvlab.presets.registry import preset
from kvlab.specs import mla_layer

DEEPSEEK_V3 = ("deepseek-ai/DeepSeek-V3 config.json (DeepseekV3ForCausalLM; = transformers 5.23 DeepseekV3Config "
               "defaults: hidden 7168, 61 layers, 128 heads, q_lora_rank 1536, kv_lora_rank 512, qk_nope 128, qk_rope "
               "64, v_head 128, first_k_dense_replace 3 (intermediate 18432), 256 experts top-8 x 2048 + 1 shared, "
               "n_group 8, topk_group 4, routed scaling 2.5, vocab 129280) with the published rope_scaling (yarn, "
               "factor 40, original 4096, beta 32/1, mscale 1.0, mscale_all_dim 1.0) and max_position_embeddings "
               "163840")
DEEPSEEK_V32 = ("deepseek-ai/DeepSeek-V3.2-Exp config.json (DeepseekV32ForCausalLM; = transformers 5.23 "
                "DeepseekV32Config defaults: the DeepSeek-V3 shape, max_position_embeddings 163840, plus the DSA "
                "indexer index_n_heads 64, index_head_dim 128, index_topk 2048)")


def _yarn() -> RopeSpec:
    return RopeSpec(theta=10000.0, scaling="yarn", factor=40.0, original_max_positions=4096, beta_fast=32.0,
                    beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)


def _deepseek(name: str, source: str, sparse: bool) -> ModelConfig:
    index = {"index_heads": 64, "index_head_dim": 128, "index_topk": 2048} if sparse else {}
    layers = []
    for i in range(61):
        moe = None if i < 3 else MoESpec(num_experts=256, top_k=8, expert_size=2048, scoring="sigmoid", norm_topk=True,
                                         bias_correction=True, routed_scaling=2.5, shared_experts=1, shared_size=2048,
                                         n_group=8, topk_group=4)
        layers.append(mla_layer(128, 512, 128, 64, 128, q_lora_rank=1536, rope=_yarn(), rope_interleave=True,
                                mlp="moe" if moe else "dense", intermediate_size=0 if moe else 18432, moe=moe, **index))
    return ModelConfig(vocab_size=129280, hidden_size=7168, layers=layers, max_positions=163840, norm_eps=1e-6,
                       tie_embeddings=False, name=name, source=source)


@preset("deepseek-v3", DEEPSEEK_V3)
def deepseek_v3() -> ModelConfig:
    """DeepSeek-V3 (671B, 37B active): MLA caches 576 values per token and layer (68.6 KiB/token in bf16)."""
    return _deepseek("deepseek-v3", DEEPSEEK_V3, sparse=False)


@preset("deepseek-v3.2", DEEPSEEK_V32)
def deepseek_v32() -> ModelConfig:
    """DeepSeek-V3.2: V3 plus DSA (indexer 64 x 128, top-2048): 576 + 128 cached values per token and layer."""
    return _deepseek("deepseek-v3.2", DEEPSEEK_V32, sparse=True)
