"""One eager decode step of DeepSeek V4's CSA / HCA / SWA attention (kvlab/layers/compressed.py) as one hand-written
C++ call on the CPU, for a plain float32 or bfloat16 cache once every key is visible: ``kvlab_quant_v4_step`` of
kvlab/layers/cpu_attend.cpp, the step a quantized cache takes (kvlab/layers/cpu_attend.py ``Bound.v4_step``), over
segments of plain rows (the window ring, then the entries) instead of codes.

Why: between its weight products, a CSA layer's decode step was about 60 small torch operators (the query's norm and
rotation, the indexer query's rotation, the indexer's scores, relu, head weights and top-k, the gather of the chosen
entries, their concatenation with the window ring, the softmax with sinks, the two products, the output's inverse
rotation), HCA's and SWA's about 25: their dispatch, a few microseconds each, was a fifth of the step
(docs/performance.md). Here, per row: the query heads normed (``F.rms_norm`` without a weight) and rotated, CSA's
indexer query rotated and its scores ``sum_h w_h relu(q_h . k_w / sqrt(dI))`` (``w = iw / sqrt(HI)``) ranked (the
``index_topk`` best, ties to the earlier entry, in entry order, as ``stable_topk``), one softmax with the head's sink
over the window ring and the chosen (CSA) or all (HCA) entries, read where they lie (no copy; each row read once for
all the query heads, in L1 tiles, the softmax online), ``V = K``, and the output rotated back. Numerics: float32, the
same operations in another summation order (within 1e-5 of the torch path, tests/test_compressed_kernel.py;
probabilities below ``exp(-cpu_attend.UNDER)`` of the largest are 0); the chosen entries are the torch path's except
where two scores differ by an ulp.

Taken when (:func:`applies`): one token per row, no padding, the ring full (every key visible, the caller's
``full``), the cache's ring, entries and indexer keys plain tensors of the layer input's dtype (float32 or bfloat16:
each row widened to float32 as it is read, the output cast back) on the CPU, no autograd. Otherwise, and
when the kernel cannot be built (one warning) or ``KVLAB_COMPRESSED_KERNEL=0``, the torch path. Build:
kvlab/layers/cpp_build.py (the library of kvlab/layers/cpu_attend.py). Compiled (kvlab/compiled.py): the custom op
``kvlab::v4_step`` (with a fake implementation), one opaque call in the traced graph; the trace checks what does not
depend on the entries' count (a symbol), the op reads the rows where they lie when laid out as the kernel reads them
(inductor hands it the buffers' views) and copies them first otherwise (the same result); the kernel splits its work
over torch's thread count read at run time.
"""

from __future__ import annotations

import ctypes

import torch

from . import cpp_build, cpu_attend
from .dense_attend import _PLAIN, _cap

ENABLED = cpp_build.switch("KVLAB_COMPRESSED_KERNEL")  # KVLAB_COMPRESSED_KERNEL=0: off
KERNEL = cpu_attend.KERNEL  # the same library as the quantized kernel's


def library() -> ctypes.CDLL | None:
    """The loaded kernel (built on first use); None when it cannot be (warned once) or :data:`ENABLED` is off."""
    return KERNEL.get() if ENABLED else None


def _plain(t: torch.Tensor | None, dtype: torch.dtype) -> bool:
    """A ``dtype`` CPU tensor whose last axis is contiguous and whose rows (axis -2) are back to back (in a trace: a
    buffer's view whatever its number of rows, a symbol; the op checks the layout it is given at run time)."""
    if t is None:
        return True
    if not (type(t) is torch.Tensor and t.dtype == dtype and t.is_cpu and t.stride(-1) == 1):
        return False
    if torch.compiler.is_compiling():
        return t.dim() < 2 or t.stride(-2) == t.shape[-1]
    return t.dim() < 2 or t.shape[-2] < 2 or t.stride(-2) == t.shape[-1]


