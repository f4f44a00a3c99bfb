"""The same-load benchmark's plan and its bf16 / fp32 table (benchmarks/same_load.py; the runs are outside CI)."""

from pathlib import Path

import pytest
import torch

from tests.helpers import load_benchmark


@pytest.fixture(scope="module")
def same_load():
    return load_benchmark("same_load")


def test_a_run_names_its_dtypes_and_lanes(same_load):
    assert same_load.parse_run("b/q.json:16k") == (Path("b/q.json"), 16384, ["float32"], True)
    assert same_load.parse_run("b/q.json:4k:bf16:eager") == (Path("b/q.json"), 4096, ["bfloat16"], False)
    assert same_load.parse_run("b/q.json:1k:fp32+bf16") == (Path("b/q.json"), 1024, ["float32", "bfloat16"], True)
    with pytest.raises(ValueError, match="'fp16' is not one of"):
        same_load.parse_run("b/q.json:1k:fp16")
    with pytest.raises(ValueError, match="not several"):
        same_load.parse_run("b/q.json:1k:bf16:fp32+bf16")


def record(dtype, eager_s, tf_s, interleaved=True, bw=10e9, read=1e9):
    r = {"shape": "q", "context": 4096, "dtype": dtype, "copy_bandwidth_before": bw, "copy_bandwidth_after": 2 * bw,
         "eager": {"tok_s": 1 / eager_s, "achieved_bandwidth": read / eager_s}, "transformers": {"tok_s": 1 / tf_s}}
    if interleaved:
        r["interleaved"] = ["float32", "bfloat16"]
    return r


def test_bf16_against_fp32_only_for_lanes_that_decoded_in_turns(same_load):
    runs = [record("float32", 0.2, 0.4), record("bfloat16", 0.1, 0.5, read=0.5e9),
            record("bfloat16", 0.01, 0.01, interleaved=False)]
    rows = same_load.dtype_table({"runs": runs}).splitlines()[2:]
    assert rows == ["| q | 4096 | eager | 5.00 | 10.00 | 2.00x | 50% | 50% |",
                    "| q | 4096 | transformers | 2.50 | 2.00 | 0.80x | - | - |"]
    assert same_load.dtype_table({"runs": runs[2:]}) == ""


def test_a_cast_cache_keeps_the_source_and_one_object_stays_one(same_load):
    import transformers as tf

    cache = tf.DynamicCache()
    k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    cache.update(k, v, 0)
    cache.update(k.clone(), k.clone(), 1)
    cache.layers[1].values = cache.layers[1].keys  # as DeepSeek V4's cache layers alias them
    cache.layers[0].extra = {"buf": [torch.ones(3)], "count": torch.tensor(7)}
    out = same_load.cast_cache(cache, torch.bfloat16)
    assert out.layers[0].keys.dtype == out.layers[0].values.dtype == torch.bfloat16
    assert torch.equal(out.layers[0].keys, k.to(torch.bfloat16))
    assert out.layers[1].values is out.layers[1].keys
    assert out.layers[0].extra["buf"][0].dtype == torch.bfloat16 and out.layers[0].extra["count"].dtype == torch.long
    assert cache.layers[0].keys.dtype == torch.float32 and torch.equal(cache.layers[0].keys, k)


def test_a_cast_transformers_cache_prints_no_prefill_ratio(same_load):
    r = record("bfloat16", 0.1, 0.2)
    r.update(kvlab_prefill={"tok_s": 100.0, "rss_delta": 2**20}, transformers_prefill=None,
             load={"start": 1.0}, first_compiled_step_s=None)
    row = same_load.table({"runs": [r]}).splitlines()[2]
    assert "| 100 / - (tf cache cast) | 1 / - MiB |" in row and "| 2.00x |" in row
