"""Quantize-on-write in C++ (kvlab/cache/quant_kernel.py) against kvlab/cache/quant.py's torch form: the same bytes
(codes, scales, zero points) for int8 / int4, symmetric and asymmetric, groups, float16 / bfloat16 / float32 scales,
rotated keys, a ring wrapping and a full buffer; ties (values exactly halfway between two codes), an all-zero group
and a group whose float16 scale overflows included. Built for this CPU and for plain x86-64 (its float16 rounding
in software)."""

import warnings

import pytest
import torch

from kvlab.cache import quant_kernel
from kvlab.cache.quant import QuantRows
from kvlab.costs.quant import Buffer, parse_quant
from kvlab.layers import cpp_build


@pytest.fixture(params=["native", "x86-64"])
def kernel(request, monkeypatch, tmp_path):
    """The kernel on, built with ``-march=native`` (the default) or ``-march=x86-64`` (no F16C: float16 in software)."""
    monkeypatch.setattr(quant_kernel, "ENABLED", True)
    if request.param != "native":
        monkeypatch.setenv("KVLAB_KERNEL_DIR", str(tmp_path))
        monkeypatch.setattr(quant_kernel, "KERNEL", quant_kernel.kernel(tuple(
            f"-march={request.param}" if f.startswith("-march") else f for f in quant_kernel.FLAGS)))
    if quant_kernel.library() is None:
        pytest.fail("the C++ quantize kernel did not build (a C++ compiler is a test requirement)")
    assert cpp_build.cache_dir() == tmp_path or request.param == "native"


def _data(b: int, n: int, d: int, qmax: int, steps: int, gen) -> torch.Tensor:
    """``[b, 1, n, d]``: random values, then rows of ties (half-integers with a group maximum of ``qmax``: scale 1,
    so each value sits halfway between two codes), an all-zero row, a row too large for a float16 scale and rows
    whose scale (range over ``steps``) is exactly halfway between two float16 / bfloat16 values."""
    x = torch.randn(b, 1, n, d, generator=gen) * 3
    for row, bits in ((10, 11), (11, 8)):  # 1 + 3 / 2^bits: between 1 + 2^-(bits-1) (odd) and 1 + 2^-(bits-2)
        x[:, :, row] = 0
        x[:, :, row, ::2] = (1 + 3 * 2.0 ** -bits) * steps
    ties = torch.randint(-2 * qmax, 2 * qmax, (b, 1, 4, d), generator=gen).float() / 2
    ties[..., ::8] = qmax
    x[:, :, 3:7] = ties.clamp(-qmax, qmax)
    x[:, :, 8] = 0
    x[:, :, 9] = 1e7
    x[:, :, 9, ::2] = -1e7
    return x


@pytest.mark.parametrize("ring", [False, True])
@pytest.mark.parametrize("fmt", ["int8", "int4", "int8-asym", "int4-g32-asym", "int8-g8-sbf16", "int4-g16-s32",
                                 "int4-g4-asym-sbf16", "int8-g32-rot", "fp8", "fp8_e5m2-g16-sbf16", "fp8-g8-s32"])
