"""Retrofits on tiny random models: what is carried is the source's tensors, what should be exact is exact, the
converted model saves/loads and its cache holds what the calculator says; bad conversions are named errors."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

import kvlab
from kvlab.config import GQASpec, ModelConfig, uniform_layers
from kvlab.errors import CheckpointWriteError
from kvlab.retrofit import (
    Derived,
    RetrofitError,
    apply,
    check,
    convert,
    head_importance,
    prune_heads,
    to_shared,
    to_window,
)
from tests.helpers import random_model


def _model(layers: int = 4, heads: int = 4, kv: int = 2, **kw) -> kvlab.Model:
    specs = uniform_layers(layers, num_heads=heads, num_kv_heads=kv, head_dim=16, intermediate_size=64, **kw)
    return random_model(ModelConfig(vocab_size=97, hidden_size=64, layers=specs, max_positions=256))


def _ids(t: int = 40, b: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 97, (b, t), generator=torch.Generator().manual_seed(seed))


def test_same_config_carries_every_tensor_exactly():
    m = _model()
    out = convert(m, m.config)
    assert len(out.report.carried) == len(m.state_dict()) and not out.report.dropped and not out.report.initialised
    ids = _ids()
    assert torch.equal(out.model(ids), m(ids))


def test_a_changed_config_initialises_what_the_source_lacks_by_the_models_rule_and_drops_what_it_replaces():
    m = _model(layers=2)
    l0, l1 = m.config.layers
    cfg = dataclasses.replace(m.config, layers=[dataclasses.replace(l0, intermediate_size=96, gqa=GQASpec(qk_norm=True)),
                                                l1])
    out = convert(m, cfg, seed=3)
    r = out.report
    mlp = [f"layers.0.mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    assert r.initialised == {"layers.0.attn.q_norm.weight": "ones", "layers.0.attn.k_norm.weight": "ones",
                             **dict.fromkeys(mlp, "normal(0, 0.02)")}
    assert sorted(r.dropped) == sorted(mlp)  # the source's MLP of the other width
    new, src = out.model.state_dict(), m.state_dict()
    assert sorted(r.carried) == sorted(set(new) - set(r.initialised))
    assert all(torch.equal(new[n], src[n]) for n in r.carried)
    assert torch.equal(new["layers.0.attn.q_norm.weight"], torch.ones(16))
    drawn = torch.cat([new[n].flatten() for n in mlp])
    assert abs(drawn.std().item() - 0.02) < 0.002 and abs(drawn.mean().item()) < 0.002
    # seeded: the same seed draws the same tensors, another seed others
    assert torch.equal(convert(m, cfg, seed=3).model.state_dict()[mlp[0]], new[mlp[0]])
    assert not torch.equal(convert(m, cfg, seed=4).model.state_dict()[mlp[0]], new[mlp[0]])


def test_sharing_across_layers_of_different_head_dims_names_both_layers():
    a = uniform_layers(2, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=64)
    b = uniform_layers(2, num_heads=4, num_kv_heads=2, head_dim=32, intermediate_size=64)
    m = random_model(ModelConfig(vocab_size=97, hidden_size=64, layers=[a[0], b[0], a[1], b[1]], max_positions=256))
    with pytest.raises(RetrofitError, match=r"layers\[1\] would read the K/V of layers\[0\], but "
                                            r"layers\[1\]\.head_dim=32 differs from layers\[0\]\.head_dim=16"):
        apply(m, "share-adjacent:2")
    with pytest.raises(RetrofitError, match=r"share_last\(n=1\): layers\[3\] would read the K/V of layers\[2\]"):
        apply(m, "share-last:1")


# one case per technique of the table (a new technique must add its own: checked below)
EVERY = {"share-last": "share-last:1", "share-adjacent": "share-adjacent:2",
         "window": "window:8,pattern=1sliding+1global,sinks=2", "prune-heads": "prune-heads:0.5",
         "kv-quant": "kv-quant:int4-g8", "mla": "mla:rank=16,rope=8"}


def test_every_technique_of_the_table_has_a_contract_case():
    from kvlab.retrofit import TECHNIQUES

    assert set(EVERY) == set(TECHNIQUES)


@pytest.mark.parametrize("technique", EVERY.values())
def test_every_conversion_saves_loads_decodes_and_holds_the_calculated_bytes(technique, tmp_path):
    """The contract of a conversion on a tiny random model: the converted model runs, a prefill + token-by-token decode
    through its cache gives its full forward's logits, its cache holds what the calculator prices, and it saves as a
    checkpoint that loads to the same logits (a KV format changes no weights: nothing to save)."""
    from kvlab.retrofit.report import allocated_bytes, cache_bytes

    ids = _ids(24, 1)
    out = apply(_model(), technique, ids=_ids(64, 1)[0].tolist())
    m = out.model
    full = m(ids)
    assert torch.isfinite(full).all()
    measured, calculated = cache_bytes(m, ids[0].tolist())
    assert measured == calculated > 0
    # the cache allocated for longer contexts (up to the model's 256 positions; none past them) is what is priced
    allocated = allocated_bytes(m, (64, 256, 1024))
    assert list(allocated) == ["64", "256"]
    assert all(a["allocated"] == a["calculated"] > 0 for a in allocated.values())
    assert allocated["256"]["calculated"] > allocated["64"]["calculated"]
    if getattr(m, "kv_quant", None) is not None:  # a lossy cache format: its decode is tests/test_quant_decode.py's
        return
    cache = m.new_cache(1, 24)
    steps = [m(ids[:, :16], cache=cache)] + [m(ids[:, t:t + 1], cache=cache) for t in range(16, 24)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=0)
    back = kvlab.load(kvlab.save(m, tmp_path / "ck"))
    assert back.config.layers == m.config.layers
    assert torch.equal(back(ids), full)


def test_share_last_drops_exactly_the_consumers_kv_and_keeps_the_rest():
    m = _model()
    out = to_shared(m, last=2)
    cfg = out.model.config
    assert [x.kv_source for x in cfg.layers] == [None, None, 1, 1]
    assert sorted(out.report.dropped) == sorted(f"layers.{i}.attn.{p}_proj.weight" for i in (2, 3) for p in "kv")
    src = m.state_dict()
    for name, t in out.model.state_dict().items():
        assert torch.equal(t, src[name]), name
    # the consumers' queries now attend to layer 1's K/V: outputs change, earlier layers' do not
    ids = _ids()
    assert not torch.allclose(out.model(ids), m(ids))
    n = 64
    assert out.model.new_cache(2, n).nbytes() == kvlab.costs(cfg, context=n, batch=2, dtype="float32").kv_cache_bytes


def test_share_adjacent_is_cla():
    out = apply(_model(), "share-adjacent:2")
    assert [x.kv_source for x in out.model.config.layers] == [None, 0, None, 2]


def test_window_covering_the_sequence_is_exact_and_a_short_one_is_not():
    m = _model()
    ids = _ids(40)
    wide = to_window(m, 64)
    assert not wide.report.dropped and not wide.report.derived
    assert torch.allclose(wide.model(ids), m(ids), atol=1e-5)
    short = to_window(m, 8, pattern="1 sliding : 1 global")
    assert [x.window for x in short.model.config.layers] == [8, None, 8, None]
    a, b = short.model(ids), m(ids)
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-5)  # the first 8 positions see the same keys
    assert not torch.allclose(a[:, 8:], b[:, 8:], atol=1e-3)


def test_pruning_heads_equals_zeroing_their_output_columns():
    m = _model(heads=4, kv=2)
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0], [4.0, 1.0, 1.0, 4.0], [1.0, 4.0, 4.0, 1.0]])
    out = prune_heads(m, 2, scores=scores)
    assert [x.num_heads for x in out.model.config.layers] == [2] * 4
    # one head kept per KV group (heads 0-1 read KV head 0, heads 2-3 KV head 1), the better of each pair
    kept = [[0, 2], [1, 3], [0, 3], [1, 2]]
    oracle = convert(m, m.config).model
    with torch.no_grad():
        for i, keep in enumerate(kept):
            w = oracle.layers[i].attn.o_proj.weight.view(64, 4, 16)
            for h in set(range(4)) - set(keep):
                w[:, h] = 0
    ids = _ids()
    assert torch.allclose(out.model(ids), oracle(ids), atol=1e-5)
    assert out.model.num_parameters() == m.num_parameters() - 4 * 2 * 2 * 16 * 64


def test_a_derived_tensor_uses_the_sources_it_lists_whatever_its_note_says():
    m = _model(layers=1)
    w = m.state_dict()["layers.0.attn.q_proj.weight"]
    note = "q_proj of layer 0, scaled"  # names no tensor: the sources say what was used
    out = convert(m, m.config, derived={"layers.0.attn.q_proj.weight": Derived(w * 2, note, (
        "layers.0.attn.q_proj.weight", "layers.0.attn.k_proj.weight"))})
    assert out.report.derived == {"layers.0.attn.q_proj.weight": note}
    assert "layers.0.attn.k_proj.weight" in out.report.carried and not out.report.dropped
    assert torch.equal(out.model.state_dict()["layers.0.attn.q_proj.weight"], w * 2)
    with pytest.raises(RetrofitError, match="names source.*'layers.0.attn.w_q'"):
        convert(m, m.config, derived={"layers.0.attn.q_proj.weight": Derived(w, "x", ("layers.0.attn.w_q",))})


def test_pruning_reports_each_derived_tensor_and_drops_nothing_it_read():
    m = _model(layers=2, heads=4, kv=2, sinks=True)
    out = prune_heads(m, 2, scores=torch.rand(2, 4))
    assert sorted(out.report.derived) == sorted(f"layers.{i}.attn.{n}" for i in (0, 1)
                                                for n in ("q_proj.weight", "o_proj.weight", "sinks"))
    assert out.report.derived["layers.1.attn.o_proj.weight"].startswith("layers.1.attn.o_proj.weight columns of heads")
    assert out.report.dropped == []


def test_pruning_nothing_is_the_same_model():
    m = _model()
    out = prune_heads(m, 1.0, scores=torch.rand(4, 4))
    ids = _ids()
    assert torch.equal(out.model(ids), m(ids)) and not out.report.derived


def test_head_importance_is_the_contribution_norm():
    m = _model()
    ids = _ids(32, 1)[0]
    base = head_importance(m, ids)
    with torch.no_grad():
        m.layers[1].attn.o_proj.weight.view(64, 4, 16)[:, 2] *= 3.0
    after = head_importance(m, ids)
    assert torch.allclose(after[1, 2], 3 * base[1, 2], rtol=1e-4)
    assert torch.allclose(after[1, [0, 1, 3]], base[1, [0, 1, 3]], rtol=1e-5)  # same layer input, other heads
    assert torch.equal(after[0], base[0])


@pytest.mark.parametrize("technique", ["share-last:1", "mla:rank=16,rope=8"])
def test_saved_conversion_loads_with_every_verb(tmp_path, capsys, technique):
    """A saved conversion is a kvlab checkpoint: kvlab.load gives the converted model's logits, and the verbs that
    take a model run on it (generate, calc, inspect, compare, fit, bench with its measured cache equal to the
    calculator's; eval and chat need a tokenizer: tests/test_retrofit.py's CLI tests run eval on one that has it)."""
    m = _model()
    out = apply(m, technique)
    d = kvlab.save(out.model, tmp_path / "ck", extra={"retrofit.json": out.report.to_dict()})
    back = kvlab.load(d)
    ids = _ids()
    assert torch.equal(back(ids), out.model(ids))
    assert back.config.layers == out.model.config.layers
    assert json.loads((d / "retrofit.json").read_text())["technique"] == technique
    with pytest.raises(CheckpointWriteError, match="already exists"):
        kvlab.save(out.model, d)
    from kvlab.cli import main

    capsys.readouterr()
    assert main(["generate", str(d), "--ids", "1,2,3", "--max-new-tokens", "2", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["output_ids"]
    assert got == kvlab.generate(back, torch.tensor([[1, 2, 3]]), max_new_tokens=2)[0, 3:].tolist()
    want = kvlab.costs(back.config, context=32, dtype="float32").kv_cache_bytes
    for verb in ("calc", "inspect"):
        assert main([verb, str(d), "--context", "32", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["kv_cache_bytes"] == want
    assert main(["bench", str(d), "--context", "8", "--decode-tokens", "2", "--bandwidth-mib", "1", "--no-progress",
                 "--json"]) == 0
    assert all(r["cache_bytes_match"] for r in json.loads(capsys.readouterr().out)["results"])
    src = kvlab.save(m, tmp_path / "src")  # compare: the source beside its conversion, priced as the calculator does
    assert main(["compare", str(src), str(d), "--context", "32", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["models"]
    assert [r["kv_cache_bytes"] for r in rows] == [[kvlab.costs(m.config, context=32, dtype="float32").kv_cache_bytes],
                                                   [want]]
    assert main(["fit", str(d), "--memory", "1GiB", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fit"]["fits"]["kv_bytes"] == kvlab.costs(
        back.config, context=256, dtype="float32").kv_cache_bytes  # the whole 256 positions fit


@pytest.mark.parametrize("technique, message", [
    ("share-last:4", "at most 3 can share"),
    ("share-last:x", "must be an integer"),
    ("window:256", "max_positions=256"),
    ("window:0", "positive integer"),
    ("window:16,sink=3", "unknown option"),
    ("window:16,sinks=2,sinks-on=global", "allowed: all, converted"),
    ("window:16,sinks-on=converted", "give their count too"),
    ("prune-heads:3", "can keep [2, 4]"),
    ("prune-heads:1.5", "(0, 1]"),
    ("shrae-last:2", "unknown technique"),
])
def test_bad_conversions_are_named_errors(technique, message):
    with pytest.raises(RetrofitError, match=message.replace("[", r"\[").replace("(", r"\(")):
        apply(_model(), technique, ids=list(range(20)))


@pytest.mark.parametrize("technique, message", [
    ("share-last:4", r"at most 3 can share"),
    ("window:256", r"window=256 is not smaller than the model's max_positions=256"),
    ("prune-heads:3", r"layers\[0\] would keep 3 of its 4 query heads; with 2 KV heads it can keep \[2, 4\]"),
    ("mla:rank=65,rope=8", r"mla: rank=65 must be an integer in \[1, 64\]: the joint K/V width is 2 KV heads"),
    ("kv-quant:int8+4=int4", r"kv-quant: .*layer 4 unknown: the model has 4 layers"),
])
def test_check_finds_from_the_config_alone_what_the_conversion_refuses(technique, message):
    """``check(config, technique)``: the conversion's own error, from the config (no weights: a meta-device model
    would not do); every technique of the contract table passes it on the tiny model it converts."""
    m = _model()
    with pytest.raises(RetrofitError, match=message):
        check(m.config, technique)
    with pytest.raises(RetrofitError, match=message):
        apply(m, technique, ids=list(range(20)))
    for t in EVERY.values():
        check(m.config, t)


def test_check_names_both_layers_of_a_sharing_across_head_dims():
    a = uniform_layers(2, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=64)
    b = uniform_layers(2, num_heads=4, num_kv_heads=2, head_dim=32, intermediate_size=64)
    cfg = ModelConfig(vocab_size=97, hidden_size=64, layers=[a[0], b[0], a[1], b[1]], max_positions=256)
    with pytest.raises(RetrofitError, match=r"layers\[1\]\.head_dim=32 differs from layers\[0\]\.head_dim=16"):
        check(cfg, "share-adjacent:2")


def test_cli_refuses_a_conversion_that_cannot_apply_before_any_model_loads(tmp_path, capsys, monkeypatch):
    """Every technique of a sweep is checked against the model's config (read from the checkpoint's config file)
    before the first conversion: a bad last technique refuses the whole command, nothing loaded, converted or
    written."""
    import kvlab.cli.retrofit as cli
    from kvlab.cli import main

    src = kvlab.save(_model(), tmp_path / "src")  # 4 layers, 2 KV heads x 16 channels, 256 positions

    def no_load(*a, **k):
        raise AssertionError("loaded a model before refusing")

    monkeypatch.setattr(cli, "Setup", no_load)
    out = tmp_path / "rf"
    assert main(["retrofit", str(src), "--sweep", "share-last:1", "window:16", "mla:rank=65,rope=8", "--out",
                 str(out)]) == 2
    err = capsys.readouterr().err
    assert "kvlab: error: mla: rank=65 must be an integer in [1, 64]" in err and "Traceback" not in err
    assert not out.exists()


def test_cli_converts_measures_and_writes_the_table(tmp_path, capsys):
    from kvlab.cli import main
    from tests.helpers import save_text_checkpoint

    src = save_text_checkpoint(tmp_path / "src")
    out = tmp_path / "rf"
    assert main(["retrofit", str(src), "--sweep", "share-last:1", "window:16,pattern=1sliding+1global",
                 "kv-quant:int4-g8", "--out", str(out), "--length", "128", "--decode-context", "32", "--no-progress",
                 "--needle", "200", "--depths", "0.5", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    rows = {r["technique"]: r for r in res["rows"]}
    assert set(rows) == {"share-last:1", "window:16,pattern=1sliding+1global", "kv-quant:int4-g8"}
    assert res["original_needle"]["lengths"] == [200] and all(r["needle"]["depths"] == [0.5] for r in rows.values())
    # decode speed of every row and of the original, at the same context in the same process
    assert res["original_decode"]["context"] == 32 and res["original_decode"]["tok_s"] > 0
    assert all(r["decode"]["context"] == 32 and r["decode"]["tok_s"] > 0 for r in rows.values())
    for r in rows.values():
        assert r["cache"]["match"] and r["cache"]["measured"] == r["cache"]["calculated"] > 0
        assert r["cache"]["allocated"] == {}  # 4K and longer: past the tiny model's 1,024 positions
        assert r["kl"] > 0 and r["eval_tokens"] == 127
    win = rows["window:16,pattern=1sliding+1global"]
    assert win["kv_bytes"]["32768"] == win["ref_kv_bytes"]["32768"] // 2 + 16 * (2 * 8 * 2) * 4  # 1 ring of 16
    q = rows["kv-quant:int4-g8"]  # 4-bit codes + one fp32 scale per 8 values... priced as the cache holds them
    assert q["kv_bytes"]["4096"] < q["ref_kv_bytes"]["4096"] / 3 and q["checkpoint"] is None
    assert (out / "table.md").read_text().count("\n") == 6 and (out / "frontier.png").stat().st_size > 0
    original = (out / "table.md").read_text().splitlines()[2].split("|")
    assert original[1].strip() == "original" and float(original[11]) > 0  # its decode tok/s
    back = kvlab.load(out / "share-last-1" / "converted")
    assert back.config.layers[1].kv_source == 0
    # the converted checkpoint carries the tokenizer: every verb runs on it
    assert main(["eval", str(out / "share-last-1" / "converted"), "--window", "64", "--json", "--no-progress"]) == 0


def test_cli_rejects_a_bad_technique_before_loading(tmp_path, capsys):
    from kvlab.cli import main

    assert main(["retrofit", "smollm2-135m", "--to", "window:abc", "--out", str(tmp_path / "x")]) == 2
    assert "window: window='abc' must be an integer" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["retrofit", "smollm2-135m", "--to", "window:8", "--depths", "0.1,x", "--out", str(tmp_path / "x")]) == 2
    assert "--depths '0.1,x': expected fractions" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_recovers_by_distillation_over_seeds(tmp_path, capsys):
    from kvlab.cli import main
    from tests.helpers import save_text_checkpoint

    src = save_text_checkpoint(tmp_path / "src")
    out = tmp_path / "rf"
    argv = ["retrofit", str(src), "--to", "share-last:1", "--out", str(out), "--recover", "3", "--seeds", "0,1",
            "--seq-len", "32", "--batch", "2", "--lr", "1e-3", "--length", "96", "--decode-context", "0",
            "--dtype", "bf16", "--no-progress", "--json"]
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    before, *after = res["rows"]
    assert before["recovery_steps"] == 0 and [r["seed"] for r in after] == [0, 1]
    assert all(r["recovery"]["steps"] == 3 and r["recovery"]["dtype"] == "bf16" for r in after)  # bf16 autocast
    assert after[0]["kl"] != after[1]["kl"] and after[0]["kl"] != before["kl"]  # trained, and seeds differ
    assert res["spread"][0]["seeds"] == [0, 1] and res["spread"][0]["kl_sd"] > 0
    run = out / "recovered-seed0"
    assert kvlab.load(run).config.layers[1].kv_source == 0  # the recovered model keeps the technique
    assert [p.name for p in run.glob("ckpt-*")] == ["ckpt-0000003"]  # saved every step, only the newest kept
    assert main(["eval", str(run), "--window", "64", "--json", "--no-progress"]) == 0  # carries the tokenizer
    capsys.readouterr()
    # a second invocation resumes: converted model reused, finished recoveries not retrained
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert [r["kl"] for r in again["rows"]] == pytest.approx([r["kl"] for r in res["rows"]], rel=1e-6)
    # the last step's loss from the run's log, not the (empty) resumed call's
    assert [r["recovery"]["final_loss"] for r in again["rows"][1:]] == [r["recovery"]["final_loss"] for r in after]


def test_window_with_sink_tokens_sets_them_on_window_layers_only():
    out = apply(_model(), "window:8,pattern=1sliding+1global,sinks=2")
    assert [(x.window, x.gqa.sink_tokens) for x in out.model.config.layers] == [(8, 2), (None, 0)] * 2
    ids = _ids(40)
    # the sinks keep the first positions visible: position 20 of a window layer sees keys 0-1 and 13-20
    from kvlab.eval.variant import with_window

    ref = with_window(_model(), 8, sink_tokens=2)  # every layer windowed, a different model
    assert not torch.allclose(out.model(ids), ref(ids))
    assert torch.allclose(out.model(ids)[:, :8], _model()(ids)[:, :8], atol=1e-5)


def _mixed(windows=(8, None, 8, None)) -> kvlab.Model:
    """A tiny model with its own sliding and global layers (Gemma 3's 5 sliding : 1 global, shortened)."""
    specs = [dataclasses.replace(x, window=w) for x, w in
             zip(uniform_layers(len(windows), num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=64), windows)]
    return random_model(ModelConfig(vocab_size=97, hidden_size=64, layers=specs, max_positions=256))


def test_sinks_on_converted_puts_sink_tokens_only_on_layers_that_were_global():
    from kvlab.budget import budget
    from kvlab.retrofit.report import cache_bytes

    m = _mixed()
    out = apply(m, "window:8,sinks=2,sinks-on=converted")
    assert [(x.window, x.gqa.sink_tokens) for x in out.model.config.layers] == [(8, 0), (8, 2)] * 2
    assert out.report.technique == "window:8,sinks=2,sinks-on=converted" and not out.report.dropped
    # the model the docs' Gemma 3 row was first built as by hand: the all-sliding budget, sinks on layers 1 and 3
    hand = budget(m.config, "sliding", window=8)
    hand = dataclasses.replace(hand, layers=[dataclasses.replace(x, gqa=GQASpec(sink_tokens=2 if i % 2 else 0))
                                             for i, x in enumerate(hand.layers)])
    ids = _ids(40)
    assert torch.equal(out.model(ids), convert(m, hand).model(ids))
    every = apply(m, "window:8,sinks=2").model  # sinks on the source's own sliding layers too: another model
    assert [x.gqa.sink_tokens for x in every.config.layers] == [2] * 4
    assert not torch.allclose(out.model(ids), every(ids))
    # measured cache == calculator == 4 rings of 8 positions + 2 sink positions on the 2 converted layers,
    # each position 2 KV heads x 16 channels x (K, V) x 4 bytes
    per_position = 2 * 16 * 2 * 4
    for model, stored in ((out.model, 4 * 8 + 2 * 2), (every, 4 * (8 + 2))):
        measured, calculated = cache_bytes(model, ids[0].tolist())
        assert measured == calculated == stored * per_position


def test_sinks_on_converted_needs_a_layer_the_conversion_makes_sliding():
    with pytest.raises(RetrofitError, match="no layer of .* becomes sliding"):
        apply(_mixed(), "window:8,pattern=1sliding+1global,sinks=2,sinks-on=converted")  # layers 0, 2 already slid
    layers = apply(_mixed(), "window:8,pattern=1sliding+1global,sinks=2").model.config.layers
    assert [x.gqa.sink_tokens for x in layers] == [2, 0, 2, 0]


def test_cli_exports_a_window_pattern_that_transformers_runs_identically(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from kvlab.cli import main
    from tests.helpers import save_text_checkpoint

    src = save_text_checkpoint(tmp_path / "src")
    out = tmp_path / "rf"
    assert main(["retrofit", str(src), "--to", "window:8,pattern=1sliding+1global", "--out", str(out), "--export", "hf",
                 "--no-eval", "--no-progress"]) == 0
    ours = kvlab.load(out / "converted")
    hf = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32).eval()
    ids = torch.randint(0, 258, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, ours(ids), atol=1e-4)
    assert main(["retrofit", str(src), "--sweep", "share-last:1", "--out", str(tmp_path / "x"), "--export", "hf"]) == 2
    assert "--export writes one conversion" in capsys.readouterr().err
    # the output directory holds another conversion: refused, not silently reused
    assert main(["retrofit", str(src), "--to", "window:4", "--out", str(out), "--no-eval", "--no-progress"]) == 2
    assert "holds the conversion 'window:8,pattern=1sliding+1global', not 'window:4'" in capsys.readouterr().err


_COMMANDS = """\
import json, sys
import torch.distributed as dist
from kvlab.cli import main
dist.init_process_group("gloo")  # one group for every command (each leaves a group it did not create open)
for argv, expected in json.loads(sys.argv[1]):
    if main(argv) != expected:
        sys.exit(3)
dist.destroy_process_group()
"""


def test_cli_recovery_under_torchrun_equals_one_process(tmp_path, capsys):
    """``torchrun -m kvlab retrofit ... --recover N`` on 2 gloo processes (batch 2 each), plain data parallel and with
    ``--fsdp`` (student and teacher sharded), gives the one-process run's (batch 4) recovered weights, loss and measured
    rows; process 0 alone writes and reports: one JSON object per command on stdout, each notice once; a conversion that
    cannot apply, and a failure on process 0 alone, end every process with exit code 2 and one error line each. The
    commands run in one torchrun launch
    (a driver calling the CLI's ``main`` for each, as ``python -m kvlab`` calls it once)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from kvlab.cli import main
    from tests.helpers import save_text_checkpoint

    src = save_text_checkpoint(tmp_path / "src")
    argv = ["retrofit", str(src), "--to", "share-last:1", "--recover", "2", "--seq-len", "32", "--lr", "1e-3",
            "--length", "64", "--decode-context", "0", "--no-progress", "--json"]
    assert main([*argv, "--batch", "4", "--out", str(tmp_path / "one")]) == 0
    one = json.loads(capsys.readouterr().out)
    driver = tmp_path / "commands.py"
    driver.write_text(_COMMANDS)
    runs = {"dp": [], "fsdp": ["--fsdp"]}
    commands = [[[*argv, "--batch", "2", *extra, "--out", str(tmp_path / name)], 0] for name, extra in runs.items()]
    # a conversion that cannot apply (the tiny model has 2 layers) is refused by every process before any loads,
    # one error line (process 0's); a failure on process 0 alone (its evaluation window) ends every process too
    bad = [a if a != "share-last:1" else "share-last:5" for a in argv]
    commands.append([[*bad, "--batch", "2", "--out", str(tmp_path / "bad")], 2])
    long = [a if a != "64" else "4k" for a in argv]
    commands.append([[*long, "--batch", "2", "--out", str(tmp_path / "long")], 2])
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(driver), json.dumps(commands)], env=env, capture_output=True, text=True, timeout=240,
                       check=False)
    assert r.returncode == 0, r.stderr[-3000:]  # every process's every command returned what was expected
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2  # one JSON object per successful command, from process 0
    assert r.stderr.count("== share-last:1") == 2 and r.stderr.count("recovered ") == 2
    assert r.stderr.count("kvlab: error: ") == 2 and "Traceback" not in r.stderr
    assert "at most 1 can share" in r.stderr and "--length 4k: exceeds the model's max_positions=1024" in r.stderr
    (b1, a1) = one["rows"]
    w1 = kvlab.load(tmp_path / "one" / "recovered-seed0").state_dict()
    assert one["processes"] == 1 and not a1["recovery"]["fsdp"] and a1["kl"] != b1["kl"]  # recovery changed it
    for (name, extra), line in zip(runs.items(), lines):
        two = json.loads(line)
        assert two["processes"] == 2
        b2, a2 = two["rows"]
        assert a2["recovery"]["processes"] == 2 and a2["recovery"]["fsdp"] == bool(extra), name
        assert b2["kl"] == b1["kl"]  # the same conversion
        for k in ("kl", "ppl", "top1"):
            assert a2[k] == pytest.approx(a1[k], rel=1e-5, abs=1e-5), (name, k)
        assert a2["recovery"]["final_loss"] == pytest.approx(a1["recovery"]["final_loss"], rel=1e-5, abs=1e-5)
        w2 = kvlab.load(tmp_path / name / "recovered-seed0").state_dict()
        assert set(w1) == set(w2)
        for k in w1:
            torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=1e-5, msg=lambda m, k=k, name=name: f"{name} {k}: {m}")
        assert a2["cache"]["measured"] == a2["cache"]["calculated"]


def test_cli_fsdp_needs_torchrun_and_a_recovery(tmp_path, capsys):
    from kvlab.cli import main

    assert main(["retrofit", "smollm2-135m", "--to", "share-last:6", "--recover", "2", "--fsdp",
                 "--out", str(tmp_path / "x")]) == 2
    assert "--fsdp shards the recovery over the processes of torchrun" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def _interrupt_at(monkeypatch, step: int) -> None:
    """A Ctrl-C arriving while the trainer prepares step ``step`` (0-based), as a user or a scheduler stops it."""
    from kvlab.train import trainer

    real = trainer.micro_batches

    def batches(cfg, world, s):
        if s == step:
            raise KeyboardInterrupt
        return real(cfg, world, s)

    monkeypatch.setattr(trainer, "micro_batches", batches)


def test_cli_resumes_an_interrupted_recovery_to_the_uninterrupted_result(tmp_path, capsys, monkeypatch):
    """``kvlab retrofit ... --recover 8`` stopped during step 6 (its last checkpoint at step 4: one every quarter),
    then the same command with ``--resume``: it trains steps 5-8 only, and the recovered weights and every step's loss
    are those of one uninterrupted run (the measured rows follow from the weights); the step lost to the interrupt is
    trained again, not logged twice."""
    from kvlab.cli import main
    from tests.helpers import save_text_checkpoint

    src = save_text_checkpoint(tmp_path / "src")
    argv = ["retrofit", str(src), "--to", "share-last:1", "--recover", "8", "--seq-len", "32", "--batch", "2",
            "--lr", "1e-3", "--no-eval", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0
    cut = tmp_path / "cut"
    with monkeypatch.context() as m:
        _interrupt_at(m, 5)
        assert main([*argv, "--out", str(cut)]) == 130
    assert "kvlab: interrupted" in capsys.readouterr().err
    run = cut / "recovered-seed0"
    assert [p.name for p in run.glob("ckpt-*")] == ["ckpt-0000004"]
    assert main([*argv, "--out", str(cut), "--resume", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)  # --no-eval: no rows, the recoveries still reported
    assert res["rows"] == [] and len(res["recoveries"]) == 1
    rec = res["recoveries"][0]
    assert (rec["technique"], rec["seed"], rec["steps"], rec["resumed_from"], rec["steps_this_run"]) == \
        ("share-last:1", 0, 8, 4, 4)
    logged = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    want = [json.loads(x) for x in (tmp_path / "whole" / "recovered-seed0" / "log.jsonl").read_text().splitlines()]
    assert rec["final_loss"] == want[-1]["loss"]
    assert [r["step"] for r in logged] == list(range(1, 9))
    # every step trained at the schedule's rate (8 steps: no warmup; cosine from --lr 1e-3 to 10% of it), resumed too
    assert [r["lr"] for r in logged] == pytest.approx([1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi * k / 8))
                                                       for k in range(8)], rel=1e-9)
    assert [(r["loss"], r["kl"]) for r in logged] == [(r["loss"], r["kl"]) for r in want]
    a, b = kvlab.load(tmp_path / "whole" / "recovered-seed0").state_dict(), kvlab.load(run).state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    start = kvlab.load(cut / "converted").state_dict()
    assert not all(torch.equal(start[k], b[k]) for k in start)  # the recovery trained something


def test_cli_resume_names_what_it_cannot_continue(tmp_path, capsys, monkeypatch):
    """``--resume`` with nothing to continue, or on a run directory of another conversion, is a named error (exit 2)
    before any model loads; so is ``--resume`` without ``--recover``."""
    from kvlab.cli import main
    from tests.helpers import save_text_checkpoint

    src = save_text_checkpoint(tmp_path / "src")
    out = tmp_path / "rf"
    argv = ["retrofit", str(src), "--recover", "4", "--seq-len", "32", "--batch", "2", "--no-eval", "--no-progress",
            "--out", str(out)]
    assert main([*argv, "--to", "share-last:1", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "kvlab: error: --resume: " in err and "recovered-seed0" in err and "no recovery checkpoint" in err
    assert "Traceback" not in err and not out.exists()
    with monkeypatch.context() as m:  # an interrupted share-last:1 recovery (checkpoint at step 2)
        _interrupt_at(m, 2)
        assert main([*argv, "--to", "share-last:1"]) == 130
    capsys.readouterr()
    import kvlab.cli.retrofit as cli

    def no_load(*a, **k):
        raise AssertionError("loaded a model before refusing")

    with monkeypatch.context() as m:
        m.setattr(cli, "Setup", no_load)
        assert main([*argv, "--to", "window:16", "--resume"]) == 2
        err = capsys.readouterr().err
        assert "holds the conversion 'share-last:1', not 'window:16'" in err and "Traceback" not in err
        assert main([*argv, "--to", "share-last:1", "--resume", "--seeds", "1"]) == 2  # seed 0's run, not seed 1's
        assert "recovered-seed1" in capsys.readouterr().err
        assert main([*argv[:2], "--to", "share-last:1", "--resume", "--out", str(out)]) == 2
        assert "--resume continues interrupted recoveries: give --recover" in capsys.readouterr().err
    # the saved conversion deleted (it is reproducible): the recovery checkpoint itself refuses another conversion
    import shutil

    shutil.rmtree(out / "converted")
    assert main([*argv, "--to", "window:16", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "--resume: the config differs from the checkpoint's in: model.layers" in err and "Traceback" not in err
