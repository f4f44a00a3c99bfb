"""Quantized per-position buffers: the :class:`~kvlab.cache.storage.Rows` interface over codes, scales and a
full-precision residual, so every store (full, window ring, MLA latent, CCA, CSA/HCA entries) holds quantized K/V
without knowing it, and every layer reads dequantized keys and values.

Layout (kvlab/costs/quant.py prices it byte for byte) of a buffer of ``C`` slots x ``D`` channels:
``codes [*lead, C, Dq * bits / 8]`` (int8 / uint8 / float8; int4 and fp4 packed two per byte, low nibble first),
``scales`` (and ``zeros`` when asymmetric) ``[*lead, C, Dq / group]`` per token or ``[*lead, ceil(C / G), Dq]``
per channel (KIVI keys: groups of ``G`` positions), ``residual [*lead, S, Dq]`` exact values of the positions not
yet quantized (the last ``R`` and the incomplete group; slot = position % S), ``tail [*lead, C, D - Dq]`` exact
rotary channels (``rope_exact``). Position ``p`` of ``n`` written is held quantized iff
``p < floor(max(0, n - R) / span) * span``; it is quantized once, when it leaves the residual. ``read``
dequantizes every slot and lays the residual over its positions; a decode step instead gets a :class:`QuantView`
that attention (kvlab/layers/blocked.py) reads block by block -- :data:`DECODE_BLOCK_BYTES` of float32 at a time in
one scratch buffer shared by all layers -- so the whole dequantized K/V never exists.
"""

from __future__ import annotations

import functools

import torch

from kvlab.costs.quant import QuantSpec, layout
from kvlab.kinds import Buffer

from . import quant_kernel
from .growth import grown

_QMAX = {"fp8": 448.0, "fp8_e5m2": 57344.0, "fp4": 6.0}
_FP8 = {"fp8": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
_FP4 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # e2m1 magnitudes
# storage dtype of scales; e8m0 (a power-of-two scale's 8-bit exponent, torch.float8_e8m0fnu) kept as its bytes
_SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "e8m0": torch.uint8}


