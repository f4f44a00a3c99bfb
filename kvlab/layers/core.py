"""Attention machinery every technique shares: the per-call :class:`Step`, causal / window / padding masks,
attention with optional sink logits, stable top-k, and publishing a layer's K/V to the layers that share it.

Techniques (gqa in attention.py, cca, mla, compressed) build on these; none re-implements them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..kinds.gqa import sink_tokens
from . import cpu_attend, dense_attend
from .blocked import attend_blocked, dense, is_blocked, prepare, values_in_keys
from .cast import as_dtype, as_fp32
from .chunk_attend import attend_chunk
from .sinks import softmax_with_sink


@dataclass
class Step:
    """What one forward call shares between layers.

    start: absolute index of the first new position; qpos ``[T]`` absolute indices; pad ``[B]``
    left-pad counts or None; rope: rope tables by layer; kv: the (k, v, kpos) each producing layer
    attended to, for the layers that share them; masks: built masks by key set; carry: per-token
    tensors ``[B, T, ...]`` a layer passes to the next (e.g. the MoE router state, ``router_carry``); shared:
    what the layers of one call build once from its positions and share (rotary tables of the same settings), by key.
    """

    start: int
    qpos: torch.Tensor
    pad: torch.Tensor | None
    dtype: torch.dtype = torch.float32
    rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    kv: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    masks: dict[tuple, tuple[torch.Tensor | None, bool]] = field(default_factory=dict)
    carry: dict[str, torch.Tensor] = field(default_factory=dict)
    shared: dict = field(default_factory=dict)

    def last_position(self) -> Step:
        """The same step for its last query only (K/V already produced stay readable)."""
        return dataclasses.replace(self, start=self.start + self.qpos.shape[0] - 1, qpos=self.qpos[-1:], masks={},
                                   shared={},
                                   rope={i: (c[:, -1:], s[:, -1:]) for i, (c, s) in self.rope.items()},
                                   carry={k: v[:, -1:] for k, v in self.carry.items()})

    def mask(self, kpos: torch.Tensor, window: int | None, sink_tokens: int = 0
             ) -> tuple[torch.Tensor | None, bool]:
        """(additive mask ``[B|1, 1, T, L]`` of 0 / -inf, or None; whether plain causal applies).

        ``kpos [L]`` (or ``[B, L]`` per row: a store with sink tokens on a left-padded batch); ``sink_tokens``:
        each row's first that many real positions stay visible past the ``window`` (:func:`visible_mask`).
        Built once per step for each key-position tensor, window and sink count, and shared by every layer that
        attends to the same positions (all full-cache layers read views of one shared range, all rings of one
        size one rotated position vector), so a chunk holds one mask, not one per layer. Additive rather than
        boolean because SDPA on the CPU converts a boolean mask at every call.
        """
        # keyed by the tensor's identity (the entry keeps kpos alive; no data pointer read, so it traces)
        key = next((k for k in self.masks if k[0] is kpos and k[1] == window and k[2] == sink_tokens), None)
        if key is None:
            key = (kpos, window, sink_tokens)
            t, n = self.qpos.shape[0], kpos.shape[-1]
            if t == 1 and self.pad is None and kpos.dim() == 1 and (window is None or n <= window + sink_tokens):
                # a decode step sees every key its store returns (a ring holds at most the window, plus the sinks)
                self.masks[key] = (None, False)
            elif (self.pad is None and self.start == 0 and kpos.dim() == 1 and n == t and t > 1
                    and (window is None or window >= t)):
                self.masks[key] = (None, True)
            else:
                ok = build_mask(self.qpos, kpos, window, self.pad, sink_tokens)
                add = None if ok is None else torch.zeros(ok.shape, dtype=self.dtype, device=ok.device).masked_fill_(
                    ~ok, float("-inf"))
                self.masks[key] = (add, False)
        return self.masks[key]


def visible_keys(qpos: torch.Tensor, kpos: torch.Tensor, window: int | None, sink_tokens: int = 0,
                 first: torch.Tensor | int = 0) -> torch.Tensor:
    """``[T, L]`` (``[B, T, L]`` for ``kpos [B, L]`` or ``first [B, 1, 1]``) bool: key position ``kpos[j]`` is
    causal for query ``qpos[i]``, written (``>= 0``) and within the query's ``window`` (itself and the
    ``window - 1`` before it; None: no window), or one of the row's ``sink_tokens`` first positions
    (``first .. first + sink_tokens - 1``; ``first``: the row's left padding), which stay visible past the window
    (StreamingLLM's attention sinks, Xiao et al. 2023, arXiv 2309.17453)."""
    q, k = qpos[:, None], kpos[..., None, :]
    ok = (k <= q) & (k >= 0)
    if window is not None:
        near = k > q - window
        if sink_tokens:
            near = near | (k < first + sink_tokens)
        ok = ok & near
    return ok


def visible_mask(qpos: torch.Tensor, kpos: torch.Tensor, window: int | None,
                 pad: torch.Tensor | None, sink_tokens: int = 0) -> torch.Tensor:
    """``[B|1, T, L]`` bool: causal, window (with its ``sink_tokens``: each row's first real positions) and left
    padding (key ``kpos >= pad`` of its row); a query always sees itself (pad rows stay finite). ``kpos``: ``[L]``
    or ``[B, L]`` (per row). Tensor operations only (no host read)."""
    if pad is None:
        ok = visible_keys(qpos, kpos, window, sink_tokens)
        return ok if ok.dim() == 3 else ok[None]
    p = pad[:, None, None]
    k = kpos[..., None, :]
    ok = visible_keys(qpos, kpos, window, sink_tokens, p)
    return (ok & (k >= p)) | (k == qpos[:, None])


def build_mask(qpos: torch.Tensor, kpos: torch.Tensor, window: int | None,
               pad: torch.Tensor | None, sink_tokens: int = 0) -> torch.Tensor | None:
    """:func:`visible_mask` as ``[B|1, 1, T, L]``; None for a chunk of several queries that sees every key (the
    one host read, never made by a decode step)."""
    ok = visible_mask(qpos, kpos, window, pad, sink_tokens)
    if pad is None and qpos.shape[0] > 1 and bool(ok.all()):
        return None
    return ok[:, None]


def _matmul_decode(q: torch.Tensor) -> bool:
    """A decode step (q ``[B, H, 1, D]``) on a GPU attends by two matmuls instead of SDPA, except compiled in 16 bits.

    Measured on an H200 (qwen3-100m, benchmarks/cuda_graph_bound.py, docs/performance.md): eager bf16 SDPA picks
    cuDNN, whose plan costs ~3 ms of host time per call at a new cache length (51 / 81 ms a step at 4K / 16K, vs
    10.7 / 10.4 ms by matmuls); fp32 SDPA picks the memory-efficient kernel, one block per head over all keys (21 ms
    of GPU time a step at 16K; matmuls 11.3 ms eager, 9.8 compiled); compiled bf16 SDPA is the faster (3.5 vs 7.8 ms
    at 16K: matmuls do not split the keys across the GPU)."""
    if not q.is_cuda or q.shape[2] != 1:
        return False
    return not (torch.compiler.is_compiling() and q.dtype in (torch.bfloat16, torch.float16))


def _math_fallback(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """On the CPU, SDPA with keys and values of different widths runs its math fallback, which multiplies a copy of
    all of K by ``sqrt(scale)`` every call: one more read and write of all of K (profiled on MLA's absorbed decode,
    ``aten::mul`` of ``[1, 1, 288, L]``, 18.4 of 79.7 ms a DeepSeek V3-small step at 16K, docs/performance.md; MLA now
    passes its whole latent as the values). Two matmuls scale the scores instead."""
    return not q.is_cuda and k.shape[-1] != v.shape[-1]


def _narrow_values(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Several queries on the CPU with values narrower than the keys (MLA's expanded prefill: 96-channel keys, 64-channel
    values in V3-small): SDPA's flash kernel needs one width, so without help it takes the math fallback, which
    materialises the ``[B, H, T, L]`` scores and a safe softmax over them (``bmm``, ``where``, ``isneginf``, ``all``:
    most of a V3-small prefill chunk at 4K, docs/performance.md). Zero-padded values keep the flash kernel (the padded
    output channels are zeros and dropped): about 2x less time for the attention of a 512-query chunk at 16K, and no
    score matrix."""
    return not q.is_cuda and v.shape[-1] < k.shape[-1] and q.shape[-1] == k.shape[-1]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
           causal: bool = False, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """q ``[B, H, T, D]``, k/v ``[B, Hkv, L, D]`` -> ``[B, H, T, Dv]``; k/v may be blocked readers of a quantized
    cache (a decode step: int8 / int4 codes on the CPU by the C++ kernel, kvlab/layers/cpu_attend.py, at any length;
    otherwise attended block by block, kvlab/layers/blocked.py).

    ``mask`` is additive ``[B|1, 1, T, L]`` (0 = attend, -inf = masked). ``causal`` (with mask None) means the T
    queries are the last T keys. ``sinks [H]`` adds a per-head logit to the softmax denominator.
    A decode step (T = 1) folds the query heads of a group into the query axis, so K and V are read
    once and never repeated per head.
    """
    b, h, t, d = q.shape
    if is_blocked(k) or is_blocked(v):  # a quantized cache or joined parts (kvlab/layers/blocked.py)
        plan = cpu_attend.plan(k, v) if t == 1 else None
        if plan:  # int8 / int4 codes on the CPU: the C++ kernel, whatever the length
            return attend_blocked(q, k, v, mask, scale, sinks, plan)
        if t == 1:  # what fits one block read whole; anything left a reader: attended block by block
            kp = prepare(k)
            v = kp if v is k else kp.parts[0] if values_in_keys(k, v) else prepare(v)  # K = V: read once
            k = kp
            if is_blocked(k) or is_blocked(v):
                return attend_blocked(q, k, v, mask, scale, sinks)
        else:
            k, v = dense(k), dense(v)
    hkv, L = k.shape[1], k.shape[2]
    g = h // hkv
    if sinks is None and t > 1:
        dv = v.shape[-1]
        if _narrow_values(q, k, v):
            v = F.pad(v, (0, d - dv))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                             enable_gqa=g > 1)
        return out[..., :dv] if out.shape[-1] != dv else out
    if causal:
        mask = torch.zeros(t, L, dtype=q.dtype, device=q.device).masked_fill_(
            ~torch.ones(t, L, dtype=torch.bool, device=q.device).tril(L - t), float("-inf"))[None, None]
    qf = q.reshape(b, hkv, g * t, d)
    if mask is not None:
        mask = mask[:, :, None].expand(mask.shape[0], 1, g, t, L).reshape(mask.shape[0], 1, g * t, L)
    if sinks is None and not _matmul_decode(q) and not _math_fallback(q, k, v):
        out = F.scaled_dot_product_attention(qf, k, v, attn_mask=mask, scale=scale)
        return out.reshape(b, h, t, v.shape[-1])
    # sinks, an eager / fp32 decode step on a GPU, or K and V of different widths on the CPU: two matmuls reading K
    # and V once each
    s = as_fp32(qf @ k.transpose(-1, -2)) * scale  # [B, Hkv, G*T, L]
    if mask is not None:
        s = s + mask
    if sinks is None:
        p = torch.softmax(s, dim=-1)
    else:
        p = softmax_with_sink(s, sinks.view(1, hkv, g, 1, 1).expand(b, hkv, g, t, 1).reshape(b, hkv, g * t, 1))
    return (as_dtype(p, v.dtype) @ v).reshape(b, h, t, v.shape[-1])


def publish_kv(step: Step, index: int, store, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Append the new K/V to the layer's store (when cached) and publish what the queries attend to,
    with its positions, for the layers that share this layer's K/V (a quantized cache's decode step: its blocked
    readers, which the sharing layers walk block by block as this one does; nothing dequantized whole)."""
    if store is not None:
        k, v, kpos = store.append(k, v, step.start)
    else:
        kpos = step.qpos
    step.kv[index] = (k, v, kpos)
    return k, v, kpos


def attend_out(attn: nn.Module, x: torch.Tensor, step: Step, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               kpos: torch.Tensor) -> torch.Tensor:
    """Masked attention of ``q`` over ``k``/``v`` at positions ``kpos`` (the step's shared mask), then the
    output gate and projection of ``attn``. A module with ``dense_kernel`` True (GQA's and CCA's)
    has an eager decode step over plain float K/V on the CPU attended by the C++ kernel of
    kvlab/layers/dense_attend.py (where :func:`dense_attend.applies`), else :func:`attend`."""
    s = attn.spec
    out = None
    if q.shape[2] > 1 and not s.sinks and not sink_tokens(s):  # a prefill chunk: in pieces where it pays
        out = attend_chunk(q, k, v, step, kpos, s.window, s.scale)  # (kvlab/layers/chunk_attend.py)
    if out is None:
        mask, causal = step.mask(kpos, s.window, sink_tokens(s))
        sinks = attn.sinks if s.sinks else None
        if getattr(attn, "dense_kernel", False) and dense_attend.applies(q, k, v):
            out = dense_attend.attend(q, k, v, mask, s.scale, sinks)
        else:
            out = attend(q, k, v, mask, s.scale, causal=causal, sinks=sinks)
    return project_out(attn, x, out)


def project_out(attn: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Attention output ``[B, H, T, Dv]`` -> ``[B, T, hidden]``: the optional output gate (computed from
    the attention input ``x``, per head or per channel) then ``attn.o_proj``."""
    s = attn.spec
    b, h, t, dv = out.shape
    out = out.transpose(1, 2)  # [B, T, H, Dv]
    if s.output_gate:
        g = attn.g_proj(x)
        g = torch.sigmoid(g) if s.output_gate == "sigmoid" else F.softplus(g)
        out = out * (g[..., None] if s.gate_per_head else g.view(b, t, h, dv))
    return attn.o_proj(out.reshape(b, t, h * dv))


SORT_TOPK_MAX = 2048  # stable_topk sorts rows up to this long (CPU, one thread: 13 vs 87 us at 256 scores, k 128;
# 33 vs 46 us at 2,048; 263 vs 157 us at 4,096 — DeepSeek V4's CSA at 16K — where the threshold form stays)


def stable_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best of ``scores [..., L]`` (values, indices), ties at the boundary going to the earlier index
    (as a stable sort), so a chunked forward chooses as the whole forward does. ``k >= L``: everything, sorted.

    ``k < L``: in index order. Without a host read. Up to ``SORT_TOPK_MAX`` scores a row: the first k of a stable
    descending sort, put back in index order (3 operators). Longer rows: the k-th best value is the threshold; every
    score above it is chosen, then the earliest of those equal to it until k are chosen; the chosen indices are
    packed by a cumulative sum (``O(L)`` tensor operations, no sort; about 20 operators, but a full sort of a long
    row costs more than they do). The same indices either way (tests/test_compressed.py)."""
    n = scores.shape[-1]
    if k >= n:
        return scores.sort(dim=-1, descending=True, stable=True)
    if n <= SORT_TOPK_MAX:
        idx = scores.sort(dim=-1, descending=True, stable=True).indices[..., :k].sort(dim=-1).values
        return scores.gather(-1, idx), idx
    thr = scores.topk(k, dim=-1).values[..., k - 1:]  # [..., 1]
    above = scores > thr
    tied = scores == thr
    room = k - above.sum(-1, keepdim=True)  # how many of the tied the k still take
    chosen = above | (tied & (tied.cumsum(-1) <= room))
    slot = torch.where(chosen, chosen.cumsum(-1) - 1, k)  # the (k+1)-th slot collects the rest
    idx = torch.zeros(*scores.shape[:-1], k + 1, dtype=torch.long, device=scores.device)
    ar = torch.arange(n, device=scores.device).expand_as(scores)
    idx = idx.scatter(-1, slot, ar)[..., :k]
    return scores.gather(-1, idx), idx
