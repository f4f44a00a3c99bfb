"""What kvlab's few-row weight-product kernels share (kvlab/layers/f32_kernel.py, kvlab/layers/bf16_kernel.py): ``y =
x W^T + b`` for at most :data:`MAX_ROWS` input rows (a decode step's tokens) of one dtype by one C++ call
``fn(x, n, cols, w, rows, bias, y)`` (all row-major contiguous; 0: done): which products a kernel takes, the call, and
the custom op a compiled step calls.

A trace cannot read the thread count (``torch.get_num_threads`` breaks the graph) nor build a kernel: in a trace
:func:`takes` checks the rest, the same checks (the device by ``is_cpu``: kvlab/layers/cpp_build.py), and the kernel
loaded by an eager call or kvlab/compiled.py; the op checks the thread count at run time (more than one:
``F.linear``, as eager).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .cpp_build import Library

MAX_ROWS = 8  # input rows (tokens x batch) a call takes: a decode step's; beyond, torch's GEMM


def takes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
          kernel: Library) -> bool:
    """``x [..., in] @ weight [out, in]^T (+ bias [out])`` goes to ``kernel``: all three ``dtype`` on the CPU, the
    weight 2-D and contiguous, the bias contiguous ``[out]``, 1 to :data:`MAX_ROWS` rows of ``x``, no autograd, one
    torch thread and the kernel loaded (built now if needed; in a trace: loaded already, the threads the op's).
    Eager, once per product: cheap attribute reads only (``is_cpu``: kvlab/layers/cpp_build.py)."""
    if x.dtype != dtype or weight.dtype != dtype:
        return False
    if not (x.is_cpu and weight.is_cpu) or weight.ndim != 2 or not weight.is_contiguous():
        return False
    n, cols = x.numel(), weight.shape[1]
    if x.ndim == 0 or x.shape[-1] != cols or n > MAX_ROWS * cols or n == 0:
        return False
    if bias is not None and not (bias.dtype == dtype and bias.is_cpu and bias.is_contiguous() and bias.ndim == 1
                                 and bias.shape[0] == weight.shape[0]):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return False
    if torch.compiler.is_compiling():
        return kernel.lib is not None
    return torch.get_num_threads() == 1 and (kernel.lib is not None or kernel.get() is not None)


def run(lib: ctypes.CDLL, fn: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [..., in]`` -> ``x weight^T + bias`` ``[..., out]`` in x's dtype by one call of ``lib``'s function ``fn``."""
    x = x.contiguous()
    rows, cols = weight.shape
    y = x.new_empty(*x.shape[:-1], rows)
    if getattr(lib, fn)(x.data_ptr(), x.numel() // cols, cols, weight.data_ptr(), rows,
                        None if bias is None else bias.data_ptr(), y.data_ptr()):
        raise ValueError(f"{fn}: arguments refused (x {tuple(x.shape)}, weight {tuple(weight.shape)})")
    return y


def op(name: str, library: Callable[[], ctypes.CDLL | None], fn: str):
    """The custom op ``name`` (with a fake implementation) of a compiled step: :func:`run` of ``library()``'s ``fn``
    on one torch thread, ``F.linear`` on more or when the kernel is off or not loaded."""

    def impl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        lib = library() if torch.get_num_threads() == 1 else None
        return F.linear(x, weight, bias) if lib is None else run(lib, fn, x, weight, bias)

    custom = torch.library.custom_op(name, impl, mutates_args=())

    @custom.register_fake
    def _(x, weight, bias):
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    return custom


__all__ = ["MAX_ROWS", "op", "run", "takes"]
