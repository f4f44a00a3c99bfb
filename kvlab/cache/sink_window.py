"""The store of a sliding-window ``gqa`` layer with sink tokens (``GQASpec.sink_tokens``; StreamingLLM's attention
sinks, Xiao et al. 2023, arXiv 2309.17453): each row's first ``S`` real positions, written once and always attended,
plus the ring of the last ``window`` positions ``>= S``.

Layout: sink K/V ``[B, Hkv, min(S, max_length), D]`` (slot ``j`` of row ``b`` holds position ``pad_b + j``: the
row's first S real tokens, so a left-padded row attends as it would alone), ring K/V
``[B, Hkv, min(window, max_length - S), D]`` (position ``p >= S`` in slot ``(p - S) % capacity``, as
:class:`~kvlab.cache.storage.WindowKV`). Without padding no position is held twice. On a left-padded batch the
shared ring also holds a padded row's sink positions ``>= S``; the positions returned mark those as empty (``-1``)
for that row, so nothing is attended twice. Plain and preallocated, sinks and ring are two views of one tensor
(sinks first), so a decode step writes its token and reads one view: no copy, no host read. Quantized
(``kv_quant``), the sinks are two more buffers quantized like the ring (kvlab/kinds/gqa.py ``buffers``), without a
residual window: each is quantized when written; a decode step reads sinks and ring as blocked readers joined along
positions (kvlab/layers/blocked.py ``Cat``), dequantized block by block inside attention.
"""

from __future__ import annotations

import torch

from kvlab.kinds import Buffer, gqa

from ..layers.blocked import Cat
from .growth import next_capacity
from .storage import KVStore, Rows, _Buffers, _ring_positions, decode_read, positions

_SLOTS: dict[tuple, tuple[int, torch.Tensor | None, torch.Tensor]] = {}


