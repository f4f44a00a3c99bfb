"""A hand-written C++ kernel (kvlab/layers/cpu_attend.cpp) for a decode step's attention over int8 / int4 K/V codes
(and fp8 e4m3 / e5m2 bytes, read through a table of their values) on the CPU: one query per head, codes with
per-token scales (the buffers kvlab/layers/fused.py takes; also zero
points, ``-asym``; rotated keys, the query rotated instead; values of their own width and format; and a full
buffer's residual window, its exact positions attended in torch and merged with the kernel's part by its maximum
and denominator).

What it reads is a small descriptor per segment of positions: one or two key buffers whose channels sit side by
side (scores = ``q_a.k_a + q_b.k_b``, each with its own scales and format), the values (a buffer of their own or
one of the key parts) and optionally the slots of a top-k's rows. Forms: separate K and V (GQA, CCA); MLA's latent,
keys ``[c_kv, k_pe]`` (two buffers quantized apart) and values ``c_kv``, each tile of ``c_kv`` read once for both
products (kvlab/layers/mla.py); K = V (DeepSeek V4's CSA/HCA/SWA, kvlab/layers/compressed.py): the window ring,
then the compressed entries (HCA) or the rows CSA's indexer picked of them (read through their slots), a segment
each, one softmax over all.

Why by hand: inductor's code for :func:`kvlab.layers.fused._attend` converts each code once per query head and sums
int4's scale groups horizontally, so Gemma 4's wide layer (8 query heads on one 512-channel KV head) ran at 0.84x
(int8) / 0.55x (int4) of fp32 SDPA at 16K (this kernel: 2.0x / 2.3x; docs/kv-quantization.md "Decode speed").
Here each code is converted once, multiplied by its scale and FMA'd into the accumulators of every query head of
its KV head (a few positions x up to 8 heads in registers; the vector lanes' sums reduced a vector at a time), in
tiles of rows that stay in L1: a tile's scores, then its softmax numerators against the running maximum (the sums
so far rescaled when it grows: exact, flash-decoding within a call; the UNDER cut, padding mask and sink logits as
in ``_attend``), then its ``p.v`` over the same rows. int4 bytes are read "planar" (per 2W
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
counts (the descriptor: a list of ints, the counts symbolic).

No compiler, a failed build or load: a warning once, and attention takes the inductor-fused path (a cache made with
``fused=True``) or the blocked one, as before. ``KVLAB_CPU_KERNEL=0`` (or :data:`ENABLED` False, the benchmarks'
switch) turns it off silently.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import NamedTuple

import torch

from kvlab.cache.quant import QuantPick, QuantRows, QuantView, rotate

from . import cpp_build, fused
from .cpp_build import KernelBuildError, cache_dir

SOURCE = Path(__file__).with_name("cpu_attend.cpp")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread", "-fno-math-errno", "-Wno-psabi")
ENABLED = cpp_build.switch("KVLAB_CPU_KERNEL")  # KVLAB_CPU_KERNEL=0: off
UNDER = 60.0  # as kvlab/layers/fused.py UNDER: probabilities below exp(-UNDER) of the largest are 0
MIN_PART = 2048  # positions per thread at least: a call splits its positions over torch.get_num_threads() threads
_SCALE_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_CODES = {"int8": 0, "int4": 1, "fp8": 2, "fp8_e5m2": 3}  # the code formats the kernel reads (fp8: through a table)
_FP8_DTYPES = {2: torch.float8_e4m3fn, 3: torch.float8_e5m2}
_FP8_TABLES: dict[int, torch.Tensor] = {}


def _fp8_table(code: int) -> torch.Tensor:
    """The float32 value of each of the 256 bytes of an fp8 format (``_CODES`` 2: e4m3fn, 3: e5m2), as torch decodes
    them (kept for the process: the kernel reads it by address)."""
    t = _FP8_TABLES.get(code)
    if t is None:
        t = _FP8_TABLES[code] = torch.arange(256, dtype=torch.uint8).view(_FP8_DTYPES[code]).float()
    return t


def _code(spec) -> int:
    """The kernel's code format of a quantized buffer's spec (``_CODES``), -1 for one it does not read."""
    return _CODES.get(spec.fmt, -1)


def build(directory: Path | None = None) -> Path:
    """The kernel's shared library for this source, compiler, flags and CPU: built once (atomically) into
    :func:`cache_dir` and reused (kvlab/layers/cpp_build.py). Raises :class:`KernelBuildError`."""
    return cpp_build.build(SOURCE, FLAGS, directory)


class _Src(ctypes.Structure):
    """One code buffer as the kernel reads it (``Src`` in cpu_attend.cpp): codes ``[B, H, cap, D or D / 2]``, scales
    and zero points (or null) ``[B, H, cap, D / group]`` (keys per channel: ``[B, H, cap / span, D]``); fp8 codes:
    ``lut`` the float32 value of each byte (:func:`_fp8_table`), else null; ``plain`` 0 (plain rows of float32 /
    bfloat16 values are 1 / 2: kvlab/layers/dense_attend.py, which fills them in C)."""
    _fields_ = [("codes", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("zeros", ctypes.c_void_p), ("cap", ctypes.c_long),
                ("dim", ctypes.c_int), ("int4", ctypes.c_int), ("group", ctypes.c_int), ("kind", ctypes.c_int),
                ("span", ctypes.c_int), ("lut", ctypes.c_void_p), ("plain", ctypes.c_int)]


class _Seg(ctypes.Structure):
    """One segment of positions (``Seg`` in cpu_attend.cpp): an optional slot index ``[B, n]``, one or two key parts
    (channels side by side), the values (a buffer of their own, or key part ``v_from``)."""
    _fields_ = [("index", ctypes.c_void_p), ("n", ctypes.c_long), ("k", _Src * 2), ("nk", ctypes.c_int), ("v", _Src),
                ("v_from", ctypes.c_int)]


def kernel(flags: tuple[str, ...] = FLAGS) -> cpp_build.Library:
    """The kernel's library for ``flags`` (built and loaded at first use, kvlab/layers/cpp_build.py)."""
    p, i, lg, f, seg = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float, ctypes.POINTER(_Seg)
    return cpp_build.Library(SOURCE, flags, ("kvlab_quant_attend_version", 11), {
        "kvlab_quant_attend": ([p, p, i, i, i, seg, i, p, lg, p, f, f, i, i, p], i),
        "kvlab_dense_attend": ([p, p, i, i, i, p, p, lg, lg, lg, i, i, i, p, lg, p, f, f, i, i], i),
        "kvlab_quant_scores": ([p, p, i, i, i, seg, i], i),
        "kvlab_quant_index_scores": ([p, p, i, i, i, seg, i, p, f, i, p], i),
        "kvlab_quant_v4_step": ([p, i, i, i, f, p, p, i, seg, i, p, i, i, p, f, seg, i, p, p, f, f, i, i, p], i),
    }, "attending with the fused (torch.compile) or blocked path")


