"""A decode step's float32 weight products as a hand-written C++ call (kvlab/layers/f32_kernel.cpp) on the CPU: ``y =
x W^T + b`` for a few input rows (one token per sequence), every linear layer (kvlab/layers/linear.py) and the LM head.

Why: one thread of this torch build reads a weight of a one-row float32 ``F.linear`` (its matrix-vector product) at
about two thirds of what a plain in-order read of the same bytes reaches (docs/performance.md, "fp32 weight products
as one C++ call"), and a decode step is mostly such products. Here each weight row is read once, in order, into 4-8
float32 FMA accumulators for up to :data:`MAX_ROWS` input rows at once, the weights where they lie (no copy, no
repacking). Numerics: float32, the products summed in another order than torch's (within float32 rounding of it:
tests/test_f32_kernel.py).

Taken when (:func:`applies`): one torch thread (the kernel runs on one), at most :data:`MAX_ROWS` input rows, ``x``,
the weight and the bias float32 on the CPU, the weight (and bias) contiguous, no autograd. Otherwise, and when the
kernel cannot be built (one warning) or ``KVLAB_F32_KERNEL=0``, torch's ``F.linear``. Build:
kvlab/layers/cpp_build.py. Compiled (kvlab/compiled.py): the custom op ``kvlab::f32_linear`` (the thread count
checked by the op at run time: a trace cannot read it). The checks, the call and the op are
kvlab/layers/row_products.py's, shared with the bf16 kernel.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from . import cpp_build, row_products

SOURCE = Path(__file__).with_name("f32_kernel.cpp")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-ffp-contract=fast")
ENABLED = cpp_build.switch("KVLAB_F32_KERNEL")
GROUPED = True  # False: :func:`grouped`'s callers keep their einsum (benchmarks/dense_steps.py --kernel grouped)
MAX_ROWS = row_products.MAX_ROWS
_P, _I, _L = ctypes.c_void_p, ctypes.c_int, ctypes.c_long


def kernel() -> cpp_build.Library:
    """The kernel's library (built and loaded at first use)."""
    return cpp_build.Library(SOURCE, FLAGS, ("kvlab_f32_version", 2), {
        "kvlab_f32_linear": ([_P, _I, _I, _P, _I, _P, _P], _I),
        "kvlab_f32_grouped": ([_P, _L, _L, _I, _I, _I, _P, _I, _I, _L, _P, _L, _L], _I),
    }, "float32 products run as torch's F.linear")


KERNEL = kernel()


def library() -> ctypes.CDLL | None:
    """The loaded kernel (built on first use); None when it cannot be (warned once) or :data:`ENABLED` is off."""
    return KERNEL.get() if ENABLED else None


def applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """The kernel takes ``x [..., in] @ weight [out, in]^T (+ bias [out])``: one torch thread (in a trace: checked by
    the op at run time), no autograd, at most :data:`MAX_ROWS` rows of ``x``, all three float32 on the CPU, the weight
    and bias contiguous, the kernel loaded (in a trace: as an eager call or kvlab/compiled.py left it)."""
    return ENABLED and row_products.takes(x, weight, bias, torch.float32, KERNEL)


f32_linear_op = row_products.op("kvlab::f32_linear", library, "kvlab_f32_linear")  # a compiled step's


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., in]`` -> ``x weight^T + bias`` ``[..., out]`` in float32 (:func:`applies` first). Traced: the custom op;
    eager: one call of the kernel."""
    if torch.compiler.is_compiling():
        return f32_linear_op(x, weight, bias)
    return row_products.run(KERNEL.lib, "kvlab_f32_linear", x, weight, bias)


def grouped_applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    """:func:`grouped` takes ``x [N, G, K]`` and ``w [G, R, C]``: eager (a compiled step keeps its ``einsum``), one
    torch thread, no autograd, both float32 on the CPU, 1 to :data:`MAX_ROWS` rows, each row of ``x`` and of ``w``
    contiguous (the groups and rows at any stride), the kernel on and loaded. Cheap attribute reads only."""
    if not (ENABLED and GROUPED and x.dtype == torch.float32 and w.dtype == torch.float32 and x.ndim == 3 and w.ndim == 3):
        return False
    if not (x.is_cpu and w.is_cpu) or torch.compiler.is_compiling() or not 1 <= x.shape[0] <= MAX_ROWS:
        return False
    if x.stride(2) != 1 or w.stride(2) != 1 or w.stride(1) != w.shape[2] or x.shape[1] != w.shape[0]:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        return False
    return torch.get_num_threads() == 1 and (KERNEL.lib is not None or library() is not None)


def grouped(x: torch.Tensor, w: torch.Tensor, trans: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """One matrix-vector product per group by one call (:func:`grouped_applies` first): ``x [N, G, C]``, ``w [G, R, C]``
    -> ``einsum("ngc,grc->ngr")`` ``[N, G, R]``; ``trans``: ``x [N, G, R]`` -> ``einsum("ngr,grc->ngc")`` ``[N, G, C]``
    (each output summed over ``r`` in order). MLA's absorbed decode (``W_uk`` folded into the query, ``W_uv`` on the
    latent output, per head: kvlab/layers/mla.py; DeepSeek V4's grouped output projection keeps its einsum): the
    weights read in place, where ``einsum``'s batched product read a head's strided
    slice at about a fifth of the copy bandwidth (docs/performance.md). ``out``: written there (its last axis
    contiguous, any other strides), else a new contiguous tensor. Float32 FMAs, another summation order than torch's."""
    n, g, k = x.shape
    rows, cols = w.shape[1], w.shape[2]
    if k != (rows if trans else cols):
        raise ValueError(f"kvlab f32 grouped: x {tuple(x.shape)} does not fit w {tuple(w.shape)} (trans={trans})")
    width = cols if trans else rows
    if out is None:
        out = x.new_empty(n, g, width)
    elif out.shape != (n, g, width) or out.stride(2) != 1:
        raise ValueError(f"kvlab f32 grouped: out {tuple(out.shape)} {out.stride()} is not [{n}, {g}, {width}] with "
                         f"its last axis contiguous")
    if KERNEL.lib.kvlab_f32_grouped(x.data_ptr(), x.stride(0), x.stride(1), n, g, int(trans), w.data_ptr(), rows,
                                    cols, w.stride(0), out.data_ptr(), out.stride(0), out.stride(1)):
        raise ValueError(f"kvlab f32 grouped: arguments refused (x {tuple(x.shape)}, w {tuple(w.shape)})")
    return out


__all__ = ["ENABLED", "MAX_ROWS", "applies", "f32_linear_op", "grouped", "grouped_applies", "library", "linear"]