def scale_values(s: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Stored scales (or zero points) -> float32 (e8m0: the bytes read as ``torch.float8_e8m0fnu``, 2^(e - 127))."""
    return s.view(torch.float8_e8m0fnu).float() if spec.scale_dtype == "e8m0" else s.float()


@functools.lru_cache(maxsize=16)
def hadamard(n: int, device: str = "cpu") -> torch.Tensor:
    """The normalised Sylvester Hadamard matrix ``[n, n]`` (n a power of two): symmetric and orthogonal, H H = I."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return (h / n ** 0.5).to(device)


@functools.lru_cache(maxsize=16)
def _fp4_table(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The e2m1 magnitudes ``[8]`` and the midpoints between them ``[7]`` on ``device``, built once per device (a
    ``torch.tensor`` per call would copy from the host, a synchronisation on a GPU)."""
    mags = torch.tensor(_FP4)
    return mags.to(device), ((mags[1:] + mags[:-1]) / 2).to(device)


def rotate(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x [..., D]`` times the block-diagonal Hadamard of ``block`` (its own inverse)."""
    d = x.shape[-1]
    return (x.reshape(*x.shape[:-1], d // block, block) @ hadamard(block, str(x.device))).reshape(x.shape)


def pack4(c: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``[..., 2n]`` in 0..15 -> ``[..., n]`` bytes (even channel low nibble, odd high)."""
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack4(p: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack4`: bytes ``[..., n]`` -> codes ``[..., 2n]``."""
    return torch.stack((p & 15, p >> 4), dim=-1).flatten(-2)


def quantize(x: torch.Tensor, spec: QuantSpec, axis: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize ``x`` (float32) with one scale per slice along ``axis`` (the group axis, kept with size 1).

    Returns ``(codes, scale, zero)`` (codes unpacked, same shape as ``x``: int8 / uint8 / float8; scale and zero
    in the spec's scale dtype, ``axis`` squeezed; zero None when symmetric)."""
    sd = _SCALE_DTYPES[spec.scale_dtype]
    if spec.kind == "int" and not spec.symmetric:
        lo, hi = x.amin(axis, keepdim=True), x.amax(axis, keepdim=True)
        top = 2 ** spec.bits - 1
        s = ((hi - lo) / top).to(sd)
        z = lo.to(sd)
        inv = torch.where(s.float() > 0, 1 / s.float(), 0)
        c = torch.round((x - z.float()) * inv).clamp_(0, top).to(torch.uint8)
        return c, s.squeeze(axis), z.squeeze(axis)
    amax = x.abs().amax(axis, keepdim=True)
    qmax = _QMAX.get(spec.fmt, 2 ** (spec.bits - 1) - 1)
    if spec.scale_dtype == "e8m0":  # the power of two at or above absmax / max (no value clips); 2^-127 for zeros
        sf = torch.exp2(torch.ceil(torch.log2((amax / qmax).clamp_(min=2.0 ** -127))))
        s, inv = sf.to(torch.float8_e8m0fnu).view(torch.uint8), 1 / sf
    else:
        s = (amax / qmax).to(sd)
        inv = torch.where(s.float() > 0, 1 / s.float(), 0)
    y = x * inv
    if spec.fmt in _FP8:
        c = y.clamp_(-qmax, qmax).to(_FP8[spec.fmt])
    elif spec.fmt == "fp4":
        mids = _fp4_table(str(x.device))[1]
        mag = torch.bucketize(y.abs().clamp_(max=6.0).contiguous(), mids).to(torch.uint8)
        c = mag | ((y < 0).to(torch.uint8) << 3)
    elif spec.bits == 4:
        c = (torch.round(y).clamp_(-8, 7) + 8).to(torch.uint8)
    else:
        c = torch.round(y).clamp_(-128, 127).to(torch.int8)
    return c, s.squeeze(axis), None


def code_values(c: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Codes (unpacked) -> the float32 values they stand for, before scaling."""
    if spec.fmt == "fp4":
        v = _fp4_table(str(c.device))[0][(c & 7).long()]
        return torch.where(c >= 8, -v, v)
    if spec.bits == 4 and spec.symmetric:
        return c.float() - 8
    return c.float()


def dequantize(c: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, spec: QuantSpec, axis: int) -> torch.Tensor:
    """Codes (unpacked) and their scales (``axis`` squeezed) -> float32 values."""
    v = code_values(c, spec) * scale_values(s, spec).unsqueeze(axis)
    return v if z is None else v + z.float().unsqueeze(axis)


def spec_is_fp8(spec: QuantSpec) -> bool:
    return spec.fmt in _FP8


class QuantRows:
    """A quantized per-position buffer with the :class:`~kvlab.cache.storage.Rows` interface (see the module).

    ``buf`` describes it (channels, ring, keys, rotary tail; kvlab.kinds.Buffer), ``spec`` how it is
    quantized, ``lead`` its leading shape (``[B, Hkv]``); ``max_length`` known: the residual holds at most that
    many slots (it never needs more).
    """

    def __init__(self, buf: Buffer, spec: QuantSpec, lead: tuple[int, ...], dtype: torch.dtype, device,
                 max_length: int | None = None) -> None:
        lay = layout(spec, buf)
        self.spec, self.dtype, self.ring = spec, dtype, buf.ring is not None
        self.dq, self.group, self.span, self.tail_dim = lay["dq"], lay["group"], lay["span"], lay["tail"]
        self.residual_slots = min(lay["slots"], max_length) if max_length else lay["slots"]
        self.block = self.dq & -self.dq if spec.rotate and buf.key else 0  # largest power of two dividing dq
        self.n = 0  # positions written (whole-batch writes)
        self.fused = False  # attend its codes with kvlab/layers/fused.py (a cache made with fused=True)
        self.bound: dict = {}  # the C++ kernel's descriptors bound to this buffer (and others): kvlab/layers/cpu_attend.py
        sd = _SCALE_DTYPES[spec.scale_dtype]
        code_dim = self.dq * spec.bits // 8
        code_dtype = torch.int8 if spec.fmt == "int8" and spec.symmetric else torch.uint8  # fp8: its bytes
        self.codes = torch.zeros(*lead, 0, code_dim, dtype=code_dtype, device=device)
        per = self.dq if self.span > 1 else self.dq // self.group
        self.scales = torch.zeros(*lead, 0, per, dtype=sd, device=device)
        self.zeros = None if spec.symmetric else torch.zeros(*lead, 0, per, dtype=sd, device=device)
        self.res = torch.zeros(*lead, self.residual_slots, self.dq, dtype=dtype, device=device)
        self.tail = torch.zeros(*lead, 0, self.tail_dim, dtype=dtype, device=device)

    @property
    def capacity(self) -> int:
        return self.codes.shape[-2]

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.codes, self.scales, self.zeros, self.res, self.tail) if t is not None]

    def resize(self, capacity: int, keep: int) -> None:
        def grow(t: torch.Tensor, cap: int, kept: int) -> torch.Tensor:
            old = t.shape[-2]
            out = grown(t, -2, cap, min(kept, old))
            if cap > old:
                out.narrow(-2, old, cap - old).zero_()
            return out

        groups = -(-capacity // self.span)
        self.codes = grow(self.codes, capacity, keep)
        self.scales = grow(self.scales, groups if self.span > 1 else capacity, -(-keep // self.span))
        if self.zeros is not None:
            self.zeros = grow(self.zeros, self.scales.shape[-2], -(-keep // self.span))
        self.tail = grow(self.tail, capacity, keep)

    # -- writing ---------------------------------------------------------------------------------------------
    def quantized_end(self, n: int) -> int:
        """Positions ``< quantized_end(n)`` are held quantized once ``n`` positions were written."""
        return max(0, n - self.spec.residual) // self.span * self.span

    def _slots(self, p0: int, p1: int, device, mod: int | None = None) -> torch.Tensor:
        r = torch.arange(p0, p1, device=device)
        return r % mod if mod else r

    def _put(self, t: torch.Tensor, p0: int, x: torch.Tensor, rows: slice | None, mod: int) -> None:
        """Write ``x [*lead, m, *]`` at slots ``p0..`` (mod ``mod`` in a ring) of ``t``."""
        t = t if rows is None else t[rows]
        m = x.shape[-2]
        if not self.ring:
            t.narrow(-2, p0, m).copy_(x)
        else:
            t.index_copy_(t.dim() - 2, self._slots(p0, p0 + m, x.device, mod), x)

    def _store_codes(self, lo: int, live: int, x: torch.Tensor, rows: slice | None) -> None:
        """Quantize positions ``lo..lo+m-1`` (``x [*lead, m, dq]``, exact) and write those from ``live`` on."""
        x = x.float()
        if self.block:
            x = rotate(x, self.block)
        m = x.shape[-2]
        if self.span > 1:  # keys per channel: groups of span positions, one scale per channel
            g = x.reshape(*x.shape[:-2], m // self.span, self.span, self.dq)
            c, s, z = quantize(g, self.spec, -2)
            c = c.reshape(x.shape)
            first = lo // self.span
            groups = -(-self.capacity // self.span)
            self._put(self.scales, first, s, rows, groups)
            if z is not None:
                self._put(self.zeros, first, z, rows, groups)
        elif rows is None and quant_kernel.takes(self.spec.fmt, x, self.codes, self.scales, self.zeros):
            # one C++ call: quantized and written at the slots (the same bytes as below)
            quant_kernel.quantize_into(x if live == lo else x[..., live - lo:, :], self.codes, self.scales,
                                       self.zeros, self.group, self.spec.bits, live, self.ring, self.spec.fmt)
            return
        else:
            g = x.reshape(*x.shape[:-1], self.dq // self.group, self.group)
            c, s, z = quantize(g, self.spec, -1)
            c = c.reshape(x.shape)
            s, z = s[..., live - lo:, :], None if z is None else z[..., live - lo:, :]
            self._put(self.scales, live, s, rows, self.capacity)
            if z is not None:
                self._put(self.zeros, live, z, rows, self.capacity)
        c = c[..., live - lo:, :]
        c = c.view(torch.uint8) if spec_is_fp8(self.spec) else c
        self._put(self.codes, live, pack4(c) if self.spec.bits == 4 else c, rows, self.capacity)

    def write(self, start: int, x: torch.Tensor, rows: slice | None = None) -> None:
        """Store ``x [*lead, T, D]`` at positions ``start..``: its rotary tail exactly, the rest quantized as each
        position leaves the residual (at once without one)."""
        t, cap = x.shape[-2], self.capacity
        end = start + t
        live = max(start, end - cap) if self.ring else start
        if not (self.tail_dim or self.residual_slots):  # every position quantized at once (a decode step's write)
            self._store_codes(live, live, x if live == start else x[..., live - start:, :], rows)
            self.n = end
            return
        if self.tail_dim:
            self._put(self.tail, live, x[..., live - start:, self.dq:], rows, cap)
        xq = x[..., :self.dq]
        if not self.residual_slots:
            self._store_codes(live, live, xq[..., live - start:, :], rows)
            self.n = end
            return
        if rows is not None:
            raise ValueError("a buffer with a residual window is written for the whole batch at once")
        q_old, q_new = self.quantized_end(start), self.quantized_end(end)
        held = self.res.index_select(-2, self._slots(q_old, start, x.device, self.residual_slots))
        full = torch.cat((held, xq.to(self.dtype)), dim=-2)  # exact values of positions q_old..end-1
        lo = max(q_old, (end - cap) // self.span * self.span) if self.ring else q_old
        if q_new > lo:
            self._store_codes(lo, max(lo, end - cap) if self.ring else lo, full[..., lo - q_old:q_new - q_old, :], None)
        keep = full[..., q_new - q_old:, :]
        self.res.index_copy_(self.res.dim() - 2, self._slots(q_new, end, x.device, self.residual_slots), keep)
        self.n = end

    def write_rows(self, at: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> None:
        """Store ``x [B, 1, D]`` at slot ``at[b]`` of each row ``b`` where ``mask [B]`` holds, quantized at once (a
        buffer of lead ``[B]`` without a residual window, not a ring: CSA/HCA entries a decode step completes on
        some rows). Masked writes, no branch and no host read, so a decode step compiles as one graph."""
        new = self._row_codes(x, "write_rows")
        rows = torch.arange(x.shape[0], device=x.device)
        slot = at.clamp(0, max(self.capacity - 1, 0))
        for t, v in zip((self.codes, self.scales, self.zeros, self.tail), new, strict=True):
            if t is not None and t.shape[-1]:
                t[rows, slot] = torch.where(mask[:, None], v[:, 0].to(t.dtype), t[rows, slot])

    def write_at(self, rows: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> None:
        """Store ``x [K, D]`` at slot ``slots[k]`` of row ``rows[k]`` (distinct pairs), quantized at once, as
        :meth:`write_rows` (CSA/HCA entries of a left-padded prefill, each row at its own blocks)."""
        for t, v in zip((self.codes, self.scales, self.zeros, self.tail), self._row_codes(x, "write_at"), strict=True):
            if t is not None and t.shape[-1]:
                t[rows, slots] = v.to(t.dtype)

    def _row_codes(self, x: torch.Tensor, what: str) -> list[torch.Tensor | None]:
        """``x [..., D]`` quantized per position: codes, scales, zero points (or None), rotary tail."""
        if self.residual_slots or self.ring or self.codes.dim() != 3:
            raise ValueError(f"{what}: a per-row write needs a buffer of lead [B] without residual window or ring")
        xq = x[..., :self.dq].float()
        if self.block:
            xq = rotate(xq, self.block)
        c, s, z = quantize(xq.reshape(*xq.shape[:-1], self.dq // self.group, self.group), self.spec, -1)
        c = c.reshape(xq.shape)
        c = c.view(torch.uint8) if spec_is_fp8(self.spec) else c
        return [pack4(c) if self.spec.bits == 4 else c, s, z, x[..., self.dq:]]

    # -- reading ---------------------------------------------------------------------------------------------
    def read(self, n: int | None = None, rows: slice | None = None) -> torch.Tensor:
        """Slots ``0..n-1`` dequantized ``[*lead, n, D]`` in the cache dtype (the residual's positions exact)."""
        n = self.capacity if n is None else n
        lead = self.codes.shape[:-2] if rows is None else self.codes[rows].shape[:-2]
        out = torch.empty(*lead, n, self.dq + self.tail_dim, dtype=torch.float32, device=self.codes.device)
        return self.read_block(0, n, out, rows, self.n).to(self.dtype)

    def read_block(self, lo: int, hi: int, out: torch.Tensor, rows: slice | None = None,
                   written: int | None = None) -> torch.Tensor:
        """Slots ``lo..hi-1`` dequantized into ``out [*lead, hi - lo, D]`` (float32; returned): codes times scales
        (plus zero points; rotated back), the residual's positions (of ``written``, default all written) laid over
        exactly, the rotary tail copied. Only these slots are read: a decode step walks the buffer block by block
        (:class:`QuantView`) instead of dequantizing all of it."""
        m, dq = hi - lo, self.dq
        q = out[..., :dq]
        self._codes_into(lo, hi, q, rows)
        if self.span > 1:  # one scale per channel for each group of span positions
            g0, g1 = lo // self.span, -(-hi // self.span)
            a = lo - g0 * self.span

            def per_position(t):
                t = t if rows is None else t[rows]
                return scale_values(t.narrow(-2, g0, g1 - g0), self.spec).repeat_interleave(self.span, -2).narrow(
                    -2, a, m)

            q.mul_(per_position(self.scales))
            if self.zeros is not None:
                q.add_(per_position(self.zeros))
        else:
            s, z = self._token_scales(lo, hi, rows)
            qg = q.view(*q.shape[:-1], dq // self.group, self.group)
            qg.mul_(s.unsqueeze(-1))
            if z is not None:
                qg.add_(z.unsqueeze(-1))
        if self.block:
            q.copy_(rotate(q, self.block))
        for x0, x1, vals in self._residual(lo, hi, rows, written):
            q.narrow(-2, x0, x1 - x0).copy_(vals)
        if self.tail_dim:
            t = self.tail if rows is None else self.tail[rows]
            out[..., dq:].copy_(t.narrow(-2, lo, m))
        return out

    @property
    def foldable(self) -> bool:
        """Scales one per token and group of channels, no exact tail: attention may apply them to the query and the
        probabilities instead of the codes (:meth:`raw_block`)."""
        return self.span == 1 and not self.tail_dim

    def raw_block(self, lo: int, hi: int, out: torch.Tensor, written: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Slots ``lo..hi-1`` (a :attr:`foldable` buffer) as ``(codes, scales, zeros)``: the code values cast into
        ``out [*lead, m, Dq]`` (float32), their scales and zero points ``[*lead, m, Dq / group]`` (float32; zeros None
        when there are none), value = code * scale + zero per group of channels (rotated keys: in the rotated
        basis, so the query is rotated instead). The residual's positions hold their exact values (rotated) with
        scale 1 and zero 0. Saves the pass that multiplies every code by its scale."""
        self._codes_into(lo, hi, out, None, shift=False)
        s, z = self._token_scales(lo, hi, None)
        if self.spec.fmt == "int4" and self.spec.symmetric:  # codes stored + 8: value = (c - 8) s = c s - 8 s
            z = s * -8.0 if z is None else z - 8 * s
        for x0, x1, vals in self._residual(lo, hi, None, written):
            out.narrow(-2, x0, x1 - x0).copy_(rotate(vals.float(), self.block) if self.block else vals)
            s.narrow(-2, x0, x1 - x0).fill_(1)
            if z is not None:
                z.narrow(-2, x0, x1 - x0).zero_()
        return out, s, z

    def gather(self, idx: torch.Tensor, written: int | None = None) -> torch.Tensor:
        """The slots ``idx [B, k]`` of each row (a buffer of lead ``[B]``, not a ring) dequantized, ``[B, k, D]`` in
        the cache dtype: only those rows' codes and scales are read (a top-k choice: DSA's latents, CSA's entries),
        the residual's positions (of ``written``) exact. Tensor operations only."""
        if self.ring or self.codes.dim() != 3:
            raise ValueError("gather: a buffer of lead [B] that is not a ring")
        b, k = idx.shape

        def pick(t, at):
            return t.gather(1, at[..., None].expand(b, k, t.shape[-1]))

        spec, dq = self.spec, self.dq
        c = pick(self.codes, idx)
        c = unpack4(c) if spec.bits == 4 else c.view(_FP8[spec.fmt]) if spec_is_fp8(spec) else c
        v = code_values(c, spec)
        if self.span > 1:  # one scale per channel for each group of span positions
            g = torch.div(idx, self.span, rounding_mode="floor")
            v = v * scale_values(pick(self.scales, g), spec)
            if self.zeros is not None:
                v = v + pick(self.zeros, g).float()
        else:
            vg = v.view(b, k, dq // self.group, self.group) * scale_values(pick(self.scales, idx), spec)[..., None]
            if self.zeros is not None:
                vg = vg + pick(self.zeros, idx).float()[..., None]
            v = vg.view(b, k, dq)
        if self.block:
            v = rotate(v, self.block)
        n = self.n if written is None else written
        if self.residual_slots and n:
            p0 = self.quantized_end(n)
            exact = pick(self.res, idx.remainder(self.residual_slots)).float()
            v = torch.where((idx >= p0)[..., None], exact, v)
        if self.tail_dim:
            v = torch.cat((v, pick(self.tail, idx).float()), dim=-1)
        return v.to(self.dtype)

    def _codes_into(self, lo: int, hi: int, q: torch.Tensor, rows: slice | None, shift: bool = True) -> None:
        """The code values of slots ``lo..hi-1`` cast into ``q [*lead, m, Dq]`` (int4 symmetric codes less 8 when
        ``shift``)."""
        spec = self.spec
        c = (self.codes if rows is None else self.codes[rows]).narrow(-2, lo, hi - lo)
        if spec.fmt == "int4":  # each nibble cast straight into its channel (low nibble = even channel)
            pairs = q.view(*q.shape[:-1], q.shape[-1] // 2, 2)
            pairs.select(-1, 0).copy_(c & 15)
            pairs.select(-1, 1).copy_(c >> 4)
        else:
            c = unpack4(c) if spec.bits == 4 else c.view(_FP8[spec.fmt]) if spec_is_fp8(spec) else c
            q.copy_(code_values(c, spec) if spec.fmt == "fp4" else c)  # int8 / uint8 / float8 codes cast in the copy
        if shift and spec.fmt == "int4" and spec.symmetric:
            q.sub_(8)

    def _token_scales(self, lo: int, hi: int, rows: slice | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scales and zero points (None) of slots ``lo..hi-1``, float32 ``[*lead, m, Dq / group]`` (fresh tensors)."""
        def sl(t):
            t = (t if rows is None else t[rows]).narrow(-2, lo, hi - lo)
            return scale_values(t, self.spec) if self.spec.scale_dtype == "e8m0" else t.to(torch.float32, copy=True)

        return sl(self.scales), None if self.zeros is None else sl(self.zeros)

    def _residual(self, lo: int, hi: int, rows: slice | None, written: int | None):
        """``(x0, x1, values)``: the residual's exact values ``[*lead, x1 - x0, Dq]`` of block slots ``lo + x0..lo + x1 - 1``
        (positions of ``written``, default all written)."""
        n = self.n if written is None else written
        if not (self.residual_slots and n):
            return
        cap = self.capacity
        p0 = max(self.quantized_end(n), n - cap)
        for a, b in self._runs(p0, n, cap):  # positions a..b-1 sit in slots a % cap.. (contiguous)
            sa = a % cap if self.ring else a
            x0, x1 = max(lo, sa), min(hi, sa + b - a)
            if x1 > x0:
                p = a + x0 - sa
                vals = self.res.index_select(-2, self._slots(p, p + x1 - x0, self.res.device, self.residual_slots))
                yield x0 - lo, x1 - lo, vals if rows is None else vals[rows]

    def _runs(self, p0: int, p1: int, cap: int) -> list[tuple[int, int]]:
        """Positions ``p0..p1-1`` split where a ring's slots wrap around (at most two runs of contiguous slots)."""
        if not self.ring or p1 - p0 <= 0:
            return [(p0, p1)]
        wrap = (p0 // cap + 1) * cap
        return [(p0, min(p1, wrap))] + ([(wrap, p1)] if p1 > wrap else [])

    def view(self, n: int, heads: bool = False) -> QuantView | torch.Tensor:
        """Slots ``0..n-1`` for a decode step's blocked attention (nothing dequantized yet); ``heads``: a buffer of
        lead ``[B]`` read as ``[B, 1, n, D]`` (one shared head: MLA's latent, CSA/HCA entries). With
        :data:`DECODE_BLOCK_BYTES` 0, dequantized whole (as :meth:`read`)."""
        if DECODE_BLOCK_BYTES:
            return QuantView(self, n, heads)
        t = self.read(n)
        return t[:, None] if heads else t


DECODE_BLOCK_BYTES = 4 << 20  # float32 bytes of one dequantized block in a decode step; 0: dequantize whole buffers
_SCRATCH: dict[tuple[torch.device, int], torch.Tensor] = {}


def scratch(numel: int, device, slot: int = 0) -> torch.Tensor:
    """A float32 buffer of at least ``numel`` values, shared by every layer and step (grown on demand; a compiled
    step allocates its own; one per inference mode, as an inference tensor cannot be written outside it; ``slot``:
    another buffer, for blocks of two readers alive at once)."""
    device = torch.device(device)
    if torch.compiler.is_compiling():
        return torch.empty(numel, dtype=torch.float32, device=device)
    key = (device, int(torch.is_inference_mode_enabled()), slot)
    t = _SCRATCH.get(key)
    if t is None or t.numel() < numel:
        t = _SCRATCH[key] = torch.empty(numel, dtype=torch.float32, device=device)
    return t[:numel]


class QuantView:
    """Slots ``0..n-1`` of a :class:`QuantRows` (``[*lead, n, D]``, ``lead = [B, Hkv]``; ``heads``: a buffer of lead
    ``[B]`` read as ``[B, 1, n, D]``) as a decode step's attention reads them: :meth:`block` dequantizes a block of
    slots into a reused float32 scratch buffer, so the whole dequantized buffer never exists
    (kvlab/layers/blocked.py attends block by block); :meth:`gather` dequantizes chosen slots only (a top-k);
    :meth:`dense` is the whole buffer, for a caller that needs a tensor."""

    def __init__(self, rows: QuantRows, n: int, heads: bool = False) -> None:
        self.rows, self.n, self.heads = rows, n, heads
        self.lead = tuple(rows.codes.shape[:-2])
        self.dim = rows.dq + rows.tail_dim
        self.written = rows.n  # the residual's positions as of this step (a later write changes the buffer)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.lead[0], 1, *self.lead[1:], self.n, self.dim) if self.heads else (*self.lead, self.n, self.dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.rows.dtype

    def with_heads(self) -> QuantView:
        """The same slots read as ``[B, 1, n, D]`` (a buffer of lead ``[B]``)."""
        return self if self.heads else QuantView(self.rows, self.n, True)

    def _out(self, t: torch.Tensor) -> torch.Tensor:
        return t.unsqueeze(1) if self.heads else t

    def block_size(self) -> int:
        """Slots per block: :data:`DECODE_BLOCK_BYTES` of float32, a multiple of the scale group's span."""
        per = 4 * self.dim * max(1, int(torch.Size(self.lead).numel()))
        span = self.rows.span
        return max(span, DECODE_BLOCK_BYTES // per // span * span)

    def block(self, lo: int, hi: int, slot: int = 0) -> torch.Tensor:
        """Slots ``lo..hi-1`` dequantized, float32 ``[*lead, hi - lo, D]``: a view of the shared scratch (``slot``),
        valid until the next block is read into it."""
        out = scratch(int(torch.Size(self.lead).numel()) * (hi - lo) * self.dim, self.rows.codes.device, slot)
        return self._out(self.rows.read_block(lo, hi, out.view(*self.lead, hi - lo, self.dim), None, self.written))

    @property
    def foldable(self) -> bool:
        return self.rows.foldable

    def raw(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Slots ``lo..hi-1`` as ``(codes, scales, zeros)`` (:meth:`QuantRows.raw_block`), the codes in the shared
        scratch (valid until the next block is read)."""
        out = scratch(int(torch.Size(self.lead).numel()) * (hi - lo) * self.dim, self.rows.codes.device)
        c, s, z = self.rows.raw_block(lo, hi, out.view(*self.lead, hi - lo, self.dim), self.written)
        return self._out(c), self._out(s), None if z is None else self._out(z)

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        """Slots ``idx [B, k]`` of each row dequantized, ``[B, k, D]`` in the cache dtype (:meth:`QuantRows.gather`)."""
        return self.rows.gather(idx, self.written)

    def pick(self, idx: torch.Tensor) -> QuantPick:
        """Slots ``idx [B, k]`` of each row (a buffer of lead ``[B]``) as ``[B, 1, k, D]``, nothing read yet."""
        return QuantPick(self.with_heads(), idx)

    def dense(self) -> torch.Tensor:
        """All ``n`` slots dequantized, in the cache dtype."""
        return self._out(self.rows.read(self.n))


class QuantPick:
    """The slots ``idx [B, k]`` a top-k chose in each row of a buffer of lead ``[B]`` (CSA's compressed entries), read
    as ``[B, 1, k, D]``: the C++ kernel (kvlab/layers/cpu_attend.py) reads their codes through the index; any other
    reader gets them dequantized whole (:meth:`dense`: only those rows, a few, as one block)."""

    def __init__(self, view: QuantView, idx: torch.Tensor) -> None:
        self.view, self.idx = view, idx
        self.n = idx.shape[1]
        self.shape = (idx.shape[0], 1, self.n, view.dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.view.dtype

    def block_size(self) -> int:
        """All ``k`` rows: a top-k is read whole."""
        return max(1, self.n)

    def dense(self) -> torch.Tensor:
        """The chosen rows dequantized, ``[B, 1, k, D]`` in the cache dtype (:meth:`QuantRows.gather`)."""
        return self.view.gather(self.idx)[:, None]


__all__ = ["DECODE_BLOCK_BYTES", "QuantPick", "QuantRows", "QuantView", "code_values", "dequantize", "hadamard", "pack4", "quantize",
           "rotate", "scale_values", "unpack4"]
