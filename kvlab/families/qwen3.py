"""Qwen3 (``Qwen3ForCausalLM``) and Qwen2 (``Qwen2ForCausalLM``).

Qwen3: Llama layout plus RMSNorm over head_dim on q and k (per head, before RoPE, same eps as the
other norms); ``attention_bias`` puts a bias on q, k, v and o. Qwen2: bias on q, k, v only, no
q/k norm. Both: ``sliding_window`` counts only when ``use_sliding_window`` is true (the config class
sets it to None otherwise), and then applies to the layers whose ``layer_types[i]`` is
``sliding_attention``; without ``layer_types`` those are the layers ``i >= max_window_layers``.
"""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from .base import Family, HFState, Tensor, drop_tied_head, hf_config, llama_names, rename, single_window, with_defaults
from .llama import decoder_config

ARCH = "Qwen3ForCausalLM"
QWEN2 = "Qwen2ForCausalLM"
DEFAULTS: dict[str, Any] = {  # transformers 5.23 Qwen3Config defaults
    "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128, "hidden_act": "silu",
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attention_bias": False,
    "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28, "layer_types": None,
}
QWEN2_DEFAULTS = {**DEFAULTS, "head_dim": None}


def sliding_windows(c: dict[str, Any], arch: str) -> list[int | None]:
    """Per-layer windows following Qwen2/Qwen3Config.__post_init__ and the attention modules."""
    n = c["num_hidden_layers"]
    window = c["sliding_window"] if c.get("use_sliding_window") else None
    types = c.get("layer_types")
    if types is None:
        types = ["sliding_attention" if window is not None and i >= c["max_window_layers"] else "full_attention"
                 for i in range(n)]
    if len(types) != n:
        raise ValueError(f"{arch} config.json: layer_types has {len(types)} entries for num_hidden_layers={n}")
    bad = sorted({t for t in types if t not in ("full_attention", "sliding_attention")})
    if bad:
        raise ValueError(f"{arch} config.json: layer_types {bad} not supported; allowed: full_attention, "
                         "sliding_attention")
    if "sliding_attention" in types and window is None:
        raise ValueError(f"{arch} config.json: layer_types has sliding_attention layers but no window "
                         "(sliding_window is null or use_sliding_window is false)")
    return [int(window) if t == "sliding_attention" else None for t in types]


def config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    c = with_defaults(cfg, DEFAULTS)
    bias = bool(c["attention_bias"])
    return decoder_config(c, ARCH, windows=sliding_windows(c, ARCH), qk_norm=True, qkv_bias=bias, o_bias=bias)


def qwen2_config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    c = with_defaults(cfg, QWEN2_DEFAULTS)
    return decoder_config(c, QWEN2, windows=sliding_windows(c, QWEN2), qkv_bias=True)


NAMES = llama_names(qk_norm=True)
QWEN2_NAMES = llama_names()


def map_weights(hf_state: HFState, config: ModelConfig) -> dict[str, Tensor]:
    return drop_tied_head(rename(hf_state, NAMES), config.tie_embeddings)


def to_hf_config(config: ModelConfig) -> dict[str, Any]:
    """Qwen3Config keys of ``config``'s shape (q/k norms; sliding layers named in ``layer_types``)."""
    w = single_window(config, ARCH)
    types = ["sliding_attention" if x.window else "full_attention" for x in config.layers]
    return hf_config(config, ARCH, "qwen3", layer_types=types, use_sliding_window=w is not None, sliding_window=w)


def qwen2_to_hf_config(config: ModelConfig) -> dict[str, Any]:
    """Qwen2Config keys of ``config``'s shape (biases on q, k, v; sliding layers named in ``layer_types``)."""
    w = single_window(config, QWEN2)
    types = ["sliding_attention" if x.window else "full_attention" for x in config.layers]
    d = hf_config(config, QWEN2, "qwen2", layer_types=types, use_sliding_window=w is not None, sliding_window=w)
    d.pop("attention_bias")  # Qwen2 always has them (on q, k, v), and no key for them
    return d


FAMILY = Family(ARCH, config_from_hf, map_weights, NAMES, to_hf_config=to_hf_config)
QWEN2_FAMILY = Family(QWEN2, qwen2_config_from_hf, map_weights, QWEN2_NAMES, to_hf_config=qwen2_to_hf_config)
