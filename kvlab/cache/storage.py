"""Per-layer K/V storage: full (every position) and window (a ring of exactly ``window`` slots).

Both store K as ``[B, Hkv, L, Dk]`` and V as ``[B, Hkv, L, Dv]`` so attention reads views without
copies. With a known ``max_length`` the tensors are allocated once; without, they grow
geometrically (full) or up to the window (ring).
"""

from __future__ import annotations

import torch

from kvlab.costs.quant import for_buffer
from kvlab.kinds import Buffer

from .growth import grown, next_capacity
from .quant import QuantRows

_ARANGE: dict[torch.device, torch.Tensor] = {}


_VIEWS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def positions(n: int, device) -> torch.Tensor:
    """``arange(n)`` as a view of a shared, grown-on-demand tensor (no allocation per decode step).

    The same view object for consecutive calls with the same ``n``: every full-cache layer of one forward call gets
    the one tensor, so :meth:`kvlab.layers.core.Step.mask` (keyed by the tensor's identity) builds one mask per call,
    not one per layer (a ``[1, 1, 512, 16K]`` fp32 mask is 32 MiB; qwen3-100m's 12 layers held 12 of them through a
    16K prefill chunk, docs/performance.md)."""
    device = torch.device(device)
    r = _ARANGE.get(device)
    if r is None or r.shape[0] < n:
        r = _ARANGE[device] = torch.arange(max(n, 2 * (0 if r is None else r.shape[0]), 1024), device=device)
    if torch.compiler.is_compiling():  # no Python-side state written from a traced step
        return r[:n]
    hit = _VIEWS.get(device)
    if hit is None or hit[0] is not r or hit[1].shape[0] != n:
        hit = _VIEWS[device] = (r, r[:n])
    return hit[1]


_SPANS: dict[torch.device, tuple[int, int, torch.Tensor]] = {}


def span_positions(lo: int, hi: int, device) -> torch.Tensor:
    """``arange(lo, hi)``, the same tensor for consecutive calls with the same span: the window layers of one prefill
    chunk attend to the same positions, so :meth:`kvlab.layers.core.Step.mask` builds their mask once."""
    device = torch.device(device)
    if torch.compiler.is_compiling():
        return torch.arange(lo, hi, device=device)
    hit = _SPANS.get(device)
    if hit is None or hit[0] != lo or hit[1] != hi:
        hit = _SPANS[device] = (lo, hi, torch.arange(lo, hi, device=device))
    return hit[2]


_RINGS: dict[tuple[torch.device, int], tuple[int, torch.Tensor]] = {}


def ring_positions(cap: int, n: int, device) -> torch.Tensor:
    """Absolute position held by each slot ``[cap]`` of a ring of ``cap`` slots after ``n`` positions were written
    (``-1``: empty): the rotated position vector.

    The last one built for each ring size is kept, so the layers of one decode step share one tensor (and the
    step's mask cache, keyed by that tensor, builds one mask for all of them) instead of allocating per layer.
    A compiled step computes it in its graph."""
    device = torch.device(device)
    if torch.compiler.is_compiling():
        return _ring_positions(cap, n, device)
    hit = _RINGS.get((device, cap))
    if hit is None or hit[0] != n:
        hit = _RINGS[(device, cap)] = (n, _ring_positions(cap, n, device))
    return hit[1]


def _ring_positions(cap: int, n: int, device) -> torch.Tensor:
    s = torch.arange(cap, device=device)
    return torch.where(s <= n - 1, s + cap * torch.div(n - 1 - s, cap, rounding_mode="floor"), -1)


class KVStore:
    """The store protocol every kind's store follows: ``append`` new entries and return what the current queries
    attend to; ``tensors()`` (what it holds), ``nbytes()``, ``components()`` and ``state_nbytes()`` (what the
    calculator prices, byte for byte); ``rows()`` (its per-position buffers). A layer never writes a store's tensors
    itself."""

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def rows(self) -> list[Rows | QuantRows]:
        """Its per-position buffers (:class:`Rows`, or :class:`~kvlab.cache.quant.QuantRows` under ``kv_quant``;
        a cache made with ``fused=True`` marks the quantized ones). A store of plain tensors only: none."""
        return []

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


