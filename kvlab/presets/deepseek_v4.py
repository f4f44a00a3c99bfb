"""DeepSeek V4-Flash and V4-Pro, read through the same ``config.json`` translation as a checkpoint
(kvlab/families/deepseek_v4.py), so a preset and a loaded model cannot disagree.

``deepseek-v4-flash``: 43 layers (2 sliding-only, then CSA ratio 4 / HCA ratio 128 alternating), hidden 4096,
64 heads x 512 (64 rotary) over one shared K = V head, window 128, q rank 1024, 8 output groups x 1024, indexer
64 x 128 top-512, mHC 4 streams, 256 experts top-6 x 2048 + 1 shared (first 3 hash-routed), vocab 129280, 1M
context. ``deepseek-v4-pro``: 61 layers (2 HCA, then HCA / CSA alternating: transformers' default schedule),
hidden 7168, 128 heads x 512, q rank 1536, 16 output groups x 1024, indexer 64 x 128 top-1024, 384 experts
top-6 x 3072 + 1 shared, routed scaling 2.5.
"""

from __future__ import annotations

from typing import Any

from kvlab.config import ModelConfig
from kvlab.families import config_from_hf, deepseek_v4
from kvlab.presets.registry import preset

FLASH_SOURCE = ("deepseek-ai/DeepSeek-V4-Flash(-Base) config.json (DeepseekV4ForCausalLM): hidden 4096, 43 layers, "
                "compress_ratios [0, 0, 4, 128, 4, ..., 128, 4] (+ an MTP placeholder), 64 heads x 512, rope 64, "
                "q_lora_rank 1024, o_groups 8 x o_lora_rank 1024, window 128, indexer 64 x 128 top-512, hc_mult 4 "
                "(20 Sinkhorn iterations, eps 1e-6), 256 experts top-6 x 2048 + 1 shared, 3 hash layers, "
                "sqrtsoftplus, routed scaling 1.5, swiglu_limit 10, YaRN x16 from 65536 on the compressed layers "
                "(compress_rope_theta 160000), vocab 129280, 1,048,576 positions; equal to transformers 5.23's "
                "DeepseekV4Config defaults except the layer schedule")
PRO_SOURCE = ("deepseek-ai/DeepSeek-V4-Pro model card and config.json as quoted publicly (1.6T total / 49B active): "
              "hidden 7168, 61 layers, 128 heads x 512 (rope 64), q_lora_rank 1536, o_groups 16 x o_lora_rank 1024, "
              "window 128, CSA ratio 4 with indexer 64 x 128 top-1024, HCA ratio 128, hc_mult 4, 384 experts top-6 "
              "x 3072 + 1 shared, 3 hash layers, sqrtsoftplus, routed scaling 2.5, swiglu_limit 10, YaRN x16 from "
              "65536, vocab 129280, 1,048,576 positions; layer schedule: transformers 5.23's V4-Pro default "
              "(2 HCA, then HCA/CSA alternating) since no compress_ratios list was available offline")

_YARN = {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32, "beta_slow": 1}


def flash_config_json() -> dict[str, Any]:
    """The published V4-Flash ``config.json`` fields kvlab reads."""
    return {"architectures": [deepseek_v4.ARCH], "hidden_size": 4096, "num_hidden_layers": 43,
            "num_attention_heads": 64, "head_dim": 512, "qk_rope_head_dim": 64, "q_lora_rank": 1024, "o_groups": 8,
            "o_lora_rank": 1024, "sliding_window": 128, "index_n_heads": 64, "index_head_dim": 128,
            "index_topk": 512, "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0], "hc_mult": 4,
            "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "n_routed_experts": 256, "n_shared_experts": 1,
            "num_experts_per_tok": 6, "moe_intermediate_size": 2048, "num_hash_layers": 3,
            "scoring_func": "sqrtsoftplus", "routed_scaling_factor": 1.5, "swiglu_limit": 10.0, "rope_theta": 10000,
            "compress_rope_theta": 160000, "rope_scaling": dict(_YARN), "vocab_size": 129280,
            "max_position_embeddings": 1048576, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}


def pro_config_json() -> dict[str, Any]:
    """The published V4-Pro ``config.json`` fields kvlab reads (layer schedule: transformers' default)."""
    return {**flash_config_json(), "hidden_size": 7168, "num_hidden_layers": 61, "num_attention_heads": 128,
            "q_lora_rank": 1536, "o_groups": 16, "index_topk": 1024, "compress_ratios": None,
            "n_routed_experts": 384, "moe_intermediate_size": 3072, "routed_scaling_factor": 2.5}


@preset("deepseek-v4-flash", FLASH_SOURCE)
def deepseek_v4_flash() -> ModelConfig:
    """V4-Flash: 2 sliding + 21 CSA + 20 HCA layers, mHC, hash-routed then top-6 MoE."""
    cfg = config_from_hf(flash_config_json())
    cfg.name, cfg.source = "deepseek-v4-flash", FLASH_SOURCE
    return cfg


@preset("deepseek-v4-pro", PRO_SOURCE)
def deepseek_v4_pro() -> ModelConfig:
    """V4-Pro: 32 HCA + 29 CSA layers (transformers' default schedule), mHC, 384 experts."""
    cfg = config_from_hf(pro_config_json())
    cfg.name, cfg.source = "deepseek-v4-pro", PRO_SOURCE
    return cfg
