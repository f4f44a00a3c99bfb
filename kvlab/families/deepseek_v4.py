"""DeepSeek V4 (``DeepseekV4ForCausalLM``): mHC residual streams, CSA / HCA / sliding attention, hash-routed MoE.

Following transformers 5.23 ``modeling_deepseek_v4`` (and its ``conversion_mapping`` for DeepSeek's own names):

- residual: ``hc_mult`` streams mixed by manifold-constrained hyper-connections (kvlab/layers/mhc.py) around the
  attention and the MoE of every block; ``hc_head`` collapses them before the final norm.
- attention per ``layer_types[i]``: ``sliding_attention`` -> kvlab ``swa`` (window branch only, the "main" RoPE,
  ``rope_theta``), ``compressed_sparse_attention`` -> ``csa`` (ratio ``compress_rates[csa]``, lightning indexer,
  top-``index_topk``), ``heavily_compressed_attention`` -> ``hca``; CSA/HCA use the "compress" RoPE
  (``compress_rope_theta``, YaRN with ``attention_factor`` 1 when configured). Every layer: one shared K = V head
  of ``head_dim`` (RoPE on its trailing ``head_dim * partial_rotary_factor`` channels, interleaved pairs), low-rank
  queries (``q_lora_rank``), a per-head sink, window ``sliding_window``, grouped output projection
  (``o_groups`` x ``o_lora_rank``). kvlab's CSA is causal (each query ranks the blocks complete at its position).
- MLP: every layer is an MoE of ``n_routed_experts`` x ``moe_intermediate_size``, top ``num_experts_per_tok``, scores
  ``scoring_func`` (``sqrtsoftplus``), weights always renormalised and scaled by ``routed_scaling_factor``, plus one
  shared expert of ``moe_intermediate_size``; SwiGLU pre-activations clipped at ``swiglu_limit`` (routed and
  shared). ``mlp_layer_types[i]`` ``hash_moe``: the experts are ``tid2eid[token id]``; ``moe``: top-k of the scores
  plus ``e_score_correction_bias``.

Weights: the transformers layout (``model.layers.{i}.self_attn.q_a_proj.weight`` ...) or DeepSeek's own
(``layers.{i}.attn.wq_a.weight`` ...). The multi-token-prediction head (``mtp.*``) is skipped with a notice. FP8
weights with block scales (``weight_scale_inv`` / ``scale`` companions) are dequantised on load; FP4-packed experts
are refused with a message naming the format.
"""

from __future__ import annotations

import functools
import re
import sys
from typing import Any

from ..config import CompressSpec, LayerSpec, ModelConfig, MoESpec, RopeSpec
from .base import Family, HFState, Tensor, activation, hf_config, rename, rope_dict, rope_from_hf, with_defaults
from .deepseek_v3 import dequantise_fp8

ARCH = "DeepseekV4ForCausalLM"
DEFAULTS: dict[str, Any] = {  # transformers 5.23 DeepseekV4Config defaults (V4-Flash-Base shaped)
    "vocab_size": 129280, "hidden_size": 4096, "moe_intermediate_size": 2048, "num_hidden_layers": 43,
    "num_attention_heads": 64, "num_key_value_heads": 1, "head_dim": 512, "q_lora_rank": 1024,
    "num_experts_per_tok": 6, "n_routed_experts": 256, "n_shared_experts": 1, "scoring_func": "sqrtsoftplus",
    "routed_scaling_factor": 1.5, "max_position_embeddings": 1048576, "rope_theta": 10000.0,
    "compress_rope_theta": 160000.0, "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "swiglu_limit": 10.0,
    "sliding_window": 128, "o_groups": 8, "o_lora_rank": 1024, "index_n_heads": 64, "index_head_dim": 128,
    "index_topk": 512, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "hidden_act": "silu",
    "attention_bias": False, "mlp_bias": False,
}
LAYER_KINDS = {"sliding_attention": "swa", "compressed_sparse_attention": "csa",
               "heavily_compressed_attention": "hca"}
RATIO_TO_TYPE = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}
DEFAULT_RATES = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
SCORINGS = ("sqrtsoftplus", "softmax", "sigmoid")
MLP_TYPES = ("hash_moe", "moe")


def _fail(msg: str) -> ValueError:
    return ValueError(f"{ARCH} config.json: {msg}")


