"""A decode step's rotate-half RoPE rows in float32 as one C++ call (kvlab/layers/rows_kernel.cpp) on the CPU, where
torch issues 10-17 operators for a rotation (the slices, casts, halves, products, sums and cat of
:func:`kvlab.layers.rope.rotate_part`).

Why: a decode step of a small model is mostly weight reads and, between them, many operators on a few hundred
numbers; each of those costs its dispatch, and more when the weight reads before it have pushed its code and data out
of the caches (docs/performance.md, "Laguna's eager decode step"). Numerics: the same products and sums as
``rotate_part``, each rounded as torch rounds it (no FMA contraction): equal to torch's (tests/test_rows_kernel.py).
RMSNorm rows are not here: a C++ norm sums the squares in another order than torch's fused ``rms_norm``, which moved
Gemma 3 270M's logits 2.75e-4 from transformers' (the parity bound is 1e-4) and a CSA indexer's near-tied top-k
(docs/performance.md); norms stay torch's.

Taken when (:func:`rope_applies`): eager (not traced), no autograd, float32 contiguous tensors on the CPU, at most
:data:`MAX_TOKENS` tokens, tables ``[B, T, rot]`` of the same batch and length (:func:`kvlab.layers.rope.apply_rope`).
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
MAX_TOKENS = 8  # tokens (batch x length) a rotation call takes: a decode step's; beyond, torch's operators
_P, _I = ctypes.c_void_p, ctypes.c_int


def kernel() -> cpp_build.Library:
    """The kernel's library (built and loaded at first use)."""
    return cpp_build.Library(SOURCE, FLAGS, ("kvlab_rows_version", 2), {
        "kvlab_rope": ([_P, _I, _I, _I, _I, _I, _P, _P, _I, _P], _I),
    }, "rotations run as torch's operators")


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


__all__ = ["ENABLED", "MAX_TOKENS", "library", "rope", "rope_applies"]
