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
and the op checks the thread count at run time (more than one: ``F.linear``, as eager).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from . import cpp_build

SOURCE = Path(__file__).with_name("bf16_kernel.cpp")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-ffp-contract=fast")
ENABLED = cpp_build.switch("KVLAB_BF16_KERNEL")
MAX_ROWS = 8  # input rows (tokens x batch) a call takes: a decode step's; beyond, torch's GEMM
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
    if x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or not ENABLED:
        return False
    if x.device.type != "cpu" or weight.device.type != "cpu" or weight.dim() != 2 or not weight.is_contiguous():
        return False
    if x.dim() == 0 or x.shape[-1] != weight.shape[1] or x.numel() > MAX_ROWS * x.shape[-1] or x.numel() == 0:
        return False
    if bias is not None and not (bias.dtype == torch.bfloat16 and bias.device.type == "cpu" and bias.is_contiguous()
                                 and bias.shape == (weight.shape[0],)):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return False
    if torch.compiler.is_compiling():
        return KERNEL.lib is not None  # the thread count: the op's, at run time
    return torch.get_num_threads() == 1 and library() is not None


def _bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The op ``kvlab::bf16_linear``: :func:`_kernel_linear` on one torch thread, ``F.linear`` on more."""
    if torch.get_num_threads() == 1 and (KERNEL.lib is not None or library() is not None):
        return _kernel_linear(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


bf16_linear_op = torch.library.custom_op("kvlab::bf16_linear", _bf16_linear, mutates_args=())


@bf16_linear_op.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., in]`` -> ``x weight^T + bias`` ``[..., out]`` in bf16 (:func:`applies` first). Traced: the custom op;
    eager: one call of the kernel."""
    if torch.compiler.is_compiling():
        return bf16_linear_op(x, weight, bias)
    return _kernel_linear(x, weight, bias)


def _kernel_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """:func:`linear` by one call of the loaded kernel."""
    x = x.contiguous()
    rows, cols = weight.shape
    n = x.numel() // cols
    y = x.new_empty(*x.shape[:-1], rows)
    rc = KERNEL.lib.kvlab_bf16_linear(x.data_ptr(), n, cols, weight.data_ptr(), rows,
                                      None if bias is None else bias.data_ptr(), y.data_ptr())
    if rc:
        raise ValueError(f"kvlab bf16 linear: arguments refused (x {tuple(x.shape)}, weight {tuple(weight.shape)})")
    return y


__all__ = ["ENABLED", "MAX_ROWS", "applies", "bf16_linear_op", "library", "linear"]
