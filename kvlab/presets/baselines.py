"""Baseline presets: dense GQA decoders used as reference points (Llama 3.1, Qwen3, Mistral, rasbt)."""

from __future__ import annotations

from kvlab.config import GQASpec, ModelConfig, RopeSpec, uniform_layers
from kvlab.presets.registry import preset

LLAMA31_8B = "meta-llama/Llama-3.1-8B config.json"
QWEN3_8B = "Qwen/Qwen3-8B config.json"
MISTRAL_7B = "mistralai/Mistral-7B-v0.1 config.json"
RASBT_GQA = ("rasbt/LLMs-from-scratch ch04/04_gqa memory_estimator_gqa.py (emb_dim 4096, n_heads 32, "
             "n_layers 32, 32K context); MLP width and vocab as meta-llama/Llama-2-7b-hf config.json")


@preset("llama-3.1-8b", LLAMA31_8B)
def llama31_8b() -> ModelConfig:
    """Llama 3.1 8B: 32 layers, GQA 32/8 x 128, llama3 RoPE scaling to 128K; 8,030,261,248 params."""
    rope = RopeSpec(theta=500000.0, scaling="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_positions=8192)
    return ModelConfig(vocab_size=128256, hidden_size=4096, max_positions=131072, norm_eps=1e-5,
                       layers=uniform_layers(32, num_heads=32, num_kv_heads=8, head_dim=128,
                                             intermediate_size=14336, rope=rope),
                       name="llama-3.1-8b", source=LLAMA31_8B)


@preset("qwen3-8b", QWEN3_8B)
def qwen3_8b() -> ModelConfig:
    """Qwen3 8B: 36 layers, GQA 32/8 x 128 with QK-norm, theta 1e6, untied head; 8.19B params (6.95B non-emb)."""
    return ModelConfig(vocab_size=151936, hidden_size=4096, max_positions=40960, norm_eps=1e-6,
                       layers=uniform_layers(36, num_heads=32, num_kv_heads=8, head_dim=128,
                                             intermediate_size=12288, gqa=GQASpec(qk_norm=True),
                                             rope=RopeSpec(theta=1000000.0)),
                       name="qwen3-8b", source=QWEN3_8B)


@preset("mistral-7b", MISTRAL_7B)
def mistral_7b() -> ModelConfig:
    """Mistral 7B v0.1: 32 layers, GQA 32/8 x 128, sliding window 4096 on every layer; 7,241,732,096 params."""
    return ModelConfig(vocab_size=32000, hidden_size=4096, max_positions=32768, norm_eps=1e-5,
                       layers=uniform_layers(32, num_heads=32, num_kv_heads=8, head_dim=128,
                                             intermediate_size=14336, window=4096,
                                             rope=RopeSpec(theta=10000.0)),
                       name="mistral-7b", source=MISTRAL_7B)


def _rasbt(name: str, kv_heads: int) -> ModelConfig:
    return ModelConfig(vocab_size=32000, hidden_size=4096, max_positions=32768, norm_eps=1e-5,
                       layers=uniform_layers(32, num_heads=32, num_kv_heads=kv_heads, head_dim=128,
                                             intermediate_size=11008, rope=RopeSpec(theta=10000.0)),
                       name=name, source=RASBT_GQA)


@preset("mha-32l-4096", RASBT_GQA)
def mha_32l_4096() -> ModelConfig:
    """Generic MHA model (Llama-2-7B shape): 32 heads = 32 KV heads; rasbt's MHA figure 17.18 GB at 32K bf16."""
    return _rasbt("mha-32l-4096", 32)


@preset("gqa-32l-4096", RASBT_GQA)
def gqa_32l_4096() -> ModelConfig:
    """The same with 8 KV heads (n_kv_groups 4); rasbt's GQA figure 4.29 GB at 32K bf16."""
    return _rasbt("gqa-32l-4096", 8)
