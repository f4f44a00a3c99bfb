"""The command line, in-process: JSON equals the calculator, errors exit 2, every verb has an example."""

import io
import json

import pytest
import torch

from kvlab.cli import main
from kvlab.config import ModelConfig, uniform_layers
from kvlab.costs import costs
from kvlab.presets import get_preset, presets

VERBS = ["calc", "compare", "inspect", "fit", "generate", "chat", "eval", "bench", "retrofit", "presets"]


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def last_json(out):
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture
def tiny_json(tmp_path):
    layers = uniform_layers(3, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=96)
    layers[1].window = 8
    layers[2].kv_source = 0
    cfg = ModelConfig(vocab_size=101, hidden_size=64, layers=layers, max_positions=4096, name="tiny")
    path = tmp_path / "tiny.json"
    cfg.save(path)
    return cfg, path


def test_calc_json_equals_costs(capsys):
    name = "llama-3.1-8b" if "llama-3.1-8b" in presets() else presets()[0]
    rc, out, _ = run(capsys, "calc", name, "--context", "32k", "--dtype", "bf16", "--json")
    assert rc == 0
    got = last_json(out)
    want = costs(get_preset(name), context=32768, dtype="bfloat16").to_dict()
    for key in ("params_total", "params_embedding", "params_active", "kv_cache_bytes", "kv_read_bytes_per_step",
                "weight_read_bytes_per_step", "flops_per_token", "attn_flops_per_token", "prefill_flops"):
        assert got[key] == want[key], key
    assert got["context"] == 32768
    if name == "llama-3.1-8b":  # REFERENCE.md: 4,294,967,296 B at 32K in bf16
        assert got["kv_cache_bytes"] == 4_294_967_296


def test_calc_table(capsys, tiny_json):
    cfg, path = tiny_json
    rc, out, _ = run(capsys, "calc", path, "--context", "1k", "--dtype", "fp32", "--batch", "2")
    assert rc == 0
    c = costs(cfg, context=1024, dtype="float32", batch=2)
    assert f"{c.kv_cache_bytes:,}" in out and f"{c.params_total:,}" in out
    assert "KV cache" in out and "assumptions:" in out and "FLOPs per token" in out


def test_calc_defaults_to_max_positions(capsys, tiny_json):
    cfg, path = tiny_json
    rc, out, _ = run(capsys, "calc", path, "--json")
    assert rc == 0 and last_json(out)["context"] == cfg.max_positions


def test_compare_json_and_ratios(capsys, tiny_json):
    cfg, path = tiny_json
    other = presets()[0]
    rc, out, _ = run(capsys, "compare", path, other, "--context", "8k,32k", "--dtype", "fp16", "--json")
    assert rc == 0
    got = last_json(out)
    assert got["contexts"] == [8192, 32768]
    a, b = got["models"]
    for i, ctx in enumerate((8192, 32768)):
        ka = costs(cfg, context=ctx, dtype="float16").kv_cache_bytes
        kb = costs(get_preset(other), context=ctx, dtype="float16").kv_cache_bytes
        assert (a["kv_cache_bytes"][i], b["kv_cache_bytes"][i]) == (ka, kb)
        assert a["ratio_to_first"][i] == 1.0
        assert b["ratio_to_first"][i] == pytest.approx(kb / ka)


def test_compare_table_marks_contexts_beyond_max_positions(capsys, tiny_json):
    _, path = tiny_json
    rc, out, _ = run(capsys, "compare", path, path, "--context", "1k,8k")
    assert rc == 0
    assert "*" in out and "beyond the model's max_positions" in out and "ratio to tiny" in out


def test_compare_plot_writes_png(capsys, tmp_path, tiny_json):
    _, path = tiny_json
    png = tmp_path / "sub" / "kv.png"
    rc, out, _ = run(capsys, "compare", path, presets()[0], "--context", "1k,4k,16k", "--plot", png)
    assert rc == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert str(png) in out


def test_inspect_json_per_layer(capsys, tiny_json):
    cfg, path = tiny_json
    rc, out, _ = run(capsys, "inspect", path, "--context", "2k", "--dtype", "fp32", "--json")
    assert rc == 0
    got = last_json(out)
    c = costs(cfg, context=2048, dtype="float32")
    assert len(got["layers"]) == cfg.num_layers
    assert [x["kv_bytes"] for x in got["layers"]] == [x.kv_bytes for x in c.per_layer]
    assert sum(x["kv_bytes"] for x in got["layers"]) == got["kv_cache_bytes"] == c.kv_cache_bytes
    # by hand: layer 0 full 2048 positions, layer 1 a window of 8, layer 2 shares layer 0's
    per_pos = 2 * 2 * 16 * 4  # K and V, 2 kv heads, head_dim 16, fp32
    assert [x["kv_bytes"] for x in got["layers"]] == [per_pos * 2048, per_pos * 8, 0]
    assert got["layers"][2]["kv_source"] == 0 and got["layers"][1]["window"] == 8


