"""The hand-written C++ decode kernel (kvlab/layers/cpu_attend.py) against the fused path's eager oracle
(kvlab/layers/fused.py ``_attend``, no code generation) and attention over the whole dequantized buffers: int8 and
int4, wide and thin heads, more than 8 query heads per KV head (two head blocks), groups read straight from the
codes (int8 g16 / g32, int4 g32) and groups dequantized row by row first (g8, g1, int4 g16), float16 / bfloat16 /
float32 scales, a left-padded batch, sink logits, a position count that is a multiple of no tile; then through a
tiny model's decode, eager and inside a compiled step (the custom op traced), and the fallback without a compiler.
The kernel is built once per machine into the user's cache directory (a few seconds the first time)."""

import contextlib
import warnings

import pytest
import torch
from helpers import count_calls, require_kernel

from kvlab.cache import quant
from kvlab.cache.quant import QuantRows
from kvlab.costs.quant import Buffer, parse_quant
from kvlab.layers import blocked, core, cpp_build, cpu_attend, fused


def _readers(fmt: str, vfmt: str | None, b: int, hkv: int, d: int, n: int, dv: int | None = None):
    gen = torch.Generator().manual_seed(1)
    out = []
    for name, f, c in zip("kv", (fmt, vfmt or fmt), (d, dv or d), strict=True):
        r = QuantRows(Buffer("kv", name, hkv, 0, c, key=name == "k"), parse_quant(f), (b, hkv), torch.float32, "cpu")
        r.resize(n + 5, 0)  # slots past n hold zeros: not read
        r.write(0, torch.randn(b, hkv, n - 3, c, generator=gen) * 2)  # a prefill, then steps
        r.write(n - 3, torch.randn(b, hkv, 3, c, generator=gen) * 2)
        out.append(r.view(n))
    return out


@pytest.fixture
def kernel(monkeypatch):
    require_kernel(monkeypatch, cpu_attend, "decode-attention")


def _count_calls(monkeypatch) -> list[int]:
    """Count the library's calls (a proxy in front of the loaded library: what the custom op calls at run time): the
    positions each call attends, over all its segments."""
    return count_calls(monkeypatch, cpu_attend, {"kvlab_quant_attend": lambda a: sum(seg.n for seg in a[5][:a[6]])})


@pytest.mark.parametrize("extras", ["plain", "mask+sinks"])
@pytest.mark.parametrize("fmt,vfmt,hkv,g,d", [
    ("int8", None, 2, 3, 64),  # thin (qwen3's 3 query heads per KV head), straight from the codes
    ("int4", None, 1, 8, 128),  # wide rows read planar
    ("int8-g16-sbf16", "int8-g32-s32", 1, 11, 32),  # two head blocks (8 + 3), bfloat16 / float32 scales
    ("int8-g8", "int8-g1", 2, 2, 16),  # groups under a 16-channel chunk: dequantized row by row
    ("int4-g16", "int4-g32", 2, 5, 64),  # int4 keys row by row, values planar
    ("int4-g2", None, 1, 1, 8),  # one query head, 8 channels (a padded chunk)
])
def test_kernel_equals_oracle(kernel, fmt, vfmt, hkv, g, d, extras):
    b, n = 2, 203
    k, v = _readers(fmt, vfmt, b, hkv, d, n)
    gen = torch.Generator().manual_seed(2)
    qf = torch.randn(b, hkv, g, d, generator=gen)
    mask = sinks = None
    if extras != "plain":
        mask = torch.zeros(b, 1, 1, n)
        mask[1, ..., :9] = float("-inf")  # row 1 left-padded by 9 positions
        sinks = torch.randn(1, hkv, g, 1, generator=gen)
    scale = d ** -0.5
    out = cpu_attend.attend(qf, k, v, mask, scale, sinks)
    int4 = k.rows.spec.fmt == "int4"
    sl = [x.narrow(-2, 0, n) for x in (k.rows.codes, k.rows.scales, v.rows.codes, v.rows.scales)]
    ref = fused._attend(qf, *sl, mask, sinks, scale, int4, False, 64, False)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    kd, vd = k.dense(), v.dense()  # the buffers dequantized whole, plain softmax attention
    s = (qf @ kd.transpose(-1, -2)) * scale + (0 if mask is None else mask.view(b, 1, 1, n))
    if sinks is not None:
        s = torch.cat((s, sinks.expand(b, -1, -1, -1)), -1)
    want = torch.softmax(s, -1)[..., :n] @ vd
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert (out - vd.mean(-2, keepdim=True)).abs().max() > 1e-2  # not a uniform average: the scores matter


