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
MAX_ROWS = row_products.MAX_ROWS
_P, _I = ctypes.c_void_p, ctypes.c_int


def kernel() -> cpp_build.Library:
    """The kernel's library (built and loaded at first use)."""
    return cpp_build.Library(SOURCE, FLAGS, ("kvlab_f32_version", 1), {
        "kvlab_f32_linear": ([_P, _I, _I, _P, _I, _P, _P], _I),
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


__all__ = ["ENABLED", "MAX_ROWS", "applies", "f32_linear_op", "library", "linear"]
