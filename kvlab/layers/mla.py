"""Multi-head latent attention (MLA; DeepSeek-V2, arXiv 2405.04434; DeepSeek-V3, arXiv 2412.19437).

Following transformers 5.23 ``modeling_deepseek_v3`` (``DeepseekV3Attention``), for ``H`` heads:

- query: ``q = q_b_proj(q_a_layernorm(q_a_proj(x)))`` with ``q_lora_rank`` set, else ``q = q_proj(x)``; per head
  ``[q_nope (qk_nope_head_dim), q_pe (qk_rope_head_dim)]``;
- latent: ``[c_kv, k_pe] = kv_a_proj_with_mqa(x)``; ``c_kv = kv_a_layernorm(c_kv)`` (``kv_lora_rank``; no norm with
  ``mla.latent_norm=False``, kvlab's option for K/V factorised from a GQA model); ``k_pe`` is
  one rotary key shared by every head. Only ``c_kv`` and the rotated ``k_pe`` are cached (kvlab/cache/latent.py);
- keys and values: ``kv_b_proj(c_kv)`` gives per head ``[k_nope (qk_nope_head_dim), v (v_head_dim)]``; the key is
  ``[k_nope, k_pe]``;
- RoPE on ``q_pe`` and ``k_pe`` only: interleaved pairs ``(x0, x1), (x2, x3), ...`` written back de-interleaved
  (``rope_interleave``, transformers' ``apply_rotary_pos_emb_interleave``; the DeepSeek default) or rotate-half;
- softmax scale ``qk_head_dim ** -0.5``, times ``mscale ** 2`` with ``mscale = 0.1 * mscale_all_dim * ln(factor) + 1``
  when the rope is scaled (YaRN) and sets ``mscale_all_dim`` (transformers' ``yarn_apply_mscale``);
- ``o_proj`` on the ``H x v_head_dim`` output.

Two equal ways to attend (``MLAttention.mode``):

- ``expand``: up-project every attended latent to per-head K/V, then attention over ``qk_head_dim`` / ``v_head_dim``
  (cheapest when the queries are as many as the keys: a prefill from position 0);
- ``absorb``: fold ``W_uk`` into the query (``q_lat = q_nope @ W_uk``, per head ``[kv_lora_rank]``) and attend in the
  latent space over keys ``[c_kv, k_pe]`` and values ``c_kv`` — views of the one cached buffer, read once for all
  heads — then ``W_uv`` on the per-head latent output. What a decode step does.

``auto`` (default) takes the form with fewer FLOPs for the call: per attended key, absorbing costs
``H x T x (2 r + d_rope)`` and expanding ``H x (r x (d_nope + d_v) + T x (d_qk + d_v))`` (the up-projection is paid once
per key for all T queries), so decode steps and short chunks absorb, a prefill and long chunks expand (V3's shape:
below 171 queries per call absorb). The price (kvlab/kinds/mla.py) prices decode in the absorbed form and
prefill in the expanded one.

DeepSeek V3.2 sparse attention (DSA, ``mla.index_topk``; transformers' ``DeepseekV32Indexer``): a lightning indexer
(``indexer``) reads the query latent and the layer input: queries ``wq_b(q_latent)`` (``index_heads x index_head_dim``),
one key ``k_norm(wk(x))`` per token (cached, kvlab/cache/latent.py), both rotated rotate-half on their first
``qk_rope_head_dim`` channels; a key's score is ``sum_h w_h relu(q_h . k / sqrt(index_head_dim))`` with
``w = weights_proj(x) / sqrt(index_heads)``. Each query ranks only the keys it may see (causal, not padding) and
attends to its ``index_topk`` best (all of them when fewer). The choice carries no gradient (as transformers).
Ties at the top-k boundary (e.g. keys whose relu scores are 0 in every indexer head) go to the earlier key (a stable
sort), so a chunked forward chooses as the whole forward does.
"""

from __future__ import annotations

import torch
from torch import nn

from ..cache.latent import LatentStore
from ..config import LayerSpec, MLASpec
from . import dense_attend, f32_kernel, rows_kernel
from .blocked import channels, dense, gather, is_blocked, scores, with_heads
from .core import Step, attend, stable_topk, visible_mask
from .linear import Linear
from .norm import RMSNorm
from .rope import rotate, yarn_mscale

