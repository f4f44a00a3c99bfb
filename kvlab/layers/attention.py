"""Grouped-query attention: MHA, GQA (arXiv 2305.13245) and MQA (arXiv 1911.02150).

Options: q/k RMSNorm, weightless v RMSNorm, V = K projection (``k_eq_v``), sliding window
(Longformer/Mistral), learned sink logits (gpt-oss), a sigmoid or softplus output gate computed from
the attention input, and reading another layer's K/V (cross-layer sharing). Attention runs in
``scaled_dot_product_attention``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LayerSpec
from .norm import RMSNorm
from .rope import apply_rope


@dataclass
class Step:
    """What one forward call shares between layers.

    start: absolute index of the first new position; qpos ``[T]`` absolute indices; pad ``[B]``
    left-pad counts or None; rope: rope tables by layer; kv: the (k, v, kpos) each producing layer
    attended to, for the layers that share them; masks: built masks by key set; carry: per-token
    tensors ``[B, T, ...]`` a layer passes to the next (e.g. the MoE router state, ``router_carry``).
    """

    start: int
    qpos: torch.Tensor
    pad: torch.Tensor | None
    dtype: torch.dtype = torch.float32
    rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    kv: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    masks: dict[tuple, tuple[torch.Tensor | None, bool]] = field(default_factory=dict)
    _alive: list[torch.Tensor] = field(default_factory=list, repr=False)
    carry: dict[str, torch.Tensor] = field(default_factory=dict)

    def last_position(self) -> Step:
        """The same step for its last query only (K/V already produced stay readable)."""
        return dataclasses.replace(self, start=self.start + self.qpos.shape[0] - 1, qpos=self.qpos[-1:], masks={},
                                   rope={i: (c[:, -1:], s[:, -1:]) for i, (c, s) in self.rope.items()},
                                   carry={k: v[:, -1:] for k, v in self.carry.items()})

    def mask(self, kpos: torch.Tensor, window: int | None) -> tuple[torch.Tensor | None, bool]:
        """(additive mask ``[B|1, 1, T, L]`` of 0 / -inf, or None; whether plain causal applies).

        Built once per step for each key-position tensor and window, and shared by every layer that
        attends to the same positions (all full-cache layers read views of one shared range), so a
        chunk holds one mask, not one per layer. Additive rather than boolean because SDPA on the CPU
        converts a boolean mask at every call.
        """
        # the entry keeps kpos alive, so its address cannot be reused by another tensor this step
        key = (kpos.data_ptr(), kpos.shape[0], kpos.stride(0), window)
        if key not in self.masks:
            t = self.qpos.shape[0]
            if t == 1 and self.pad is None and (window is None or kpos.shape[0] <= window):
                # a decode step sees every key its store returns (a ring holds at most the window)
                self.masks[key] = (None, False)
            elif (self.pad is None and self.start == 0 and kpos.shape[0] == t and t > 1
                    and (window is None or window >= t)):
                self.masks[key] = (None, True)
            else:
                ok = build_mask(self.qpos, kpos, window, self.pad)
                add = None if ok is None else torch.zeros(ok.shape, dtype=self.dtype, device=ok.device).masked_fill_(
                    ~ok, float("-inf"))
                self.masks[key] = (add, False)
            self._alive.append(kpos)
        return self.masks[key]


def build_mask(qpos: torch.Tensor, kpos: torch.Tensor, window: int | None,
               pad: torch.Tensor | None) -> torch.Tensor | None:
    """Causal, window and left-padding mask; a query always sees itself (pad rows stay finite)."""
    q, k = qpos[:, None], kpos[None, :]
    ok = (k <= q) & (k >= 0)
    if window is not None:
        ok &= k > q - window
    if pad is not None:
        ok = ok[None] & (k[None] >= pad[:, None, None])
        ok |= (k == q)[None]
        return ok[:, None]
    if bool(ok.all()):
        return None
    return ok[None, None]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
           causal: bool = False, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """q ``[B, H, T, D]``, k/v ``[B, Hkv, L, D]`` -> ``[B, H, T, Dv]``.

    ``mask`` is additive ``[B|1, 1, T, L]`` (0 = attend, -inf = masked). ``causal`` (with mask None) means the T
    queries are the last T keys. ``sinks [H]`` adds a per-head logit to the softmax denominator.
    A decode step (T = 1) folds the query heads of a group into the query axis, so K and V are read
    once and never repeated per head.
    """
    b, h, t, d = q.shape
    hkv, L = k.shape[1], k.shape[2]
    g = h // hkv
    if sinks is None and t > 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                              enable_gqa=g > 1)
    if causal:
        mask = torch.zeros(t, L, dtype=q.dtype, device=q.device).masked_fill_(
            ~torch.ones(t, L, dtype=torch.bool, device=q.device).tril(L - t), float("-inf"))[None, None]
    qf = q.reshape(b, hkv, g * t, d)
    if mask is not None:
        mask = mask[:, :, None].expand(mask.shape[0], 1, g, t, L).reshape(mask.shape[0], 1, g * t, L)
    if sinks is None:
        out = F.scaled_dot_product_attention(qf, k, v, attn_mask=mask, scale=scale)
        return out.reshape(b, h, t, v.shape[-1])
    s = (qf @ k.transpose(-1, -2)).float() * scale  # [B, Hkv, G*T, L]
    if mask is not None:
        s = s + mask
    sink = sinks.float().view(1, hkv, g, 1, 1).expand(b, hkv, g, t, 1).reshape(b, hkv, g * t, 1)
    p = torch.cat((s, sink), dim=-1).softmax(-1)[..., :L]
    return (p.to(v.dtype) @ v).reshape(b, h, t, v.shape[-1])


def publish_kv(step: Step, index: int, store, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Append the new K/V to the layer's store (when cached) and publish what the queries attend to,
    with its positions, for the layers that share this layer's K/V."""
    if store is not None:
        k, v, kpos = store.append(k, v, step.start)
    else:
        kpos = step.qpos
    step.kv[index] = (k, v, kpos)
    return k, v, kpos


