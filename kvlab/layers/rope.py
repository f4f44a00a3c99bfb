"""Rotary position embedding (RoFormer, arXiv 2104.09864) with partial rotation and scalings.

Scalings: linear position interpolation (arXiv 2306.15595), Llama 3.1 band-wise scaling, YaRN
(arXiv 2309.00071) and Gemma 4's proportional RoPE (a fraction of the rotate-half pairs rotated, with
frequencies of the whole head). Frequencies follow transformers' ``modeling_rope_utils`` so logits match.
"""

from __future__ import annotations

import math

import torch

from ..config import RopeSpec
from . import rows_kernel


def rotary_dim(spec: RopeSpec, head_dim: int) -> int:
    """Channels the cos/sin tables cover: the whole head for proportional RoPE (unrotated pairs get
    frequency 0), else the first ``partial * head_dim``."""
    if spec.scaling == "proportional":
        return head_dim
    return int(head_dim * spec.partial)


def yarn_mscale(factor: float, m: float = 1.0) -> float:
    """YaRN's attention temperature ``0.1 m ln(factor) + 1`` (1 without scaling; arXiv 2309.00071)."""
    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0


def inv_freq_and_scale(spec: RopeSpec, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[rot_dim // 2]`` (fp32) and the cos/sin scale (YaRN's attention factor)."""
    dim = rotary_dim(spec, head_dim)
    if spec.scaling == "proportional":  # transformers' _compute_proportional_rope_parameters
        angles = int(spec.partial * head_dim // 2)
        inv = 1.0 / (spec.theta ** (torch.arange(0, 2 * angles, 2, dtype=torch.float32, device="cpu") / head_dim))
        inv = torch.cat((inv, torch.zeros(head_dim // 2 - angles, dtype=torch.float32, device="cpu")))
        return inv / spec.factor, 1.0
    exponents = torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim
    inv = 1.0 / (spec.theta ** exponents)
    if spec.scaling == "default":
        return inv, 1.0
    if spec.scaling == "linear":
        return inv / spec.factor, 1.0
    if spec.scaling == "llama3":
        old = spec.original_max_positions
        low_wl, high_wl = old / spec.low_freq_factor, old / spec.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wl, inv / spec.factor, inv)
        smooth = (old / wavelen - spec.low_freq_factor) / (spec.high_freq_factor - spec.low_freq_factor)
        smoothed = (1 - smooth) * scaled / spec.factor + smooth * scaled
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        return torch.where(medium, smoothed, scaled), 1.0
    # yarn
    factor, orig = spec.factor, spec.original_max_positions

    att = spec.attention_factor
    if att is None:
        if spec.mscale and spec.mscale_all_dim:
            att = yarn_mscale(factor, spec.mscale) / yarn_mscale(factor, spec.mscale_all_dim)
        else:
            att = yarn_mscale(factor)

    def corr_dim(rot: float) -> float:
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(spec.theta))

    low, high = corr_dim(spec.beta_fast or 32), corr_dim(spec.beta_slow or 1)
    if spec.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrap = 1 - ramp
    inv = (inv / factor) * (1 - extrap) + inv * extrap
    return inv, float(att)


class Rotary:
    """cos/sin tables for one RopeSpec; positions ``[B, T]`` -> cos, sin ``[B, T, rot_dim]`` (fp32)."""

    def __init__(self, spec: RopeSpec, head_dim: int) -> None:
        self.spec = spec
        self.rot_dim = rotary_dim(spec, head_dim)
        self._inv, self.scale = inv_freq_and_scale(spec, head_dim)
        # the frequencies on each device used, copied once (a copy from the host syncs); on their own device from the
        # start: a compiled step's first call (before any eager one) then writes no Python state (a guard on it failed
        # at its second call: one recompile)
        self._by_device: dict[torch.device, torch.Tensor] = {self._inv.device: self._inv}

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv = self._by_device.get(positions.device)
        if inv is None:
            inv = self._by_device.setdefault(positions.device, self._inv.to(positions.device))
        freqs = positions[..., None].float() * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.scale, emb.sin() * self.scale


LAYOUTS = ("half", "interleaved", "deinterleave")


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str = "half") -> torch.Tensor:
    """Rotate every channel pair of ``x [..., d]`` by the angles whose ``cos``/``sin [..., d/2]`` are given (one per pair,
    broadcast against ``x``'s leading axes). The one rotation every RoPE variant of kvlab uses.

    ``half``: pairs ``(x[i], x[i + d/2])`` (GPT-NeoX / Llama "rotate-half"); ``interleaved``: pairs
    ``(x[2i], x[2i+1])`` written back in place (GPT-J; DeepSeek V4's trailing rotary channels); ``deinterleave``:
    pairs ``(x[2i], x[2i+1])`` written back as ``[evens', odds']`` (transformers' DeepSeek-V3
    ``apply_rotary_pos_emb_interleave``).
    """
    if layout == "half":
        x1, x2 = x.chunk(2, dim=-1)
    else:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    o1, o2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    if layout == "interleaved":
        return torch.stack((o1, o2), dim=-1).flatten(-2)
    return torch.cat((o1, o2), dim=-1)


def rotate_part(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str = "half", at: str = "lead",
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """:func:`rotate` on the first (``at='lead'``) or last (``'tail'``) ``2 * cos.shape[-1]`` channels of ``x``
    (partial RoPE); the others pass through. ``dtype``: rotate in that dtype (e.g. fp32), then cast back."""
    rot = 2 * cos.shape[-1]
    part = x[..., :rot] if at == "lead" else x[..., x.shape[-1] - rot:]
    r = rotate(part if dtype is None else part.to(dtype), cos, sin, layout).to(x.dtype)
    if rot == x.shape[-1]:
        return r
    return torch.cat((r, x[..., rot:]) if at == "lead" else (x[..., :-rot], r), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, tokens_first: bool = False) -> torch.Tensor:
    """Rotate the first ``rot`` channels of ``x [B, H, T, D]`` (``[B, T, H, D]`` with ``tokens_first``; rotate-half
    layout) with :class:`Rotary`'s tables ``cos``/``sin [B, T, rot]`` (``cat(freqs, freqs)``). A float32 decode step
    (eager, CPU): one C++ call (kvlab/layers/rows_kernel.py), the same products and sums."""
    if x.dtype == torch.float32 and rows_kernel.rope_applies(x, cos, sin, tokens_first):
        return rows_kernel.rope(x, cos, sin, tokens_first)
    half = cos.shape[-1] // 2
    c, s = (cos[:, :, None, :half], sin[:, :, None, :half]) if tokens_first else (cos[:, None, :, :half],
                                                                                  sin[:, None, :, :half])
    return rotate_part(x, c.to(x.dtype), s.to(x.dtype))
