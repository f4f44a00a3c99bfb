"""DeepSeek V3 (``DeepseekV3ForCausalLM``): multi-head latent attention and a group-routed sigmoid MoE.

Following transformers 5.23 ``modeling_deepseek_v3``:

- attention: MLA on every layer (kvlab/layers/mla.py): ``q_lora_rank`` (null: one ``q_proj``), ``kv_lora_rank``,
  ``qk_nope_head_dim``, ``qk_rope_head_dim``, ``v_head_dim``; ``rope_interleave`` (default true);
  ``attention_bias`` puts a bias on ``q_a_proj``, ``kv_a_proj_with_mqa`` and ``o_proj``. ``num_key_value_heads``
  plays no part (the latent is shared by every head). RoPE over ``qk_rope_head_dim`` channels from
  ``rope_parameters`` / ``rope_scaling`` (YaRN in the published models); the softmax scale takes YaRN's
  ``mscale_all_dim`` factor squared.
- MLP: layers ``< first_k_dense_replace`` a dense SwiGLU (``intermediate_size``); the rest MoE: sigmoid scores in
  fp32, ``e_score_correction_bias`` added for the choice only, group-limited to the ``topk_group`` best of
  ``n_group`` groups (a group scores the sum of its two best), top ``num_experts_per_tok`` of ``n_routed_experts``
  (width ``moe_intermediate_size``), weights renormalised when ``norm_topk_prob``, times
  ``routed_scaling_factor``, plus ``n_shared_experts`` always-on experts as one MLP of ``n_shared_experts x
  moe_intermediate_size``.
- checkpoints: the multi-token-prediction layers published after the last decoder layer (``model.layers.61.*`` in
  DeepSeek-V3) are dropped, as transformers ignores them. FP8 checkpoints (``quantization_config.quant_method ==
  "fp8"``, ``weight_scale_inv`` per 128 x 128 block) are dequantised block-wise on load.
"""

from __future__ import annotations

import math
import re
from typing import Any

from ..config import ModelConfig, MoESpec, RopeSpec
from ..specs import mla_layer
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

ARCH = "DeepseekV3ForCausalLM"
DEFAULTS: dict[str, Any] = {  # transformers 5.23 DeepseekV3Config defaults
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "num_attention_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
    "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8,
    "first_k_dense_replace": 3, "norm_topk_prob": True, "hidden_act": "silu", "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "rope_interleave": True, "attention_bias": False,
}
FP8_BLOCK = (128, 128)


def _fp8_block(cfg: dict[str, Any], arch: str = ARCH) -> None:
    q = cfg.get("quantization_config")
    if not q:
        return
    method = q.get("quant_method")
    if method != "fp8":
        raise ValueError(f"{arch} config.json: quantization_config.quant_method={method!r} is not supported; kvlab "
                         "reads unquantised weights or DeepSeek's block-wise fp8 (quant_method 'fp8')")
    block = q.get("weight_block_size")
    if block is not None and list(block) != list(FP8_BLOCK):
        raise ValueError(f"{arch} config.json: fp8 weight_block_size={block!r} is not supported; kvlab dequantises "
                         f"DeepSeek's {list(FP8_BLOCK)} blocks")


def config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    return build_config(with_defaults(cfg, DEFAULTS), ARCH)


def build_config(c: dict[str, Any], arch: str, dense: list[bool] | None = None,
                 index: dict[str, int] | None = None) -> ModelConfig:
    """The ModelConfig of a V3-shaped ``config.json`` ``c`` (defaults filled in). ``dense[i]``: layer i has a dense
    MLP (default: ``i < first_k_dense_replace``); ``index``: the DSA indexer's MLASpec fields (V3.2)."""
    _fp8_block(c, arch)
    n = c["num_hidden_layers"]
    k_dense = c.get("first_k_dense_replace") or 0
    dense = dense if dense is not None else [i < k_dense for i in range(n)]
    rope = rope_from_hf(c, arch, partial=False)
    experts = c["n_routed_experts"]
    shared = c.get("n_shared_experts") or 0
    act = activation(c, arch)
    bias = bool(c.get("attention_bias", False))
    layers = []
    for i in range(n):
        moe = None
        if not dense[i]:
            moe = MoESpec(num_experts=experts, top_k=c["num_experts_per_tok"], expert_size=c["moe_intermediate_size"],
                          scoring="sigmoid", norm_topk=bool(c["norm_topk_prob"]), bias_correction=True,
                          routed_scaling=float(c["routed_scaling_factor"]), shared_experts=1 if shared else 0,
                          shared_size=shared * c["moe_intermediate_size"] if shared else None,
                          n_group=c.get("n_group") or 1, topk_group=c.get("topk_group"))
        layers.append(mla_layer(
            c["num_attention_heads"], c["kv_lora_rank"], c["qk_nope_head_dim"], c["qk_rope_head_dim"],
            c["v_head_dim"], q_lora_rank=c.get("q_lora_rank"), rope=RopeSpec(**vars(rope)),
            rope_interleave=bool(c.get("rope_interleave", True)), qkv_bias=bias, o_bias=bias, activation=act,
            mlp="moe" if moe else "dense", intermediate_size=0 if moe else c["intermediate_size"], moe=moe,
            **(index or {})))
    try:
        return ModelConfig(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], layers=layers,
                           max_positions=c["max_position_embeddings"], norm_eps=float(c["rms_norm_eps"]),
                           tie_embeddings=bool(c.get("tie_word_embeddings", False)),
                           name=c.get("model_type") or arch, source=f"config.json ({arch})")
    except ValueError as e:
        raise ValueError(f"{arch} config.json: {e}") from e


