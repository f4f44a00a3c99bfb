"""A decode step's RMSNorm rows and rotate-half RoPE rows in float32 as C++ calls (kvlab/layers/rows_kernel.cpp) on the
CPU, one call each where torch issues one fused norm operator (about 20 us on one thread here, against 3 for an
elementwise operator) or 10-17 operators for a rotation (the slices, casts, halves, products, sums and cat of
:func:`kvlab.layers.rope.rotate_part`).

Why: a decode step of a small model is mostly weight reads and, between them, many operators on a few hundred
numbers; each of those costs its dispatch, and more when the weight reads before it have pushed its code and data out
of the caches (docs/performance.md, "Laguna's eager decode step"). Numerics: float32, the same operations in another
summation order for the norm's mean of squares (within float32 rounding of torch's: tests/test_rows_kernel.py).

Taken when (:func:`norm_applies`, :func:`rope_applies`): eager (not traced), no autograd, float32 contiguous tensors
on the CPU, a decode step's sizes (:data:`MAX_TOKENS`, :data:`MAX_ELEMENTS`); RMSNorm (kvlab/layers/norm.py) with a
float32 weight or none; RoPE (:func:`kvlab.layers.rope.apply_rope`) with tables ``[B, T, rot]`` of the same batch and
length. Otherwise, and when the kernel cannot be built (one warning) or ``KVLAB_ROWS_KERNEL=0``, torch's operators.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from . import cpp_build

SOURCE = Path(__file__).with_name("rows_kernel.cpp")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno")
ENABLED = cpp_build.switch("KVLAB_ROWS_KERNEL")
MAX_TOKENS = 8  # tokens (batch x length) a rotation call takes: a decode step's; beyond, torch's operators
MAX_ELEMENTS = 65536  # numbers a norm call takes (8 tokens of an 8K-wide stream); beyond, torch's operator
_P, _I, _L, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float


def kernel() -> cpp_build.Library:
    """The kernel's library (built and loaded at first use)."""
    return cpp_build.Library(SOURCE, FLAGS, ("kvlab_rows_version", 1), {
        "kvlab_rms_norm": ([_P, _L, _I, _P, _I, _F, _P], _I),
        "kvlab_rope": ([_P, _I, _I, _I, _I, _I, _P, _P, _I, _P], _I),
    }, "norms and rotations run as torch's operators")


KERNEL = kernel()


def library() -> ctypes.CDLL | None:
    """The loaded kernel (built on first use); None when it cannot be (warned once) or :data:`ENABLED` is off."""
    return KERNEL.get() if ENABLED else None


def _plain(t: torch.Tensor) -> bool:
    return t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()


def _eager(*ts: torch.Tensor | None) -> bool:
    if not ENABLED or torch.compiler.is_compiling():
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts))


def norm_applies(x: torch.Tensor, weight: torch.Tensor | None) -> bool:
    """The kernel takes the RMSNorm of ``x [..., dim]`` (at most :data:`MAX_ELEMENTS` numbers) with ``weight [dim]``
    (or none)."""
    if x.numel() > MAX_ELEMENTS or x.dim() == 0 or x.numel() == 0 or not _plain(x) or not _eager(x, weight):
        return False
    if weight is not None and not (_plain(weight) and weight.shape == (x.shape[-1],)):
        return False
    return library() is not None


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, offset: bool = False) -> torch.Tensor:
    """``x [..., dim] / rms(x) * w`` (``w``: ``weight``, ``1 + weight`` with ``offset``, 1 without a weight), one call
    (:func:`norm_applies` first)."""
    y = torch.empty_like(x)
    rc = KERNEL.lib.kvlab_rms_norm(x.data_ptr(), x.numel() // x.shape[-1], x.shape[-1],
                                   None if weight is None else weight.data_ptr(), int(offset), eps, y.data_ptr())
    if rc:
        raise ValueError(f"kvlab rms_norm: arguments refused (x {tuple(x.shape)})")
    return y


def rope_applies(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, tokens_first: bool) -> bool:
    """The kernel takes the rotation of ``x [B, T, H, D]`` (``[B, H, T, D]`` without ``tokens_first``) by tables
    ``cos``/``sin [B, T, rot]`` (rot even, at most D)."""
    if x.dim() != 4 or not (_plain(x) and _plain(cos) and _plain(sin)) or not _eager(x):
        return False
    b, t = x.shape[0], x.shape[1] if tokens_first else x.shape[2]
    rot = cos.shape[-1]
    if cos.shape != (b, t, rot) or sin.shape != cos.shape or rot % 2 or not 2 <= rot <= x.shape[-1]:
        return False
    return b * t <= MAX_TOKENS and library() is not None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, tokens_first: bool) -> torch.Tensor:
    """``x`` with its first ``rot`` channels rotated (rotate-half pairs), one call (:func:`rope_applies` first)."""
    b, d = x.shape[0], x.shape[-1]
    t, h = (x.shape[1], x.shape[2]) if tokens_first else (x.shape[2], x.shape[1])
    y = torch.empty_like(x)
    rc = KERNEL.lib.kvlab_rope(x.data_ptr(), b, t, h, d, int(tokens_first), cos.data_ptr(), sin.data_ptr(),
                               cos.shape[-1], y.data_ptr())
    if rc:
        raise ValueError(f"kvlab rope: arguments refused (x {tuple(x.shape)}, tables {tuple(cos.shape)})")
    return y


__all__ = ["ENABLED", "MAX_TOKENS", "library", "norm_applies", "rms_norm", "rope", "rope_applies"]
