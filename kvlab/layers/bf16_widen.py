"""Many-row bf16 weight products (a prefill chunk's) on a CPU without native bf16 arithmetic, as float32 GEMMs over
widened copies: ``y = round_bf16(float(x) float(W)^T + float(b))``.

Why: this torch build's bf16 GEMM on an AVX2 CPU without ``avx512_bf16`` / AMX is compute-bound at a fraction of the
float32 GEMM's rate (a 512-row chunk through a 2048 x 768 weight, one thread: about 300 ms in bf16, 60 ms in float32;
docs/performance.md, "bf16 prefill"). Widening costs one pass over the weight's bytes per call (the chunk's rows
then reuse it), so past a few rows the float32 GEMM wins. Numerics as torch's bf16 GEMM states them: the bf16 values
multiplied exactly in float32, float32 accumulation (in another order), the sum (bias included) rounded to bf16 once,
nearest even (tests/test_bf16_widen.py: against float64 on the same bf16 values, within one bf16 rounding).

The weight is widened in blocks of output rows of at most :data:`BLOCK_FLOATS` floats, so a call's extra memory is
bounded (a 262,144-row LM head is not copied whole). Taken when (:func:`applies`): more than :data:`MIN_ROWS` input
rows (fewer: the C++ matrix-vector kernel, kvlab/layers/bf16_kernel.py, or torch), ``x`` and the weight bf16 on the
CPU, the CPU without ``avx512_bf16`` and AMX (where torch's bf16 GEMM is native), eager, no autograd.
``KVLAB_BF16_WIDEN=0`` turns it off.
"""

from __future__ import annotations

import torch

from . import cpp_build

ENABLED = cpp_build.switch("KVLAB_BF16_WIDEN")
MIN_ROWS = 8  # at most this many rows: not taken (measured: docs/performance.md, "bf16 prefill")
BLOCK_FLOATS = 1 << 19  # widened weight floats a block (2 MB; 8 MB ran slower, more memory: docs/performance.md)


def _native_bf16() -> bool:
    """The CPU multiplies bf16 natively (``avx512_bf16`` or AMX tiles), so torch's bf16 GEMM is not emulated."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


NATIVE_BF16 = _native_bf16()


def widens(x: torch.Tensor) -> bool:
    """bf16 arithmetic on ``x`` is better done in float32 over a widened copy: ``x`` bf16 on the CPU, the CPU without
    native bf16, eager, the switch on (a prefill chunk's attention, kvlab/layers/chunk_attend.py, asks this)."""
    return (ENABLED and not NATIVE_BF16 and x.dtype == torch.bfloat16 and x.device.type == "cpu"
            and not torch.compiler.is_compiling())


def applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """``x [..., in] @ weight [out, in]^T (+ bias [out])`` goes through :func:`linear`: more than :data:`MIN_ROWS`
    rows of ``x``, ``x`` and the weight (and bias) bf16 on the CPU, no native bf16, eager, no autograd."""
    if not widens(x) or weight.dtype != torch.bfloat16 or weight.device.type != "cpu" or weight.dim() != 2:
        return False
    if x.dim() == 0 or x.shape[-1] != weight.shape[1] or x.numel() <= MIN_ROWS * x.shape[-1]:
        return False
    if bias is not None and (bias.dtype != torch.bfloat16 or bias.device.type != "cpu"):
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                             or (bias is not None and bias.requires_grad)))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., in]`` -> ``round_bf16(x weight^T + bias)`` ``[..., out]`` in bf16, float32 GEMMs over widened copies
    of ``x`` and of the weight's blocks of output rows (:func:`applies` first)."""
    rows, cols = weight.shape
    xf = x.reshape(-1, cols).float()
    if rows * cols <= BLOCK_FLOATS:
        wf = weight.float()
        yf = xf @ wf.t() if bias is None else torch.addmm(bias.float(), xf, wf.t())
        return yf.to(torch.bfloat16).view(*x.shape[:-1], rows)
    y = x.new_empty(xf.shape[0], rows)
    step = max(1, BLOCK_FLOATS // cols)
    for a in range(0, rows, step):  # blocks of the weight's output rows: bounded extra memory
        wf = weight[a:a + step].float()
        yf = xf @ wf.t() if bias is None else torch.addmm(bias[a:a + step].float(), xf, wf.t())
        y[:, a:a + step] = yf
    return y.view(*x.shape[:-1], rows)


__all__ = ["BLOCK_FLOATS", "ENABLED", "MIN_ROWS", "NATIVE_BF16", "applies", "linear", "widens"]
