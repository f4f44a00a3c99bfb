"""Growing a store's buffers: doubling capacity, keeping what is held (every store without a ``max_length``); a
buffer of 2 MiB or more on the CPU in huge pages (kvlab/hugepages.py)."""

from __future__ import annotations

import torch

from .. import hugepages


def grown(t: torch.Tensor, dim: int, capacity: int, keep: int) -> torch.Tensor:
    """A new tensor like ``t`` with ``capacity`` slots along ``dim``, its first ``keep`` copied from ``t`` (the rest
    uninitialised; in huge pages where :func:`kvlab.hugepages.empty` gives them)."""
    shape = list(t.shape)
    shape[dim] = capacity
    out = hugepages.empty(shape, t.dtype, t.device)
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