KERNEL = kernel()


def library() -> ctypes.CDLL | None:
    """The loaded kernel, built on first use; None (warned once) when it cannot be built or loaded, or when
    :data:`ENABLED` is off."""
    return KERNEL.get() if ENABLED else None


def available() -> bool:
    """The kernel is on and loaded (built now if needed). Not from inside a compiled trace (a build is a subprocess):
    there :func:`applies` reads the state an eager call or kvlab/compiled.py left."""
    return library() is not None


def _joined(x, axis: int) -> list | None:
    """The parts of ``x`` when it is readers joined along ``axis`` (kvlab/layers/blocked.py ``Cat``, not imported
    here: that module imports this one), else None."""
    return list(x.parts) if getattr(x, "axis", None) == axis and hasattr(x, "parts") else None


class _Segment(NamedTuple):
    """Positions the kernel reads from one set of buffers: key parts (channels side by side), the values (None: the
    first key part, read once per tile for both products), the slots of a top-k's rows ``[B, n]`` (or None: slot =
    position) and the position count."""
    keys: list[QuantView]
    values: QuantView | None
    index: torch.Tensor | None
    n: int

    def sources(self) -> list[QuantView]:
        """The segment's buffers: its key parts, then its values' own."""
        return self.keys if self.values is None else [*self.keys, self.values]


