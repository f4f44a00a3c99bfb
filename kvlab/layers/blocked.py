"""Decode attention over a quantized cache, block by block: the whole dequantized K/V never exists.

A decode step (one query per row) over ``L`` cached positions whose K/V are a blocked reader
(kvlab/cache/quant.py ``QuantView``) and span more than one block runs in one pass over a few large blocks, the
softmax kept online (running maximum, rescaled sums; FlashDecoding; mask and sink logits as in ``core.attend``):
each block's scores ``q.k`` then, right after, its ``p.v`` (values in the keys -- MLA, CSA/HCA/SWA -- from the same
dequantized block). Where the scales are one per token and group of channels (``foldable``) and few (at most
``FOLD_ROWS`` query heads x groups per KV head), a block is its codes cast to float32 and the scales are applied on
the small side -- ``q.k = sum_g s_g (q_g . c_g) + z_g sum(q_g)`` and ``p.v = sum_g (p s_g) c_g + (p z_g)`` -- instead
of multiplying every code (rotated keys: the query is rotated, ``q.Hk = Hq.k``); otherwise a block is dequantized
(``block``).

Every kind reads its cache through the same readers: a :class:`Cat` joins readers or tensors along positions (CSA/HCA:
the window ring then the compressed entries; a sink-token window: the sinks then the ring) or along channels (MLA:
keys ``[c_kv, k_pe]``, two buffers quantized apart); :func:`scores` is the blocked ``q.k`` alone (indexers: DSA's and
CSA's keys), :func:`gather` dequantizes only the rows a top-k chose (:func:`pick`: later, or never when the C++
kernel reads their codes). Tensor operations only, no host read; the loop
is over blocks (a handful) and parts (two), never tokens or heads. Computed in float32 whatever the cache dtype.

:func:`attend_blocked` first hands int8 / int4 buffers with per-token scales (GQA/CCA K and V, MLA's latent,
CSA/HCA/SWA's rings and entries) to a hand-written C++ kernel on the CPU (kvlab/layers/cpu_attend.py, the default),
or, for a cache made with ``fused=True``, to the torch.compile kernel (kvlab/layers/fused.py); everything else
(fp8 / fp4, KIVI keys, zero points, residual windows of rings, a GPU without ``fused``) is attended block by block
as above (a top-k's :func:`pick` of rows dequantized whole first).
"""

from __future__ import annotations

from typing import Protocol

import torch

from kvlab.cache.quant import rotate

from . import cpu_attend, fused
from .cast import as_fp32


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


def pick(x, idx: torch.Tensor):
    """Rows ``idx [B, k]`` of ``x [B, L, D]`` as ``[B, 1, k, D]``: a reader's as a lazy pick (kvlab/cache/quant.py
    ``QuantPick``: the C++ kernel reads their codes through the index, other paths dequantize those rows whole), a
    tensor's gathered."""
    return x.pick(idx) if is_blocked(x) else gather(x, idx)[:, None]


