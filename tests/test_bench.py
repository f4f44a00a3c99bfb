"""The benchmark on tiny random models: measured cache bytes equal the calculator's and a hand count."""

import dataclasses
import json

import pytest

from kvlab import hugepages
from kvlab.bench import copy_bandwidth, run_bench
from kvlab.cli import main
from kvlab.config import GQASpec, ModelConfig, MoESpec, uniform_layers
from kvlab.costs import costs
from kvlab.families import config_from_hf, to_hf_config

KV_HEADS, HEAD_DIM = 2, 16


def tiny(window=None, shared=False, **kw) -> ModelConfig:
    spec = {"num_heads": 4, "num_kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "intermediate_size": 96, **kw}
    layers = uniform_layers(2, **spec)
    layers[1].window = window
    if shared:
        layers.append(dataclasses.replace(layers[0], kv_source=0))
    return ModelConfig(vocab_size=101, hidden_size=64, layers=layers, max_positions=2048, name="tiny")


def test_bench_cli_json_measured_equals_calculated(capsys, tmp_path):
    cfg = tiny(window=8, shared=True)
    path = tmp_path / "tiny.json"
    cfg.save(path)
    rc = main(["bench", str(path), "--context", "40", "--decode-tokens", "4", "--prefill-chunk", "16",
               "--bandwidth-mib", "8", "--no-progress", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert "cache measured" in err and "decode tok/s" in err  # the card goes to stderr under --json
    r = json.loads(out)
    (row,) = r["results"]
    per_pos = 2 * KV_HEADS * HEAD_DIM * 4  # K + V, fp32
    by_hand = per_pos * 44 + per_pos * 8  # layer 0: 40 + 4 positions; layer 1: window 8; layer 2 shares layer 0
    assert row["max_length"] == 44
    assert row["cache_bytes_measured"] == row["cache_bytes_calculated"] == by_hand
    assert row["cache_bytes_calculated"] == costs(cfg, context=44, dtype="float32").kv_cache_bytes
    assert row["cache_bytes_match"] is True
    assert len(row["decode_steps_s"]) == 4 and row["decode_tok_s"] > 0 and row["prefill_tok_s"] > 0
    assert 0 < row["bandwidth_utilisation"] and r["copy_bandwidth_bytes_s"] > 0
    # the kernel's peak (getrusage) comes from RSS counters that can lag the RSS the sampler reads from /proc by a few
    # hundred KiB (Linux 6.18: 115-368 KiB behind, after huge pages were mapped and freed earlier in the process)
    assert row["ru_maxrss_bytes"] * 1.01 >= row["rss_peak_bytes"] > 0
    assert r["machine"]["torch"] and r["machine"]["threads"] >= 1 and r["machine"]["cpu_count"] >= 1
    assert f"huge pages {hugepages.describe()}, " in err and r["machine"]["huge_pages"] == hugepages.describe()
    assert r["scaled"] == []


def test_bench_batch_and_moe():
    cfg = tiny(mlp="moe", moe=MoESpec(num_experts=4, top_k=2, expert_size=32), intermediate_size=0)
    r = run_bench(cfg, [24, 33], decode_tokens=3, batch=2, prefill_chunk=10, bandwidth_bytes=4 * 1024**2,
                  progress=False, log=lambda _: None)
    for row, ctx in zip(r["results"], (24, 33), strict=True):
        assert row["cache_bytes_measured"] == 2 * 2 * (2 * KV_HEADS * HEAD_DIM * 4) * (ctx + 3)
        assert row["cache_bytes_match"]


def test_bench_rejects_too_long_context():
    with pytest.raises(ValueError, match="max_positions"):
        run_bench(dataclasses.replace(tiny(), max_positions=64), [64], decode_tokens=4, progress=False,
                  log=lambda _: None)


def test_copy_bandwidth_is_positive():
    assert copy_bandwidth(4 * 1024**2, repeats=2) > 1e6


def test_hf_config_round_trips_or_refuses():
    pytest.importorskip("transformers")
    assert to_hf_config(tiny())["architectures"] == ["LlamaForCausalLM"]
    assert to_hf_config(tiny(gqa=GQASpec(qk_norm=True)))["architectures"] == ["Qwen3ForCausalLM"]
    with pytest.raises(ValueError, match="no transformers family"):
        to_hf_config(tiny(sinks=True))


def test_the_family_a_config_was_read_as_writes_it_back():
    small = {"vocab_size": 101, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 96, "max_position_embeddings": 2048}
    cfg = config_from_hf({"architectures": ["MistralForCausalLM"], **small, "sliding_window": None})
    assert cfg.family == "MistralForCausalLM"
    d = to_hf_config(cfg)  # Llama could write this shape too (no window): the recorded family decides
    assert d["architectures"] == ["MistralForCausalLM"] and d["model_type"] == "mistral"
    assert config_from_hf(d).layers == cfg.layers
    untagged = ModelConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k != "family"})  # an older save
    assert untagged.family is None and to_hf_config(untagged)["architectures"] == ["LlamaForCausalLM"]
    cfg.layers[1].window = 8  # Mistral has one window for every layer
    with pytest.raises(ValueError, match="MistralForCausalLM cannot hold"):
        to_hf_config(cfg)


def test_bench_vs_transformers_same_cache_bytes():
    pytest.importorskip("transformers")
    r = run_bench(tiny(), [32], decode_tokens=3, vs="transformers", prefill_chunk=16, bandwidth_bytes=4 * 1024**2,
                  progress=False, log=lambda _: None)
    (ours,), (theirs,), (ratio,) = r["results"], r["transformers"], r["ratios"]
    # full attention, 32 + 3 positions: the preallocated cache and transformers' grown cache hold the same bytes
    assert ours["cache_bytes_measured"] == theirs["cache_bytes_measured"] == 2 * (2 * KV_HEADS * HEAD_DIM * 4) * 35
    assert ratio["decode_tok_s"] > 0 and ratio["prefill_tok_s"] > 0 and ratio["cache_bytes"] == 1.0


def test_bench_compiled_beside_eager(capsys, tmp_path, monkeypatch):
    """``--compile``: every context eager then compiled (dynamo traced without code generation here); the first
    compiled step of a new cache size is reported apart, its graph counted; the speedups pair the rows."""
    from kvlab import compiled

    monkeypatch.setattr(compiled, "DEFAULT_BACKEND", "eager")
    path = tmp_path / "tiny.json"
    tiny(window=8).save(path)
    rc = main(["bench", str(path), "--context", "24,40", "--decode-tokens", "3", "--prefill-chunk", "16",
               "--bandwidth-mib", "8", "--no-progress", "--compile", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0 and "compiled/eager" in err
    r = json.loads(out)
    eager = [x for x in r["results"] if not x["compiled"]]
    comp = [x for x in r["results"] if x["compiled"]]
    assert [x["context"] for x in eager] == [x["context"] for x in comp] == [24, 40]
    assert all(x["cache_bytes_match"] for x in r["results"])
    assert [x["max_length"] for x in comp] == [28, 44]  # one spare position (kvlab/bench.py)
    assert comp[0]["compiles"] >= 1 and comp[0]["first_step_s"] > 0 and len(comp[0]["decode_steps_s"]) == 3
    assert all(x["compiles"] == 0 for x in eager)
    for q, e, c in zip(r["compile_speedup"], eager, comp, strict=True):
        assert q["speedup"] == c["decode_tok_s"] / e["decode_tok_s"] and q["context"] == e["context"]


def test_bench_compile_bad_backend_is_named():
    from kvlab.compiled import CompileError

    with pytest.raises(CompileError, match="compile='inductr'"):
        run_bench(tiny(), [24], decode_tokens=2, compile="inductr", progress=False, log=lambda _: None)


def test_generate_cli_compile(capsys, tmp_path, monkeypatch):
    """``kvlab generate --compile``: the eager tokens; the JSON reports the compile apart from the decode rate."""
    import kvlab
    from kvlab import compiled

    monkeypatch.setattr(compiled, "DEFAULT_BACKEND", "eager")
    d = tmp_path / "ckpt"
    kvlab.save(kvlab.Model.from_config(tiny(window=8), seed=0), d)
    runs = []
    for extra in ([], ["--compile"]):
        assert main(["generate", str(d), "--ids", "1,2,3", "--max-new-tokens", "12", "--stop", "none", "--json",
                     *extra]) == 0
        runs.append(json.loads(capsys.readouterr().out))
    assert runs[1]["output_ids"] == runs[0]["output_ids"] and len(runs[0]["output_ids"]) == 12
    assert runs[1]["compiled"] and runs[1]["compiles"] >= 1 and runs[1]["decode_tok_s"] > 0
    assert not runs[0]["compiled"] and runs[0]["compiles"] == 0


def test_bench_device(capsys, tmp_path):
    """``--device``: a device that is not here is refused by name; on CUDA (where there is one) the run is on the GPU,
    its cache measured == calculated, with the GPU's memory figures; on the CPU no device memory is reported."""
    import torch

    path = tmp_path / "tiny.json"
    tiny(window=8).save(path)
    args = ["bench", str(path), "--context", "24", "--decode-tokens", "2", "--prefill-chunk", "16",
            "--bandwidth-mib", "8", "--no-progress", "--json"]
    gpu = torch.cuda.is_available()
    if not gpu:
        assert main(args + ["--device", "cuda"]) == 2
        assert "--device 'cuda': there is no CUDA device here" in capsys.readouterr().err
    rc = main(args + ["--device", "cuda" if gpu else "cpu"])
    out, err = capsys.readouterr()
    assert rc == 0
    r = json.loads(out)
    (row,) = r["results"]
    assert r["device"] == r["machine"]["device"] == ("cuda" if gpu else "cpu")
    assert row["cache_bytes_match"] and row["decode_tok_s"] > 0
    assert ("device_mem_peak_bytes" in row) == gpu and ("peak GPU mem" in err) == gpu
    if gpu:
        assert row["device_mem_delta_bytes"] >= row["cache_bytes_measured"]  # the cache is allocated on the GPU


def test_bench_card_pairs_transformers_rows_by_context(capsys, tmp_path, monkeypatch):
    """With ``--compile --vs transformers`` the kvlab rows alternate eager / compiled: the transformers table still
    names each of its own contexts."""
    pytest.importorskip("transformers")
    from kvlab import compiled
    from kvlab.bench import format_card

    monkeypatch.setattr(compiled, "DEFAULT_BACKEND", "eager")
    r = run_bench(tiny(), [16, 24], decode_tokens=2, vs="transformers", prefill_chunk=16, compile=True,
                  bandwidth_bytes=4 * 1024**2, progress=False, log=lambda _: None)
    assert [q["context"] for q in r["ratios"]] == [x["context"] for x in r["transformers"]] == [16, 24]
    card = format_card(r)
    hf_table = card.split("kvlab/transformers ratios:")[1]
    rows = [line.split()[0] for line in hf_table.strip().splitlines()[2:4]]
    assert rows == ["16", "24"], hf_table


def test_bench_fused_beside_blocked(capsys, tmp_path, monkeypatch):
    """``--fused``: each quantized format decoded block by block and fused (kvlab/layers/fused.py, traced by the
    eager backend here), in turns; the fused lane's first step (its kernel's compile) is reported apart and counted;
    fused_speedup pairs the rows; a float cache has no fused lane, and --fused without a quantized one is refused."""
    from kvlab.cache import quant
    from kvlab.layers import fused

    monkeypatch.setattr(fused, "BACKEND", "eager")
    monkeypatch.setattr(fused, "_COMPILED", {})
    monkeypatch.setattr(quant, "DECODE_BLOCK_BYTES", 4 * KV_HEADS * HEAD_DIM * 8)  # 8 positions a block
    path = tmp_path / "tiny.json"
    tiny().save(path)
    rc = main(["bench", str(path), "--context", "40", "--decode-tokens", "3", "--prefill-chunk", "16",
               "--bandwidth-mib", "8", "--no-progress", "--kv-dtype", "fp32,int8", "--fused", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0 and "fused/default" in err
    r = json.loads(out)
    assert [(x["kv_dtype"], x["fused"]) for x in r["results"]] == [("float32", False), ("int8", False), ("int8", True)]
    blocked, fast = r["results"][1:]
    assert fast["compiles"] >= 1 and blocked["compiles"] == 0 and len(fast["decode_steps_s"]) == 3
    assert blocked["cache_bytes_measured"] == fast["cache_bytes_measured"] and fast["cache_bytes_match"]
    (q,) = r["fused_speedup"]
    assert q["speedup"] == fast["decode_tok_s"] / blocked["decode_tok_s"] and not q["compiled"]
    assert main(["bench", str(path), "--context", "40", "--fused", "--no-progress"]) == 2
    assert "kvlab: error: --fused attends quantized caches" in capsys.readouterr().err


@pytest.mark.parametrize("cpp", [True, False])
def test_bench_compiled_quantized_lane(capsys, tmp_path, monkeypatch, cpp):
    """``--kv-dtype int8 --compile``: the compiled lane's cache is the plain one where the C++ kernel attends it (a
    custom op in the graph; both rows say ``cpp_kernel``), else made with fused=True (one graph for the decode);
    paired with the eager lane in compile_speedup."""
    from kvlab import compiled
    from kvlab.cache import quant
    from kvlab.layers import cpu_attend, fused

    monkeypatch.setattr(cpu_attend, "ENABLED", cpp)

    monkeypatch.setattr(compiled, "DEFAULT_BACKEND", "eager")
    monkeypatch.setattr(fused, "BACKEND", "eager")
    monkeypatch.setattr(quant, "DECODE_BLOCK_BYTES", 4 * KV_HEADS * HEAD_DIM * 8)
    path = tmp_path / "tiny.json"
    tiny().save(path)
    rc = main(["bench", str(path), "--context", "40", "--decode-tokens", "2", "--prefill-chunk", "20",
               "--bandwidth-mib", "8", "--no-progress", "--kv-dtype", "int8", "--compile", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    r = json.loads(out)
    assert [(x["compiled"], x["fused"], x["cpp_kernel"]) for x in r["results"]] == [
        (False, False, cpp), (True, not cpp, cpp)]
    (q,) = r["compile_speedup"]
    assert q["fused"] is not cpp and q["speedup"] == r["results"][1]["decode_tok_s"] / r["results"][0]["decode_tok_s"]
