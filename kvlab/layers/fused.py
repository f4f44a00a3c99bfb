"""A decode step's attention over int8 / int4 K/V codes fused by ``torch.compile`` (opt-in: :data:`ENABLED`).

Written as elementwise products and sums so inductor (C++ on the CPU) emits loops that read each code (an int4
byte: two nibbles) and its per-token scale, multiply by the query and reduce, with no float32 copy of the codes:
``s = sum_d q_d c_d s_g(d)``, the softmax (padding mask, sink logits), ``o_d = sum_l p_l c_ld s_lg(d)``.
Measured per call (benchmarks/kv_quant_fused.py, docs/kv-quantization.md "Decode speed"): faster than fp32 SDPA
with int8 codes on thin layers (qwen3-100m: 4 KV heads x 3 query heads x 64 channels), slower than kvlab's blocked
path on wide ones (Gemma 4: 8 query heads x 512 channels), so it applies only where the scales fold
(``blocked.FOLD_ROWS``). It reads the whole buffer at once: only for buffers without a residual window or rotation.
Compiled with static sizes, once per shape and :data:`BUCKET` of positions (the slots past the written ones
masked); a compile failure (no C++ compiler) turns it off for the process and the blocked path runs.
"""

from __future__ import annotations

import types
import warnings

import torch

from kvlab.cache.quant import QuantView, unpack4
from kvlab.cache.storage import positions

ENABLED = False  # opt-in: set True (benchmarks/kv_quant_speed.py --fused) to attend int8 / int4 codes fused
BACKEND = "inductor"  # tests use "eager": the same function, no code generation
BUCKET = 1024  # positions are attended in multiples of this (the rest masked): one graph per bucket, not per step
WIDE = 256  # int8 heads of at least this many channels use the row layout (:func:`_attend_rows`)
CHUNK = 256  # positions per partial p.v sum in the row layout
_COMPILED: dict[tuple, object] = {}
_FAILED = False  # a compile failed in this process: every cache attends block by block


