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
_COMPILED: dict[tuple, object] = {}


def values(codes: torch.Tensor, scales: torch.Tensor, int4: bool) -> torch.Tensor:
    """Codes ``[B, Hkv, L, D]`` (int4: ``D / 2`` bytes, low nibble = even channel, stored + 8) and per-token scales
    ``[B, Hkv, L, groups]`` -> values ``[B, Hkv, L, D]`` float32 (an expression fused into its consumer)."""
    c = unpack4(codes).float() - 8 if int4 else codes.float()
    b, h, n, d = c.shape
    ng = scales.shape[-1]
    return (c.view(b, h, n, ng, d // ng) * scales.float()[..., None]).view(b, h, n, d)


def _attend(qf: torch.Tensor, kc: torch.Tensor, ks: torch.Tensor, vc: torch.Tensor, vs: torch.Tensor,
            mask: torch.Tensor | None, sinks: torch.Tensor | None, scale: float, int4: bool) -> torch.Tensor:
    """``qf [B, Hkv, G, D]`` float32, codes and scales of K and V, ``mask [B|1, 1, 1, L]`` additive or None, ``sinks
    [1, Hkv, G, 1]`` or None -> ``[B, Hkv, G, D]`` float32."""
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


def applies(k, v) -> bool:
    """``k``, ``v`` are whole-buffer readers (kvlab/cache/quant.py ``QuantView``) this kernel reads: int8 / int4
    symmetric codes with per-token scales, no residual window, rotation or exact tail (the caller checks that the
    scales fold: ``blocked._folds``)."""
    if not (ENABLED and isinstance(k, QuantView) and isinstance(v, QuantView) and k.n == v.n and not k.heads):
        return False
    return all(x.rows.spec.fmt in ("int8", "int4") and x.rows.spec.symmetric and not x.rows.residual_slots
               and not x.rows.block and x.foldable for x in (k, v)) and k.rows.spec.fmt == v.rows.spec.fmt


def attend(qf: torch.Tensor, k, v, mask: torch.Tensor | None, scale: float, sinks: torch.Tensor | None
           ) -> torch.Tensor | None:
    """:func:`_attend` over readers ``k``, ``v`` (:func:`applies`) -> ``[B, Hkv, G, D]``; None if compiling failed
    (the caller then attends block by block)."""
    global ENABLED
    n, cap = k.n, min(k.rows.capacity, v.rows.capacity)
    if torch.compiler.is_compiling():  # inside a compiled decode step: traced into its graph
        nb, pad = n, None
    else:  # a static length, rounded up to BUCKET slots (a graph per bucket): positions n.. masked
        nb = min(cap, -(-n // BUCKET) * BUCKET)
        pad = torch.zeros(nb, device=qf.device).masked_fill_(positions(nb, qf.device) >= n, float("-inf"))
    if mask is not None:
        mask = mask.reshape(mask.shape[0], 1, 1, n)
        mask = mask if nb == n else torch.cat((mask, mask.new_full((mask.shape[0], 1, 1, nb - n), float("-inf"))), -1)
    elif pad is not None:
        mask = pad.view(1, 1, 1, nb)
    args = [qf, k.rows.codes.narrow(-2, 0, nb), k.rows.scales.narrow(-2, 0, nb), v.rows.codes.narrow(-2, 0, nb),
            v.rows.scales.narrow(-2, 0, nb), mask, sinks, scale, k.rows.spec.fmt == "int4"]
    if torch.compiler.is_compiling():
        return _attend(*args)
    # one compiled function per layer shape, format and length bucket (torch.compile's recompile limit counts per
    # code object); every size static: with the positions a symbol inductor's loops run ~4x slower than fp32 SDPA
    key = (BACKEND, qf.shape, args[1].shape, args[1].dtype, args[2].shape, args[2].dtype,
           None if mask is None else mask.shape, sinks is None)
    fn = _COMPILED.get(key)
    if fn is None:
        fresh = types.FunctionType(_attend.__code__.replace(), _attend.__globals__, "_attend")
        fn = _COMPILED[key] = torch.compile(fresh, backend=BACKEND, fullgraph=True, dynamic=False)
    try:
        return fn(*args)
    except Exception as e:  # no C++ compiler, an unsupported torch: the blocked path, once warned
        if not type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
            raise
        ENABLED = False
        warnings.warn(f"kvlab: fused quantized attention off ({type(e).__name__}); attending block by block",
                      stacklevel=2)
        return None


__all__ = ["BACKEND", "ENABLED", "applies", "attend", "values"]