class SinkWindowKV(KVStore):
    """Sink tokens plus a ring (see the module); ``append`` returns keys, values and positions ``[L]``, or
    ``[B, L]`` per row when a padded batch's sinks are among them (``-1``: empty or held elsewhere)."""

    def __init__(self, spec, batch: int, max_length: int | None, dtype: torch.dtype, device, quant=None) -> None:
        s, w = spec.gqa.sink_tokens, spec.window
        self.sinks, self.window, self.max_length = s, w, max_length
        self.sink_cap = min(s, max_length) if max_length else s
        ring_len = max_length - s if max_length else None  # positions the ring will ever see
        self.limit = w if ring_len is None else min(w, max(ring_len, 0))
        kvh, dk, dv = spec.num_kv_heads, spec.head_dim, spec.value_dim
        self.sink = _Buffers(gqa.sink_buffers(spec, 0), batch, dtype, device, quant)
        self.sink.resize(self.sink_cap, 0)
        self.ring = None
        if self.limit:
            bufs = [Buffer("kv", "k", kvh, 0, dk, ring=w, key=True), Buffer("kv", "v", kvh, 0, dv, ring=w)]
            self.ring = _Buffers(bufs, batch, dtype, device, quant, ring_len)
            if max_length:
                self.ring.resize(self.limit, 0)
        self.pad: torch.Tensor | None = None
        self.pad_rows: list[int] | None = None
        self.sink_end = s  # positions < sink_end may be some row's sink
        self.joined: tuple[torch.Tensor, torch.Tensor] | None = None
        if max_length:
            self._join()

    def _join(self) -> None:
        """Plain buffers of a preallocated store: sinks and ring become views of one K and one V tensor."""
        parts = [self.sink] + ([self.ring] if self.ring else [])
        rows = [r for p in parts for r in (p.rows_k, p.rows_v)]
        if not all(type(r) is Rows for r in rows):
            return
        joined = []
        for which in ("rows_k", "rows_v"):
            own = [getattr(p, which) for p in parts]
            base = torch.cat([r.t for r in own], dim=-2)
            at = 0
            for r in own:
                n = r.capacity
                r.t = base.narrow(-2, at, n)
                at += n
            joined.append(base)
        self.joined = (joined[0], joined[1])

    def set_padding(self, pad: torch.Tensor | None) -> None:
        """Left-padding counts ``[B]`` (read once, here: the rows' sink positions are host integers)."""
        self.pad = pad
        self.pad_rows = None if pad is None else [int(p) for p in pad.tolist()]
        self.sink_end = self.sinks + (0 if pad is None else max(self.pad_rows))

    def tensors(self) -> list[torch.Tensor]:
        if self.joined is not None:
            return list(self.joined)
        return self.sink.tensors() + (self.ring.tensors() if self.ring else [])

    def rows(self) -> list:
        return self.sink.rows() + (self.ring.rows() if self.ring else [])

    # -- positions ---------------------------------------------------------------------------------------------
    def slot_positions(self, n: int, device, sinks: int | None = None, ring: int | None = None) -> torch.Tensor:
        """Position held by each of the first ``sinks`` sink slots then ``ring`` ring slots (default: all) after
        ``n`` positions were written: ``[L]``, or ``[B, L]`` with padding; ``-1``: empty, or a padded row's sink
        position also held by the ring. One tensor per step shared by the layers alike (so they share a mask)."""
        sinks = self.sink_cap if sinks is None else sinks
        cap = self.ring.capacity if self.ring else 0
        ring = cap if ring is None else ring
        if torch.compiler.is_compiling():
            return self._slot_positions(n, device, sinks, cap, ring)
        key = (torch.device(device), self.sinks, sinks, cap, ring)
        hit = _SLOTS.get(key)
        if hit is None or hit[0] != n or hit[1] is not self.pad:
            hit = _SLOTS[key] = (n, self.pad, self._slot_positions(n, device, sinks, cap, ring))
        return hit[2]

    def _slot_positions(self, n: int, device, sinks: int, cap: int, ring: int) -> torch.Tensor:
        s, pad = self.sinks, self.pad
        j = positions(sinks, device)
        if pad is not None:
            j = pad[:, None] + j  # [B, sinks]
        sp = torch.where(j < n, j, -1)
        if not ring:
            return sp
        r = _ring_positions(cap, max(n - s, 0), torch.device(device))[:ring]
        rp = torch.where(r >= 0, r + s, -1)
        if pad is None:
            return torch.cat((sp, rp))
        p = pad[:, None]
        rp = torch.where((rp >= p) & (rp < p + s), -1, rp)  # [B, ring]: a row's sinks are read from the sink slots
        return torch.cat((sp, rp), dim=-1)

    # -- writing -----------------------------------------------------------------------------------------------
    def _write(self, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        # stored values carry no autograd history: sinks and ring are views of one tensor, and an in-place write of
        # a grad-carrying value into one view made the next write into the other fail outside torch.no_grad()
        k, v = k.detach(), v.detach()
        end = start + k.shape[2]
        if start < self.sink_end:
            if self.pad_rows is None:
                m = min(end, self.sink_cap) - start
                if m > 0:
                    self.sink.write(start, k.narrow(2, 0, m), v.narrow(2, 0, m))
            else:
                for b, p in enumerate(self.pad_rows):  # only while some row's sinks arrive (the first S + pad)
                    j0, j1 = max(start - p, 0), min(end - p, self.sink_cap)
                    if j0 < j1:
                        i = p + j0 - start
                        self.sink.rows_k.write(j0, k[b:b + 1, :, i:i + j1 - j0], rows=slice(b, b + 1))
                        self.sink.rows_v.write(j0, v[b:b + 1, :, i:i + j1 - j0], rows=slice(b, b + 1))
        if self.ring is not None and end > self.sinks:
            i0 = max(start, self.sinks)
            self.ring.write(i0 - self.sinks, k.narrow(2, i0 - start, end - i0), v.narrow(2, i0 - start, end - i0))

    def append(self, k, v, start):
        t = k.shape[2]
        end = start + t
        if self.max_length and end > self.max_length:
            raise ValueError(f"cache holds max_length={self.max_length} positions; {end} were requested")
        s = self.sinks
        if self.ring is not None and self.ring.capacity < self.limit and end - s > self.ring.capacity:
            self.ring.resize(min(self.limit, next_capacity(end - s, self.ring.capacity, None)), max(start - s, 0))
        no_pad_query = self.pad_rows is None or start >= max(self.pad_rows)
        if t == 1 and self.joined is not None and no_pad_query:
            # decode: write the token, read one view (a padded row's own pad query needs the general path)
            self._write(start, k, v)
            kj, vj = self.joined
            if self.pad is None and end <= kj.shape[2]:  # nothing wrapped yet: slot i holds position i
                return kj.narrow(2, 0, end), vj.narrow(2, 0, end), positions(end, k.device)
            return kj, vj, self.slot_positions(end, k.device)
        if t == 1 and no_pad_query and start > 0:  # a quantized decode step: the sinks then the ring, as readers
            self._write(start, k, v)
            ns, held = self.sink_cap, self.ring.capacity if self.ring is not None else 0
            if self.pad is None and end <= ns + held:  # nothing wrapped yet: slot i holds position i
                ns, held = min(end, ns), max(0, end - s) if self.ring is not None else 0
                kpos = positions(end, k.device)
            else:
                kpos = self.slot_positions(end, k.device)
            parts = [(self.sink, ns)] + ([(self.ring, held)] if held else [])
            kv = [Cat([decode_read(getattr(p, which), m) for p, m in parts], -2) for which in ("rows_k", "rows_v")]
            return *(x.parts[0] if len(parts) == 1 else x for x in kv), kpos
        if start == 0:
            self._write(start, k, v)
            return k, v, positions(end, k.device)
        # a chunk (or a quantized / growing store): what was held before it, then the chunk itself
        if self.pad_rows is None:
            ns = min(start, self.sink_cap)
        else:
            ns = min(self.sink_cap, max(0, start - min(self.pad_rows)))
        rs = max(start - s, 0)
        held = min(rs, self.ring.capacity) if self.ring is not None else 0
        ks, vs = [self.sink.rows_k.read(ns)], [self.sink.rows_v.read(ns)]
        if held:
            ks.append(self.ring.rows_k.read(held))
            vs.append(self.ring.rows_v.read(held))
        kpos = self.slot_positions(start, k.device, ns, held)
        new = torch.arange(start, end, device=k.device)
        if kpos.dim() == 2:
            new = new.expand(kpos.shape[0], t)
        kpos = torch.cat((kpos, new), dim=-1)
        k_all, v_all = torch.cat((*ks, k), dim=2), torch.cat((*vs, v), dim=2)
        self._write(start, k, v)
        return k_all, v_all, kpos


__all__ = ["SinkWindowKV"]
