"""Quantized K/V caches (kvlab/costs/quant.py, kvlab/cache/quant.py): formats, packing, the positions held
quantized, the fake-quantization oracle, pricing anchors and named errors. The contract over every kind (measured ==
calculated, decode close to unquantized) is in tests/test_contract.py."""

from __future__ import annotations

import json

import pytest
import torch

from kvlab.cache import quant
from kvlab.cache.quant import QuantRows, dequantize, pack4, quantize, rotate, unpack4
from kvlab.config import ModelConfig
from kvlab.costs import costs
from kvlab.costs.quant import (
    Buffer,
    QuantError,
    bits_per_value,
    layout,
    parse_quant,
    quant_name,
    resolve_kv_quant,
)
from kvlab.units import fmt_bytes
from tests.helpers import fake, fake_quantized_decode, fake_storage_decode
from tests.test_contract import CASES, random_model, tiny


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def test_int4_packing_round_trips_every_byte_and_code():
    every = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(pack4(unpack4(every)), every)
    codes = torch.randint(0, 16, (3, 5, 64), dtype=torch.uint8)
    packed = pack4(codes)
    assert packed.shape == (3, 5, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack4(packed), codes)


@pytest.mark.parametrize("fmt", ["int4", "int8", "int4-asym", "fp4", "fp8", "fp8_e5m2", "fp8-se8m0", "fp4-se8m0"])
def test_values_on_the_grid_round_trip_exactly(fmt):
    """Values that are codes times a power-of-two scale come back bit for bit (int4: -8..7 x 0.25)."""
    spec = parse_quant(fmt)
    grid = {"fp8-se8m0": [-448, -240, -13, -1.125, 0, 0.5, 1, 3.5, 26, 104, 320, 448, -2, 7, 9, 11],  # 2^-2: exact
            "fp4-se8m0": [-6, -4, -3, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3, 4, 6, 6],
            "int4": [-7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7, 7],  # scale = absmax / 7
            "int8": [-127, -100, -50, -8, -1, 0, 1, 2, 3, 7, 50, 99, 120, 127, -5, 64],  # absmax / 127
            "int4-asym": list(range(16)),  # (max - min) / 15, zero = min
            "fp4": [-6, -4, -3, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3, 4, 6, 6],  # absmax / 6
            # e4m3 (3 mantissa bits, max 448) and e5m2 (2 bits, max 57344) values: absmax / 448, / 57344
            "fp8": [-448, -240, -13, -1.125, -0.015625, 0, 0.001953125, 0.5, 1, 1.875, 3.5, 26, 104, 320, 448, -2],
            "fp8_e5m2": [-57344, -40960, -96, -1.75, -0.0078125, 0, 1.52587890625e-05, 0.5, 1, 1.25, 3, 24, 112,
                         20480, 57344, -2]}[fmt]
    x = torch.tensor(grid, dtype=torch.float32)[None, None] * 0.25
    c, s, z = quantize(x, spec, -1)
    back = dequantize(c, s, z, spec, -1)
    torch.testing.assert_close(back, x, atol=0, rtol=0)


