"""Training: loss goes down for every attention kind (GQA, window, sharing, PLE, budgets, CCA, CSA/HCA/SWA, mHC,
MLA dense and sparse, a whole DeepSeek V4) and the trained model keeps cached == uncached; exact kill-and-resume,
data parallel == one process, atomic checkpoints, and configs that fail before training starts, naming the problem."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import assert_sweep_fails_before_training, tiny_config

from kvlab.cli import main
from kvlab.errors import CheckpointWriteError
from kvlab.train import checkpointing as ck
from kvlab.train import parse_config, train
from kvlab.train.trainer import _read_log

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
       "PYTHONFAULTHANDLER": "1"}  # a process that aborts prints where (a rare gloo teardown abort)


def tiny_run(model: dict, steps: int = 25, task: dict | None = None, **train_kw) -> dict:
    return {"model": model,
            "task": task or {"kind": "copy", "seq_len": 32, "vocab": 16, "span": 12},
            "train": {"steps": steps, "batch_size": 8, "lr": 3e-3, "warmup_steps": 3, "threads": 1,
                      "eval_batches": 1, **train_kw}}


def _compressed(mhc=None):
    from test_compressed import config  # CSA / HCA layers as their own tests build them

    return config(mhc=mhc)


def _mla(sparse: bool = False):
    from kvlab.config import ModelConfig
    from kvlab.specs import mla_layer

    idx = {"index_heads": 4, "index_head_dim": 8, "index_topk": 6} if sparse else {}
    layers = [mla_layer(4, 16, 8, 8, 16, q_lora_rank=24, intermediate_size=64, **idx) for _ in range(2)]
    return ModelConfig(vocab_size=97, hidden_size=64, layers=layers, max_positions=512)


def _v4():
    """A tiny DeepSeek V4 (swa / csa / hca layers, hash-routed and top-k sqrtsoftplus MoE, mHC) via its family."""
    from kvlab.families import deepseek_v4

    return deepseek_v4.config_from_hf({
        "vocab_size": 97, "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4, "head_dim": 16,
        "qk_rope_head_dim": 8, "q_lora_rank": 16, "o_groups": 2, "o_lora_rank": 8, "sliding_window": 5,
        "index_n_heads": 2, "index_head_dim": 8, "index_topk": 3, "hc_mult": 2,
        "layer_types": ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
        "compress_rates": {"compressed_sparse_attention": 3, "heavily_compressed_attention": 4},
        "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "num_hash_layers": 1,
        "max_position_embeddings": 512})


def _budgeted():
    from kvlab.budget import budget

    return budget(tiny_config(shared=False, layers=4), pattern="1 global : 3 sliding", window=5,
                  heads={"global": 2, "sliding": 4})


VARIANTS = {
    "gqa": lambda: tiny_config(shared=False, layers=2),
    "ple": lambda: dataclasses.replace(tiny_config(shared=False, layers=2), ple_dim=8),
    "budgeted-heads": _budgeted,
    "mla": _mla,
    "mla-sparse": lambda: _mla(sparse=True),
    "deepseek-v4": _v4,
    "sliding-window": lambda: tiny_config(shared=False, layers=2, window=6),
    "kv-sharing": lambda: tiny_config(shared=True, layers=3),  # layer 2 reads layer 1's K/V (kv_source)
    "cca": lambda: tiny_config(layers=2, attention="cca"),
    "csa-hca": _compressed,
    "csa-hca-mhc": lambda: _compressed(mhc=2),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_training_reduces_loss_and_cached_equals_uncached(variant, tmp_path):
    cfg = VARIANTS[variant]()
    r = train(tiny_run(cfg.to_dict()), out=tmp_path, progress=False)
    losses = r.summary["losses"]
    assert len(losses) == 25 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses
    assert r.summary["eval"]["eval_loss"] < losses[0]
    model = r.model.eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, max_length=23)
        inc = torch.cat([model(ids[:, s:s + 4], cache=cache) for s in range(0, 23, 4)], 1)
    torch.testing.assert_close(inc, full, atol=1e-4, rtol=0)


def test_grad_accumulation_equals_the_larger_batch(tmp_path):
    cfg = tiny_config(shared=False, layers=2).to_dict()
    a = train(tiny_run(cfg, steps=6), out=tmp_path / "a", progress=False).summary["losses"]
    run = tiny_run(cfg, steps=6)
    run["train"] |= {"batch_size": 4, "grad_accum": 2}
    b = train(run, out=tmp_path / "b", progress=False).summary["losses"]
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), atol=1e-5, rtol=1e-5)


def test_schedule_is_linear_warmup_then_cosine_to_the_floor():
    """``lr_at``: warmup 10% of the steps (here 2 of 20) rising linearly to ``lr``, then a cosine from ``lr`` at step 2
    to ``lr * min_lr_ratio`` at step 20 (the closed form written out)."""
    from kvlab.train.config import TrainSettings

    s = TrainSettings(steps=20, lr=2.0, min_lr_ratio=0.1)
    assert s.warmup == 2
    want = [1.0, 2.0] + [0.2 + 1.8 * 0.5 * (1 + math.cos(math.pi * (k - 2) / 18)) for k in range(2, 20)]
    assert [s.lr_at(k) for k in range(20)] == pytest.approx(want, rel=1e-12)
    assert s.lr_at(20) == pytest.approx(0.2) and s.lr_at(11) == pytest.approx(1.1)  # the floor; half-way


def test_bf16_autocast_trains(tmp_path):
    r = train(tiny_run(tiny_config(shared=False, layers=1).to_dict(), steps=8, dtype="bf16"), out=tmp_path,
              progress=False)
    assert r.summary["losses"][-1] < r.summary["losses"][0]
    assert next(r.model.parameters()).dtype == torch.float32  # fp32 master weights


def _wait_for(pred, timeout: float, proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.communicate()}")
        time.sleep(0.005)
    raise AssertionError("timed out")


def test_sigkill_and_resume_gives_the_same_losses(tmp_path):
    run = tiny_run(tiny_config(shared=True, layers=3).to_dict(), steps=60, save_every=4)
    run["task"] = {"kind": "recall", "seq_len": 48, "vocab": 32, "num_pairs": 8, "num_queries": 8, "gap": 8}
    ref = train(run, out=tmp_path / "ref", progress=False).summary["losses"]
    cfg_file = tmp_path / "run.json"
    cfg_file.write_text(json.dumps(run))
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "kvlab", "train", str(cfg_file), "--out", str(out),
                             "--no-progress"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # kill between two checkpoints: the log is ahead of the latest checkpoint
        _wait_for(lambda: len(_read_log(out)) >= 14 and len(_read_log(out)) % 4 == 2, 120, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    step = ck.latest(out)[1]
    assert 4 <= step < 60 and len(_read_log(out)) < 60
    r = subprocess.run([sys.executable, "-m", "kvlab", "train", str(cfg_file), "--out", str(out), "--resume",
                        "--json"], env=ENV, capture_output=True, text=True, timeout=180, check=False)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["resumed_from"] == step and summary["steps"] == 60
    assert summary["losses"] == ref  # bit for bit


def test_two_processes_data_parallel_and_fsdp_equal_one_process(tmp_path):
    # MoE: an expert unused by every process keeps no gradient, exactly as in one process
    run = tiny_run(tiny_config(shared=True, layers=3, moe=True).to_dict(), steps=6, batch_size=4)
    one = train(run, out=tmp_path / "one", progress=False).summary
    run["train"]["batch_size"] = 2
    cfg_file = tmp_path / "dp.json"
    cfg_file.write_text(json.dumps(run))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "kvlab", "train", str(cfg_file), "--out", str(tmp_path / "two"), "--json"],
                       env=ENV, capture_output=True, text=True, timeout=240, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.loads([x for x in r.stdout.splitlines() if x.startswith("{")][-1])
    assert two["processes"] == 2 and two["global_batch"] == 4
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), atol=1e-5, rtol=1e-5)
    assert abs(two["eval"]["eval_loss"] - one["eval"]["eval_loss"]) < 1e-5
    # FSDP2 (kvlab/train/fsdp.py) on the same 2 processes: the same steps, each process holding half of every tensor;
    # layer 2 reads layer 1's K/V, published during the forward into the one Step object every block shares
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "kvlab", "train", str(cfg_file), "--out", str(tmp_path / "fsdp"), "--fsdp", "--json"],
                       env=ENV, capture_output=True, text=True, timeout=240, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    sharded = json.loads([x for x in r.stdout.splitlines() if x.startswith("{")][-1])
    torch.testing.assert_close(torch.tensor(sharded["losses"]), torch.tensor(one["losses"]), atol=1e-5, rtol=1e-5)
    assert abs(sharded["eval"]["eval_loss"] - one["eval"]["eval_loss"]) < 1e-5


def test_checkpoint_is_atomic_under_a_failure_at_any_write(tmp_path, monkeypatch):
    cfg = tiny_config(shared=False, layers=1).to_dict()
    r = train(tiny_run(cfg, steps=2), out=tmp_path, progress=False)
    assert ck.latest(tmp_path)[1] == 2
    real_replace = os.replace
    for target in ("ckpt-0000003", "latest.json"):  # the directory rename, then the pointer update
        def boom(src, dst, target=target):
            if Path(dst).name == target:
                raise OSError("killed here")
            return real_replace(src, dst)

        monkeypatch.setattr(ck.os, "replace", boom)
        opt = torch.optim.AdamW(r.model.parameters())
        with pytest.raises(CheckpointWriteError, match="killed here"):
            ck.save_checkpoint(tmp_path, 3, r.model, opt, {"note": "new"})
        assert not list(tmp_path.glob(".tmp-*"))
        monkeypatch.setattr(ck.os, "replace", real_replace)
        d, step = ck.latest(tmp_path)
        assert step == 2 and (d / ck.MODEL).is_file()
        state = ck.load_checkpoint(d, r.model)
        assert state["step"] == 2
    # a later save at the same step replaces the stale, never-pointed-to directory
    ck.save_checkpoint(tmp_path, 3, r.model, torch.optim.AdamW(r.model.parameters()), {})
    assert ck.latest(tmp_path)[1] == 3


def test_resume_refuses_a_changed_config_and_a_fresh_run_refuses_an_old_dir(tmp_path):
    cfg = tiny_config(shared=False, layers=1).to_dict()
    train(tiny_run(cfg, steps=2), out=tmp_path, progress=False)
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        train(tiny_run(cfg, steps=2), out=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"train\.lr"):
        train(tiny_run(cfg, steps=4, lr=1e-2), out=tmp_path, resume=True, progress=False)
    r = train(tiny_run(cfg, steps=4), out=tmp_path, resume=True, progress=False)
    assert r.summary["resumed_from"] == 2 and len(r.summary["losses"]) == 4


GOOD = {"hidden_size": 32, "layers": [{"num_heads": 2, "num_kv_heads": 1, "head_dim": 16, "intermediate_size": 64}]}


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c["model"]["layers"][0].update(attention="nope"), "attention='nope'"),
    (lambda c: c["model"]["layers"][0].update(window_size=4), "unknown LayerSpec field(s) ['window_size']"),
    (lambda c: c["model"]["layers"][0].pop("num_heads"), "num_heads"),
    (lambda c: c["model"].pop("layers"), "missing field 'layers'"),
    (lambda c: c["model"].update(hidden=3), "unknown ModelConfig field(s) ['hidden']"),
    (lambda c: c["model"].update(vocab_size=10), "model.vocab_size=10"),
    (lambda c: c.pop("task"), "missing field 'task'"),
    (lambda c: c["train"].pop("steps"), "train: missing field 'steps'"),
    (lambda c: c["train"].update(lr_max=1), "train: unknown field(s) ['lr_max']"),
    (lambda c: c["train"].update(dtype="fp8"), "train.dtype='fp8'"),
    (lambda c: c.update(optimizer="sgd"), "unknown top-level field(s) ['optimizer']"),
    (lambda c: c.update(model={"preset": "no-such-model"}), "no-such-model"),
    (lambda c: c.update(model={"preset": "llama-3.1-8b", "depth": 2}), "unknown field(s) ['depth']"),
    (lambda c: c.update(model={"preset": "gemma-4-e2b", "num_layers": 5, "share_last": 1}), "share_last"),
])
def test_malformed_configs_fail_before_training_naming_the_problem(mutate, message, tmp_path):
    raw = tiny_run(json.loads(json.dumps(GOOD)))
    mutate(raw)
    with pytest.raises(ValueError) as e:
        parse_config(raw)
    assert message in str(e.value)
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(raw))
    assert main(["train", str(f), "--out", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run").exists()


def test_scaled_preset_keeps_its_pattern():
    raw = tiny_run({"preset": "gemma-4-e2b", "num_layers": 10, "hidden_size": 64, "num_heads": 2, "head_dim": 16,
                    "intermediate_size": 64, "window": 8, "ple_dim": 8, "share_last": 4})
    cfg = parse_config(raw).model
    assert cfg.num_layers == 10 and cfg.hidden_size == 64 and cfg.vocab_size == 20
    assert [x.window for x in cfg.layers] == [8, 8, 8, 8, None] * 2
    assert [x.kv_source for x in cfg.layers] == [None] * 6 + [5, 5, 5, 4]


def test_cli_train_json_and_toml(tmp_path, capsys):
    f = tmp_path / "run.toml"
    f.write_text('[model]\nhidden_size = 32\nlayers = [{ repeat = 2, num_heads = 2, num_kv_heads = 1, head_dim = 16, '
                 'intermediate_size = 64 }]\n[task]\nkind = "passkey"\nseq_len = 24\ndigits = 3\n'
                 '[train]\nsteps = 3\nbatch_size = 2\nthreads = 1\neval_batches = 1\n')
    assert main(["train", str(f), "--out", str(tmp_path / "r"), "--json"]) == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert s["steps"] == 3 and len(s["losses"]) == 3 and s["task"] == "passkey"
    assert (tmp_path / "r" / "config.json").is_file() and (Path(s["checkpoint"]) / "model.safetensors").is_file()
    assert main(["train", str(f), "--out", str(tmp_path / "r"), "--resume", "--steps", "4"]) == 0
    assert "from step 3" in capsys.readouterr().out


# -- ablations -------------------------------------------------------------------------------------------
def test_welch_t_test_matches_closed_forms():
    from kvlab.train.ablate import welch

    # two samples of two with equal spread: df = 2, where Student's t has p = 1 - |t| / sqrt(2 + t^2)
    for shift in (1.0, 3.0, 6.0):
        w = welch([0.0, 2.0], [shift, shift + 2.0])
        t = -shift / math.sqrt(2)
        assert abs(w["t"] - t) < 1e-12 and abs(w["df"] - 2) < 1e-12
        assert abs(w["p"] - (1 - abs(t) / math.sqrt(2 + t * t))) < 1e-12
    w = welch([1, 2, 3, 4], [2, 3, 4, 5, 9])  # R: t.test(...): t = -1.5329, df = 5.9615, p-value = 0.1765
    assert abs(w["t"] + 1.532942) < 1e-5 and abs(w["df"] - 5.9615) < 1e-3 and abs(w["p"] - 0.1765) < 1e-4
    assert math.isnan(welch([1.0], [2.0, 3.0])["p"])
    assert welch([1.0, 1.0], [2.0, 2.0])["p"] == 0.0 and welch([1.0, 1.0], [1.0, 1.0])["p"] == 1.0


def _sweep(variants: list[dict], steps: int = 4) -> dict:
    base = tiny_run({"hidden_size": 32, "layers": [{"repeat": 4, "num_heads": 2, "num_kv_heads": 2, "head_dim": 16,
                                                    "intermediate_size": 64}]}, steps=steps)
    return {"base": base, "variants": variants, "seeds": [0, 1], "context": "8k"}


def test_ablation_matches_parameters_and_reports_welch(tmp_path):
    from kvlab.train.ablate import format_table, plot_sweep, run_sweep

    raw = _sweep([{"name": "base"}, {"name": "sliding", "sliding": {"window": 8, "global_every": 2}},
                  {"name": "shared", "share_adjacent": 2}, {"name": "mqa", "layer_overrides": {"num_kv_heads": 1}}])
    r = run_sweep(raw, out=tmp_path)
    rows = {x["name"]: x for x in r["rows"]}
    target = rows["base"]["params"]
    assert all(abs(x["params"] - target) <= 0.05 * target for x in r["rows"])
    assert rows["shared"]["kv_cache_bytes"] == rows["base"]["kv_cache_bytes"] // 2
    assert rows["mqa"]["kv_cache_bytes"] == rows["base"]["kv_cache_bytes"] // 2
    assert rows["sliding"]["kv_cache_bytes"] < rows["base"]["kv_cache_bytes"]
    assert rows["base"]["eval_loss_p"] is None and 0 <= rows["mqa"]["eval_loss_p"] <= 1
    assert len(rows["mqa"]["loss_curves"]) == 2 and len(rows["mqa"]["loss_curves"][0]) == 4
    assert "Welch" in format_table(r)
    assert plot_sweep(r, tmp_path / "p.png").stat().st_size > 10_000


@pytest.mark.parametrize("change, message", [
    ({"variants": [{"name": "base"}, {"name": "x", "attention": "mla"}]}, "variant 'x': unknown field(s)"),
    ({"variants": [{"name": "base"}, {"name": "x", "layer_overrides": {"attention": "nope"}}]}, "attention='nope'"),
    ({"variants": [{"name": "base"}, {"name": "wide", "model": {"hidden_size": 512}}]}, "cannot be matched"),
    ({"variants": [{"sliding": {"window": 4}}]}, "missing field 'name'"),
    ({"seeds": []}, "sweep.seeds"),
    ({"base": None}, "training config"),
])
def test_malformed_sweeps_fail_before_training(change, message, tmp_path):
    assert_sweep_fails_before_training(_sweep([{"name": "base"}]) | change, message, tmp_path)
