"""Llama (``LlamaForCausalLM``) and the shared Llama-layout config reader.

transformers' Llama: pre-norm RMSNorm blocks, SwiGLU MLP, GQA with RoPE (rotate-half layout);
``attention_bias`` puts a bias on q, k, v *and* o; ``mlp_bias`` on all three MLP projections; no
sliding window. Other families reuse :func:`decoder_config` with their own switches.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..config import GQASpec, LayerSpec, ModelConfig, MoESpec
from .base import (
    Family,
    HFState,
    Tensor,
    activation,
    drop_tied_head,
    head_dim,
    hf_config,
    kv_heads,
    llama_names,
    rename,
    rope_from_hf,
    with_defaults,
)

ARCH = "LlamaForCausalLM"
DEFAULTS: dict[str, Any] = {  # transformers 5.23 LlamaConfig defaults, used when config.json omits a key
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": None, "hidden_act": "silu", "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "head_dim": None,
}


def decoder_config(cfg: dict[str, Any], arch: str, *, windows: list[int | None] | None = None,
                   qk_norm: bool = False, qkv_bias: bool = False, o_bias: bool = False, mlp_bias: bool = False,
                   moe: list[MoESpec | None] | None = None) -> ModelConfig:
    """A Llama-layout ModelConfig from a defaults-filled ``config.json`` dict."""
    n = cfg["num_hidden_layers"]
    # Llama-layout rotary modules rotate the whole head: their default rope ignores partial_rotary_factor
    # (and a scaled rope with it fails in transformers), so it is ignored here too
    rope = rope_from_hf(cfg, arch, partial=False)
    act = activation(cfg, arch)
    layers = []
    for i in range(n):
        m = moe[i] if moe else None
        layers.append(LayerSpec(
            num_heads=cfg["num_attention_heads"], num_kv_heads=kv_heads(cfg), head_dim=head_dim(cfg),
            intermediate_size=0 if m else cfg["intermediate_size"], window=windows[i] if windows else None,
            gqa=GQASpec(qk_norm=qk_norm), qkv_bias=qkv_bias, o_bias=o_bias, rope=dataclasses.replace(rope), activation=act,
            mlp="moe" if m else "dense", mlp_bias=mlp_bias, moe=m))
    return ModelConfig(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], layers=layers,
                       max_positions=cfg["max_position_embeddings"], norm_eps=float(cfg["rms_norm_eps"]),
                       tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                       name=cfg.get("model_type") or arch, source=f"config.json ({arch})")


def config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    c = with_defaults(cfg, DEFAULTS)
    bias = bool(c["attention_bias"])
    return decoder_config(c, ARCH, qkv_bias=bias, o_bias=bias, mlp_bias=bool(c["mlp_bias"]))


NAMES = llama_names()


def map_weights(hf_state: HFState, config: ModelConfig) -> dict[str, Tensor]:
    return drop_tied_head(rename(hf_state, NAMES), config.tie_embeddings)


def to_hf_config(config: ModelConfig) -> dict[str, Any]:
    """LlamaConfig keys of ``config``'s shape (no windows; one bias switch for q, k, v and o)."""
    return hf_config(config, ARCH, "llama")


FAMILY = Family(ARCH, config_from_hf, map_weights, NAMES, to_hf_config=to_hf_config)
