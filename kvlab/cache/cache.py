"""The model-wide cache: one storage object per layer, sized from that layer's spec."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..config import LayerSpec, ModelConfig
from .storage import FullKV, KVStore, WindowKV

# attention kind -> factory(spec, batch, max_length, dtype, device) -> KVStore
_POLICIES: dict[str, Callable[..., KVStore]] = {}


def register_policy(kind: str, factory: Callable[..., KVStore]) -> None:
    """Register the storage policy of an attention kind."""
    _POLICIES[kind] = factory


def _gqa_store(spec: LayerSpec, batch: int, max_length: int | None, dtype: torch.dtype, device) -> KVStore:
    if spec.window is not None:
        return WindowKV(batch, spec.num_kv_heads, spec.head_dim, spec.value_dim, spec.window, max_length,
                        dtype, device)
    return FullKV(batch, spec.num_kv_heads, spec.head_dim, spec.value_dim, max_length, dtype, device)


register_policy("gqa", _gqa_store)


class Cache:
    """Per-layer K/V storage for one batch of sequences.

    ``layers[i]`` is the layer's store, or ``None`` for a layer that reads another layer's K/V
    (``kv_source``): such a layer holds nothing. ``seq_len`` counts positions written (pads included);
    ``pad`` holds each row's number of left-padding positions.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_length: int | None = None,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: must be a positive integer")
        if max_length is not None:
            if not isinstance(max_length, int) or max_length < 1:
                raise ValueError(f"max_length={max_length!r}: must be a positive integer or None")
            if max_length > config.max_positions:
                raise ValueError(f"max_length={max_length} exceeds the model's max_positions={config.max_positions}")
        self.config = config
        self.batch_size = batch_size
        self.max_length = max_length
        self.seq_len = 0
        self.pad: torch.Tensor | None = None
        self.layers: list[KVStore | None] = []
        for spec in config.layers:
            if not spec.stores_kv:
                self.layers.append(None)
                continue
            if spec.attention not in _POLICIES:
                raise ValueError(f"no cache policy for attention kind {spec.attention!r}")
            self.layers.append(_POLICIES[spec.attention](spec, batch_size, max_length, dtype, device))

    def set_padding(self, pad: torch.Tensor | None) -> None:
        """Left-padding counts ``[B]`` of the rows (before the first write)."""
        if self.seq_len:
            raise ValueError("padding must be set before the first tokens are written to the cache")
        if pad is not None and not bool(pad.any()):
            pad = None
        self.pad = pad

    def nbytes(self) -> int:
        """Bytes held by the cache's K/V tensors, exactly."""
        return sum(self.per_layer_nbytes())

    def per_layer_nbytes(self) -> list[int]:
        return [0 if s is None else s.nbytes() for s in self.layers]
