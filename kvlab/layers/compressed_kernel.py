"""One eager decode step of DeepSeek V4's CSA / HCA / SWA attention (kvlab/layers/compressed.py) as one hand-written
C++ call (kvlab/layers/compressed_kernel.cpp) on the CPU, for a plain float32 cache once every key is visible.

Why: between its weight products, a CSA layer's decode step was about 60 small torch operators (the query's norm and
rotation, the indexer query's rotation, the indexer's scores, relu, head weights and top-k, the gather of the chosen
entries, their concatenation with the window ring, the softmax with sinks, the two products, the output's inverse
rotation), HCA's and SWA's about 25: their dispatch, a few microseconds each, was a fifth of the step
(docs/performance.md). Here, per row: the query heads normed (``F.rms_norm`` without a weight) and rotated, CSA's
indexer query rotated and its scores ``sum_h w_h relu(q_h . k_w / sqrt(dI))`` (``w = iw / sqrt(HI)``) ranked (the
``index_topk`` best, ties to the earlier entry, in entry order, as ``stable_topk``), one softmax with the head's sink
over the window ring and the chosen (CSA) or all (HCA) entries, read where they lie (no copy), ``V = K``, and the
output rotated back. Numerics: float32, the same operations in another summation order (within 1e-5 of the torch
path, tests/test_compressed_kernel.py); the chosen entries are the torch path's except where two scores differ by
an ulp.

Taken when (:func:`applies`): an eager step (not traced), one token per row, no padding, the ring full (every key
visible, the caller's ``every``), the cache's ring, entries and indexer keys plain float32 tensors on the CPU, no
autograd. Otherwise, and when the kernel cannot be built (one warning) or ``KVLAB_COMPRESSED_KERNEL=0``, the torch
path. Build: kvlab/layers/cpp_build.py.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from . import cpp_build

SOURCE = Path(__file__).with_name("compressed_kernel.cpp")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno")
ENABLED = cpp_build.switch("KVLAB_COMPRESSED_KERNEL")
_P, _I, _L, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float

def kernel() -> cpp_build.Library:
    """The kernel's library (built and loaded at first use)."""
    return cpp_build.Library(SOURCE, FLAGS, ("kvlab_compressed_version", 1), {
        "kvlab_compressed_step": ([_P, _P, _L, _I, _P, _L, _I, _P, _L, _P, _P, _I, _I, _I, _P, _P, _I, _P, _I, _I,
                                   _I, _F, _F, _P], _I),
    }, "CSA/HCA/SWA decode steps run their torch form")


KERNEL = kernel()


def library() -> ctypes.CDLL | None:
    """The loaded kernel (built on first use); None when it cannot be (warned once) or :data:`ENABLED` is off."""
    return KERNEL.get() if ENABLED else None


def _plain(t: torch.Tensor | None) -> bool:
    """A float32 CPU tensor whose last axis is contiguous and whose rows (axis -2) are back to back."""
    return t is None or (type(t) is torch.Tensor and t.dtype == torch.float32 and t.device.type == "cpu"
                         and t.stride(-1) == 1 and (t.dim() < 2 or t.shape[-2] < 2 or t.stride(-2) == t.shape[-1]))


def _f32(t: torch.Tensor) -> torch.Tensor:
    """``t.float().contiguous()`` without a dispatched call when it is already so."""
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.float().contiguous()


def applies(x: torch.Tensor, *cache: torch.Tensor | None) -> bool:
    """The kernel takes this step: ``x`` (the layer's input) and the ``cache`` tensors (ring, entries, indexer keys;
    None: absent) plain float32 on the CPU, eager, no autograd, the kernel on and loaded."""
    return (ENABLED and x.dtype == torch.float32 and x.device.type == "cpu" and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and x.requires_grad) and all(_plain(t) for t in cache)
            and library() is not None)


def step(q: torch.Tensor, ring: torch.Tensor, entries: torch.Tensor | None, ikeys: torch.Tensor | None,
         iq: torch.Tensor | None, iw: torch.Tensor | None, topk: int, cos: torch.Tensor | None,
         sin: torch.Tensor | None, sinks: torch.Tensor | None, heads: int, eps: float, scale: float) -> torch.Tensor:
    """``q [B, 1, H D]`` (before its weightless norm and rotation), the ring ``[B, 1, L, D]``, ``entries [B, n, D]``
    (None: an SWA layer), CSA's ``ikeys [B, n, dI]``, ``iq [B, 1, HI dI]`` (before its rotation) and ``iw [B, 1,
    HI]`` (the head weights before ``1 / sqrt(HI)``; None: HCA), ``cos`` / ``sin [R]`` (the trailing ``2 R``
    channels' rotation; None: none), ``sinks [H]`` -> the attention output ``[B, 1, H, D]``, rotated back."""
    b, d = q.shape[0], ring.shape[-1]
    lib = KERNEL.lib if KERNEL.lib is not None else library()
    q = q.contiguous()
    n = 0 if entries is None else entries.shape[1]
    hi = di = 0
    if ikeys is not None and n:
        iq, iw = iq.contiguous(), _f32(iw)
        hi, di = iw.shape[-1], ikeys.shape[-1]
    r = 0 if cos is None else cos.shape[-1]
    sinks = None if sinks is None else _f32(sinks)
    out = q.new_empty(b, 1, heads, d)
    null = 0

    def ptr(t):
        return null if t is None else t.data_ptr()

    rc = lib.kvlab_compressed_step(
        q.data_ptr(), ring.data_ptr(), ring.stride(0), ring.shape[-2], ptr(entries),
        entries.stride(0) if n else 0, n, ptr(ikeys) if hi else null, ikeys.stride(0) if hi else 0,
        ptr(iq) if hi else null, ptr(iw) if hi else null, hi, di, topk, ptr(cos), ptr(sin), r, ptr(sinks), b,
        heads, d, eps, scale, out.data_ptr())
    if rc:
        raise ValueError(f"kvlab compressed step: arguments refused (q {tuple(q.shape)}, ring {tuple(ring.shape)}, "
                         f"{n} entries, index heads {hi} x {di}, top-k {topk}, {r} rotated pairs)")
    return out


__all__ = ["ENABLED", "applies", "library", "step"]
