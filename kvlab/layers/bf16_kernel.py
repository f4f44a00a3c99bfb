"""A decode step's bf16 weight products as a hand-written C++ call (kvlab/layers/bf16_kernel.cpp) on the CPU: ``y = x
W^T + b`` for a few input rows (one token per sequence), every linear layer (kvlab/layers/linear.py) and the LM head.

Why: this torch build's bf16 matrix-vector product on one thread of an AVX2 CPU without ``avx512_bf16`` is
compute-bound: it reads the weights at about 5.8 GB/s against fp32's 13.4 (docs/performance.md, "bf16"), so a bf16
decode step ran at about the fp32 one's speed for half the bytes. Here each 8 weights (16 bytes) widen to float32 by
a 16-bit shift and go into float32 FMAs, several weight rows a pass for all input rows (each weight read once), the
sums rounded to bf16 (nearest even) as torch rounds its float32-accumulated products: the same result within one
bf16 rounding (tests/test_bf16_kernel.py), the weights read where they lie (no copy, no repacking).

Taken when (:func:`applies`): one torch thread (the kernel runs on one), at most :data:`MAX_ROWS` input rows, ``x``,
the weight and the bias bf16 on the CPU, the weight (and bias) contiguous, no autograd. Otherwise, and when the kernel
cannot be built (one warning) or ``KVLAB_BF16_KERNEL=0``, torch's ``F.linear``. Build: kvlab/layers/cpp_build.py.
Compiled (kvlab/compiled.py): the custom op ``kvlab::bf16_linear`` (with a fake implementation), one opaque call in
the traced graph; eager calls the function itself. A trace cannot read the thread count (``torch.get_num_threads``
breaks the graph) nor build the kernel: it checks the rest (the kernel loaded by an eager call or kvlab/compiled.py),
and the op checks the thread count at run time (more than one: ``F.linear``, as eager). The checks, the call and the
op are kvlab/layers/row_products.py's, shared with the float32 kernel.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from . import cpp_build, row_products

SOURCE = Path(__file__).with_name("bf16_kernel.cpp")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-ffp-contract=fast")
ENABLED = cpp_build.switch("KVLAB_BF16_KERNEL")
MAX_ROWS = row_products.MAX_ROWS
_P, _I = ctypes.c_void_p, ctypes.c_int


def kernel() -> cpp_build.Library:
    """The kernel's library (built and loaded at first use)."""
    return cpp_build.Library(SOURCE, FLAGS, ("kvlab_bf16_version", 1), {
        "kvlab_bf16_linear": ([_P, _I, _I, _P, _I, _P, _P], _I),
    }, "bf16 products run as torch's F.linear")


KERNEL = kernel()


def library() -> ctypes.CDLL | None:
    """The loaded kernel (built on first use); None when it cannot be (warned once) or :data:`ENABLED` is off."""
    return KERNEL.get() if ENABLED else None


def applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """The kernel takes ``x [..., in] @ weight [out, in]^T (+ bias [out])``: one torch thread (in a trace: checked by the
    op at run time), no autograd, at most :data:`MAX_ROWS` rows of ``x``, all three bf16 on the CPU, the weight and
    bias contiguous, the kernel loaded (in a trace: as an eager call or kvlab/compiled.py left it)."""
    return ENABLED and row_products.takes(x, weight, bias, torch.bfloat16, KERNEL)


bf16_linear_op = row_products.op("kvlab::bf16_linear", library, "kvlab_bf16_linear")  # a compiled step's


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., in]`` -> ``x weight^T + bias`` ``[..., out]`` in bf16 (:func:`applies` first). Traced: the custom op;
    eager: one call of the kernel."""
    if torch.compiler.is_compiling():
        return bf16_linear_op(x, weight, bias)
    return row_products.run(KERNEL.lib, "kvlab_bf16_linear", x, weight, bias)


__all__ = ["ENABLED", "MAX_ROWS", "applies", "bf16_linear_op", "library", "linear"]
