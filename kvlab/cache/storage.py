"""Per-layer K/V storage: full (every position) and window (a ring of exactly ``window`` slots).

Both store K as ``[B, Hkv, L, Dk]`` and V as ``[B, Hkv, L, Dv]`` so attention reads views without
copies. With a known ``max_length`` the tensors are allocated once; without, they grow
geometrically (full) or up to the window (ring).
"""

from __future__ import annotations

import torch

_ARANGE: dict[torch.device, torch.Tensor] = {}


def positions(n: int, device) -> torch.Tensor:
    """``arange(n)`` as a view of a shared, grown-on-demand tensor (no allocation per decode step)."""
    device = torch.device(device)
    r = _ARANGE.get(device)
    if r is None or r.shape[0] < n:
        r = _ARANGE[device] = torch.arange(max(n, 2 * (0 if r is None else r.shape[0]), 1024), device=device)
    return r[:n]


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


class KVStore:
    """The store protocol every kind's store follows: ``append`` new entries and return what the current queries
    attend to; ``tensors()`` (what it holds), ``nbytes()``, ``components()`` and ``state_nbytes()`` (what the
    calculator prices, byte for byte). A layer never writes a store's tensors itself."""

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def components(self) -> dict[str, int]:
        """Bytes by named part, as the kind's price reports them (``AttnCost.components``); empty: one part."""
        return {}

    def state_nbytes(self) -> int:
        """Bytes of the constant per-sequence state (not growing with the context), as ``AttnCost.state_bytes``."""
        return 0

    def append(self, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store the kind's new per-token entries for positions ``start..start+T-1``; return what the T queries
        attend to: ``(keys, values, positions [L])`` (``-1`` marks a slot never written).

        GQA / CCA: ``k [B, Hkv, T, Dk]``, ``v [B, Hkv, T, Dv]`` -> keys, values ``[B, Hkv, L, D]``. MLA
        (kvlab/cache/latent.py): ``c_kv [B, T, r]``, ``k_pe [B, T, d_rope]`` -> the latent ``[B, L, r + d_rope]``
        twice (keys and values are views of it). CSA / HCA / SWA (kvlab/cache/compressed.py): the window's
        ``kv [B, 1, T, d]`` (K = V) and an empty V. A kind's other state (CCA's conv tail, the compressors'
        partial blocks, MLA's indexer keys) is updated through its store's own methods, never written by a layer.
        """
        raise NotImplementedError


class _Buffers:
    def __init__(self, batch: int, kv_heads: int, dk: int, dv: int, dtype: torch.dtype, device) -> None:
        self.shape = (batch, kv_heads)
        self.dk, self.dv, self.dtype, self.device = dk, dv, dtype, device
        self.k = torch.empty(batch, kv_heads, 0, dk, dtype=dtype, device=device)
        self.v = torch.empty(batch, kv_heads, 0, dv, dtype=dtype, device=device)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def resize(self, capacity: int, keep: int) -> None:
        self.k, self.v = grown(self.k, 2, capacity, keep), grown(self.v, 2, capacity, keep)


class FullKV(KVStore):
    """K/V for every position: ``[B, Hkv, max_length, D]``, preallocated or grown by doubling."""

    def __init__(self, batch: int, kv_heads: int, dk: int, dv: int, max_length: int | None,
                 dtype: torch.dtype, device) -> None:
        self.buf = _Buffers(batch, kv_heads, dk, dv, dtype, device)
        self.max_length = max_length
        if max_length:
            self.buf.resize(max_length, 0)

    def tensors(self) -> list[torch.Tensor]:
        return [self.buf.k, self.buf.v]

    def append(self, k, v, start):
        end = start + k.shape[2]
        if end > self.buf.capacity:
            self.buf.resize(next_capacity(end, self.buf.capacity, self.max_length), start)
        self.buf.k[:, :, start:end] = k
        self.buf.v[:, :, start:end] = v
        return self.buf.k[:, :, :end], self.buf.v[:, :, :end], positions(end, k.device)


class WindowKV(KVStore):
    """A ring buffer of exactly ``min(window, max_length)`` positions (sliding-window layers).

    Position ``p`` lives in slot ``p % capacity``. A chunk of several tokens attends to the ring's
    previous contents concatenated with itself, then its last ``capacity`` positions are written.
    """

    def __init__(self, batch: int, kv_heads: int, dk: int, dv: int, window: int, max_length: int | None,
                 dtype: torch.dtype, device) -> None:
        self.buf = _Buffers(batch, kv_heads, dk, dv, dtype, device)
        self.window = window
        self.max_length = max_length
        self.limit = min(window, max_length) if max_length else window
        if max_length:
            self.buf.resize(self.limit, 0)

    def tensors(self) -> list[torch.Tensor]:
        return [self.buf.k, self.buf.v]

    def slot_positions(self, n: int, device) -> torch.Tensor:
        """Absolute position held by each slot after ``n`` positions were written (``-1``: empty)."""
        cap = self.buf.capacity
        s = torch.arange(cap, device=device)
        return torch.where(s <= n - 1, s + cap * torch.div(n - 1 - s, cap, rounding_mode="floor"), -1)

    def append(self, k, v, start):
        t = k.shape[2]
        end = start + t
        if self.max_length and end > self.max_length:
            raise ValueError(f"cache holds max_length={self.max_length} positions; {end} were requested")
        cap = self.buf.capacity
        if cap < self.limit and end > cap:  # still filling without wrap-around: grow
            self.buf.resize(min(self.limit, next_capacity(end, cap, None)), start)
            cap = self.buf.capacity
        if t == 1:
            slot = start % cap
            self.buf.k[:, :, slot] = k[:, :, 0]
            self.buf.v[:, :, slot] = v[:, :, 0]
            if end < cap:
                return self.buf.k[:, :, :end], self.buf.v[:, :, :end], positions(end, k.device)
            return self.buf.k, self.buf.v, self.slot_positions(end, k.device)
        if start == 0:
            k_all, v_all, kpos = k, v, positions(end, k.device)
        else:
            held = min(start, cap)
            prev = self.slot_positions(start, k.device)[:held] if start < cap else self.slot_positions(start, k.device)
            k_all = torch.cat((self.buf.k[:, :, :held], k), dim=2)
            v_all = torch.cat((self.buf.v[:, :, :held], v), dim=2)
            kpos = torch.cat((prev, torch.arange(start, end, device=k.device)))
        keep = min(t, cap)
        slots = torch.arange(end - keep, end, device=k.device) % cap
        self.buf.k.index_copy_(2, slots, k[:, :, t - keep:])
        self.buf.v.index_copy_(2, slots, v[:, :, t - keep:])
        return k_all, v_all, kpos


def gqa_store(spec, batch: int, max_length: int | None, dtype: torch.dtype, device) -> KVStore:
    """The store of a ``gqa`` layer: a :class:`WindowKV` ring for a window layer, else :class:`FullKV`."""
    if spec.window is not None:
        return WindowKV(batch, spec.num_kv_heads, spec.head_dim, spec.value_dim, spec.window, max_length,
                        dtype, device)
    return FullKV(batch, spec.num_kv_heads, spec.head_dim, spec.value_dim, max_length, dtype, device)