def _segments(k, v) -> list[_Segment] | None:
    """The kernel's segments of positions for keys ``k`` and values ``v``, or None for a form it does not take.
    Forms: separate K and V buffers (GQA, CCA); keys two buffers side by side along channels and values the first
    (MLA: ``[c_kv, k_pe]``, ``c_kv``); K = V (CSA/HCA/SWA: one buffer, or readers joined along positions -- the
    window ring, then the compressed entries or the rows a top-k picked of them, kvlab/cache/quant.py
    ``QuantPick``), a segment each."""
    if v is k:
        out = []
        for x in _joined(k, -2) or [k]:
            if isinstance(x, QuantPick):
                out.append(_Segment([x.view], None, x.idx, x.n))
            elif isinstance(x, QuantView):
                out.append(_Segment([x], None, None, x.n))
            else:
                return None
        return out
    keys = _joined(k, -1) or [k]
    if not all(isinstance(x, QuantView) for x in keys) or len(keys) > 2:
        return None
    if v is keys[0] and len(keys) == 2:
        return [_Segment(keys, None, None, keys[0].n)]
    if isinstance(v, QuantView) and len(keys) == 1:
        return [_Segment(keys, v, None, keys[0].n)]
    return None


def _buffer_ok(x: QuantView, values: bool) -> bool:
    """A reader the kernel reads: int8 / int4 codes with per-token scales or keys per channel (KIVI; zero points or
    not) on the CPU, contiguous (never a copy per step), not of a cache made with ``fused=True``, no residual window
    it cannot take, keys rotated only where they are not the values too."""
    r = x.rows
    return (_readable(r) and (x.foldable or (r.span > 1 and not r.tail_dim)) and not r.fused
            and r.codes.device.type == "cpu" and r.scales.dtype in _SCALE_KIND and r.codes.is_contiguous()
            and r.scales.is_contiguous() and (r.zeros is None or r.zeros.is_contiguous()) and _residual_ok(x)
            and not (values and r.block) and len(x.lead) == (1 if x.heads else 2))


def _readable(r: QuantRows) -> bool:
    """Codes the kernel reads: int8 / int4 (zero points or not), fp8 e4m3 / e5m2 with one scale per token and group
    of channels."""
    code = _code(r.spec)
    return code >= 0 and (code < 2 or (r.span == 1 and r.zeros is None))


def _heads(x: QuantView) -> tuple[int, int]:
    """Batch rows and heads of a reader (lead ``[B]``: one head)."""
    return (x.lead[0], 1) if x.heads else x.lead


def _plan(k, v) -> list[_Segment] | None:
    """:func:`_segments` if the kernel takes every buffer of them, else None."""
    if fused.ENABLED:
        return None
    segs = _segments(k, v)
    if segs is None:
        return None
    for seg in segs:
        srcs = seg.sources()
        values = seg.values or seg.keys[0]
        if not all(_buffer_ok(x, x is values) for x in srcs):
            return None
        first = srcs[0]
        if any(x.n != first.n or _heads(x) != _heads(first) for x in srcs):
            return None  # one position count, one batch and head count (no set: n may be symbolic)
    if (len(segs) > 1 or segs[0].index is not None) and any(x.rows.residual_slots for g in segs for x in g.sources()):
        return None  # a residual window: one segment read straight
    return segs


def plan(k, v) -> list[_Segment] | None:
    """The kernel's segments of positions for readers ``k``, ``v`` (kvlab/cache/quant.py ``QuantView``; MLA's keys
    two of them joined along channels, its values the first; K = V readers joined along positions, a top-k's pick
    among them) when it takes them, else None: on the CPU, int8 / int4 codes (zero points or not) with per-token
    scales (any group) or keys per channel (KIVI), keys rotated or not (the query is rotated instead: ``q.Hk = Hq.k``), a residual window only
    on a non-ring buffer (its exact positions merged after: :func:`attend`), no exact tail, contiguous (never a copy
    per step), not of a cache made with ``fused=True`` (that asks for the torch.compile kernel,
    kvlab/layers/fused.py; nor with ``fused.ENABLED``); and the kernel is loaded (eager: built now if needed)."""
    segs = _plan(k, v)
    if segs is None or not (KERNEL.lib is not None and ENABLED if torch.compiler.is_compiling() else available()):
        return None
    return segs


def applies(k, v) -> bool:
    """The kernel takes readers ``k``, ``v`` (:func:`plan` is not None)."""
    return plan(k, v) is not None


def _quantized(x) -> int:
    """Positions ``0..`` of reader ``x`` held as codes (the rest, a residual window's, exact in ``rows.res``)."""
    return x.rows.quantized_end(x.written) if x.rows.residual_slots else x.n


def _residual_ok(x) -> bool:
    """No residual window, or one this kernel takes: not a ring (slots = positions), all ``n`` positions written,
    some of them quantized already."""
    r = x.rows
    return not r.residual_slots or (not r.ring and x.written == x.n and r.quantized_end(x.written) > 0)


