"""Compressed convolutional attention (``cca``; ZAYA1, arXiv 2510.04476): GQA in a compressed head space with two
causal convolutions on q/k and half the values from the previous token. Module: kvlab/layers/cca.py; store:
kvlab/cache/cca.py (the compressed K/V per position plus a constant conv tail and delayed value row)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import AttnCost, causal_positions, field_error
from .gqa import gate_params

OPTIONS = frozenset({"cca", "window", "sinks", "qkv_bias", "o_bias", "output_gate", "gate_per_head", "attn_scale"})

# flat LayerSpec fields of older kvlab versions now held by CCASpec: a saved config that has them still loads
MOVED = {"conv_kernels": "cca"}

EXAMPLES = (
    {"num_heads": 4, "num_kv_heads": 2, "head_dim": 16},
    {"num_heads": 4, "num_kv_heads": 2, "head_dim": 8, "window": 4, "cca": {"conv_kernels": (3, 2)},
     "rope": {"theta": 500.0, "partial": 0.5}},
)

ASSUMPTION = (
    "cca layers: K/V of the compressed KV heads per position (after norm and RoPE) plus, per sequence, a "
    "constant state of (heads + kv_heads) x head_dim x (k0 + k1 - 2) conv-tail values and kv_heads x "
    "v_head_dim / 2 delayed values, counted in kv_cache_bytes and reported alone as kv_state_bytes; "
    "conv weights count as matmul parameters")


@dataclass
class CCASpec:
    """The options only a ``cca`` layer has (``LayerSpec.cca``; ZAYA1's ``cca_time0`` / ``cca_time1``).

    ``conv_kernels``: kernel sizes (depthwise, grouped) of the two causal convolutions over the ``[q, k]`` stream.
    A ``cca`` layer given no CCASpec gets ``CCASpec()`` (ZAYA1's (2, 2)).
    """

    conv_kernels: tuple[int, int] = (2, 2)

    def __post_init__(self) -> None:
        if isinstance(self.conv_kernels, list):  # from JSON
            self.conv_kernels = tuple(self.conv_kernels)

    def validate(self, where: str) -> None:
        ks = self.conv_kernels
        if not (isinstance(ks, tuple) and len(ks) == 2
                and all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ks)):
            raise field_error(where, "conv_kernels", ks,
                              "must be two positive integers (depthwise, grouped kernel sizes)")


def conv_tail(spec: Any) -> int:
    """Input columns of history the two convolutions need (``k0 - 1 + k1 - 1``)."""
    k0, k1 = spec.cca.conv_kernels
    return k0 - 1 + k1 - 1


def conv_channels(spec: Any) -> int:
    """Channels of the convolved ``[q, k]`` stream: ``(num_heads + num_kv_heads) * head_dim``."""
    return (spec.num_heads + spec.num_kv_heads) * spec.head_dim


def value_half(spec: Any) -> int:
    """Value channels taken from the previous token: half of ``num_kv_heads * v_head_dim``."""
    return spec.num_kv_heads * spec.value_dim // 2


def detail(layer: Any) -> str:
    """``conv 2,2``: the kernel sizes, for per-layer diagrams."""
    return "conv " + ",".join(map(str, layer.cca.conv_kernels))


def validate(layer: Any, where: str) -> None:
    if not isinstance(layer.cca, CCASpec):
        raise field_error(where, "cca", layer.cca, "must be a CCASpec (or left unset: CCASpec())")
    layer.cca.validate(f"{where}.cca")
    if (layer.num_kv_heads * layer.value_dim) % 2:
        raise field_error(where, "v_head_dim", layer.value_dim,
                          f"cca splits the num_kv_heads x v_head_dim = {layer.num_kv_heads * layer.value_dim} value "
                          "channels into current- and previous-token halves: the product must be even")


def price(layer: Any, hidden: int, context: int, batch: int, kv_elt: int) -> AttnCost:
    """GQA in the compressed heads plus two convolutions.

    Stored per position: K and V of the compressed KV heads; per sequence: the conv tail of
    ``(heads + kv_heads) * head_dim`` channels x ``k0 + k1 - 2`` columns and the delayed value row
    (``kv_heads * v_head_dim / 2``). The convolution weights count as matmul parameters (each is used once per
    token: depthwise ``C * k0``, grouped ``C * head_dim * k1``).
    """
    h, kvh, hd, vd = layer.num_heads, layer.num_kv_heads, layer.head_dim, layer.value_dim
    k0, k1 = layer.cca.conv_kernels
    c = conv_channels(layer)
    mats = (h * hd + kvh * hd + kvh * vd) * hidden + hidden * h * vd + c * k0 + c * hd * k1 + gate_params(layer, hidden)
    extra = 2 * c + kvh  # conv biases, key temperature
    extra += (h * hd + kvh * hd + kvh * vd) if layer.qkv_bias else 0
    extra += hidden if layer.o_bias else 0
    extra += h if layer.sinks else 0
    seen = context if layer.window is None else min(context, layer.window)
    per_pos = kvh * (hd + vd) * kv_elt
    state = batch * (c * conv_tail(layer) + value_half(layer)) * kv_elt
    return AttnCost(
        params=mats + extra, matmul_params=mats, kv_bytes=batch * per_pos * seen + state,
        kv_bytes_per_token=per_pos, kv_read_bytes=batch * per_pos * seen + state,
        flops_per_token=2 * h * (hd + vd) * seen, prefill_flops=2 * h * (hd + vd) * causal_positions(context, layer.window),
        state_bytes=state)
