"""Gemma 3 text models: ``Gemma3ForCausalLM`` and the text part of ``Gemma3ForConditionalGeneration``.

transformers 5.23 ``Gemma3TextModel``, layer by layer (Gemma Team, "Gemma 3 Technical Report", arXiv 2503.19786):
- sandwich RMSNorms applied as ``1 + w`` (kvlab ``norm_offset``): input, post-attention, pre- and post-feedforward;
  embeddings times ``sqrt(hidden)``; tied head; GeGLU MLP (``gelu_pytorch_tanh``);
- attention with RMSNorm (``1 + w``) on q and k before RoPE and scaling ``query_pre_attn_scalar ** -0.5``;
- sliding layers (``sliding_window``) and global layers, by ``layer_types`` (default: every
  ``sliding_window_pattern``-th layer global, 5:1), each type with its own RoPE: ``rope_parameters`` per layer
  type (transformers 5) or the older ``rope_theta`` (global), ``rope_local_base_freq`` (sliding) and
  ``rope_scaling`` (global only, e.g. linear x8 on 4B/12B/27B);
- final logit soft-cap when ``final_logit_softcapping`` is set.
Not supported (named errors): ``attn_logit_softcapping`` (Gemma 2's attention soft-cap; null in every published
Gemma 3 config) and ``use_bidirectional_attention``.
``Gemma3ForConditionalGeneration`` keeps the text model under ``language_model.model`` (``model.language_model`` in
transformers 5's module tree); its vision tower and
multimodal projector are skipped with a one-line notice. (transformers 5.23 applies ``final_logit_softcapping`` in
``Gemma3ForCausalLM`` only; kvlab applies it for both, as the config says. Every published Gemma 3 config has none.)
"""

from __future__ import annotations

import math
import sys
from typing import Any

from ..config import GQASpec, LayerSpec, ModelConfig, RopeSpec
from ..kinds.gqa import options_of
from .base import (
    ACTIVATIONS,
    Family,
    HFState,
    Tensor,
    _template,
    drop_tied_head,
    hf_config,
    rope_from_hf,
    single_window,
    text_part,
)

ARCH = "Gemma3ForCausalLM"
CG_ARCH = "Gemma3ForConditionalGeneration"
DEFAULTS: dict[str, Any] = {  # transformers 5.23 Gemma3TextConfig defaults, used when config.json omits a key
    "vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "rope_parameters": None,
    "attention_bias": False, "query_pre_attn_scalar": 256, "sliding_window": 4096, "layer_types": None,
    "final_logit_softcapping": None, "attn_logit_softcapping": None, "use_bidirectional_attention": False,
}
THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}  # Gemma3TextConfig.default_theta
TYPES = ("sliding_attention", "full_attention")


