"""A prefill chunk's attention on the CPU, in pieces that let SDPA's flash kernel skip what the mask hides.

A chunk of ``T`` queries at positions ``start .. end - 1`` attends to ``L`` keys. When the keys' positions are
consecutive and end at the chunk's last (``kpos == arange(end - L, end)``: a full cache, a window ring read in
position order, kvlab/cache/storage.py), the masked ``[T, L]`` call (every tile computed, then masked) is split:

- **prefix + causal square** (every query sees every key before the chunk: no window, or one reaching past the first
  key; no left padding): the ``P = L - T`` prefix keys are attended without a mask, the ``G`` query heads of each K/V
  head folded into the query rows (``[B, Hkv, T * G, D]``: the CPU flash kernel then takes query tiles of 256 rows
  instead of 64), the chunk's own ``T`` keys under plain causality (the kernel skips the tiles above the diagonal),
  and the two merged by their log-sum-exps: ``out = lerp(o_square, o_prefix, sigmoid(lse_prefix - lse_square))``.
  One 512-query call over 4K / 8K keys at head dim 512 (Gemma 4's global layers): 611 / 1,080 ms against 756 /
  1,277 ms masked (docs/performance.md, "Gemma 4's prefill in pieces").
- **window query blocks** (a window shorter than the keys): the queries in blocks of ``max(MIN_BLOCK, window // 4)``,
  each attending only to the keys its window reaches, under the step's mask sliced to them: Gemma 4's 512-query
  chunk over its 512-slot ring reads 639 key columns a block instead of 1,024 (50 vs 68 ms a call).

bf16 on a CPU without native bf16 arithmetic (kvlab/layers/bf16_widen.py): the same pieces in float32 over widened
copies of q, K and V (the prefix's K and V in blocks of keys, so the copies stay a few MB) (torch's bf16 flash kernel runs its products in emulated bf16: a 512-query chunk over 4K keys of
Qwen3 100M, 220 ms a layer; docs/performance.md, "bf16 prefill"), the output rounded to bf16 once.

Anything else (a GPU, float16, bf16 with native arithmetic, keys and values of different widths, sinks, other key
orders, a decode step, autograd recording) returns None and takes :func:`kvlab.layers.core.attend`. The host reads (one comparison of ``kpos`` per call) are prefill's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import bf16_widen
from .blocked import is_blocked

MIN_BLOCK = 64  # window query blocks: at least this many queries (the flash kernel's tiles lose past that)
WIDE_BLOCK_BYTES = 4 << 20  # bf16 widened: the prefix's K and V widened this many float32 bytes a block at most
MIN_WIDE_KEYS = 512  # ... but at least this many keys a block
_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def consecutive(step, kpos: torch.Tensor, end: int) -> bool:
    """``kpos [L]`` holds the positions ``end - L .. end - 1`` in order; checked once per call for each key-position
    tensor (the layers of one call share it) and kept in ``step.shared``."""
    key = ("consecutive", id(kpos))
    hit = step.shared.get(key)
    if hit is None:
        n = kpos.shape[0]
        ok = n <= end and torch.equal(kpos, torch.arange(end - n, end, device=kpos.device, dtype=kpos.dtype))
        hit = step.shared[key] = (kpos, ok)  # the entry keeps kpos alive, so its id is not reused within the call
    return hit[1]


def attend_chunk(q: torch.Tensor, k, v, step, kpos: torch.Tensor, window: int | None, scale: float
                 ) -> torch.Tensor | None:
    """q ``[B, H, T, D]``, k/v ``[B, Hkv, L, D]`` at positions ``kpos [L]`` -> ``[B, H, T, D]`` (memory
    ``[B, T, H, D]``: the output projection reads it without a copy), or None where the split does not apply."""
    if is_blocked(k) or is_blocked(v) or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad
                                                                       or v.requires_grad)):
        return None  # a quantized cache's readers; a graph being recorded (the merge writes into its output)
    t, d = q.shape[2], q.shape[3]
    n = k.shape[2]
    dtype = q.dtype
    if (t == 1 or n <= t or q.device.type != "cpu" or not (dtype == torch.float32 or bf16_widen.widens(q))
            or kpos.dim() != 1 or k.shape[-1] != d or v.shape[-1] != d or k.dtype != dtype or v.dtype != dtype):
        return None
    end = step.start + t
    if not consecutive(step, kpos, end):
        return None
    first = end - n  # position of key 0
    if step.pad is None and (window is None or (end - window <= first and t <= window)):
        return prefix_and_square(q, k, v, scale)
    if window is not None:
        return window_blocks(q, k, v, step, kpos, window, scale, first)
    return None


def prefix_and_square(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Every query sees all keys but the last ``T``, and those causally: the unmasked prefix with the query heads
    folded into the rows, the causal square, merged by their log-sum-exps. bf16 (widened): the prefix in blocks of
    keys of at most :data:`WIDE_BLOCK_BYTES` widened, merged the same way, so the float32 copies stay that small."""
    b, h, t, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    g, p = h // hkv, n - t
    dtype, wide = q.dtype, q.dtype != torch.float32
    q = q.float()
    qf = q.reshape(b, hkv, g, t, d).transpose(2, 3).reshape(b, hkv, t * g, d)  # a view for [B, T, H, D] memory, Hkv 1
    size = max(MIN_WIDE_KEYS, WIDE_BLOCK_BYTES // (8 * b * hkv * d)) if wide else p
    o1 = l1 = None
    for a in range(0, p, size):  # float32: one block
        e = min(a + size, p)
        o, lse = _flash(qf, k[:, :, a:e].float(), v[:, :, a:e].float(), scale=scale)[:2]
        if o1 is None:
            o1, l1 = o, lse
        else:  # the new block's share of the two
            o1, l1 = torch.lerp(o1, o, torch.sigmoid(lse - l1)[..., None]), torch.logaddexp(l1, lse)
    o2, l2 = _flash(q, k[:, :, p:].float(), v[:, :, p:].float(), is_causal=True, scale=scale)[:2]
    out = torch.empty(b, t, h, d, dtype=q.dtype, device=q.device)
    o1 = o1.view(b, hkv, t, g, d).transpose(2, 3)  # [B, Hkv, G, T, D]
    w = torch.sigmoid(l1.view(b, hkv, t, g).transpose(2, 3) - l2.view(b, hkv, g, t))  # the prefix's share
    torch.lerp(o2.view(b, hkv, g, t, d), o1, w[..., None].to(q.dtype),
               out=out.view(b, t, hkv, g, d).permute(0, 2, 3, 1, 4))
    return (out.to(dtype) if wide else out).transpose(1, 2)


def window_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step, kpos: torch.Tensor, window: int,
                  scale: float, first: int) -> torch.Tensor | None:
    """Queries in blocks, each over the keys its window reaches (key ``j`` at position ``first + j``), under the
    step's mask sliced to them; None where blocks would not read a quarter fewer key columns."""
    b, h, t, d = q.shape
    n = k.shape[2]
    mask = step.mask(kpos, window)[0]
    if mask is None:
        return None
    size = max(MIN_BLOCK, window // 4)
    spans = []
    for b0 in range(0, t, size):
        b1 = min(t, b0 + size)
        spans.append((b0, b1, max(0, step.start + b0 - window + 1 - first), step.start + b1 - first))
    if len(spans) == 1 or 4 * sum((b1 - b0) * (c1 - c0) for b0, b1, c0, c1 in spans) > 3 * t * n:
        return None
    out = torch.empty(b, t, h, d, dtype=q.dtype, device=q.device)
    for b0, b1, c0, c1 in spans:  # bf16: each block's q, K, V widened, its output rounded into ``out``
        o = F.scaled_dot_product_attention(q[:, :, b0:b1].float(), k[:, :, c0:c1].float(), v[:, :, c0:c1].float(),
                                           attn_mask=mask[..., b0:b1, c0:c1].float(), scale=scale,
                                           enable_gqa=h != k.shape[1])
        out[:, b0:b1].copy_(o.transpose(1, 2))
    return out.transpose(1, 2)