def _per_layer(types: list[Any], n: int, key: str, allowed: Any) -> list[str]:
    """``types`` cut to ``n`` layers (configs may carry an MTP entry), checked against ``allowed``."""
    types = list(types[:n])
    if len(types) != n:
        raise _fail(f"{key} has {len(types)} entries; it needs one per layer (num_hidden_layers={n})")
    bad = sorted({str(t) for t in types if t not in allowed})
    if bad:
        raise _fail(f"{key} {bad} not supported; allowed: {', '.join(allowed)}")
    return types


def layer_types(c: dict[str, Any]) -> list[str]:
    """``layer_types``, else the legacy ``compress_ratios`` (0 / 4 / 128), else V4-Pro's default schedule."""
    n = c["num_hidden_layers"]
    types = c.get("layer_types")
    if types is None and c.get("compress_ratios") is not None:
        ratios = c["compress_ratios"]
        bad = sorted({r for r in ratios if r not in RATIO_TO_TYPE})
        if bad:
            raise _fail(f"compress_ratios {bad} not supported; allowed: {sorted(RATIO_TO_TYPE)}")
        types = [RATIO_TO_TYPE[r] for r in ratios]
    if types is None:
        types = ["heavily_compressed_attention"] * min(n, 2) + [
            "compressed_sparse_attention" if i % 2 else "heavily_compressed_attention" for i in range(max(n - 2, 0))]
    return _per_layer(types, n, "layer_types", LAYER_KINDS)


def mlp_types(c: dict[str, Any]) -> list[str]:
    n = c["num_hidden_layers"]
    types = c.get("mlp_layer_types")
    if types is None:
        h = c.get("num_hash_layers", 3)
        types = ["hash_moe"] * min(n, h) + ["moe"] * max(0, n - h)
    return _per_layer(types, n, "mlp_layer_types", MLP_TYPES)


def ropes(c: dict[str, Any], partial: float) -> tuple[RopeSpec, RopeSpec]:
    """(main, compress) RoPE: nested ``rope_parameters`` {main, compress}, or flat YaRN keys for the compress one."""
    rp = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    if isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict):
        main, comp = dict(rp["main"]), dict(rp["compress"])
    else:
        flat = {k: v for k, v in rp.items() if k not in ("main", "compress")}
        main = {"rope_type": "default", "rope_theta": c["rope_theta"]}
        comp = {**flat, "rope_theta": c["compress_rope_theta"]}
        comp.setdefault("rope_type", comp.pop("type", "default"))
        if comp["rope_type"] == "yarn":
            comp.setdefault("attention_factor", 1.0)  # the V4 reference does not scale cos/sin
    out = []
    for label, p in (("main", main), ("compress", comp)):
        p = {**p, "partial_rotary_factor": p.get("partial_rotary_factor", partial)}
        spec = rope_from_hf({"rope_parameters": p, "max_position_embeddings": c["max_position_embeddings"]},
                            f"{ARCH} ({label} rope)")
        if spec.scaling not in ("default", "yarn"):
            raise _fail(f"rope_parameters[{label!r}].rope_type={spec.scaling!r} not supported; allowed: default, yarn")
        out.append(spec)
    return out[0], out[1]


