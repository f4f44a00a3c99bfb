"""mHC's maps and Sinkhorn-Knopp (kvlab/layers/mhc.py; DeepSeek V4) as one hand-written C++ loop per matrix
(kvlab/layers/mhc_kernel.cpp) on the CPU.

Why: an eager decode step runs 16 hyper-connections, each a Sinkhorn of one ``4 x 4`` matrix (20 iterations of a
row and a column normalisation) and the maps' scale, bias and sigmoids: in torch about 90 tiny operators each, whose
dispatch is the cost (about 1,450 of the step's 2,760 operators). Here one call computes, per token,
``pre = sigmoid(s0 z + b) + eps``, ``post = 2 sigmoid(s1 z + b)`` and ``M = Sinkhorn(softmax_rows(s2 z + b) + eps)``
from ``z = W x`` (:func:`maps`), or the Sinkhorn alone (:func:`sinkhorn`). Numerics: float32, the same operations in
the same order as the torch form (sums in order, true divisions, no FMA contraction); ``exp`` is the C library's,
not torch's vectorised one, so sigmoid and softmax may differ by an ulp or two, and the result is within 1e-6 of
the torch form (tests/test_mhc_kernel.py).

Build: kvlab/layers/cpp_build.py (``$CXX``, ``-O3 -march=native``, into the per-user kernel cache, at first use).
Wrapped as the custom ops ``kvlab::sinkhorn``, ``kvlab::mhc_maps``, ``kvlab::mhc_read`` and ``kvlab::mhc_write`` (with
fake implementations), so a traced graph (kvlab/compiled.py) keeps each as one opaque call; eager calls the function
itself (no dispatcher overhead). The kernel runs on one thread whatever torch's count, so the ops need no thread
check; they take any layout (a copy where the kernel needs contiguous rows). No compiler, a failed build
or load: a warning once, and mHC runs its torch form. ``KVLAB_MHC_KERNEL=0`` (or :data:`ENABLED` False) turns it off
silently.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from . import cpp_build
from .cpp_build import KernelBuildError

SOURCE = Path(__file__).with_name("mhc_kernel.cpp")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-ffp-contract=off")
ENABLED = cpp_build.switch("KVLAB_MHC_KERNEL")  # KVLAB_MHC_KERNEL=0: off
MAX_STREAMS = 64  # the kernel's limit on n (a column sum's scratch)
_P, _I, _L, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float


def kernel(flags: tuple[str, ...] = FLAGS) -> cpp_build.Library:
    """The kernel's library for ``flags`` (built and loaded at first use)."""
    return cpp_build.Library(SOURCE, flags, ("kvlab_mhc_version", 2), {
        "kvlab_sinkhorn": ([_P, _P, _L, _I, _I, _F], _I),
        "kvlab_mhc_maps": ([_P, _P, _P, _P, _L, _I, _I, _F], _I),
        "kvlab_mhc_read": ([_P, _P, _P, _P, _P, _P, _L, _I, _L, _I, _F, _F], _I),
        "kvlab_mhc_write": ([_P, _P, _P, _P, _L, _I, _L], _I),
    }, "mHC runs its torch form")


KERNEL = kernel()


def library() -> ctypes.CDLL | None:
    """The loaded kernel, built on first use; None (warned once) when it cannot be built or loaded, or when
    :data:`ENABLED` is off."""
    return KERNEL.get() if ENABLED else None


def applies(x: torch.Tensor, n: int) -> bool:
    """The kernel takes this call: ``x`` on the CPU, ``n <= MAX_STREAMS``, no gradient asked for, and the kernel on
    and loaded (eager: built now if needed; inside a compiled trace: as an eager call or kvlab/compiled.py left it)."""
    if not x.is_cpu or n > MAX_STREAMS or (torch.is_grad_enabled() and x.requires_grad):
        return False
    if torch.compiler.is_compiling():
        return KERNEL.lib is not None and ENABLED
    return ENABLED and library() is not None


