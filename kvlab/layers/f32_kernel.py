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
kernel cannot be built (one warning) or ``KVLAB_F32_KERNEL=0``, torch's ``F.linear``. Build: kvlab/layers/cpp_build.py.
Compiled (kvlab/compiled.py): the custom op ``kvlab::f32_linear``, as kvlab/layers/bf16_kernel.py's (the thread count
checked by the op at run time: a trace cannot read it).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from . import cpp_build

SOURCE = Path(__file__).with_name("f32_kernel.cpp")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-ffp-contract=fast")
ENABLED = cpp_build.switch("KVLAB_F32_KERNEL")
MAX_ROWS = 8  # input rows (tokens x batch) a call takes: a decode step's; beyond, torch's GEMM
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
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or not ENABLED:
        return False
    if x.device.type != "cpu" or weight.device.type != "cpu" or weight.dim() != 2 or not weight.is_contiguous():
        return False
    if x.dim() == 0 or x.shape[-1] != weight.shape[1] or x.numel() > MAX_ROWS * x.shape[-1] or x.numel() == 0:
        return False
    if bias is not None and not (bias.dtype == torch.float32 and bias.device.type == "cpu" and bias.is_contiguous()
                                 and bias.shape == (weight.shape[0],)):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return False
    if torch.compiler.is_compiling():
        return KERNEL.lib is not None  # the thread count: the op's, at run time
    return torch.get_num_threads() == 1 and library() is not None


def _f32_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The op ``kvlab::f32_linear``: :func:`_kernel_linear` on one torch thread, ``F.linear`` on more."""
    if torch.get_num_threads() == 1 and (KERNEL.lib is not None or library() is not None):
        return _kernel_linear(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


f32_linear_op = torch.library.custom_op("kvlab::f32_linear", _f32_linear, mutates_args=())


@f32_linear_op.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., in]`` -> ``x weight^T + bias`` ``[..., out]`` in float32 (:func:`applies` first). Traced: the custom
    op; eager: one call of the kernel."""
    if torch.compiler.is_compiling():
        return f32_linear_op(x, weight, bias)
    return _kernel_linear(x, weight, bias)


def _kernel_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """:func:`linear` by one call of the loaded kernel."""
    x = x.contiguous()
    rows, cols = weight.shape
    n = x.numel() // cols
    y = x.new_empty(*x.shape[:-1], rows)
    rc = KERNEL.lib.kvlab_f32_linear(x.data_ptr(), n, cols, weight.data_ptr(), rows,
                                     None if bias is None else bias.data_ptr(), y.data_ptr())
    if rc:
        raise ValueError(f"kvlab f32 linear: arguments refused (x {tuple(x.shape)}, weight {tuple(weight.shape)})")
    return y


__all__ = ["ENABLED", "MAX_ROWS", "applies", "f32_linear_op", "library", "linear"]
