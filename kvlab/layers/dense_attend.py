"""A decode step's attention over a plain float32 / bfloat16 K/V cache on the CPU by the C++ kernel of
kvlab/layers/cpu_attend.cpp (``kvlab_dense_attend``: the quantized kernel's segment reader with plain rows, no
scales): one query per head; per (batch row, KV head) each K row and V row read once for all the query heads of
its group (GQA / MQA / MHA), in tiles that stay in L1, the softmax online (flash-decoding within the call), the
additive mask of a left-padded batch and sink logits as in :func:`kvlab.layers.core.attend`.

Why: SDPA's CPU flash kernel reads K/V of a decode step at about half the machine's copy bandwidth (6.2-7.4 GB/s
against 12.4-13.7 on the dense families at 16K, docs/performance.md "Left of issue 17"); its matmul form for sinks
reads K and V once each but writes the scores. One kernel for codes and plain rows: the tiles, the online softmax,
the thread split and the merge are the quantized path's (tested there), only the row loader differs.

Taken by the decode step of the layers whose module sets ``dense_kernel`` (GQA's, kvlab/layers/attention.py; through
kvlab/layers/core.py ``attend_out``) where :func:`applies`: eager, one query, on the CPU, no autograd, keys and
values plain float32 or bfloat16 tensors ``[B, Hkv, L, D]`` laid out as a store's buffers are (rows back to back,
heads ``cap`` rows apart, batch rows ``Hkv`` heads apart: a view of the first ``L`` slots of a preallocated or grown
``[B, Hkv, cap, D]`` buffer, a window ring in place with its rotated positions), mask None or additive
``[B|1, 1, 1, L]``. Anything else takes the torch path: a compiled trace (the kernel is eager-only, the compiled
step keeps torch's ops), another layout, a GPU, and the other kinds (MLA, CCA, CSA/HCA/SWA: their own paths, not
measured with this kernel). ``KVLAB_DENSE_KERNEL=0`` (or :data:`ENABLED` False) turns it off; a failed build warns
once (kvlab/layers/cpp_build.py) and falls back.
Numerics: float32 accumulation, the same operations as SDPA in another summation order (within 1e-5 in fp32:
tests/test_dense_attend.py); bfloat16 K/V are widened exactly, the output rounded to bfloat16 once.
"""

from __future__ import annotations

import torch

from . import cpp_build, cpu_attend

ENABLED = cpp_build.switch("KVLAB_DENSE_KERNEL")  # KVLAB_DENSE_KERNEL=0: off
KERNEL = cpu_attend.KERNEL  # the same library as the quantized kernel's
_PLAIN = {torch.float32: 1, torch.bfloat16: 2}


def library():
    """The loaded kernel (built on first use); None when it cannot be (warned once) or :data:`ENABLED` is off."""
    return KERNEL.get() if ENABLED else None


def _cap(x: torch.Tensor) -> int:
    """Slots per head of ``x [B, H, L, D]`` as the kernel addresses it (element ``((b H + h) cap + l) D + d``), or 0
    when ``x`` is not laid out so (size-1 axes: any stride)."""
    b, h, n, d = x.shape
    st = x.stride()
    if (d > 1 and st[3] != 1) or (n > 1 and st[2] != d):
        return 0
    if h > 1:
        cap = st[1] // d
        if st[1] != cap * d:
            return 0
    elif b > 1:
        cap = st[0] // d
        if st[0] != cap * d:
            return 0
    else:
        cap = n
    if cap < n or (b > 1 and st[0] != h * cap * d):
        return 0
    return cap


def applies(q: torch.Tensor, k, v) -> bool:
    """The kernel takes this attention: one query ``q [B, H, 1, D]`` (float32 / bfloat16, the K/V's dtype) on the CPU,
    ``k``, ``v`` plain tensors of the layout :func:`_cap` reads, eager, no autograd, the kernel on and loaded."""
    return (ENABLED and not torch.compiler.is_compiling() and q.shape[2] == 1 and type(k) is torch.Tensor
            and type(v) is torch.Tensor and q.device.type == "cpu" and k.dtype in _PLAIN and v.dtype == k.dtype
            and q.dtype == k.dtype and k.device.type == "cpu" and v.device.type == "cpu"
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
            and k.shape[0] == q.shape[0] and k.shape[-1] == q.shape[-1] and q.shape[1] % k.shape[1] == 0
            and k.shape[:3] == v.shape[:3]
            and _cap(k) > 0 and _cap(v) > 0 and library() is not None)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
           sinks: torch.Tensor | None = None) -> torch.Tensor:
    """q ``[B, H, 1, D]``, k / v ``[B, Hkv, L, D | Dv]`` (:func:`applies`) -> ``[B, H, 1, Dv]`` in q's dtype; ``mask``
    additive ``[B|1, 1, 1, L]`` or None, ``sinks [H]`` logits added to each head's softmax denominator or None."""
    b, h, _, d = q.shape
    hkv, n, dv = k.shape[1], k.shape[2], v.shape[-1]
    g = h // hkv
    qf = q.reshape(b, hkv, g, d)
    if qf.dtype != torch.float32 or not qf.is_contiguous():
        qf = qf.float().contiguous()
    mb = 0
    if mask is not None:
        mb = mask.shape[0]
        mask = mask.reshape(mb, n)
        if mask.dtype != torch.float32 or not mask.is_contiguous():
            mask = mask.float().contiguous()
    if sinks is not None:
        sinks = sinks.detach().reshape(h)
        if sinks.dtype != torch.float32 or not sinks.is_contiguous():
            sinks = sinks.float().contiguous()
    out = torch.empty(b, hkv, g, dv, dtype=torch.float32)  # the kernel writes float32 whatever the default dtype
    if KERNEL.lib.kvlab_dense_attend(qf.data_ptr(), out.data_ptr(), b, hkv, g, k.data_ptr(), v.data_ptr(), _cap(k),
                                     _cap(v), n, d, dv, _PLAIN[k.dtype], None if mask is None else mask.data_ptr(),
                                     n if mb > 1 else 0, None if sinks is None else sinks.data_ptr(), float(scale),
                                     cpu_attend.UNDER, torch.get_num_threads(), cpu_attend.MIN_PART):
        raise ValueError(f"kvlab dense_attend: arguments refused (q {tuple(q.shape)}, k {tuple(k.shape)} "
                         f"{k.stride()}, v {tuple(v.shape)} {v.stride()})")
    out = out.view(b, h, 1, dv)
    return out if q.dtype == torch.float32 else out.to(q.dtype)


__all__ = ["ENABLED", "KERNEL", "applies", "attend", "library"]