def text_config(cfg: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The defaults-filled text config and the architecture it came from."""
    return text_part(cfg, DEFAULTS, ARCH, CG_ARCH)


def rope_parameters(c: dict[str, Any], arch: str) -> dict[str, dict[str, Any]]:
    """Per-layer-type RoPE parameters, as Gemma3TextConfig.convert_rope_params_to_dict builds them."""
    given = c.get("rope_parameters")
    if isinstance(given, dict) and given and not all(isinstance(v, dict) for v in given.values()):
        given = {"full_attention": dict(given)}  # one flat dict: the global layers' parameters
    params = {k: dict(v) for k, v in (given or {}).items()}
    bad = sorted(set(params) - set(TYPES))
    if bad:
        raise ValueError(f"{arch} config.json: rope_parameters has entries {bad}; allowed: {', '.join(TYPES)}")
    full = params.setdefault("full_attention", {"rope_type": "default"})
    if c.get("rope_scaling"):
        full.update(c["rope_scaling"])
    full.setdefault("rope_theta", c.get("rope_theta", THETA["full_attention"]))
    local = params.setdefault("sliding_attention", {"rope_type": "default"})
    local.setdefault("rope_theta", c.get("rope_local_base_freq", THETA["sliding_attention"]))
    return params


def _rope(p: dict[str, Any], kind: str, c: dict[str, Any], arch: str) -> RopeSpec:
    try:
        return rope_from_hf({"rope_parameters": p, "max_position_embeddings": c["max_position_embeddings"]},
                            f"{arch} ({kind} layers)", partial=False)
    except ValueError as e:
        raise ValueError(f"{e} (rope_parameters[{kind!r}])") from None


def layer_types(c: dict[str, Any], arch: str) -> list[str]:
    n = c["num_hidden_layers"]
    period = c.get("sliding_window_pattern", c.get("_sliding_window_pattern", 6))
    types = c["layer_types"]
    if types is None:
        if not isinstance(period, int) or period < 1:
            raise ValueError(f"{arch} config.json: sliding_window_pattern={period!r} must be a positive integer")
        types = ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(n)]
    types = list(types)
    if len(types) != n:
        raise ValueError(f"{arch} config.json: layer_types has {len(types)} entries for num_hidden_layers={n}")
    bad = sorted({t for t in types if t not in TYPES})
    if bad:
        raise ValueError(f"{arch} config.json: layer_types {bad} not supported; allowed: {', '.join(TYPES)}")
    return types


def config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    c, arch = text_config(cfg)
    for key in ("attn_logit_softcapping", "use_bidirectional_attention"):
        if c.get(key):
            raise ValueError(f"{arch} config.json: {key}={c[key]!r} is not supported (kvlab runs causal attention "
                             "without an attention soft-cap); allowed: null / false")
    act = c["hidden_activation"]
    if act not in ACTIVATIONS:
        raise ValueError(f"{arch} config.json: hidden_activation={act!r} is not supported; "
                         f"allowed: {', '.join(ACTIVATIONS)}")
    qpas = c["query_pre_attn_scalar"]
    if not (isinstance(qpas, (int, float)) and qpas > 0):
        raise ValueError(f"{arch} config.json: query_pre_attn_scalar={qpas!r} must be a positive number")
    types = layer_types(c, arch)
    params = rope_parameters(c, arch)
    ropes = {t: _rope(params[t], t, c, arch) for t in TYPES}
    bias = bool(c["attention_bias"])
    layers = [LayerSpec(
        num_heads=c["num_attention_heads"], num_kv_heads=c["num_key_value_heads"] or c["num_attention_heads"],
        head_dim=c["head_dim"], intermediate_size=c["intermediate_size"],
        window=c["sliding_window"] if t == "sliding_attention" else None, gqa=GQASpec(qk_norm=True), qkv_bias=bias, o_bias=bias,
        attn_scale=float(qpas) ** -0.5, rope=RopeSpec(**vars(ropes[t])), activation=ACTIVATIONS[act],
        sandwich_norm=True) for t in types]
    return ModelConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], layers=layers,
        max_positions=c["max_position_embeddings"], norm_eps=float(c["rms_norm_eps"]), norm_offset=True,
        tie_embeddings=bool(c["tie_word_embeddings"]), embed_scale=math.sqrt(c["hidden_size"]),
        final_logit_softcap=c["final_logit_softcapping"], name=c.get("model_type") or arch,
        source=f"config.json ({arch})")


# -- weights ----------------------------------------------------------------------------------------
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "post_attn_norm.weight",
    "pre_feedforward_layernorm.weight": "mlp_norm.weight", "post_feedforward_layernorm.weight": "post_mlp_norm.weight",
    "self_attn.q_norm.weight": "attn.q_norm.weight", "self_attn.k_norm.weight": "attn.k_norm.weight",
    **{f"self_attn.{p}.{s}": f"attn.{p}.{s}" for p in ("q_proj", "k_proj", "v_proj", "o_proj") for s in ("weight", "bias")},
    **{f"mlp.{p}.weight": f"mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")},
}
TOP_NAMES = {"embed_tokens.weight": "embed.weight", "norm.weight": "norm.weight"}
NAMES = {**{f"model.{k}": v for k, v in TOP_NAMES.items()}, "lm_head.weight": "lm_head.weight",
         **{f"model.layers.{{i}}.{k}": f"layers.{{i}}.{v}" for k, v in LAYER_NAMES.items()}}


def _map(hf_state: HFState, config: ModelConfig, prefixes: tuple[str, ...]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    skipped = 0
    for name in hf_state:
        rest = next((name[len(p):] for p in prefixes if name.startswith(p)), None)
        if name in ("lm_head.weight", "language_model.lm_head.weight"):
            out["lm_head.weight"] = hf_state[name]
        elif rest is None:
            if prefixes == ("model.",):
                out[name] = hf_state[name]  # unknown: the shape check names it
            else:
                skipped += 1  # vision tower, multimodal projector
        elif rest in TOP_NAMES:
            out[TOP_NAMES[rest]] = hf_state[name]
        else:
            key, idx = _template(rest)
            sub = key[len("layers.{i}."):] if key.startswith("layers.{i}.") else None
            out[f"layers.{idx}.{LAYER_NAMES[sub]}" if sub in LAYER_NAMES else name] = hf_state[name]
    if skipped:
        print(f"kvlab: {CG_ARCH}: loading the text model only; skipped {skipped} vision tensors "
              "(tower and multimodal projector)", file=sys.stderr)
    return drop_tied_head(out, config.tie_embeddings)


def map_weights(hf_state: HFState, config: ModelConfig) -> dict[str, Tensor]:
    return _map(hf_state, config, ("model.",))


def map_cg_weights(hf_state: HFState, config: ModelConfig) -> dict[str, Tensor]:
    # transformers 5 names (model.language_model.*) and the published / saved layout (language_model.model.*)
    return _map(hf_state, config, ("model.language_model.", "language_model.model."))


def to_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """Gemma3TextConfig keys of ``cfg``'s shape (``1 + w`` sandwich and q/k norms, one window, per-type RoPE)."""
    layers = cfg.layers
    ok = cfg.norm_offset and all(x.sandwich_norm and options_of(x).qk_norm and x.rope is not None for x in layers)
    if not ok or cfg.embed_scale is None or len({(x.num_kv_heads, x.head_dim, x.attn_scale) for x in layers}) != 1:
        raise ValueError(f"{ARCH}: {cfg.name} is not Gemma 3 shaped (1 + w sandwich and q/k norms, RoPE everywhere, "
                         "one head layout and query scale)")
    x = layers[0]
    qpas = round(1.0 / x.scale ** 2, 6)

    def rope(t: str) -> dict[str, Any]:
        r = next((y.rope for y, k in zip(layers, types) if k == t), None)
        if r is None:
            return {"rope_type": "default", "rope_theta": THETA[t]}
        return {"rope_type": r.scaling, "rope_theta": r.theta, **({"factor": r.factor} if r.scaling != "default"
                                                                  else {})}

    types = ["sliding_attention" if y.window is not None else "full_attention" for y in layers]
    return hf_config(cfg, ARCH, "gemma3_text", hidden_activation=hf_config(cfg, ARCH, "")["hidden_act"],
                     layer_types=types, sliding_window=single_window(cfg, ARCH) or 4096,
                     query_pre_attn_scalar=int(qpas) if qpas == int(qpas) else qpas,
                     final_logit_softcapping=cfg.final_logit_softcap,
                     rope_parameters={t: rope(t) for t in TYPES})


FAMILY = Family(ARCH, config_from_hf, map_weights, NAMES, to_hf_config=to_hf_config)
CG_FAMILY = Family(CG_ARCH, config_from_hf, map_cg_weights,
                   {k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else k: v
                    for k, v in NAMES.items()})
