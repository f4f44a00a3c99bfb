"""Storage of a CSA / HCA / SWA layer (``attention='csa'`` / ``'hca'`` / ``'swa'``; kvlab/layers/compressed.py).

Components (each a preallocated tensor when ``max_length`` is known; ``components()`` names them):

- ``window``: the sliding-window branch, a ring of ``min(window, max_length)`` shared K/V rows ``[B, 1, W, D]``
  (all an ``swa`` layer holds);
- ``compressed``: one entry per complete block of ``ratio`` tokens, ``[B, max_length // ratio, D]``;
- ``partial``: the raw projections (K/V and gate logits) of the block still being filled, ``ratio - 1`` rows of
  ``f x D`` each (``f = 2`` for CSA, whose entries overlap two blocks, else 1);
- ``overlap`` (CSA): the previous complete block's first series (K/V and gate logits), ``ratio`` rows of ``D``;
- ``index_keys``, ``index_partial``, ``index_overlap`` (CSA): the same three for the indexer at its head dim.

A decode step adds its token to the partial block; when the block completes, its entry is pooled and written,
exactly as a full forward computes it.
"""

from __future__ import annotations

import torch

from ..config import LayerSpec
from ..kinds.compressed import buffers
from .growth import next_capacity
from .storage import KVStore, WindowKV, decode_read, rows_for


