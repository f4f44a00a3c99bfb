"""Tiny GGUF files written in the tests, as llama.cpp's convert_hf_to_gguf.py writes them, from random transformers
models: Llama q/k rows permuted for llama.cpp's rotary layout, Gemma norms stored as ``1 + w``; tensors in any type
``gguf.quants.quantize`` writes (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

Q = gguf.GGMLQuantizationType
LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
         "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down"}
LLAMA = {**LAYER, "post_attention_layernorm": "ffn_norm"}
GEMMA3 = {**LAYER, "pre_feedforward_layernorm": "ffn_norm", "post_attention_layernorm": "post_attention_norm",
          "post_feedforward_layernorm": "post_ffw_norm"}


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: rotate-half rows -> interleaved pairs, per head."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str, layer_map: dict[str, str]) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    parts = hf.split(".")  # model.layers.{i}.<module path>.{weight|bias}
    return f"blk.{parts[2]}.{layer_map['.'.join(parts[3:-1])]}.{parts[-1]}"


def write(path: Path, arch: str, meta: dict[str, Any], tensors: dict[str, np.ndarray],
          types: Callable[[str, np.ndarray], Any] = lambda n, a: Q.F32) -> Path:
    """A GGUF file of ``arch`` with ``meta`` (``<arch>.`` keys unless they start with ``general.``) and tensors."""
    w = gguf.GGUFWriter(str(path), arch)
    for key, v in meta.items():
        k = key if key.startswith(("general.", "tokenizer.")) else f"{arch}.{key}"
        if isinstance(v, bool):
            w.add_bool(k, v)
        elif isinstance(v, int):
            w.add_uint32(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        elif isinstance(v, str):
            w.add_string(k, v)
        else:
            w.add_array(k, v)
    for name, a in tensors.items():
        kind = types(name, a) if a.ndim == 2 else Q.F32  # 1-D tensors stay F32, as llama.cpp keeps them
        w.add_tensor(name, gguf.quants.quantize(a.astype(np.float32), kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def from_hf(model: torch.nn.Module, path: Path, types: Callable[[str, np.ndarray], Any] = lambda n, a: Q.F32,
            tied: bool = True) -> Path:
    """Write a transformers Llama, Qwen2, Qwen3 or Gemma 3 model as llama.cpp would (q/k permuted for Llama only)."""
    c = model.config
    arch = "gemma3" if c.model_type.startswith("gemma3") else c.model_type  # llama, qwen2, qwen3
    meta: dict[str, Any] = {
        "general.name": f"tiny-{arch}", "block_count": c.num_hidden_layers, "context_length": c.max_position_embeddings,
        "embedding_length": c.hidden_size, "feed_forward_length": c.intermediate_size,
        "attention.head_count": c.num_attention_heads, "attention.head_count_kv": c.num_key_value_heads,
        "attention.layer_norm_rms_epsilon": float(c.rms_norm_eps)}
    if arch != "gemma3":
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        meta.update({"rope.freq_base": float(c.rope_parameters["rope_theta"]), "vocab_size": c.vocab_size,
                     "rope.dimension_count": head_dim, "attention.key_length": head_dim,
                     "attention.value_length": head_dim})
    else:
        meta.update({"rope.freq_base": float(c.rope_parameters["full_attention"]["rope_theta"]),
                     "attention.key_length": c.head_dim, "attention.value_length": c.head_dim,
                     "attention.sliding_window": c.sliding_window})
    tensors = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue
        a = t.detach().float().numpy().copy()
        if arch == "llama" and ".self_attn.q_proj." in name:
            a = llama_cpp_permute(a, c.num_attention_heads)
        elif arch == "llama" and ".self_attn.k_proj." in name:
            a = llama_cpp_permute(a, c.num_key_value_heads)
        elif arch == "gemma3" and name.endswith("norm.weight"):
            a = a + 1.0
        tensors[gguf_name(name, GEMMA3 if arch == "gemma3" else LLAMA)] = a
    return write(path, arch, meta, tensors, types)