def _f32(t: torch.Tensor) -> torch.Tensor:
    """``t.float().contiguous()`` without a dispatched call when it is already so."""
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.float().contiguous()


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t [B, 1, L, D]`` or ``[B, L, D]`` as ``[B, 1, L, D]`` laid out as the kernel reads plain rows (row ``l`` of
    batch row ``b`` at ``(b cap + l) D``): itself (a view) when it is, else a contiguous copy."""
    t = t if t.dim() == 4 else t[:, None]
    return t if _cap(t) else t.contiguous()


def _segment(seg, t: torch.Tensor) -> None:
    """Fill the kernel's segment descriptor ``seg`` (cpu_attend ``_Seg``) with the plain float32 / bfloat16 rows ``t
    [B, 1, n, D]`` (:func:`_rows`), K = V."""
    seg.index, seg.n, seg.nk, seg.v_from = None, t.shape[2], 1, 0
    src = seg.k[0]
    src.codes, src.scales, src.zeros, src.cap, src.dim = t.data_ptr(), None, None, _cap(t), t.shape[-1]
    src.int4, src.group, src.kind, src.span, src.lut, src.plain = 0, t.shape[-1], 0, 1, None, _PLAIN[t.dtype]


def applies(x: torch.Tensor, *cache: torch.Tensor | None) -> bool:
    """The kernel takes this step: ``x`` (the layer's input) and the ``cache`` tensors (ring, entries, indexer keys;
    None: absent) plain float32, or all bfloat16, on the CPU, no autograd, the kernel on and loaded (inside a compiled
    trace: as an eager call or kvlab/compiled.py left it)."""
    if not (ENABLED and x.dtype in _PLAIN and x.is_cpu
            and not (torch.is_grad_enabled() and x.requires_grad) and all(_plain(t, x.dtype) for t in cache)):
        return False
    return KERNEL.lib is not None if torch.compiler.is_compiling() else library() is not None


def step(q: torch.Tensor, ring: torch.Tensor, entries: torch.Tensor | None, ikeys: torch.Tensor | None,
         iq: torch.Tensor | None, iw: torch.Tensor | None, topk: int, cos: torch.Tensor | None,
         sin: torch.Tensor | None, sinks: torch.Tensor | None, heads: int, eps: float, scale: float) -> torch.Tensor:
    """:func:`_step` (:func:`applies` first). Traced: the custom op ``kvlab::v4_step`` (one opaque call; its inputs
    the views of the cache's buffers); eager: the function itself."""
    sinks = None if sinks is None else sinks.detach()
    args = (q, ring, entries, ikeys, iq, iw, topk, cos, sin, sinks, heads, float(eps), float(scale))
    return v4_step_op(*args) if torch.compiler.is_compiling() else _step(*args)


def _step(q: torch.Tensor, ring: torch.Tensor, entries: torch.Tensor | None, ikeys: torch.Tensor | None,
          iq: torch.Tensor | None, iw: torch.Tensor | None, topk: int, cos: torch.Tensor | None,
          sin: torch.Tensor | None, sinks: torch.Tensor | None, heads: int, eps: float, scale: float) -> torch.Tensor:
    """One call of the kernel: ``q [B, 1, H D]`` (before its weightless norm and rotation), the ring ``[B, 1, L, D]``, ``entries [B, n, D]``
    (None: an SWA layer), CSA's ``ikeys [B, n, dI]``, ``iq [B, 1, HI dI]`` (before its rotation) and ``iw [B, 1,
    HI]`` (the head weights before ``1 / sqrt(HI)``; None: HCA), ``cos`` / ``sin [R]`` (the trailing ``2 R``
    channels' rotation; None: none), ``sinks [H]`` -> the attention output ``[B, 1, H, D]``, rotated back, in q's
    dtype (computed in float32: a bfloat16 cache's rows widened as read, the queries widened first)."""
    b, d, dtype = q.shape[0], ring.shape[-1], q.dtype
    lib = KERNEL.lib if KERNEL.lib is not None else library()
    q = _f32(q)
    n = 0 if entries is None else entries.shape[1]
    held = [_rows(ring)] + ([_rows(entries)] if n else [])  # kept alive until the call returns
    segs = (cpu_attend._Seg * len(held))()
    for seg, t in zip(segs, held, strict=True):
        _segment(seg, t)
    hi = di = 0
    iseg = idx = None
    if ikeys is not None and n:
        iq, iw = _f32(iq), _f32(iw)
        hi, di = iw.shape[-1], ikeys.shape[-1]
        held.append(_rows(ikeys))
        iseg = (cpu_attend._Seg * 1)()
        _segment(iseg[0], held[-1])
        idx = torch.empty(b, topk, dtype=torch.int64)
    r = 0 if cos is None else cos.shape[-1]
    cos, sin = (None, None) if cos is None else (_f32(cos), _f32(sin))
    sinks = None if sinks is None else _f32(sinks.detach())
    out = torch.empty(b, 1, heads, d, dtype=torch.float32)

    def ptr(t):
        return None if t is None else t.data_ptr()

    rc = lib.kvlab_quant_v4_step(
        q.data_ptr(), b, heads, d, eps, ptr(cos), ptr(sin), r, segs, len(segs), ptr(iq) if hi else None, hi, di,
        ptr(iw) if hi else None, hi ** -0.5 if hi else 1.0, iseg, topk, ptr(idx), ptr(sinks), scale, cpu_attend.UNDER,
        torch.get_num_threads(), cpu_attend.MIN_PART, out.data_ptr())
    if rc:
        raise ValueError(f"kvlab compressed step: arguments refused (q {tuple(q.shape)}, ring {tuple(ring.shape)}, "
                         f"{n} entries, index heads {hi} x {di}, top-k {topk}, {r} rotated pairs)")
    return out if dtype == torch.float32 else out.to(dtype)


v4_step_op = torch.library.custom_op("kvlab::v4_step", _step, mutates_args=())


@v4_step_op.register_fake
def _(q, ring, entries, ikeys, iq, iw, topk, cos, sin, sinks, heads, eps, scale):
    return q.new_empty(q.shape[0], 1, heads, ring.shape[-1])


__all__ = ["ENABLED", "KERNEL", "applies", "library", "step", "v4_step_op"]
