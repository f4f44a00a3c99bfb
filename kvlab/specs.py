"""Builders of LayerSpecs whose fields must agree with each other (torch-free: presets and families use them)."""

from __future__ import annotations

from .config import LayerSpec, MLASpec, RopeSpec


def mla_layer(num_heads: int, kv_lora_rank: int, qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int,
              q_lora_rank: int | None = None, rope: RopeSpec | None = None, rope_interleave: bool = True,
              index_heads: int | None = None, index_head_dim: int | None = None, index_topk: int | None = None,
              latent_norm: bool = True, **kw) -> LayerSpec:
    """A consistent ``mla`` LayerSpec (kvlab/kinds/mla.py): head_dim = qk_nope + qk_rope, one latent "KV head", the
    rope (default theta 1e4) rotating exactly ``qk_rope_head_dim`` channels. ``kw``: other LayerSpec fields (MLP,
    biases...)."""
    m = MLASpec(kv_lora_rank=kv_lora_rank, qk_nope_head_dim=qk_nope_head_dim, qk_rope_head_dim=qk_rope_head_dim,
                v_head_dim=v_head_dim, q_lora_rank=q_lora_rank, rope_interleave=rope_interleave,
                index_heads=index_heads, index_head_dim=index_head_dim, index_topk=index_topk, latent_norm=latent_norm)
    rope = RopeSpec(**vars(rope)) if rope is not None else RopeSpec()
    rope.partial = m.rope_partial
    return LayerSpec(num_heads=num_heads, num_kv_heads=1, head_dim=m.qk_head_dim, v_head_dim=v_head_dim,
                     attention="mla", mla=m, rope=rope, **kw)


__all__ = ["mla_layer"]