def test_blocked_attention_takes_the_kernel(kernel, monkeypatch):
    """``attend_blocked`` over int8 readers runs the kernel (on by :data:`cpu_attend.ENABLED`) and gives the blocked
    path's result, values of their own width and format too; buffers it does not take (of a ``fused=True`` cache,
    fp4) are left to the other paths."""
    monkeypatch.setattr(quant, "DECODE_BLOCK_BYTES", 4 * 16 * 2 * 2 * 8)  # 8 positions a block
    calls = _count_calls(monkeypatch)
    k, v = _readers("int8-g8", None, 2, 2, 16, 37)
    q = torch.randn(2, 6, 1, 16, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(2, 1, 1, 37)
    mask[0, ..., :4] = float("-inf")
    sinks = torch.randn(6, generator=torch.Generator().manual_seed(4))
    out = blocked.attend_blocked(q, k, v, mask, 0.25, sinks)
    assert calls == [37]
    monkeypatch.setattr(cpu_attend, "ENABLED", False)
    ref = blocked.attend_blocked(q, k, v, mask, 0.25, sinks)
    assert calls == [37]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(cpu_attend, "ENABLED", True)
    k.rows.fused = True  # a cache made with fused=True asks for the torch.compile kernel
    assert not cpu_attend.applies(k, v)
    assert not cpu_attend.applies(*_readers("fp4-g8", None, 2, 2, 16, 37))
    k, v = _readers("int8-g8", "int4-g8", 2, 2, 16, 37, dv=24)  # values of their own width (v_head_dim) and format
    out = blocked.attend_blocked(q, k, v, mask, 0.25, sinks)
    assert out.shape == (2, 6, 1, 24) and calls == [37, 37]
    monkeypatch.setattr(cpu_attend, "ENABLED", False)
    torch.testing.assert_close(out, blocked.attend_blocked(q, k, v, mask, 0.25, sinks), rtol=1e-5, atol=1e-5)


def test_cache_decode_eager_and_compiled(kernel, monkeypatch):
    """A left-padded batch decoded through a tiny model with sinks (a KV head read by a shared layer too; int4 keys
    rotated, a residual window of 4): the kernel's logits equal the blocked cache's, eager and inside a compiled
    decode step (the custom op traced into the step's graph, over the whole preallocated buffers and the position
    count)."""
    from helpers import random_model, tiny_config

    from kvlab.compiled import CompiledStep

    monkeypatch.setattr(quant, "DECODE_BLOCK_BYTES", 4 * 16 * 2 * 2 * 8)
    model = random_model(tiny_config(shared=True, layers=2, sinks=True))
    ids = torch.randint(0, 97, (2, 22), generator=torch.Generator().manual_seed(4))
    calls = _count_calls(monkeypatch)
    caches = [model.new_cache(2, max_length=30, kv_quant="int4-g8-r4-rot") for _ in range(3)]
    with torch.inference_mode():
        for c in caches:
            c.set_padding(torch.tensor([0, 5]))
            model(ids[:, :20], cache=c)
        step = CompiledStep(model, "eager")  # kvlab's compiled lane: the position count a symbol
        for s in range(20, 22):
            before = len(calls)
            fast = model(ids[:, s:s + 1], cache=caches[0])
            assert len(calls) == before + 2  # both layers (the shared one reads the producer's codes)
            monkeypatch.setattr(cpu_attend, "ENABLED", False)
            ref = model(ids[:, s:s + 1], cache=caches[1])
            monkeypatch.setattr(cpu_attend, "ENABLED", True)
            torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
            third = step(ids[:, s:s + 1], caches[2])
            assert len(calls) == before + 4  # the compiled step ran the kernel too
            torch.testing.assert_close(third, ref, rtol=1e-5, atol=1e-5)
    assert step.compiles == 1  # two steps, one graph: the position count is the op's symbolic argument


def test_no_compiler_warns_once_and_falls_back(monkeypatch, tmp_path):
    """No C++ compiler: one warning, the kernel off, attention on the blocked path (never garbage)."""
    monkeypatch.setattr(cpu_attend, "ENABLED", True)
    monkeypatch.setattr(cpu_attend, "KERNEL", cpu_attend.kernel())  # not built yet
    monkeypatch.setenv("CXX", "kvlab-no-such-compiler")
    monkeypatch.setenv("KVLAB_KERNEL_DIR", str(tmp_path))
    monkeypatch.setattr(quant, "DECODE_BLOCK_BYTES", 4 * 16 * 2 * 2 * 8)
    k, v = _readers("int8-g8", None, 2, 2, 16, 37)
    q = torch.randn(2, 6, 1, 16, generator=torch.Generator().manual_seed(3))
    with pytest.warns(UserWarning, match="C\\+\\+ kernel cpu_attend.cpp unavailable .*no C\\+\\+ compiler.*blocked path"):
        assert not cpu_attend.applies(k, v)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        out = blocked.attend_blocked(q, k, v, None, 0.25)
    kd, vd = k.dense().repeat_interleave(3, 1), v.dense().repeat_interleave(3, 1)
    torch.testing.assert_close(out, torch.softmax(q @ kd.transpose(-1, -2) * 0.25, -1) @ vd, rtol=1e-5, atol=1e-5)
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


def test_build_is_cached_and_keyed(kernel, monkeypatch):
    """The library is built once per source, flags, compiler and CPU (a ``-march=native`` build never loads on
    another CPU): the same file again; another CPU's flags, another name."""
    path = cpu_attend.build()
    assert path.exists() and path.parent == cpu_attend.cache_dir()
    mtime = path.stat().st_mtime_ns
    assert cpu_attend.build() == path and path.stat().st_mtime_ns == mtime
    cxx = cpp_build.compiler()
    assert path.name == f"cpu_attend-{cpp_build.key(cxx, cpu_attend.SOURCE, cpu_attend.FLAGS)}.so"
    monkeypatch.setattr(cpp_build, "cpu_flags", lambda: "flags\t: another cpu")
    assert path.name != f"cpu_attend-{cpp_build.key(cxx, cpu_attend.SOURCE, cpu_attend.FLAGS)}.so"


@pytest.mark.parametrize("value,on", [(None, True), ("1", True), ("on", True), ("0", False), ("off", False),
                                      ("False", False), (" no ", False)])
def test_kernel_switch(monkeypatch, value, on):
    """A kernel's ``KVLAB_*_KERNEL`` variable: unset or anything else is on; 0 / off / false / no (any case) is off."""
    if value is None:
        monkeypatch.delenv("KVLAB_TEST_KERNEL", raising=False)
    else:
        monkeypatch.setenv("KVLAB_TEST_KERNEL", value)
    assert cpp_build.switch("KVLAB_TEST_KERNEL") is on


@pytest.mark.parametrize("with_sinks", [False, True])
@pytest.mark.parametrize("fmt,hkv,g,d", [("int8", 2, 3, 64), ("int4", 1, 8, 128)])
def test_positions_split_over_threads(kernel, monkeypatch, fmt, hkv, g, d, with_sinks):
    """With 3 torch threads and parts of at least 16 positions, 203 positions run as 3 parts on 3 threads (each
    part's maximum, denominator and p.v merged after); row 1's first part is all padding (a part with nothing
    visible). Equal to the oracle within 1e-5 and to the one-thread call."""
    b, n = 2, 203
    k, v = _readers(fmt, None, b, hkv, d, n)
    gen = torch.Generator().manual_seed(5)
    qf = torch.randn(b, hkv, g, d, generator=gen)
    mask = torch.zeros(b, 1, 1, n)
    mask[1, ..., :80] = float("-inf")  # more than the first part (67 positions)
    sinks = torch.randn(1, hkv, g, 1, generator=gen) if with_sinks else None
    monkeypatch.setattr(cpu_attend, "MIN_PART", 16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        out = cpu_attend.attend(qf, k, v, mask, d ** -0.5, sinks)
    finally:
        torch.set_num_threads(threads)
    one = cpu_attend.attend(qf, k, v, mask, d ** -0.5, sinks)
    sl = [x.narrow(-2, 0, n) for x in (k.rows.codes, k.rows.scales, v.rows.codes, v.rows.scales)]
    ref = fused._attend(qf, *sl, mask, sinks, d ** -0.5, fmt == "int4", False, 64, False)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, one, rtol=1e-5, atol=1e-5)
    assert not torch.equal(out, one)  # the split ran: parts rescaled and summed in another order (seeded: fixed)


def _equals_blocked_and_dense(out, q, k, v, mask, scale, sinks, monkeypatch) -> None:
    """``out`` (``attend_blocked`` with the kernel on, ``q [B, H, 1, D]``) equals the blocked path with the kernel off
    and softmax attention over the readers dequantized whole (K/V heads repeated for their query heads), with the
    additive ``mask [B, 1, 1, n]`` and the sink logits ``[H]`` (or None)."""
    b, h, _, _ = q.shape
    monkeypatch.setattr(cpu_attend, "ENABLED", False)
    torch.testing.assert_close(out, blocked.attend_blocked(q, k, v, mask, scale, sinks), rtol=1e-5, atol=1e-5)
    kd, vd = k.dense(), v.dense()
    g = h // kd.shape[1]
    kd, vd = kd.repeat_interleave(g, 1), vd.repeat_interleave(g, 1)
    s = (q @ kd.transpose(-1, -2)) * scale + mask
    if sinks is not None:
        s = torch.cat((s, sinks.view(1, -1, 1, 1).expand(b, -1, 1, 1)), -1)
    want = torch.softmax(s, -1)[..., :kd.shape[-2]] @ vd
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert (out - vd.mean(-2, keepdim=True)).abs().max() > 1e-2  # not a uniform average: the scores matter


def _inputs(b: int, h: int, d: int, n: int, seed: int, pad: tuple[int, int]):
    """A decode query ``[b, h, 1, d]``, an additive mask ``[b, 1, 1, n]`` hiding the first ``pad[1]`` positions of
    row ``pad[0]`` (its left padding) and sink logits ``[h]``."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, 1, d, generator=gen)
    mask = torch.zeros(b, 1, 1, n)
    mask[pad[0], ..., :pad[1]] = float("-inf")
    return q, mask, torch.randn(h, generator=gen)


@contextlib.contextmanager
def _threads(n: int):
    """torch's thread count ``n`` (what the kernel splits positions over) inside the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("fmt,hkv,g,d", [("int4-g32-rot", 1, 8, 128), ("int8-g16-rot", 2, 3, 48)])
def test_rotated_keys(kernel, monkeypatch, fmt, hkv, g, d):
    """Keys stored rotated (block Hadamard, ``-rot``; 48 channels: blocks of 16): the kernel scores the rotated query
    against them, and equals the blocked path and softmax attention over the dequantized (rotated back) buffers."""
    b, n = 2, 203
    k, v = _readers(fmt, None, b, hkv, d, n)
    assert k.rows.block and not v.rows.block and cpu_attend.applies(k, v)
    q, mask, sinks = _inputs(b, hkv * g, d, n, 6, (0, 11))
    calls = _count_calls(monkeypatch)
    out = blocked.attend_blocked(q, k, v, mask, d ** -0.5, sinks)
    assert calls == [n]
    _equals_blocked_and_dense(out, q, k, v, mask, d ** -0.5, sinks, monkeypatch)


@pytest.mark.parametrize("fmt,vfmt,hkv,g,d", [
    ("int8-asym", None, 2, 3, 64),  # uint8 codes straight from the buffer
    ("int4-g32-asym-rot", "int4-g32-asym", 1, 8, 128),  # planar, rotated keys
    ("int8-g8-asym-s32", "int4-g8-asym", 2, 5, 48),  # groups row by row
    ("int4-g16-asym-r16", "int8-g16-r16", 1, 4, 64),  # a residual window; symmetric values
])
def test_zero_points(kernel, monkeypatch, fmt, vfmt, hkv, g, d):
    """Asymmetric codes (``-asym``: value = code x scale + zero per group, uint8 / unshifted int4 codes): the kernel
    adds each group's zero point to the converted codes; equal to the blocked path (which folds the zeros into
    ``q.z`` and ``p.z``) and to softmax attention over the dequantized buffers, with a padding mask and sinks."""
    b, n = 2, 203
    k, v = _readers(fmt, vfmt, b, hkv, d, n)
    assert k.rows.zeros is not None and cpu_attend.applies(k, v)
    q, mask, sinks = _inputs(b, hkv * g, d, n, 12, (1, 9))
    calls = _count_calls(monkeypatch)
    out = blocked.attend_blocked(q, k, v, mask, d ** -0.5, sinks)
    assert calls == [n - k.rows.residual_slots]
    _equals_blocked_and_dense(out, q, k, v, mask, d ** -0.5, sinks, monkeypatch)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("fmt,hkv,g,d", [
    ("int8-g8-kc", 2, 3, 64),  # keys per channel in groups of 8 positions (the last partial group exact)
    ("int4-g32-r32-kc-asym", 1, 8, 128),  # KIVI's recipe: planar int4, zero points, a residual of 32
    ("int4-g16-kc-sbf16-rot", 2, 4, 64),  # rotated, bfloat16 scales
    ("int8-g4-kc", 1, 4, 36),  # 36 channels: dequantized row by row
])
def test_keys_per_channel(kernel, monkeypatch, fmt, hkv, g, d, threads):
    """KIVI keys (``-kc``: one scale, and zero, per channel for each group of positions; values per token): the kernel
    reads each position group's scale row once per tile; the positions after the last whole group (and a residual
    window) are merged after, read as blocks. Equal to the blocked path and to softmax attention over the dequantized
    buffers, with a padding mask and sinks; one thread, and three (parts of the positions that start inside a
    group)."""
    b, n = 2, 203
    k, v = _readers(fmt, None, b, hkv, d, n)
    assert k.rows.span > 1 and v.rows.span == 1 and cpu_attend.applies(k, v)
    q, mask, sinks = _inputs(b, hkv * g, d, n, 15, (1, 9))
    calls = _count_calls(monkeypatch)
    monkeypatch.setattr(cpu_attend, "MIN_PART", 16)
    with _threads(threads):
        out = blocked.attend_blocked(q, k, v, mask, d ** -0.5, sinks)
    assert calls == [min(cpu_attend._quantized(k), cpu_attend._quantized(v))] and calls[0] < n
    _equals_blocked_and_dense(out, q, k, v, mask, d ** -0.5, sinks, monkeypatch)


@pytest.mark.parametrize("fmt,hkv,g,d,residual", [
    ("int8-g16", 2, 3, 64, 16),  # 187 positions from the codes, the last 16 exact
    ("int4-g32-rot", 1, 8, 128, 200),  # 3 positions from the codes: all padding in row 1 (the kernel sees nothing)
])
def test_residual_window(kernel, monkeypatch, fmt, hkv, g, d, residual):
    """A residual window (``-rN``: the last N positions exact, kvlab/cache/quant.py): the kernel attends the quantized
    positions, the exact ones are merged after (the kernel's maximum and denominator rescaled); equal to the blocked
    path and to attention over the dequantized buffers (the residual laid over) with a padding mask and sinks."""
    b, n = 2, 203
    k, v = _readers(f"{fmt}-r{residual}", None, b, hkv, d, n)
    assert k.rows.residual_slots and cpu_attend.applies(k, v)
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(b, hkv * g, 1, d, generator=gen)
    mask = torch.zeros(b, 1, 1, n)
    mask[1, ..., :9] = float("-inf")
    sinks = torch.randn(hkv * g, generator=gen)
    calls = _count_calls(monkeypatch)
    out = blocked.attend_blocked(q, k, v, mask, d ** -0.5, sinks)
    assert calls == [n - residual]  # the kernel read the quantized positions only
    _equals_blocked_and_dense(out, q, k, v, mask, d ** -0.5, sinks, monkeypatch)


def _latent(fmt: str, pe_fmt: str | None, b: int, n: int, r: int, dr: int):
    """MLA's latent as a decode step reads it (kvlab/cache/latent.py): keys ``[c_kv, k_pe]``, two buffers of lead
    ``[B]`` quantized apart and joined along channels (``[B, 1, n, r + dr]``), values ``c_kv`` (the first)."""
    gen = torch.Generator().manual_seed(8)
    views = []
    for name, f, c in (("c_kv", fmt, r), ("k_pe", pe_fmt or fmt, dr)):
        rows = QuantRows(Buffer(name, name, 1, 0, c), parse_quant(f), (b,), torch.float32, "cpu")
        rows.resize(n + 5, 0)
        rows.write(0, torch.randn(b, n - 3, c, generator=gen) * 2)
        rows.write(n - 3, torch.randn(b, 3, c, generator=gen) * 2)
        views.append(rows.view(n, heads=True))
    return blocked.Cat(views, -1), views[0]


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("fmt,pe_fmt,h,r,dr,residual", [
    ("int8", None, 8, 64, 16, 0),  # both straight from the codes
    ("int4", None, 8, 128, 32, 0),  # both planar
    ("int8-g16", "int4-g8", 5, 64, 16, 0),  # a rotary key of another format, dequantized row by row
    ("int4-g8", "int8-g1", 11, 32, 8, 0),  # both row by row, two head blocks (8 + 3)
    ("int8-g16-r16", "int4-g16-r16", 8, 64, 16, 16),  # a residual window in both: the last 16 positions exact
    ("int4-asym", "int8-g8-asym", 8, 128, 32, 0),  # zero points
])
def test_mla_latent(kernel, monkeypatch, fmt, pe_fmt, h, r, dr, residual, threads):
    """MLA's absorbed decode (kvlab/layers/mla.py): keys ``[c_kv, k_pe]`` from two code buffers with scales of their
    own (scores = q_c . c_kv + q_pe . k_pe), values ``c_kv`` read from the first; int8 and int4, groups straight from
    the codes and row by row, a left-padded batch, 203 positions (a multiple of no tile), one thread and positions
    split over three. Equal to the blocked path and to softmax attention over the latent dequantized whole."""
    b, n = 2, 203
    keys, values = _latent(fmt, pe_fmt, b, n, r, dr)
    assert cpu_attend.applies(keys, values)
    q, mask, _ = _inputs(b, h, r + dr, n, 9, (1, 9))
    calls = _count_calls(monkeypatch)
    monkeypatch.setattr(cpu_attend, "MIN_PART", 16)
    with _threads(threads):
        out = blocked.attend_blocked(q, keys, values, mask, (r + dr) ** -0.5)
    assert calls == [n - residual] and out.shape == (b, h, 1, r)
    _equals_blocked_and_dense(out, q, keys, values, mask, (r + dr) ** -0.5, None, monkeypatch)


@pytest.mark.parametrize("kind,text", [("mla", "int8"), ("mla", "int4-g4-r3"), ("csa", "int8"), ("csa", "int4-g4"),
                                       ("hca", "int4"), ("swa", "int8-g4"), ("mla", "fp8-g4"), ("csa", "fp8_e5m2-g4"),
                                       ("gqa", "fp8-g4")])
def test_decode_takes_the_kernel(kernel, monkeypatch, kind, text):
    """A tiny model of each kind the kernel reads as keys from two buffers or K = V (tests/test_contract.py's
    examples: MLA's latent; DeepSeek V4's window ring with CSA's top-k entries, HCA's entries, SWA alone) decoding a
    left-padded batch through a quantized cache (int8 / int4, and fp8 e4m3 / e5m2 codes: GQA's separate K and V too):
    every layer's step runs the kernel, with the logits of the same steps with the kernel off."""
    from helpers import random_model
    from test_contract import tiny

    model = random_model(tiny(kind, 0))
    layers = len(model.config.layers)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(10))
    calls = _count_calls(monkeypatch)
    caches = [model.new_cache(2, max_length=16, kv_quant=text) for _ in range(2)]
    with torch.inference_mode():
        for c in caches:
            c.set_padding(torch.tensor([0, 3]))
            model(ids[:, :12], cache=c)
        for s in range(12, 16):
            before = len(calls)
            fast = model(ids[:, s:s + 1], cache=caches[0])
            assert len(calls) == before + layers
            monkeypatch.setattr(cpu_attend, "ENABLED", False)
            torch.testing.assert_close(fast, model(ids[:, s:s + 1], cache=caches[1]), rtol=1e-5, atol=1e-5)
            monkeypatch.setattr(cpu_attend, "ENABLED", True)


