"""A decode step's attention over int8 / int4 K/V codes fused by ``torch.compile`` (per cache:
``model.new_cache(..., kv_quant="int8", fused=True)``; ``kvlab bench --fused``).

On the CPU the default for these buffers is the hand-written C++ kernel (kvlab/layers/cpu_attend.py: 2-4x faster
per call than this one at 16K, docs/kv-quantization.md "Decode speed"); ``fused=True`` asks for this kernel
instead (a GPU, where inductor emits Triton; or to compare), and it is the fallback where the C++ kernel is off.

Written as elementwise products and sums so inductor (C++ on the CPU) emits loops that read each code (an int4
byte: two nibbles) and its per-token scale, multiply by the query and reduce, with no float32 copy of the codes:
``s = sum_d q_d c_d s_g(d)``, the softmax (padding mask, sink logits), ``o_d = sum_l p_l c_ld s_lg(d)``
(:func:`_attend`). ``p.v`` is summed over chunks of :data:`CHUNK` positions (a chunk of value rows stays in cache
while every query head of its KV head reads it); the scores are laid out per query head (thin heads) or, for heads
of :data:`WIDE` channels or more (Gemma 4: 8 query heads on one 512-channel KV head), with the query heads innermost
so that each key row is read once for all of them (:func:`layout`); int4 bytes' two nibbles meet the query's even
and odd channels in one vectorised loop. Any scale group applies (the scales are multiplied in the loop: the
blocked path's fold condition does not matter here). Measured per call and per step in docs/kv-quantization.md
"Decode speed".

Only for buffers read whole: int8 / int4 symmetric codes with per-token scales, no residual window or rotation;
any other buffer of the cache is attended block by block (kvlab/layers/blocked.py). Compiled with static sizes,
once per shape and :data:`BUCKET` of positions (the slots past the written ones masked; inside a compiled decode
step, where the position count is a symbol, the whole preallocated buffer, masked); a compile failure (no C++
compiler) turns it off for the process with a warning and the blocked path runs. :data:`ENABLED` turns it on for
every cache (the benchmarks' switch; prefer ``fused=True``).
"""

from __future__ import annotations

import types
import warnings

import torch

from kvlab.cache.quant import QuantView, unpack4
from kvlab.cache.storage import positions

ENABLED = False  # True: every cache's int8 / int4 buffers attended fused (benchmarks/kv_quant_speed.py --fused)
BACKEND = "inductor"  # tests use "eager": the same function, no code generation
BUCKET = 1024  # positions are attended in multiples of this (the rest masked): one graph per bucket, not per step
WIDE = 256  # heads of at least this many channels: scores with the query heads innermost (:func:`layout`)
CHUNK = 256  # positions per partial p.v sum
UNDER = 60.0  # probabilities below exp(-UNDER) of the largest are 0 (no denormal arithmetic; below float32's eps)
_COMPILED: dict[tuple, object] = {}
_FAILED = False  # a compile failed in this process: every cache attends block by block


