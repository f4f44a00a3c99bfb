"""ZAYA1 (``ZayaForCausalLM``, Zyphra): compressed convolutional attention and a top-1 MoE with a router MLP.

Following transformers 5.23 ``modeling_zaya``:

- every layer is a CCA layer (kvlab ``attention='cca'``, kvlab/layers/cca.py) of ``num_attention_heads``
  compressed query heads and ``num_key_value_heads`` KV heads of ``head_dim``; ``layer_types[i]`` is
  ``hybrid`` (full attention) or ``hybrid_sliding`` (window ``sliding_window``); convolution kernels
  ``cca_time0`` (depthwise) and ``cca_time1`` (grouped); ``attention_bias`` puts a bias on the q/k/v and o
  projections; RoPE per layer type from ``rope_parameters[layer_type]`` (default: hybrid theta 5e6, sliding
  theta 1e4, both on half the head);
- the embedding becomes ``(e + b) * s`` (kvlab ``embed_affine``); the residual stream is fp32
  (``residual_fp32``); both residual adds are per-channel scaled (``residual_scaling``);
- every layer's MLP is a MoE of ``num_experts`` SwiGLU experts of ``moe_intermediate_size`` with top-1
  choice (``num_experts_per_tok`` must be 1) and a skip expert: a router MLP in ``router_hidden_size``
  dims that adds the previous layer's router state (from layer 1 on), softmax over experts + skip,
  ``balancing_biases`` added for the choice only, weights not renormalised.

``lm_head_bias`` is not supported (a clear error).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..config import CCASpec, LayerSpec, ModelConfig, MoESpec, RopeSpec
from .base import Family, HFState, Tensor, activation, drop_tied_head, hf_config, rename, rope_from_hf, with_defaults

ARCH = "ZayaForCausalLM"
DEFAULTS: dict[str, Any] = {  # transformers 5.23 ZayaConfig defaults
    "vocab_size": 262272, "hidden_size": 2048, "num_hidden_layers": 40, "num_attention_heads": 8,
    "num_key_value_heads": 2, "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True, "rope_parameters": None, "sliding_window": None, "moe_intermediate_size": 2048,
    "num_experts_per_tok": 1, "num_experts": 16, "layer_types": None, "head_dim": 128, "attention_bias": False,
    "lm_head_bias": False, "router_hidden_size": 256, "cca_time0": 2, "cca_time1": 2,
}
DEFAULT_ROPE = {  # ZayaConfig.__post_init__
    "hybrid": {"rope_type": "default", "rope_theta": 5_000_000.0, "partial_rotary_factor": 0.5},
    "hybrid_sliding": {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.5},
}
LAYER_TYPES = ("hybrid", "hybrid_sliding")


def _rope(c: dict[str, Any], layer_type: str) -> RopeSpec:
    params = c.get("rope_parameters") or DEFAULT_ROPE
    per_type = {k: v for k, v in params.items() if isinstance(v, dict)}  # the hub config also holds a flat rope_type
    if layer_type not in per_type:
        raise ValueError(f"{ARCH} config.json: rope_parameters must hold one dict per layer type "
                         f"({', '.join(sorted(set(c['layer_types'])))}); got keys {sorted(params)}")
    flat = {"rope_parameters": dict(per_type[layer_type]), "max_position_embeddings": c["max_position_embeddings"]}
    return rope_from_hf(flat, f"{ARCH} ({layer_type})")


def config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    c = with_defaults(cfg, DEFAULTS)
    n = c["num_hidden_layers"]
    types = c["layer_types"] or ["hybrid"] * n
    if len(types) != n:
        raise ValueError(f"{ARCH} config.json: layer_types has {len(types)} entries for num_hidden_layers={n}")
    bad = sorted({t for t in types if t not in LAYER_TYPES})
    if bad:
        raise ValueError(f"{ARCH} config.json: layer_types {bad} not supported; allowed: {', '.join(LAYER_TYPES)}")
    if "hybrid_sliding" in types and c["sliding_window"] is None:
        raise ValueError(f"{ARCH} config.json: layer_types has hybrid_sliding layers but sliding_window is null")
    if c["num_experts_per_tok"] != 1:
        raise ValueError(f"{ARCH} config.json: num_experts_per_tok={c['num_experts_per_tok']!r} is not supported; "
                         "ZAYA routes each token to one expert (or the skip expert)")
    if c["lm_head_bias"]:
        raise ValueError(f"{ARCH} config.json: lm_head_bias=true is not supported")
    bias = bool(c["attention_bias"])
    act = activation(c, ARCH)
    ropes = {t: _rope({**c, "layer_types": types}, t) for t in sorted(set(types))}
    layers = []
    for i, t in enumerate(types):
        moe = MoESpec(num_experts=c["num_experts"], top_k=1, expert_size=c["moe_intermediate_size"],
                      scoring="softmax", norm_topk=False, bias_correction=True, router_hidden=c["router_hidden_size"],
                      router_carry=i > 0, skip_expert=True)
        layers.append(LayerSpec(
            num_heads=c["num_attention_heads"], num_kv_heads=c["num_key_value_heads"], head_dim=c["head_dim"],
            attention="cca", cca=CCASpec(conv_kernels=(int(c["cca_time0"]), int(c["cca_time1"]))),
            window=int(c["sliding_window"]) if t == "hybrid_sliding" else None, qkv_bias=bias, o_bias=bias,
            rope=dataclasses.replace(ropes[t]), residual_scaling=True, mlp="moe", moe=moe, activation=act))
    return ModelConfig(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], layers=layers,
                       max_positions=c["max_position_embeddings"], norm_eps=c["rms_norm_eps"],
                       tie_embeddings=bool(c["tie_word_embeddings"]), embed_affine=True, residual_fp32=True,
                       name="zaya")


NAMES: dict[str, str] = {
    "model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight", "lm_head.weight": "lm_head.weight",
    "model.input_hidden_states_scale": "embed_affine_scale", "model.input_hidden_states_bias": "embed_affine_bias",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attn_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.mlp_norm.weight",
    "model.layers.{i}.self_attn.qk_norm.temp": "layers.{i}.attn.key_temp",
    "model.layers.{i}.mlp.gate.balancing_biases": "layers.{i}.mlp.router_bias",
    "model.layers.{i}.mlp.gate.router_states_scale": "layers.{i}.mlp.router_state_scale",
    "model.layers.{i}.mlp.gate.router_mlp.out_proj.weight": "layers.{i}.mlp.router.weight",
    "model.layers.{i}.mlp.gate.router_mlp.norm.weight": "layers.{i}.mlp.router_mlp.norm.weight",
}
for _hf, _kv in (("post_attention_residual_scale", "attn_residual"), ("post_mlp_residual_scale", "mlp_residual")):
    for _a, _b in (("hidden_states_scale", "out_scale"), ("hidden_states_bias", "out_bias"),
                   ("residual_scale", "res_scale"), ("residual_bias", "res_bias")):
        NAMES[f"model.layers.{{i}}.{_hf}.{_a}"] = f"layers.{{i}}.{_kv}.{_b}"
for _s in ("weight", "bias"):
    NAMES[f"model.layers.{{i}}.self_attn.o_proj.{_s}"] = f"layers.{{i}}.attn.o_proj.{_s}"
    for _a, _b in (("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj_current", "v_proj"),
                   ("v_proj_delayed", "v_shift_proj"), ("conv_qk_depthwise", "conv_dw"),
                   ("conv_qk_grouped", "conv_grouped")):
        NAMES[f"model.layers.{{i}}.self_attn.qkv_proj.{_a}.{_s}"] = f"layers.{{i}}.attn.{_b}.{_s}"
    NAMES[f"model.layers.{{i}}.mlp.gate.down_proj.{_s}"] = f"layers.{{i}}.mlp.router_down.{_s}"
    for _a in ("fc1", "fc2"):
        NAMES[f"model.layers.{{i}}.mlp.gate.router_mlp.{_a}.{_s}"] = f"layers.{{i}}.mlp.router_mlp.{_a}.{_s}"
NAMES["model.layers.{i}.mlp.experts.gate_up_proj"] = "layers.{i}.mlp.experts.gate_proj"  # split into gate, up
NAMES["model.layers.{i}.mlp.experts.down_proj"] = "layers.{i}.mlp.experts.down_proj"


def map_weights(hf_state: HFState, config: ModelConfig) -> dict[str, Tensor]:
    """HF tensors under kvlab names, values untouched (the fused expert ``gate_up_proj`` is split in two)."""
    return drop_tied_head(rename(hf_state, NAMES), config.tie_embeddings)


def to_hf_config(config: ModelConfig) -> dict[str, Any]:
    """ZayaConfig keys of ``config``'s shape: CCA attention, router MLP, skip expert."""
    layers = config.layers
    x = layers[0]
    if x.attention != "cca":
        raise ValueError(f"{ARCH}: {config.name} has no CCA attention")
    types = ["hybrid_sliding" if y.window is not None else "hybrid" for y in layers]
    windows = sorted({y.window for y in layers if y.window is not None})
    ropes: dict[str, Any] = {}
    for t, y in zip(types, layers):
        if t not in ropes and y.rope is not None:
            ropes[t] = {"rope_type": y.rope.scaling, "rope_theta": y.rope.theta,
                        "partial_rotary_factor": y.rope.partial}
    d: dict[str, Any] = {"layer_types": types, "sliding_window": windows[0] if windows else None,
                         "rope_parameters": ropes, "attention_bias": x.qkv_bias, "lm_head_bias": False,
                         "cca_time0": x.cca.conv_kernels[0], "cca_time1": x.cca.conv_kernels[1]}
    if x.moe is not None:
        d.update(num_experts=x.moe.num_experts, num_experts_per_tok=x.moe.top_k,
                 moe_intermediate_size=x.moe.expert_size, router_hidden_size=x.moe.router_hidden)
    return hf_config(config, ARCH, "zaya", **d)


FAMILY = Family(ARCH, config_from_hf, map_weights, NAMES, to_hf_config=to_hf_config)
