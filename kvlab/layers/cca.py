"""Compressed convolutional attention (CCA / CCGQA; ZAYA1, arXiv 2510.04476).

Attention runs inside a compressed latent space: the LayerSpec's heads *are* the compressed heads
(``num_heads x head_dim`` query channels, ``num_kv_heads x head_dim`` key channels, usually well below
``hidden``), and only the attention output is projected back up by ``o_proj``. What happens between:

1. down-projections ``q = q_proj(x)``, ``k = k_proj(x)``; with left padding the pad positions' input
   is zeroed first (transformers' ZAYA "conv" mask), so padding never leaks into the state;
2. mean-residual mixing: ``r_q = (q + k[head // group]) / 2`` per query head and ``r_k`` the mean of
   ``r_q`` over each KV head's group of query heads;
3. two causal convolutions over the sequence on the concatenated ``[q, k]`` channels: depthwise
   (kernel ``cca.conv_kernels[0]``), then grouped with one group per head (kernel ``cca.conv_kernels[1]``);
   ``q = conv(q)+r_q``, ``k = conv(k)+r_k``. A chunk is convolved with the carried tail of the previous
   ``k0 + k1 - 2`` input columns prepended (zeros at the start of a
   sequence), so chunked prefill and decode equal one full forward;
4. value shift: the first half of the value channels come from the current token (``v_proj``), the
   second half from the previous token (``v_shift_proj``, its last row carried across chunks; at a
   sequence start the "previous token" is an all-zero input);
5. q and k L2-normalised to ``sqrt(head_dim)``, k times a learned per-KV-head temperature
   (``key_temp``; ZAYA initialises it to 0, ``Model.from_config`` to 1);
6. partial RoPE, grouped attention (``attend``), optional sinks/window/output gate, ``o_proj``.

The cache (kvlab/cache/cca.py) holds the normed, rotated compressed K/V per position plus the conv tail
``[B, (H + Hkv) * head_dim, k0 + k1 - 2]`` and the delayed value row ``[B, Hkv * v_head_dim / 2]``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..config import LayerSpec
from ..kinds.cca import conv_channels, conv_tail, value_half
from .core import Step, attend_out, publish_kv
from .linear import Linear
from .rope import apply_rope


def causal_conv(x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """``conv(x)`` for a grouped ``conv`` without padding on ``x [B, C, T]`` -> ``[B, C_out, T - k + 1]``, as ``k``
    shifted products over the whole tensor (elementwise when depthwise, else one batched matmul per tap over the
    groups). On the CPU torch (2.13) runs a bf16 grouped conv as one slow conv2d per group: 1,280 calls a layer for
    zaya-small's depthwise conv, its bf16 decode step 3.4x slower than fp32."""
    k, g = conv.kernel_size[0], conv.groups
    b, c, t = x.shape
    n = t - k + 1
    w = conv.weight  # [C_out, C / g, k]
    if w.shape[1] == 1 and w.shape[0] == c:  # depthwise
        out = x[..., :n] * w[:, 0, 0, None]
        for j in range(1, k):  # the kernel's taps (1-3), not tokens or channels
            out = out + x[..., j:j + n] * w[:, 0, j, None]
    else:
        wg = w.view(g, w.shape[0] // g, c // g, k)  # [g, out per group, in per group, k]
        xg = x.view(b, g, c // g, t)
        out = wg[..., 0] @ xg[..., :n]
        for j in range(1, k):
            out = out + wg[..., j] @ xg[..., j:j + n]
        out = out.reshape(b, w.shape[0], n)
    return out if conv.bias is None else out + conv.bias[:, None]


class CCAttention(nn.Module):

    """One CCA layer described by a :class:`LayerSpec` (``attention='cca'``); x ``[B, T, hidden]`` -> same."""

    param_init: ClassVar[dict[str, str]] = {"key_temp": "ones", "sinks": "zeros"}  # not drawn at random by Model.from_config
    dense_kernel: ClassVar[bool] = True  # an eager CPU decode step: the C++ kernel (kvlab/layers/dense_attend.py)

    def __init__(self, spec: LayerSpec, hidden: int, eps: float = 1e-6, norm_offset: bool = False) -> None:
        super().__init__()
        self.spec = spec
        h, hkv, d, dv = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.value_dim
        k0, k1 = spec.cca.conv_kernels
        half = value_half(spec)
        self.q_proj = Linear(hidden, h * d, bias=spec.qkv_bias)
        self.k_proj = Linear(hidden, hkv * d, bias=spec.qkv_bias)
        self.v_proj = Linear(hidden, half, bias=spec.qkv_bias)  # current token
        self.v_shift_proj = Linear(hidden, half, bias=spec.qkv_bias)  # read one token later
        c = conv_channels(spec)
        self.conv_dw = nn.Conv1d(c, c, k0, groups=c)
        self.conv_grouped = nn.Conv1d(c, c, k1, groups=h + hkv)
        self.key_temp = nn.Parameter(torch.ones(hkv))
        self.o_proj = Linear(h * dv, hidden, bias=spec.o_bias)
        if spec.output_gate:
            self.g_proj = Linear(hidden, h if spec.gate_per_head else h * dv, bias=False)
        if spec.sinks:
            self.sinks = nn.Parameter(torch.zeros(h))

    def project(self, x: torch.Tensor, step: Step, store=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q ``[B, T, H, D]``, k ``[B, T, Hkv, D]`` (before norm and RoPE) and v ``[B, T, Hkv, Dv]``.

        Reads and updates the conv tail and the delayed value row of ``store`` (a CCA store) when given.
        """
        s = self.spec
        b, t, _ = x.shape
        h, hkv, d = s.num_heads, s.num_kv_heads, s.head_dim
        g = h // hkv
        q = self.q_proj(x)
        k = self.k_proj(x)
        r_q = (q.view(b, t, h, d) + k.view(b, t, hkv, 1, d).expand(b, t, hkv, g, d).reshape(b, t, h, d)) * 0.5
        r_k = r_q.view(b, t, hkv, g, d).mean(dim=-2)
        qk = torch.cat((q, k), dim=-1).transpose(1, 2)  # [B, C, T]
        tail = conv_tail(s)
        if store is not None:  # the store prepends the carried tail and keeps the new one
            qk = store.conv_input(qk, step.start)
        elif tail:
            qk = torch.cat((qk.new_zeros(b, qk.shape[1], tail), qk), dim=-1)
        qk = causal_conv(causal_conv(qk, self.conv_dw), self.conv_grouped).transpose(1, 2)  # [B, T, C]
        q = qk[..., :h * d].view(b, t, h, d) + r_q
        k = qk[..., h * d:].view(b, t, hkv, d) + r_k
        cur = self.v_proj(x)
        shifted = self.v_shift_proj(x)
        prev_v = store.previous_values(step.start) if store is not None else None
        if prev_v is None:  # a sequence start: the "previous token" is an all-zero input
            prev_v = self.v_shift_proj(x.new_zeros(b, 1, x.shape[-1]))
        v = torch.cat((cur, torch.cat((prev_v, shifted[:, :-1]), dim=1)), dim=-1).view(b, t, hkv, s.value_dim)
        if store is not None:
            store.keep_values(shifted[:, -1])
        return q, k, v

    def norm_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """L2 norms to ``sqrt(head_dim)`` on ``[B, T, heads, D]``; keys times the per-KV-head temperature."""
        scale = self.spec.head_dim ** 0.5
        eps = torch.finfo(q.dtype).eps
        q = q * (scale / q.norm(p=2, dim=-1, keepdim=True).clamp_min(eps))
        k = k * (scale / k.norm(p=2, dim=-1, keepdim=True).clamp_min(eps))
        return q, k * self.key_temp[None, None, :, None]

    def forward(self, x: torch.Tensor, step: Step, index: int, store=None) -> torch.Tensor:
        if step.pad is not None:  # pad positions feed zeros to the projections, the conv and the value shift
            x = x * (step.qpos[None] >= step.pad[:, None]).to(x.dtype)[..., None]
        q, k, v = self.project(x, step, store)
        q, k = self.norm_qk(q, k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        rope = step.rope.get(index)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k, v, kpos = publish_kv(step, index, store, k, v)
        return attend_out(self, x, step, q, k, v, kpos)


__all__ = ["CCAttention"]