def attend_out(attn: nn.Module, x: torch.Tensor, step: Step, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               kpos: torch.Tensor) -> torch.Tensor:
    """Masked attention of ``q`` over ``k``/``v`` at positions ``kpos`` (the step's shared mask), then the
    output gate and projection of ``attn``."""
    s = attn.spec
    mask, causal = step.mask(kpos, s.window)
    out = attend(q, k, v, mask, s.scale, causal=causal, sinks=attn.sinks if s.sinks else None)
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


class Attention(nn.Module):
    """One attention layer described by a :class:`LayerSpec`; x ``[B, T, hidden]`` -> same shape."""

    def __init__(self, spec: LayerSpec, hidden: int, eps: float = 1e-6, norm_offset: bool = False) -> None:
        super().__init__()
        self.spec = spec
        h, hkv, d, dv = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.value_dim
        self.q_proj = nn.Linear(hidden, h * d, bias=spec.qkv_bias)
        if spec.stores_kv:
            self.k_proj = nn.Linear(hidden, hkv * d, bias=spec.qkv_bias)
            if not spec.k_eq_v:
                self.v_proj = nn.Linear(hidden, hkv * dv, bias=spec.qkv_bias)
            if spec.v_norm:
                self.v_norm = RMSNorm(dv, eps, scale=False)
        self.o_proj = nn.Linear(h * dv, hidden, bias=spec.o_bias)
        if spec.qk_norm:
            self.q_norm = RMSNorm(d, eps, norm_offset)
            if spec.stores_kv:
                self.k_norm = RMSNorm(d, eps, norm_offset)
        if spec.output_gate:
            self.g_proj = nn.Linear(hidden, h if spec.gate_per_head else h * dv, bias=False)
        if spec.sinks:
            self.sinks = nn.Parameter(torch.zeros(h))

    def project_kv(self, x: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor]:
        """K ``[B, Hkv, T, D]`` (normed, rotated) and V ``[B, Hkv, T, Dv]``."""
        s = self.spec
        b, t, _ = x.shape
        k = self.k_proj(x).view(b, t, s.num_kv_heads, s.head_dim).transpose(1, 2)
        v = k if s.k_eq_v else self.v_proj(x).view(b, t, s.num_kv_heads, s.value_dim).transpose(1, 2)
        if s.v_norm:
            v = self.v_norm(v)
        if s.qk_norm:
            k = self.k_norm(k)
        if rope is not None:
            k = apply_rope(k, *rope)
        return k, v

    def forward(self, x: torch.Tensor, step: Step, index: int, store=None) -> torch.Tensor:
        s = self.spec
        b, t, _ = x.shape
        rope = step.rope.get(index)
        q = self.q_proj(x).view(b, t, s.num_heads, s.head_dim).transpose(1, 2)
        if s.qk_norm:
            q = self.q_norm(q)
        if rope is not None:
            q = apply_rope(q, *rope)
        if s.kv_source is not None:
            k, v, kpos = step.kv[s.kv_source]
        else:
            k, v, kpos = publish_kv(step, index, store, *self.project_kv(x, rope))
        return attend_out(self, x, step, q, k, v, kpos)
