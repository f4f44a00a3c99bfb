"""Decode attention over a quantized cache, block by block: the whole dequantized K/V never exists.

A decode step (one query per row) over ``L`` cached positions whose K/V are a blocked reader
(kvlab/cache/quant.py ``QuantView``) and span more than one block runs in two passes over a few large blocks: scores ``q.k`` block by block into
``[B, Hkv, G, L]`` (G query heads per KV head: small next to K), one exact softmax over them (mask and sink logits
as in ``core.attend``), then ``p.v`` accumulated block by block. Where the scales are one per token and group of
channels (``foldable``) and few (at most ``FOLD_ROWS`` query heads x groups per KV head), a block is its codes
cast to float32 and the scales are applied on the small side --
``q.k = sum_g s_g (q_g . c_g) + z_g sum(q_g)`` and ``p.v = sum_g (p s_g) c_g + (p z_g)`` -- instead of multiplying
every code (rotated keys: the query is rotated, ``q.Hk = Hq.k``); otherwise a block is dequantized (``block``).

Every kind reads its cache through the same readers: a :class:`Cat` joins readers or tensors along positions (CSA/HCA:
the window ring then the compressed entries; a sink-token window: the sinks then the ring) or along channels (MLA:
keys ``[c_kv, k_pe]``, two buffers quantized apart); :func:`scores` is the blocked ``q.k`` alone (indexers: DSA's and
CSA's keys), :func:`gather` dequantizes only the rows a top-k chose. Tensor operations only, no host read; the loop
is over blocks (a handful) and parts (two), never tokens or heads. Computed in float32 whatever the cache dtype.
"""

from __future__ import annotations

from typing import Protocol

import torch

from kvlab.cache.quant import rotate

from .sinks import softmax_with_sink


class BlockedKV(Protocol):
    """What :func:`attend_blocked` reads K or V through (kvlab/cache/quant.py ``QuantView``)."""

    shape: tuple[int, ...]
    n: int
    foldable: bool

    def block_size(self) -> int: ...

    def block(self, lo: int, hi: int, slot: int = 0) -> torch.Tensor: ...

    def raw(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]: ...

    def dense(self) -> torch.Tensor: ...


class Cat:
    """Readers or tensors joined along ``axis`` -2 (positions) or -1 (channels), read part by part (nothing is
    concatenated until :meth:`dense`). ``shape``: the joined shape."""

    def __init__(self, parts: list, axis: int) -> None:
        if axis not in (-2, -1):
            raise ValueError(f"Cat axis={axis}: allowed: -2 (positions), -1 (channels)")
        self.parts, self.axis = list(parts), axis
        shape = list(self.parts[0].shape)
        shape[axis] = sum(p.shape[axis] for p in self.parts)
        self.shape = tuple(shape)
        self.n = shape[-2]

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].dtype

    def offsets(self) -> list[tuple[int, int]]:
        """``(lo, hi)`` of each part along the axis."""
        out, at = [], 0
        for p in self.parts:
            out.append((at, at + p.shape[self.axis]))
            at += p.shape[self.axis]
        return out

    def dense(self) -> torch.Tensor:
        return torch.cat([dense(p) for p in self.parts], dim=self.axis)


def is_blocked(x) -> bool:
    """``x`` is a blocked reader (or a :class:`Cat`) rather than a tensor."""
    return not isinstance(x, torch.Tensor)


def one_block(x) -> bool:
    """``x`` is a tensor or a reader whose slots fit one block: read whole, it costs no more memory than a block
    (and attention runs in ``scaled_dot_product_attention`` as over an unquantized cache)."""
    if isinstance(x, Cat):
        return all(one_block(p) for p in x.parts)
    return not is_blocked(x) or x.n <= x.block_size()


def dense(x) -> torch.Tensor:
    """A tensor of ``x`` (a blocked reader dequantized whole)."""
    return x.dense() if is_blocked(x) else x


def prepare(x):
    """``x`` for a decode step: a reader that fits one block read whole (a tensor), a :class:`Cat` part by part."""
    if isinstance(x, Cat):
        return Cat([prepare(p) for p in x.parts], x.axis)
    return dense(x) if one_block(x) else x


