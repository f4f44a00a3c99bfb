"""A decode step's float32 rows as one C++ call each (kvlab/layers/rows_kernel.cpp) on the CPU, where torch issues
several operators a row: rotate-half RoPE (10-17 operators: the slices, casts, halves, products, sums and cat of
:func:`kvlab.layers.rope.rotate_part`), MLA's interleaved-pair RoPE written into strided rows (DeepSeek V3's query
and latent cache row: :func:`rope_pairs`), and RMS norm (:func:`rms_norm`: ``rms_norm`` is a composite on the CPU,
pow, sum, div, add, rsqrt and two products, about 30 us a call).

Why: a decode step of a small model is mostly weight reads and, between them, many operators on a few hundred
numbers; each of those costs its dispatch, and more when the weight reads before it have pushed its code and data out
of the caches (docs/performance.md, "Laguna's eager decode step"). Numerics: the same products and sums as torch,
each rounded as torch rounds it (no FMA contraction): equal to the bit (tests/test_rows_kernel.py). The norm sums the
squares in the order of torch's CPU sum kernel with AVX2 vectors (8 lanes): an earlier C++ norm summed in another
order and moved Gemma 3 270M's logits 2.75e-4 from transformers' (the parity bound is 1e-4, docs/performance.md), so
the norm is taken only where torch's CPU capability is AVX2 (another vector width sums in another order) and rows
have at least 8 channels.

Taken when (:func:`rope_applies`, :func:`pairs_applies`, :func:`norm_applies`): eager (not traced), no autograd,
float32 tensors on the CPU, at most :data:`MAX_TOKENS` tokens (the norm: rows), one torch thread for the norm.
Otherwise, and when the kernel cannot be built (one warning) or ``KVLAB_ROWS_KERNEL=0``, torch's operators.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from . import cpp_build

SOURCE = Path(__file__).with_name("rows_kernel.cpp")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-ffp-contract=off")
ENABLED = cpp_build.switch("KVLAB_ROWS_KERNEL")
NORM = torch.backends.cpu.get_cpu_capability() == "AVX2"  # the vector width the norm's summation order follows
MAX_TOKENS = 8  # tokens (batch x length) a rotation call takes: a decode step's; beyond, torch's operators
_P, _I, _L, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float


def kernel() -> cpp_build.Library:
    """The kernel's library (built and loaded at first use)."""
    return cpp_build.Library(SOURCE, FLAGS, ("kvlab_rows_version", 3), {
        "kvlab_rope": ([_P, _I, _I, _I, _I, _I, _P, _P, _I, _P], _I),
        "kvlab_rms_norm": ([_P, _L, _L, _P, _I, _F, _P], _I),
        "kvlab_rope_pairs": ([_P, _L, _L, _I, _I, _I, _P, _P, _L, _I, _P, _L, _L], _I),
    }, "rotations and norms run as torch's operators")


KERNEL = kernel()


def library() -> ctypes.CDLL | None:
    """The loaded kernel (built on first use); None when it cannot be (warned once) or :data:`ENABLED` is off."""
    return KERNEL.get() if ENABLED else None


def _plain(t: torch.Tensor) -> bool:
    return t.dtype == torch.float32 and t.is_cpu and t.is_contiguous()


def rope_applies(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, tokens_first: bool) -> bool:
    """The kernel takes the rotation of ``x [B, T, H, D]`` (``[B, H, T, D]`` without ``tokens_first``) by tables
    ``cos``/``sin [B, T, rot]`` (rot even, at most D). Once per rotation: cheap attribute reads only."""
    if not ENABLED or x.ndim != 4 or torch.compiler.is_compiling():
        return False
    if cos.ndim != 3 or not (_plain(x) and _plain(cos) and _plain(sin)):
        return False
    if torch.is_grad_enabled() and x.requires_grad:
        return False
    b, t = x.shape[0], x.shape[1] if tokens_first else x.shape[2]
    cs, ss = cos.shape, sin.shape
    rot = cs[-1]
    if cs[0] != b or cs[1] != t or cs != ss or rot % 2 or not 2 <= rot <= x.shape[-1]:
        return False
    return b * t <= MAX_TOKENS and (KERNEL.lib is not None or library() is not None)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, tokens_first: bool) -> torch.Tensor:
    """``x`` with its first ``rot`` channels rotated (rotate-half pairs), one call (:func:`rope_applies` first)."""
    b, t, h, d = x.shape
    if not tokens_first:
        t, h = h, t
    y = torch.empty_like(x)
    rc = KERNEL.lib.kvlab_rope(x.data_ptr(), b, t, h, d, int(tokens_first), cos.data_ptr(), sin.data_ptr(),
                               cos.shape[-1], y.data_ptr())
    if rc:
        raise ValueError(f"kvlab rope: arguments refused (x {tuple(x.shape)}, tables {tuple(cos.shape)})")
    return y


