"""Storage of an MLA layer (``attention='mla'``; kvlab/layers/mla.py): the latent per token, nothing per head.

One buffer ``latent [B, L, kv_lora_rank + qk_rope_head_dim]`` holds, per position, the normalised KV latent
``c_kv`` (first ``kv_lora_rank`` channels) and the rotated key ``k_pe`` shared by every head (the rest) — the
layout FlashMLA reads (576 values per token for DeepSeek V3), so a decode step reads each cached byte once and the
weight-absorbed attention takes keys ``[c_kv, k_pe]`` and values ``c_kv`` as views of it, without a copy.
With DeepSeek sparse attention (``mla.index_topk``) a second buffer ``index_keys [B, L, index_head_dim]`` holds the
indexer's keys (normalised, rotated; kept in the cache dtype, as transformers does).

Preallocated to ``max_length`` when it is known, else grown by doubling. ``nbytes()`` counts both buffers.
"""

from __future__ import annotations

import torch

from ..config import LayerSpec
from ..kinds.mla import buffers
from ..layers.blocked import Cat
from .growth import grown, next_capacity
from .storage import KVStore, decode_read, positions, rows_for


class LatentStore(KVStore):
    """The MLA latent cache of one layer: ``latent [B, L, r + d_rope]`` (+ ``index_keys [B, L, d_index]``)."""

    def __init__(self, batch: int, rank: int, rope_dim: int, index_dim: int, max_length: int | None,
                 dtype: torch.dtype, device) -> None:
        self.rank, self.rope_dim, self.index_dim = rank, rope_dim, index_dim
        self.max_length = max_length
        self.latent = torch.empty(batch, 0, rank + rope_dim, dtype=dtype, device=device)
        self.index_keys = torch.empty(batch, 0, index_dim, dtype=dtype, device=device) if index_dim else None
        if max_length:
            self._resize(max_length, 0)

    @property
    def capacity(self) -> int:
        return self.latent.shape[1]

    @property
    def c_kv(self) -> torch.Tensor:
        """The normalised KV latents held, ``[B, capacity, kv_lora_rank]`` (a view)."""
        return self.latent[..., :self.rank]

    @property
    def k_pe(self) -> torch.Tensor:
        """The rotated shared keys held, ``[B, capacity, qk_rope_head_dim]`` (a view)."""
        return self.latent[..., self.rank:]

    def tensors(self) -> list[torch.Tensor]:
        return [self.latent] + ([self.index_keys] if self.index_keys is not None else [])

    def components(self) -> dict[str, int]:
        """Bytes by part: ``c_kv``, ``k_pe`` (and ``index_keys`` with DSA)."""
        b, cap, _ = self.latent.shape
        e = self.latent.element_size()
        out = {"c_kv": b * cap * self.rank * e, "k_pe": b * cap * self.rope_dim * e}
        if self.index_keys is not None:
            out["index_keys"] = self.index_keys.numel() * self.index_keys.element_size()
        return out

    def _resize(self, capacity: int, keep: int) -> None:
        self.latent = grown(self.latent, 1, capacity, keep)
        if self.index_keys is not None:
            self.index_keys = grown(self.index_keys, 1, capacity, keep)

    def _reserve(self, start: int, end: int) -> None:
        if end > self.capacity:
            self._resize(next_capacity(end, self.capacity, self.max_length), start)

    def append(self, c_kv: torch.Tensor, k_pe: torch.Tensor, start: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store ``c_kv [B, T, r]`` and ``k_pe [B, T, d_rope]`` at ``start..start+T-1``.

        Returns the latent ``[B, end, r + d_rope]`` held so far (a view: ``[..., :r]`` is ``c_kv``), the same
        as ``latent`` again for the interface's (keys, values) pair, and the positions ``[end]``.
        """
        end = start + c_kv.shape[1]
        self._reserve(start, end)
        # one write of whole rows: two writes into the channel halves, traced with a symbolic ``start``, made inductor
        # copy the whole buffer (and copy it back) in every compiled step (docs/performance.md)
        self.latent.narrow(1, start, end - start).copy_(torch.cat((c_kv, k_pe), dim=-1))
        held = self.latent[:, :end]
        return held, held, positions(end, c_kv.device)

    def row(self, start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Position ``start``'s row ``[B, 1, r + d_rope]`` (a view, for the caller to write: a decode step's ``c_kv``
        and rotated ``k_pe``, kvlab/layers/mla.py), the latent held through it ``[B, start + 1, r + d_rope]`` and the
        positions ``[start + 1]``: :meth:`append`'s returns without its write."""
        self._reserve(start, start + 1)
        return self.latent[:, start:start + 1], self.latent[:, :start + 1], positions(start + 1, self.latent.device)

    def append_index(self, keys: torch.Tensor, start: int) -> torch.Tensor:
        """Store indexer keys ``[B, T, d_index]`` at ``start..``; returns all held ``[B, end, d_index]``."""
        if self.index_keys is None:
            raise ValueError("this MLA layer has no indexer (mla.index_topk is None)")
        end = start + keys.shape[1]
        self._reserve(start, end)
        self.index_keys[:, start:end] = keys
        return self.index_keys[:, :end]


class QuantLatentStore(LatentStore):
    """The MLA cache with quantized buffers (``kv_quant``): ``c_kv``, ``k_pe`` and DSA's ``index_keys`` each a
    :class:`~kvlab.cache.storage.Rows` (codes, scales, residual; kvlab/cache/quant.py); a decode step reads them as
    blocked readers (keys ``[c_kv, k_pe]`` a channel :class:`~kvlab.layers.blocked.Cat`), other calls dequantized."""

    def __init__(self, spec: LayerSpec, batch: int, max_length: int | None, dtype: torch.dtype, device,
                 quant) -> None:
        m = spec.mla
        self.rank, self.rope_dim, self.index_dim = m.kv_lora_rank, m.qk_rope_head_dim, m.index_head_dim or 0
        self.max_length = max_length
        self.parts = {b.name: rows_for(b, (batch,), dtype, device, quant, max_length) for b in buffers(spec, 0)}
        self.index_keys = self.parts.get("index_keys")
        if max_length:
            self._resize(max_length, 0)

    @property
    def capacity(self) -> int:
        return self.parts["c_kv"].capacity

    @property
    def c_kv(self) -> torch.Tensor:
        return self.parts["c_kv"].read()

    @property
    def k_pe(self) -> torch.Tensor:
        return self.parts["k_pe"].read()

    def tensors(self) -> list[torch.Tensor]:
        return [t for p in self.parts.values() for t in p.tensors()]

    def rows(self) -> list:
        return list(self.parts.values())

    def components(self) -> dict[str, int]:
        return {k: sum(t.numel() * t.element_size() for t in p.tensors()) for k, p in self.parts.items()}

    def _resize(self, capacity: int, keep: int) -> None:
        for p in self.parts.values():
            p.resize(capacity, keep)

    def append(self, c_kv, k_pe, start):
        end = start + c_kv.shape[1]
        self._reserve(start, end)
        self.parts["c_kv"].write(start, c_kv)
        self.parts["k_pe"].write(start, k_pe)
        if c_kv.shape[1] == 1:  # a decode step: both buffers as readers, attended block by block
            held = Cat([decode_read(self.parts[x], end) for x in ("c_kv", "k_pe")], -1)
        else:
            held = torch.cat((self.parts["c_kv"].read(end), self.parts["k_pe"].read(end)), dim=-1)
        return held, held, positions(end, c_kv.device)

    def append_index(self, keys, start):
        if self.index_keys is None:
            raise ValueError("this MLA layer has no indexer (mla.index_topk is None)")
        end = start + keys.shape[1]
        self._reserve(start, end)
        self.index_keys.write(start, keys)
        return decode_read(self.index_keys, end) if keys.shape[1] == 1 else self.index_keys.read(end)


def latent_store(spec: LayerSpec, batch: int, max_length: int | None, dtype: torch.dtype, device,
                 quant=None) -> LatentStore:
    if quant:
        return QuantLatentStore(spec, batch, max_length, dtype, device, quant)
    m = spec.mla
    return LatentStore(batch, m.kv_lora_rank, m.qk_rope_head_dim, m.index_head_dim or 0, max_length, dtype, device)


__all__ = ["LatentStore", "QuantLatentStore", "latent_store"]