NAMES = {
    **llama_names(moe=True),
    "model.layers.{i}.mlp.gate.e_score_correction_bias": "layers.{i}.mlp.router_bias",
}
for _p in ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"):
    for _s in ("weight", "bias"):
        NAMES[f"model.layers.{{i}}.self_attn.{_p}.{_s}"] = f"layers.{{i}}.attn.{_p}.{_s}"
for _p in ("q_a_layernorm", "kv_a_layernorm"):
    NAMES[f"model.layers.{{i}}.self_attn.{_p}.weight"] = f"layers.{{i}}.attn.{_p}.weight"
for _p in ("gate_proj", "up_proj", "down_proj"):
    NAMES[f"model.layers.{{i}}.mlp.shared_experts.{_p}.weight"] = f"layers.{{i}}.mlp.shared.{_p}.weight"

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_SCALE = ".weight_scale_inv"


def dequantise_fp8(weight: Tensor, scale_inv: Tensor, name: str = "weight") -> Tensor:
    """DeepSeek block-wise fp8: ``weight [R, C]`` times ``scale_inv [ceil(R/128), ceil(C/128)]`` per 128 x 128 block."""
    (br, bc), (r, c) = FP8_BLOCK, weight.shape
    want = (math.ceil(r / br), math.ceil(c / bc))
    if weight.dim() != 2 or tuple(scale_inv.shape) != want:
        raise ValueError(f"{name}: fp8 block scales of shape {list(scale_inv.shape)} do not fit a weight of shape "
                         f"{list(weight.shape)} in {br} x {bc} blocks (expected {list(want)})")
    s = scale_inv.float().repeat_interleave(br, 0)[:r].repeat_interleave(bc, 1)[:, :c]
    out_dtype = weight.dtype if weight.dtype.itemsize > 1 else s.dtype  # fp8 -> fp32
    return (weight.float() * s).to(out_dtype)


def map_weights(hf_state: HFState, config: ModelConfig, names: dict[str, str] | None = None) -> dict[str, Tensor]:
    n = config.num_layers
    keys = [k for k in hf_state if not ((m := _LAYER.match(k)) and int(m.group(1)) >= n)]  # MTP layers
    scales = {k[:-len(_SCALE)] + ".weight": k for k in keys if k.endswith(_SCALE)}
    kept: dict[str, Tensor] = {}
    for k in keys:
        if k.endswith(_SCALE):
            if k[:-len(_SCALE)] + ".weight" not in hf_state:
                kept[k] = hf_state[k]  # a scale without its weight: the shape check names it
            continue
        kept[k] = dequantise_fp8(hf_state[k], hf_state[scales[k]], k) if k in scales else hf_state[k]
    return drop_tied_head(rename(kept, NAMES if names is None else names), config.tie_embeddings)


def keep_fp32(name: str) -> bool:
    """transformers keeps the routers' correction biases in fp32 in a bf16 / fp16 model (``_keep_in_fp32_modules_strict``)."""
    return "e_score_correction_bias" in name


def to_hf_config(config: ModelConfig) -> dict[str, Any]:
    """DeepseekV3Config keys of ``config``'s shape: dense MLA, group-routed MoE after ``first_k_dense_replace``."""
    layers = config.layers
    x, m = layers[0], layers[0].mla
    if x.attention != "mla" or m is None or m.sparse:
        raise ValueError(f"{ARCH}: {config.name} has no dense MLA attention")
    moe = next((y.moe for y in layers if y.moe is not None), None)
    rope = {k: v for k, v in rope_dict(x.rope).items() if v is not None and k != "partial_rotary_factor"}
    d: dict[str, Any] = {
        "q_lora_rank": m.q_lora_rank, "kv_lora_rank": m.kv_lora_rank, "qk_nope_head_dim": m.qk_nope_head_dim,
        "qk_rope_head_dim": m.qk_rope_head_dim, "v_head_dim": m.v_head_dim, "rope_interleave": m.rope_interleave,
        "first_k_dense_replace": next((i for i, y in enumerate(layers) if y.moe is not None), len(layers)),
        "num_key_value_heads": x.num_heads,  # transformers repeats per-head K/V by heads / kv heads: keep it 1
        "head_dim": m.qk_rope_head_dim, "rope_parameters": rope, "attention_bias": x.qkv_bias,
    }
    if moe is not None:
        d.update(n_routed_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
                 moe_intermediate_size=moe.expert_size, n_shared_experts=moe.shared_width // moe.expert_size,
                 n_group=moe.n_group, topk_group=moe.topk_group, norm_topk_prob=moe.norm_topk,
                 routed_scaling_factor=moe.routed_scaling)
    return hf_config(config, ARCH, "deepseek_v3", **d)


FAMILY = Family(ARCH, config_from_hf, map_weights, NAMES, keep_fp32, to_hf_config=to_hf_config)