def test_same_bytes_as_torch(kernel, monkeypatch, fmt, ring):
    """Written in chunks (a prefill of 20, then 1, 7 and 1 positions; a 16-slot ring wraps), the kernel's buffers
    hold byte for byte what the torch form writes; the torch form ran (the kernel off) and so did the kernel."""
    spec = parse_quant(fmt)
    b, d, n = 2, 64, 29
    qmax = 7 if spec.bits == 4 else 127
    x = _data(b, n, d, qmax, 2 ** spec.bits - 1 if not spec.symmetric else qmax, torch.Generator().manual_seed(13))
    bufs = []
    calls = []
    real = quant_kernel.quantize_into
    monkeypatch.setattr(quant_kernel, "quantize_into", lambda *a: calls.append(a[6:]) or real(*a))
    for on in (True, False):
        monkeypatch.setattr(quant_kernel, "ENABLED", on)
        r = QuantRows(Buffer("kv", "k", 1, 0, d, ring=16 if ring else None, key=True), spec, (b, 1), torch.float32,
                      "cpu")
        r.resize(16 if ring else n, 0)
        for lo, hi in ((0, 20), (20, 21), (21, 28), (28, 29)):
            r.write(lo, x[:, :, lo:hi])
        bufs.append(r)
    assert [c[0] for c in calls] == ([4, 20, 21, 28] if ring else [0, 20, 21, 28])
    fast, ref = bufs
    for name in ("codes", "scales", "zeros"):
        a, e = getattr(fast, name), getattr(ref, name)
        assert (a is None) == (e is None)
        if a is not None:
            assert torch.equal(a.view(torch.uint8), e.view(torch.uint8)), name
    if spec.kind == "int":  # the overflowing row (1e7 / 127 is past float16; 1e7 / 448 is not)
        assert fast.scales.isinf().any() == (fast.scales.dtype == torch.float16 and not ring)


def test_no_compiler_warns_once_and_quantizes_in_torch(monkeypatch, tmp_path):
    """No C++ compiler: one warning, then every write in torch (the same bytes as ever)."""
    monkeypatch.setattr(quant_kernel, "ENABLED", True)
    monkeypatch.setenv("CXX", "kvlab-no-such-compiler")
    monkeypatch.setenv("KVLAB_KERNEL_DIR", str(tmp_path))
    monkeypatch.setattr(quant_kernel, "KERNEL", quant_kernel.kernel())
    r = QuantRows(Buffer("kv", "k", 1, 0, 16), parse_quant("int8"), (1, 1), torch.float32, "cpu")
    r.resize(4, 0)
    with pytest.warns(UserWarning, match="quant_kernel.cpp unavailable .*no C\\+\\+ compiler.*quantizing in torch"):
        r.write(0, torch.ones(1, 1, 2, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        r.write(2, torch.ones(1, 1, 2, 16))
    assert quant_kernel.library() is None and torch.equal(r.codes, torch.full((1, 1, 4, 16), 127, dtype=torch.int8))


@pytest.mark.parametrize("fmt", ["fp8", "fp8_e5m2"])
def test_fp8_ties_round_to_even_as_torch(kernel, fmt):
    """fp8 codes written by the kernel: every value halfway between two neighbouring codes (both signs; the group's
    scale 1: its largest value is the format's largest) rounds to the even code, as torch's cast does; byte for byte
    the torch form's."""
    spec = parse_quant(fmt + "-g16")
    top = quant_kernel.fp8_table(fmt)
    mids = (top[:-1] + top[1:]) / 2
    x = torch.cat((mids, -mids, top, torch.linspace(-top[-1], top[-1], 97)))
    x = torch.cat((x, torch.zeros(-x.numel() % 15)))
    rows = x.view(-1, 15)
    x = torch.cat((rows, torch.full((rows.shape[0], 1), float(top[-1]))), 1).reshape(1, 1, -1, 16)  # scale 1
    bufs = []
    for on in (True, False):
        quant_kernel.ENABLED = on
        try:
            r = QuantRows(Buffer("kv", "k", 1, 0, 16, key=True), spec, (1, 1), torch.float32, "cpu")
            r.resize(x.shape[2], 0)
            r.write(0, x)
        finally:
            quant_kernel.ENABLED = True
        bufs.append(r)
    assert torch.equal(bufs[0].codes, bufs[1].codes) and torch.equal(bufs[0].scales, bufs[1].scales)
    assert (bufs[0].scales == 1).all()
    codes = bufs[0].codes.view(-1, 16)[:, :15].reshape(-1)[:2 * mids.numel()]  # the ties, both signs
    assert torch.equal(codes % 2, torch.zeros_like(codes))
