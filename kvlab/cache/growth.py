"""Growing a store's buffers: doubling capacity, keeping what is held (every store without a ``max_length``)."""

from __future__ import annotations

import torch


def grown(t: torch.Tensor, dim: int, capacity: int, keep: int) -> torch.Tensor:
    """A new tensor like ``t`` with ``capacity`` slots along ``dim``, its first ``keep`` copied from ``t``."""
    shape = list(t.shape)
    shape[dim] = capacity
    out = t.new_empty(shape)
    if keep:
        out.narrow(dim, 0, keep).copy_(t.narrow(dim, 0, keep))
    return out


def next_capacity(needed: int, capacity: int, max_length: int | None, floor: int = 16) -> int:
    """Capacity of a growing store that must hold ``needed`` slots: doubling (at least ``floor``). A store
    preallocated to ``max_length`` positions cannot grow: a ValueError saying so."""
    if max_length:
        raise ValueError(f"cache holds max_length={max_length} positions; {needed} were requested "
                         "(build the cache with a larger max_length)")
    return max(needed, 2 * capacity, floor)
