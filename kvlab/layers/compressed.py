"""Sequence-compressed attention of DeepSeek V4: CSA (compressed sparse) and HCA (heavily compressed).

Every layer has one shared K/V head (``K = V``), a low-rank query path and a grouped output projection::

    c = norm(W_qa x);  q_h = rms(W_qb c)_h  (no weight);  kv = norm(W_kv x)      rope on the trailing channels
    out_h = attention over [the last ``window`` kv rows | compressed entries] (+ a sink logit per head)
    out_h <- out_h with the inverse rotation at the query position (V carried the keys' rotation)
    y = W_ob concat_g(W_oa,g concat_{h in g} out_h)                              (grouped output projection)

The compressor pools each block of ``m = ratio`` tokens into one entry,
``E_w = norm(sum_j softmax_j(Z_j + B_j) * C_j)`` (softmax over the block's positions per channel,
``C = W_kv' x``, ``Z = W_z x``, ``B [m, .]`` a learned positional bias), rotated at position ``w m``. CSA's entries
overlap: ``C, Z`` have two series (``a``, ``b``) and entry ``w`` pools series ``b`` of block ``w`` with series ``a``
of block ``w - 1`` (2m slots). Entry ``w`` is visible to the query at position ``t`` once its block is complete,
``(w + 1) m <= t + 1``.

An ``swa`` layer (V4's sliding-window-only layers, ratio 0) has no compressor: the window branch alone.
HCA attends to every visible entry. CSA attends to ``index_topk`` of them, chosen per query by the lightning
indexer ``I(t, w) = sum_h u_{t,h} relu(qI_{t,h} . KI_w) / sqrt(dI)``, ``u = W_u x / sqrt(HI)``, ``qI = W_qI c``
(rotated at ``t``), ``KI`` the indexer's own overlapping compressor at ``index_head_dim``. **Causal**: each
query ranks only the entries complete at its position (the transformers reference does too in its masks).

The queries are processed in blocks of one window: each block reads the window rows it can see, and (CSA) gathers
each query's ``top-k`` entries, so time and memory are linear in the sequence for a fixed window and ``top-k``
(the indexer's scores, ``T x T/m`` multiply-adds at ``index_head_dim``, are the only term that grows faster,
computed block by block). While the entries are few (up to ``_DENSE_TOPK`` times ``top-k``) CSA scores every visible
entry by one matmul and keeps the chosen ones by a mask instead: cheaper than copying ``top-k`` entries per query. With left padding each row compresses its own tokens, its blocks aligned to its
first token, so a padded row equals the row alone (all rows at once: each row's tokens gathered into place).
A decode step on a plain float32 or bfloat16 CPU cache whose ring is full (no padding) runs the attention, from the query's norm
to the output's inverse rotation, as one C++ call (kvlab/layers/compressed_kernel.py; compiled: its custom op).
Arithmetic follows transformers' ``DeepseekV4Attention`` (module names too, but ``indexer.scorer.weights_proj``
-> ``indexer.weights_proj``); ties among indexer scores go to the earlier entry (a stable sort).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..cache.quant import QuantView
from ..config import LayerSpec
from . import compressed_kernel, cpu_attend
from .blocked import Cat, dense, is_blocked, pick, scores, with_heads
from .cast import as_fp32
from .core import attend, softmax_with_sink, stable_topk, visible_keys, visible_mask
from .linear import Linear
from .norm import RMSNorm
from .rope import inv_freq_and_scale, rotate_part

_BLOCK_ELEMENTS = 1 << 22  # score elements per query block (bounds the memory of one block)
_WINDOW_BLOCKS = 1  # queries per block, in windows: a block of Q queries scores Q + window - 1 window rows
_DENSE_TOPK = 6  # CSA scores every visible entry (a mask keeps the top-k) up to this many times top-k, gathers beyond
_MIN_BLOCK = 32  # queries per block at least (a short window does not split a chunk into tiny blocks)


def _rows_matmul(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x [B, H, Q, K] @ y [B, K, N]`` (one ``y`` per row, shared by its heads) -> ``[B, H, Q, N]`` by one batched
    matmul over the rows, so a row is multiplied by the same kernel whatever the batch (a batch of one would
    otherwise fold into one plain matmul, whose sums round differently: a padded row then differs from the row alone
    in the last bits, which a quantized cache can turn into a different code)."""
    b, h, q, k = x.shape
    return torch.bmm(x.reshape(b, h * q, k), y).view(b, h, q, -1)


