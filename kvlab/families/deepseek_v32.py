"""DeepSeek V3.2 (``DeepseekV32ForCausalLM``): DeepSeek V3 plus DeepSeek sparse attention (DSA).

Following transformers 5.23 ``modeling_deepseek_v32``: everything as DeepSeek V3 (kvlab/families/deepseek_v3.py)
with interleaved RoPE always (there is no ``rope_interleave`` switch), ``mlp_layer_types`` (``dense`` / ``sparse``;
default ``first_k_dense_replace`` dense layers first) and, in every layer, the lightning indexer
(``self_attn.indexer``: ``wq_b``, ``wk``, ``k_norm`` (a LayerNorm), ``weights_proj``) of ``index_n_heads`` x
``index_head_dim`` choosing the ``index_topk`` keys each query attends to (kvlab/layers/mla.py).
"""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from .base import Family, HFState, Tensor, with_defaults
from .deepseek_v3 import DEFAULTS as V3_DEFAULTS
from .deepseek_v3 import NAMES as V3_NAMES
from .deepseek_v3 import build_config
from .deepseek_v3 import keep_fp32 as v3_keep_fp32
from .deepseek_v3 import map_weights as v3_map_weights

ARCH = "DeepseekV32ForCausalLM"
DEFAULTS: dict[str, Any] = {**V3_DEFAULTS, "max_position_embeddings": 163840, "index_topk": 2048,
                            "index_head_dim": 128, "index_n_heads": 64, "mlp_layer_types": None}
MLP_TYPES = ("dense", "sparse")


def config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    c = with_defaults(cfg, DEFAULTS)
    c["rope_interleave"] = True  # DeepseekV32Attention always interleaves
    n = c["num_hidden_layers"]
    types = c.get("mlp_layer_types")
    dense = None
    if types is not None:
        if not isinstance(types, list) or len(types) != n:
            raise ValueError(f"{ARCH} config.json: mlp_layer_types needs one entry per layer (num_hidden_layers={n})")
        bad = sorted({str(t) for t in types if t not in MLP_TYPES})
        if bad:
            raise ValueError(f"{ARCH} config.json: mlp_layer_types {bad} not supported; allowed: {', '.join(MLP_TYPES)}")
        dense = [t == "dense" for t in types]
    index = {"index_heads": c["index_n_heads"], "index_head_dim": c["index_head_dim"], "index_topk": c["index_topk"]}
    return build_config(c, ARCH, dense=dense, index=index)


NAMES = dict(V3_NAMES)
for _p in ("wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias", "weights_proj.weight"):
    NAMES[f"model.layers.{{i}}.self_attn.indexer.{_p}"] = f"layers.{{i}}.attn.indexer.{_p}"


def map_weights(hf_state: HFState, config: ModelConfig) -> dict[str, Tensor]:
    return v3_map_weights(hf_state, config, NAMES)


FAMILY = Family(ARCH, config_from_hf, map_weights, NAMES, v3_keep_fp32)