def _lib() -> ctypes.CDLL:
    lib = KERNEL.lib if KERNEL.lib is not None else library()
    if lib is None:
        raise KernelBuildError("kvlab::mhc called without its kernel")
    return lib


def _f32(t: torch.Tensor) -> torch.Tensor:
    """``t.float().contiguous()`` without a dispatched call when it is already so (a read's fp32 parameters)."""
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.float().contiguous()


def _sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """``[..., n, n]`` logits -> doubly stochastic ``[..., n, n]`` float32 (kvlab/layers/mhc.py ``sinkhorn``)."""
    n = logits.shape[-1]
    out = logits.float().contiguous().clone()
    if _lib().kvlab_sinkhorn(out.data_ptr(), out.data_ptr(), out.numel() // max(n * n, 1), n, iters, eps):
        raise ValueError(f"kvlab::sinkhorn: arguments refused (logits {tuple(logits.shape)}, iters={iters}; "
                         f"n <= {MAX_STREAMS}, iters >= 1)")
    return out


def _maps(lin: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, n: int, iters: int, eps: float
          ) -> torch.Tensor:
    """``lin [..., (2 + n) n]`` (``W x``), ``scale [3]``, ``bias [(2 + n) n]`` float32 -> ``[..., (2 + n) n]``:
    pre ``[..., :n]``, post ``[..., n:2n]``, M ``[..., 2n:]`` (row-major ``n x n``)."""
    lin, scale, bias = lin.float().contiguous(), scale.float().contiguous(), bias.float().contiguous()
    width = (2 + n) * n
    if lin.shape[-1] != width or scale.numel() != 3 or bias.numel() != width:
        raise ValueError(f"kvlab::mhc_maps: lin's last dim and bias must be (2 + n) n = {width} and scale 3 values, "
                         f"got {tuple(lin.shape)}, {tuple(bias.shape)}, {tuple(scale.shape)}")
    out = torch.empty_like(lin)
    if _lib().kvlab_mhc_maps(lin.data_ptr(), scale.data_ptr(), bias.data_ptr(), out.data_ptr(), lin.numel() // width,
                             n, iters, eps):
        raise ValueError(f"kvlab::mhc_maps: arguments refused (n={n}, iters={iters}; n <= {MAX_STREAMS}, "
                         "iters >= 1)")
    return out


def _read(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, iters: int, eps: float,
          norm_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A hyper-connection's read in one call (:func:`applies` first; the op ``kvlab::mhc_read``): streams ``x [..., n, D]`` float32,
    ``w [(2 + n) n, n D]``, ``scale [3]``, ``bias [(2 + n) n]`` -> the sub-layer's input ``sum_j pre_j x_j [..., D]``
    and the maps ``[..., (2 + n) n]`` (as :func:`maps` of ``W rms(flatten(x))``; W's rows summed in 32 partial sums,
    not torch's matrix-vector order: within float rounding)."""
    n, d = x.shape[-2], x.shape[-1]
    width = (2 + n) * n
    if x.dtype != torch.float32 or w.shape != (width, n * d) or scale.numel() != 3 or bias.numel() != width:
        raise ValueError(f"kvlab mhc read: x float32 [..., n, D], w [(2 + n) n, n D], scale [3], bias [(2 + n) n], got "
                         f"{x.dtype} {tuple(x.shape)}, {tuple(w.shape)}, {tuple(scale.shape)}, {tuple(bias.shape)}")
    x, w, scale, bias = x.contiguous(), _f32(w), _f32(scale), _f32(bias)  # fp32 parameters: no call each
    mix = x.new_empty(*x.shape[:-2], d)
    out = x.new_empty(*x.shape[:-2], width)
    if _lib().kvlab_mhc_read(x.data_ptr(), w.data_ptr(), scale.data_ptr(), bias.data_ptr(), mix.data_ptr(),
                             out.data_ptr(), mix.numel() // d, n, d, iters, eps, norm_eps):
        raise ValueError(f"kvlab mhc read: arguments refused (n={n}, iters={iters}; n <= {MAX_STREAMS}, iters >= 1)")
    return mix, out


def _write(packed: torch.Tensor, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A hyper-connection's write in one call (the op ``kvlab::mhc_write``): ``x'_k = post_k out + sum_j M_jk x_j [..., n, D]`` from the
    packed maps ``[..., (2 + n) n]`` (:func:`read`, :func:`maps`), the sub-layer's ``out [..., D]`` and the streams
    ``x [..., n, D]``, all float32."""
    n, d = x.shape[-2], x.shape[-1]
    if not (x.dtype == out.dtype == packed.dtype == torch.float32) or out.shape != (*x.shape[:-2], d) \
            or packed.shape != (*x.shape[:-2], (2 + n) * n):
        raise ValueError(f"kvlab mhc write: packed [..., (2 + n) n], out [..., D], x [..., n, D] float32, got "
                         f"{tuple(packed.shape)}, {out.dtype} {tuple(out.shape)}, {x.dtype} {tuple(x.shape)}")
    packed, out, x = packed.contiguous(), out.contiguous(), x.contiguous()
    y = torch.empty_like(x)
    if _lib().kvlab_mhc_write(packed.data_ptr(), out.data_ptr(), x.data_ptr(), y.data_ptr(), out.numel() // d, n, d):
        raise ValueError(f"kvlab mhc write: arguments refused (n={n}; n <= {MAX_STREAMS})")
    return y


sinkhorn_op = torch.library.custom_op("kvlab::sinkhorn", _sinkhorn, mutates_args=())
maps_op = torch.library.custom_op("kvlab::mhc_maps", _maps, mutates_args=())
read_op = torch.library.custom_op("kvlab::mhc_read", _read, mutates_args=())
write_op = torch.library.custom_op("kvlab::mhc_write", _write, mutates_args=())


@sinkhorn_op.register_fake
def _(logits, iters, eps):
    return torch.empty_like(logits, dtype=torch.float32)


@maps_op.register_fake
def _(lin, scale, bias, n, iters, eps):
    return torch.empty_like(lin, dtype=torch.float32)


@read_op.register_fake
def _(x, w, scale, bias, iters, eps, norm_eps):
    n = x.shape[-2]
    return x.new_empty(*x.shape[:-2], x.shape[-1]), x.new_empty(*x.shape[:-2], (2 + n) * n)


@write_op.register_fake
def _(packed, out, x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """The kernel's Sinkhorn (:func:`applies` first): traced, the custom op; eager, the function itself."""
    return sinkhorn_op(logits, iters, eps) if torch.compiler.is_compiling() else _sinkhorn(logits, iters, eps)


def maps(lin: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, n: int, iters: int, eps: float) -> torch.Tensor:
    """The kernel's maps (:func:`applies` first): traced, the custom op; eager, the function itself."""
    args = (lin, scale, bias, n, iters, eps)
    return maps_op(*args) if torch.compiler.is_compiling() else _maps(*args)


def read(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, iters: int, eps: float,
         norm_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A hyper-connection's read in one call (:func:`applies` first): ``x [..., n, D]`` -> ``(sum_j pre_j x_j [...,
    D], maps [..., (2 + n) n])`` (:func:`_read`). Traced: the custom op; eager: the function itself."""
    args = (x, w, scale, bias, iters, eps, norm_eps)
    return read_op(*args) if torch.compiler.is_compiling() else _read(*args)


def write(packed: torch.Tensor, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A hyper-connection's write in one call: ``(maps [..., (2 + n) n], out [..., D], x [..., n, D])`` -> the streams
    ``[..., n, D]`` (:func:`_write`). Traced: the custom op; eager: the function itself."""
    return write_op(packed, out, x) if torch.compiler.is_compiling() else _write(packed, out, x)


__all__ = ["ENABLED", "applies", "library", "maps", "maps_op", "read", "read_op", "sinkhorn", "sinkhorn_op", "write",
           "write_op"]