def _kv_rows(fmt: str, lead: tuple[int, ...], d: int, cap: int, written: int, ring: bool, gen) -> QuantRows:
    """A K = V buffer (DeepSeek V4's window ring, ``ring``, or compressed entries) of ``cap`` slots, ``written``
    positions written in chunks of 50 (a ring wraps)."""
    rows = QuantRows(Buffer("kv", "compressed", 1, 0, d, ring=cap if ring else None), parse_quant(fmt), lead,
                     torch.float32, "cpu")
    rows.resize(cap, 0)
    for at in range(0, written, 50):
        rows.write(at, torch.randn(*lead, min(50, written - at), d, generator=gen) * 2)
    return rows


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("form", ["ring", "ring+entries", "ring+picked"])
@pytest.mark.parametrize("fmt,g", [("int8", 8), ("int4", 3), ("int8-g16-sbf16", 5), ("int4-g8", 8),
                                   ("int4-g32-asym", 8), ("fp8", 8), ("fp8_e5m2-g4", 3)])
def test_values_in_keys(kernel, monkeypatch, fmt, g, form, threads):
    """K = V (DeepSeek V4's CSA/HCA/SWA, kvlab/layers/compressed.py): one buffer read once per tile for the scores
    and the values; a window ring (64 slots after 203 positions: wrapped), then the compressed entries (HCA: all 77)
    or the 29 of them a top-k picked in each row (CSA: their codes read through the index), one segment each; a
    left-padded batch, sinks, one thread and positions split over three. Equal to the blocked path (the picked rows
    dequantized) and to softmax attention over the buffers dequantized whole."""
    b, d = 2, 64
    gen = torch.Generator().manual_seed(11)
    ring = _kv_rows(fmt, (b, 1), d, 64, 203, True, gen).view(64)
    keys = ring
    if form != "ring":
        entries = _kv_rows(fmt, (b,), d, 77, 77, False, gen).view(77)
        idx = torch.stack([torch.randperm(77, generator=gen)[:29] for _ in range(b)])
        keys = blocked.Cat([ring, entries.with_heads() if form == "ring+entries" else entries.pick(idx)], -2)
    n = keys.shape[-2]
    assert cpu_attend.applies(keys, keys)
    q, mask, sinks = _inputs(b, g, d, n, 11, (1, 9))  # row 1's padding
    mask[1, ..., n - 3:] = float("-inf")
    calls = _count_calls(monkeypatch)
    monkeypatch.setattr(cpu_attend, "MIN_PART", 16)
    with _threads(threads):
        out = core.attend(q, keys, keys, mask, d ** -0.5, sinks=sinks)
    assert calls == [n] and out.shape == (b, g, 1, d)
    monkeypatch.setattr(cpu_attend, "ENABLED", False)
    torch.testing.assert_close(out, core.attend(q, keys, keys, mask, d ** -0.5, sinks=sinks), rtol=1e-5, atol=1e-5)
    kd = keys.dense().expand(b, g, n, d)
    s = torch.cat(((q @ kd.transpose(-1, -2)) * d ** -0.5 + mask, sinks.view(1, -1, 1, 1).expand(b, -1, 1, 1)), -1)
    torch.testing.assert_close(out, torch.softmax(s, -1)[..., :n] @ kd, rtol=1e-5, atol=1e-5)
    assert (out - kd.mean(-2, keepdim=True)).abs().max() > 1e-2