class Rows:
    """A per-position buffer ``[*lead, capacity, dim]`` (positions on axis -2), plain: the values as given.

    ``write(start, x)`` stores ``x [*lead, T, dim]`` at positions ``start..start+T-1`` (slot = position, or
    position % capacity for a ``ring``: only the last ``capacity`` are kept); ``read(n)`` returns slots ``0..n-1``
    (a view). ``rows``: a slice of the first lead axis (stores that write row by row). A quantized buffer
    (kvlab/cache/quant.py, ``QuantRows``) has the same methods, so a store never knows which it holds.
    """

    def __init__(self, lead: tuple[int, ...], dim: int, dtype: torch.dtype, device, ring: bool = False) -> None:
        self.t = torch.zeros(*lead, 0, dim, dtype=dtype, device=device)
        self.ring = ring

    @property
    def capacity(self) -> int:
        return self.t.shape[-2]

    def resize(self, capacity: int, keep: int) -> None:
        cap = self.capacity
        self.t = grown(self.t, -2, capacity, keep)
        if capacity > cap:
            self.t.narrow(-2, cap, capacity - cap).zero_()  # not yet written: reads as zeros

    def write(self, start: int, x: torch.Tensor, rows: slice | None = None) -> None:
        if not x.shape[-1]:  # zero-width rows (the values of a K = V layer): nothing to store
            return
        t = self.t if rows is None else self.t[rows]
        n, cap = x.shape[-2], self.capacity
        if not self.ring:
            t.narrow(-2, start, n).copy_(x)
        elif n == 1 and torch.compiler.is_compiling():  # the slot as a tensor index: a view at the traced slot made
            # inductor's in-place pass guard on its offset being 0 (slot 0 or not: a second graph once the ring wraps)
            t.index_copy_(t.dim() - 2, torch.full((1,), start % cap, dtype=torch.long, device=x.device), x)
        elif n == 1:
            t.select(-2, start % cap).copy_(x.select(-2, 0))
        else:
            keep = min(n, cap)
            end = start + n
            t.index_copy_(t.dim() - 2, torch.arange(end - keep, end, device=x.device) % cap, x.narrow(-2, n - keep, keep))

    def write_rows(self, at: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> None:
        """Store ``x [B, 1, dim]`` at slot ``at[b]`` of each row ``b`` where ``mask [B]`` holds (lead ``[B]``; a
        masked write, no host read)."""
        rows = torch.arange(x.shape[0], device=x.device)
        slot = at.clamp(0, max(self.capacity - 1, 0))
        self.t[rows, slot] = torch.where(mask[:, None], x[:, 0], self.t[rows, slot])

    def write_at(self, rows: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> None:
        """Store ``x [K, dim]`` at slot ``slots[k]`` of row ``rows[k]`` (lead ``[B]``; distinct pairs)."""
        self.t[rows, slots] = x.to(self.t.dtype)

    def read(self, n: int | None = None, rows: slice | None = None) -> torch.Tensor:
        t = self.t if rows is None else self.t[rows]
        return t if n is None else t.narrow(-2, 0, n)

    def tensors(self) -> list[torch.Tensor]:
        return [self.t]


def rows_for(buf, lead: tuple[int, ...], dtype: torch.dtype, device, quant=None, max_length: int | None = None):
    """A :class:`Rows` for buffer ``buf`` (a kvlab.kinds.Buffer), or a quantized one when ``quant`` (the
    resolved kv_quant mapping) gives it a spec."""
    spec = for_buffer(quant, buf.name)
    if spec is None or not buf.dim:
        return Rows(lead, buf.dim, dtype, device, ring=buf.ring is not None)
    return QuantRows(buf, spec, lead, dtype, device, max_length)


def decode_read(rows, n: int, heads: bool = False):
    """Slots ``0..n-1`` of ``rows`` for a decode step: a quantized buffer as a blocked reader (kvlab/cache/quant.py
    ``QuantView``, dequantized block by block inside attention), a plain one as its view; ``heads``: a buffer of lead
    ``[B]`` read as ``[B, 1, n, D]``."""
    if isinstance(rows, QuantRows):
        return rows.view(n, heads)
    t = rows.read(n)
    return t[:, None] if heads else t


class _Buffers:
    """The K and V :class:`Rows` of a GQA / CCA store (``[B, Hkv, L, D]`` each)."""

    def __init__(self, buffers, batch: int, dtype: torch.dtype, device, quant=None,
                 max_length: int | None = None) -> None:
        kb, vb = buffers
        self.rows_k = rows_for(kb, (batch, kb.rows), dtype, device, quant, max_length)
        self.rows_v = rows_for(vb, (batch, vb.rows), dtype, device, quant, max_length)

    @property
    def k(self) -> torch.Tensor:
        """K as stored (plain: the values; quantized: the codes)."""
        return self.rows_k.tensors()[0]

    @property
    def v(self) -> torch.Tensor:
        return self.rows_v.tensors()[0]

    @property
    def capacity(self) -> int:
        return self.rows_k.capacity

    def resize(self, capacity: int, keep: int) -> None:
        self.rows_k.resize(capacity, keep)
        self.rows_v.resize(capacity, keep)

    def write(self, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.rows_k.write(start, k)
        self.rows_v.write(start, v)

    def read(self, n: int | None = None, view: bool = False) -> tuple:
        """K and V of slots ``0..n-1``; ``view`` (a decode step): a quantized buffer as a blocked reader
        (kvlab/cache/quant.py ``QuantView``, dequantized block by block inside attention) instead of a tensor."""
        n = self.capacity if n is None else n
        return tuple(decode_read(r, n) if view else r.read(n) for r in (self.rows_k, self.rows_v))

    def tensors(self) -> list[torch.Tensor]:
        return [*self.rows_k.tensors(), *self.rows_v.tensors()]

    def rows(self) -> list[Rows | QuantRows]:
        return [self.rows_k, self.rows_v]


class FullKV(KVStore):
    """K/V for every position: ``[B, Hkv, max_length, D]``, preallocated or grown by doubling."""

    def __init__(self, batch: int, kv_heads: int, dk: int, dv: int, max_length: int | None,
                 dtype: torch.dtype, device, quant=None) -> None:
        bufs = [Buffer("kv", "k", kv_heads, 0, dk, key=True), Buffer("kv", "v", kv_heads, 0, dv)]
        self.buf = _Buffers(bufs, batch, dtype, device, quant, max_length)
        self.max_length = max_length
        if max_length:
            self.buf.resize(max_length, 0)

    def tensors(self) -> list[torch.Tensor]:
        return self.buf.tensors()

    def rows(self) -> list[Rows | QuantRows]:
        return self.buf.rows()

    def append(self, k, v, start):
        end = start + k.shape[2]
        if end > self.buf.capacity:
            self.buf.resize(next_capacity(end, self.buf.capacity, self.max_length), start)
        self.buf.write(start, k, v)
        return *self.buf.read(end, view=k.shape[2] == 1), positions(end, k.device)


class WindowKV(KVStore):
    """A ring buffer of exactly ``min(window, max_length)`` positions (sliding-window layers).

    Position ``p`` lives in slot ``p % capacity``. A chunk of several tokens attends to the ring's
    previous contents in position order (oldest first) concatenated with itself, then its last ``capacity``
    positions are written: its keys are consecutive positions, which a prefill chunk's attention splits
    (kvlab/layers/chunk_attend.py).
    """

    def __init__(self, batch: int, kv_heads: int, dk: int, dv: int, window: int, max_length: int | None,
                 dtype: torch.dtype, device, quant=None, names: tuple[str, str] = ("k", "v"), rope: int = 0) -> None:
        bufs = [Buffer("kv", names[0], kv_heads, 0, dk, ring=window, key=names[0] == "k", rope=rope),
                Buffer("kv", names[1], kv_heads, 0, dv, ring=window)]
        self.buf = _Buffers(bufs, batch, dtype, device, quant, max_length)
        self.window = window
        self.max_length = max_length
        self.limit = min(window, max_length) if max_length else window
        if max_length:
            self.buf.resize(self.limit, 0)

    def tensors(self) -> list[torch.Tensor]:
        return self.buf.tensors()

    def rows(self) -> list[Rows | QuantRows]:
        return self.buf.rows()

    def slot_positions(self, n: int, device) -> torch.Tensor:
        """Absolute position held by each slot after ``n`` positions were written (``-1``: empty); see
        :func:`ring_positions` (one tensor per step shared by every ring of the same size)."""
        return ring_positions(self.buf.capacity, n, device)

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
            self.buf.write(start, k, v)
            if end < cap:
                return *self.buf.read(end, view=True), positions(end, k.device)
            return *self.buf.read(view=True), self.slot_positions(end, k.device)
        if start == 0:
            k_all, v_all, kpos = k, v, positions(end, k.device)
        else:
            held = min(start, cap)
            k_held, v_held = self.buf.read(held)
            r = start % cap if start >= cap else held  # the oldest slot: the ring read from it on, then from 0
            k_all = torch.cat((k_held[:, :, r:], k_held[:, :, :r], k), dim=2)
            v_all = torch.cat((v_held[:, :, r:], v_held[:, :, :r], v), dim=2)
            kpos = span_positions(start - held, end, k.device)
        self.buf.write(start, k, v)
        return k_all, v_all, kpos
