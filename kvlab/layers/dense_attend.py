"""A decode step's attention over a plain float32 / bfloat16 K/V cache on the CPU by the C++ kernel of
kvlab/layers/cpu_attend.cpp (``kvlab_dense_attend``: the quantized kernel's segment reader with plain rows, no
scales): one query per head; per (batch row, KV head) each K row and V row read once for all the query heads of
its group (GQA / MQA / MHA), in tiles that stay in L1, the softmax online (flash-decoding within the call), the
additive mask of a left-padded batch and sink logits as in :func:`kvlab.layers.core.attend`.

Why: SDPA's CPU flash kernel reads K/V of a decode step at about half the machine's copy bandwidth (6.2-7.4 GB/s
against 12.4-13.7 on the dense families at 16K, docs/performance.md "Left of issue 17"); its matmul form for sinks
reads K and V once each but writes the scores. One kernel for codes and plain rows: the tiles, the online softmax,
the thread split and the merge are the quantized path's (tested there), only the row loader differs.

Taken by the decode step of the layers whose module sets ``dense_kernel`` (GQA's, kvlab/layers/attention.py, and
CCA's, kvlab/layers/cca.py; through kvlab/layers/core.py ``attend_out``) and by MLA's absorbed attention over a plain
latent (kvlab/layers/mla.py: keys the whole ``[c_kv, k_pe]`` rows, values their ``c_kv`` channels, one KV head,
each row read once) where :func:`applies`:
one query, on the CPU, no autograd, keys and values plain float32 or bfloat16 tensors ``[B, Hkv, L, D]`` laid out
as a store's buffers are (rows back to back, heads ``cap`` rows apart, batch rows ``Hkv`` heads apart: a view of the
first ``L`` slots of a preallocated or grown ``[B, Hkv, cap, D]`` buffer, a window ring in place with its rotated
positions), mask None or additive ``[B|1, 1, 1, L]``.
Anything else takes the torch path: another layout, a GPU, and the other kinds (CSA/HCA/SWA: their own C++ step,
kvlab/layers/compressed_kernel.py; DSA: its chosen latents gathered). ``KVLAB_DENSE_KERNEL=0`` (or :data:`ENABLED`
False) turns it off; a failed build warns once (kvlab/layers/cpp_build.py) and falls back.
Compiled (kvlab/compiled.py): wrapped as the custom op ``kvlab::dense_attend`` (with a fake implementation), one
opaque call in the traced graph; eager calls the function itself (no dispatcher overhead). A trace sees symbolic
lengths, so it checks only what does not depend on them (and that an eager call or kvlab/compiled.py loaded the
kernel: no build inside a trace); the op checks the layout of the tensors it is given at run time (inductor keeps
a custom op's input strides, ``needs_exact_strides``, so it receives the buffer's view) and attends a layout the
kernel does not read with torch's operations instead (same result, slower).
Numerics: float32 accumulation, the same operations as SDPA in another summation order (within 1e-5 in fp32:
tests/test_dense_attend.py); bfloat16 K/V are widened exactly, the output rounded to bfloat16 once.
"""

from __future__ import annotations

import torch

from . import cpp_build, cpu_attend

ENABLED = cpp_build.switch("KVLAB_DENSE_KERNEL")  # KVLAB_DENSE_KERNEL=0: off
KERNEL = cpu_attend.KERNEL  # the same library as the quantized kernel's
_PLAIN = {torch.float32: 1, torch.bfloat16: 2}  # row dtypes the kernel reads -> ``plain`` code (compressed_kernel.py too)


def library():
    """The loaded kernel (built on first use); None when it cannot be (warned once) or :data:`ENABLED` is off."""
    return KERNEL.get() if ENABLED else None


