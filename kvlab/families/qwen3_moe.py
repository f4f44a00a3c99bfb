"""Qwen3-MoE (``Qwen3MoeForCausalLM``): Qwen3 attention (q/k norm) with routed experts.

Router: softmax over all experts (fp32), top-k, renormalised only when ``norm_topk_prob``; no shared
experts. Layer i is MoE unless it is in ``mlp_only_layers`` or ``(i + 1) % decoder_sparse_step != 0``.
transformers 5.23 keeps experts fused in memory (``experts.gate_up_proj [E, 2I, H]``) but
``save_pretrained`` writes them per expert (``mlp.experts.{e}.gate_proj.weight``); both are read.
``num_experts`` is saved as ``num_local_experts``. The sliding window (when ``use_sliding_window``)
applies to every layer.
"""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig, MoESpec
from .base import Family, HFState, Tensor, drop_tied_head, hf_config, llama_names, rename, single_window, with_defaults
from .llama import decoder_config

ARCH = "Qwen3MoeForCausalLM"
DEFAULTS: dict[str, Any] = {  # transformers 5.23 Qwen3MoeConfig defaults
    "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 24,
    "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": None, "hidden_act": "silu",
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attention_bias": False,
    "use_sliding_window": False, "sliding_window": 4096, "decoder_sparse_step": 1, "moe_intermediate_size": 768,
    "num_experts_per_tok": 8, "norm_topk_prob": False, "mlp_only_layers": None,
}


def config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    c = with_defaults(cfg, DEFAULTS)
    n = c["num_hidden_layers"]
    experts = c.get("num_experts", c.get("num_local_experts", 128))
    only_dense = set(c["mlp_only_layers"] or [])
    step = c["decoder_sparse_step"] or 1
    moe = [MoESpec(num_experts=experts, top_k=c["num_experts_per_tok"], expert_size=c["moe_intermediate_size"],
                   scoring="softmax", norm_topk=bool(c["norm_topk_prob"]))
           if i not in only_dense and experts > 0 and (i + 1) % step == 0 else None for i in range(n)]
    window = c["sliding_window"] if c["use_sliding_window"] else None
    bias = bool(c["attention_bias"])
    return decoder_config(c, ARCH, windows=[window] * n, qk_norm=True, qkv_bias=bias, o_bias=bias, moe=moe)


NAMES = llama_names(qk_norm=True, moe=True)


def map_weights(hf_state: HFState, config: ModelConfig) -> dict[str, Tensor]:
    return drop_tied_head(rename(hf_state, NAMES), config.tie_embeddings)


def to_hf_config(config: ModelConfig) -> dict[str, Any]:
    """Qwen3MoeConfig keys of ``config``'s shape (the first MoE layer's experts; dense layers listed)."""
    m = next((x.moe for x in config.layers if x.moe is not None), None)
    if m is None:
        raise ValueError(f"{ARCH}: {config.name} has no MoE layer")
    w = single_window(config, ARCH)
    return hf_config(config, ARCH, "qwen3_moe", num_experts=m.num_experts, num_experts_per_tok=m.top_k,
                     moe_intermediate_size=m.expert_size, norm_topk_prob=m.norm_topk,
                     mlp_only_layers=[i for i, x in enumerate(config.layers) if x.moe is None], decoder_sparse_step=1,
                     use_sliding_window=w is not None, sliding_window=w)


FAMILY = Family(ARCH, config_from_hf, map_weights, NAMES, to_hf_config=to_hf_config)