def values(codes: torch.Tensor, scales: torch.Tensor, int4: bool) -> torch.Tensor:
    """Codes ``[B, Hkv, L, D]`` (int4: ``D / 2`` bytes, low nibble = even channel, stored + 8) and per-token scales
    ``[B, Hkv, L, groups]`` -> values ``[B, Hkv, L, D]`` float32 (an expression fused into its consumer)."""
    c = unpack4(codes).float() - 8 if int4 else codes.float()
    b, h, n, d = c.shape
    ng = scales.shape[-1]
    return (c.view(b, h, n, ng, d // ng) * scales.float()[..., None]).view(b, h, n, d)


def _attend_heads(qf: torch.Tensor, kc: torch.Tensor, ks: torch.Tensor, vc: torch.Tensor, vs: torch.Tensor,
                  mask: torch.Tensor | None, sinks: torch.Tensor | None, scale: float, int4: bool) -> torch.Tensor:
    """Thin heads: one sweep over the positions per query head. ``qf [B, Hkv, G, D]`` float32, codes and scales of K
    and V, ``mask [B|1, 1, 1, L]`` additive or None, ``sinks [1, Hkv, G, 1]`` or None -> ``[B, Hkv, G, D]`` float32."""
    s = (qf[:, :, :, None, :] * values(kc, ks, int4)[:, :, None]).sum(-1) * scale  # [B, Hkv, G, L]
    if mask is not None:
        s = s + mask
    m = s.amax(-1, keepdim=True)
    if sinks is not None:
        m = torch.maximum(m, sinks)
    m = torch.where(m == float("-inf"), 0.0, m)
    p = (s - m).exp()
    den = p.sum(-1, keepdim=True)
    if sinks is not None:
        den = den + (sinks - m).exp()
    return (p[..., None] * values(vc, vs, int4)[:, :, None]).sum(-2) / den


def _nibbles(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int4 bytes -> their low (even channels) and high (odd channels) codes as float32, stored + 8 (not shifted)."""
    return (c & 15).float(), (c >> 4).float()


def _attend_rows(q: torch.Tensor, kc: torch.Tensor, ks: torch.Tensor, vc: torch.Tensor, vs: torch.Tensor,
                 mask: torch.Tensor | None, sinks: torch.Tensor | None, scale: float, int4: bool,
                 chunk: int) -> torch.Tensor:
    """Wide heads and int4: each code row read once for all ``G`` query heads of its KV head.

    Scores are laid out ``[B, Hkv, L, G]`` (the query heads the innermost loop, a key row reused from L1 for all of
    them); ``p.v`` is summed over ``chunk`` positions at a time into ``[B, Hkv, L / chunk, G, D]`` partial sums (a
    chunk of value rows stays in cache while every query head reads it), the V scales folded into the
    probabilities, then the partials summed and divided by the softmax denominator. int4 with an even group:
    ``q [B, Hkv, G, 2, D / 2]`` (even channels, then odd: :func:`planar`) so that a byte's two nibbles meet their
    query channels in one vectorised loop, the scores reduced per scale group then weighted by the K scales, the
    stored offset 8 taken off as ``8 sum(q_group)``; otherwise ``q [B, Hkv, G, D]``. ``mask [B|1, 1, 1, L]``,
    ``sinks [1, Hkv, G, 1]`` -> ``[B, Hkv, G, D]`` float32."""
    n, ng = kc.shape[2], ks.shape[-1]
    nibbles = int4 and q.dim() == 5
    if nibbles:
        b, h, g, _, half = q.shape
        d, gs = 2 * half, half // ng
        qg = q.view(b, h, 1, g, 2, ng, gs)
        lo, hi = _nibbles(kc.view(b, h, n, 1, ng, gs))
        part = (qg[..., 0, :, :] * lo + qg[..., 1, :, :] * hi).sum(-1)  # [B, Hkv, L, G, groups]
        s = ((part - 8 * qg.sum((-3, -1))) * ks.float()[:, :, :, None, :]).sum(-1)
    else:
        b, h, g, d = q.shape
        s = (q[:, :, None, :, :] * values(kc, ks, int4)[:, :, :, None, :]).sum(-1)  # [B, Hkv, L, G]
    s = s * scale
    if mask is not None:
        s = s + mask.reshape(mask.shape[0], 1, n, 1)
    m = s.amax(2, keepdim=True)  # [B, Hkv, 1, G]
    if sinks is not None:
        sinks = sinks.view(1, h, 1, g)
        m = torch.maximum(m, sinks)
    m = torch.where(m == float("-inf"), 0.0, m)
    p = (s - m).exp()
    den = p.sum(2, keepdim=True)
    if sinks is not None:
        den = den + (sinks - m).exp()
    c = n // chunk
    if int4 and not nibbles:  # an odd group: the values dequantized in the loop, not folded
        part = (p.view(b, h, c, chunk, g, 1) * values(vc, vs, True).view(b, h, c, chunk, 1, d)).sum(3)
    else:
        gs = d // ng // (2 if int4 else 1)
        pw = (p.view(b, h, c, chunk, g, 1) * vs.float().view(b, h, c, chunk, 1, ng))[..., None]  # [.., G, ng, 1]
        if int4:
            lo, hi = _nibbles(vc.view(b, h, c, chunk, 1, ng, gs))
            pe, po = (pw * lo).sum(3), (pw * hi).sum(3)  # [B, Hkv, C, G, groups, gs]
            part = (torch.stack((pe, po), -1) - 8 * pw.sum(3)[..., None]).view(b, h, c, g, d)
        else:
            part = (pw * vc.float().view(b, h, c, chunk, 1, ng, gs)).sum(3).view(b, h, c, g, d)
    return part.sum(2) / den.view(b, h, g, 1)


def planar(qf: torch.Tensor) -> torch.Tensor:
    """``qf [B, Hkv, G, D]`` -> ``[B, Hkv, G, 2, D / 2]``: the even channels, then the odd ones (an int4 byte's low
    and high nibble), contiguous."""
    b, h, g, d = qf.shape
    return qf.view(b, h, g, d // 2, 2).transpose(-1, -2).contiguous()


def layout(d: int, int4: bool, group: int) -> str:
    """``"rows"`` (:func:`_attend_rows`) for int4 and for heads of at least :data:`WIDE` channels, else
    ``"heads"`` (:func:`_attend_heads`); ``"rows4"`` where int4's group is even (a byte's nibbles share a scale)."""
    if int4:
        return "rows4" if group % 2 == 0 else "rows"
    return "rows" if d >= WIDE else "heads"


def chunk_for(n: int) -> int:
    """Positions per partial ``p.v`` sum: :data:`CHUNK`, halved until it divides ``n``; ``n`` (one chunk) below 16."""
    t = CHUNK
    while n % t:
        t //= 2
    return t if t >= min(16, CHUNK) else n


def applies(k, v) -> bool:
    """``k``, ``v`` are whole-buffer readers (kvlab/cache/quant.py ``QuantView``) this kernel reads, of a cache made
    with ``fused=True`` (or :data:`ENABLED`): int8 / int4 symmetric codes with per-token scales (any group), no
    residual window, rotation or exact tail; K and V in the same format."""
    if _FAILED or not (isinstance(k, QuantView) and isinstance(v, QuantView) and k.n == v.n and not k.heads):
        return False
    if not (ENABLED or k.rows.fused and v.rows.fused):
        return False
    return all(x.rows.spec.fmt in ("int8", "int4") and x.rows.spec.symmetric and not x.rows.residual_slots
               and not x.rows.block and x.foldable for x in (k, v)) and k.rows.spec.fmt == v.rows.spec.fmt


def attend(qf: torch.Tensor, k, v, mask: torch.Tensor | None, scale: float, sinks: torch.Tensor | None
           ) -> torch.Tensor | None:
    """The compiled kernel (:func:`layout`: :func:`_attend_heads` or :func:`_attend_rows`) over readers ``k``, ``v``
    (:func:`applies`) -> ``[B, Hkv, G, D]``; None if compiling failed (the caller then attends block by block)."""
    global _FAILED
    n, cap = k.n, min(k.rows.capacity, v.rows.capacity)
    if torch.compiler.is_compiling():  # inside a compiled decode step (n a symbol): the whole preallocated buffer,
        nb = cap                        # static, the slots past n masked (unwritten slots hold zeros)
    else:  # a static length, rounded up to BUCKET slots (a graph per bucket): positions n.. masked
        nb = min(cap, -(-n // BUCKET) * BUCKET)
    if mask is not None:
        mask = mask.reshape(mask.shape[0], 1, 1, n)
        if nb != n:
            mask = torch.cat((mask, mask.new_full((mask.shape[0], 1, 1, nb - n), float("-inf"))), -1)
    elif nb != n:
        mask = torch.zeros(nb, device=qf.device).masked_fill_(positions(nb, qf.device) >= n, float("-inf"))
        mask = mask.view(1, 1, 1, nb)
    int4 = k.rows.spec.fmt == "int4"
    how = layout(qf.shape[-1], int4, k.rows.group)
    q = planar(qf) if how == "rows4" else qf
    args = [q, k.rows.codes.narrow(-2, 0, nb), k.rows.scales.narrow(-2, 0, nb), v.rows.codes.narrow(-2, 0, nb),
            v.rows.scales.narrow(-2, 0, nb), mask, sinks, scale, int4]
    fn = _attend_heads if how == "heads" else _attend_rows
    if how != "heads":
        args.append(chunk_for(nb))
    if torch.compiler.is_compiling():
        return fn(*args)
    # one compiled function per layer shape, format and length bucket (torch.compile's recompile limit counts per
    # code object); every size static: with the positions a symbol inductor's loops run ~4x slower than fp32 SDPA
    key = (BACKEND, how, q.shape, args[1].shape, args[1].dtype, args[2].shape, args[2].dtype,
           None if mask is None else mask.shape, sinks is None)
    compiled = _COMPILED.get(key)
    if compiled is None:
        fresh = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__)
        compiled = _COMPILED[key] = torch.compile(fresh, backend=BACKEND, fullgraph=True, dynamic=False)
    try:
        return compiled(*args)
    except Exception as e:  # no C++ compiler, an unsupported torch: the blocked path, once warned
        if not type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
            raise
        _FAILED = True
        warnings.warn(f"kvlab: fused quantized attention off ({type(e).__name__}); attending block by block",
                      stacklevel=2)
        return None


__all__ = ["BACKEND", "BUCKET", "CHUNK", "ENABLED", "WIDE", "applies", "attend", "chunk_for", "layout", "planar", "values"]