@pytest.mark.parametrize("form", ["one", "joined", "picked"])
@pytest.mark.parametrize("fmt,g", [("int8", 8), ("int4", 11), ("int8-g8-asym", 3), ("int4-g16-sbf16", 8),
                                   ("fp8-g16", 8)])
def test_indexer_scores(kernel, monkeypatch, fmt, g, form):
    """An indexer's raw scores ``q.k`` (DSA's and CSA's keys, kvlab/layers/blocked.py ``scores``) read from the codes:
    one buffer of 203 keys, two joined along positions (77 + 203) or 29 rows a top-k picked, 8 / 11 (two head
    blocks) / 3 query heads; equal to the blocked path and to the product with the keys dequantized whole."""
    b, d = 2, 64
    gen = torch.Generator().manual_seed(14)
    k = _kv_rows(fmt, (b,), d, 203, 203, False, gen).view(203).with_heads()
    if form == "joined":
        k = blocked.Cat([_kv_rows(fmt, (b,), d, 77, 77, False, gen).view(77).with_heads(), k], -2)
    elif form == "picked":
        k = k.pick(torch.stack([torch.randperm(203, generator=gen)[:29] for _ in range(b)]))
    q = torch.randn(b, 1, g, d, generator=gen)
    out = blocked.scores(q, k)
    assert cpu_attend.scores(q, k) is not None and out.shape == (b, 1, g, k.shape[-2])
    want = q @ k.dense().transpose(-1, -2)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-4)
    monkeypatch.setattr(cpu_attend, "ENABLED", False)
    if form != "picked":  # the blocked path reads readers (a pick is dequantized before any other path reads it)
        torch.testing.assert_close(out, blocked.scores(q, k), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind,text", [("mla", "int8"), ("csa", "int4-g4-asym")])
def test_compiled_step_takes_the_kernel(kernel, monkeypatch, kind, text):
    """Inside a compiled decode step (kvlab/compiled.py) MLA's latent and CSA's ring and picked entries go through the
    custom ops (``kvlab::quant_attend``, and ``kvlab::quant_scores`` for CSA's indexer): every layer calls the
    kernel, the logits equal the eager step's, and two steps share one graph."""
    from helpers import random_model
    from test_contract import tiny

    from kvlab.compiled import CompiledStep

    model = random_model(tiny(kind, 0))
    layers = len(model.config.layers)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(16))
    caches = [model.new_cache(2, max_length=16, kv_quant=text) for _ in range(2)]
    calls = _count_calls(monkeypatch)
    with torch.inference_mode():
        for c in caches:
            c.set_padding(torch.tensor([0, 3]))
            model(ids[:, :12], cache=c)
        step = CompiledStep(model, "eager")
        for s in range(12, 14):
            want = model(ids[:, s:s + 1], cache=caches[0])
            before = len(calls)
            got = step(ids[:, s:s + 1], caches[1])
            assert len(calls) == before + layers
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert step.compiles == 1


