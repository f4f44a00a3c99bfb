"""Routed mixture of experts with top-k choice (GShard/Switch; DeepSeek-V3/V4 scoring options).

Router in fp32. Options: softmax, sigmoid or sqrt-softplus scores (DeepSeek V4), a bias added to the scores for
the choice only (aux-loss-free balancing), group-limited choice (DeepSeek-V3: only the best groups of experts),
a fixed token-id -> experts table instead of a choice (DeepSeek V4's hash-routed layers), renormalised top-k
weights, routed scaling, always-on shared experts, SwiGLU pre-activations clipped at a limit (DeepSeek V4), a
router that reads the normalised residual stream with a learned scale and per-expert output scales (Gemma 4), a
router MLP in a narrow router space that can carry the previous layer's router state, and a skip expert that
computes nothing (ZAYA1). One token in an eager float32 CPU step (a batch-1 decode) runs its chosen experts and the
shared expert as one C++ call (kvlab/layers/moe_kernel.py), with a plain router's choice in that call too.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MoESpec
from . import moe_kernel
from .cast import as_dtype, as_fp32
from .linear import linear
from .mlp import GatedMLP, activation
from .norm import RMSNorm
from .router import RouterMLP

GROUPED_MM = getattr(F, "grouped_mm", None)  # torch >= 2.10
GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what ``grouped_mm`` takes (not float64)
GROUPED_MAX = 16  # eager: grouped matmuls up to this many (token, choice) pairs per expert, the loop beyond


def hash_table(vocab: int, top_k: int, num_experts: int) -> torch.Tensor:
    """A default token -> experts table ``[vocab, top_k]`` (int64): ``top_k`` distinct experts per token, spread by
    a fixed multiplicative hash. Real checkpoints bring their own (``tid2eid``); this one serves random models."""
    tok = torch.arange(vocab, dtype=torch.int64)[:, None]
    first = (tok * 2654435761) % num_experts
    return (first + torch.arange(top_k, dtype=torch.int64)[None]) % num_experts


def group_limit(choice: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """DeepSeek-V3 group-limited routing: ``choice [N, E]`` with the experts outside the ``topk_group`` best of
    ``n_group`` equal groups set to -inf; a group scores the sum of its two best choices (transformers 5.23)."""
    n, e = choice.shape
    grouped = choice.view(n, n_group, e // n_group)
    best = grouped.topk(min(2, e // n_group), dim=-1).values.sum(-1)  # [N, n_group]
    keep = torch.zeros_like(best, dtype=torch.bool).scatter_(1, best.topk(topk_group, dim=-1).indices, True)
    return grouped.masked_fill(~keep[..., None], float("-inf")).view(n, e)


class Experts(nn.Module):
    """E gated experts stored as 3-D weights: gate/up ``[E, I, H]``, down ``[E, H, I]``.

    ``limit``: clamp the gate pre-activation to ``<= limit`` and the up one to ``[-limit, limit]`` (DeepSeek V4).
    ``skip``: the router may choose index ``num``, an expert that computes nothing (ZAYA1)."""

    def __init__(self, num: int, hidden: int, width: int, act: str, limit: float | None = None,
                 skip: bool = False) -> None:
        super().__init__()
        self.limit = limit
        self.skip = skip
        self.gate_proj = nn.Parameter(torch.empty(num, width, hidden))
        self.up_proj = nn.Parameter(torch.empty(num, width, hidden))
        self.down_proj = nn.Parameter(torch.empty(num, hidden, width))
        for p in (self.gate_proj, self.up_proj, self.down_proj):
            nn.init.normal_(p, std=0.02)
        self.act, self.act_name = activation(act), act
        self._groups = torch.arange(num)  # the expert indices [E] (grouped's searchsorted), not a parameter

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, scale: float = 1.0,
                base: torch.Tensor | None = None) -> torch.Tensor:
        """x ``[N, H]``, idx/weights ``[N, k]`` -> ``[N, H]``: ``base + scale * sum_k weights_k expert_k(x)``
        (``base`` ``[N, H]``, e.g. the shared experts' output; none: 0).

        Eager inference on CPU, up to ``GROUPED_MAX E`` choices (a decode step, a batch of them, a short chunk):
        :meth:`grouped` (the chosen experts' weights read in place, no host read), but for bf16 between ``E`` and
        ``4 E`` choices, where :meth:`dense`'s batched matmuls beat this torch's bf16 grouped GEMVs (1.15-1.19x at
        8 tokens of the benchmark shapes: benchmarks/moe_paths.py, docs/performance.md). Otherwise (compiled, where
        ``grouped_mm`` traces for bf16 only; autograd; CUDA): few choices (``N k <= E``) gather each token's k
        experts' weights and apply them as a batched matmul, reading exactly the chosen experts; up to ``4 E``
        choices run every expert on every token (each expert's weights read once, as the loop would, at most
        ``4 E / k`` times the FLOPs) and combine with the routing weights. More (a prefill): a loop over the
        experts that got tokens (one host read of the counts; on the CPU as fast as ``grouped_mm`` or faster from
        512 tokens on, its per-expert slices staying in cache: docs/performance.md), each product through
        :func:`kvlab.layers.linear.linear` (bf16 on a CPU without native bf16: widened to float32 past 8 rows)."""
        num = self.gate_proj.shape[0]
        dense_bf16 = x.dtype == torch.bfloat16 and num < idx.numel() <= 4 * num
        if idx.numel() <= GROUPED_MAX * num and not dense_bf16 and self.can_group(x):
            return self.grouped(x, idx, weights, scale, base)
        out = self.routed(x, idx, weights if scale == 1.0 else weights * scale)
        return out if base is None else out + base

    def routed(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``sum_k weights_k expert_k(x)`` ``[N, H]`` by :meth:`gathered`, :meth:`dense` or the loop over experts
        (see :meth:`forward`)."""
        num = self.gate_proj.shape[0]
        if idx.numel() <= num:
            return self.gathered(x, idx, weights)
        if idx.numel() <= 4 * num:
            return self.dense(x, idx, weights)
        out = torch.zeros_like(x)
        flat = idx.reshape(-1)
        order = flat.argsort()
        counts = torch.bincount(flat, minlength=num).tolist()[:num]  # index num (a skip expert) sorts last
        token_of = order // idx.shape[1]
        w_sorted = weights.reshape(-1)[order]
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            tok = token_of[start:start + n]
            h = x[tok]
            g, u = linear(h, self.gate_proj[e]), linear(h, self.up_proj[e])  # bf16: widened past 8 rows
            if self.limit is not None:
                g, u = g.clamp(max=self.limit), u.clamp(min=-self.limit, max=self.limit)
            h = self.act(g) * u
            h = linear(h, self.down_proj[e]) * w_sorted[start:start + n, None].to(h.dtype)
            out.index_add_(0, tok, h)
            start += n
        return out

    def can_group(self, x: torch.Tensor) -> bool:
        """Whether :meth:`grouped` serves this call: eager (``grouped_mm``'s compile-time shape function takes bf16
        only), CPU (CUDA's kernel wants bf16 on SM80+), no autograd (its backward rejects expanded gradients), no
        autocast (``grouped_mm`` is not autocast: it takes x in the weights' dtype only), no float64 (it refuses it),
        rows of a multiple of 16 bytes (it refuses other strides: "strides should be multiple of 16 bytes")."""
        _, width, hidden = self.gate_proj.shape
        return (not torch.compiler.is_compiling() and x.device.type == "cpu" and GROUPED_MM is not None
                and x.dtype == self.gate_proj.dtype and x.dtype in GROUPED_DTYPES
                and width * x.element_size() % 16 == 0 and hidden * x.element_size() % 16 == 0
                and not torch.is_autocast_enabled(x.device.type)
                and not (torch.is_grad_enabled() and (x.requires_grad or self.gate_proj.requires_grad)))

    def grouped(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, scale: float = 1.0,
                base: torch.Tensor | None = None) -> torch.Tensor:
        """Grouped matmuls over the (token, choice) pairs sorted by expert (``torch.nn.functional.grouped_mm``, as
        transformers' ``grouped_mm`` experts): each chosen expert's weights are read where they lie, once, no copy;
        the group ends are device tensors (``searchsorted`` of the sorted experts), so nothing is read back. A skip
        expert (index ``E``) sorts last, past the last group: its rows are left unwritten by the kernel and zeroed
        here. The k outputs of a token are put back in choice order and summed as :meth:`gathered` sums them; one
        token (a decode step) combines its k rows, weights and ``base`` in one ``addmm`` (``scale`` its alpha)."""
        n, k = idx.shape
        num = self.gate_proj.shape[0]
        flat = idx.reshape(-1)
        expert, order = flat.sort(stable=True)  # [N k]
        if self._groups.device != x.device or self._groups.dtype != expert.dtype:
            self._groups = torch.arange(num, device=x.device, dtype=expert.dtype)
        ends = torch.searchsorted(expert, self._groups, right=True, out_int32=True)  # [E] cumulative counts
        one = n == 1  # one token (a decode step): every row is x
        h = x.repeat(k, 1) if one else x.index_select(0, order // k)  # [N k, H] (token rows, sorted by expert)
        g = GROUPED_MM(h, self.gate_proj.transpose(1, 2), offs=ends)  # [N k, I]
        u = GROUPED_MM(h, self.up_proj.transpose(1, 2), offs=ends)
        if self.limit is not None:
            g, u = g.clamp_(max=self.limit), u.clamp_(min=-self.limit, max=self.limit)
        d = GROUPED_MM(self.act(g).mul_(u), self.down_proj.transpose(1, 2), offs=ends)  # [N k, H]
        if one:  # [1, k] weights in the rows' (expert) order
            w = weights.index_select(1, order)
            if self.skip:
                kept = expert < num
                d, w = d.masked_fill(~kept[:, None], 0.0), w.masked_fill(~kept[None], 0.0)
            w = as_dtype(w, d.dtype)
            if base is None:
                return torch.mm(w, d).mul_(scale) if scale != 1.0 else torch.mm(w, d)
            return torch.addmm(base, w, d, alpha=scale)
        w = weights.reshape(-1).index_select(0, order)
        if self.skip:
            kept = expert < num
            d, w = d.masked_fill(~kept[:, None], 0.0), w.masked_fill(~kept, 0.0)
        d = d * as_dtype(w if scale == 1.0 else w * scale, d.dtype)[:, None]
        out = torch.empty_like(d).index_copy_(0, order, d).view(n, k, -1).sum(1)
        return out if base is None else out + base

    def dense(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Every expert on every token ``[E, N, .]``, combined by the routing weights scattered to ``[N, E]`` (a
        skip expert, index ``E``, drops out)."""
        num = self.gate_proj.shape[0]
        comb = torch.zeros(x.shape[0], num + 1, dtype=weights.dtype, device=x.device).scatter_add_(
            1, idx, weights)[:, :num]  # [N, E]
        g, u = x @ self.gate_proj.transpose(1, 2), x @ self.up_proj.transpose(1, 2)  # [E, N, I]
        if self.limit is not None:
            g, u = g.clamp(max=self.limit), u.clamp(min=-self.limit, max=self.limit)
        h = (self.act(g) * u) @ self.down_proj.transpose(1, 2)  # [E, N, H]
        return (h * comb.T[..., None].to(h.dtype)).sum(0)

    def gathered(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The experts of each (token, choice) gathered: ``[N k, I, H]`` weights, one batched matmul each; a skip
        expert (index ``E``) reads expert 0 with weight 0."""
        n, k = idx.shape
        num = self.gate_proj.shape[0]
        flat = idx.reshape(-1)
        skip = flat >= num
        e = flat.clamp(max=num - 1)
        w = weights.reshape(-1).masked_fill(skip, 0.0)
        h = x.repeat_interleave(k, dim=0)[:, :, None]  # [N k, H, 1]
        g, u = (self.gate_proj[e] @ h)[..., 0], (self.up_proj[e] @ h)[..., 0]  # [N k, I]
        if self.limit is not None:
            g, u = g.clamp(max=self.limit), u.clamp(min=-self.limit, max=self.limit)
        h = (self.down_proj[e] @ (self.act(g) * u)[:, :, None])[..., 0] * w[:, None].to(x.dtype)  # [N k, H]
        return h.view(n, k, -1).sum(1)


class MoE(nn.Module):
    """x ``[B, T, H]`` -> ``[B, T, H]``."""

    param_init: ClassVar[dict[str, str]] = {"router_state_scale": "ones", "router_bias": "zeros", "router_scale": "ones",
                  "expert_scale": "ones"}  # not drawn at random by Model.from_config

    def __init__(self, hidden: int, spec: MoESpec, act: str = "silu", eps: float = 1e-6, vocab: int = 0) -> None:
        super().__init__()
        self.spec = spec
        if spec.hash_routing:  # token id -> its top_k experts (DeepSeek V4 hash-MoE), loaded with the weights
            if vocab < 1:
                raise ValueError("hash_routing needs the vocabulary size (MoE(..., vocab=...))")
            self.register_buffer("tid2eid", hash_table(vocab, spec.top_k, spec.num_experts))
        classes = spec.num_experts + (1 if spec.skip_expert else 0)
        if spec.router_hidden is not None:
            self.router_down = nn.Linear(hidden, spec.router_hidden)
            if spec.router_carry:
                self.router_state_scale = nn.Parameter(torch.ones(spec.router_hidden))
            self.router_mlp = RouterMLP(spec.router_hidden, eps)
        self.router = nn.Linear(spec.router_hidden or hidden, classes, bias=False)
        if spec.bias_correction:
            self.router_bias = nn.Parameter(torch.zeros(classes))
        if spec.router_norm:
            self.router_in_norm = RMSNorm(hidden, eps, scale=False)
            self.router_scale = nn.Parameter(torch.ones(hidden))
            self._root = hidden ** -0.5
        if spec.expert_scale:
            self.expert_scale = nn.Parameter(torch.ones(spec.num_experts))
        self.experts = Experts(spec.num_experts, hidden, spec.expert_size, act, spec.swiglu_limit,
                               spec.skip_expert)
        self.shared = GatedMLP(hidden, spec.shared_width, act, limit=spec.swiglu_limit) if spec.shared_experts else None

    def router_state(self, x: torch.Tensor, carry: dict | None, shape: tuple) -> torch.Tensor:
        """``router_hidden``: the router-space state ``[N, R]`` of tokens ``x [N, H]``; with ``router_carry``
        plus the previous layer's state (``carry['router']``) times a learned scale. Left in ``carry``."""
        r = self.router_down(x)
        if self.spec.router_carry:
            if carry is None or "router" not in carry:
                raise ValueError("router_carry: no router state from the previous layer was passed")
            r = r + carry["router"].reshape(r.shape) * self.router_state_scale
        if carry is not None:
            carry["router"] = r.view(*shape[:-1], r.shape[-1])
        return r

    def route(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k expert indices and weights ``[N, k]`` for tokens ``x [N, H]`` (fp32 router).

        With ``router_hidden``, ``x`` is the router state ``[N, R]`` and the router MLP runs in the weights'
        dtype (as ZAYA1); a chosen skip expert has index ``num_experts``.
        """
        idx, w = self.choose(x, token_ids)
        return idx, w * self.spec.routed_scaling

    def choose(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`route` before the routed scaling (which :meth:`forward` leaves to the experts' combine)."""
        s = self.spec
        if s.router_norm:
            x = self.router_in_norm(x) * self.router_scale * self._root
        if s.router_hidden is not None:
            logits = self.router(self.router_mlp(x))
        else:
            logits = F.linear(as_fp32(x), as_fp32(self.router.weight))
        if s.scoring == "softmax":
            scores = logits.softmax(-1)
        elif s.scoring == "sigmoid":
            scores = logits.sigmoid()
        else:  # sqrtsoftplus (DeepSeek V4)
            scores = F.softplus(logits).sqrt_()
        if s.hash_routing:
            if token_ids is None:
                raise ValueError("hash_routing: the token ids were not passed to the MoE")
            idx = self.tid2eid.index_select(0, token_ids.reshape(-1))
            idx = idx if idx.dtype == torch.int64 else idx.long()
        else:
            choice = as_fp32(scores) + as_fp32(self.router_bias) if s.bias_correction else scores
            if s.n_group > 1 and (s.topk_group or s.n_group) < s.n_group:
                choice = group_limit(choice, s.n_group, s.topk_group)
            idx = choice.topk(s.top_k, dim=-1).indices
        w = scores.gather(-1, idx)
        if s.norm_topk:
            w = w / (w.sum(-1, keepdim=True) + (0.0 if s.scoring == "softmax" else 1e-20))
        if s.expert_scale:
            scale = self.expert_scale.float()
            w = w * (torch.cat((scale, scale.new_ones(1))) if s.skip_expert else scale)[idx]
        return idx, w

    def forward(self, x: torch.Tensor, router_input: torch.Tensor | None = None,
                carry: dict | None = None) -> torch.Tensor:
        """``router_input`` (same shape as x): what the router reads, when not x (``router_norm``).
        ``carry``: the dict that passes the router state between layers (``router_hidden``)."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        rin = flat if router_input is None else router_input.reshape(-1, shape[-1])
        if self.spec.router_hidden is not None:
            rin = self.router_state(rin, carry, shape)
        one = moe_kernel.applies(flat, self.experts, self.shared, self.experts.act_name)  # one token: one C++ call
        tid = carry.get("input_ids") if carry is not None and self.spec.hash_routing else None
        if one and router_input is None and moe_kernel.route_applies(flat, self, tid):  # the routing in the call too
            return moe_kernel.route_step(flat, self, tid).reshape(shape)
        idx, w = self.choose(rin, tid)
        if one:
            return moe_kernel.step(flat, idx, w, self.experts, self.shared, self.experts.act_name,
                                   self.spec.routed_scaling).reshape(shape)
        shared = self.shared(flat) if self.shared is not None else None
        return self.experts(flat, idx, w, self.spec.routed_scaling, shared).reshape(shape)
