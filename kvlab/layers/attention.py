"""Grouped-query attention: MHA, GQA (arXiv 2305.13245) and MQA (arXiv 1911.02150).

Options: q/k RMSNorm, weightless v RMSNorm, V = K projection (the layer's GQASpec), sliding window
(Longformer/Mistral), learned sink logits (gpt-oss), a sigmoid or softplus output gate computed from
the attention input, and reading another layer's K/V (cross-layer sharing). Attention runs in
``scaled_dot_product_attention``; an eager decode step over plain float K/V on the CPU in the C++ kernel of
kvlab/layers/dense_attend.py.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..config import LayerSpec
from .core import Step, attend, attend_out, build_mask, project_out, publish_kv
from .linear import Linear
from .norm import RMSNorm
from .rope import apply_rope

__all__ = ["Attention", "Step", "attend", "attend_out", "build_mask", "project_out", "publish_kv"]


class Attention(nn.Module):
    """One attention layer described by a :class:`LayerSpec`; x ``[B, T, hidden]`` -> same shape."""

    param_init: ClassVar[dict[str, str]] = {"sinks": "zeros"}  # not drawn at random by Model.from_config
    dense_kernel: ClassVar[bool] = True  # an eager CPU decode step: the C++ kernel (kvlab/layers/dense_attend.py)

    def __init__(self, spec: LayerSpec, hidden: int, eps: float = 1e-6, norm_offset: bool = False) -> None:
        super().__init__()
        self.spec = spec
        h, hkv, d, dv, g = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.value_dim, spec.gqa
        self.q_proj = Linear(hidden, h * d, bias=spec.qkv_bias)
        if spec.stores_kv:
            self.k_proj = Linear(hidden, hkv * d, bias=spec.qkv_bias)
            if not g.k_eq_v:
                self.v_proj = Linear(hidden, hkv * dv, bias=spec.qkv_bias)
            if g.v_norm:
                self.v_norm = RMSNorm(dv, eps, scale=False)
        self.o_proj = Linear(h * dv, hidden, bias=spec.o_bias)
        if g.qk_norm:
            self.q_norm = RMSNorm(d, eps, norm_offset)
            if spec.stores_kv:
                self.k_norm = RMSNorm(d, eps, norm_offset)
        if spec.output_gate:
            self.g_proj = Linear(hidden, h if spec.gate_per_head else h * dv, bias=False)
        if spec.sinks:
            self.sinks = nn.Parameter(torch.zeros(h))

    def project_kv(self, x: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor]:
        """K ``[B, Hkv, T, D]`` (normed, rotated) and V ``[B, Hkv, T, Dv]``."""
        s = self.spec
        b, t, _ = x.shape
        # normed per head before the transpose, on contiguous rows (after it, each norm copies them first)
        k = self.k_proj(x).view(b, t, s.num_kv_heads, s.head_dim)
        v = k if s.gqa.k_eq_v else self.v_proj(x).view(b, t, s.num_kv_heads, s.value_dim)
        if s.gqa.v_norm:
            v = self.v_norm(v)
        if s.gqa.qk_norm:
            k = self.k_norm(k)
        if rope is not None:
            k = apply_rope(k, *rope, tokens_first=True)
        return k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: torch.Tensor, step: Step, index: int, store=None) -> torch.Tensor:
        s = self.spec
        b, t, _ = x.shape
        rope = step.rope.get(index)
        q = self.q_proj(x).view(b, t, s.num_heads, s.head_dim)
        if s.gqa.qk_norm:
            q = self.q_norm(q)  # before the transpose: contiguous rows
        if rope is not None:  # before the transpose too: q keeps [B, T, H, D] memory, and so does SDPA's output,
            q = apply_rope(q, *rope, tokens_first=True)  # which the output projection then reads without a copy
        q = q.transpose(1, 2)
        if s.kv_source is not None:
            k, v, kpos = step.kv[s.kv_source]  # a quantized cache: the producer's readers, walked block by block
        else:
            k, v, kpos = publish_kv(step, index, store, *self.project_kv(x, rope))
        return attend_out(self, x, step, q, k, v, kpos)