def _cap(x: torch.Tensor) -> int:
    """Slots per head of ``x [B, H, L, D]`` as the kernel addresses it (element ``((b H + h) cap + l) D + d``), or 0
    when ``x`` is not laid out so (size-1 axes: any stride)."""
    b, h, n, d = x.shape
    s0, s1, s2, s3 = x.stride()
    if (d > 1 and s3 != 1) or (n > 1 and s2 != d):
        return 0
    if h > 1:
        cap = s1 // d
        if s1 != cap * d:
            return 0
    elif b > 1:
        cap = s0 // d
        if s0 != cap * d:
            return 0
    else:
        cap = n
    if cap < n or (b > 1 and s0 != h * cap * d):
        return 0
    return cap


def _rows(x: torch.Tensor) -> bool:
    """``x [B, H, L, D]``'s strides are a buffer's whatever ``L`` (what a trace checks: its ``L`` is a symbol; the
    op checks :func:`_cap` at run time)."""
    d = x.shape[3]
    return x.stride(3) == 1 and x.stride(2) == d and x.stride(1) % d == 0 and x.stride(0) % d == 0


def applies(q: torch.Tensor, k, v) -> bool:
    """The kernel takes this attention: one query ``q [B, H, 1, D]`` (float32 / bfloat16, the K/V's dtype) on the CPU,
    ``k``, ``v`` plain tensors of the layout :func:`_cap` reads, no autograd, the kernel on and loaded (inside a
    compiled trace: as an eager call or kvlab/compiled.py left it, and the layout as far as :func:`_rows` sees).
    Once per attention call: cheap attribute reads only (``is_cpu``, eager and traced: kvlab/layers/cpp_build.py)."""
    if not (ENABLED and type(k) is torch.Tensor and type(v) is torch.Tensor and k.dtype in _PLAIN
            and v.dtype == k.dtype and q.dtype == k.dtype):
        return False
    qs, ks, vs = q.shape, k.shape, v.shape
    if not (qs[2] == 1 and ks[0] == qs[0] and ks[-1] == qs[-1] and qs[1] % ks[1] == 0 and vs[0] == ks[0]
            and vs[1] == ks[1] and vs[2] == ks[2]):
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False
    if not (q.is_cpu and k.is_cpu and v.is_cpu):
        return False
    if torch.compiler.is_compiling():
        return KERNEL.lib is not None and _rows(k) and _rows(v)
    return _cap(k) > 0 and _cap(v) > 0 and (KERNEL.lib is not None or library() is not None)


