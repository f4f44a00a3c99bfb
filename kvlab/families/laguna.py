"""Laguna (``LagunaForCausalLM``, poolside): layer-wise attention budgets with a sigmoid-routed MoE.

Following transformers 5.23 ``modeling_laguna``:

- attention: every layer has its own query-head count (``num_attention_heads_per_layer``; default
  ``num_attention_heads`` everywhere) over ``num_key_value_heads`` shared KV heads of ``head_dim``;
  ``layer_types[i]`` is ``full_attention`` or ``sliding_attention`` (window ``sliding_window``);
  per-head RMSNorm on q and k before RoPE; ``attention_bias`` puts a bias on q, k, v and o.
- output gate: ``softplus(g_proj(x))`` with ``x`` the attention input (after the input norm),
  multiplying the attention output before ``o_proj``. ``gating`` true or ``"per-head"``: one gate per
  head (``g_proj`` ``[heads, hidden]``); anything else (``"per-element"``; transformers treats ``false``
  the same way): one per channel (``[heads * head_dim, hidden]``). The stored weight's shape must agree.
- RoPE per layer type from ``rope_parameters[layer_type]`` (default: full theta 5e5 on half the head,
  sliding theta 1e4 on the whole head); YaRN on the full layers in the published models. As in
  transformers, YaRN's ``truncate`` is always on for Laguna (it is read from the outer, per-type dict).
- MLP: ``mlp_layer_types[i]`` ``dense`` (SwiGLU ``intermediate_size``) or ``sparse`` (default: layer 0
  dense, the rest sparse): sigmoid router scores (fp32), ``e_score_correction_bias`` added for the
  choice only, the top-k weights renormalised to 1, the routed sum scaled by
  ``moe_routed_scaling_factor``, plus one always-on shared expert (``shared_expert_intermediate_size``).
"""

from __future__ import annotations

from typing import Any

from ..config import GQASpec, LayerSpec, ModelConfig, MoESpec, RopeSpec
from .base import (
    Family,
    HFState,
    Tensor,
    activation,
    drop_tied_head,
    hf_config,
    llama_names,
    rename,
    rope_dict,
    rope_from_hf,
    with_defaults,
)

ARCH = "LagunaForCausalLM"
DEFAULTS: dict[str, Any] = {  # transformers 5.23 LagunaConfig defaults
    "vocab_size": 100352, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 40,
    "num_attention_heads": 48, "num_key_value_heads": 8, "hidden_act": "silu", "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "rope_parameters": None, "sliding_window": 512,
    "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512, "num_experts_per_tok": 8,
    "num_experts": 256, "layer_types": None, "head_dim": 128, "attention_bias": False, "gating": True,
    "num_attention_heads_per_layer": None, "mlp_layer_types": None, "moe_routed_scaling_factor": 1.0,
    "moe_apply_router_weight_on_input": False, "moe_router_logit_softcapping": 0.0,
}
DEFAULT_ROPE = {  # LagunaConfig.__post_init__, used when rope_parameters is absent
    "full_attention": {"rope_type": "default", "rope_theta": 500000.0, "partial_rotary_factor": 0.5},
    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0},
}
LAYER_TYPES = ("full_attention", "sliding_attention")
MLP_TYPES = ("dense", "sparse")


def _per_layer_list(c: dict[str, Any], key: str, n: int, default: list[Any]) -> list[Any]:
    v = c.get(key)
    if v is None:
        return default
    if not isinstance(v, list) or len(v) != n:
        got = f"{len(v)} entries" if isinstance(v, list) else repr(v)
        raise ValueError(f"{ARCH} config.json: {key} has {got}; it needs one entry per layer "
                         f"(num_hidden_layers={n})")
    return v


def gate_per_head(gating: Any) -> bool:
    """transformers' rule: ``True`` or ``"per-head"`` is per head; every other value per element."""
    if gating is True or gating == "per-head":
        return True
    if gating is False or gating == "per-element":
        return False
    raise ValueError(f"{ARCH} config.json: gating={gating!r} is not supported; allowed: true, \"per-head\", "
                     "\"per-element\"")