def with_heads(x):
    """``x [B, L, D]`` (one row per sequence: MLA's latent, CSA/HCA entries) as ``[B, 1, L, D]``."""
    if isinstance(x, Cat):
        return Cat([with_heads(p) for p in x.parts], x.axis)
    return x.with_heads() if is_blocked(x) else x[:, None]


def channels(x, lo: int, hi: int):
    """Channels ``lo..hi-1`` of ``x`` (a tensor, or a channel :class:`Cat` whose parts cover them exactly: MLA's
    values ``c_kv`` out of its keys ``[c_kv, k_pe]``)."""
    if not is_blocked(x):
        return x[..., lo:hi]
    if isinstance(x, Cat) and x.axis == -1:
        inside = [p for p, (a, b) in zip(x.parts, x.offsets(), strict=True) if lo <= a and b <= hi]
        if sum(p.shape[-1] for p in inside) == hi - lo:
            return inside[0] if len(inside) == 1 else Cat(inside, -1)
    raise ValueError(f"channels {lo}..{hi - 1}: not a union of the reader's parts")


def gather(x, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx [B, k]`` of ``x [B, L, D]`` (a tensor, a reader: only those rows dequantized, or a channel
    :class:`Cat`) -> ``[B, k, D]``."""
    if isinstance(x, Cat):
        if x.axis != -1:
            raise ValueError("gather: rows of a reader joined along positions")
        return torch.cat([gather(p, idx) for p in x.parts], dim=-1)
    if is_blocked(x):
        return x.gather(idx)
    return x.gather(1, idx[..., None].expand(*idx.shape, x.shape[-1]))


def _ranges(x, n: int):
    if not is_blocked(x):  # one block, without a range() over n: a compiled step would fix n (a graph per step)
        return [(0, n)] if n > 0 else []
    size = x.block_size()
    return [(lo, min(n, lo + size)) for lo in range(0, n, size)]


def _groups(x) -> int:
    """Scale groups per row of a foldable reader (1 for a tensor)."""
    return x.rows.dq // x.rows.group if is_blocked(x) else 1


FOLD_ROWS = 16  # fold the scales when (query heads per KV head) x (scale groups per row) is at most this


def _folds(x, g: int) -> bool:
    """Apply ``x``'s scales on the small side: its scales allow it and the folded matrix products stay thin (each
    product has ``g x groups`` rows instead of ``g``; a wide one costs more than scaling the block)."""
    return is_blocked(x) and x.foldable and g * _groups(x) <= FOLD_ROWS


def scores(qf: torch.Tensor, k) -> torch.Tensor:
    """``qf [B, Hkv, G, D]`` (float32) against every key of ``k [B, Hkv, L, D]`` (a reader, a :class:`Cat` or a
    tensor), block by block -> ``[B, Hkv, G, L]`` float32 (indexers apply their relu and head weights to it)."""
    return _scores(qf.contiguous(), k, k.shape[-2])


def _scores(qf: torch.Tensor, k, n: int) -> torch.Tensor:
    """``qf [B, Hkv, G, D]`` (float32) against every key -> ``[B, Hkv, G, n]``."""
    if isinstance(k, Cat):
        if k.axis == -2:  # parts along positions: their scores side by side
            return torch.cat([_scores(qf, p, p.shape[-2]) for p in k.parts], dim=-1)
        out = None  # parts along channels: q.k summed over them
        for p, (lo, hi) in zip(k.parts, k.offsets(), strict=True):
            part = _scores(qf[..., lo:hi].contiguous(), p, n)
            out = part if out is None else out.add_(part)
        return out
    if not _folds(k, qf.shape[2]):
        blocks = (k.block(lo, hi) if is_blocked(k) else k.narrow(-2, lo, hi - lo).float() for lo, hi in _ranges(k, n))
        return torch.cat([qf @ kb.transpose(-1, -2) for kb in blocks], dim=-1)
    b, hkv, g, d = qf.shape
    ng = _groups(k)
    if k.rows.block:
        qf = rotate(qf, k.rows.block)
    qg = qf.view(b, hkv, g, ng, d // ng)
    qsum = qg.sum(-1)  # [B, Hkv, G, ng]: what a zero point multiplies
    if ng > 1:  # one query row per (head, group), zero outside the group: [B, Hkv, G * ng, D]
        eye = torch.eye(ng, dtype=qf.dtype, device=qf.device)
        qf = (qg[..., None, :] * eye[:, :, None]).reshape(b, hkv, g * ng, d)
    out = []
    for lo, hi in _ranges(k, n):
        c, s, z = k.raw(lo, hi)  # [B, Hkv, m, D], [B, Hkv, m, ng] x2
        part = (qf @ c.transpose(-1, -2)).view(b, hkv, g, ng, hi - lo)  # sum over each group's channels of q c
        st = s.transpose(-1, -2)[:, :, None]  # [B, Hkv, 1, ng, m]
        sc = (part * st).sum(3) if ng > 1 else part[:, :, :, 0] * st[:, :, :, 0]
        if z is not None:
            sc = sc + qsum @ z.transpose(-1, -2)
        out.append(sc)
    return torch.cat(out, dim=-1)


def _weighted_values(p: torch.Tensor, v, n: int) -> torch.Tensor:
    """``p [B, Hkv, G, n]`` (float32) times the values -> ``[B, Hkv, G, Dv]``."""
    if isinstance(v, Cat):
        if v.axis == -1:  # parts along channels: their outputs side by side
            return torch.cat([_weighted_values(p, part, n) for part in v.parts], dim=-1)
        out = None  # parts along positions: each part's probabilities times its values, summed
        for part, (lo, hi) in zip(v.parts, v.offsets(), strict=True):
            o = _weighted_values(p[..., lo:hi], part, hi - lo)
            out = o if out is None else out.add_(o)
        return out
    out = None
    if not _folds(v, p.shape[2]):
        for lo, hi in _ranges(v, n):
            vb = v.block(lo, hi) if is_blocked(v) else v.narrow(-2, lo, hi - lo).float()
            part = p[..., lo:hi] @ vb
            out = part if out is None else out.add_(part)
        return out
    b, hkv, g, _ = p.shape
    ng = _groups(v)
    for lo, hi in _ranges(v, n):
        c, s, z = v.raw(lo, hi)
        d = c.shape[-1]
        pb = p[..., lo:hi]  # [B, Hkv, G, m]
        if ng == 1:
            part = (pb * s.transpose(-1, -2)) @ c
        else:  # (p s_g) c for every group g, then each group's own channels
            pw = (pb[:, :, :, None] * s.transpose(-1, -2)[:, :, None]).reshape(b, hkv, g * ng, hi - lo)
            full = (pw @ c).view(b, hkv, g, ng, ng, d // ng)
            part = full.diagonal(dim1=3, dim2=4).transpose(-1, -2).reshape(b, hkv, g, d)
        if z is not None:
            part = part + (pb @ z).repeat_interleave(d // ng, -1)
        out = part if out is None else out.add_(part)
    return out


def values_in_keys(k, v) -> bool:
    """The values are the keys (CSA/HCA/SWA: K = V) or the keys' first channels (MLA: values ``c_kv`` of keys
    ``[c_kv, k_pe]``): one pass over the blocks reads both."""
    return v is k or (isinstance(k, Cat) and k.axis == -1 and v is k.parts[0])


def _key_blocks(k, n: int, at: int = 0):
    """``(lo, hi, blocks)`` walking ``k [B, Hkv, n, D]`` block by block from position ``at``: ``blocks`` the
    float32 block of each channel part (one for a reader or a tensor; a channel :class:`Cat`: one per part, each
    reader in its own scratch slot)."""
    if isinstance(k, Cat) and k.axis == -2:
        for part, (lo, hi) in zip(k.parts, k.offsets(), strict=True):
            yield from _key_blocks(part, hi - lo, at + lo)
        return
    parts = k.parts if isinstance(k, Cat) else [k]
    size = min([p.block_size() for p in parts if is_blocked(p)] or [max(n, 1)])
    for lo in range(0, n, size):
        hi = min(n, lo + size)
        yield at + lo, at + hi, [p.block(lo, hi, i) if is_blocked(p) else p.narrow(-2, lo, hi - lo).float()
                                 for i, p in enumerate(parts)]


def _attend_one_pass(qf: torch.Tensor, k, mask: torch.Tensor | None, scale: float, sinks: torch.Tensor | None
                     ) -> torch.Tensor:
    """:func:`attend_blocked` where the values are in the keys (:func:`values_in_keys`): each block is read once
    for its scores and its values, the softmax kept online (running maximum, rescaled sums; FlashDecoding).
    ``qf [B, Hkv, G, D]`` float32 -> ``[B, Hkv, G, Dv]``."""
    n = k.shape[-2]
    if isinstance(k, Cat) and k.axis == -1:
        qs = [qf[..., lo:hi] for lo, hi in k.offsets()]
    else:
        qs = [qf]
    if mask is not None:
        mask = mask.reshape(mask.shape[0], 1, 1, n)
    m = den = acc = safe = None
    for lo, hi, blocks in _key_blocks(k, n):
        s = None
        for qp, kb in zip(qs, blocks, strict=True):
            part = qp @ kb.transpose(-1, -2)
            s = part if s is None else s.add_(part)
        s = s * scale
        if mask is not None:
            s = s + mask[..., lo:hi]
        top = s.amax(-1, keepdim=True)
        m = top if m is None else torch.maximum(m, top)
        last, safe = safe, torch.where(m == float("-inf"), 0.0, m)  # rows with nothing visible yet stay finite
        p = (s - safe).exp_()
        pv = p @ blocks[0]  # the values: the block itself, or its first channel part
        if acc is None:
            den, acc = p.sum(-1, keepdim=True), pv
        else:
            corr = (last - safe).exp_()
            den, acc = den * corr + p.sum(-1, keepdim=True), acc * corr + pv
    if sinks is not None:
        den = den + (sinks - safe).exp()
    return acc / den


def attend_blocked(q: torch.Tensor, k, v, mask: torch.Tensor | None, scale: float,
                   sinks: torch.Tensor | None = None) -> torch.Tensor:
    """q ``[B, H, 1, D]``, k / v ``[B, Hkv, L, D]`` (blocked readers or tensors) -> ``[B, H, 1, Dv]`` in q's dtype.

    ``mask``: additive ``[B|1, 1, 1, L]`` or None; ``sinks [H]``: a per-head logit in the softmax denominator.
    Values in the keys (:func:`values_in_keys`): one pass; otherwise scores, then values."""
    b, h, t, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    g = h // hkv
    if values_in_keys(k, v):
        sk = None if sinks is None else sinks.float().view(1, hkv, g, 1)
        out = _attend_one_pass(q.reshape(b, hkv, g, d).float(), k, mask, scale, sk)
        return out.reshape(b, h, t, out.shape[-1]).to(q.dtype)
    s = _scores(q.reshape(b, hkv, g, d).float(), k, n) * scale  # [B, Hkv, G, L]
    if mask is not None:
        s = s + mask.reshape(mask.shape[0], 1, 1, n)
    if sinks is None:  # normalised after p.v, as SDPA's kernel does
        p = (s - s.amax(-1, keepdim=True)).exp_()
        den = p.sum(-1, keepdim=True)
    else:
        p = softmax_with_sink(s, sinks.float().view(1, hkv, g, 1).expand(b, hkv, g, 1))
        den = None
    out = _weighted_values(p, v, n)
    out = out if den is None else out / den
    return out.reshape(b, h, t, out.shape[-1]).to(q.dtype)


__all__ = ["BlockedKV", "Cat", "attend_blocked", "channels", "dense", "gather", "is_blocked", "one_block", "prepare",
           "scores", "values_in_keys", "with_heads"]
