"""Quantize-on-write as one hand-written C++ call (kvlab/cache/quant_kernel.cpp) on the CPU: int8 / int4 codes with
one scale (and zero point, ``-asym``) per token and group of channels, written straight into a
:class:`~kvlab.cache.quant.QuantRows`' codes and scales at their slots (a ring's wrap-around included).

Why: an eager decode step writes one position per layer, and kvlab/cache/quant.py's torch form of that write is
about 25 small operators (maximum, scale rounded to its dtype, reciprocal, round, clamp, pack, the slots of a ring,
two ``index_copy_``), whose dispatch is the cost: ~0.2 ms a write, 1.6 ms of a deepseek-v4-small step (8 window
rings; docs/kv-quantization.md). Numerics: the same float32 operations in the same order as ``quantize`` (true
division, the scale rounded to its dtype to nearest even, then ``1 / scale``, round half to even, clamp), so the
bytes written are those of the torch form (tests/test_quant_kernel.py).

Eager calls only (inside a compiled step inductor fuses the torch form). Build: kvlab/layers/cpp_build.py (``$CXX``,
``-O3 -march=native``, the per-user kernel cache, at first use). No compiler, a failed build or load: a warning
once, and the torch form. ``KVLAB_QUANT_KERNEL=0`` (or :data:`ENABLED` False) turns it off silently.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from kvlab.layers import cpp_build

SOURCE = Path(__file__).with_name("quant_kernel.cpp")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-ffp-contract=off")
ENABLED = cpp_build.switch("KVLAB_QUANT_KERNEL")  # KVLAB_QUANT_KERNEL=0: off
MAX_DIM = 4096  # channels per row the kernel takes (its row scratch)
_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_FP8 = {"fp8": (torch.float8_e4m3fn, 126), "fp8_e5m2": (torch.float8_e5m2, 123)}  # dtype, the largest finite code
_TABLES: dict[str, torch.Tensor] = {}


def fp8_table(fmt: str) -> torch.Tensor:
    """The float32 values of an fp8 format's positive codes ``0..top`` (increasing; torch's own decoding), kept for
    the process (the kernel reads it by address)."""
    t = _TABLES.get(fmt)
    if t is None:
        dtype, top = _FP8[fmt]
        t = _TABLES[fmt] = torch.arange(top + 1, dtype=torch.uint8).view(dtype).float()
    return t
_P, _I, _L = ctypes.c_void_p, ctypes.c_int, ctypes.c_long


def kernel(flags: tuple[str, ...] = FLAGS) -> cpp_build.Library:
    """The kernel's library for ``flags`` (built and loaded at first use)."""
    return cpp_build.Library(SOURCE, flags, ("kvlab_quantize_version", 2),
                             {"kvlab_quantize_rows": ([_P, _L, _L, _I, _I, _I, _I, _P, _P, _P, _L, _L, _I, _P, _I], _I)},
                             "quantizing in torch")


KERNEL = kernel()


def library() -> ctypes.CDLL | None:
    """The loaded kernel (built on first use); None when it cannot be built or loaded (warned once) or when
    :data:`ENABLED` is off."""
    return KERNEL.get() if ENABLED else None


def takes(fmt: str, x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> bool:
    """The kernel writes these: an eager call on the CPU, int8 / int4 / fp8 (symmetric) codes, float32 / float16 /
    bfloat16 scales,
    contiguous buffers, 1 to :data:`MAX_DIM` channels; and the kernel on and loaded (built now if needed)."""
    return (ENABLED and fmt in ("int8", "int4", "fp8", "fp8_e5m2") and not torch.compiler.is_compiling() and x.device.type == "cpu"
            and 0 < x.shape[-1] <= MAX_DIM and scales.dtype in _KIND and codes.is_contiguous() and scales.is_contiguous()
            and (zeros is None or zeros.is_contiguous()) and library() is not None)


def quantize_into(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group: int,
                  bits: int, first: int, ring: bool, fmt: str = "int") -> None:
    """Quantize ``x [*lead, m, D]`` (float32; :func:`takes` first) into ``codes [*lead, C, D or D / 2]``,
    ``scales`` / ``zeros [*lead, C, D / group]`` (None: symmetric) at slots ``first..first+m-1`` (mod ``C`` in a
    ring), as kvlab/cache/quant.py ``quantize`` would; ``fmt`` "fp8" / "fp8_e5m2": fp8 bytes (``bits`` 8,
    symmetric)."""
    x = x.float().contiguous()
    m, d, cap = x.shape[-2], x.shape[-1], codes.shape[-2]
    lead = x.numel() // max(1, m * d)
    lut = fp8_table(fmt) if fmt in _FP8 else None
    if KERNEL.lib.kvlab_quantize_rows(x.data_ptr(), lead, m, d, group, bits, _KIND[scales.dtype], codes.data_ptr(),
                                scales.data_ptr(), None if zeros is None else zeros.data_ptr(), cap, first, int(ring),
                                None if lut is None else lut.data_ptr(), 0 if lut is None else lut.numel() - 1):
        raise ValueError(f"kvlab quantize_rows: arguments refused (x {tuple(x.shape)}, group {group}, bits {bits}, "
                         f"{cap} slots from {first}, ring={ring})")


__all__ = ["ENABLED", "KERNEL", "fp8_table", "kernel", "library", "quantize_into", "takes"]
