"""A hand-written C++ kernel (kvlab/layers/cpu_attend.cpp) for a decode step's attention over int8 / int4 K/V codes
on the CPU: one query per head, symmetric codes with per-token scales (the buffers kvlab/layers/fused.py takes; also
rotated keys, the query rotated instead, and a full buffer's residual window, its exact positions attended in
torch and merged with the kernel's part by its maximum and denominator).

Why by hand: inductor's code for :func:`kvlab.layers.fused._attend` converts each code once per query head and sums
int4's scale groups horizontally, so Gemma 4's wide layer (8 query heads on one 512-channel KV head) ran at 0.84x
(int8) / 0.55x (int4) of fp32 SDPA at 16K (this kernel: 2.0x / 2.3x; docs/kv-quantization.md "Decode speed").
Here each code is converted once, multiplied by its scale and FMA'd into the accumulators of every query head of
its KV head (a few positions x up to 8 heads in registers; the vector lanes' sums reduced a vector at a time), the
softmax is exact (two passes over the scores: max, then ``exp``; the UNDER cut, padding mask and sink logits as in
``_attend``), then ``p.v`` runs over tiles of value rows that stay in L1. int4 bytes are read "planar" (per 2W
channels: low nibbles = even channels, then the high ones), the query permuted and the output un-permuted to
match. Vectors of W = 16 floats with AVX-512, 8 otherwise (AVX2: 16-float vectors split in two spilled registers
and ran 10x slower). Scale groups that do not cover whole W (int8) / 2W (int4) channel chunks (g8, g1, ...) are
dequantized row by row into a float tile first (correct, slower). Numerics: float32 throughout, the same
operations as ``_attend`` in another summation order (within 1e-5 of it: tests/test_cpu_attend.py).

Build (kvlab/layers/cpp_build.py): plain C++17 (no torch headers, no OpenMP: torch's own libgomp stays the only one in
the process), compiled at first use with ``$CXX`` (default ``g++``) ``-O3 -march=native`` (no ``-ffast-math``: masked scores are -inf)
into ``$KVLAB_KERNEL_DIR`` (default ``$XDG_CACHE_HOME/kvlab/kernels``, ``~/.cache/kvlab/kernels``) under a name
keyed by a hash of the source, the flags, the compiler's version and the CPU's flags (a ``-march=native`` build
never runs on another CPU), written to a temporary file then renamed (concurrent processes cannot load half a
file), loaded with ctypes (which releases the GIL during the call). One thread per call by default (kvlab decodes
on one thread under load); with more torch threads (``torch.get_num_threads()``, read at each call) a call splits
its positions into that many parts of at least :data:`MIN_PART` on ``std::thread``s (flash-decoding: each part's
maximum, denominator and ``p.v``, rescaled and merged after; one part gives the single-threaded result exactly).
Wrapped as the custom op ``kvlab::quant_attend`` (with a fake implementation) so a compiled decode step
(kvlab/compiled.py, fullgraph) traces it as one opaque call over the whole preallocated buffers and the position
count.

No compiler, a failed build or load: a warning once, and attention takes the inductor-fused path (a cache made with
``fused=True``) or the blocked one, as before. ``KVLAB_CPU_KERNEL=0`` (or :data:`ENABLED` False, the benchmarks'
switch) turns it off silently.
"""

from __future__ import annotations

import ctypes
import os
import threading
import warnings
from pathlib import Path

import torch

from kvlab.cache.quant import QuantView, rotate

from . import cpp_build, fused
from .cpp_build import KernelBuildError, cache_dir

SOURCE = Path(__file__).with_name("cpu_attend.cpp")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread", "-fno-math-errno", "-Wno-psabi")
ENABLED = os.environ.get("KVLAB_CPU_KERNEL", "1") not in ("0", "off", "false", "no")  # KVLAB_CPU_KERNEL=0: off
UNDER = 60.0  # as kvlab/layers/fused.py UNDER: probabilities below exp(-UNDER) of the largest are 0
MIN_PART = 2048  # positions per thread at least: a call splits its positions over torch.get_num_threads() threads
_SCALE_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_LIB: ctypes.CDLL | None = None
_LOADED = False  # _LIB is set (a plain bool: what a compiled trace reads)
_FAILED = False
_LOCK = threading.Lock()


def _compiler() -> str:
    return cpp_build.compiler()


def _key(cxx: str) -> str:
    """The build's key (kvlab/layers/cpp_build.py: the source, the flags, the compiler's version, the CPU's flags)."""
    return cpp_build.key(cxx, SOURCE, FLAGS)