@pytest.mark.parametrize("max_length", [40, None])
@pytest.mark.parametrize("kind,text", [("csa", "int8"), ("csa", "int4-g4-asym"), ("hca", "int4"), ("swa", "int8-g4"),
                                       ("csa", "fp8-g4")])
def test_bound_decode_step(kernel, monkeypatch, kind, text, max_length):
    """An eager decode step without padding once the window ring is full (every key visible) is one C++ call per
    layer over the cache's own buffers, its descriptors bound once (kvlab/layers/compressed.py ``_step_bound``,
    kvlab/layers/cpu_attend.py ``Bound.v4_step``; rebuilt when a buffer grows: ``max_length`` None): the query's norm
    and rotation, CSA's indexer scores and top-k, the attention and the inverse rotation in C. Its logits equal those of
    the attention alone in one bound call (``_attend_bound``, the queries prepared in torch), of the general kernel
    path (a plan and descriptors per call) and of the blocked path (kernel off)."""
    from helpers import random_model
    from test_contract import tiny

    from kvlab.layers.compressed import CompressedAttention

    model = random_model(tiny(kind, 0))
    layers = len(model.config.layers)
    ids = torch.randint(0, model.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(17))
    caches = [model.new_cache(1, max_length=max_length, kv_quant=text) for _ in range(4)]
    lib, step, attend = cpu_attend.KERNEL.lib, CompressedAttention._step_bound, CompressedAttention._attend_bound
    steps, attends = [], []

    class Counting:
        def kvlab_quant_v4_step(self, *a):
            steps.append(a[16] if a[11] else None)  # CSA: its top-k
            return lib.kvlab_quant_v4_step(*a)

        def kvlab_quant_attend(self, *a):
            attends.append(a[6])
            return lib.kvlab_quant_attend(*a)

        def __getattr__(self, name):
            return getattr(lib, name)

    def off(self, *a):
        return None

    monkeypatch.setattr(cpu_attend.KERNEL, "lib", Counting())
    with torch.inference_mode():
        for c in caches:
            model(ids[:, :8], cache=c)
        for s in range(8, 30):
            steps[:], attends[:] = [], []
            got = model(ids[:, s:s + 1], cache=caches[0])
            assert len(steps) == layers and attends == []
            monkeypatch.setattr(CompressedAttention, "_step_bound", off)
            alone = model(ids[:, s:s + 1], cache=caches[1])
            assert len(steps) == layers and len(attends) == layers
            monkeypatch.setattr(CompressedAttention, "_attend_bound", off)
            general = model(ids[:, s:s + 1], cache=caches[2])
            monkeypatch.setattr(cpu_attend, "ENABLED", False)
            blocked_ = model(ids[:, s:s + 1], cache=caches[3])
            monkeypatch.setattr(cpu_attend, "ENABLED", True)
            monkeypatch.setattr(CompressedAttention, "_step_bound", step)
            monkeypatch.setattr(CompressedAttention, "_attend_bound", attend)
            for other in (alone, general, blocked_):
                torch.testing.assert_close(got, other, rtol=1e-5, atol=1e-5)
    spec = model.config.layers[0].compress
    if kind == "csa":  # the indexer in C once the entries outnumber the top-k (fewer: all of them, no index)
        assert steps.count(spec.index_topk) == layers == len(steps)
    else:
        assert steps == [None] * layers


