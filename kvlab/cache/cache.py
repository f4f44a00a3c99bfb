"""The model-wide cache: one storage object per layer, sized from that layer's spec."""

from __future__ import annotations

import torch

from .. import kinds
from ..config import ModelConfig
from ..costs.quant import check_layers, for_layer, resolve_kv_quant
from .quant import QuantRows
from .storage import KVStore


def quant_rows(store: KVStore | None) -> list[QuantRows]:
    """The quantized buffers of a layer's store (``None``: a layer reading another's K/V holds none)."""
    return [] if store is None else [r for r in store.rows() if isinstance(r, QuantRows)]


class Cache:
    """Per-layer K/V storage for one batch of sequences.

    ``layers[i]`` is the layer's store, or ``None`` for a layer that reads another layer's K/V
    (``kv_source``): such a layer holds nothing. ``seq_len`` counts positions written (pads included);
    ``pad`` holds each row's number of left-padding positions. ``kv_quant``: quantized K/V buffers (a format
    name such as ``"int4-g32-r64"``, a preset, a :class:`~kvlab.costs.quant.QuantSpec` or a mapping component ->
    format and layer index -> overrides; kvlab/costs/quant.py), priced by ``kvlab.costs(..., kv_quant=...)`` byte for byte.
    A decode step attends the int8 / int4 buffers that allow it (per-token scales or KIVI keys per channel, zero
    points or not; rotated keys and the residual window of a full buffer too; GQA/CCA K and V, MLA's latent,
    CSA/HCA/SWA's rings and entries) on the CPU with a hand-written C++ kernel over the codes
    (kvlab/layers/cpu_attend.py; built once per machine), and quantizes their writes in C++
    (kvlab/cache/quant_kernel.py); ``fused``: with the torch.compile kernel instead (kvlab/layers/fused.py, no
    rotation; a compile per layer shape and 1,024 positions, seconds each; on a GPU, or with the C++ kernel
    unavailable, instead of block by block); the other buffers are attended block by block.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_length: int | None = None,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", kv_quant=None, fused: bool = False) -> None:
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
        self.kv_quant = resolve_kv_quant(kv_quant)
        if self.kv_quant:
            check_layers(config, self.kv_quant, max_length or config.max_positions)
        for i, spec in enumerate(config.layers):
            if not spec.stores_kv:
                self.layers.append(None)
                continue
            factory = kinds.get(spec.attention).store_factory()  # the store its record names (kvlab/kinds)
            quant = for_layer(self.kv_quant, i)  # this layer's components (its overrides laid over the rest)
            if quant:
                self.layers.append(factory(spec, batch_size, max_length, dtype, device, quant=quant))
            else:
                self.layers.append(factory(spec, batch_size, max_length, dtype, device))
        if not isinstance(fused, bool):
            raise ValueError(f"fused={fused!r}: must be True or False")  # noqa: TRY004 (bad input: a ValueError)
        self.fused = fused
        if fused:
            rows = self.quant_rows()
            if not rows:
                raise ValueError("fused=True: the cache holds no quantized buffer (give kv_quant='int8', 'int4', ...)")
            for r in rows:
                r.fused = True

    def quant_rows(self) -> list[QuantRows]:
        """Every quantized buffer the cache holds (each layer's store's, :meth:`KVStore.rows`)."""
        return [r for store in self.layers for r in quant_rows(store)]

    def set_padding(self, pad: torch.Tensor | None) -> None:
        """Left-padding counts ``[B]`` of the rows (before the first write)."""
        if self.seq_len:
            raise ValueError("padding must be set before the first tokens are written to the cache")
        if pad is not None and not bool(pad.any()):
            pad = None
        self.pad = pad
        for store in self.layers:  # stores that place positions by row (sink tokens) read it once, here
            if hasattr(store, "set_padding"):
                store.set_padding(pad)

    def nbytes(self) -> int:
        """Bytes held by the cache's K/V tensors, exactly."""
        return sum(self.per_layer_nbytes())

    def per_layer_nbytes(self) -> list[int]:
        return [0 if s is None else s.nbytes() for s in self.layers]