def _ranges(x, n: int, *more) -> list[tuple[int, int]]:
    """``(lo, hi)`` blocks walking ``n`` positions of ``x`` (and of ``more``, read alongside): the smallest reader's
    block size, a multiple of the largest scale span (keys per channel: groups of positions)."""
    readers = [y for z in (x, *more) for y in _parts(z) if is_blocked(y)]
    if not readers:  # one block, without a range() over n: a compiled step would fix n (a graph per step)
        return [(0, n)] if n > 0 else []
    span = max(y.rows.span for y in readers)
    size = max(span, min(y.block_size() for y in readers) // span * span)
    # the loop counts blocks, not positions: inside a compiled step (n a symbol) dynamo then guards on the number of
    # blocks (a graph per block count) instead of on n itself (``range(0, n, size)``: a graph per decode step)
    return [(i * size, min(n, (i + 1) * size)) for i in range(-(-n // size))]


def _parts(x) -> list:
    """The leaves of ``x`` (a reader, a tensor, or a :class:`Cat` of them)."""
    return [y for p in x.parts for y in _parts(p)] if isinstance(x, Cat) else [x]


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
    tensor), block by block (int8 / int4 codes on the CPU: by the C++ kernel) -> ``[B, Hkv, G, L]`` float32
    (indexers apply their relu and head weights to it)."""
    if isinstance(k, torch.Tensor):  # a plain tensor: one block, one product
        return qf.contiguous() @ as_fp32(k).transpose(-1, -2)
    out = cpu_attend.scores(qf.contiguous(), k)  # int8 / int4 codes on the CPU: the C++ kernel, None where it does not
    return out if out is not None else _scores(qf.contiguous(), k, k.shape[-2])


def _scores(qf: torch.Tensor, k, n: int) -> torch.Tensor:
    """``qf [B, Hkv, G, D]`` (float32) against every key -> ``[B, Hkv, G, n]``."""
    if isinstance(k, Cat) and k.axis == -2:  # parts along positions: their scores side by side
        return torch.cat([_scores(qf, p, p.shape[-2]) for p in k.parts], dim=-1)
    qk = _query_for(qf, k)
    return torch.cat([_block_scores(qk, lo, hi) for lo, hi in _ranges(k, n)], dim=-1)


def _query_for(qf: torch.Tensor, k) -> list:
    """What :func:`_block_scores` needs of the query ``qf [B, Hkv, G, D]`` (float32) for the keys ``k`` (a reader, a
    tensor or a channel :class:`Cat`): per channel part ``(part, query, qsum)``; for a part whose scales fold
    (:func:`_folds`) the query rotated as its keys were, one row per (head, scale group) zero outside the group,
    and ``qsum [B, Hkv, G, groups]`` (what a zero point multiplies); otherwise the query and None."""
    if isinstance(k, Cat):
        if k.axis != -1:
            raise ValueError("_query_for: keys joined along positions are scored part by part")
        return [x for p, (lo, hi) in zip(k.parts, k.offsets(), strict=True)
                for x in _query_for(qf[..., lo:hi].contiguous(), p)]
    if not _folds(k, qf.shape[2]):
        return [(k, qf, None)]
    b, hkv, g, d = qf.shape
    ng = _groups(k)
    if k.rows.block:
        qf = rotate(qf, k.rows.block)
    qg = qf.view(b, hkv, g, ng, d // ng)
    qsum = qg.sum(-1)
    if ng > 1:
        eye = torch.eye(ng, dtype=qf.dtype, device=qf.device)
        qf = (qg[..., None, :] * eye[:, :, None]).reshape(b, hkv, g * ng, d)
    return [(k, qf, qsum)]


def _block_scores(qk: list, lo: int, hi: int) -> torch.Tensor:
    """Scores of the query prepared by :func:`_query_for` against keys ``lo..hi-1`` -> ``[B, Hkv, G, hi - lo]``
    float32, summed over the channel parts (each block read, used and left before the next)."""
    out = None
    for k, qf, qsum in qk:
        if qsum is None:
            kb = k.block(lo, hi) if is_blocked(k) else k.narrow(-2, lo, hi - lo).float()
            sc = qf @ kb.transpose(-1, -2)
        else:
            b, hkv, g, ng = qsum.shape
            c, s, z = k.raw(lo, hi)  # [B, Hkv, m, D], [B, Hkv, m, ng] x2
            part = (qf @ c.transpose(-1, -2)).view(b, hkv, g, ng, hi - lo)  # sum over each group's channels of q c
            st = s.transpose(-1, -2)[:, :, None]  # [B, Hkv, 1, ng, m]
            sc = (part * st).sum(3) if ng > 1 else part[:, :, :, 0] * st[:, :, :, 0]
            if z is not None:
                sc = sc + qsum @ z.transpose(-1, -2)
        out = sc if out is None else out.add_(sc)
    return out


def _block_values(pb: torch.Tensor, v, lo: int, hi: int) -> torch.Tensor:
    """``pb [B, Hkv, G, hi - lo]`` (float32) times values ``lo..hi-1`` of ``v`` (a reader, a tensor or a channel
    :class:`Cat`: its parts' outputs side by side) -> ``[B, Hkv, G, Dv]``."""
    if isinstance(v, Cat):
        if v.axis != -1:
            raise ValueError("_block_values: values joined along positions are read part by part")
        return torch.cat([_block_values(pb, part, lo, hi) for part in v.parts], dim=-1)
    if not _folds(v, pb.shape[2]):
        vb = v.block(lo, hi) if is_blocked(v) else v.narrow(-2, lo, hi - lo).float()
        return pb @ vb
    b, hkv, g, m = pb.shape
    ng = _groups(v)
    c, s, z = v.raw(lo, hi)
    d = c.shape[-1]
    if ng == 1:
        out = (pb * s.transpose(-1, -2)) @ c
    else:  # (p s_g) c for every group g, then each group's own channels
        pw = (pb[:, :, :, None] * s.transpose(-1, -2)[:, :, None]).reshape(b, hkv, g * ng, m)
        full = (pw @ c).view(b, hkv, g, ng, ng, d // ng)
        out = full.diagonal(dim1=3, dim2=4).transpose(-1, -2).reshape(b, hkv, g, d)
    if z is not None:
        out = out + (pb @ z).repeat_interleave(d // ng, -1)
    return out


class _Online:
    """A softmax computed block by block (FlashDecoding): running maximum ``m``, denominator and ``p.v`` sum, each
    rescaled when the maximum grows. Rows with nothing visible yet stay finite."""

    def __init__(self) -> None:
        self.m = self.den = self.acc = self.safe = self.corr = None

    def probs(self, s: torch.Tensor) -> torch.Tensor:
        """Scores ``s [B, Hkv, G, m]`` of the next block -> their ``exp(s - running maximum)``."""
        top = s.amax(-1, keepdim=True)
        self.m = top if self.m is None else torch.maximum(self.m, top)
        last, self.safe = self.safe, torch.where(self.m == float("-inf"), 0.0, self.m)
        if last is not None:
            self.corr = (last - self.safe).exp_()
        x = s - self.safe  # below exp(-UNDER) of the maximum: 0, not a denormal (~100x slower to multiply on a CPU)
        return x.masked_fill_(x < -fused.UNDER, float("-inf")).exp_()

    def add(self, p: torch.Tensor, pv: torch.Tensor) -> None:
        """Add the block's probabilities ``p`` (from :meth:`probs`) and their values ``pv [B, Hkv, G, Dv]``."""
        if self.acc is None:
            self.den, self.acc = p.sum(-1, keepdim=True), pv
        else:
            self.den = self.den * self.corr + p.sum(-1, keepdim=True)
            self.acc = self.acc * self.corr + pv

    def result(self, sinks: torch.Tensor | None) -> torch.Tensor:
        """``acc / den``; ``sinks [1, Hkv, G, 1]``: a logit added to the denominator only."""
        den = self.den if sinks is None else self.den + (sinks - self.safe).exp()
        return self.acc / den


def _segments(k, v, n: int, at: int = 0):
    """``(at, n, k, v)`` along positions: a position :class:`Cat` of keys and one of values (same offsets: a
    sink-token window's sinks then its ring) walked part by part."""
    if isinstance(k, Cat) and k.axis == -2 or isinstance(v, Cat) and v.axis == -2:
        if not (isinstance(k, Cat) and isinstance(v, Cat) and k.axis == v.axis == -2 and k.offsets() == v.offsets()):
            raise ValueError("attend_blocked: keys and values joined along positions must have the same parts")
        for kp, vp, (lo, hi) in zip(k.parts, v.parts, k.offsets(), strict=True):
            yield from _segments(kp, vp, hi - lo, at + lo)
        return
    yield at, n, k, v


def _attend_online(qf: torch.Tensor, k, v, mask: torch.Tensor | None, scale: float, sinks: torch.Tensor | None
                   ) -> torch.Tensor:
    """:func:`attend_blocked` for separate keys and values (GQA, CCA): one pass over the positions, each block's
    keys scored (scales folded where they fold), its values read right after, the softmax kept online (:class:`_Online`).
    ``qf [B, Hkv, G, D]`` float32 -> ``[B, Hkv, G, Dv]``."""
    n = k.shape[-2]
    if mask is not None:
        mask = mask.reshape(mask.shape[0], 1, 1, n)
    state = _Online()
    for at, m, kp, vp in _segments(k, v, n):
        qk = _query_for(qf, kp)
        for lo, hi in _ranges(kp, m, vp):
            s = _block_scores(qk, lo, hi).mul_(scale)
            if mask is not None:
                s = s + mask[..., at + lo:at + hi]
            p = state.probs(s)
            state.add(p, _block_values(p, vp, lo, hi))
    return state.result(sinks)


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
    for i in range(-(-n // size)):  # blocks, not positions: see _ranges
        lo, hi = i * size, min(n, (i + 1) * size)
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
    state = _Online()
    for lo, hi, blocks in _key_blocks(k, n):
        s = None
        for qp, kb in zip(qs, blocks, strict=True):
            part = qp @ kb.transpose(-1, -2)
            s = part if s is None else s.add_(part)
        s = s * scale
        if mask is not None:
            s = s + mask[..., lo:hi]
        p = state.probs(s)
        state.add(p, p @ blocks[0])  # the values: the block itself, or its first channel part
    return state.result(sinks)


def attend_blocked(q: torch.Tensor, k, v, mask: torch.Tensor | None, scale: float,
                   sinks: torch.Tensor | None = None, plan: list | None = None) -> torch.Tensor:
    """q ``[B, H, 1, D]``, k / v ``[B, Hkv, L, D]`` (blocked readers or tensors) -> ``[B, H, 1, Dv]`` in q's dtype.

    ``mask``: additive ``[B|1, 1, 1, L]`` or None; ``sinks [H]``: a per-head logit in the softmax denominator.
    One pass over the blocks with an online softmax: values in the keys (:func:`values_in_keys`) read with them,
    separate values (GQA, CCA) block by block right after their keys. ``plan``: ``cpu_attend.plan(k, v)`` if the
    caller has it (the C++ kernel's segments)."""
    b, h, t, d = q.shape
    hkv = k.shape[1]
    g = h // hkv
    sk = None if sinks is None else sinks.float().view(1, hkv, g, 1)
    qf = q.reshape(b, hkv, g, d).float()
    plan = plan or cpu_attend.plan(k, v)
    if plan:  # int8 / int4 codes on the CPU: the hand-written kernel (kvlab/layers/cpu_attend.py)
        out = cpu_attend.attend(qf.contiguous(), k, v, mask, scale, sk, plan)
        return out.reshape(b, h, t, out.shape[-1]).to(q.dtype)
    if fused.applies(k, v):  # a cache made with fused=True: int8 / int4 codes attended by one compiled kernel
        out = fused.attend(qf.contiguous(), k, v, mask, scale, sk)
        if out is not None:
            return out.reshape(b, h, t, out.shape[-1]).to(q.dtype)
    out = (_attend_one_pass(qf, k, mask, scale, sk) if values_in_keys(k, v)
           else _attend_online(qf.contiguous(), k, v, mask, scale, sk))
    return out.reshape(b, h, t, out.shape[-1]).to(q.dtype)


__all__ = ["BlockedKV", "Cat", "attend_blocked", "channels", "dense", "gather", "is_blocked", "one_block", "pick",
           "prepare", "scores", "values_in_keys", "with_heads"]