def test_hadamard_rotation_is_its_own_exact_inverse():
    x = torch.randn(2, 3, 7, 64, dtype=torch.float64).float()
    torch.testing.assert_close(rotate(rotate(x, 64), 64), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(rotate(x, 16).norm(dim=-1), x.norm(dim=-1), atol=1e-4, rtol=0)


def test_format_names_parse_and_print_back():
    for text in ("int8-g32", "int4-g32-r64", "int4-g64-r128-kc-rot", "fp8-g64-rope-s32", "int4-g16-asym-sbf16"):
        assert parse_quant(text).name == text
    q = parse_quant("int4-g32-r64-kc-rot")
    assert (q.bits, q.group, q.residual, q.k_per_channel, q.rotate) == (4, 32, 64, True, True)
    assert resolve_kv_quant("deepseek-v4")["index_keys"].fmt == "fp4"


@pytest.mark.parametrize("text,message", [
    ("int3", r"format='int3': allowed: int8, int4, fp8"),
    ("int4-x9", r"option 'x9' unknown; allowed: gN"),
    ("fp8-asym", r"symmetric=False: fp8 codes are signed floats"),
    ("int8-s8", r"option 's8' unknown"),
])
def test_bad_formats_are_named_errors(text, message):
    with pytest.raises(QuantError, match=message):
        parse_quant(text)


def test_bad_combinations_name_the_layer_option_and_what_is_allowed():
    cfg = tiny("gqa", 1)  # window 5, head_dim 8
    with pytest.raises(ValueError, match=r"layers\[0\]\.kv_quant\[k\]\.residual=6: the residual must fit the sliding "
                                         r"window of 5 positions"):
        costs(cfg, context=64, kv_quant="int8-r6")
    cfg = tiny("gqa", 2)  # v_head_dim 12
    with pytest.raises(ValueError, match=r"layers\[0\]\.kv_quant\[v\]\.group=8: must divide the 12 quantized channels "
                                         r"\(allowed: 1, 2, 3, 4, 6, 12"):
        random_model(cfg).new_cache(1, 16, kv_quant="int4-g8")
    with pytest.raises(ValueError, match=r"kv_quant\['q'\]: allowed components"):
        costs(cfg, context=64, kv_quant={"q": "int8"})


def test_int4_on_an_odd_channel_count_or_group_is_a_named_error():
    """int4 / fp4 pack two channels per byte: an odd channel count (V of 7 channels here) or an odd group of channels
    is refused naming the layer, the buffer, the option and what is allowed, by the calculator and the cache alike
    (never a silent fallback); the allowed alternative (that buffer in int8) is priced and held byte for byte."""
    cfg = tiny("gqa", 2)
    for layer in cfg.layers:
        layer.v_head_dim = 7
    odd = (r"layers\[0\]\.kv_quant\[v\]: int4 packs two channels per byte and this buffer has 7 quantized channels, "
           r"an odd count \(allowed here: int8, fp8 or fp8_e5m2, e\.g\. v=int8 for this buffer alone\)")
    with pytest.raises(QuantError, match=odd):
        costs(cfg, context=16, kv_quant="int4")
    with pytest.raises(QuantError, match=odd):
        random_model(cfg).new_cache(1, 16, kv_quant="int4")
    with pytest.raises(QuantError, match=r"layers\[0\]\.kv_quant\[k\]\.group=1: fp4 packs two channels per byte, so "
                                         r"a group of channels must be even \(allowed: 2, 4, 8\)"):
        costs(cfg, context=16, kv_quant="fp4-g1+v=int8")
    cache = random_model(cfg).new_cache(1, 16, kv_quant="int4-g4+v=int8")
    assert cache.nbytes() == costs(cfg, context=16, dtype="float32", kv_quant="int4-g4+v=int8").kv_cache_bytes


def test_layer_overrides_lay_over_the_mapping_priced_and_held_alike():
    """A layer index overrides the mapping for that layer alone: None leaves it unquantized, a format replaces its
    default, a mapping its components (MLA: layer 2's c_kv in int8, its k_pe still exact as the mapping says); a layer
    reading another's cache reads the producer's format. Held bytes == priced bytes, layer by layer."""
    cfg = tiny("mla", 0)
    q = {"*": "int4-g4", "k_pe": None, 0: None, 2: {"c_kv": "int8-g4"}}
    model = random_model(cfg)
    cache = model.new_cache(2, 24, kv_quant=q)
    model(torch.randint(0, cfg.vocab_size, (2, 24)), cache=cache)
    c = costs(cfg, context=24, dtype="float32", batch=2, kv_quant=q)
    plain = costs(cfg, context=24, dtype="float32", batch=2)
    assert [s.nbytes() for s in cache.layers] == [x.kv_bytes for x in c.per_layer]
    assert c.per_layer[0].kv_bytes == plain.per_layer[0].kv_bytes  # layer 0 unquantized
    int4 = costs(cfg, context=24, dtype="float32", batch=2, kv_quant={"*": "int4-g4", "k_pe": None}).per_layer
    int8 = costs(cfg, context=24, dtype="float32", batch=2, kv_quant={"*": "int8-g4", "k_pe": None}).per_layer
    assert c.per_layer[1].kv_components == int4[1].kv_components
    assert c.per_layer[2].kv_components == int8[2].kv_components != int4[2].kv_components
    assert c.per_layer[2].kv_components["k_pe"] == plain.per_layer[2].kv_components["k_pe"]
    assert c.kv_quant == "int4-g4+k_pe=none+0=none+2.c_kv=int8-g4"
    shared = tiny("gqa", 0)  # layer 2 reads layer 1's cache
    a = costs(shared, context=64, kv_quant={"*": "int8", 1: "int4-g8"})
    b = costs(shared, context=64, kv_quant="int4-g8")
    assert a.per_layer[2].kv_read_bytes == b.per_layer[2].kv_read_bytes  # the producer's int4


@pytest.mark.parametrize("q,message", [
    ({"*": "int8", 7: None}, r"kv_quant\[7\]: layer 7 unknown: the model has 3 layers \(0\.\.2\)"),
    ({"*": "int8", 2: "int4"}, r"kv_quant\[2\]: layers\[2\] reads layer 1's cache \(kv_source\) and stores nothing"),
    ({1: {"c_kv": "int8"}}, r"kv_quant\[1\]\['c_kv'\]: layers\[1\] \(gqa\) holds no 'c_kv' buffer; its buffers: k, v"),
    ({1: {"q": "int8"}}, r"kv_quant\[1\]\['q'\]: allowed components: \*, k, v"),
    ({-1: None}, r"kv_quant\[-1\]: a layer index must be 0 or more"),
    ({"*": "int8", 1: "int4-g8"}, r"layers\[1\]\.kv_quant\[v\]\.group=8: must divide the 12 quantized channels"),
])
def test_bad_layer_overrides_are_named_errors(q, message):
    cfg = tiny("gqa", 2)  # head_dim 8, v_head_dim 12; layer 2 reads layer 1
    with pytest.raises(QuantError, match=message):
        costs(cfg, context=64, kv_quant=q)
    with pytest.raises(QuantError, match=message):
        random_model(cfg).new_cache(1, 16, kv_quant=q)


@pytest.mark.parametrize("text,mapping", [
    ("int4-g32+0-1=int8+k_pe=none", {"*": "int4-g32", "k_pe": None, 0: "int8", 1: "int8"}),
    ("deepseek-v4+0=none+3=int8", {**resolve_kv_quant("deepseek-v4"), 0: None, 3: "int8"}),
    ("none+2=int4-g32", {"*": None, 2: "int4-g32"}),
    ("c_kv=fp8-g128-s32+k_pe=none+index_keys=fp8-g128-s32", "flashmla-fp8"),
    ("c_kv=fp8-g128+k_pe=none", {"c_kv": "fp8-g128", "k_pe": None}),
    ("int4+0.k=int8+0.v=none+5-6=deepseek-v4", {"*": "int4", 0: {"k": "int8", "v": None}, 5: "deepseek-v4",
                                                6: "deepseek-v4"}),
    ("int8-g32+0.*=none+1-2=int4-g32", {"*": "int8", 0: {"*": None}, 1: "int4-g32", 2: "int4-g32"}),
    ("INT4-G32 + 1=Int8", {"*": "int4-g32", 1: "int8"}),
])
def test_per_layer_text_form_reads_as_the_mapping_and_prints_back(text, mapping):
    """The CLI's per-layer form (items joined by '+': a default, then components, layers N or N-M, or N.component)
    resolves to the same mapping as the Python API, and every resolved mapping prints back (``quant_name``) as a
    text that resolves to it again."""
    q = resolve_kv_quant(text)
    assert q == resolve_kv_quant(mapping)
    assert resolve_kv_quant(quant_name(q)) == q


@pytest.mark.parametrize("text,message", [
    ("int4++0=int8", r"an empty item; items are joined by '\+'"),
    ("int4+int8", r"'int8': only the first item may be a bare format"),
    ("int4+x=int8", r"x=int8: 'x' is not a component \(k, v, c_kv"),
    ("int4+3-1=int8", r"3-1=int8: layers 3-1: the first layer must not be after the last"),
    ("int4+0=int9", r"0=int9: kv_quant format='int9': allowed: int8, int4"),
    ("int9+0=int8", r"kv_quant='int9\+0=int8': kv_quant format='int9'"),
    ("int4+0=none+0.k=int8", r"layer 0 is unquantized \(0=none\) and 0.k=int8 quantizes one of its buffers"),
    ("int4+0.q=int8", r"0.q=int8: kv_quant\[0\]\['q'\]: allowed components"),
    ("int4+k=deepseek-v4", r"k=deepseek-v4: kv_quant='deepseek-v4': option 'v4' unknown"),
])
def test_bad_per_layer_text_is_a_named_error(text, message):
    with pytest.raises(QuantError, match=message):
        resolve_kv_quant(text)


def test_per_layer_kv_quant_on_every_verb_is_priced_as_the_api(capsys, tmp_path):
    """``--kv-quant`` with per-layer items on calc, inspect, compare (several formats, one row each), fit and bench
    (a run measuring the cache) prices and holds the bytes the Python API's mapping does; retrofit's kv-quant and
    eval's ``--variant kv=`` read the same text; a layer the model lacks is a named error with exit code 2."""
    from kvlab.cli import main
    from kvlab.cli.evaluate import _variant
    from kvlab.fit import fit
    from kvlab.retrofit import parse

    cfg = tiny("mla", 0)
    cfg.name = "tiny-mla"
    path = str(tmp_path / "tiny.json")
    cfg.save(path)
    text, api = "int4-g4+k_pe=none+0=none+2.c_kv=int8-g4", {"*": "int4-g4", "k_pe": None, 0: None,
                                                            2: {"c_kv": "int8-g4"}}
    c = costs(cfg, context=24, dtype="float32", kv_quant=api)
    cache = random_model(cfg).new_cache(1, 24, kv_quant=api)
    assert cache.nbytes() == c.kv_cache_bytes and c.kv_quant == text

    def run(*argv):
        assert main([*argv, "--json"]) == 0, capsys.readouterr().err
        return json.loads(capsys.readouterr().out)

    got = run("calc", path, "--context", "24", "--dtype", "fp32", "--kv-quant", text)
    assert got["kv_cache_bytes"] == c.kv_cache_bytes and got["kv_quant"] == text
    assert run("inspect", path, "--context", "24", "--dtype", "fp32", "--kv-dtype", text)["kv_cache_bytes"] == \
        c.kv_cache_bytes
    rows = run("compare", path, "--context", "24", "--dtype", "fp32", "--kv-quant", f"int8,{text}")["models"]
    assert [m["kv_quant"] for m in rows] == ["none", "int8-g32", text]
    assert rows[2]["kv_cache_bytes"] == [c.kv_cache_bytes]
    got = run("fit", path, "--memory", "420KiB", "--weights-dtype", "fp32", "--kv-quant", text)["fit"]
    want = fit(cfg, 420 << 10, weights_dtype="fp32", kv_quant=api)
    assert got["limited_by"] == "memory" and (got["value"], got["fits"]["kv_bytes"]) == (want.value, want.fits.kv_bytes)
    bench = run("bench", path, "--context", "16", "--decode-tokens", "1", "--no-progress", "--kv-dtype", f"fp32,{text}")
    assert [x["kv_quant"] for x in bench["results"]] == ["none", text]
    assert all(x["cache_bytes_match"] for x in bench["results"])
    assert resolve_kv_quant(parse(f"kv-quant:{text}")[1]["fmt"]) == resolve_kv_quant(api)
    variant = _variant(f"kv={text}", random_model(cfg))  # kvlab eval --variant kv=...
    assert variant.new_cache(1, 24).nbytes() == c.kv_cache_bytes
    assert main(["calc", path, "--kv-quant", "int4-g4+3=int8"]) == 2
    err = capsys.readouterr().err
    assert "kvlab: error: kv_quant[3]: layer 3 unknown: the model has 3 layers (0..2)" in err
    assert "Traceback" not in err


def test_published_bit_widths():
    """llama.cpp q8_0 (32 int8 + an fp16 scale) is 8.5 bits per value, q4_0 4.5; KIVI's per-channel keys over 32
    positions cost the same per value."""
    assert bits_per_value(parse_quant("int8-g32")) == 8.5
    assert bits_per_value(parse_quant("int4-g32")) == 4.5
    assert bits_per_value(parse_quant("int4-g32-kc"), key=True) == 4.5
    assert bits_per_value(parse_quant("int4-g32-asym")) == 5.0
    c16 = costs("llama-3.1-8b", context=32768, dtype="bf16")
    c8 = costs("llama-3.1-8b", context=32768, dtype="bf16", kv_quant="int8-g32")
    assert c16.kv_cache_bytes == 4_294_967_296 and c8.kv_cache_bytes * 32 == c16.kv_cache_bytes * 17  # 8.5 / 16


@pytest.mark.parametrize("text", ["int4-g4", "int4-g4-r3", "int8-g4-r2-kc", "int4-g4-r1-kc-rot", "fp8-g8-r5"])
@pytest.mark.parametrize("ring", [None, 8], ids=["full", "ring8"])
def test_a_buffer_holds_quantized_exactly_the_positions_before_its_residual(text, ring):
    """Written in uneven chunks (and wrapping around a ring of 8), the buffer reads back the oracle: positions
    before ``floor((n - R) / span) * span`` quantize-dequantized in their groups, the rest exact."""
    spec = parse_quant(text)
    buf = Buffer("kv", "k", 2, 0, 16, ring=ring, key=True)
    x = torch.randn(1, 2, 40, 16)
    rows = QuantRows(buf, spec, (1, 2), torch.float32, "cpu", max_length=None if ring is None else 8)
    rows.resize(40 if ring is None else 8, 0)
    n = 0
    for t in (1, 3, 1, 7, 1, 1, 9, 2, 1, 1, 13):
        rows.write(n, x[..., n:n + t, :])
        n += t
        span = layout(spec, buf)["span"]
        want = fake(x[..., :n, :], spec, buf, max(0, n - spec.residual) // span * span)
        if ring is None:
            torch.testing.assert_close(rows.read(n), want, atol=1e-6, rtol=0)
        else:  # slot p % 8 holds position p for the last 8 positions
            held = min(n, 8)
            pos = torch.arange(n - held, n)
            torch.testing.assert_close(rows.read(held)[..., pos % 8, :], want[..., pos, :], atol=1e-6, rtol=0)


@pytest.mark.parametrize("text,layers", [("int4-g4", 3), ("int4-g4-rot", 3), ("fp8-g8", 3), ("int8-g4", 3),
                                         ("int4-g4-r3", 1), ("int8-g4-r2-kc", 1), ("int4-g4-kc-rot", 1)])
@pytest.mark.parametrize("kind,example", [("gqa", 0), ("gqa", 3), ("cca", 0)])
def test_decode_equals_a_fake_quantized_full_forward(kind, example, text, layers, monkeypatch):
    """Each decode step through the quantized cache equals a full forward of the same prefix whose K/V pass
    through the same quantize-dequantize at exactly the positions the cache holds quantized at that step (the
    layer reading another layer's cache included). A position quantized on arrival (no residual, per token) is
    quantized for every later query, so three layers compare; with a residual or keys per channel a position is
    exact for the queries just after it and quantized for later ones, which one full forward can only reproduce
    for the first layer's K/V (computed from the embeddings): one layer. The oracle quantizes the K/V each layer
    handed the cache (tests/helpers.py), so the last-bit differences of the C++ kernel's summation order or of a
    1-row matmul cannot flip a rounding between the two sides."""
    cfg = tiny(kind, example)
    if layers == 1:
        cfg = ModelConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, layers=cfg.layers[:1],
                          max_positions=cfg.max_positions)
    model = random_model(cfg)
    moved = 0.0
    for prefix, step, want in fake_quantized_decode(model, text, monkeypatch):
        torch.testing.assert_close(step, want, atol=1e-4, rtol=0)
        moved = max(moved, float((step - model(prefix)[:, -1]).abs().max()))
    assert moved > 1e-3  # the quantization is really there


@pytest.mark.parametrize("text", ["int4-g4-r3", "int8-g4-r2-kc", "fp8-g4-rope", "int4-g4-asym-rot", "deepseek-v4"])
@pytest.mark.parametrize("kind,example", CASES)
def test_decode_of_every_kind_equals_fake_quantized_storage(kind, example, text, monkeypatch):
    """The oracle for every kind (MLA's latent, rotary key and DSA's indexer keys; CSA/HCA/SWA's window ring,
    compressed entries and indexer keys; GQA/CCA full, ring and sink tokens): a left-padded batch, prefilled then
    decoded across window wrap-arounds, compressed blocks and decode blocks of 2 slots, gives each step the logits of
    the same steps over exact storage read through the same quantize-dequantize (tests/helpers.py ``FakeRows``) at
    exactly the positions the cache holds quantized (residual, groups of positions for keys per channel, exact
    rotary channels, the deepseek-v4 preset's mix). One layer: its entries come from the embeddings, so both
    caches hold the same values to quantize. GQA/CCA also have the full-forward oracle above."""
    cfg = tiny(kind, example)
    cfg = ModelConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, layers=cfg.layers[:1],
                      max_positions=cfg.max_positions)
    model = random_model(cfg)
    monkeypatch.setattr(quant, "DECODE_BLOCK_BYTES", 1)  # one slot (or one group of positions) per block
    try:
        steps = list(fake_storage_decode(model, text, monkeypatch))
    except QuantError as e:  # keys per channel or a residual that does not fit the example's window
        assert "window" in str(e)
        pytest.skip(f"a named error: {e}")
    moved = 0.0
    for _, got, want, exact in steps:
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        moved = max(moved, float((got - exact).abs().max()))
    assert moved > 1e-3  # the quantization is really there


