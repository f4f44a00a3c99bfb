"""Gemma 4 text models: ``Gemma4ForCausalLM`` and the text part of ``Gemma4ForConditionalGeneration``.

transformers 5.23 ``Gemma4TextModel``, layer by layer:
- sandwich RMSNorms (weights applied as ``w``, no ``1 + w``): input, post-attention, pre- and
  post-feedforward; embeddings times ``sqrt(hidden)``; a learned ``layer_scalar`` on each layer's output;
- attention with scaling 1.0, RMSNorm on q and k and a weightless RMSNorm on v; sliding layers
  (``sliding_window``, head_dim ``head_dim``, default RoPE) and full layers (head_dim ``global_head_dim``
  or ``per_layer_config``, proportional RoPE); with ``attention_k_eq_v`` the full layers have no v_proj
  (V is the raw K projection) and ``num_global_key_value_heads`` KV heads;
- the last ``num_kv_shared_layers`` layers read the K/V of the last earlier layer of their type
  (kvlab: ``kv_source``), with a double-wide MLP when ``use_double_wide_mlp``;
- per-layer embeddings when ``hidden_size_per_layer_input`` is set (kvlab: ``ple_dim``);
- with ``enable_moe_block`` a dense MLP and a routed MoE side by side (kvlab: ``mlp='dense+moe'``);
- final logit soft-cap; tied head.
``Gemma4ForConditionalGeneration`` keeps the same text model under ``model.language_model``; its
vision/audio towers and multimodal embedders are skipped with a one-line notice.
"""

from __future__ import annotations

import math
import sys
from typing import Any

from ..config import GQASpec, LayerSpec, ModelConfig, MoESpec, RopeSpec
from ..kinds.gqa import options_of
from ..sharing import share_last
from .base import ACTIVATIONS, Family, HFState, Tensor, _template, drop_tied_head, hf_config, text_part

ARCH = "Gemma4ForCausalLM"
CG_ARCH = "Gemma4ForConditionalGeneration"
DEFAULTS: dict[str, Any] = {  # transformers 5.23 Gemma4TextConfig defaults (+ the __post_init__ kwargs)
    "vocab_size": 262144, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 30,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "rope_parameters": None,
    "attention_bias": False, "sliding_window": 512, "layer_types": None, "final_logit_softcapping": None,
    "use_bidirectional_attention": None, "vocab_size_per_layer_input": 262144, "hidden_size_per_layer_input": 256,
    "attention_k_eq_v": False, "num_kv_shared_layers": 0, "enable_moe_block": False, "use_double_wide_mlp": False,
    "num_experts": None, "top_k_experts": None, "moe_intermediate_size": None, "global_head_dim": 512,
    "num_global_key_value_heads": None,
}
DEFAULT_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6}}
TYPES = ("sliding_attention", "full_attention")
OVERRIDABLE = ("head_dim", "num_key_value_heads")