def config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    c = with_defaults(cfg, DEFAULTS)
    if c["num_key_value_heads"] != 1:
        raise _fail(f"num_key_value_heads={c['num_key_value_heads']!r}: V4 has one shared K/V head (must be 1)")
    for key in ("attention_bias", "mlp_bias"):
        if c.get(key):
            raise _fail(f"{key}=true is not supported (V4 has no biases)")
    if c["scoring_func"] not in SCORINGS:
        raise _fail(f"scoring_func={c['scoring_func']!r} not supported; allowed: {', '.join(SCORINGS)}")
    act = activation(c, ARCH)
    types, mlps = layer_types(c), mlp_types(c)
    rates = dict(DEFAULT_RATES)
    rates.update(c.get("compress_rates") or {})
    for legacy, t in (("compress_rate_csa", "compressed_sparse_attention"),
                      ("compress_rate_hca", "heavily_compressed_attention")):
        if c.get(legacy) is not None:
            rates[t] = c[legacy]
    hd = c["head_dim"]
    partial = c.get("partial_rotary_factor")
    if partial is None:
        partial = c["qk_rope_head_dim"] / hd if c.get("qk_rope_head_dim") else 64 / 512
    main, comp = ropes(c, float(partial))
    e, k, width = c["n_routed_experts"], c["num_experts_per_tok"], c["moe_intermediate_size"]
    layers = []
    for i, (t, mt) in enumerate(zip(types, mlps)):
        kind = LAYER_KINDS[t]
        cs = CompressSpec(ratio=0 if kind == "swa" else rates[t], q_lora_rank=c["q_lora_rank"],
                          o_groups=c["o_groups"], o_lora_rank=c["o_lora_rank"])
        if kind == "csa":
            cs.index_heads, cs.index_head_dim, cs.index_topk = c["index_n_heads"], c["index_head_dim"], c["index_topk"]
        hashed = mt == "hash_moe"
        # transformers always renormalises the chosen weights and always builds one shared expert of the expert width
        moe = MoESpec(num_experts=e, top_k=k, expert_size=width, scoring=c["scoring_func"], norm_topk=True,
                      bias_correction=not hashed, routed_scaling=float(c["routed_scaling_factor"]),
                      shared_experts=1, shared_size=width, hash_routing=hashed,
                      swiglu_limit=float(c["swiglu_limit"]) if c.get("swiglu_limit") else None)
        layers.append(LayerSpec(
            num_heads=c["num_attention_heads"], num_kv_heads=1, head_dim=hd, attention=kind,
            window=c["sliding_window"], sinks=True, rope=RopeSpec(**vars(main if kind == "swa" else comp)),
            mlp="moe", activation=act, moe=moe, compress=cs))
    try:
        return ModelConfig(
            vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], layers=layers,
            max_positions=c["max_position_embeddings"], norm_eps=c["rms_norm_eps"],
            tie_embeddings=bool(c["tie_word_embeddings"]), mhc_streams=c["hc_mult"],
            mhc_sinkhorn_iters=c["hc_sinkhorn_iters"], mhc_eps=c["hc_eps"], name=c.get("_name_or_path") or "deepseek-v4")
    except ValueError as err:
        raise _fail(str(err)) from None


# -- weights ----------------------------------------------------------------------------------------------------

NAMES: dict[str, str] = {
    "model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight", "lm_head.weight": "lm_head.weight",
    "model.hc_head.hc_fn": "mhc_head.hc_fn", "model.hc_head.hc_base": "mhc_head.hc_bias",
    "model.hc_head.hc_scale": "mhc_head.hc_scale",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attn_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.mlp_norm.weight",
    "model.layers.{i}.self_attn.sinks": "layers.{i}.attn.sinks",
    "model.layers.{i}.mlp.gate.weight": "layers.{i}.mlp.router.weight",
    "model.layers.{i}.mlp.gate.e_score_correction_bias": "layers.{i}.mlp.router_bias",
    "model.layers.{i}.mlp.gate.tid2eid": "layers.{i}.mlp.tid2eid",
}
for _hc, _kv in (("attn_hc", "attn_hc"), ("ffn_hc", "mlp_hc")):
    for _a, _b in (("fn", "hc_fn"), ("base", "hc_bias"), ("scale", "hc_scale")):
        NAMES[f"model.layers.{{i}}.{_hc}.{_a}"] = f"layers.{{i}}.{_kv}.{_b}"
for _p in ("q_a_proj", "q_a_norm", "q_b_proj", "kv_proj", "kv_norm", "o_a_proj", "o_b_proj"):
    NAMES[f"model.layers.{{i}}.self_attn.{_p}.weight"] = f"layers.{{i}}.attn.{_p}.weight"
for _pre in ("compressor", "compressor.indexer"):
    for _p in ("kv_proj.weight", "gate_proj.weight", "kv_norm.weight", "position_bias"):
        NAMES[f"model.layers.{{i}}.self_attn.{_pre}.{_p}"] = f"layers.{{i}}.attn.{_pre}.{_p}"
NAMES["model.layers.{i}.self_attn.compressor.indexer.q_b_proj.weight"] = "layers.{i}.attn.compressor.indexer.q_b_proj.weight"
NAMES["model.layers.{i}.self_attn.compressor.indexer.scorer.weights_proj.weight"] = (
    "layers.{i}.attn.compressor.indexer.weights_proj.weight")
for _p in ("gate_proj", "up_proj", "down_proj"):
    NAMES[f"model.layers.{{i}}.mlp.shared_experts.{_p}.weight"] = f"layers.{{i}}.mlp.shared.{_p}.weight"

