"""Decode over a quantized cache attends block by block (kvlab/layers/blocked.py over kvlab/cache/quant.py's
QuantView): it equals attention over the whole dequantized K/V (ring wrap-around, residual, keys per channel,
rotation, padding mask, sink logits) and the fake-quantization oracle across several blocks, and it never
dequantizes a whole buffer; ``kvlab bench --kv-dtype`` measures each format."""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch

from kvlab import kinds
from kvlab.cache import quant
from kvlab.cache.quant import QuantRows, QuantView
from kvlab.cli import main
from kvlab.config import ModelConfig
from kvlab.costs.quant import Buffer, QuantError, layout, parse_quant
from kvlab.layers import cpu_attend
from kvlab.layers.blocked import Cat, attend_blocked, values_in_keys
from kvlab.layers.core import attend
from tests.helpers import fake_quantized_decode
from tests.test_contract import CASES, random_model, tiny


@pytest.fixture(autouse=True)
def _blocked_path(monkeypatch):
    """The blocked path under test: the C++ kernel, which takes int8 / int4 GQA buffers first when on, is off here
    (tests/test_cpu_attend.py tests it against this path)."""
    monkeypatch.setattr(cpu_attend, "ENABLED", False)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def small_blocks(monkeypatch, positions: int, lead: int, dim: int) -> None:
    """Blocks of ``positions`` slots for a buffer of ``lead`` rows x ``dim`` channels."""
    monkeypatch.setattr(quant, "DECODE_BLOCK_BYTES", 4 * positions * lead * dim)


@pytest.mark.parametrize("text", ["int8-g4", "int8-g16-rot", "int4-g4-r3", "int4-g4-r3-rot-asym", "int8-g4-r2-kc",
                                  "int4-g4-r1-kc-rot-asym", "fp8-g8-r5",
                                  "fp4-g8"])