def _rope(c: dict[str, Any], layer_type: str) -> RopeSpec:
    params = c.get("rope_parameters") or DEFAULT_ROPE
    if not all(isinstance(v, dict) or v is None for v in params.values()) or layer_type not in params:
        raise ValueError(f"{ARCH} config.json: rope_parameters must hold one dict per layer type "
                         f"({', '.join(sorted(set(c['layer_types'])))}); got keys {sorted(params)}")
    p = params[layer_type]
    if p is None:
        raise ValueError(f"{ARCH} config.json: rope_parameters[{layer_type!r}] is null; Laguna rotates every layer")
    flat = {"rope_parameters": dict(p), "max_position_embeddings": c["max_position_embeddings"],
            "rope_theta": c.get("rope_theta"), "partial_rotary_factor": c.get("partial_rotary_factor")}
    if flat["rope_theta"] is None and "rope_theta" not in p:
        raise ValueError(f"{ARCH} config.json: rope_parameters[{layer_type!r}] has no rope_theta")
    spec = rope_from_hf(flat, f"{ARCH} ({layer_type})")
    spec.truncate = True  # transformers reads `truncate` from the outer dict, which never has it
    return spec


def config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    c = with_defaults(cfg, DEFAULTS)
    n = c["num_hidden_layers"]
    if c.get("moe_apply_router_weight_on_input"):
        raise ValueError(f"{ARCH} config.json: moe_apply_router_weight_on_input=true is not supported "
                         "(transformers 5.23 does not support it either)")
    if c.get("moe_router_logit_softcapping"):
        raise ValueError(f"{ARCH} config.json: moe_router_logit_softcapping="
                         f"{c['moe_router_logit_softcapping']!r} is not supported (only 0.0, no softcap)")
    types = _per_layer_list(c, "layer_types", n, ["full_attention"] * n)
    bad = sorted({str(t) for t in types if t not in LAYER_TYPES})
    if bad:
        raise ValueError(f"{ARCH} config.json: layer_types {bad} not supported; allowed: {', '.join(LAYER_TYPES)}")
    mlps = _per_layer_list(c, "mlp_layer_types", n, ["dense"] + ["sparse"] * (n - 1))
    bad = sorted({str(t) for t in mlps if t not in MLP_TYPES})
    if bad:
        raise ValueError(f"{ARCH} config.json: mlp_layer_types {bad} not supported; allowed: {', '.join(MLP_TYPES)}")
    heads = _per_layer_list(c, "num_attention_heads_per_layer", n, [c["num_attention_heads"]] * n)
    kv = c["num_key_value_heads"]
    for i, h in enumerate(heads):
        if not isinstance(h, int) or isinstance(h, bool) or h < 1:
            raise ValueError(f"{ARCH} config.json: num_attention_heads_per_layer[{i}]={h!r} must be a positive "
                             "integer")
        if h % kv:
            raise ValueError(f"{ARCH} config.json: num_attention_heads_per_layer[{i}]={h} is not a multiple of "
                             f"num_key_value_heads={kv}: every layer's query heads must share the KV heads evenly")
    window = c.get("sliding_window")
    if "sliding_attention" in types and not window:
        raise ValueError(f"{ARCH} config.json: layer_types has sliding_attention layers but sliding_window is "
                         f"{window!r}")
    c["layer_types"] = types
    ropes = {t: _rope(c, t) for t in sorted(set(types))}
    per_head = gate_per_head(c.get("gating", True))
    hd = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    bias = bool(c["attention_bias"])
    act = activation(c, ARCH)
    shared = c["shared_expert_intermediate_size"] or 0
    layers = []
    for i in range(n):
        moe = None
        if mlps[i] == "sparse":
            moe = MoESpec(num_experts=c["num_experts"], top_k=c["num_experts_per_tok"],
                          expert_size=c["moe_intermediate_size"], scoring="sigmoid", norm_topk=True,
                          bias_correction=True, routed_scaling=float(c["moe_routed_scaling_factor"]),
                          shared_experts=1 if shared else 0, shared_size=shared or None)
        rope = ropes[types[i]]
        layers.append(LayerSpec(
            num_heads=heads[i], num_kv_heads=kv, head_dim=hd,
            window=int(window) if types[i] == "sliding_attention" else None, gqa=GQASpec(qk_norm=True), qkv_bias=bias,
            o_bias=bias, output_gate="softplus", gate_per_head=per_head,
            rope=RopeSpec(**vars(rope)), activation=act, mlp="moe" if moe else "dense",
            intermediate_size=0 if moe else c["intermediate_size"], moe=moe))
    try:
        return ModelConfig(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], layers=layers,
                           max_positions=c["max_position_embeddings"], norm_eps=float(c["rms_norm_eps"]),
                           tie_embeddings=bool(c.get("tie_word_embeddings", False)), name=c.get("model_type") or ARCH,
                           source=f"config.json ({ARCH})")
    except ValueError as e:
        raise ValueError(f"{ARCH} config.json: {e}") from e