def text_config(cfg: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The defaults-filled text config and the architecture it came from."""
    return text_part(cfg, DEFAULTS, ARCH, CG_ARCH)


def _rope(p: dict[str, Any] | None, kind: str, arch: str) -> RopeSpec:
    if not isinstance(p, dict):
        raise ValueError(f"{arch} config.json: rope_parameters has no entry for {kind!r} layers")  # noqa: TRY004
    rtype = p.get("rope_type", "default")
    theta = float(p.get("rope_theta", 10000.0))
    if rtype == "default":  # transformers' Gemma 4 default rope rotates the whole head
        return RopeSpec(theta=theta)
    if rtype == "proportional":
        return RopeSpec(theta=theta, scaling="proportional", partial=float(p.get("partial_rotary_factor") or 1.0),
                        factor=float(p.get("factor", 1.0)))
    raise ValueError(f"{arch} config.json: rope_parameters[{kind!r}].rope_type={rtype!r} is not supported; "
                     "allowed: default, proportional")


def _overrides(c: dict[str, Any], types: list[str], arch: str) -> dict[int, dict[str, Any]]:
    """Per-layer head_dim / KV-head overrides, as Gemma4TextConfig.__post_init__ computes them."""
    n = len(types)
    plc = c.get("per_layer_config")
    if plc is None:
        over: dict[str, Any] = {"head_dim": c["global_head_dim"]}
        if c["attention_k_eq_v"] and c["num_global_key_value_heads"] is not None:
            over["num_key_value_heads"] = c["num_global_key_value_heads"]
        return {i: dict(over) for i, t in enumerate(types) if t == "full_attention"}
    out: dict[int, dict[str, Any]] = {}
    for key, val in plc.items():
        try:
            i = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"{arch} config.json: per_layer_config key {key!r} is not a layer index") from None
        if not 0 <= i < n:
            raise ValueError(f"{arch} config.json: per_layer_config names layer {i}; the model has {n} layers")
        bad = sorted(set(val) - set(OVERRIDABLE))
        if bad:
            raise ValueError(f"{arch} config.json: per_layer_config[{key!r}] overrides {bad}; supported: "
                             f"{', '.join(OVERRIDABLE)}")
        out[i] = dict(val)
    return out


def config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    c, arch = text_config(cfg)
    n = c["num_hidden_layers"]
    if c["use_bidirectional_attention"] == "all":
        raise ValueError(f"{arch} config.json: use_bidirectional_attention='all' (non-causal) is not supported")
    types = list(c["layer_types"] or ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n)])
    if len(types) != n:
        raise ValueError(f"{arch} config.json: layer_types has {len(types)} entries for num_hidden_layers={n}")
    bad = sorted({t for t in types if t not in TYPES})
    if bad:
        raise ValueError(f"{arch} config.json: layer_types {bad} not supported; allowed: {', '.join(TYPES)}")
    types[-1] = "full_attention"  # as Gemma4TextConfig.__post_init__ forces it
    shared = c["num_kv_shared_layers"] or 0
    if not isinstance(shared, int) or shared < 0 or shared >= n:
        raise ValueError(f"{arch} config.json: num_kv_shared_layers={shared!r} must be an integer in [0, "
                         f"num_hidden_layers={n}): at least one earlier layer must produce the K/V it shares")
    first_shared = n - shared
    act = c["hidden_activation"]
    if act not in ACTIVATIONS:
        raise ValueError(f"{arch} config.json: hidden_activation={act!r} is not supported; "
                         f"allowed: {', '.join(ACTIVATIONS)}")
    act = ACTIVATIONS[act]
    ropes = c["rope_parameters"] or DEFAULT_ROPE
    over = _overrides(c, types, arch)
    moe = None
    if c["enable_moe_block"]:
        for k in ("num_experts", "top_k_experts", "moe_intermediate_size"):
            if not c.get(k):
                raise ValueError(f"{arch} config.json: enable_moe_block needs {k!r}")
        moe = MoESpec(num_experts=c["num_experts"], top_k=c["top_k_experts"], expert_size=c["moe_intermediate_size"],
                      scoring="softmax", norm_topk=True, router_norm=True, expert_scale=True)
    bias = bool(c["attention_bias"])
    layers = []
    for i, t in enumerate(types):
        full = t == "full_attention"
        o = over.get(i, {})
        wide = 2 if c["use_double_wide_mlp"] and i >= first_shared else 1
        layers.append(LayerSpec(
            num_heads=c["num_attention_heads"], num_kv_heads=o.get("num_key_value_heads", c["num_key_value_heads"]),
            head_dim=o.get("head_dim", c["head_dim"]), intermediate_size=c["intermediate_size"] * wide,
            window=None if full else c["sliding_window"],
            gqa=GQASpec(qk_norm=True, v_norm=True, k_eq_v=bool(c["attention_k_eq_v"]) and full), qkv_bias=bias, o_bias=bias, attn_scale=1.0,
            rope=_rope(ropes.get(t), t, arch), activation=act, sandwich_norm=True, layer_scalar=True,
            mlp="dense+moe" if moe else "dense", moe=MoESpec(**vars(moe)) if moe else None))
    ple = c["hidden_size_per_layer_input"] or None
    base = ModelConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], layers=layers,
        max_positions=c["max_position_embeddings"], norm_eps=float(c["rms_norm_eps"]),
        tie_embeddings=bool(c["tie_word_embeddings"]), embed_scale=math.sqrt(c["hidden_size"]),
        final_logit_softcap=c["final_logit_softcapping"], ple_dim=ple,
        ple_vocab_size=c["vocab_size_per_layer_input"] if ple else None,
        name=c.get("model_type") or arch, source=f"config.json ({arch})")
    try:
        return share_last(base, shared)
    except ValueError as e:
        raise ValueError(f"{arch} config.json: num_kv_shared_layers={shared}: {e}") from None


# -- weights ----------------------------------------------------------------------------------------
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "post_attn_norm.weight",
    "pre_feedforward_layernorm.weight": "mlp_norm.weight", "post_feedforward_layernorm.weight": "post_mlp_norm.weight",
    "post_feedforward_layernorm_1.weight": "post_dense_norm.weight",
    "pre_feedforward_layernorm_2.weight": "moe_norm.weight",
    "post_feedforward_layernorm_2.weight": "post_moe_norm.weight", "layer_scalar": "layer_scalar",
    "self_attn.q_norm.weight": "attn.q_norm.weight", "self_attn.k_norm.weight": "attn.k_norm.weight",
    "per_layer_input_gate.weight": "ple.gate.weight", "per_layer_projection.weight": "ple.proj.weight",
    "post_per_layer_input_norm.weight": "ple.norm.weight", "router.proj.weight": "moe.router.weight",
    "router.scale": "moe.router_scale", "router.per_expert_scale": "moe.expert_scale",
    "experts.down_proj": "moe.experts.down_proj",
    **{f"self_attn.{p}.{s}": f"attn.{p}.{s}"
       for p in ("q_proj", "k_proj", "v_proj", "o_proj") for s in ("weight", "bias")},
    **{f"mlp.{p}.weight": f"mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")},
}
TOP_NAMES = {"embed_tokens.weight": "embed.weight", "embed_tokens_per_layer.weight": "ple.table.weight",
             "per_layer_model_projection.weight": "ple.proj.weight",
             "per_layer_projection_norm.weight": "ple.norm.weight", "norm.weight": "norm.weight"}
SHARED_SKIP = ("self_attn.k_proj.", "self_attn.v_proj.", "self_attn.k_norm.", "self_attn.v_norm.")
NAMES = {**{f"model.{k}": v for k, v in TOP_NAMES.items()}, "lm_head.weight": "lm_head.weight",
         **{f"model.layers.{{i}}.{k}": f"layers.{{i}}.{v}" for k, v in LAYER_NAMES.items()}}


def _map(hf_state: HFState, config: ModelConfig, prefix: str) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    skipped = 0
    for name in hf_state:
        if name == "lm_head.weight":
            out[name] = hf_state[name]
            continue
        if not name.startswith(prefix):
            if prefix != "model.":  # vision/audio towers, multimodal embedders
                skipped += 1
                continue
            out[name] = hf_state[name]  # unknown: the shape check names it
            continue
        rest = name[len(prefix):]
        if rest in TOP_NAMES:
            out[TOP_NAMES[rest]] = hf_state[name]
            continue
        key, idx = _template(rest)
        if key.startswith("layers.{i}."):
            sub = key[len("layers.{i}."):]
            i = int(idx)
            if 0 <= i < config.num_layers and config.layers[i].kv_source is not None and sub.startswith(SHARED_SKIP):
                continue  # a sharing layer computes no K/V (transformers ignores these too)
            if sub == "experts.gate_up_proj":  # [E, 2I, H]: gate rows first, then up
                gate, up = hf_state[name].chunk(2, dim=1)
                out[f"layers.{i}.moe.experts.gate_proj"] = gate.contiguous()
                out[f"layers.{i}.moe.experts.up_proj"] = up.contiguous()
                continue
            if sub in LAYER_NAMES:
                out[f"layers.{i}.{LAYER_NAMES[sub]}"] = hf_state[name]
                continue
        out[name] = hf_state[name]
    if skipped:
        msg = (f"kvlab: {CG_ARCH}: loading the text model only; skipped {skipped} vision/audio tensors "
               "(towers and multimodal embedders)")
        print(msg, file=sys.stderr)
    return drop_tied_head(out, config.tie_embeddings)


def map_weights(hf_state: HFState, config: ModelConfig) -> dict[str, Tensor]:
    return _map(hf_state, config, "model.")


def map_cg_weights(hf_state: HFState, config: ModelConfig) -> dict[str, Tensor]:
    return _map(hf_state, config, "model.language_model.")


def to_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """Gemma4TextConfig keys of ``cfg``'s shape: sandwich norms, KV sharing, PLE, per-type heads and RoPE."""
    acts = ACTIVATIONS
    layers = cfg.layers
    if not layers[0].sandwich_norm or any(x.rope is None for x in layers):
        raise ValueError(f"{ARCH}: {cfg.name} has no sandwich norms or a layer without RoPE")
    sliding = [x for x in layers if x.window is not None]
    full = [x for x in layers if x.window is None]
    ref = sliding[0] if sliding else layers[0]
    shared = len(layers)
    while shared > 0 and layers[shared - 1].kv_source is not None:
        shared -= 1
    base_mlp = layers[0].intermediate_size

    def rope(x: LayerSpec) -> dict[str, Any]:
        r = x.rope
        d: dict[str, Any] = {"rope_type": r.scaling, "rope_theta": r.theta}
        if r.scaling == "proportional":
            d["partial_rotary_factor"] = r.partial
            if r.factor != 1.0:
                d["factor"] = r.factor
        return d

    moe = next((x.moe for x in layers if x.moe is not None), None)
    d: dict[str, Any] = {
        "num_key_value_heads": ref.num_kv_heads, "head_dim": ref.head_dim, "intermediate_size": base_mlp,
        "hidden_activation": {v: k for k, v in reversed(list(acts.items()))}.get(ref.activation, ref.activation),
        "layer_types": [S if x.window is not None else F for x in layers],
        "sliding_window": sliding[0].window if sliding else 512,
        "per_layer_config": {str(i): {"head_dim": x.head_dim, "num_key_value_heads": x.num_kv_heads}
                             for i, x in enumerate(layers) if x.window is None},
        "num_kv_shared_layers": len(layers) - shared,
        "use_double_wide_mlp": any(x.intermediate_size == 2 * base_mlp for x in layers[shared:]),
        "hidden_size_per_layer_input": cfg.ple_dim or 0, "vocab_size_per_layer_input": cfg.ple_rows or cfg.vocab_size,
        "attention_k_eq_v": any(options_of(x).k_eq_v for x in layers), "final_logit_softcapping": cfg.final_logit_softcap,
        "rope_parameters": {**({S: rope(sliding[0])} if sliding else {}), **({F: rope(full[0])} if full else {})},
        "enable_moe_block": moe is not None,
    }
    if moe is not None:
        d.update(num_experts=moe.num_experts, top_k_experts=moe.top_k, moe_intermediate_size=moe.expert_size)
    return hf_config(cfg, ARCH, "gemma4_text", **d)


S, F = TYPES


FAMILY = Family(ARCH, config_from_hf, map_weights, NAMES, to_hf_config=to_hf_config)
CG_FAMILY = Family(CG_ARCH, config_from_hf, map_cg_weights,
                   {k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else k: v
                    for k, v in NAMES.items()})