@pytest.mark.parametrize("ring", [None, 8], ids=["full", "ring8"])
@pytest.mark.parametrize("extras", ["plain", "mask+sinks"])
def test_blocked_attention_equals_attention_over_the_dequantized_buffers(monkeypatch, text, ring, extras):
    """Written in uneven chunks (wrapping around a ring of 8), every prefix attended in blocks of 3 positions (4
    with keys per channel) equals attention over the buffers read whole."""
    spec = parse_quant(text)
    b, hkv, g, d = 2, 2, 3, 16
    kb, vb = Buffer("kv", "k", hkv, 0, d, ring=ring, key=True), Buffer("kv", "v", hkv, 0, d, ring=ring)
    rows = [QuantRows(x, spec, (b, hkv), torch.float32, "cpu", max_length=None if ring is None else 8)
            for x in (kb, vb)]
    for r in rows:
        r.resize(40 if ring is None else 8, 0)
    small_blocks(monkeypatch, 3, b * hkv, d)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, b, hkv, 40, d, generator=gen)
    sinks = torch.randn(hkv * g, generator=gen) if extras != "plain" else None
    n, blocks = 0, set()
    for t in (1, 3, 1, 7, 1, 1, 9, 2, 1, 1, 13):
        for r, xi in zip(rows, x, strict=True):
            r.write(n, xi[..., n:n + t, :])
        n += t
        held = min(n, ring or n)
        views = [r.view(held) for r in rows]
        assert all(isinstance(v, QuantView) for v in views)
        blocks.add(views[0].block_size())
        q = torch.randn(b, hkv * g, 1, d, generator=gen)
        mask = None
        if extras != "plain":  # the first row left-padded: its first slots masked
            mask = torch.zeros(b, 1, 1, held)
            mask[0, ..., : held // 3] = float("-inf")
        got = attend_blocked(q, *views, mask, 0.25, sinks)
        want = attend(q, rows[0].read(held), rows[1].read(held), mask, 0.25, sinks=sinks)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    span = layout(spec, kb)["span"]
    assert blocks == {max(span, 3 // span * span)}  # several blocks per read (40 or 8 slots)


@pytest.mark.parametrize("text", ["int4-g4", "int4-g4-r3", "int8-g4-r2-kc", "int4-g4-kc-rot", "fp8-g8"])
@pytest.mark.parametrize("kind,example", [("gqa", 0), ("gqa", 1), ("cca", 0), ("cca", 1)])
def test_blocked_decode_equals_a_fake_quantized_full_forward(monkeypatch, kind, example, text):
    """tests/test_quant.py's oracle (one layer: its K/V come from the embeddings) with blocks of 4 positions, full
    layers and window rings (with sink logits): each decode step equals a full forward whose K/V pass through the
    same quantize-dequantize at the positions the cache holds quantized."""
    cfg = tiny(kind, example)
    spec = parse_quant(text)
    if spec.k_per_channel and cfg.layers[0].window is not None and cfg.layers[0].window % spec.group:
        pytest.skip("keys per channel need a window that is a multiple of the group (a named error)")
    if cfg.layers[0].window is not None and spec.residual + layout(spec, Buffer(
            "kv", "k", 1, 0, cfg.layers[0].head_dim, key=True))["span"] - 1 > cfg.layers[0].window:
        pytest.skip("the residual must fit the window (a named error)")
    cfg = ModelConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, layers=cfg.layers[:1],
                      max_positions=cfg.max_positions)
    model = random_model(cfg)
    s0 = cfg.layers[0]
    small_blocks(monkeypatch, 4, 2 * s0.num_kv_heads, max(s0.head_dim, s0.value_dim))
    for _, step, want in fake_quantized_decode(model, text, monkeypatch):
        torch.testing.assert_close(step, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("text", ["int4-g8", "int8-g4-kc"])
def test_a_decode_step_never_dequantizes_a_whole_buffer(monkeypatch, text):
    """At 200 positions with blocks of 64, a decode step reads every buffer in one pass, each block's keys then its
    values, in blocks of at most 64 slots that cover it once (codes and scales apart: ``raw_block``; keys per channel dequantized: ``read_block``), and never
    through ``read`` (the whole buffer); with DECODE_BLOCK_BYTES 0 it reads it whole. With a third layer reading the
    second's cache, that reader walks the second layer's quantized buffers in blocks too (nothing read whole)."""
    full = tiny("gqa", 0)  # layer 2 reads layer 1's K/V
    cfg = ModelConfig(vocab_size=full.vocab_size, hidden_size=full.hidden_size, layers=full.layers[:2],
                      max_positions=full.max_positions)
    model = random_model(cfg)
    cache = model.new_cache(1, max_length=210, kv_quant=text)
    model(torch.randint(0, cfg.vocab_size, (1, 200)), cache=cache)
    s0 = cfg.layers[0]
    small_blocks(monkeypatch, 64, s0.num_kv_heads, s0.head_dim)
    seen: list[tuple[int, int, int]] = []
    reads: list[int] = []
    real_block, real_raw, real_read = QuantRows.read_block, QuantRows.raw_block, QuantRows.read

    def spy_block(self, lo, hi, out, rows=None, written=None):
        seen.append((id(self), lo, hi))
        return real_block(self, lo, hi, out, rows, written)

    def spy_raw(self, lo, hi, out, written=None):
        seen.append((id(self), lo, hi))
        return real_raw(self, lo, hi, out, written)

    def spy_read(self, n=None, rows=None):
        reads.append(n)
        return real_read(self, n, rows)

    monkeypatch.setattr(QuantRows, "read_block", spy_block)
    monkeypatch.setattr(QuantRows, "raw_block", spy_raw)
    monkeypatch.setattr(QuantRows, "read", spy_read)
    model(torch.tensor([[3]]), cache=cache)
    assert reads == []
    k0, v0 = (id(r) for r in (cache.layers[0].buf.rows_k, cache.layers[0].buf.rows_v))
    blocks = [(0, 64), (64, 128), (128, 192), (192, 201)]  # one pass: each block's keys, then its values
    assert seen[:8] == [(key, lo, hi) for lo, hi in blocks for key in (k0, v0)]
    by_buffer: dict[int, list[tuple[int, int]]] = {}
    for key, lo, hi in seen:
        by_buffer.setdefault(key, []).append((lo, hi))
    assert len(by_buffer) == 4  # K and V of the two layers
    for spans in by_buffer.values():
        assert max(hi - lo for lo, hi in spans) == 64
        covered = sorted(set(spans))
        assert covered[0][0] == 0 and covered[-1][1] == 201
        assert all(a[1] == b[0] for a, b in itertools.pairwise(covered))
    monkeypatch.setattr(quant, "DECODE_BLOCK_BYTES", 0)
    model(torch.tensor([[4]]), cache=cache)
    assert reads == [202] * 4
    shared = random_model(full)
    cache = shared.new_cache(1, max_length=210, kv_quant=text)
    shared(torch.randint(0, cfg.vocab_size, (1, 200)), cache=cache)
    small_blocks(monkeypatch, 64, s0.num_kv_heads, s0.head_dim)
    reads.clear()
    seen.clear()
    shared(torch.tensor([[3]]), cache=cache)
    assert reads == []
    walks: dict[int, list[tuple[int, int]]] = {}
    for key, lo, hi in seen:
        walks.setdefault(key, []).append((lo, hi))
    assert len(walks) == 4 and all(max(hi - lo for lo, hi in w) == 64 for w in walks.values())
    # layer 0's K and V walked once; layer 1's twice: by itself, then by its reader (layer 2), nothing copied
    assert sorted(sorted(w) for w in walks.values()) == sorted([blocks] * 2 + [sorted(blocks * 2)] * 2)


@pytest.mark.parametrize("kv_quant", ["int4-g4-r3", "int8-g2-asym-rot", "int8-g4-r2-kc", "fp8-g4"])
@pytest.mark.parametrize("kind,example", [c for c in CASES if kinds.KINDS[c.values[0]].can_share])
def test_a_layer_reading_a_shared_quantized_cache_decodes_it_in_blocks(monkeypatch, kind, example, kv_quant):
    """Layer 1 reads layer 0's quantized cache (``kv_source``): a left-padded batch decodes through blocks of 2
    slots of the producer's buffers for both layers -- nothing read whole, no buffer of the reader's -- and equals
    the same steps with every buffer dequantized whole (DECODE_BLOCK_BYTES 0), each step from the same cache
    state. Layer 0's K/V come from the embeddings, so both paths quantize the same values."""
    cfg = tiny(kind, example, layers=2)
    assert cfg.layers[1].kv_source == 0
    spec = parse_quant(kv_quant)
    s0 = cfg.layers[0]
    model = random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 30), generator=torch.Generator().manual_seed(5))
    try:
        cache = model.new_cache(2, max_length=30, kv_quant=kv_quant)
    except QuantError as e:  # keys per channel or a residual that do not fit the window
        assert "window" in str(e)
        pytest.skip(f"a named error: {e}")
    assert cache.layers[1] is None
    cache.set_padding(torch.tensor([0, 3]))
    model(ids[:, :17], cache=cache)
    reads: dict[tuple, int] = {}
    real_read, real_block, real_raw = QuantRows.read, QuantRows.read_block, QuantRows.raw_block

    def count(key):
        reads[key] = reads.get(key, 0) + 1

    def spy_read(self, n=None, rows=None):
        count((id(self), "read", self.capacity if n is None else n))
        return real_read(self, n, rows)

    def spy_block(self, lo, hi, out, rows=None, written=None):
        count((id(self), "block", lo, hi))
        return real_block(self, lo, hi, out, rows, written)

    def spy_raw(self, lo, hi, out, written=None):
        count((id(self), "block", lo, hi))
        return real_raw(self, lo, hi, out, written)

    monkeypatch.setattr(QuantRows, "read", spy_read)
    monkeypatch.setattr(QuantRows, "read_block", spy_block)
    monkeypatch.setattr(QuantRows, "raw_block", spy_raw)
    for n in range(17, 30):
        other = copy.deepcopy(cache)
        small_blocks(monkeypatch, 2, 2 * s0.num_kv_heads, max(s0.head_dim, s0.value_dim))
        reads.clear()
        got = model(ids[:, n:n + 1], cache=cache)
        # every block (and a sink-token part that fits one block, read whole) read twice: by layer 0, then by its
        # reader; never a buffer read whole
        assert any(k[1] == "block" for k in reads) and set(reads.values()) == {2}
        assert all(k[2] <= 2 * (spec.group if spec.k_per_channel else 1) for k in reads if k[1] == "read")
        monkeypatch.setattr(quant, "DECODE_BLOCK_BYTES", 0)
        want = model(ids[:, n:n + 1], cache=other)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_bench_kv_dtype_runs_each_format(capsys, tmp_path):
    """One row per format and context; each quantized cache measured == calculated and smaller than fp32's."""
    cfg = tiny("gqa", 0)
    cfg.name = "tiny"
    path = tmp_path / "tiny.json"
    cfg.save(path)
    rc = main(["bench", str(path), "--context", "24", "--decode-tokens", "2", "--prefill-chunk", "8",
               "--bandwidth-mib", "4", "--no-progress", "--kv-dtype", "fp32,bf16,int8", "--kv-quant", "int4-g8",
               "--json"])
    out, err = capsys.readouterr()
    assert rc == 0 and "KV cache" in err and "int4-g8" in err
    r = json.loads(out)
    assert r["kv_dtypes"] == ["float32", "bfloat16", "int8", "int4-g8"]
    rows = {x["kv_dtype"]: x for x in r["results"]}
    assert [x["dtype"] for x in r["results"]] == ["float32", "bfloat16", "float32", "float32"]
    assert rows["int8"]["kv_quant"] == "int8-g32" and rows["float32"]["kv_quant"] == "none"
    for x in r["results"]:
        assert x["cache_bytes_match"] and x["decode_tok_s"] > 0
    fp32 = rows["float32"]["cache_bytes_measured"]
    assert rows["bfloat16"]["cache_bytes_measured"] * 2 == fp32
    assert fp32 > rows["int8"]["cache_bytes_measured"] > rows["int4-g8"]["cache_bytes_measured"]


def test_bench_bad_kv_dtype_is_a_named_error(capsys):
    assert main(["bench", "llama-3.1-8b", "--kv-dtype", "fp32,int3", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "kvlab: error:" in err and "--kv-dtype 'int3'" in err and "int8" in err and "Traceback" not in err


@pytest.mark.parametrize("kv_quant,block_bytes", [("int4-g4-r3", 1), ("fp8-g4-rope", 300), ("deepseek-v4", 1),
                                                  ("int8-g2-rot", 300), ("int4-g2-asym-rot", 1),
                                                  ("int8-g2-asym-rot", 300)])
@pytest.mark.parametrize("kind,example", CASES)
def test_blocked_decode_of_every_kind_equals_dequantizing_whole_buffers(monkeypatch, kind, example, kv_quant,
                                                                        block_bytes):
    """Every kind (GQA full, ring and sink-token window, CCA, MLA's latent and rotary key with and without DSA's
    indexer keys, CSA/HCA/SWA rings, entries and indexer keys) decodes a left-padded batch through readers walked in
    blocks of a few slots (1 byte: one slot, or a group's span, per block) as with every buffer dequantized whole
    (``DECODE_BLOCK_BYTES`` 0, what these kinds did before), each step from the same cache state (a copy), and a
    blocked step reads its buffers by blocks or chosen rows only, never more than a block at once. One layer, so every value
    written is the same on both paths: a later layer's input differs by float rounding, enough to flip a code at a
    rounding boundary and move the logits by 1e-4 (tests/test_contract.py checks 3 layers, sharing included)."""
    full = tiny(kind, example)
    cfg = ModelConfig(vocab_size=full.vocab_size, hidden_size=full.hidden_size, layers=full.layers[:1],
                      max_positions=full.max_positions)
    model = random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 30), generator=torch.Generator().manual_seed(3))
    cache = model.new_cache(2, max_length=30, kv_quant=kv_quant)
    cache.set_padding(torch.tensor([0, 3]))
    model(ids[:, :17], cache=cache)
    calls: dict[str, int] = {}

    def spy(name):
        real = getattr(QuantRows, name)

        def wrapped(self, *a, **k):
            whole = name == "read" and (a[0] if a else k.get("n")) > QuantView(self, 1).block_size()
            calls[name + " whole" * whole] = calls.get(name, 0) + 1
            return real(self, *a, **k)

        monkeypatch.setattr(QuantRows, name, wrapped)

    for name in ("read", "read_block", "raw_block", "gather"):
        spy(name)
    for n in range(17, 30):
        other = copy.deepcopy(cache)
        monkeypatch.setattr(quant, "DECODE_BLOCK_BYTES", block_bytes)
        calls.clear()
        got = model(ids[:, n:n + 1], cache=cache)
        assert "read whole" not in calls and set(calls) - {"read"}  # blocks (or a top-k's rows); a part that fits one
        # block (a sink-token window's sinks) read whole, as a buffer that fits one block always was
        monkeypatch.setattr(quant, "DECODE_BLOCK_BYTES", 0)
        want = model(ids[:, n:n + 1], cache=other)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("text", ["int8-g4", "int4-g4-r3", "fp8-g8-r5-rope", "int4-g4-r2-kc-rot-asym"])
@pytest.mark.parametrize("joined", ["k=v", "channels", "positions"])
def test_one_pass_when_the_values_are_in_the_keys(monkeypatch, text, joined):
    """Values that are the keys (CSA/HCA/SWA rings; a position Cat of ring and entries) or the keys' first channels
    (MLA: c_kv of [c_kv, k_pe], two buffers quantized apart) are attended in one pass with an online softmax, blocks of
    3 positions (keys per channel: 4) and two readers alive at once: equal to attention over the buffers read whole,
    with a padding mask and sink logits, at every prefix of uneven writes."""
    spec = parse_quant(text)
    b, g = 2, 4
    bufs = [Buffer("kv", "k", 1, 0, 16, key=True, rope=8), Buffer("kv", "k", 1, 0, 8, key=True, rope=8)]
    rows = [QuantRows(x, spec, (b, 1), torch.float32, "cpu") for x in bufs]
    for r in rows:
        r.resize(40, 0)
    small_blocks(monkeypatch, 3, b, 16)
    gen = torch.Generator().manual_seed(2)
    x = [torch.randn(b, 1, 40, r.dq + r.tail_dim, generator=gen) for r in rows]
    sinks = torch.randn(g, generator=gen)
    n = 0
    for t in (1, 3, 1, 7, 1, 9, 2, 1, 13):
        for r, xi in zip(rows, x, strict=True):
            r.write(n, xi[..., n:n + t, :])
        n += t
        views = [r.view(n) for r in rows]
        if joined == "k=v":
            k = v = views[0]
            kd = vd = rows[0].read(n)
        elif joined == "channels":
            k = Cat(views, -1)
            v = k.parts[0]
            kd, vd = torch.cat([r.read(n) for r in rows], -1), rows[0].read(n)
        else:
            k = v = Cat([views[0], rows[0].read(n)[..., : n // 2, :]], -2)  # a reader then a tensor
            kd = vd = torch.cat((rows[0].read(n), rows[0].read(n)[..., : n // 2, :]), -2)
        assert values_in_keys(k, v)
        q = torch.randn(b, g, 1, kd.shape[-1], generator=gen)
        mask = torch.zeros(b, 1, 1, kd.shape[-2])
        mask[0, ..., : kd.shape[-2] // 3] = float("-inf")
        got = attend_blocked(q, k, v, mask, 0.25, sinks)
        want = attend(q, kd, vd, mask, 0.25, sinks=sinks)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