def build(directory: Path | None = None) -> Path:
    """The kernel's shared library for this source, compiler, flags and CPU: built once (atomically) into
    :func:`cache_dir` and reused (kvlab/layers/cpp_build.py). Raises :class:`KernelBuildError`."""
    return cpp_build.build(SOURCE, FLAGS, directory)


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    if lib.kvlab_quant_attend_version() != 3:
        raise KernelBuildError(f"{path}: not this version of the kernel")
    p, i, lg, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float
    lib.kvlab_quant_attend.argtypes = [p, p, i, i, i, i, i, p, p, lg, i, i, i, p, p, lg, i, i, i, p, lg, p, f, f, i, i, p]
    lib.kvlab_quant_attend.restype = i
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel, built on first use; None (warned once) when it cannot be built or loaded, or when
    :data:`ENABLED` is off."""
    global _LIB, _LOADED, _FAILED
    if not ENABLED or _FAILED:
        return None
    if _LIB is None:
        with _LOCK:
            if _LIB is None and not _FAILED:
                try:
                    _LIB = _load(build())
                    _LOADED = True
                except (KernelBuildError, OSError, AttributeError) as e:
                    _FAILED = True
                    warnings.warn(f"kvlab: C++ quantized attention kernel unavailable ({e}); attending with the "
                                  "fused (torch.compile) or blocked path", stacklevel=2)
    return _LIB


def available() -> bool:
    """The kernel is on and loaded (built now if needed). Not from inside a compiled trace (a build is a subprocess):
    there :func:`applies` reads the state an eager call or kvlab/compiled.py left."""
    return library() is not None


def applies(k, v) -> bool:
    """``k``, ``v`` are whole-buffer readers (kvlab/cache/quant.py ``QuantView``) this kernel takes: on the CPU,
    int8 / int4 symmetric codes with per-token scales (any group), keys rotated or not (the query is rotated
    instead: ``q.Hk = Hq.k``), a residual window only on a non-ring buffer (its exact positions merged after:
    :func:`attend`), no exact tail, contiguous (never a copy per step), K and V in the
    same format and channel count (``v_head_dim`` = ``head_dim``), not of a cache made with ``fused=True`` (that asks for the torch.compile kernel,
    kvlab/layers/fused.py; nor with ``fused.ENABLED``); and the kernel is loaded (eager: built now if needed)."""
    if not (isinstance(k, QuantView) and isinstance(v, QuantView) and k.n == v.n and not k.heads and not v.heads):
        return False
    if fused.ENABLED or k.rows.fused or v.rows.fused:
        return False
    if not all(x.rows.spec.fmt in ("int8", "int4") and x.rows.spec.symmetric and _residual_ok(x)
               and x.foldable and x.rows.codes.device.type == "cpu"
               and x.rows.scales.dtype in _SCALE_KIND and x.rows.codes.is_contiguous() and x.rows.scales.is_contiguous()
               for x in (k, v)) or k.rows.spec.fmt != v.rows.spec.fmt or _quantized(k) != _quantized(v) \
            or k.rows.dq != v.rows.dq:  # one channel count for K and V (a value head dim of its own: blocked)
        return False
    if torch.compiler.is_compiling():
        return _LOADED and ENABLED
    return available()


def _quantized(x) -> int:
    """Positions ``0..`` of reader ``x`` held as codes (the rest, a residual window's, exact in ``rows.res``)."""
    return x.rows.quantized_end(x.written) if x.rows.residual_slots else x.n


def _residual_ok(x) -> bool:
    """No residual window, or one this kernel takes: not a ring (slots = positions), all ``n`` positions written,
    some of them quantized already."""
    r = x.rows
    return not r.residual_slots or (not r.ring and x.written == x.n and r.quantized_end(x.written) > 0)


def _quant_attend(q: torch.Tensor, kc: torch.Tensor, ks: torch.Tensor, vc: torch.Tensor, vs: torch.Tensor,
                 mask: torch.Tensor | None, sinks: torch.Tensor | None, n: int, scale: float, k_group: int,
                 v_group: int, int4: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [B, Hkv, G, D]`` float32 over slots ``0..n-1`` of codes ``kc``, ``vc [B, Hkv, C, D or D / 2]`` and scales
    ``ks``, ``vs [B, Hkv, C, D / group]`` (float32 / float16 / bfloat16), ``mask [B|1, L]`` additive float32 (its
    first ``n`` columns read) or None, ``sinks [Hkv * G]`` float32 or None -> ``[B, Hkv, G, D]`` float32 and each
    head's ``[B, Hkv, G, 2]`` largest logit (-inf: nothing visible) and softmax denominator (sinks included)."""
    lib = _LIB if _LIB is not None else library()
    if lib is None:
        raise KernelBuildError("kvlab::quant_attend called without its kernel")
    q, kc, ks, vc, vs = (t.contiguous() for t in (q, kc, ks, vc, vs))
    b, h, g, d = q.shape
    out = torch.empty_like(q)
    stats = q.new_empty(b, h, g, 2)
    if mask is not None:
        mask = mask.float().contiguous()
    if sinks is not None:
        sinks = sinks.float().contiguous()
    rc = lib.kvlab_quant_attend(
        q.data_ptr(), out.data_ptr(), b, h, g, d, n,
        kc.data_ptr(), ks.data_ptr(), kc.shape[-2], int(int4), k_group, _SCALE_KIND[ks.dtype],
        vc.data_ptr(), vs.data_ptr(), vc.shape[-2], int(int4), v_group, _SCALE_KIND[vs.dtype],
        None if mask is None else mask.data_ptr(), 0 if mask is None or mask.shape[0] == 1 else mask.shape[-1],
        None if sinks is None else sinks.data_ptr(), scale, UNDER, torch.get_num_threads(), MIN_PART,
        stats.data_ptr())
    if rc:
        raise ValueError(f"kvlab::quant_attend: arguments refused (q {tuple(q.shape)}, n={n}, k codes "
                         f"{tuple(kc.shape)}, groups {k_group}/{v_group})")
    return out, stats


quant_attend = torch.library.custom_op("kvlab::quant_attend", _quant_attend, mutates_args=())


@quant_attend.register_fake
def _(q, kc, ks, vc, vs, mask, sinks, n, scale, k_group, v_group, int4):
    return torch.empty_like(q), q.new_empty(*q.shape[:-1], 2)


def takes(cache) -> bool:
    """A decode step over ``cache`` (kvlab/cache/cache.py) attends some buffer with this kernel: on the CPU, not
    made with ``fused=True``, one of its quantized buffers int8 / int4 symmetric per token (a residual window: not
    a ring), and the kernel loaded (built now if needed). What ``kvlab bench`` reports per row (``cpp_kernel``)."""
    rows = cache.quant_rows()
    ok = [r for r in rows if r.spec.fmt in ("int8", "int4") and r.spec.symmetric and not (r.residual_slots and r.ring)
          and r.foldable and not r.fused and r.codes.device.type == "cpu"]
    return bool(ok) and available()


def attend(qf: torch.Tensor, k, v, mask: torch.Tensor | None, scale: float, sinks: torch.Tensor | None
           ) -> torch.Tensor:
    """``qf [B, Hkv, G, D]`` float32 over readers ``k``, ``v`` (:func:`applies`) -> ``[B, Hkv, G, D]`` float32.
    ``mask [B|1, 1, 1, n]`` additive or None; ``sinks [1, Hkv, G, 1]`` float32 or None. A residual window's exact
    positions (``p0..n-1``) are attended here in float32 and merged with the kernel's part (its maximum and
    denominator rescaled, as two flash-decoding parts)."""
    n, p0 = k.n, _quantized(k)
    if mask is not None:
        mask = mask.reshape(mask.shape[0], n)
    if sinks is not None:
        sinks = sinks.reshape(-1)
    qk = rotate(qf, k.rows.block) if k.rows.block else qf  # keys stored rotated: q.Hk = Hq.k
    args = (qk, k.rows.codes, k.rows.scales, v.rows.codes, v.rows.scales, mask, sinks, p0, float(scale),
            k.rows.group, v.rows.group, k.rows.spec.fmt == "int4")
    # traced: the custom op (one opaque node); eager: the function itself (no dispatcher overhead per call)
    out, stats = quant_attend(*args) if torch.compiler.is_compiling() else _quant_attend(*args)
    if p0 == n:
        return out
    return _with_residual(qf, k, v, mask, scale, p0, n, out, stats)


def _with_residual(qf: torch.Tensor, k, v, mask: torch.Tensor | None, scale: float, p0: int, n: int,
                   out: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """The kernel's output over positions ``0..p0-1`` (``out``, ``stats``: maximum, denominator) merged with the
    residual window's exact positions ``p0..n-1`` (``rows.res``, slot = position mod its size; unrotated keys)."""
    slots = k.rows._slots(p0, n, qf.device, k.rows.residual_slots)
    kt = k.rows.res.index_select(-2, slots).float()  # [B, Hkv, T, D]
    vt = v.rows.res.index_select(-2, slots).float()
    s = (qf @ kt.transpose(-1, -2)) * scale  # [B, Hkv, G, T]
    if mask is not None:
        s = s + mask[:, p0:n].reshape(mask.shape[0], 1, 1, n - p0)
    top, den = stats[..., 0], stats[..., 1]
    m = torch.maximum(top, s.amax(-1))
    m = torch.where(m == float("-inf"), 0.0, m)
    c = torch.exp(torch.where(top == float("-inf"), 0.0, top) - m)  # the kernel's part rescaled to the new maximum
    x = s - m[..., None]
    p = torch.where(x > -UNDER, x.exp(), 0.0)
    den = den * c
    num = torch.where(den[..., None] > 0, out * den[..., None], 0.0) + p @ vt
    return num / (den + p.sum(-1))[..., None]


__all__ = ["ENABLED", "KernelBuildError", "applies", "attend", "available", "build", "cache_dir", "library",
           "quant_attend", "takes"]
