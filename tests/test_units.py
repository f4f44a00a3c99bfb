"""Context-length parsing and size formatting."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvlab.units import (
    fmt_bytes,
    fmt_context,
    fmt_count,
    fmt_flops,
    parse_context,
    parse_contexts,
    parse_dtype,
    table,
)


@pytest.mark.parametrize("text,expected", [
    ("128k", 131072), ("1m", 1048576), ("131072", 131072), ("32K", 32768), ("1M", 1048576), (" 8k ", 8192),
    ("1.5k", 1536), ("2g", 2 * 1024**3), ("4_096", 4096), (4096, 4096), ("1", 1),
])
def test_parse_context(text, expected):
    assert parse_context(text) == expected


@pytest.mark.parametrize("text", ["", "k", "abc", "12x", "-5", "0", "0k", "1.3", "1.0001k", "8k,32k", "128 kb", "1e3"])
def test_parse_context_rejects_garbage_with_a_clear_message(text):
    with pytest.raises(ValueError, match="context length"):
        parse_context(text)


def test_parse_context_rejects_bool():
    with pytest.raises(TypeError):
        parse_context(True)


def test_parse_contexts():
    assert parse_contexts("8k,32k,128k,1m") == [8192, 32768, 131072, 1048576]
    assert parse_contexts("4096") == [4096]
    assert parse_contexts(" 8k , 16k") == [8192, 16384]
    assert parse_contexts(["1k", 7]) == [1024, 7]
    for bad in ("8k,,32k", "8k,", ",", "8k,zz"):
        with pytest.raises(ValueError):
            parse_contexts(bad)


@given(st.integers(min_value=1, max_value=2**34))
def test_fmt_context_round_trips(n):
    assert parse_context(fmt_context(n)) == n
    assert parse_context(str(n)) == n


def test_fmt_context():
    assert [fmt_context(n) for n in (131072, 1048576, 1000, 1536, 3 * 1024**2)] == ["128k", "1m", "1000", "1536", "3m"]


def test_fmt_bytes():
    assert fmt_bytes(0) == "0 B"
    assert fmt_bytes(1023) == "1023 B"
    assert fmt_bytes(1024) == "1.00 KiB"
    assert fmt_bytes(5 * 1024**2 + 512 * 1024) == "5.50 MiB"
    assert fmt_bytes(5435817984) == "5.06 GiB"
    assert fmt_bytes(2**40) == "1.00 TiB"
    assert fmt_bytes(4294967296, exact=True) == "4.00 GiB (4,294,967,296 B)"
    assert fmt_bytes(-2048) == "-2.00 KiB"
    assert fmt_bytes(128 * 1024**2, short=True) == "128 MiB"
    assert fmt_bytes(1.5 * 1024**3, short=True) == "1.5 GiB"
    assert fmt_bytes(512, short=True) == "512 B"


def test_fmt_count_and_flops():
    assert fmt_count(8030261248) == "8.03B"
    assert fmt_count(760_500_000) == "760.50M"
    assert fmt_count(1500) == "1.50K"
    assert fmt_count(999) == "999"
    assert fmt_count(3.4e12) == "3.40T"
    assert fmt_flops(32.7e9) == "32.70 GFLOP"
    assert fmt_flops(161e9) == "161.00 GFLOP"
    assert fmt_flops(12) == "12 FLOP"


def test_parse_dtype():
    assert parse_dtype("bf16") == parse_dtype("BFloat16") == parse_dtype("torch.bfloat16") == "bfloat16"
    assert parse_dtype("fp32") == "float32"
    assert parse_dtype("half") == "float16"
    with pytest.raises(ValueError, match="dtype 'int3'"):
        parse_dtype("int3")


def test_table_aligns_columns():
    out = table(["name", "bytes"], [["a", 1], ["long-name", 12345]]).splitlines()
    assert out[0] == "name       bytes"
    assert out[1] == "---------  -----"
    assert out[2] == "a              1"
    assert out[3] == "long-name  12345"
    assert table(["num", "name"], [[1, "ab"]], align="rl").splitlines()[2] == "  1  ab"