def test_inspect_and_compare_price_8bit_weights_and_quantized_kv(capsys, tiny_json):
    """fp8 / int8 weights as calc prices them (K/V in bf16 unless told), a quantized cache per layer."""
    cfg, path = tiny_json
    rc, out, _ = run(capsys, "inspect", path, "--context", "2k", "--dtype", "fp8", "--kv-quant", "int4-g8",
                     "--json")
    assert rc == 0
    got = last_json(out)
    c = costs(cfg, context=2048, dtype="fp8", kv_quant="int4-g8")
    plain = costs(cfg, context=2048, dtype="fp8")
    assert (got["dtype"], got["kv_dtype"]) == ("float8", "bfloat16") and got["kv_quant"] == c.kv_quant
    assert [x["kv_bytes"] for x in got["layers"]] == [x.kv_bytes for x in c.per_layer]
    assert got["kv_cache_bytes"] == c.kv_cache_bytes < plain.kv_cache_bytes
    rc, out, _ = run(capsys, "compare", path, path, "--context", "1k", "--dtype", "int8", "--json")
    got = last_json(out)
    assert rc == 0 and (got["dtype"], got["kv_dtype"]) == ("int8", "bfloat16")
    assert got["models"][0]["kv_cache_bytes"] == [costs(cfg, context=1024, dtype="int8").kv_cache_bytes]
    assert got["models"][0]["kv_cache_bytes"] == [costs(cfg, context=1024, dtype="bf16").kv_cache_bytes]
    rc, out, _ = run(capsys, "inspect", path, "--context", "1k", "--dtype", "fp8")
    assert rc == 0 and "weights float8" in out.splitlines()[0] and "bfloat16 K/V" in out.splitlines()[0]


def test_inspect_table(capsys, tiny_json):
    _, path = tiny_json
    rc, out, _ = run(capsys, "inspect", path, "--context", "2k")
    assert rc == 0
    lines = out.splitlines()
    assert "kv src" in lines[1] and "KV @ 2k" in lines[1]
    assert lines[-1].startswith("all")


@pytest.mark.parametrize("argv,needle", [
    (["calc", "llama-3.1-8b", "--context", "12x"], "context length '12x'"),
    (["compare", "llama-3.1-8b", "--context", "8k,,1m"], "context list"),
    (["calc", "no-such-model"], "no-such-model"),
    (["calc", "llama-3.1-8b", "--dtype", "int3"], "dtype"),
    (["inspect", "llama-3.1-8b", "--context", "0"], "context length"),
    (["generate", "no-such-dir", "--ids", "1"], "no-such-dir"),
    (["bench", "llama-3.1-8b", "--context", "abc"], "context length"),
])
def test_errors_exit_2_with_a_message(capsys, argv, needle):
    rc, _, err = run(capsys, *argv)
    assert rc == 2
    assert err.startswith("kvlab: error:") and needle in err
    assert "Traceback" not in err


def test_usage_error_exits_2(capsys):
    rc, _, err = run(capsys, "calc")
    assert rc == 2 and "usage" in err


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_help_has_an_example(capsys, verb):
    rc, out, _ = run(capsys, verb, "--help")
    assert rc == 0
    assert "Example" in out and f"kvlab {verb}" in out.split("Example", 1)[1]


def test_presets_json(capsys):
    rc, out, _ = run(capsys, "presets", "--json")
    assert rc == 0
    assert [p["name"] for p in last_json(out)["presets"]] == presets()


def test_python_dash_m():
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "kvlab", "calc", "mha-32l-4096", "--context", "1k", "--json"],
                       check=False, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert last_json(p.stdout)["kv_cache_bytes"] == costs("mha-32l-4096", context=1024).kv_cache_bytes


# -- generate -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    pytest.importorskip("transformers")
    from kvlab.bench import save_random_hf

    cfg = ModelConfig(vocab_size=64, hidden_size=32, max_positions=256, name="tiny-llama",
                      layers=uniform_layers(2, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64))
    d = tmp_path_factory.mktemp("ckpt")
    save_random_hf(cfg, d)
    return d


def test_generate_ids_equals_library(capsys, checkpoint):
    import kvlab
    from kvlab.engine import generate

    rc, out, _ = run(capsys, "generate", checkpoint, "--ids", "1,2,3", "--max-new-tokens", "5", "--json")
    assert rc == 0
    got = last_json(out)
    model = kvlab.load(str(checkpoint))
    want = generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=5)[0, 3:].tolist()
    assert got["prompt_ids"] == [1, 2, 3] and got["output_ids"] == want and got["text"] is None


def test_generate_without_tokenizer_needs_ids(capsys, checkpoint):
    rc, _, err = run(capsys, "generate", checkpoint, "--prompt", "hello")
    assert rc == 2 and "no tokenizer.json" in err and "--ids" in err