# DeepSeek's own checkpoint names -> transformers names (transformers' conversion_mapping for deepseek_v4),
# applied in order to every name (without its "model." prefix); transformers' own names pass through unchanged
NATIVE: list[tuple[str, str]] = [
    (r"\.attn\.", ".self_attn."), (r"\.ffn\.", ".mlp."), (r"\.indexer\.compressor\.", ".compressor.indexer."),
    (r"^embed\.weight$", "embed_tokens.weight"), (r"^head\.weight$", "lm_head.weight"),
    (r"^hc_head_fn$", "hc_head.hc_fn"), (r"^hc_head_base$", "hc_head.hc_base"), (r"^hc_head_scale$", "hc_head.hc_scale"),
    (r"\.attn_norm\.", ".input_layernorm."), (r"\.ffn_norm\.", ".post_attention_layernorm."),
    (r"\.hc_attn_fn$", ".attn_hc.fn"), (r"\.hc_attn_base$", ".attn_hc.base"), (r"\.hc_attn_scale$", ".attn_hc.scale"),
    (r"\.hc_ffn_fn$", ".ffn_hc.fn"), (r"\.hc_ffn_base$", ".ffn_hc.base"), (r"\.hc_ffn_scale$", ".ffn_hc.scale"),
    (r"\.attn_sink$", ".sinks"), (r"\.indexer\.weights_proj\.", ".compressor.indexer.scorer.weights_proj."),
    (r"\.indexer\.wq_b\.", ".compressor.indexer.q_b_proj."), (r"\.norm\.", ".kv_norm."), (r"\.ape$", ".position_bias"),
    (r"\.wq_a\.", ".q_a_proj."), (r"\.self_attn\.wq_b\.", ".self_attn.q_b_proj."), (r"\.wkv\.", ".kv_proj."),
    (r"\.wgate\.", ".gate_proj."), (r"\.wo_a\.", ".o_a_proj."), (r"\.wo_b\.", ".o_b_proj."),
    (r"\.q_norm\.", ".q_a_norm."), (r"\.gate\.bias$", ".gate.e_score_correction_bias"),
    (r"\.shared_experts\.w1\.", ".shared_experts.gate_proj."), (r"\.shared_experts\.w2\.", ".shared_experts.down_proj."),
    (r"\.shared_experts\.w3\.", ".shared_experts.up_proj."),
    (r"\.experts\.(\d+)\.w1\.", r".experts.\1.gate_proj."), (r"\.experts\.(\d+)\.w2\.", r".experts.\1.down_proj."),
    (r"\.experts\.(\d+)\.w3\.", r".experts.\1.up_proj."),
]
@functools.cache  # asked once by the loader's dtype rule and once by the renaming
def native_name(name: str) -> str:
    """Any V4 tensor name in transformers' layout: DeepSeek's own (``layers.0.attn.wq_a.weight``), the same under
    ``model.`` (what transformers 5.23's ``save_pretrained`` writes) or already transformers' (unchanged)."""
    if name == "lm_head.weight":
        return name
    n = name.removeprefix("model.")
    for pat, rep in NATIVE:
        n = re.sub(pat, rep, n)
    return n if n == "lm_head.weight" else "model." + n


def dequantize(hf_state: HFState) -> dict[str, Tensor]:
    """FP8 weights with block-wise scales -> floating weights; other tensors pass through.

    A weight ``W [out, in]`` stored as float8 with a companion ``<name>_scale_inv`` (transformers) or
    ``<module>.scale`` (DeepSeek) of shape ``[ceil(out / 128), ceil(in / 128)]`` becomes ``W * scale`` per block.
    An integer-typed weight with a scale (FP4 experts packed two per byte) is refused, naming the format.
    """
    out: dict[str, Tensor] = {}
    scales: dict[str, str] = {}  # weight name -> its scale's name
    for name in hf_state:
        if name.endswith("_scale_inv"):
            base = name[:-len("_scale_inv")]
        elif name.endswith(".scale"):
            base = name[:-len(".scale")] + ".weight"
        else:
            continue
        if base in hf_state:
            scales[base] = name
    used = set(scales.values())
    for name in hf_state:
        if name in used:
            continue
        t = hf_state[name]
        if name in scales:
            s = hf_state[scales[name]]
            if not t.is_floating_point():
                raise ValueError(f"{ARCH}: tensor {name!r} is stored as {t.dtype} with block scales "
                                 f"({scales[name]!r}): packed FP4 (e2m1) experts are not supported; convert the "
                                 "checkpoint to bf16 first")
            t = dequantise_fp8(t, s, name)
        elif t.is_floating_point() and t.dtype.itemsize == 1:  # an fp8 format
            raise ValueError(f"{ARCH}: tensor {name!r} is stored as {t.dtype} without a block scale "
                             f"({name}_scale_inv or .scale): cannot dequantise it")
        out[name] = t
    return out