def rope_tables(inv: torch.Tensor, scale: float, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[..., rot / 2]`` (fp32, one per rotated pair) at ``positions [...]``."""
    f = positions.float()[..., None] * (inv if inv.device == positions.device else inv.to(positions.device))
    return f.cos() * scale, f.sin() * scale


def apply_rope_tail(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the trailing ``2 * cos.shape[-1]`` channels of ``x [..., N, D]`` in interleaved pairs (DeepSeek V4), in
    fp32 (kvlab/layers/rope.py)."""
    if torch.compiler.is_compiling():
        return rotate_part(x, cos, sin, "interleaved", at="tail", dtype=torch.float32)
    return rotate_tail(x, torch.complex(cos, sin))


def rotate_tail(x: torch.Tensor, rot: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """:func:`apply_rope_tail` with the table as one complex tensor ``rot = cos + i sin [..., rot / 2]`` (eager): each
    interleaved pair is a complex number multiplied by ``rot``, the same products and sums as ``rotate_part``'s
    (equal to the bit, tests/test_compressed.py) in 2 operators that compute instead of 9. Not compiled (inductor
    has no complex kernels: compiled steps take :func:`apply_rope_tail`'s real form). ``in_place``: ``x`` is a fresh
    tensor of the caller's, rotated where it lies when fp32 and outside autograd (no copy, no concatenation)."""
    n, d = 2 * rot.shape[-1], x.shape[-1]
    if in_place and x.dtype == torch.float32 and not (torch.is_grad_enabled() and x.requires_grad):
        torch.view_as_complex(x[..., d - n:].unflatten(-1, (-1, 2))).mul_(rot)
        return x
    z = torch.view_as_complex(x[..., d - n:].float().unflatten(-1, (-1, 2)))
    r = torch.view_as_real(z * rot).flatten(-2).to(x.dtype)
    return r if n == d else torch.cat((x[..., :d - n], r), dim=-1)


class Compressor(nn.Module):
    """Learned pooling of each block of ``ratio`` tokens into one entry of ``dim`` channels."""

    param_init: ClassVar[dict[str, str]] = {"position_bias": "zeros"}  # not drawn at random by Model.from_config

    def __init__(self, hidden: int, dim: int, ratio: int, overlap: bool, eps: float, norm_offset: bool) -> None:
        super().__init__()
        f = 2 if overlap else 1
        self.dim, self.ratio, self.overlap = dim, ratio, overlap
        self.kv_proj = Linear(hidden, f * dim, bias=False)
        self.gate_proj = Linear(hidden, f * dim, bias=False)
        self.position_bias = nn.Parameter(torch.zeros(ratio, f * dim))
        self.kv_norm = RMSNorm(dim, eps, norm_offset)

    def pool(self, kv: torch.Tensor, gate: torch.Tensor, prev: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """Raw projections of ``n`` complete blocks ``[B, n m, f d]`` -> normed entries ``[B, n, d]`` (no rope).

        ``prev``: series ``a`` (kv, gate logits ``[B, m, d]``) of the block before the first, or None (none)."""
        b, m, d = kv.shape[0], self.ratio, self.dim
        n = kv.shape[1] // m
        kv = kv.view(b, n, m, -1)
        gate = gate.view(b, n, m, -1) + self.position_bias
        if not self.overlap:
            w = gate.softmax(dim=2, dtype=torch.float32).to(kv.dtype)
            return self.kv_norm((kv * w).sum(dim=2))
        a_kv = kv.new_zeros(b, n, m, d)
        a_gate = gate.new_full((b, n, m, d), float("-inf"))
        if n > 1:
            a_kv[:, 1:] = kv[:, :-1, :, :d]
            a_gate[:, 1:] = gate[:, :-1, :, :d]
        if prev is not None:
            a_kv[:, 0] = prev[0]
            a_gate[:, 0] = prev[1] + self.position_bias[:, :d]
        kv2 = torch.cat((a_kv, kv[..., d:]), dim=2)
        gate2 = torch.cat((a_gate, gate[..., d:]), dim=2)
        w = gate2.softmax(dim=2, dtype=torch.float32).to(kv.dtype)
        return self.kv_norm((kv2 * w).sum(dim=2))

    def update(self, x: torch.Tensor, start: int, pool_state, rope) -> torch.Tensor:
        """Entries ``[B, (start + T) // m, d]`` of every complete block after the T tokens ``x`` at ``start``.

        ``pool_state``: the layer's store for this compressor (kvlab/cache/compressed.py) or None (``start`` 0).
        """
        m, d = self.ratio, self.dim
        r = slice(None)
        t = x.shape[1]
        kv, gate = self.kv_proj(x), self.gate_proj(x)
        nb0, nb1 = start // m, (start + t) // m
        lead = start - nb0 * m
        if pool_state is not None and lead:  # the raw rows of the block this call completes
            held_kv, held_gate = pool_state.partial(r, lead)
            kv, gate = torch.cat((held_kv, kv), dim=1), torch.cat((held_gate, gate), dim=1)
        n = nb1 - nb0
        used = n * m
        new = kv.new_zeros(kv.shape[0], 0, d)
        if n:
            prev = pool_state.previous_block(r) if self.overlap and nb0 and pool_state is not None else None
            new = self.pool(kv[:, :used], gate[:, :used], prev)
            cos, sin = rope_tables(*rope, torch.arange(nb0, nb1, device=x.device) * m)
            new = apply_rope_tail(new, cos, sin)
        if pool_state is None:
            return new
        return pool_state.commit(r, nb0, new, kv, gate)

    def update_padded(self, x: torch.Tensor, start: int, pad: torch.Tensor, pool_state, rope) -> torch.Tensor:
        """:meth:`update` for a left-padded batch, every row at once: row ``r``'s tokens sit at its own positions
        ``start - pad[r] + i`` (negative: padding, skipped), its blocks aligned to its first token. Each row's
        sequence from the start of its current block (the partial block held, then its tokens) is gathered into
        place, the blocks of the longest are pooled for all rows, and each row keeps (and the store writes) only
        its own complete ones; the rest are finite values past the row's count, never visible (its queries see
        ``(position + 1) // m`` entries) and overwritten when the row's block completes. Returns the entries
        ``[B, N, d]`` (``N``: the most any row holds)."""
        m, d = self.ratio, self.dim
        b, t = x.shape[:2]
        dev = x.device
        first = start - pad  # [B] each row's position of this call's first token
        at = first.clamp(min=0)
        skip = (-first).clamp(min=0, max=t)  # the row's padding tokens in this call
        end = (first + t).clamp(min=0)
        nb0, nb1 = torch.div(at, m, rounding_mode="floor"), torch.div(end, m, rounding_mode="floor")
        kv, gate = self.kv_proj(x), self.gate_proj(x)
        held = m - 1 if pool_state is not None else 0  # raw rows of the partial block, in front of the tokens
        lead = at - nb0 * m if held else torch.zeros_like(at)
        if held:
            kv = torch.cat((pool_state.partial_kv, kv), dim=1)
            gate = torch.cat((pool_state.partial_gate, gate), dim=1)
        counts = nb1 - nb0  # [B] complete blocks per row
        n = int(counts.max())  # the batch's host read of a prefill call (never in a decode step)
        u = torch.arange(n * m + m - 1, device=dev)[None]  # the aligned row: its partial block, then its tokens
        src = torch.where(u < lead[:, None], u, held + skip[:, None] + u - lead[:, None]).clamp(max=kv.shape[1] - 1)
        kv = kv.gather(1, src[..., None].expand(-1, -1, kv.shape[-1]))
        gate = gate.gather(1, src[..., None].expand(-1, -1, gate.shape[-1]))
        prev = None
        if self.overlap and pool_state is not None:  # the previous block's series a, none before a row's first block
            has = (nb0 > 0)[:, None, None]
            prev = (torch.where(has, pool_state.prev_kv, 0.0), torch.where(has, pool_state.prev_gate, float("-inf")))
        new = kv.new_zeros(b, 0, d)
        if n:
            new = self.pool(kv[:, :n * m], gate[:, :n * m], prev)
            cos, sin = rope_tables(*rope, (nb0[:, None] + torch.arange(n, device=dev)) * m)
            new = apply_rope_tail(new, cos, sin)
        if pool_state is None:
            return new
        rest = lead + (t - skip) - counts * m  # raw rows left in each row's new partial block
        return pool_state.commit_rows(nb0, counts, new, kv, gate, rest)

    def block_entry(self, kv: torch.Tensor, gate: torch.Tensor, pool_state, prev, rope,
                    first: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The entry of a block this decode token completes: the partial block's raw rows plus the token's ``kv`` /
        ``gate [B, 1, f d]`` as ``block_kv`` / ``block_gate [B, m, f d]``, pooled (``prev``: the previous block's
        series a, overlap) and rotated at the block's first position ``first [B]``. Returns ``(entry [B, 1, d],
        block_kv, block_gate)``; the eager and the masked step share it."""
        if self.ratio > 1:
            kv = torch.cat((pool_state.partial_kv, kv), dim=1)
            gate = torch.cat((pool_state.partial_gate, gate), dim=1)
        new = self.pool(kv, gate, prev)
        cos, sin = rope_tables(*rope, first[:, None])
        return apply_rope_tail(new, cos, sin), kv, gate

    def step(self, x: torch.Tensor, pos: torch.Tensor, pool_state, rope, n: int,
             start: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode token per row: ``x [B, 1, hidden]`` at row positions ``pos [B]`` (a row's own position: the
        call's start less its left padding; negative: still padding, nothing is written).

        Every row's candidate entry (its partial block plus this token, pooled) is computed, and written only where
        the token completes the row's block (a mask, not a branch). Returns the first ``n`` entries held ``[B, n,
        d]`` (``n``: the most any row has) and how many of them each row sees ``[B]`` (None with ``start``: all n).

        ``start``: every row at this position (no padding) in an eager step: a token that does not complete its
        block (``m - 1`` steps of ``m``) only joins the partial block (``_Pool.hold_step``), no candidate pooled;
        one that does is pooled and stored without masks (``_Pool.complete_step``); the same values (a branch on a
        Python int, so compiled steps, which keep one graph for every position, take the masks)."""
        m = self.ratio
        kv, gate = self.kv_proj(x), self.gate_proj(x)  # [B, 1, f d]
        if start is not None and start % m != m - 1:  # (every row sees n entries: no count returned)
            return pool_state.hold_step(start % m, kv, gate, n), None
        if start is not None:  # eager, every row completes block start // m: pooled and stored without masks
            w = start // m
            prev = pool_state.previous_block(slice(None)) if self.overlap and w else None
            new, block_kv, block_gate = self.block_entry(kv, gate, pool_state, prev, rope, pos - (m - 1))
            return pool_state.complete_step(w, new, block_kv, block_gate, n), None
        active = pos >= 0
        lead = pos.remainder(m)  # rows of the block already held
        w = torch.div(pos, m, rounding_mode="floor")  # the block this token belongs to
        complete = active & (lead == m - 1)
        prev = None
        if self.overlap:  # the previous block's series a, none before a row's first block
            has = (w > 0)[:, None, None]
            prev = (torch.where(has, pool_state.prev_kv, 0.0), torch.where(has, pool_state.prev_gate, float("-inf")))
        new, block_kv, block_gate = self.block_entry(kv, gate, pool_state, prev, rope, w * m)  # valid where complete
        entries = pool_state.commit_step(w, lead, active, complete, new, kv, block_kv, block_gate, n)
        return entries, torch.div(pos + 1, m, rounding_mode="floor").clamp(min=0)


class CSAIndexer(Compressor):
    """CSA's lightning indexer: its own overlapping compressor plus per-head query and weight projections."""

    def __init__(self, hidden: int, q_rank: int, heads: int, dim: int, ratio: int, eps: float, norm_offset: bool):
        super().__init__(hidden, dim, ratio, True, eps, norm_offset)
        self.heads = heads
        self.q_b_proj = Linear(q_rank, heads * dim, bias=False)
        self.weights_proj = Linear(hidden, heads, bias=False)


class CompressedAttention(nn.Module):
    """A ``csa`` or ``hca`` layer; x ``[B, T, hidden]`` -> same shape."""

    param_init: ClassVar[dict[str, str]] = {"sinks": "zeros"}  # not drawn at random by Model.from_config

    def __init__(self, spec: LayerSpec, hidden: int, eps: float = 1e-6, norm_offset: bool = False) -> None:
        super().__init__()
        self.spec, self.cspec = spec, spec.compress
        c = spec.compress
        h, d = spec.num_heads, spec.head_dim
        self.csa = spec.compress.indexed
        self.eps = eps
        self.q_a_proj = Linear(hidden, c.q_lora_rank, bias=False)
        self.q_a_norm = RMSNorm(c.q_lora_rank, eps, norm_offset)
        self.q_b_proj = Linear(c.q_lora_rank, h * d, bias=False)
        self.kv_proj = Linear(hidden, d, bias=False)
        self.kv_norm = RMSNorm(d, eps, norm_offset)
        self.o_a_proj = Linear(h * d // c.o_groups, c.o_groups * c.o_lora_rank, bias=False)  # grouped
        self.o_b_proj = Linear(c.o_groups * c.o_lora_rank, hidden, bias=False)
        if spec.sinks:
            self.sinks = nn.Parameter(torch.zeros(h))
        # an swa layer (ratio 0) is the same layer without a compressor: window branch only
        self.compressor = Compressor(hidden, d, c.ratio, self.csa, eps, norm_offset) if c.ratio else None
        if self.csa:
            self.compressor.indexer = CSAIndexer(hidden, c.q_lora_rank, c.index_heads, c.index_head_dim, c.ratio, eps,
                                              norm_offset)
        self._rope_key = (None if spec.rope is None else dataclasses.astuple(spec.rope), d)
        if spec.rope is not None:
            inv, scale = inv_freq_and_scale(spec.rope, d)
            self._rope = (inv, scale)
        else:  # no rotation: a zero-width table
            self._rope = (torch.zeros(0), 1.0)
        self._inv_by_device: dict[torch.device, torch.Tensor] = {}  # the frequencies on each device used (not a
        # buffer: a model built on the meta device keeps them), copied once, not per step (a copy from the host syncs)

    def _rope_on(self, device: torch.device) -> tuple[torch.Tensor, float]:
        """``(inverse frequencies, scale)`` with the frequencies on ``device``."""
        inv, scale = self._rope
        if inv.device != device:
            hit = self._inv_by_device.get(device)
            inv = hit if hit is not None else self._inv_by_device.setdefault(device, inv.to(device))
        return inv, scale

    def _tables(self, step, pos: torch.Tensor, rope: tuple[torch.Tensor, float]) -> tuple | None:
        """This call's rotary tables at ``pos`` (cos, sin and, eager, ``cos + i sin`` and its conjugate), or None (no
        rotation); built once per call for every layer of the same rotary settings (``step.shared``)."""
        if not rope[0].numel():
            return None
        key = ("compressed-rope", self._rope_key)
        hit = step.shared.get(key)
        if hit is None:
            cos, sin = rope_tables(*rope, pos)
            if torch.compiler.is_compiling():
                hit = (cos, sin, None, None)
            else:
                rot = torch.complex(cos, sin)
                hit = (cos, sin, rot, torch.complex(cos, -sin))
            step.shared[key] = hit
        return hit

    def _rot(self, x: torch.Tensor, tables: tuple | None, inverse: bool = False) -> torch.Tensor:
        """Rotate ``x`` with this call's ``tables`` (:meth:`_tables`; None: no rotation)."""
        if tables is None:
            return x
        cos, sin, rot, back = tables
        if cos.dim() == 3 and x.dim() == 4:  # per-row positions [B, T] against [B, H, T, D]
            cos, sin = cos[:, None], sin[:, None]
            rot, back = (None, None) if rot is None else (rot[:, None], back[:, None])
        if rot is not None:
            return rotate_tail(x, back if inverse else rot, in_place=True)  # every x here is this call's own
        return apply_rope_tail(x, cos, -sin if inverse else sin)

    def forward(self, x: torch.Tensor, step, index: int, store=None) -> torch.Tensor:
        s, c = self.spec, self.cspec
        b, t, _ = x.shape
        h = s.num_heads
        start, qpos, pad = step.start, step.qpos, step.pad
        pos = qpos if pad is None else (qpos[None] - pad[:, None]).clamp(min=0)  # rotary positions
        rope = self._rope_on(x.device)
        tab = self._tables(step, pos, rope)  # once for q, kv, indexer, output (and the layers of the same rope)
        cq = self.q_a_norm(self.q_a_proj(x))
        qb = self.q_b_proj(cq)  # [B, T, H D] before the query's norm and rotation
        kv = self._rot(self.kv_norm(self.kv_proj(x)), tab)[:, None]  # [B, 1, T, D]
        if store is not None:  # a quantized ring's decode step: a blocked reader (kvlab/layers/blocked.py)
            kw, _, kpos = store.append(kv, kv[..., :0], start)
            kw = kw if t == 1 else dense(kw)
        else:
            kw, kpos = kv, qpos
        ix = self.compressor.indexer if self.csa else None
        iqb = ix.q_b_proj(cq) if self.csa else None  # [B, T, HI dI] before its rotation
        iwb = ix.weights_proj(x) if self.csa else None  # [B, T, HI] before 1 / sqrt(HI)
        pool = store.pool if store is not None else None
        ipool = store.index if store is not None and self.csa else None
        if store is not None and t == 1:  # a decode step: tensor operations over the rows, no host read
            eager = pad is None and not torch.compiler.is_compiling()
            rowpos = (torch.full((b,), start, device=x.device) if pad is None else start - pad)
            entries = ikeys = nvis = None
            every = eager and start >= s.window - 1  # every key visible: the ring full, no padding
            if self.compressor is not None:
                n = (start + 1) // c.ratio  # entries the row with the least padding holds
                at = start if eager else None  # eager: skip the pooling
                entries, nvis = self.compressor.step(x, rowpos, pool, rope, n, at)
                if self.csa:
                    ikeys = ix.step(x, rowpos, ipool, rope, n, at)[0]
                if nvis is None and not every:  # eager: every row sees all n
                    nvis = torch.full((b,), n, device=x.device)
            # one C++ call (compressed_kernel.py) where the ring is full and there is no padding; the position read
            # last: traced, a guard (the ring's own regime) only where the kernel applies
            if pad is None and compressed_kernel.applies(x, kw, entries, ikeys) and start >= s.window - 1:
                cos, sin = (None, None) if tab is None else tab[:2]
                out = compressed_kernel.step(qb, kw, entries, ikeys, iqb, iwb, c.index_topk, cos, sin,
                                             self.sinks if s.sinks else None, h, self.eps, s.scale)
                return self._project(out, b, t)
            if every:  # a quantized cache: one C++ call over its own buffers (cpu_attend.py Bound)
                out = self._step_bound(qb, kw, entries, ikeys, iqb, iwb, tab)
                if out is not None:
                    return self._project(out, b, t)
            q, iq, iw = self._queries(qb, iqb, iwb, tab, b, t)
            out = self._attend_step(q, kw, kpos, qpos, pad, entries, nvis, ikeys, iq, iw, every)
        elif self.compressor is None:  # swa: the window branch alone
            q, iq, iw = self._queries(qb, iqb, iwb, tab, b, t)
            out = self._attend(q, kw, kpos, qpos, start, None, None, None, None, pad)
        elif pad is None:
            q, iq, iw = self._queries(qb, iqb, iwb, tab, b, t)
            entries = self.compressor.update(x, start, pool, rope)
            ikeys = ix.update(x, start, ipool, rope) if self.csa else None
            out = self._attend(q, kw, kpos, qpos, start, entries, ikeys, iq, iw)
        else:  # left padding: each row compresses its own tokens, blocks aligned to its first token (all rows at once)
            q, iq, iw = self._queries(qb, iqb, iwb, tab, b, t)
            entries = self.compressor.update_padded(x, start, pad, pool, rope)
            ikeys = ix.update_padded(x, start, pad, ipool, rope) if self.csa else None
            out = self._attend(q, kw, kpos, qpos, start, entries, ikeys, iq, iw, pad)
        return self._project(self._rot(out, tab, inverse=True).transpose(1, 2), b, t)

    def _queries(self, qb: torch.Tensor, iqb: torch.Tensor | None, iwb: torch.Tensor | None, tab, b: int, t: int
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The queries ``q [B, H, T, D]`` (each head normed without a weight, rotated) from ``qb [B, T, H D]``; CSA's
        indexer query ``[B, HI, T, dI]`` (rotated) and head weights ``[B, T, HI]`` (fp32, times ``1 / sqrt(HI)``)."""
        h, d = self.spec.num_heads, self.spec.head_dim
        q = qb.view(b, t, h, d).transpose(1, 2)
        if q.dtype == torch.float32:  # one operator, the same arithmetic
            q = F.rms_norm(q, (d,), eps=self.eps)
        else:
            q = q * torch.rsqrt(q.float().square().mean(-1, keepdim=True) + self.eps).to(q.dtype)
        q = self._rot(q, tab)
        if iqb is None:
            return q, None, None
        ix = self.compressor.indexer
        iq = self._rot(iqb.view(b, t, ix.heads, ix.dim).transpose(1, 2), tab)  # [B, HI, T, dI]
        return q, iq, as_fp32(iwb) * ix.heads ** -0.5

    def _project(self, out: torch.Tensor, b: int, t: int) -> torch.Tensor:
        """The grouped output projection of the attention output ``[B, T, H, D]`` -> ``[B, T, hidden]``."""
        h, d, c = self.spec.num_heads, self.spec.head_dim, self.cspec
        g = c.o_groups
        w = self.o_a_proj.weight.view(g, -1, h * d // g)  # [G, rank, in]
        # einsum on every path, not f32_kernel.grouped: with it, the bound decode step and the general paths differed
        # in near-tied indexer top-k choices (tests/test_cpu_attend.py test_bound_decode_step, csa-int4-g4-asym, 6e-5;
        # which path diverged not pinned), and it measured level (1.00x) on this projection (docs/performance.md)
        y = torch.einsum("btgi,gri->btgr", out.reshape(b, t, g, -1), w)
        return self.o_b_proj(y.reshape(b, t, -1))

    def _attend(self, q, kw, kpos, qpos, q0: int, entries, ikeys, iq, iw, pad=None) -> torch.Tensor:
        """Attention of queries ``q [B, H, T, D]`` at positions ``qpos [T]`` (the first is ``q0``) over the window
        rows ``kw [B, 1, L, D]`` at ``kpos [L]`` (the last T of them are this call's) and the compressed
        ``entries [B, N, D]``. ``pad [B]``: left padding, row ``r``'s positions are ``qpos - pad[r]`` (its padding
        keys hidden, its entries counted from its first token); a padding query sees itself alone."""
        s, c = self.spec, self.cspec
        b, h, t, d = q.shape
        m = c.ratio
        ix = self.compressor.indexer if self.csa else None
        ring = kw.shape[2] - t  # rows held before this call (a ring: any order, positions in kpos)
        sinks = self.sinks.float() if s.sinks else None
        out = torch.empty(b, h, t, d, dtype=q.dtype, device=q.device)
        n_all = entries.shape[1] if entries is not None else 0
        dense = not self.csa or n_all <= _DENSE_TOPK * c.index_topk  # every entry scored (CSA: top-k as a mask)
        per_query = h * (2 * s.window + (n_all if dense else c.index_topk)) + (ix.heads * n_all if self.csa else 0)
        blk = max(1, min(t, _BLOCK_ELEMENTS // max(1, b * per_query), max(_MIN_BLOCK, _WINDOW_BLOCKS * s.window)))
        pmin = 0 if pad is None else int(pad.min())  # the least padded row (a prefill call's host read)
        for a in range(0, t, blk):
            e = min(t, a + blk)
            qp = qpos[a:e]
            lo = max(0, a - s.window + 1)
            # window rows: the previously held ring (only while it can still be seen: every ring row is before this
            # call's first position, out of the window of a query window - 1 or more past it) and this call's rows
            if not ring or a >= s.window - 1:
                keys, kp = kw[:, :, ring + lo:ring + e], kpos[ring + lo:ring + e]
            elif lo:  # a gap between the ring and this block's rows
                keys = torch.cat((kw[:, :, :ring], kw[:, :, ring + lo:ring + e]), dim=2)
                kp = torch.cat((kpos[:ring], kpos[ring + lo:ring + e]))
            else:  # the ring and the rows up to this block's last: one view, no copy
                keys, kp = kw[:, :, :ring + e], kpos[:ring + e]
            ok = visible_keys(qp, kp, s.window)[None]  # [B|1, Q, Lw]
            rowq = qp[None] if pad is None else qp[None] - pad[:, None]  # [B|1, Q] the rows' own positions
            if pad is not None:  # a row's padding keys are not written for it
                ok = ok & (kp[None, None] >= pad[:, None, None])
            ok = ok | (kp[None] == qp[:, None])  # a (padding) query always sees itself
            sw = (q[:, :, a:e] @ keys.transpose(-1, -2)).float() * s.scale  # [B, H, Q, Lw]
            sw = sw.masked_fill_(~ok[:, None], float("-inf"))  # sw is this block's own: no copy
            # entries complete at each query (none without a compressor; none for a padding query)
            visible = torch.div(rowq + 1, m, rounding_mode="floor").clamp(min=0) if m else rowq * 0
            nv = min(entries.shape[1], max(0, (q0 - pmin + e) // m)) if m else 0  # the most any row sees
            if self.csa and nv:
                kk = ikeys[:, :nv]
                isc = F.relu(iq[:, :, a:e].float() @ kk.float().transpose(-1, -2)[:, None]) * ix.dim ** -0.5
                isc = (isc * iw[:, a:e].transpose(1, 2)[..., None]).sum(dim=1)  # [B, Q, nv]
                future = torch.arange(nv, device=q.device) >= visible[..., None]  # [B|1, Q, nv]
                isc = isc.masked_fill_(future, float("-inf"))
                k = min(c.index_topk, nv)
                if k < nv:  # ties at the boundary: the earlier entry, whatever the length
                    val, idx = stable_topk(isc, k)
                else:
                    val, idx = isc, torch.arange(nv, device=q.device).expand_as(isc)
                valid = val > float("-inf")  # [B, Q, k]
                gathered = nv > _DENSE_TOPK * k
                if not gathered:  # few entries: every one scored by one matmul, the chosen ones kept by a mask
                    sel = entries[:, :nv]
                    chosen = torch.zeros(isc.shape, dtype=torch.bool, device=q.device).scatter_(-1, idx, valid)
                    sc = _rows_matmul(q[:, :, a:e], sel.transpose(-1, -2)).float() * s.scale
                    sc = sc.masked_fill_(~chosen[:, None], float("-inf"))
                else:
                    if b == 1:  # one row: index_select copies the chosen rows faster than advanced indexing (1.6x)
                        sel = entries[0, :nv].index_select(0, idx.reshape(-1)).view(*idx.shape, -1)  # [B, Q, k, D]
                    else:
                        sel = entries[:, :nv][torch.arange(b, device=q.device)[:, None, None], idx]
                    sc = torch.einsum("bhqd,bqkd->bhqk", q[:, :, a:e], sel).float() * s.scale
                    sc = sc.masked_fill_(~valid[:, None], float("-inf"))
            elif nv:
                sel = entries[:, :nv]
                sc = (q[:, :, a:e] @ sel.transpose(-1, -2)[:, None]).float() * s.scale
                future = torch.arange(nv, device=q.device) >= visible[..., None]  # [B|1, Q, nv]
                sc = sc.masked_fill_(future[:, None], float("-inf"))
            else:
                sc = None
            scores = sw if sc is None else torch.cat((sw, sc), dim=-1)
            p = softmax_with_sink(scores, None if sinks is None else sinks.view(1, h, 1, 1)).to(q.dtype)
            lw = sw.shape[-1]
            o = p[..., :lw] @ keys  # V = K
            if sc is not None:
                pc = p[..., lw:lw + sc.shape[-1]]
                if self.csa and gathered:
                    o = o + torch.einsum("bhqk,bqkd->bhqd", pc, sel)
                elif self.csa:
                    o = o + _rows_matmul(pc, sel)
                else:
                    o = o + pc @ sel[:, None]
            out[:, :, a:e] = o
        return out

    def _attend_step(self, q, kw, kpos, qpos, pad, entries, nvis, ikeys, iq, iw, every: bool = False) -> torch.Tensor:
        """One decode query per row ``q [B, H, 1, D]`` over the whole window ring ``kw [B, 1, L, D]`` (in place, at
        slot positions ``kpos [L]``; left padding ``pad [B]`` masked) and the first ``nvis [B]`` of the compressed
        ``entries [B, N, D]`` of each row (CSA: the indexer's top-k of them, picked). The ring, the entries and the
        indexer keys may be a quantized cache's readers: int8 / int4 per token attended from their codes by the C++
        kernel (kvlab/layers/cpu_attend.py; the picked entries read through their slots), others block by block with
        the chosen entries alone dequantized (kvlab/layers/blocked.py); one softmax over both branches, V = K. No
        host read.

        ``every``: every key is visible (an eager step without padding once the ring is full: it holds exactly the
        window, and every row sees all ``n`` entries), so no mask is built (a branch on Python values the caller
        knows; compiled steps keep the masks, one graph for every position)."""
        s, c = self.spec, self.cspec
        b = q.shape[0]
        if every and not torch.compiler.is_compiling():
            out = self._attend_bound(q, kw, entries, ikeys, iq, iw)
            if out is not None:
                return out
        if not every:
            ok = visible_mask(qpos, kpos, s.window, pad)  # [B|1, 1, L]
        parts, seen = [kw], [None if every else ok.expand(b, 1, ok.shape[-1])]
        n = 0 if entries is None else entries.shape[-2]
        if n:
            vis = None if every else (torch.arange(n, device=q.device)[None] < nvis[:, None])[:, None]  # [B, 1, N]
            if self.csa:
                ix = self.compressor.indexer
                qi = as_fp32(iq).transpose(1, 2)  # [B, 1, HI, dI]
                isc = F.relu(scores(qi, with_heads(ikeys)).transpose(1, 2) * ix.dim ** -0.5)  # [B, HI, 1, N]
                isc = (isc * iw.transpose(1, 2)[..., None]).sum(dim=1)
                isc = isc if every else isc.masked_fill_(~vis, float("-inf"))
                k = min(c.index_topk, n)
                val, idx = stable_topk(isc, k) if k < n else (isc, torch.arange(n, device=q.device).expand_as(isc))
                parts.append(pick(entries, idx.reshape(b, k)))  # [B, 1, k, D]: only those rows read
                seen.append(None if every else val > float("-inf"))
            else:
                parts.append(with_heads(entries))
                seen.append(vis)
        if len(parts) == 1:
            keys = parts[0]
        elif any(is_blocked(p) for p in parts):
            keys = Cat(parts, -2)  # a quantized cache: read part by part, block by block
        else:  # plain tensors: one copy of the window and the entries (a few hundred rows), one softmax over both
            keys = torch.cat(parts, dim=-2)
        mask = None
        if not every:
            visible = torch.cat(seen, dim=-1)[:, :, None]  # [B, 1, 1, L + N]
            mask = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill_(~visible, float("-inf"))
        return attend(q, keys, keys, mask, s.scale, sinks=self.sinks if s.sinks else None)

    def _step_bound(self, qb, kw, entries, ikeys, iqb, iwb, tab) -> torch.Tensor | None:
        """An eager decode step with every key visible over a quantized cache (int8 / int4 per token) as one C++ call
        on its own buffers (kvlab/layers/cpu_attend.py ``Bound.v4_step``, descriptors built once per cache): the
        query's weightless norm and rotation, CSA's indexer (query rotation, weighted scores, top-k), attention with
        sinks over the window ring then the entries (or those picked) read from their codes, the output rotated back;
        what kvlab/layers/compressed_kernel.py does on a plain float32 or bfloat16 cache. ``qb [B, 1, H D]``, ``iqb [B, 1, HI
        dI]``, ``iwb [B, 1, HI]`` (before ``1 / sqrt(HI)``) -> ``[B, 1, H, D]``; None where it does not apply (a
        float32 model, the buffers :func:`cpu_attend.bound` takes), then :meth:`_attend_step`."""
        s, c = self.spec, self.cspec
        if (qb.dtype != torch.float32 or not isinstance(kw, QuantView)
                or not (entries is None or isinstance(entries, QuantView))):
            return None
        b = qb.shape[0]
        n = 0 if entries is None else entries.n
        bound = cpu_attend.bound((kw.rows,) if not n else (kw.rows, entries.rows), b)
        if bound is None:
            return None
        ib = iq = iw = None
        ix = self.compressor.indexer if self.csa else None
        if n and self.csa and c.index_topk < n:
            if not isinstance(ikeys, QuantView) or iqb.dtype != torch.float32 or iwb.dtype != torch.float32:
                return None
            ib = cpu_attend.bound((ikeys.rows,), b)
            if ib is None:
                return None
            iq, iw = iqb.contiguous(), iwb.contiguous()
        cos, sin = (None, None) if tab is None else (tab[0].contiguous(), tab[1].contiguous())
        sinks = self.sinks.float().contiguous() if s.sinks else None
        counts = (kw.n,) if not n else (kw.n, n)
        return bound.v4_step(qb.contiguous(), counts, cos, sin, ib, iq, iw, 1.0 if ix is None else ix.heads ** -0.5,
                             c.index_topk, sinks, self.eps, s.scale)

    def _attend_bound(self, q, kw, entries, ikeys, iq, iw) -> torch.Tensor | None:
        """:meth:`_attend_step` with every key visible (``every``), eager, as one C++ call per layer over the
        quantized cache's own buffers (kvlab/layers/cpu_attend.py ``Bound``: descriptors built once per cache, no
        plan, no readers joined, no torch operator between the buffers and the kernel): the window ring, then the
        entries (HCA) or the rows CSA's indexer picked of them, the indexer's weighted scores another call. None
        where the kernel does not take the buffers (the general path then)."""
        s, c = self.spec, self.cspec
        if not isinstance(kw, QuantView) or not (entries is None or isinstance(entries, QuantView)):
            return None
        n = 0 if entries is None else entries.n
        rows = (kw.rows,) if not n else (kw.rows, entries.rows)
        bound = cpu_attend.bound(rows, q.shape[0])
        if bound is None:
            return None
        b, h, _, d = q.shape
        index = None
        counts = (kw.n,) if not n else (kw.n, n)
        if n and self.csa:
            ix = self.compressor.indexer
            ib = cpu_attend.bound((ikeys.rows,), b) if isinstance(ikeys, QuantView) else None
            if ib is None:
                return None
            k = c.index_topk
            if k < n:  # the indexer's scores and top-k in C (all n entries otherwise, in order: no index)
                qi = as_fp32(iq).reshape(b, 1, ix.heads, ix.dim).contiguous()  # [B, 1, HI, dI]
                index = ib.index_topk(qi, n, as_fp32(iw).reshape(b, ix.heads).contiguous(), ix.dim ** -0.5, k)[1]
                counts = (kw.n, k)
        sinks = self.sinks.float().contiguous() if s.sinks else None
        out = bound.attend(as_fp32(q).reshape(b, 1, h, d).contiguous(), counts, index, sinks, s.scale)
        return out.reshape(b, h, 1, d).to(q.dtype)


__all__ = ["CSAIndexer", "CompressedAttention", "Compressor", "apply_rope_tail", "rope_tables", "rotate_tail"]