def test_generate_prompt_with_tokenizer(capsys, checkpoint, tmp_path):
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers

    d = tmp_path / "with-tok"
    shutil.copytree(checkpoint, d)
    words = ["[unk]"] + [f"w{i}" for i in range(63)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[unk]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(d / "tokenizer.json"))
    rc, out, _ = run(capsys, "generate", d, "--prompt", "w1 w2 w3", "--max-new-tokens", "4", "--json")
    assert rc == 0
    got = last_json(out)
    assert got["prompt_ids"] == [2, 3, 4] and len(got["output_ids"]) == 4
    assert got["text"] == " ".join(words[i] for i in got["output_ids"])
    rc, out, _ = run(capsys, "generate", d, "--prompt", "w1 w2 w3", "--max-new-tokens", "4", "--stream")
    assert rc == 0 and out.strip() == got["text"]  # streamed piece by piece, same text


def test_calc_and_bench_on_a_checkpoint_dir(capsys, checkpoint):
    stored = json.loads((checkpoint / "config.json").read_text())["dtype"]
    assert stored == "float32"  # what transformers wrote: the checkpoint's own dtype is priced by default
    rc, out, _ = run(capsys, "calc", checkpoint, "--context", "200", "--json")
    assert rc == 0 and last_json(out)["dtype"] == "float32"
    assert last_json(out)["kv_cache_bytes"] == costs(str(checkpoint), context=200).kv_cache_bytes == 2 * 2 * 2 * 8 * 4 * 200
    rc, out, _ = run(capsys, "calc", checkpoint, "--context", "200", "--dtype", "bf16", "--json")
    assert rc == 0 and last_json(out)["kv_cache_bytes"] == 2 * 2 * 2 * 8 * 2 * 200  # told otherwise
    rc, out, _ = run(capsys, "bench", checkpoint, "--context", "100", "--decode-tokens", "3", "--bandwidth-mib", "4",
                     "--no-progress", "--json")
    assert rc == 0
    r = last_json(out)
    assert r["checkpoint"] is True and r["scaled"] == []
    assert r["results"][0]["cache_bytes_measured"] == 2 * 2 * 2 * 8 * 4 * 103  # layers, K+V, kv heads, dim, fp32


# -- one convention: with --json, standard output is exactly one JSON object -----------------------------------
def _json_argv(verb, tmp_path, tiny_path, checkpoint):
    """Cheap arguments for each verb; every run shows its progress (no --no-progress)."""
    train_cfg = {"model": {"hidden_size": 32, "layers": [{"repeat": 2, "num_heads": 2, "num_kv_heads": 1,
                                                          "head_dim": 16, "intermediate_size": 64}]},
                 "task": {"kind": "passkey", "seq_len": 24, "digits": 3},
                 "train": {"steps": 2, "batch_size": 2, "threads": 1, "eval_batches": 1}}
    if verb == "train":
        (tmp_path / "run.json").write_text(json.dumps(train_cfg))
        return ["train", tmp_path / "run.json", "--out", tmp_path / "run"]
    if verb in ("chat", "eval", "retrofit"):
        from helpers import save_text_checkpoint

        d = save_text_checkpoint(tmp_path / "text")
        return {"chat": ["chat", d, "--max-new-tokens", "2"], "eval": ["eval", d, "--window", "64"],
                "retrofit": ["retrofit", d, "--to", "share-last:1", "--out", tmp_path / "rf", "--length", "64",
                             "--decode-context", "16"]}[verb]
    if verb == "ablate":
        sweep = {"base": train_cfg, "variants": [{"name": "base"}, {"name": "sliding", "sliding": {"window": 4, "global_every": 2}}],
                 "seeds": [0], "context": "1k", "probe": {"lengths": [24], "distance_bins": [0, 8], "samples": 4}}
        (tmp_path / "sweep.json").write_text(json.dumps(sweep))
        return ["ablate", tmp_path / "sweep.json", "--out", tmp_path / "ablate"]
    return {"calc": ["calc", tiny_path, "--context", "1k"],
            "compare": ["compare", tiny_path, tiny_path, "--context", "1k,2k"],
            "inspect": ["inspect", tiny_path, "--context", "1k"],
            "generate": ["generate", checkpoint, "--ids", "1,2", "--max-new-tokens", "2", "--stream"],
            "bench": ["bench", tiny_path, "--context", "16", "--decode-tokens", "2", "--bandwidth-mib", "1"],
            "fit": ["fit", tiny_path, "--memory", "1GiB", "--engine", "vllm", "--hardware", "h100"],
            "presets": ["presets"]}[verb]


def test_every_verb_is_tested_here():
    from kvlab.cli import VERBS as CLI_VERBS

    assert {v.NAME for v in CLI_VERBS} == set(VERBS) | {"train", "ablate"}


@pytest.mark.parametrize("verb", VERBS + ["train", "ablate"])
def test_json_stdout_is_one_object(capsys, monkeypatch, tmp_path, tiny_json, checkpoint, verb):
    _, path = tiny_json
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n"))  # kvlab chat's one turn
    rc, out, err = run(capsys, *_json_argv(verb, tmp_path, path, checkpoint), "--json")
    assert rc == 0, err
    assert isinstance(json.loads(out), dict)  # the whole of stdout, not only its last line
    if verb == "bench":  # the card went to stderr
        assert "cache measured" in err and "cache measured" not in out
