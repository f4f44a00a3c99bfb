"""Training faults: two runs on one directory, a stale lock, damaged or missing checkpoint files, a resume below
the checkpoint's step, a diverging learning rate, an --out that is a model checkpoint, a disk that fills up during a
checkpoint write. Every error names the directory, file or setting at fault."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import tiny_config
from safetensors.torch import load_file

from kvlab.cli import main
from kvlab.errors import CheckpointError, CheckpointWriteError, RunLockedError, TrainingDivergedError
from kvlab.train import checkpointing as ck
from kvlab.train import train

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
       "PYTHONFAULTHANDLER": "1"}  # a process that aborts prints where (a rare gloo teardown abort)


def run_config(steps: int = 4, **train_kw) -> dict:
    return {"model": tiny_config(shared=False, layers=1).to_dict(),
            "task": {"kind": "copy", "seq_len": 16, "vocab": 16, "span": 6},
            "train": {"steps": steps, "batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "threads": 1,
                      "eval_batches": 1, **train_kw}}


def test_a_second_run_on_the_same_directory_refuses_naming_it_and_the_holder(tmp_path, capsys):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps(run_config(steps=100000, save_every=0)))
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "kvlab", "train", str(cfg), "--out", str(out), "--no-progress"],
                             env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        end = time.monotonic() + 120
        while not (out / "log.jsonl").is_file() or not (out / "log.jsonl").read_text():  # the first one trains
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < end, "the first run did not start"
            time.sleep(0.02)
        with pytest.raises(RunLockedError) as e:
            train(run_config(), out=out, resume=True, progress=False)
        assert str(out) in str(e.value) and f"pid {first.pid}" in str(e.value)
        assert main(["train", str(cfg), "--out", str(out), "--resume"]) == 2
        err = capsys.readouterr().err
        assert "kvlab: error:" in err and str(out) in err and f"pid {first.pid}" in err
    finally:
        first.kill()
        first.wait(30)


def test_a_stale_lock_from_a_dead_process_is_taken_over_and_reported(tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    pid = int(dead.stdout)
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"pid": pid, "host": os.uname().nodename, "started": "earlier"}))
    r = train(run_config(steps=2), out=out, progress=False)
    assert r.summary["steps"] == 2
    err = capsys.readouterr().err
    assert "stale lock" in err and f"pid {pid}" in err and str(out) in err
    assert (out / ".lock").read_text() == ""  # released at the end


def _flip_bytes(f: Path) -> None:
    data = bytearray(f.read_bytes())
    for i in range(len(data) - 64, len(data) - 32):  # inside the tensor data, past the header
        data[i] ^= 0xFF
    f.write_bytes(bytes(data))


def test_a_damaged_checkpoint_is_named_and_resume_falls_back_to_the_previous_good_one(tmp_path, capsys):
    ref = train(run_config(steps=6), out=tmp_path / "ref", progress=False).summary["losses"]
    out = tmp_path / "run"
    train(run_config(steps=6, save_every=2), out=out, progress=False, max_steps=4)
    assert ck.latest(out)[1] == 4
    bad = out / "ckpt-0000004" / ck.MODEL
    _flip_bytes(bad)
    capsys.readouterr()
    r = train(run_config(steps=6, save_every=2), out=out, resume=True, progress=False).summary
    err = capsys.readouterr().err
    assert str(bad) in err and "damaged" in err and "ckpt-0000002" in err
    assert r["resumed_from"] == 2 and r["losses"] == ref  # exactly the uninterrupted run
    assert (out / "damaged-ckpt-0000004").is_dir() and ck.latest(out)[1] == 6


def test_a_missing_checkpoint_file_is_named_and_with_no_good_checkpoint_resume_refuses(tmp_path, capsys):
    out = tmp_path / "run"
    train(run_config(steps=4, save_every=2, keep=1), out=out, progress=False, max_steps=2)
    missing = out / "ckpt-0000002" / ck.OPTIM
    missing.unlink()
    with pytest.raises(CheckpointError) as e:
        train(run_config(steps=4, save_every=2, keep=1), out=out, resume=True, progress=False)
    assert str(missing) in str(e.value) and "missing" in str(e.value)
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps(run_config(steps=4, save_every=2, keep=1)))
    assert main(["train", str(cfg), "--out", str(out), "--resume"]) == 2
    assert str(missing) in capsys.readouterr().err


def test_a_corrupted_only_checkpoint_refuses_to_resume_naming_the_file(tmp_path):
    out = tmp_path / "run"
    train(run_config(steps=4, keep=1), out=out, progress=False, max_steps=2)
    bad = out / "ckpt-0000002" / ck.OPTIM
    _flip_bytes(bad)
    with pytest.raises(CheckpointError, match="SHA-256") as e:
        ck.load_checkpoint(bad.parent, train(run_config(steps=1), out=tmp_path / "other", progress=False).model)
    assert str(bad) in str(e.value)


def test_resume_with_fewer_steps_than_the_checkpoint_is_an_error(tmp_path, capsys):
    out = tmp_path / "run"
    train(run_config(steps=4), out=out, progress=False)
    with pytest.raises(ValueError, match=r"train\.steps=2 is below the step 4") as e:
        train(run_config(steps=2), out=out, resume=True, progress=False)
    assert "ckpt-0000004" in str(e.value)
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps(run_config(steps=4)))
    assert main(["train", str(cfg), "--out", str(out), "--resume", "--steps", "3"]) == 2
    assert "--steps 4 or more" in capsys.readouterr().err


def test_a_diverging_learning_rate_stops_at_the_first_non_finite_loss_and_keeps_the_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    raw = run_config(steps=40, lr=1e5, grad_clip=None, save_every=2)
    with pytest.raises(TrainingDivergedError) as e:
        train(raw, out=out, progress=False)
    msg = str(e.value)
    d, step = ck.latest(out)
    assert "non-finite" in msg and str(d) in msg and f"step {step}" in msg and "train.lr" in msg
    for f in (ck.MODEL, ck.OPTIM):  # the kept checkpoint is finite
        assert all(torch.isfinite(t.float()).all() for t in load_file(str(d / f)).values())
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["stopped"] == "non-finite" and rows[-1]["step"] > step
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps(raw))
    assert main(["train", str(cfg), "--out", str(tmp_path / "cli")]) == 2
    assert "non-finite" in capsys.readouterr().err


def test_out_pointing_at_a_model_checkpoint_refuses_to_overwrite_it(tmp_path, capsys):
    model_dir = tmp_path / "llama"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (model_dir / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(ValueError, match="holds a model checkpoint") as e:
        train(run_config(steps=1), out=model_dir, progress=False)
    assert str(model_dir) in str(e.value) and "config.json" in str(e.value)
    assert (model_dir / "config.json").read_text() == '{"architectures": ["LlamaForCausalLM"]}'
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json", "model.safetensors"]
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        train(run_config(steps=1), out=a_file / "run", progress=False)


def test_disk_full_during_a_checkpoint_write_keeps_the_previous_one_and_removes_the_partial(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = ck.save_file
    calls = []

    def full(tensors, path, *a, **k):
        calls.append(path)
        if len(calls) >= 3:  # the second checkpoint's model file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(ck, "save_file", full)
    with pytest.raises(CheckpointWriteError) as e:
        train(run_config(steps=4, save_every=2), out=out, progress=False)
    msg = str(e.value)
    assert "No space left on device" in msg and "step 4" in msg and "ckpt-0000002" in msg and "kept" in msg
    assert ck.latest(out)[1] == 2
    assert not list(out.glob(".tmp-*")) and not (out / "ckpt-0000004").exists()
    monkeypatch.setattr(ck, "save_file", real)
    r = train(run_config(steps=4, save_every=2), out=out, resume=True, progress=False).summary
    assert r["resumed_from"] == 2 and r["steps"] == 4