_DESC = 19  # ints per segment in the op's ``desc``: n, key parts, values' source, index, then 3 sources' (buffer,
# group, code format (``_CODES``), zero points, span)


def _lib() -> ctypes.CDLL:
    lib = KERNEL.lib if KERNEL.lib is not None else library()
    if lib is None:
        raise KernelBuildError("kvlab::quant_attend called without its kernel")
    return lib


def _descriptors(q: torch.Tensor, codes: list[torch.Tensor], scales: list[torch.Tensor], zeros: list[torch.Tensor],
                 index: list[torch.Tensor], desc: list[int]) -> ctypes.Array:
    """The kernel's segment descriptors (``Seg``) for ``desc`` (:func:`_quant_attend`), each buffer checked against
    ``q [B, Hkv, G, Dq]``."""
    b, h = q.shape[:2]
    segs = (_Seg * (len(desc) // _DESC))()
    for seg, at in zip(segs, range(0, len(desc), _DESC), strict=True):
        n, nk, v_from, slots = desc[at:at + 4]
        seg.n, seg.nk, seg.v_from = n, nk, v_from
        if slots >= 0:
            idx = index[slots]
            if idx.dtype != torch.int64 or not idx.is_contiguous() or tuple(idx.shape) != (b, n):
                raise ValueError(f"kvlab::quant_attend: index {slots} {tuple(idx.shape)} {idx.dtype}: [{b}, {n}] "
                                 "contiguous int64 allowed")
            seg.index = idx.data_ptr()
        for j in range(nk + (v_from < 0)):
            i, group, code, z, span = desc[at + 4 + 5 * j:at + 9 + 5 * j]
            c, s = codes[i], scales[i]
            if c.numel() != b * h * c.shape[-2] * c.shape[-1] or not (c.is_contiguous() and s.is_contiguous()):
                raise ValueError(f"kvlab::quant_attend: buffer {i} of shape {tuple(c.shape)} does not match q "
                                 f"{tuple(q.shape)}")
            d = c.shape[-1] * (2 if code == 1 else 1)
            if s.shape[-1] != (d if span > 1 else d // group) or (span > 1 and s.shape[-2] != -(-c.shape[-2] // span)):
                raise ValueError(f"kvlab::quant_attend: scales {i} {tuple(s.shape)} do not match codes "
                                 f"{tuple(c.shape)} (group {group}, span {span})")
            src = seg.k[j] if j < nk else seg.v
            src.codes, src.scales, src.cap, src.span = c.data_ptr(), s.data_ptr(), c.shape[-2], span
            if z >= 0:
                if zeros[z].shape != s.shape or zeros[z].dtype != s.dtype or not zeros[z].is_contiguous():
                    raise ValueError(f"kvlab::quant_attend: zero points {z} {tuple(zeros[z].shape)} do not match the "
                                     f"scales {tuple(s.shape)} {s.dtype}")
                src.zeros = zeros[z].data_ptr()
            src.dim, src.int4, src.group, src.kind = d, int(code == 1), group, _SCALE_KIND[s.dtype]
            src.lut = _fp8_table(code).data_ptr() if code >= 2 else None
    return segs


def _quant_attend(q: torch.Tensor, codes: list[torch.Tensor], scales: list[torch.Tensor], zeros: list[torch.Tensor],
                 index: list[torch.Tensor], mask: torch.Tensor | None, sinks: torch.Tensor | None, desc: list[int],
                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [B, Hkv, G, Dq]`` float32 over segments of positions described by ``desc`` (per segment: ``n``, its key
    parts ``nk``, its values' source (a key part, or -1: the buffer after them), its slots (an index into ``index``:
    ``[B, n]`` int64, or -1: slot = position), then ``(buffer, group, code format, zero points, span)`` of each
    buffer (the format: ``_CODES``, int8 0, int4 1, fp8 e4m3 2, e5m2 3): indices into ``codes [B, Hkv, C, D or D / 2]`` and ``scales [B, Hkv, C, D / group]`` (float32 / float16 /
    bfloat16; lead ``[B]`` for one head; keys per channel, ``span > 1``: ``[B, Hkv, C / span, D]``) and into
    ``zeros`` (the same shape and dtype as the scales; -1: symmetric codes) ->
    ``[B, Hkv, G, Dv]`` float32 and each head's ``[B, Hkv, G, 2]`` largest logit (-inf: nothing
    visible) and softmax denominator (sinks included). ``mask [B|1, L]`` additive float32 over the segments'
    positions one after the other (the first ``sum n`` columns read) or None, ``sinks [Hkv * G]`` float32 or
    None."""
    lib = _lib()
    q = q.contiguous()
    b, h, g, _ = q.shape
    segs = _descriptors(q, codes, scales, zeros, index, desc)
    dv = _value_dim(codes, desc)
    out = q.new_empty(b, h, g, dv)
    stats = q.new_empty(b, h, g, 2)
    if mask is not None:
        mask = mask.float().contiguous()
    if sinks is not None:
        sinks = sinks.float().contiguous()
    rc = lib.kvlab_quant_attend(
        q.data_ptr(), out.data_ptr(), b, h, g, segs, len(segs),
        None if mask is None else mask.data_ptr(), 0 if mask is None or mask.shape[0] == 1 else mask.shape[-1],
        None if sinks is None else sinks.data_ptr(), scale, UNDER, torch.get_num_threads(), MIN_PART,
        stats.data_ptr())
    if rc:
        raise ValueError(f"kvlab::quant_attend: arguments refused (q {tuple(q.shape)}, segments {desc}, codes "
                         f"{[tuple(c.shape) for c in codes]})")
    return out, stats


def _value_dim(codes: list[torch.Tensor], desc: list[int]) -> int:
    """The values' channels (``Dv``) of the first segment in ``desc`` (:func:`_quant_attend`)."""
    nk, v_from = desc[1], desc[2]
    at = 4 + 5 * (v_from if v_from >= 0 else nk)
    return codes[desc[at]].shape[-1] * (2 if desc[at + 2] == 1 else 1)


quant_attend = torch.library.custom_op("kvlab::quant_attend", _quant_attend, mutates_args=())


@quant_attend.register_fake
def _(q, codes, scales, zeros, index, mask, sinks, desc, scale):
    return q.new_empty(*q.shape[:-1], _value_dim(codes, desc)), q.new_empty(*q.shape[:-1], 2)


def _quant_scores(q: torch.Tensor, codes: list[torch.Tensor], scales: list[torch.Tensor], zeros: list[torch.Tensor],
                 index: list[torch.Tensor], desc: list[int]) -> torch.Tensor:
    """The raw scores ``q.k`` of ``q [B, Hkv, G, Dq]`` float32 against the keys of the segments in ``desc`` (as
    :func:`_quant_attend`) -> ``[B, Hkv, G, sum n]`` float32."""
    q = q.contiguous()
    segs = _descriptors(q, codes, scales, zeros, index, desc)
    out = q.new_empty(*q.shape[:-1], sum(desc[0::_DESC]))
    if _lib().kvlab_quant_scores(q.data_ptr(), out.data_ptr(), *q.shape[:-1], segs, len(segs)):
        raise ValueError(f"kvlab::quant_scores: arguments refused (q {tuple(q.shape)}, segments {desc}, codes "
                         f"{[tuple(c.shape) for c in codes]})")
    return out


quant_scores = torch.library.custom_op("kvlab::quant_scores", _quant_scores, mutates_args=())


@quant_scores.register_fake
def _(q, codes, scales, zeros, index, desc):
    return q.new_empty(*q.shape[:-1], sum(desc[0::_DESC]))


def scores(qf: torch.Tensor, k) -> torch.Tensor | None:
    """The raw scores ``q.k`` of ``qf [B, Hkv, G, D]`` (float32) against every key of reader ``k`` (a ``QuantView``,
    readers joined along positions: an indexer's keys, kvlab/layers/blocked.py ``scores``) -> ``[B, Hkv, G, L]``
    float32, read from the codes; None where the kernel does not take ``k`` (as :func:`applies`, and no residual
    window)."""
    segs = plan(k, k)
    if segs is None or any(x.rows.residual_slots for seg in segs for x in seg.sources()):
        return None
    codes, scales, zeros, index, desc = _op_args(segs, [seg.n for seg in segs])
    args = (_query(qf, segs[0].keys), codes, scales, zeros, index, desc)
    return quant_scores(*args) if torch.compiler.is_compiling() else _quant_scores(*args)


def takes(cache) -> bool:
    """A decode step over ``cache`` (kvlab/cache/cache.py) attends some buffer with this kernel: on the CPU, not
    made with ``fused=True``, one of its quantized buffers int8 / int4 / fp8 per token (a residual window: not a ring),
    and the kernel loaded (built now if needed). What ``kvlab bench`` reports per row (``cpp_kernel``)."""
    rows = cache.quant_rows()
    ok = [r for r in rows if _readable(r) and not (r.residual_slots and r.ring)
          and r.foldable and not r.fused and r.codes.device.type == "cpu"]
    return bool(ok) and available()


def _op_args(segs: list[_Segment], counts: list[int]) -> tuple[list[torch.Tensor], ...]:
    """The op's ``codes``, ``scales``, ``zeros`` (each buffer once), ``index`` and ``desc`` for segments ``segs`` of
    ``counts`` positions."""
    codes, scales, zeros, index, desc, seen = [], [], [], [], [], {}
    for seg, n in zip(segs, counts, strict=True):
        desc += [n, len(seg.keys), 0 if seg.values is None else -1, -1 if seg.index is None else len(index)]
        if seg.index is not None:
            index.append(seg.index.contiguous())
        for x in seg.sources():
            r = x.rows
            if id(r) not in seen:
                seen[id(r)] = (len(codes), -1 if r.zeros is None else len(zeros))
                codes.append(r.codes)
                scales.append(r.scales)
                if r.zeros is not None:
                    zeros.append(r.zeros)
            i, z = seen[id(r)]
            desc += [i, r.group, _code(r.spec), z, r.span]
        desc += [0] * (5 * (3 - len(seg.sources())))  # the unused source slots (fixed length per segment)
    return codes, scales, zeros, index, desc


def _query(qf: torch.Tensor, keys: list[QuantView]) -> torch.Tensor:
    """``qf [B, Hkv, G, Dq]`` with each key part's channels rotated as its keys were stored (``q.Hk = Hq.k``)."""
    if not any(x.rows.block for x in keys):
        return qf
    parts, at = [], 0
    for x in keys:
        part = qf[..., at:at + x.rows.dq]
        parts.append(rotate(part, x.rows.block) if x.rows.block else part)
        at += x.rows.dq
    return torch.cat(parts, -1)


def attend(qf: torch.Tensor, k, v, mask: torch.Tensor | None, scale: float, sinks: torch.Tensor | None,
           segs: list[_Segment] | None = None) -> torch.Tensor:
    """``qf [B, Hkv, G, Dq]`` float32 over readers ``k``, ``v`` (:func:`applies`) -> ``[B, Hkv, G, Dv]`` float32.
    ``mask [B|1, 1, 1, n]`` additive or None; ``sinks [1, Hkv, G, 1]`` float32 or None. A residual window's exact
    positions (``p0..n-1``, one segment) are attended here in float32 and merged with the kernel's part (its maximum
    and denominator rescaled, as two flash-decoding parts). ``segs``: :func:`plan` of ``k``, ``v`` if known."""
    segs = segs or _plan(k, v)
    counts = [seg.n if seg.index is not None else min(_quantized(x) for x in seg.sources()) for seg in segs]
    n = sum(seg.n for seg in segs)
    if mask is not None:
        mask = mask.reshape(mask.shape[0], n)
    if sinks is not None:
        sinks = sinks.reshape(-1)
    codes, scales, zeros, index, desc = _op_args(segs, counts)
    args = (_query(qf, segs[0].keys), codes, scales, zeros, index, mask, sinks, desc, float(scale))
    # traced: the custom op (one opaque node); eager: the function itself (no dispatcher overhead per call)
    out, stats = quant_attend(*args) if torch.compiler.is_compiling() else _quant_attend(*args)
    if sum(counts) == n:
        return out
    return _with_residual(qf, segs[0], mask, scale, counts[0], n, out, stats)  # one segment (:func:`_plan`)


class Bound:
    """Segments of K = V positions bound once to their buffers (kvlab/cache/quant.py ``QuantRows`` of one head: lead
    ``[B, 1]`` or ``[B]``; int8 / int4 codes with per-token scales, no residual window, no rotation): the kernel's
    descriptors are built once and reused while every buffer holds the same tensors (a resize replaces them:
    :meth:`current`); a call sets only the position counts and a top-k's slots. What an eager decode step of
    DeepSeek V4's CSA/HCA/SWA layers calls (kvlab/layers/compressed.py) instead of :func:`plan` and the descriptors
    per layer and step (~50 us of Python a call, against the kernel's ~16 us over 128 positions)."""

    def __init__(self, rows: tuple[QuantRows, ...]) -> None:
        self.rows = rows
        self.held = [(r.codes, r.scales, r.zeros) for r in rows]
        self.segs = (_Seg * len(rows))()
        for seg, r in zip(self.segs, rows, strict=True):
            seg.nk, seg.v_from = 1, 0
            src = seg.k[0]
            src.codes, src.scales = r.codes.data_ptr(), r.scales.data_ptr()
            src.zeros = None if r.zeros is None else r.zeros.data_ptr()
            code = _code(r.spec)
            src.cap, src.dim, src.int4, src.group = r.capacity, r.dq, int(code == 1), r.group
            src.lut = _fp8_table(code).data_ptr() if code >= 2 else None
            src.kind, src.span = _SCALE_KIND[r.scales.dtype], 1

    def __deepcopy__(self, memo: dict) -> None:
        """A copied cache binds its own buffers: the copy of a :class:`Bound` is None (``bound`` then builds one on the
        copy's first call); its descriptors point into the original's memory (and ctypes pointers do not pickle)."""

    def current(self) -> bool:
        """Every buffer still holds the tensors the descriptors point into."""
        return all(r.codes is c and r.scales is s and r.zeros is z
                   for r, (c, s, z) in zip(self.rows, self.held, strict=True))

    def _set(self, counts: tuple[int, ...], index: torch.Tensor | None) -> None:
        """Positions per segment ``counts``; the last segment read through slots ``index [B, n]`` (int64,
        contiguous) or straight (None)."""
        for seg, n in zip(self.segs, counts, strict=True):
            seg.n, seg.index = n, None
        if index is not None:
            self.segs[len(counts) - 1].index = index.data_ptr()

    def attend(self, q: torch.Tensor, counts: tuple[int, ...], index: torch.Tensor | None, sinks: torch.Tensor | None,
               scale: float) -> torch.Tensor:
        """``q [B, 1, G, D]`` float32 (contiguous) over ``counts`` positions of each segment (K = V; the last through
        ``index``), one softmax over all, ``sinks [G]`` float32 (contiguous) or None -> ``[B, 1, G, D]`` float32."""
        self._set(counts, index)
        b, h, g, _ = q.shape
        out = torch.empty(b, h, g, self.rows[0].dq)
        if _lib().kvlab_quant_attend(q.data_ptr(), out.data_ptr(), b, h, g, self.segs, len(counts), None, 0,
                                     None if sinks is None else sinks.data_ptr(), scale, UNDER,
                                     torch.get_num_threads(), MIN_PART, None):
            raise ValueError(f"kvlab quant_attend: arguments refused (q {tuple(q.shape)}, counts {counts})")
        return out

    def index_topk(self, q: torch.Tensor, n: int, weights: torch.Tensor, scale: float, k: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """An indexer's choice (DeepSeek V4's CSA) among the first ``n`` keys of the one bound buffer: the weighted
        scores ``sum_g weights[b, g] * relu(scale * q[b, 0, g] . k[b, l])`` of ``q [B, 1, G, D]`` float32 and
        ``weights [B, G]`` float32 (both contiguous), ``[B, n]`` float32, and each row's ``k`` best of them (``0 < k <
        n``) in index order, ties to the earlier (kvlab/layers/core.py ``stable_topk``'s indices), ``[B, k]`` int64."""
        self._set((n,), None)
        b, h, g, _ = q.shape
        out = torch.empty(b, n)
        idx = torch.empty(b, k, dtype=torch.int64)
        if _lib().kvlab_quant_index_scores(q.data_ptr(), out.data_ptr(), b, h, g, self.segs, 1, weights.data_ptr(),
                                           scale, k, idx.data_ptr()):
            raise ValueError(f"kvlab quant_index_scores: arguments refused (q {tuple(q.shape)}, n {n}, k {k})")
        return out, idx


    def v4_step(self, q: torch.Tensor, counts: tuple[int, ...], cos: torch.Tensor | None, sin: torch.Tensor | None,
                index: Bound | None, iq: torch.Tensor | None, iw: torch.Tensor | None, wscale: float, topk: int,
                sinks: torch.Tensor | None, eps: float, scale: float) -> torch.Tensor:
        """One eager decode step of DeepSeek V4's CSA / HCA / SWA attention over the bound buffers (the window ring,
        then the compressed entries), every key visible, as one C++ call (``kvlab_quant_v4_step``): ``q [B, 1, H
        D]`` (the query heads before their weightless norm and rotation; float32, contiguous) normed and rotated
        (``cos`` / ``sin [.., R]``: the trailing ``2 R`` channels, interleaved pairs; None: none); CSA (``index``:
        the indexer keys' :class:`Bound`): ``iq [B, 1, HI dI]`` rotated, its scores weighted by ``iw [B, 1, HI]``
        times ``wscale`` and the ``topk`` best entries read through their slots (all when they are no more);
        softmax with ``sinks [H]`` (float32, contiguous, or None) over the ring and the entries; the output rotated
        back -> ``[B, 1, H, D]`` float32."""
        self._set(counts, None)
        b, d = q.shape[0], self.rows[0].dq
        h = q.shape[-1] // d
        out = torch.empty(b, 1, h, d)
        r = 0 if cos is None else cos.shape[-1]
        hi = di = 0
        idx = None
        if index is not None:
            index._set((counts[-1],), None)
            hi, di = iw.shape[-1], iq.shape[-1] // iw.shape[-1]
            idx = torch.empty(b, topk, dtype=torch.int64)
        if _lib().kvlab_quant_v4_step(
                q.data_ptr(), b, h, d, eps, None if cos is None else cos.data_ptr(),
                None if sin is None else sin.data_ptr(), r, self.segs, len(counts),
                None if index is None else iq.data_ptr(), hi, di, None if index is None else iw.data_ptr(), wscale,
                None if index is None else index.segs, topk, None if idx is None else idx.data_ptr(),
                None if sinks is None else sinks.data_ptr(), scale, UNDER, torch.get_num_threads(), MIN_PART,
                out.data_ptr()):
            raise ValueError(f"kvlab quant_v4_step: arguments refused (q {tuple(q.shape)}, counts {counts}, "
                             f"{r} rotated pairs, index heads {hi} x {di}, top-k {topk})")
        return out


def _bound_ok(r: QuantRows, b: int) -> bool:
    """A buffer :class:`Bound` reads: int8 / int4 per-token codes of one head of ``b`` rows on the CPU, contiguous,
    no residual window, no rotation, not of a cache made with ``fused=True``."""
    return (_readable(r) and r.foldable and not r.fused and not r.residual_slots and not r.block
            and r.codes.device.type == "cpu" and r.scales.dtype in _SCALE_KIND and r.codes.is_contiguous()
            and r.scales.is_contiguous() and (r.zeros is None or r.zeros.is_contiguous())
            and r.codes.shape[0] == b and r.codes[0].numel() == r.codes.shape[-2] * r.codes.shape[-1])


def bound(rows: tuple[QuantRows, ...], b: int) -> Bound | None:
    """The :class:`Bound` of buffers ``rows`` for a batch of ``b`` (kept on the first buffer, ``QuantRows.bound``,
    rebuilt when a buffer was resized), or None where the kernel does not take them (off, not loaded, a cache made
    with ``fused=True`` or ``fused.ENABLED``, a buffer :func:`_bound_ok` refuses). Eager calls only."""
    if not ENABLED or fused.ENABLED or (KERNEL.lib is None and library() is None):
        return None
    memo = rows[0].bound
    hit = memo.get((rows, b))
    if hit is None or (hit and not hit.current()):
        hit = memo[(rows, b)] = Bound(rows) if all(_bound_ok(r, b) for r in rows) else False
    return hit or None


def _with_residual(qf: torch.Tensor, seg: _Segment, mask: torch.Tensor | None, scale: float,
                   p0: int, n: int, out: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """The kernel's output over positions ``0..p0-1`` (``out``, ``stats``: maximum, denominator) merged with positions
    ``p0..n-1`` read as blocks (float32 ``[B, Hkv, T, D]``, kvlab/cache/quant.py ``QuantView.block``: a residual
    window's positions exact, any other -- KIVI keys' partial group before values' codes -- dequantized; keys
    rotated back) of the buffers of the one segment ``seg``."""
    keys, v = seg.keys, seg.values
    parts = [x.block(p0, n, i) for i, x in enumerate(keys)]  # each in its own scratch slot
    kt = torch.cat(parts, -1) if len(parts) > 1 else parts[0]
    vt = kt[..., :keys[0].dim] if v is None else v.block(p0, n, 2)
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


__all__ = ["ENABLED", "KERNEL", "Bound", "KernelBuildError", "applies", "attend", "available", "bound", "build", "cache_dir",
           "library", "plan",
           "quant_attend", "quant_scores", "scores", "takes"]
