"""Grouped-query attention (``gqa``): MHA (kv heads == heads), GQA and MQA (one kv head), with optional sliding
window (optionally keeping ``sink_tokens`` first positions visible: StreamingLLM, arXiv 2309.17453), learned sink
logits, q/k norms, output gate, v norm and K = V (Gemma 4 full layers). The options only gqa has are its
:class:`GQASpec` (``LayerSpec.gqa``). Module: kvlab/layers/attention.py; store: kvlab/cache/storage.py (FullKV, a
WindowKV ring of exactly ``window`` positions, or a SinkWindowKV: the ``sink_tokens`` first positions plus that
ring)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import AttnCost, Buffer, causal_positions, field_error

OPTIONS = frozenset({"gqa", "window", "sinks", "qkv_bias", "o_bias", "output_gate", "gate_per_head", "attn_scale"})

# flat LayerSpec fields of older kvlab versions now held by GQASpec: a saved config that has them still loads
MOVED = {"qk_norm": "gqa", "v_norm": "gqa", "k_eq_v": "gqa", "sink_tokens": "gqa"}

EXAMPLES = (
    {"num_heads": 4, "num_kv_heads": 2, "head_dim": 16},
    {"num_heads": 4, "num_kv_heads": 1, "head_dim": 8, "window": 5, "sinks": True, "gqa": {"qk_norm": True},
     "output_gate": "sigmoid"},
    {"num_heads": 4, "num_kv_heads": 4, "head_dim": 8, "v_head_dim": 12, "output_gate": "softplus",
     "gate_per_head": False, "qkv_bias": True, "o_bias": True, "rope": {"theta": 500.0, "partial": 0.5}},
    {"num_heads": 4, "num_kv_heads": 2, "head_dim": 8, "gqa": {"k_eq_v": True, "v_norm": True}, "rope": None},
    {"num_heads": 4, "num_kv_heads": 2, "head_dim": 8, "window": 4, "gqa": {"sink_tokens": 2}},
)


@dataclass
class GQASpec:
    """The options only a ``gqa`` layer has (``LayerSpec.gqa``; a gqa layer given none gets ``GQASpec()``).

    qk_norm: RMSNorm over head_dim on q and k before RoPE (Qwen3, OLMo 2, Gemma 3/4 style).
    v_norm: RMSNorm over head_dim on v without a learned weight (Gemma 4).
    k_eq_v: no v_proj; V is the K projection before its norm and rotation (Gemma 4 full layers; needs
        ``v_head_dim`` equal to ``head_dim``).
    sink_tokens: (window layers) the first ``sink_tokens`` real positions of each sequence stay in the window
        layer's store and are always attended, past the window (StreamingLLM's attention sinks, Xiao et al. 2023,
        arXiv 2309.17453): cached tokens, counted in the cache and the calculator; 0: none. Not to be confused
        with ``LayerSpec.sinks`` (learned sink logits, no cached position).
    """

    qk_norm: bool = False
    v_norm: bool = False
    k_eq_v: bool = False
    sink_tokens: int = 0

    def validate(self, where: str) -> None:
        for name in ("qk_norm", "v_norm", "k_eq_v"):
            if not isinstance(getattr(self, name), bool):
                raise field_error(where, name, getattr(self, name), "must be true or false")
        s = self.sink_tokens
        if not isinstance(s, int) or isinstance(s, bool) or s < 0:
            raise field_error(where, "sink_tokens", s, "must be a non-negative integer (0: no sink tokens)")


def options_of(layer: Any) -> GQASpec:
    """A layer's GQASpec; on a layer of another kind, ``GQASpec()`` (none of these options): for readers that ask any
    layer (a family's export, a retrofit's check)."""
    spec = getattr(layer, "gqa", None)
    return spec if spec is not None else GQASpec()


def sink_tokens(layer: Any) -> int:
    """The sink tokens a layer keeps past its window: ``layer.gqa.sink_tokens``, 0 on a layer of another kind (a
    shared reader such as the mask, the sharing check or a per-layer label asks any layer)."""
    return options_of(layer).sink_tokens

ASSUMPTION = (
    "kv_cache_bytes: K [batch, kv_heads, L, head_dim] + V [batch, kv_heads, L, v_head_dim] per storing layer, "
    "L = context (full) or min(window + sink_tokens, context) (window); layers with kv_source store nothing")


def validate(layer: Any, where: str) -> None:
    g = layer.gqa
    if not isinstance(g, GQASpec):
        raise field_error(where, "gqa", g, "must be a GQASpec (or left unset: GQASpec())")
    g.validate(f"{where}.gqa")
    if g.sink_tokens and layer.window is None:
        raise field_error(f"{where}.gqa", "sink_tokens", g.sink_tokens,
                          "needs a window (a full layer already sees every position)")
    if g.k_eq_v and layer.value_dim != layer.head_dim:
        raise field_error(f"{where}.gqa", "k_eq_v", g.k_eq_v, f"V is the K projection: needs v_head_dim="
                          f"{layer.v_head_dim} equal to head_dim={layer.head_dim}")


def price(layer: Any, hidden: int, context: int, batch: int, kv_elt: int) -> AttnCost:
    h, kvh, hd, vd, g = layer.num_heads, layer.num_kv_heads, layer.head_dim, layer.value_dim, layer.gqa
    mats = h * hd * hidden + hidden * h * vd  # q_proj, o_proj
    extra = (h * hd if layer.qkv_bias else 0) + (hidden if layer.o_bias else 0)
    if layer.stores_kv:
        kv_out = kvh * (hd if g.k_eq_v else hd + vd)  # k_proj, v_proj (none with k_eq_v: V = K projection)
        mats += kv_out * hidden
        extra += kv_out if layer.qkv_bias else 0
    if g.qk_norm:
        extra += hd * (2 if layer.stores_kv else 1)  # q_norm, k_norm
    mats += gate_params(layer, hidden)
    extra += h if layer.sinks else 0
    seen = context if layer.window is None else min(context, layer.window + g.sink_tokens)
    per_pos = kvh * (hd + vd) * kv_elt
    return AttnCost(
        params=mats + extra,
        matmul_params=mats,
        kv_bytes=batch * per_pos * seen if layer.stores_kv else 0,
        kv_bytes_per_token=per_pos if layer.stores_kv else 0,
        kv_read_bytes=batch * per_pos * seen,  # a shared layer reads its producer's entries again
        flops_per_token=2 * h * (hd + vd) * seen,
        prefill_flops=2 * h * (hd + vd) * causal_positions(
            context, None if layer.window is None else layer.window + g.sink_tokens),
    )


def gate_params(layer: Any, hidden: int) -> int:
    """Weights of the output gate (one scalar per head, or one per channel); 0 without a gate."""
    if not layer.output_gate:
        return 0
    return (layer.num_heads if layer.gate_per_head else layer.num_heads * layer.value_dim) * hidden


def buffers(layer: Any, context: int) -> list:
    """K and V, ``[B, kv_heads, L, head_dim / v_head_dim]`` (L = context, or a ring of min(window, context)); with
    ``sink_tokens`` S: the ring holds positions >= S (min(window, context - S) slots) and two more buffers hold
    the first min(S, context), written once (quantized as soon as written: no residual window)."""
    ring, s = layer.window, sink_tokens(layer)
    cap = context if ring is None else min(ring, max(context - s, 0))
    out = [Buffer("kv", "k", layer.num_kv_heads, cap, layer.head_dim, ring=ring, key=True),
           Buffer("kv", "v", layer.num_kv_heads, cap, layer.value_dim, ring=ring)]
    if s:
        out += sink_buffers(layer, min(s, context))
    return out


def sink_buffers(layer: Any, capacity: int) -> list:
    """The sink tokens' K and V (``capacity`` slots, position = slot; no residual window)."""
    return [Buffer("kv", "k", layer.num_kv_heads, capacity, layer.head_dim, key=True, residual=False),
            Buffer("kv", "v", layer.num_kv_heads, capacity, layer.value_dim, residual=False)]