class _Pool:
    """What one compressor keeps: entries (a per-position buffer, quantized per ``quant``), the partial block and
    (overlapping) the previous block (full precision)."""

    def __init__(self, batch: int, dim: int, ratio: int, overlap: bool, max_length: int | None, dtype, device,
                 buf=None, quant=None) -> None:
        f = 2 if overlap else 1
        self.ratio, self.dim, self.overlap = ratio, dim, overlap
        self.max_length = max_length
        cap = max_length // ratio if max_length else 0
        self.rows = rows_for(buf, (batch,), dtype, device, quant, max_length)
        self.rows.resize(cap, 0)
        self.partial_kv = torch.zeros(batch, ratio - 1, f * dim, dtype=dtype, device=device)
        self.partial_gate = torch.zeros(batch, ratio - 1, f * dim, dtype=dtype, device=device)
        if overlap:
            self.prev_kv = torch.zeros(batch, ratio, dim, dtype=dtype, device=device)
            self.prev_gate = torch.zeros(batch, ratio, dim, dtype=dtype, device=device)

    def partial(self, r: slice, lead: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The raw kv / gate rows ``[B, lead, f d]`` of the incomplete block held for rows ``r``."""
        return self.partial_kv[r, :lead], self.partial_gate[r, :lead]

    def previous_block(self, r: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Series ``a`` (kv, gate ``[B, m, d]``) of the last complete block (overlapping compressors)."""
        return self.prev_kv[r], self.prev_gate[r]

    def commit(self, r: slice, first: int, new: torch.Tensor, kv: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """Store ``new`` entries ``[B, n, d]`` (blocks ``first..first+n-1``) for rows ``r``, the last complete
        block's first series (overlap) and the leftover raw rows of ``kv`` / ``gate`` ``[B, n m + rest, f d]`` as
        the next partial block. Returns every entry held for those rows ``[B, first + n, d]``."""
        m, d, n = self.ratio, self.dim, new.shape[1]
        used, end = n * m, first + n
        if n:
            self.reserve(end)
            self.rows.write(first, new, rows=r)
            if self.overlap:
                self.prev_kv[r] = kv[:, used - m:used, :d]
                self.prev_gate[r] = gate[:, used - m:used, :d]
        rest = kv.shape[1] - used
        if rest:
            self.partial_kv[r, :rest] = kv[:, used:]
            self.partial_gate[r, :rest] = gate[:, used:]
        return self.rows.read(end, rows=r)

    def commit_rows(self, first: torch.Tensor, counts: torch.Tensor, new: torch.Tensor, kv: torch.Tensor,
                    gate: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
        """A left-padded prefill call, every row at once (kvlab/layers/compressed.py ``Compressor.update_padded``):
        row ``r`` stores its ``counts[r]`` entries ``new [B, n, d]`` at blocks ``first[r]..``, (overlap) the first
        series of its last complete block and, as its partial block, the ``rest[r]`` raw rows after its complete
        blocks; ``kv`` / ``gate [B, n m + m - 1, f d]``: each row's raw rows from the start of its first block.
        Returns every entry held ``[B, max(first + counts), d]``."""
        m, d = self.ratio, self.dim
        b, n = new.shape[:2]
        dev = new.device
        end = int((first + counts).max())
        if n:
            self.reserve(end)
            w = torch.arange(n, device=dev)[None]
            keep = w < counts[:, None]  # [B, n] the row's own blocks
            rows = torch.arange(b, device=dev)[:, None].expand(b, n)
            self.rows.write_at(rows[keep], (first[:, None] + w)[keep], new[keep])
            if self.overlap:
                last = ((counts - 1).clamp(min=0) * m)[:, None, None] + torch.arange(m, device=dev)[None, :, None]
                has = (counts > 0)[:, None, None]
                self.prev_kv.copy_(torch.where(has, kv[..., :d].gather(1, last.expand(-1, -1, d)), self.prev_kv))
                self.prev_gate.copy_(torch.where(has, gate[..., :d].gather(1, last.expand(-1, -1, d)), self.prev_gate))
        if m > 1:
            j = torch.arange(m - 1, device=dev)[None]
            at = (counts[:, None] * m + j)[..., None].expand(-1, -1, kv.shape[-1])
            left = (j < rest[:, None])[..., None]
            self.partial_kv.copy_(torch.where(left, kv.gather(1, at), self.partial_kv))
            self.partial_gate.copy_(torch.where(left, gate.gather(1, at), self.partial_gate))
        return self.rows.read(end)

    def commit_step(self, w: torch.Tensor, lead: torch.Tensor, active: torch.Tensor, complete: torch.Tensor,
                    new: torch.Tensor, kv: torch.Tensor, block_kv: torch.Tensor, block_gate: torch.Tensor,
                    n: int) -> torch.Tensor:
        """One decode token per row (kvlab/layers/compressed.py ``Compressor.step``): rows whose token completes
        block ``w [B]`` store ``new [B, 1, d]`` there and (overlap) the block's first series from ``block_kv`` /
        ``block_gate [B, m, f d]``; the other active rows keep the token's raw ``kv`` (and gate, the last row of
        ``block_gate``) at slot ``lead [B]`` of the partial block. Masks, not branches, no host read (quantized
        entries too: ``write_rows``). Returns the first ``n`` entries: a reader of ``[B, n, d]`` (quantized: dequantized
        block by block or only the rows a top-k chose, kvlab/layers/blocked.py; plain: a view)."""
        m, d = self.ratio, self.dim
        self.reserve(n)
        rows = torch.arange(w.shape[0], device=w.device)
        if self.rows.capacity:  # a masked write at each row's block
            self.rows.write_rows(w, new, complete)
        if self.overlap:
            c = complete[:, None, None]
            self.prev_kv.copy_(torch.where(c, block_kv[..., :d], self.prev_kv))
            self.prev_gate.copy_(torch.where(c, block_gate[..., :d], self.prev_gate))
        if m > 1:
            li = lead.clamp(0, m - 2)
            keep = (active & ~complete)[:, None]
            self.partial_kv[rows, li] = torch.where(keep, kv[:, 0], self.partial_kv[rows, li])
            self.partial_gate[rows, li] = torch.where(keep, block_gate[:, -1], self.partial_gate[rows, li])
        return decode_read(self.rows, n)

    def hold_step(self, lead: int, kv: torch.Tensor, gate: torch.Tensor, n: int):
        """An eager decode step without padding whose token does not complete its block (every row at position
        ``start``, ``lead = start % m < m - 1``, a Python int): the token's raw ``kv`` / ``gate [B, 1, f d]`` join the
        partial block at slot ``lead``, nothing is pooled. What :meth:`commit_step` writes for such a step, without
        the masks. Returns the first ``n`` entries held (as :meth:`commit_step`)."""
        self.reserve(n)
        self.partial_kv.narrow(1, lead, 1).copy_(kv)
        self.partial_gate.narrow(1, lead, 1).copy_(gate)
        return decode_read(self.rows, n)

    def complete_step(self, w: int, new: torch.Tensor, block_kv: torch.Tensor, block_gate: torch.Tensor,
                      n: int):
        """An eager decode step without padding whose token completes block ``w`` on every row (a Python int):
        store its entry ``new [B, 1, d]`` and (overlap) the block's first series from ``block_kv`` / ``block_gate
        [B, m, f d]``; the partial block is left as it is (the next token starts it again). What
        :meth:`commit_step` writes for such a step, without the masks. Returns the first ``n`` entries held."""
        d = self.dim
        self.reserve(n)
        self.rows.write(w, new)  # every row at block w (plain or quantized entries alike)
        if self.overlap:
            self.prev_kv.copy_(block_kv[..., :d])
            self.prev_gate.copy_(block_gate[..., :d])
        return decode_read(self.rows, n)

    def state(self) -> list[torch.Tensor]:
        return [self.partial_kv, self.partial_gate] + ([self.prev_kv, self.prev_gate] if self.overlap else [])

    def reserve(self, n: int) -> None:
        """Room for ``n`` entries (grows by doubling without a ``max_length``)."""
        cap = self.rows.capacity
        if n > cap:  # as preallocated: entries not yet written read as zeros
            self.rows.resize(next_capacity(n, cap, self.max_length, floor=4), cap)


class CompressedStore(KVStore):
    """The sliding-window ring plus the compressor (and, for CSA, indexer) state of one layer."""

    def __init__(self, spec: LayerSpec, batch: int, max_length: int | None, dtype: torch.dtype, device,
                 quant=None) -> None:
        c = spec.compress
        csa = c.indexed
        b = {x.name: x for x in buffers(spec, 0)}  # the buffers the price names (kvlab/kinds/compressed.py)
        self.window = WindowKV(batch, 1, spec.head_dim, 0, spec.window, max_length, dtype, device, quant,
                               names=("window", "window"), rope=b["window"].rope)
        self.pool = _Pool(batch, spec.head_dim, c.ratio, csa, max_length, dtype, device, b.get("compressed"),
                          quant) if c.ratio else None
        self.index = _Pool(batch, c.index_head_dim, c.ratio, True, max_length, dtype, device, b.get("index_keys"),
                           quant) if csa else None

    @property
    def buf(self):
        return self.window.buf

    def tensors(self) -> list[torch.Tensor]:
        out = list(self.window.tensors())
        if self.pool is not None:
            out += [*self.pool.rows.tensors(), *self.pool.state()]
        if self.index is not None:
            out += [*self.index.rows.tensors(), *self.index.state()]
        return out

    def rows(self) -> list:
        """The window's buffers, the compressed entries' and the indexer keys' (the partial blocks are plain)."""
        return [*self.window.rows(), *(p.rows for p in (self.pool, self.index) if p is not None)]

    def state_nbytes(self) -> int:
        """The compressors' partial and overlap blocks (constant per sequence)."""
        pools = [p for p in (self.pool, self.index) if p is not None]
        return sum(t.numel() * t.element_size() for p in pools for t in p.state())

    def components(self) -> dict[str, int]:
        def nb(ts):
            return sum(t.numel() * t.element_size() for t in ts)

        out = {"window": nb(self.window.tensors())}
        if self.pool is None:  # swa: no compressor
            return out
        out |= {"compressed": nb(self.pool.rows.tensors()), "partial": nb([self.pool.partial_kv, self.pool.partial_gate])}
        if self.index is not None:
            out["overlap"] = nb([self.pool.prev_kv, self.pool.prev_gate])
            out["index_keys"] = nb(self.index.rows.tensors())
            out["index_partial"] = nb([self.index.partial_kv, self.index.partial_gate])
            out["index_overlap"] = nb([self.index.prev_kv, self.index.prev_gate])
        return out

    def append(self, k, v, start):
        return self.window.append(k, v, start)


def compressed_store(spec: LayerSpec, batch: int, max_length: int | None, dtype: torch.dtype, device,
                     quant=None) -> CompressedStore:
    return CompressedStore(spec, batch, max_length, dtype, device, quant)

