"""Decode attention over a quantized cache, block by block: the whole dequantized K/V never exists.

A decode step (one query per row) over ``L`` cached positions whose K/V are a blocked reader
(kvlab/cache/quant.py ``QuantView``: ``block(lo, hi)`` dequantizes slots ``lo..hi-1`` into a reused float32
scratch) runs in two passes over a few large blocks: scores ``q.k`` block by block into ``[B, Hkv, G, L]`` (G query
heads per KV head: small next to K), one exact softmax over them (mask and sink logits as in ``core.attend``),
then ``p.v`` accumulated block by block. Tensor operations only, no host read; the loop is over blocks (a
handful), never tokens or heads. Computed in float32 whatever the cache dtype.
"""

from __future__ import annotations

from typing import Protocol

import torch


class BlockedKV(Protocol):
    """What :func:`attend_blocked` reads K or V through (kvlab/cache/quant.py ``QuantView``)."""

    shape: tuple[int, ...]
    n: int

    def block_size(self) -> int: ...

    def block(self, lo: int, hi: int) -> torch.Tensor: ...

    def dense(self) -> torch.Tensor: ...


def is_blocked(x) -> bool:
    """``x`` is a blocked reader rather than a tensor."""
    return not isinstance(x, torch.Tensor)


def dense(x) -> torch.Tensor:
    """A tensor of ``x`` (a blocked reader dequantized whole)."""
    return x.dense() if is_blocked(x) else x


def _blocks(x, n: int):
    size = x.block_size() if is_blocked(x) else n
    for lo in range(0, n, size):
        hi = min(n, lo + size)
        yield lo, hi, (x.block(lo, hi) if is_blocked(x) else x.narrow(-2, lo, hi - lo).float())


def attend_blocked(q: torch.Tensor, k, v, mask: torch.Tensor | None, scale: float,
                   sinks: torch.Tensor | None = None) -> torch.Tensor:
    """q ``[B, H, 1, D]``, k / v ``[B, Hkv, L, D]`` (blocked readers or tensors) -> ``[B, H, 1, Dv]`` in q's dtype.

    ``mask``: additive ``[B|1, 1, 1, L]`` or None; ``sinks [H]``: a per-head logit in the softmax denominator."""
    from .core import softmax_with_sink

    b, h, t, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    g = h // hkv
    qf = q.reshape(b, hkv, g, d).float()
    s = torch.cat([qf @ kb.transpose(-1, -2) for _, _, kb in _blocks(k, n)], dim=-1)  # [B, Hkv, G, L]
    s = s * scale
    if mask is not None:
        s = s + mask.reshape(mask.shape[0], 1, 1, n)
    if sinks is None:  # normalised after p.v, as SDPA's kernel does
        m = s.amax(-1, keepdim=True)
        p = (s - m).exp_()
        den = p.sum(-1, keepdim=True)
    else:
        p = softmax_with_sink(s, sinks.float().view(1, hkv, g, 1).expand(b, hkv, g, 1))
        den = None
    out = None
    for lo, hi, vb in _blocks(v, n):
        part = p[..., lo:hi] @ vb  # [B, Hkv, G, Dv]
        out = part if out is None else out.add_(part)
    out = out if den is None else out / den
    return out.reshape(b, h, t, out.shape[-1]).to(q.dtype)


__all__ = ["BlockedKV", "attend_blocked", "dense", "is_blocked"]