@pytest.mark.parametrize("text", ["int8-g4-r2-kc", "int4-g4-r1-kc-asym-rot"])
@pytest.mark.parametrize("kind,example", [("gqa", 1), ("gqa", 4), ("cca", 1)])
def test_keys_per_channel_on_a_ring_equal_fake_quantized_storage(kind, example, text, monkeypatch):
    """KIVI keys on a window ring, at the model level: the window examples above refuse keys per channel in groups
    of 4 positions by name (windows 5 and 4); with a window of 8 (two whole groups of positions per ring) a left-padded
    batch decoded 30 positions (the ring wrapping three times, groups of positions flushed out of the residual and
    evicted whole) gives each step the logits of exact storage read through the same quantize-dequantize."""
    cfg = tiny(kind, example)
    cfg = ModelConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, layers=cfg.layers[:1],
                      max_positions=cfg.max_positions)
    cfg.layers[0].window = 8
    model = random_model(cfg)
    monkeypatch.setattr(quant, "DECODE_BLOCK_BYTES", 1)
    moved = 0.0
    for _, got, want, exact in fake_storage_decode(model, text, monkeypatch):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        moved = max(moved, float((got - exact).abs().max()))
    assert moved > 1e-3


def test_calc_shows_quantized_bytes_beside_unquantized(capsys):
    from kvlab.cli import main

    assert main(["calc", "llama-3.1-8b", "--context", "32k", "--kv-quant", "int4-g32-r128"]) == 0
    out = capsys.readouterr().out
    q = costs("llama-3.1-8b", context=32768, kv_quant="int4-g32-r128")
    plain = costs("llama-3.1-8b", context=32768)
    assert "KV quantized as int4-g32-r128 beside unquantized bfloat16" in out
    assert f"{q.kv_cache_bytes:,}" in out and f"{q.kv_cache_bytes / plain.kv_cache_bytes:.3f}x" in out
    assert main(["calc", "llama-3.1-8b", "--context", "32k", "--kv-dtype", "int8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["kv_quant"] == "int8-g32" and data["kv_cache_bytes"] * 32 == 17 * data["kv_unquantized"][
        "kv_cache_bytes"]


def test_compare_takes_several_formats_and_bad_ones_are_named(capsys):
    from kvlab.cli import main

    assert main(["compare", "llama-3.1-8b", "--context", "8k", "--kv-quant", "int8,fp8-g64", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [m["kv_quant"] for m in data["models"]] == ["none", "int8-g32", "fp8-g64"]
    assert data["models"][1]["kv_cache_bytes"][0] == costs("llama-3.1-8b", context=8192, kv_quant="int8").kv_cache_bytes
    assert main(["compare", "llama-3.1-8b", "--context", "8k", "--kv-quant", "int4-g32"]) == 0
    out = capsys.readouterr().out  # the bytes a decode step reads follow the format, beside the unquantized row
    read = out.split("K/V bytes read per decoded token")[1].split("\n\n")[0]
    for q in (None, "int4-g32"):
        assert fmt_bytes(costs("llama-3.1-8b", context=8192, kv_quant=q).kv_read_bytes_per_step) in read
    assert main(["calc", "llama-3.1-8b", "--kv-quant", "int4-g7"]) == 2
    assert "kvlab: error: layers[0].kv_quant[k].group=7: must divide the 128 quantized channels" in \
        capsys.readouterr().err


def test_deepseek_storage_presets_reproduce_the_v4_model_card():
    """DeepSeek's own storage formats: V3.2's FlashMLA FP8 cache is 656 B per token per layer (+ 132 B of FP8
    indexer keys); V4's (FlashMLA "MODEL1") keeps entries in FP8 with a power-of-two scale per 64 channels and the 64
    rotary channels in bf16 (448 + 7 + 128 B, padded to 584 there), indexer keys in MXFP4 (64 + 4 B). At 1M the model
    card puts V4's KV at 10% (Pro) and 7% (Flash) of V3.2's; both in their deployed formats kvlab gets 10.1% and 7.3%
    (the Pro layer schedule is transformers' default)."""
    ctx = 1 << 20
    v32 = costs("deepseek-v3.2", context=ctx, kv_quant="flashmla-fp8")
    assert v32.per_layer[0].kv_components["c_kv"] + v32.per_layer[0].kv_components["k_pe"] == 656 * ctx
    assert v32.per_layer[0].kv_components["index_keys"] == 132 * ctx
    for model, card in (("deepseek-v4-pro", 0.10), ("deepseek-v4-flash", 0.07)):
        v4 = costs(model, context=ctx, kv_quant="deepseek-v4")
        comp = next(x.kv_components for x in v4.per_layer if x.kind.startswith("csa"))
        assert comp["compressed"] == (ctx // 4) * (448 + 7 + 64 * 2)  # fp8 codes, e8m0 scales, bf16 rotary
        assert comp["index_keys"] == (ctx // 4) * (64 + 4)  # fp4 codes, one e8m0 scale per 32
        assert abs(v4.kv_cache_bytes / v32.kv_cache_bytes - card) < 0.005


def test_e8m0_scales_are_powers_of_two_that_never_clip_and_only_for_fp_codes():
    """``se8m0``: each scale the power of two at or above absmax / max (stored as one byte), so a group's largest
    value still fits the format; an all-zero group reads back zeros; integer codes refuse it by name."""
    spec = parse_quant("fp8-g4-se8m0")
    assert spec.scale_dtype == "e8m0" and spec.name == "fp8-g4-se8m0"
    x = torch.tensor([[3.0, -1.0, 0.5, 0.25], [0.0, 0.0, 0.0, 0.0], [1e-3, 2e-3, -5e-4, 0.0]])
    c, s, z = quantize(x, spec, -1)
    assert s.dtype == torch.uint8 and z is None
    sf = quant.scale_values(s, spec)
    assert torch.equal(sf, torch.exp2(torch.log2(sf).round()))  # powers of two
    assert bool((sf * 448 >= x.abs().amax(-1)).all()) and bool((sf * 224 < x.abs().amax(-1)).logical_or(
        x.abs().amax(-1) == 0).all())  # the smallest such power
    back = dequantize(c, s, z, spec, -1)
    assert torch.equal(back[1], torch.zeros(4)) and float((back - x).abs().max()) < 0.07 * 3
    with pytest.raises(QuantError, match=r"scale_dtype='e8m0': power-of-two scales are for fp8 / fp8_e5m2 / fp4 "
                                         r"codes \(OCP MX\); int8 takes float16, bfloat16 or float32 scales"):
        parse_quant("int8-se8m0")
    assert costs("llama-3.1-8b", context=4096, kv_quant="fp8-g32-se8m0").kv_cache_bytes * 64 == costs(
        "llama-3.1-8b", context=4096).kv_cache_bytes * 33  # 8 + 8/32 bits against 16


def test_a_kv_quant_variant_shares_the_weights_and_quantizes_its_cache():
    from kvlab.eval import kl_divergence, with_kv_quant

    model = random_model(tiny("gqa", 0))
    var = with_kv_quant(model, "int4-g4")
    assert var.embed.weight is model.embed.weight
    assert var.new_cache(1, 8).nbytes() == costs(model.config, 8, "float32", kv_quant="int4-g4").kv_cache_bytes
    assert model.new_cache(1, 8).nbytes() == costs(model.config, 8, "float32").kv_cache_bytes  # the reference: not
    ids = torch.randint(0, 61, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    k = kl_divergence(model, var, ids, window=40)
    assert k.tokens == 39 and k.mean_kl > 0
    assert kl_divergence(model, with_kv_quant(model, None), ids, window=40).mean_kl == 0  # no format: identical


def test_eval_variant_kv_is_a_quantized_cache_and_a_bad_one_is_named():
    from kvlab.cli.evaluate import _variant

    model = random_model(tiny("gqa", 0))
    var = _variant("kv=int8-g4-r2", model)
    assert var.new_cache(1, 8).nbytes() == costs(model.config, 8, "float32", kv_quant="int8-g4-r2").kv_cache_bytes
    with pytest.raises(ValueError, match=r"kv_quant format='q3': allowed"):
        _variant("kv=q3", model)


def test_calc_prices_weights_and_kv_separately_with_resident_memory(capsys):
    """fp8 weights with an int4 cache: the weights at 1 B/param, the cache in int4 with bf16 scales and residual
    (not in fp8), the resident total = weights + K/V + state beside the per-step traffic."""
    from kvlab.cli import main

    assert main(["calc", "qwen3-8b", "--context", "32k", "--dtype", "fp8", "--kv-dtype", "int4", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    bf16 = costs("qwen3-8b", context=32768)
    q = costs("qwen3-8b", context=32768, kv_quant="int4")  # its residual and scales in bf16
    assert d["dtype"] == "float8" and d["kv_dtype"] == "bfloat16" and d["weights_bytes"] == bf16.params_total
    assert d["kv_cache_bytes"] == q.kv_cache_bytes < bf16.kv_cache_bytes // 3
    assert d["resident_bytes"] == bf16.params_total + q.kv_cache_bytes
    assert d["weight_read_bytes_per_step"] * 2 == bf16.weight_read_bytes_per_step
    assert main(["calc", "qwen3-8b", "--context", "32k", "--dtype", "fp8", "--kv-dtype", "fp8"]) == 0
    out = capsys.readouterr().out
    c = costs("qwen3-8b", context=32768, dtype="fp8", kv_quant="fp8")  # fp8 codes + a scale per group of 32
    assert bf16.kv_cache_bytes // 2 < c.kv_cache_bytes < bf16.kv_cache_bytes * 0.6
    row = next(x for x in out.splitlines() if x.startswith("resident memory (weights + K/V + state)"))
    assert row.split()[-3:] == [*fmt_bytes(c.params_total + c.kv_cache_bytes).split(),
                                f"{c.params_total + c.kv_cache_bytes:,}"]
    assert main(["calc", "qwen3-8b", "--dtype", "int3"]) == 2
    assert "kvlab: error: dtype='int3': allowed:" in capsys.readouterr().err


def test_resident_memory_counts_state_and_fp32_mhc_maps():
    cca = costs("zaya1-8b", context=1024)  # CCA: a constant conv/value state per sequence
    assert cca.kv_state_bytes > 0 and cca.resident_bytes == cca.params_total * 2 + cca.kv_cache_bytes
    v4 = costs("deepseek-v4-flash", context=1024, dtype="fp8")
    assert v4.params_mhc and v4.weights_bytes == v4.params_total + 3 * v4.params_mhc