NAMES = {
    **llama_names(qk_norm=True, moe=True),
    "model.layers.{i}.self_attn.g_proj.weight": "layers.{i}.attn.g_proj.weight",
    "model.layers.{i}.mlp.experts.e_score_correction_bias": "layers.{i}.mlp.router_bias",  # on disk
    "model.layers.{i}.mlp.gate.e_score_correction_bias": "layers.{i}.mlp.router_bias",  # transformers' module
}
for _p in ("gate_proj", "up_proj", "down_proj"):  # on disk `shared_expert`; transformers' module `shared_experts`
    NAMES[f"model.layers.{{i}}.mlp.shared_experts.{_p}.weight"] = f"layers.{{i}}.mlp.shared.{_p}.weight"


def check_gates(state: dict[str, Tensor], config: ModelConfig) -> None:
    """The stored ``g_proj`` shape tells per-head from per-element gating; it must agree with the config."""
    for i, spec in enumerate(config.layers):
        w = state.get(f"layers.{i}.attn.g_proj.weight")
        if w is None or not spec.output_gate:
            continue
        rows = w.shape[0]
        per_head, per_elem = spec.num_heads, spec.num_heads * spec.value_dim
        want = per_head if spec.gate_per_head else per_elem
        if rows == want:
            continue
        said = "per-head" if spec.gate_per_head else "per-element"
        if rows in (per_head, per_elem):
            shows = "per-head" if rows == per_head else "per-element"
            raise ValueError(f"{ARCH}: model.layers.{i}.self_attn.g_proj.weight has {rows} rows, a {shows} gate "
                             f"({spec.num_heads} heads{'' if rows == per_head else f' x {spec.value_dim}'}), "
                             f"but config.json's gating says {said} ({want} rows); fix 'gating' in config.json")
        raise ValueError(f"{ARCH}: model.layers.{i}.self_attn.g_proj.weight has {rows} rows; layer {i} has "
                         f"{spec.num_heads} heads of dim {spec.value_dim}, so a gate needs {per_head} (per-head) or "
                         f"{per_elem} (per-element) rows; check num_attention_heads_per_layer[{i}]")


def map_weights(hf_state: HFState, config: ModelConfig) -> dict[str, Tensor]:
    state = drop_tied_head(rename(hf_state, NAMES), config.tie_embeddings)
    check_gates(state, config)
    return state


def to_hf_config(config: ModelConfig) -> dict[str, Any]:
    """LagunaConfig keys of ``config``'s shape: per-layer heads, per-type RoPE, softplus output gates."""
    layers = config.layers
    if layers[0].output_gate != "softplus":
        raise ValueError(f"{ARCH}: {config.name} has no softplus output gate")
    types = ["sliding_attention" if x.window is not None else "full_attention" for x in layers]
    windows = sorted({x.window for x in layers if x.window is not None})
    moe = next((x.moe for x in layers if x.moe is not None), None)
    ropes = {}
    for t, x in zip(types, layers):
        if t not in ropes and x.rope is not None:
            ropes[t] = {k: v for k, v in rope_dict(x.rope).items() if v is not None and k != "truncate"}
    d: dict[str, Any] = {
        "num_attention_heads_per_layer": [x.num_heads for x in layers], "layer_types": types,
        "sliding_window": windows[0] if windows else DEFAULTS["sliding_window"],
        "mlp_layer_types": ["sparse" if x.moe is not None else "dense" for x in layers],
        "gating": "per-head" if layers[0].gate_per_head else "per-element", "rope_parameters": ropes,
        "attention_bias": layers[0].qkv_bias, "intermediate_size": max([x.intermediate_size for x in layers] + [1]),
    }
    if moe is not None:
        d.update(num_experts=moe.num_experts, num_experts_per_tok=moe.top_k, moe_intermediate_size=moe.expert_size,
                 shared_expert_intermediate_size=moe.shared_width, moe_routed_scaling_factor=moe.routed_scaling)
    return hf_config(config, ARCH, "laguna", **d)


FAMILY = Family(ARCH, config_from_hf, map_weights, NAMES, to_hf_config=to_hf_config)