@pytest.mark.parametrize("kind", ["csa", "hca", "swa"])
def test_a_copied_cache_binds_its_own_buffers(kernel, monkeypatch, kind):
    """``copy.deepcopy`` of a quantized cache whose descriptors are bound (decode steps past the full ring) gives a
    cache that decodes from its own buffers: the original then diverges and is freed, and the copy's next step equals
    that of a copy decoded with the kernel off (the blocked path). A copied :class:`cpu_attend.Bound` would point into
    the original's memory (and ctypes pointers do not pickle)."""
    import copy
    import gc

    from helpers import random_model
    from test_contract import tiny

    built: list[int] = []
    init = cpu_attend.Bound.__init__

    def counting(self, rows):
        built.append(len(rows))
        init(self, rows)

    monkeypatch.setattr(cpu_attend.Bound, "__init__", counting)
    model = random_model(tiny(kind, 0))
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        cache = model.new_cache(1, max_length=64, kv_quant="int8")
        model(ids[:, :20], cache=cache)
        for s in range(20, 24):
            model(ids[:, s:s + 1], cache=cache)
        assert built, "no descriptors were bound: the test does not reach the bound path"
        copied, ref = copy.deepcopy(cache), copy.deepcopy(cache)
        for s in range(24, 30):
            model(ids[:, 59 - s:60 - s], cache=cache)
        del cache
        gc.collect()
        before = len(built)
        got = model(ids[:, 24:25], cache=copied)
        assert len(built) > before  # the copy bound its own buffers
        monkeypatch.setattr(cpu_attend, "ENABLED", False)
        want = model(ids[:, 24:25], cache=ref)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt,g", [("int8", 8), ("int4-g16-sbf16", 3), ("int8-g8-asym", 11)])