def norm_applies(x: torch.Tensor, weight: torch.Tensor | None) -> bool:
    """:func:`rms_norm` takes ``x [..., dim]`` (weight ``[dim]`` or None): eager, no autograd, float32 contiguous on
    the CPU (the weight too), at least 8 channels, at most :data:`MAX_TOKENS` rows, one torch thread (torch may split a
    long row over threads), torch's capability AVX2 (:data:`NORM`). Once per norm: cheap attribute reads only."""
    if not (ENABLED and NORM and _plain(x) and x.ndim):
        return False
    d = x.shape[-1]
    if d < 8 or x.numel() > MAX_TOKENS * d or torch.compiler.is_compiling():
        return False
    if weight is not None and not (_plain(weight) and weight.shape == (d,)):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)):
        return False
    return torch.get_num_threads() == 1 and (KERNEL.lib is not None or library() is not None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, offset: bool = False) -> torch.Tensor:
    """``F.rms_norm(x, (dim,), weight, eps)`` (``offset``: the weight ``1 + weight``), equal to the bit, one call
    (:func:`norm_applies` first)."""
    y = torch.empty_like(x)
    d = x.shape[-1]
    if KERNEL.lib.kvlab_rms_norm(x.data_ptr(), x.numel() // d, d, None if weight is None else weight.data_ptr(),
                                 int(offset), eps, y.data_ptr()):
        raise ValueError(f"kvlab rms_norm: arguments refused (x {tuple(x.shape)})")
    return y


LAYOUT = {"half": 0, "deinterleave": 1}  # kvlab/layers/rope.py's layouts :func:`rope_pairs` writes


def pairs_applies(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, y: torch.Tensor) -> bool:
    """:func:`rope_pairs` takes ``x [B, P, rot]`` into ``y`` (same shape) with tables ``cos`` / ``sin [B|1, rot]``
    (laid out alike): eager, no autograd, float32 on the CPU, each row and table contiguous (rows at any stride), at
    most :data:`MAX_TOKENS` batch rows."""
    if not (ENABLED and x.dtype == torch.float32 and y.dtype == torch.float32 and cos.dtype == torch.float32):
        return False
    if sin.dtype != torch.float32 or sin.shape != cos.shape or sin.stride() != cos.stride() or not sin.is_cpu:
        return False
    if not (x.is_cpu and y.is_cpu and cos.is_cpu) or torch.compiler.is_compiling() or x.ndim != 3 or cos.ndim != 2:
        return False
    if x.stride(2) != 1 or y.stride(2) != 1 or cos.stride(1) != 1 or y.shape != x.shape or x.shape[0] > MAX_TOKENS:
        return False
    if cos.shape[1] != x.shape[2] or cos.shape[0] not in (1, x.shape[0]):
        return False
    if torch.is_grad_enabled() and x.requires_grad:
        return False
    return KERNEL.lib is not None or library() is not None


def rope_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str, out: torch.Tensor) -> torch.Tensor:
    """:func:`kvlab.layers.rope.rotate` of every row of ``x [B, P, rot]`` by batch row's tables ``cos`` / ``sin [B|1,
    rot]`` (``cat(freqs, freqs)``: their first ``rot / 2`` entries; ``sin`` laid out as ``cos``) written into ``out``
    (e.g. a cache row's rotary channels), equal to the bit; ``layout`` ``deinterleave`` (DeepSeek V3) or ``half``
    (:func:`pairs_applies` first)."""
    b, p, rot = x.shape
    if KERNEL.lib.kvlab_rope_pairs(x.data_ptr(), x.stride(0), x.stride(1), b, p, rot, cos.data_ptr(), sin.data_ptr(),
                                   cos.stride(0) if cos.shape[0] > 1 else 0, LAYOUT[layout], out.data_ptr(),
                                   out.stride(0), out.stride(1)):
        raise ValueError(f"kvlab rope_pairs: arguments refused (x {tuple(x.shape)}, tables {tuple(cos.shape)})")
    return out


__all__ = ["ENABLED", "LAYOUT", "MAX_TOKENS", "NORM", "library", "norm_applies", "pairs_applies", "rms_norm", "rope",
           "rope_applies", "rope_pairs"]
