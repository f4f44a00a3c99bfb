"""Mistral (``MistralForCausalLM``): Llama layout, no biases, one sliding window on every layer.

transformers masks a sliding layer with ``kv_idx > q_idx - sliding_window``: a query sees itself and
the ``sliding_window - 1`` positions before it, which is kvlab's ``LayerSpec.window``. A null
``sliding_window`` means full attention. ``layer_types`` is ignored by MistralForCausalLM.
"""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from .base import Family, HFState, Tensor, drop_tied_head, hf_config, llama_names, rename, single_window, with_defaults
from .llama import decoder_config

ARCH = "MistralForCausalLM"
DEFAULTS: dict[str, Any] = {  # transformers 5.23 MistralConfig defaults
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": None, "hidden_act": "silu",
    "max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "sliding_window": 4096,
}


def config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    c = with_defaults(cfg, DEFAULTS)
    w = c["sliding_window"]
    return decoder_config(c, ARCH, windows=[int(w) if w else None] * c["num_hidden_layers"])


NAMES = llama_names()


def map_weights(hf_state: HFState, config: ModelConfig) -> dict[str, Tensor]:
    return drop_tied_head(rename(hf_state, NAMES), config.tie_embeddings)


def to_hf_config(config: ModelConfig) -> dict[str, Any]:
    """MistralConfig keys of ``config``'s shape (one window on every layer, or none)."""
    return hf_config(config, ARCH, "mistral", sliding_window=single_window(config, ARCH))


FAMILY = Family(ARCH, config_from_hf, map_weights, NAMES, to_hf_config=to_hf_config)