def map_weights(hf_state: HFState, config: ModelConfig) -> dict[str, Tensor]:
    names = {native_name(k): k for k in hf_state}
    skipped = sorted(k for k in names if k.startswith("model.mtp."))
    if skipped:
        print(f"kvlab: {ARCH}: skipping the multi-token-prediction head ({len(skipped)} tensors)", file=sys.stderr)
    state = {k: hf_state[v] for k, v in names.items() if k not in skipped}
    state = dequantize(state)
    return rename(state, NAMES)


# what transformers keeps in fp32 in a bf16 / fp16 V4 (``_keep_in_fp32_modules_strict``, matched as substrings of
# the transformers name): the mHC maps, sinks, compressor position biases, router correction biases, every norm
KEEP_FP32 = ("attn_hc", "ffn_hc", "hc_head", "sinks", "position_bias", "e_score_correction_bias", "norm")


def keep_fp32(name: str) -> bool:
    """Whether the checkpoint tensor ``name`` (any naming) loads in fp32 whatever the requested dtype."""
    hf = native_name(name)
    return any(p in hf for p in KEEP_FP32)


def to_hf_config(config: ModelConfig) -> dict[str, Any]:
    """DeepseekV4Config keys of ``config``'s shape: mHC, CSA/HCA/sliding layers, (hash-routed) MoE everywhere."""
    layers = config.layers
    if any(y.attention not in LAYER_KINDS.values() or y.moe is None for y in layers) or layers[0].compress is None:
        raise ValueError(f"{ARCH}: {config.name} needs CSA/HCA/sliding layers, each with a MoE")
    kinds = {v: k for k, v in LAYER_KINDS.items()}
    x = layers[0]
    csa = next((y.compress for y in layers if y.attention == "csa"), None)
    hca = next((y.compress for y in layers if y.attention == "hca"), None)
    main = next((y.rope for y in layers if y.attention == "swa"), x.rope)
    comp = next((y.rope for y in layers if y.attention != "swa"), x.rope)
    m = x.moe
    d: dict[str, Any] = {
        "layer_types": [kinds[y.attention] for y in layers],
        "mlp_layer_types": ["hash_moe" if y.moe.hash_routing else "moe" for y in layers],
        "compress_rates": {"compressed_sparse_attention": csa.ratio if csa else 4,
                           "heavily_compressed_attention": hca.ratio if hca else 128},
        "q_lora_rank": x.compress.q_lora_rank, "o_groups": x.compress.o_groups, "o_lora_rank": x.compress.o_lora_rank,
        "sliding_window": x.window, "partial_rotary_factor": main.partial,
        "rope_parameters": {"main": {k: v for k, v in rope_dict(main).items() if v is not None},
                            "compress": {k: v for k, v in rope_dict(comp).items() if v is not None}},
        "hc_mult": config.mhc_streams, "hc_sinkhorn_iters": config.mhc_sinkhorn_iters, "hc_eps": config.mhc_eps,
        "n_routed_experts": m.num_experts, "num_experts_per_tok": m.top_k, "moe_intermediate_size": m.expert_size,
        "intermediate_size": m.expert_size,  # DeepseekV4Config maps intermediate_size onto moe_intermediate_size
        "n_shared_experts": 1, "scoring_func": m.scoring, "routed_scaling_factor": m.routed_scaling,
        "swiglu_limit": m.swiglu_limit, "num_key_value_heads": 1,
    }
    if csa is not None:
        d.update(index_n_heads=csa.index_heads, index_head_dim=csa.index_head_dim, index_topk=csa.index_topk)
    return hf_config(config, ARCH, "deepseek_v4", **d)


FAMILY = Family(ARCH, config_from_hf, map_weights, NAMES, keep_fp32, to_hf_config=to_hf_config)