def _torch_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
                  sinks: torch.Tensor | None) -> torch.Tensor:
    """What the op computes where the kernel does not read the layout it was given: the same attention by torch's
    operations in float32 (``[B, H, 1, D]`` -> ``[B, H, 1, Dv]`` in q's dtype, ``v [B, Hkv, L, Dv]``)."""
    b, h, _, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    s = (q.float().reshape(b, hkv, h // hkv, d) @ k.float().transpose(-1, -2)) * scale  # [B, Hkv, G, L]
    if mask is not None:
        s = s + mask.float().reshape(mask.shape[0], 1, 1, n)
    if sinks is not None:
        s = torch.cat((s, sinks.float().reshape(1, hkv, h // hkv, 1).expand(b, hkv, h // hkv, 1)), -1)
    p = s.softmax(-1)[..., :n]
    return (p @ v.float()).reshape(b, h, 1, v.shape[-1]).to(q.dtype)


def _dense_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                  sinks: torch.Tensor | None, scale: float, value_channels: int = 0) -> torch.Tensor:
    """The op ``kvlab::dense_attend``: :func:`attend` where the kernel reads ``k``, ``v``'s layout (:func:`_cap`),
    else :func:`_torch_attend`."""
    if _cap(k) and _cap(v) and _lib() is not None:
        return _kernel_attend(q, k, v, mask, scale, sinks, value_channels)
    return _torch_attend(q, k, v[..., :value_channels] if value_channels else v, mask, scale, sinks)


def _lib():
    return KERNEL.lib if KERNEL.lib is not None else library()


dense_attend_op = torch.library.custom_op("kvlab::dense_attend", _dense_attend, mutates_args=())


@dense_attend_op.register_fake
def _(q, k, v, mask, sinks, scale, value_channels=0):
    return q.new_empty(*q.shape[:-1], value_channels or v.shape[-1])


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
           sinks: torch.Tensor | None = None, value_channels: int = 0) -> torch.Tensor:
    """q ``[B, H, 1, D]``, k / v ``[B, Hkv, L, D | Dv]`` (:func:`applies`) -> ``[B, H, 1, Dv]`` in q's dtype; ``mask``
    additive ``[B|1, 1, 1, L]`` or None, ``sinks [H]`` logits added to each head's softmax denominator or None.
    ``value_channels`` > 0 (v is k: MLA's whole latent rows, kvlab/layers/mla.py): the values are the first that
    many channels of the rows, the others not read for them (the output ``[B, H, 1, value_channels]``: the same
    numbers as ``attend(...)[..., :value_channels]``). Traced: the custom op (one opaque node); eager: the kernel's
    call itself."""
    if torch.compiler.is_compiling():
        return dense_attend_op(q, k, v, mask, None if sinks is None else sinks.detach(), float(scale),
                               int(value_channels))
    if value_channels and not (v is k and 0 < value_channels <= k.shape[-1]):
        raise ValueError(f"kvlab dense_attend: value_channels={value_channels} takes v = k and 1..{k.shape[-1]} "
                         f"channels")
    return _kernel_attend(q, k, v, mask, scale, sinks, value_channels)


def _kernel_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
                   sinks: torch.Tensor | None, value_channels: int = 0) -> torch.Tensor:
    """:func:`attend` by one call of the loaded kernel (``k``, ``v`` of a layout :func:`_cap` reads). ``q [B, H, 1, D]``
    contiguous is ``[B, Hkv, G, D]`` as the kernel reads it, the output ``[B, H, 1, Dv]`` its ``[B, Hkv, G, Dv]``, a
    contiguous mask ``[B|1, 1, 1, L]`` its ``[B|1, L]``: their pointers passed as they are (no view per call).
    ``value_channels`` > 0: ``v`` is ``k`` and the values its first that many channels (Dv)."""
    b, h, _, d = q.shape
    hkv, n, dv = k.shape[1], k.shape[2], value_channels or v.shape[-1]
    qf = q if q.dtype == torch.float32 and q.is_contiguous() else q.float().contiguous()
    mb = 0
    if mask is not None:
        mb = mask.shape[0]
        if mask.numel() != mb * n:
            raise ValueError(f"kvlab dense_attend: mask {tuple(mask.shape)} is not [B|1, 1, 1, {n}]")
        if mask.dtype != torch.float32 or not mask.is_contiguous():
            mask = mask.float().contiguous()
    if sinks is not None:
        sinks = sinks.detach().reshape(h)
        if sinks.dtype != torch.float32 or not sinks.is_contiguous():
            sinks = sinks.float().contiguous()
    out = torch.empty(b, h, 1, dv, dtype=torch.float32)  # the kernel writes float32 whatever the default dtype
    if KERNEL.lib.kvlab_dense_attend(qf.data_ptr(), out.data_ptr(), b, hkv, h // hkv, k.data_ptr(), v.data_ptr(),
                                     _cap(k), _cap(v), n, d, dv, _PLAIN[k.dtype],
                                     None if mask is None else mask.data_ptr(), n if mb > 1 else 0,
                                     None if sinks is None else sinks.data_ptr(), float(scale), cpu_attend.UNDER,
                                     torch.get_num_threads(), cpu_attend.MIN_PART):
        raise ValueError(f"kvlab dense_attend: arguments refused (q {tuple(q.shape)}, k {tuple(k.shape)} "
                         f"{k.stride()}, v {tuple(v.shape)} {v.stride()})")
    return out if q.dtype == torch.float32 else out.to(q.dtype)


__all__ = ["ENABLED", "KERNEL", "applies", "attend", "dense_attend_op", "library"]
