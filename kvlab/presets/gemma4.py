"""Gemma 4 text models (Google, 2026): E2B, E4B, 26B-A4B, 31B.

Each preset is the ``text_config`` of the published ``config.json`` fed through the same reader
``kvlab.load`` uses (kvlab/families/gemma4.py), so a preset and a real checkpoint give identical
ModelConfigs. Numbers (summarised in /work/shared/REFERENCE.md, Gemma 4 section):

| | E2B | E4B | 26B-A4B | 31B |
|---|---|---|---|---|
| layers / hidden | 35 / 1536 | 42 / 2560 | 30 / 2816 | 60 / 5376 |
| MLP | 6144 (12288 on shared layers) | 10240 | 2112 dense + 128 experts x 704, top-8 | 21504 |
| q heads; KV heads sliding / full | 8; 1 / 1 | 8; 2 / 2 | 16; 8 / 2 | 32; 16 / 4 |
| head_dim sliding / full; K = V on full | 256 / 512; no | 256 / 512; no | 256 / 512; yes | 256 / 512; yes |
| window; sliding:full | 512; 4:1 | 512; 5:1 | 1024; 5:1 | 1024; 5:1 |
| num_kv_shared_layers | 20 (layers 15-34) | 18 (layers 24-41) | 0 | 0 |
| PLE dim / vocab | 256 / 262144 | 256 / 262144 | - | - |
All: vocab 262144, final logit soft-cap 30, tied embeddings, sliding RoPE theta 1e4, full RoPE theta 1e6
proportional with partial 0.25; max positions 131072 (E2B, E4B) and 262144 (26B-A4B, 31B).
"""

from __future__ import annotations

from typing import Any

from kvlab.config import ModelConfig
from kvlab.families import config_from_hf
from kvlab.presets.registry import preset

S, F = "sliding_attention", "full_attention"
SOURCE = ("google/gemma-4-{name} config.json (Gemma4ForConditionalGeneration text_config; transformers 5.23 "
          "Gemma4TextConfig defaults for absent keys), as summarised in the model card: {summary}")
ROPE = {S: {"rope_type": "default", "rope_theta": 10000.0},
        F: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0}}


def _text(layers: int, period: int, **kw: Any) -> dict[str, Any]:
    types = [F if (i + 1) % period == 0 else S for i in range(layers)]
    return {"architectures": ["Gemma4ForCausalLM"], "vocab_size": 262144, "num_hidden_layers": layers,
            "layer_types": types, "head_dim": 256, "global_head_dim": 512, "rope_parameters": ROPE,
            "final_logit_softcapping": 30.0, "tie_word_embeddings": True, "rms_norm_eps": 1e-6,
            "hidden_activation": "gelu_pytorch_tanh", **kw}


def _build(name: str, source: str, text: dict[str, Any]) -> ModelConfig:
    cfg = config_from_hf(text)
    cfg.name, cfg.source = name, source
    return cfg


E2B = SOURCE.format(name="E2B", summary="35 layers, hidden 1536, MLP 6144 (double-wide 12288 on the 20 KV-shared "
                    "layers), 8 heads, 1 KV head, head_dim 256/512, window 512, 4:1, PLE 256")
E4B = SOURCE.format(name="E4B", summary="42 layers, hidden 2560, MLP 10240, 8 heads, 2 KV heads, head_dim 256/512, "
                    "window 512, 5:1, 18 KV-shared layers, PLE 256")
A4B = SOURCE.format(name="26B-A4B", summary="30 layers, hidden 2816, dense MLP 2112 + 128 experts x 704 top-8, "
                    "16 heads, 8/2 KV heads, K = V on full layers, head_dim 256/512, window 1024, 5:1")
B31 = SOURCE.format(name="31B", summary="60 layers, hidden 5376, MLP 21504, 32 heads, 16/4 KV heads, K = V on full "
                    "layers, head_dim 256/512, window 1024, 5:1")


@preset("gemma-4-e2b", E2B)
def gemma4_e2b() -> ModelConfig:
    return _build("gemma-4-e2b", E2B, _text(
        35, 5, hidden_size=1536, intermediate_size=6144, use_double_wide_mlp=True, num_attention_heads=8,
        num_key_value_heads=1, sliding_window=512, num_kv_shared_layers=20, hidden_size_per_layer_input=256,
        vocab_size_per_layer_input=262144, max_position_embeddings=131072))


@preset("gemma-4-e4b", E4B)
def gemma4_e4b() -> ModelConfig:
    return _build("gemma-4-e4b", E4B, _text(
        42, 6, hidden_size=2560, intermediate_size=10240, num_attention_heads=8, num_key_value_heads=2,
        sliding_window=512, num_kv_shared_layers=18, hidden_size_per_layer_input=256,
        vocab_size_per_layer_input=262144, max_position_embeddings=131072))


@preset("gemma-4-26b-a4b", A4B)
def gemma4_26b_a4b() -> ModelConfig:
    return _build("gemma-4-26b-a4b", A4B, _text(
        30, 6, hidden_size=2816, intermediate_size=2112, num_attention_heads=16, num_key_value_heads=8,
        num_global_key_value_heads=2, attention_k_eq_v=True, sliding_window=1024, enable_moe_block=True,
        num_experts=128, top_k_experts=8, moe_intermediate_size=704, hidden_size_per_layer_input=0,
        max_position_embeddings=262144))


@preset("gemma-4-31b", B31)
def gemma4_31b() -> ModelConfig:
    return _build("gemma-4-31b", B31, _text(
        60, 6, hidden_size=5376, intermediate_size=21504, num_attention_heads=32, num_key_value_heads=16,
        num_global_key_value_heads=4, attention_k_eq_v=True, sliding_window=1024, hidden_size_per_layer_input=0,
        max_position_embeddings=262144))