def test_index_topk(kernel, fmt, g):
    """CSA's indexer in one C call (kvlab/layers/cpu_attend.py ``Bound.index_topk``): the weighted scores ``sum_g w_g
    relu(s q_g.k)`` equal to torch's over the keys dequantized whole, and the top-k of them equal to
    ``stable_topk``'s (index order, ties to the earlier): most scores are relu's zeros here, so the k-th best is a
    tie among many in every row (all heads one query: about half the keys score 0)."""
    b, d, n, k = 3, 64, 203, 120
    gen = torch.Generator().manual_seed(18)
    rows = _kv_rows(fmt, (b,), d, 256, n, False, gen)
    q = torch.randn(b, 1, 1, d, generator=gen).expand(b, 1, g, d).contiguous()  # one direction: ~half the keys at 0
    w = torch.rand(b, g, generator=gen) + 0.1
    scores, idx = cpu_attend.bound((rows,), b).index_topk(q, n, w, d ** -0.5, k)
    want = (torch.relu(q[:, 0] @ rows.read(n).transpose(-1, -2) * d ** -0.5) * w[..., None]).sum(1)  # [B, n]
    torch.testing.assert_close(scores, want, rtol=1e-5, atol=1e-5)
    assert ((scores == 0).sum(-1) > n - k).all()  # the boundary is a tie
    assert torch.equal(idx, core.stable_topk(scores, k)[1])


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("fmt,vfmt,hkv,g,d", [
    ("fp8", None, 2, 3, 64),  # e4m3, groups of 32: read straight from the codes through the byte table
    ("fp8_e5m2-g16-sbf16", "fp8-g32-s32", 1, 11, 128),  # e5m2 keys, e4m3 values, two head blocks
    ("fp8-g4", "int8-g8", 2, 2, 16),  # groups under a chunk: dequantized row by row; values of another format
])
def test_fp8_codes(kernel, monkeypatch, fmt, vfmt, hkv, g, d, threads):
    """fp8 codes (e4m3 / e5m2 bytes, one scale per token and group) read by the kernel through a 256-entry table of
    their values (torch's own decoding): equal to the blocked path and to softmax attention over the buffers
    dequantized whole, with a padding mask and sinks, on one thread and positions split over three."""
    b, n = 2, 203
    k, v = _readers(fmt, vfmt, b, hkv, d, n)
    assert cpu_attend.applies(k, v)
    q, mask, sinks = _inputs(b, hkv * g, d, n, 19, (1, 7))
    calls = _count_calls(monkeypatch)
    monkeypatch.setattr(cpu_attend, "MIN_PART", 16)
    with _threads(threads):
        out = blocked.attend_blocked(q, k, v, mask, d ** -0.5, sinks)
    assert calls == [n]
    _equals_blocked_and_dense(out, q, k, v, mask, d ** -0.5, sinks, monkeypatch)