LATENT_NORM_EPS = 1e-6  # transformers' DeepseekV3RMSNorm default for q_a_layernorm / kv_a_layernorm


def softmax_scale(spec: LayerSpec) -> float:
    """``attn_scale`` if set, else ``qk_head_dim ** -0.5`` times YaRN's ``mscale(factor, mscale_all_dim) ** 2``."""
    if spec.attn_scale is not None:
        return spec.attn_scale
    scale = spec.mla.qk_head_dim ** -0.5
    r = spec.rope
    if r is not None and r.scaling != "default" and r.mscale_all_dim:
        m = yarn_mscale(r.factor, r.mscale_all_dim)
        scale = scale * m * m
    return scale


def rotate_all(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """RoPE on all channels of ``x [B, H, T, d]`` with tables ``cos``/``sin [B, T, d]`` (``cat(freqs, freqs)``):
    interleaved pairs de-interleaved on output (``rope_interleave``) or rotate-half (kvlab/layers/rope.py)."""
    half = cos.shape[-1] // 2
    c, s = cos[:, None, :, :half].to(x.dtype), sin[:, None, :, :half].to(x.dtype)
    return rotate(x, c, s, "deinterleave" if interleave else "half")


def whole_latent_values(keys) -> bool:
    """Whether the absorbed attention takes the whole latent ``[c_kv, k_pe]`` as its values too (their rotary
    channels' outputs dropped): on the CPU, a plain tensor. SDPA's CPU flash kernel needs keys and values of one width,
    and reads each latent row once for both products; values ``c_kv`` alone (narrower) took two matmuls reading the
    latent twice, 2.5x slower at 16K (docs/performance.md). A GPU decode step attends by two matmuls anyway, and a
    quantized cache's readers go to the C++ kernel (int8 / int4 per token on the CPU, kvlab/layers/cpu_attend.py: keys
    from both buffers, values from ``c_kv``, each tile read once) or are attended block by block."""
    return not is_blocked(keys) and not keys.is_cuda


class MLAttention(nn.Module):
    """One MLA layer described by a :class:`LayerSpec` (``attention='mla'``); x ``[B, T, hidden]`` -> same."""

    MODES = ("auto", "expand", "absorb")

    def __init__(self, spec: LayerSpec, hidden: int, eps: float = 1e-6, norm_offset: bool = False) -> None:
        super().__init__()
        m = spec.mla
        self.spec = spec
        h = spec.num_heads
        if m.q_lora_rank is not None:
            self.q_a_proj = Linear(hidden, m.q_lora_rank, bias=spec.qkv_bias)
            self.q_a_layernorm = RMSNorm(m.q_lora_rank, LATENT_NORM_EPS, norm_offset)
            self.q_b_proj = Linear(m.q_lora_rank, h * m.qk_head_dim, bias=False)
        else:
            self.q_proj = Linear(hidden, h * m.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(hidden, m.kv_lora_rank + m.qk_rope_head_dim, bias=spec.qkv_bias)
        self.kv_a_layernorm = RMSNorm(m.kv_lora_rank, LATENT_NORM_EPS, norm_offset) if m.latent_norm else nn.Identity()
        self.kv_b_proj = Linear(m.kv_lora_rank, h * (m.qk_nope_head_dim + m.v_head_dim), bias=False)
        self.o_proj = Linear(h * m.v_head_dim, hidden, bias=spec.o_bias)
        self.scale = softmax_scale(spec)
        self.mode = "auto"
        if m.sparse:
            self.indexer = DSAIndexer(m, hidden)

    def query(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-head queries ``[B, H, T, qk_head_dim]`` (before RoPE) and the query latent (None without q_lora)."""
        m = self.spec.mla
        b, t, _ = x.shape
        q_lat = self.q_a_layernorm(self.q_a_proj(x)) if m.q_lora_rank is not None else None
        q = self.q_b_proj(q_lat) if q_lat is not None else self.q_proj(x)
        return q.view(b, t, self.spec.num_heads, m.qk_head_dim).transpose(1, 2), q_lat

    def latent(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``c_kv [B, T, kv_lora_rank]`` (normalised) and ``k_pe [B, T, qk_rope_head_dim]`` (before RoPE)."""
        m = self.spec.mla
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)
        return self.kv_a_layernorm(c_kv), k_pe

    def forward(self, x: torch.Tensor, step: Step, index: int, store=None) -> torch.Tensor:
        s, m = self.spec, self.spec.mla
        b, t, _ = x.shape
        q, q_lat = self.query(x)
        q_nope, q_pe = q.split([m.qk_nope_head_dim, m.qk_rope_head_dim], dim=-1)
        c_kv, k_pe = self.latent(x)
        cos, sin = step.rope[index]
        if (t == 1 and type(store) is LatentStore and not m.sparse
                and (self.mode == "absorb" or (self.mode == "auto" and self.absorb_is_cheaper(1)))):
            out = self.decode_rows(q_nope, q_pe, c_kv, k_pe, cos, sin, step, store)
            if out is not None:
                return self.o_proj(out.reshape(b, t, s.num_heads * m.v_head_dim))
        q_pe = rotate_all(q_pe, cos, sin, m.rope_interleave)
        k_pe = rotate_all(k_pe[:, None], cos, sin, m.rope_interleave)[:, 0]
        if store is not None:  # one buffer [B, L, r + d_rope]: c_kv and k_pe are views of it (quantized, a decode
            lat, _, kpos = store.append(c_kv, k_pe, step.start)  # step: readers, kvlab/layers/blocked.py)
        else:
            lat, kpos = torch.cat((c_kv, k_pe), dim=-1), step.qpos
        if self.mode not in self.MODES:
            raise ValueError(f"MLAttention.mode={self.mode!r}: allowed: {', '.join(self.MODES)}")
        absorb = self.mode == "absorb" or (self.mode == "auto" and self.absorb_is_cheaper(t))
        if not absorb:
            lat = dense(lat)
        if m.sparse:
            idx, valid = self.indexer.select(x, q_lat, cos, sin, step, store, kpos)
            if absorb:  # read only the chosen latents
                out = self.absorbed_sparse(q_nope, q_pe, lat, idx, valid)
            else:  # expanding every latent once for all queries: a mask of each query's choice
                chosen = torch.zeros(*idx.shape[:2], lat.shape[1], dtype=torch.bool, device=x.device).scatter_(
                    -1, idx, valid)
                mask = torch.zeros(chosen.shape, dtype=step.dtype, device=x.device).masked_fill_(
                    ~chosen, float("-inf"))[:, None]
                out = self.expanded(q_nope, q_pe, lat, mask, False)
        else:
            mask, causal = step.mask(kpos, None)
            out = (self.absorbed if absorb else self.expanded)(q_nope, q_pe, lat, mask, causal)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, s.num_heads * m.v_head_dim))

    def absorb_is_cheaper(self, t: int) -> bool:
        """Whether attending in the latent space costs fewer FLOPs per attended key than expanding, for t queries."""
        m = self.spec.mla
        r = m.kv_lora_rank
        return t * (2 * r + m.qk_rope_head_dim) < r * (m.qk_nope_head_dim + m.v_head_dim) + t * (m.qk_head_dim + m.v_head_dim)

    def expanded(self, q_nope: torch.Tensor, q_pe: torch.Tensor, lat: torch.Tensor, mask: torch.Tensor | None,
                 causal: bool) -> torch.Tensor:
        """Attention with per-head K/V up-projected from the latents ``lat [B, L, r + d_rope]`` -> ``[B, H, T, Dv]``."""
        m, h = self.spec.mla, self.spec.num_heads
        b, L, _ = lat.shape
        c_kv, k_pe = lat.split([m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)
        if self.padded_values(q):
            k, v = self.up_project_padded(c_kv, k_pe)
            return attend(q, k, v, mask, self.scale, causal=causal)[..., :m.v_head_dim]
        kv = self.kv_b_proj(c_kv).view(b, L, h, m.qk_nope_head_dim + m.v_head_dim).transpose(1, 2)
        k_nope, v = kv.split([m.qk_nope_head_dim, m.v_head_dim], dim=-1)
        k = torch.cat((k_nope, k_pe[:, None].expand(b, h, L, m.qk_rope_head_dim)), dim=-1)
        return attend(q, k, v, mask, self.scale, causal=causal)

    def padded_values(self, q: torch.Tensor) -> bool:
        """Whether :meth:`expanded` up-projects into K/V of one width (values zero-padded to ``qk_head_dim``): several
        queries on the CPU without autograd (the ``out=`` matmuls carry no gradient), values narrower than keys.
        SDPA's CPU flash kernel needs one width; without it, the math fallback (kvlab/layers/core.py)."""
        m = self.spec.mla
        return (q.shape[2] > 1 and not q.is_cuda and m.v_head_dim < m.qk_head_dim
                and not (torch.is_grad_enabled() and self.kv_b_proj.weight.requires_grad))

    def up_project_padded(self, c_kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``c_kv [B, L, r]``, ``k_pe [B, L, d_rope]`` -> K ``[k_nope, k_pe]`` and V ``[v, 0]``, both
        ``[B, H, L, qk_head_dim]``: the up-projection written per head straight into the two buffers (no
        concatenation or padding copy of the per-head K/V; measured, docs/performance.md)."""
        m, h = self.spec.mla, self.spec.num_heads
        b, L, _ = c_kv.shape
        dn, dv, d = m.qk_nope_head_dim, m.v_head_dim, m.qk_head_dim
        w = self.kv_b_proj.weight.view(h, dn + dv, m.kv_lora_rank)
        k = c_kv.new_empty(b, h, L, d)
        v = c_kv.new_empty(b, h, L, d)
        torch.matmul(c_kv[:, None], w[:, :dn].transpose(1, 2), out=k[..., :dn])
        torch.matmul(c_kv[:, None], w[:, dn:].transpose(1, 2), out=v[..., :dv])
        k[..., dn:] = k_pe[:, None]
        v[..., dv:] = 0
        return k, v

    def decode_rows(self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
                    cos: torch.Tensor, sin: torch.Tensor, step: Step, store: LatentStore) -> torch.Tensor | None:
        """A float32 eager CPU decode step on a plain latent cache (one token a row), absorbed, with the rows written in
        place: ``c_kv`` and ``k_pe`` rotated by one C++ call (kvlab/layers/rows_kernel.py) straight into the cache's
        row, the query's latent part ``q_nope W_uk`` (kvlab/layers/f32_kernel.py) and its rotated ``q_pe`` straight into
        the query ``[B, H, 1, r + d_rope]``; the same numbers as :meth:`forward`'s torch operations (the rotations to
        the bit). ``[B, H, 1, v_head_dim]``, or None (nothing written) where the calls do not apply."""
        m, h = self.spec.mla, self.spec.num_heads
        r, dr = m.kv_lora_rank, m.qk_rope_head_dim
        w = self.kv_b_proj.weight.view(h, m.qk_nope_head_dim + m.v_head_dim, r)
        cs, sn = cos[:, 0], sin[:, 0]  # [B|1, d_rope]
        qn, qp = q_nope[:, :, 0], q_pe[:, :, 0]  # [B, H, .] views of the projection
        b = qn.shape[0]
        q = qn.new_empty(b, h, 1, r + dr)
        layout = "deinterleave" if m.rope_interleave else "half"
        if not (f32_kernel.grouped_applies(qn, w[:, :m.qk_nope_head_dim]) and c_kv.dtype == torch.float32
                and rows_kernel.pairs_applies(qp, cs, sn, q[:, :, 0, r:]) and rows_kernel.pairs_applies(
                    k_pe, cs, sn, k_pe) and store.latent.dtype == torch.float32 and not store.latent.is_cuda):
            return None
        row, held, kpos = store.row(step.start)
        row[..., :r].copy_(c_kv)
        rows_kernel.rope_pairs(k_pe, cs, sn, layout, row[..., r:])
        f32_kernel.grouped(qn, w[:, :m.qk_nope_head_dim], trans=True, out=q[:, :, 0, :r])
        rows_kernel.rope_pairs(qp, cs, sn, layout, q[:, :, 0, r:])
        mask, causal = step.mask(kpos, None)
        return self.latent_attention(q, held, mask, causal, w[:, m.qk_nope_head_dim:], True)

    def absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, lat: torch.Tensor, mask: torch.Tensor | None,
                 causal: bool) -> torch.Tensor:
        """Attention in the latent space: keys ``[c_kv, k_pe]``, values ``c_kv`` (views of ``lat``, shared by all
        heads), ``W_uk`` folded into the query and ``W_uv`` applied to the output -> ``[B, H, T, Dv]``."""
        m, h = self.spec.mla, self.spec.num_heads
        r = m.kv_lora_rank
        w = self.kv_b_proj.weight.view(h, m.qk_nope_head_dim + m.v_head_dim, r)
        w_uk, w_uv = w[:, :m.qk_nope_head_dim], w[:, m.qk_nope_head_dim:]
        one = q_nope.shape[2] == 1 and f32_kernel.grouped_applies(q_nope[:, :, 0], w_uk)
        if one:  # one query a row (a decode step), eager fp32: W_uk by one C++ call, written into q's latent part
            b = q_nope.shape[0]
            q = q_nope.new_empty(b, h, 1, r + m.qk_rope_head_dim)
            f32_kernel.grouped(q_nope[:, :, 0], w_uk, trans=True, out=q[:, :, 0, :r])
            q[..., r:] = q_pe
        else:
            q = torch.cat((torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk), q_pe), dim=-1)
        return self.latent_attention(q, lat, mask, causal, w_uv, one)

    def latent_attention(self, q: torch.Tensor, lat, mask: torch.Tensor | None, causal: bool, w_uv: torch.Tensor,
                         one: bool) -> torch.Tensor:
        """The absorbed query ``q [B, H, T, r + d_rope]`` over the latents ``lat``, then ``W_uv`` (``w_uv [H, Dv, r]``;
        ``one``: a decode step's, by one C++ call where the output allows) -> ``[B, H, T, Dv]``."""
        r = self.spec.mla.kv_lora_rank
        keys = with_heads(lat)  # [B, 1, L, r + d_rope] (a quantized decode step: readers of c_kv and k_pe)
        if whole_latent_values(keys):
            if dense_attend.applies(q, keys, keys):  # a CPU decode step: the C++ kernel (each row read once)
                out = dense_attend.attend(q, keys, keys, mask, self.scale, value_channels=r)
            else:
                out = attend(q, keys, keys, mask, self.scale, causal=causal)[..., :r]
        else:
            out = attend(q, keys, channels(keys, 0, r), mask, self.scale, causal=causal)  # [B, H, T, r]
        if one and out.dtype == torch.float32 and out.is_contiguous():  # W_uv likewise: [B, H, 1, Dv]
            return f32_kernel.grouped(out[:, :, 0], w_uv)[:, :, None]
        return torch.einsum("bhtr,hvr->bhtv", out, w_uv)


    def absorbed_sparse(self, q_nope: torch.Tensor, q_pe: torch.Tensor, lat: torch.Tensor, idx: torch.Tensor,
                        valid: torch.Tensor) -> torch.Tensor:
        """:meth:`absorbed` over each query's chosen latents only: ``idx``/``valid [B, T, k]`` -> ``[B, H, T, Dv]``.
        Gathers ``[B, T, k, r + d_rope]`` (the bytes the calculator prices for DSA), never the whole cache."""
        m, h = self.spec.mla, self.spec.num_heads
        b, t, k = idx.shape
        w = self.kv_b_proj.weight.view(h, m.qk_nope_head_dim + m.v_head_dim, m.kv_lora_rank)
        w_uk, w_uv = w[:, :m.qk_nope_head_dim], w[:, m.qk_nope_head_dim:]
        q = torch.cat((torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk), q_pe), dim=-1)  # [B, H, T, r + d_rope]
        sel = gather(lat, idx.reshape(b, t * k)).view(b, t, k, -1)  # a quantized cache: only these rows dequantized
        s = torch.einsum("bhtd,btkd->bhtk", q, sel).float() * self.scale
        p = s.masked_fill(~valid[:, None], float("-inf")).softmax(dim=-1).to(q.dtype)
        out = torch.einsum("bhtk,btkr->bhtr", p, sel[..., :m.kv_lora_rank])
        return torch.einsum("bhtr,hvr->bhtv", out, w_uv)


class DSAIndexer(nn.Module):
    """DeepSeek V3.2's lightning indexer: picks the ``index_topk`` keys each query attends to."""

    def __init__(self, m: MLASpec, hidden: int) -> None:
        super().__init__()
        self.m = m
        self.wq_b = Linear(m.q_lora_rank, m.index_heads * m.index_head_dim, bias=False)
        self.wk = Linear(hidden, m.index_head_dim, bias=False)
        self.k_norm = nn.LayerNorm(m.index_head_dim, eps=1e-6)
        self.weights_proj = Linear(hidden, m.index_heads, bias=False)

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate-half RoPE on the first ``qk_rope_head_dim`` channels of ``x [B, H, T, index_head_dim]``."""
        dr = self.m.qk_rope_head_dim
        return torch.cat((rotate_all(x[..., :dr], cos, sin, False), x[..., dr:]), dim=-1)

    SCORE_BYTES = 64 * 2**20  # the most one block of per-head scores [B, h, T, L] (fp32) may take

    def weighted_scores(self, q: torch.Tensor, keys: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``sum_h w_h relu(q_h . k / sqrt(index_head_dim))``: q ``[B, Hi, T, Di]``, keys ``[B, L, Di]``, w ``[B, T, Hi]``
        -> ``[B, T, L]`` (fp32), over blocks of heads whose scores take at most :attr:`SCORE_BYTES` (a decode step
        and short chunks: one block). Scored all at once, a V3.2 chunk of 512 queries held three ``[1, 64, 512, L]`` fp32
        tensors (scores, scaled, relu: 1.5 GiB at 4K keys, 6 GiB at 16K); in blocks, 159-175 MiB at 4K, 1.5-1.8x faster
        (benchmarks/dsa_indexer_memory.py, docs/performance.md)."""
        m = self.m
        b, hi, t, _ = q.shape
        kt = keys.float().transpose(-1, -2)[:, None]  # [B, 1, Di, L]
        per = hi if t == 1 else max(1, self.SCORE_BYTES // (4 * b * t * kt.shape[-1]))  # heads per block
        total = None
        for h0 in range(0, hi, per):
            rel = (q[:, h0:h0 + per].float() @ kt).mul_(m.index_head_dim ** -0.5).relu_()  # [B, h, T, L]
            part = torch.einsum("bhtl,bth->btl", rel, w[..., h0:h0 + per])
            total = part if total is None else total.add_(part)
        return total

    @torch.no_grad()
    def select(self, x: torch.Tensor, q_lat: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, step: Step,
               store, kpos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The chosen keys of each query: indices ``[B, T, k]`` (``k = min(index_topk, L)``) and whether each is a
        visible key ``[B, T, k]`` (a query that sees fewer than k keys gets invalid picks). No host read."""
        m = self.m
        b, t, _ = x.shape
        k = self.rope(self.k_norm(self.wk(x))[:, None], cos, sin)[:, 0]  # [B, T, Di]
        keys = store.append_index(k, step.start) if store is not None else k  # [B, L, Di]
        q = self.rope(self.wq_b(q_lat).view(b, t, m.index_heads, m.index_head_dim).transpose(1, 2), cos, sin)
        w = self.weights_proj(x).float() * m.index_heads ** -0.5  # [B, T, Hi]
        if is_blocked(keys):  # a quantized decode step: the keys scored block by block
            qk = scores(q.float().transpose(1, 2), with_heads(keys)).transpose(1, 2)  # [B, Hi, 1, L]
            total = torch.einsum("bhtl,bth->btl", torch.relu(qk * m.index_head_dim ** -0.5), w)  # [B, T, L]
        else:
            total = self.weighted_scores(q, keys, w)
        ok = visible_mask(step.qpos, kpos, None, step.pad)  # causal and padding: [B|1, T, L]
        total = total.masked_fill_(~ok, float("-inf"))
        top = stable_topk(total, min(m.index_topk, kpos.shape[0]))[1]  # ties: the earlier key, as a whole forward
        top = top.expand(b, *top.shape[1:])
        return top, ok.expand(b, *ok.shape[1:]).gather(-1, top)


__all__ = ["DSAIndexer", "MLAttention", "rotate_all", "softmax_scale"]
