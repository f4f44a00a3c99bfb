"""The store of a ``gqa`` layer (kvlab/kinds/gqa.py): all positions, a window ring, or sink tokens plus the ring."""

from __future__ import annotations

import torch

from ..kinds.gqa import sink_tokens
from .sink_window import SinkWindowKV
from .storage import FullKV, KVStore, WindowKV


def gqa_store(spec, batch: int, max_length: int | None, dtype: torch.dtype, device, quant=None) -> KVStore:
    """The store of a ``gqa`` layer: a :class:`WindowKV` ring for a window layer, else :class:`FullKV`; ``quant``:
    the resolved kv_quant mapping (kvlab/costs/quant.py) for quantized K/V buffers; a window layer with
    ``gqa.sink_tokens``: a :class:`~kvlab.cache.sink_window.SinkWindowKV` (the sinks plus the ring)."""
    if spec.window is not None and sink_tokens(spec):
        return SinkWindowKV(spec, batch, max_length, dtype, device, quant)
    if spec.window is not None:
        return WindowKV(batch, spec.num_kv_heads, spec.head_dim, spec.value_dim, spec.window, max_length,
                        dtype, device, quant)
    return FullKV(batch, spec.num_kv_heads, spec.head_dim, spec.value_dim, max_length, dtype, device, quant)