def values(codes: torch.Tensor, scales: torch.Tensor, int4: bool) -> torch.Tensor:
    """Codes ``[B, Hkv, L, D]`` (int4: ``D / 2`` bytes, low nibble = even channel, stored + 8) and per-token scales
    ``[B, Hkv, L, groups]`` -> values ``[B, Hkv, L, D]`` float32 (an expression fused into its consumer)."""
    c = unpack4(codes).float() - 8 if int4 else codes.float()
    b, h, n, d = c.shape
    ng = scales.shape[-1]
    return (c.view(b, h, n, ng, d // ng) * scales.float()[..., None]).view(b, h, n, d)


def _nibbles(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int4 bytes -> their low (even channels) and high (odd channels) codes as float32, stored + 8 (not shifted)."""
    return (c & 15).float(), (c >> 4).float()


def _attend(q: torch.Tensor, kc: torch.Tensor, ks: torch.Tensor, vc: torch.Tensor, vs: torch.Tensor,
            mask: torch.Tensor | None, sinks: torch.Tensor | None, scale: float, int4: bool, wide: bool,
            chunk: int, v_nibbles: bool) -> torch.Tensor:
    """Attention of one query per head over int8 / int4 codes with per-token scales -> ``[B, Hkv, G, D]`` float32.

    Scores laid out ``[B, Hkv, G, L]`` (thin heads: one sweep over the positions per query head) or, ``wide``,
    ``[B, Hkv, L, G]`` (the query heads the innermost loop: a key row read once, reused from L1 by every head);
    ``p.v`` summed over ``chunk`` positions at a time into ``[B, Hkv, L / chunk, G, D]`` partials (a chunk of value
    rows stays in cache while every query head reads it; one sweep over positions per output channel block would
    reread the codes from memory per head; the last ``L mod chunk`` positions one more partial), the V scales
    folded into the probabilities (:func:`_values_times`), then the partials summed and divided by the softmax
    denominator. int4 with an even group: ``q [B, Hkv, G, 2, D / 2]`` (even channels,
    then odd: :func:`planar`) so that a byte's two nibbles meet their query channels in one vectorised loop, the
    scores reduced per scale group and weighted by the K scales, the stored offset 8 taken off as
    ``8 sum(q_group)``; otherwise ``q [B, Hkv, G, D]`` (int4: nibbles interleaved back by :func:`values`);
    ``v_nibbles``: the same for the values (int4 V with an even group).
    ``mask [B|1, 1, 1, L]`` additive or None, ``sinks [1, Hkv, G, 1]`` or None."""
    n, ng = kc.shape[2], ks.shape[-1]
    nibbles = int4 and q.dim() == 5
    if nibbles:
        b, h, g, _, half = q.shape
        gs = half // ng
        if wide:
            qg, (lo, hi), ksc = q.view(b, h, 1, g, 2, ng, gs), _nibbles(kc.view(b, h, n, 1, ng, gs)), ks[:, :, :, None]
        else:
            qg, (lo, hi), ksc = q.view(b, h, g, 1, 2, ng, gs), _nibbles(kc.view(b, h, 1, n, ng, gs)), ks[:, :, None]
        part = (qg[..., 0, :, :] * lo + qg[..., 1, :, :] * hi).sum(-1)  # [.., groups]
        s = ((part - 8 * qg.sum((-3, -1))) * ksc.float()).sum(-1)
    else:
        b, h, g, _ = q.shape
        k = values(kc, ks, int4)
        s = (q[:, :, None] * k[:, :, :, None]).sum(-1) if wide else (q[:, :, :, None] * k[:, :, None]).sum(-1)
    ax = 2 if wide else 3  # the positions' axis of s
    s = s * scale
    if mask is not None:
        s = s + (mask.reshape(mask.shape[0], 1, n, 1) if wide else mask)
    m = s.amax(ax, keepdim=True)
    if sinks is not None:
        sinks = sinks.view(1, h, 1, g) if wide else sinks
        m = torch.maximum(m, sinks)
    m = torch.where(m == float("-inf"), 0.0, m)
    x = s - m
    # below e^-UNDER of the largest a probability is 0: exp would give denormals (or their products with the
    # scales would), which the CPU multiplies ~100x slower (Gemma 4's unscaled scores: 87 ms a call instead of 20)
    p = torch.where(x > -UNDER, x.exp(), 0.0)
    den = p.sum(ax, keepdim=True)
    if sinks is not None:
        den = den + (sinks - m).exp()
    p = p if wide else p.transpose(-1, -2)  # [B, Hkv, L, G]
    c, rest = n // chunk, n % chunk  # not divmod: dynamo fails on it in some traces
    parts = [(0, c, chunk)] if c else []
    if rest:  # the last positions, fewer than a chunk: one more partial sum
        parts.append((c * chunk, 1, rest))
    out = sum(_values_times(p.narrow(2, at, cnt * t), vc.narrow(2, at, cnt * t), vs.narrow(2, at, cnt * t), int4,
                            v_nibbles, cnt, t).sum(2) for at, cnt, t in parts)
    return out / den.view(b, h, g, 1)


def _values_times(p: torch.Tensor, vc: torch.Tensor, vs: torch.Tensor, int4: bool, nibbles: bool, c: int, t: int
                  ) -> torch.Tensor:
    """Probabilities ``p [B, Hkv, c * t, G]`` times the values of codes ``vc`` and per-token scales ``vs``, summed
    over each chunk of ``t`` positions -> ``[B, Hkv, c, G, D]``; the scales folded into ``p`` (int4 nibbles split
    where ``nibbles``, else dequantized in the loop)."""
    b, h, _, g = p.shape
    ng = vs.shape[-1]
    p = p.reshape(b, h, c, t, g, 1)
    if int4 and not nibbles:  # an odd group: the values dequantized in the loop, not folded
        v = values(vc, vs, True)
        return (p * v.view(b, h, c, t, 1, v.shape[-1])).sum(3)
    d = vc.shape[-1] * (2 if int4 else 1)
    gs = d // ng // (2 if int4 else 1)
    pw = (p * vs.float().view(b, h, c, t, 1, ng))[..., None]  # [B, Hkv, c, t, G, groups, 1]
    if int4:
        lo, hi = _nibbles(vc.view(b, h, c, t, 1, ng, gs))
        pe, po = (pw * lo).sum(3), (pw * hi).sum(3)  # [B, Hkv, c, G, groups, gs]
        return (torch.stack((pe, po), -1) - 8 * pw.sum(3)[..., None]).view(b, h, c, g, d)
    return (pw * vc.float().view(b, h, c, t, 1, ng, gs)).sum(3).view(b, h, c, g, d)


def planar(qf: torch.Tensor) -> torch.Tensor:
    """``qf [B, Hkv, G, D]`` -> ``[B, Hkv, G, 2, D / 2]``: the even channels, then the odd ones (an int4 byte's low
    and high nibble), contiguous."""
    b, h, g, d = qf.shape
    return qf.view(b, h, g, d // 2, 2).transpose(-1, -2).contiguous()


def layout(d: int, int4: bool, group: int) -> str:
    """How :func:`_attend` loops: ``"rows"`` (``wide``) for heads of at least :data:`WIDE` channels, else ``"heads"``;
    ``"4"`` appended for int4 with an even group (nibbles split: :func:`planar`)."""
    return ("rows" if d >= WIDE else "heads") + ("4" if int4 and group % 2 == 0 else "")


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
    """:func:`_attend` compiled (its :func:`layout` for the shape) over readers ``k``, ``v`` (:func:`applies`) ->
    ``[B, Hkv, G, D]``; None if compiling failed (the caller then attends block by block)."""
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
    q = planar(qf) if how.endswith("4") else qf
    args = [q, k.rows.codes.narrow(-2, 0, nb), k.rows.scales.narrow(-2, 0, nb), v.rows.codes.narrow(-2, 0, nb),
            v.rows.scales.narrow(-2, 0, nb), mask, sinks, scale, int4, how.startswith("rows"), CHUNK,
            int4 and v.rows.group % 2 == 0]
    if torch.compiler.is_compiling():
        return _attend(*args)
    # one compiled function per layer shape, format and length bucket (torch.compile's recompile limit counts per
    # code object); every size static: with the positions a symbol inductor's loops run ~4x slower than fp32 SDPA
    key = (BACKEND, how, q.shape, *((t.shape, t.dtype) for t in args[1:5]), None if mask is None else mask.shape,
           sinks is None, args[-1])
    compiled = _COMPILED.get(key)
    if compiled is None:
        fresh = types.FunctionType(_attend.__code__.replace(), _attend.__globals__, "_attend")
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


__all__ = ["BACKEND", "BUCKET", "CHUNK", "ENABLED", "WIDE", "applies", "attend", "layout", "planar", "values"]
