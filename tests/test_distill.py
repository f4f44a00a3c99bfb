"""Training from a loaded checkpoint, on real text with the model's tokenizer, and recovery by distillation:
the first step's loss is the loaded model's loss, the distillation loss is the stated formula, KL falls, an
interrupted distillation resumes to the same weights, the result loads with kvlab.load, bad input is named."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import save_native, save_text_checkpoint, with_shared_kv

import kvlab
from kvlab.cli import main
from kvlab.eval.corpus import DEFAULT_MODULES, default_corpus
from kvlab.tokenizer import TokenizerError
from kvlab.train import parse_config, train
from kvlab.train.config import DistillError
from kvlab.train.distill import recover
from kvlab.train.init import InitError
from kvlab.train.text import TRAIN_MODULES, training_corpus

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
       "PYTHONFAULTHANDLER": "1"}  # a process that aborts prints where (a rare gloo teardown abort)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny HF teacher with a byte-level tokenizer (vocab 258), a student made from it with its last layer
    reading layer 0's K/V (same other weights), a text file."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("distill")
    teacher = save_text_checkpoint(root / "teacher")
    f = teacher / "model.safetensors"  # sharper next-token distributions than a random init's near-uniform ones
    w = load_file(str(f))
    w["model.norm.weight"] = w["model.norm.weight"] * 20
    save_file(w, str(f), metadata={"format": "pt"})
    student = root / "student"
    save_native(with_shared_kv(kvlab.load(teacher), 1), student)
    text = root / "text.txt"
    text.write_text("\n\n".join(default_corpus().text.split("\n\n")[:200]))  # any real text
    return {"teacher": str(teacher), "student": str(student), "text": str(text), "root": root}


def run_cfg(m, steps=4, distill=None, init=None, **train_kw):
    raw = {"model": {"init": init or m["student"]},
           "task": {"kind": "text", "seq_len": 32, "files": [m["text"]], "tokenizer": m["teacher"]},
           "train": {"steps": steps, "batch_size": 2, "lr": 3e-3, "warmup_steps": 1, "threads": 1,
                     "eval_batches": 2, **train_kw}}
    if distill is not None:
        raw["distill"] = distill
    return raw


def first_batch(cfg):
    ids, tgt, _ = cfg.task.batch(cfg.train.seed, "train", 0, cfg.train.batch_size)
    return ids, tgt


@pytest.mark.parametrize("which", ["hf", "kvlab-run"])
def test_training_starts_from_the_loaded_weights(models, tmp_path, which):
    init = models["teacher"]
    if which == "kvlab-run":  # a kvlab run directory written by kvlab train is a starting point too
        train(run_cfg(models, steps=1, init=models["teacher"]), out=tmp_path / "first", progress=False)
        init = str(tmp_path / "first")
    cfg = parse_config(run_cfg(models, steps=2, init=init))
    r = train(cfg, out=tmp_path / "run", progress=False)
    loaded = kvlab.load(init)
    ids, tgt = first_batch(cfg)
    with torch.no_grad():
        ref = F.cross_entropy(loaded(ids).reshape(-1, loaded.config.vocab_size), tgt.reshape(-1)).item()
    assert r.summary["losses"][0] == pytest.approx(ref, rel=1e-5)
    assert r.summary["losses"][1] != pytest.approx(ref, rel=1e-4)  # the weights moved
    assert r.model.config.to_dict() == loaded.config.to_dict()
    again = kvlab.load(tmp_path / "run")  # the result loads like any model
    assert all(torch.equal(again.state_dict()[k], v) for k, v in r.model.state_dict().items())


def reference_loss(student, teacher, ids, tgt, kl_w, lm_w, t):
    with torch.no_grad():
        s, q = student(ids).double() / t, teacher(ids).double() / t
    p_t, ls = q.softmax(-1), s.log_softmax(-1)
    kl = (p_t * (p_t.log() - ls)).sum(-1).mean()
    ce = F.cross_entropy(student(ids).double().reshape(-1, s.shape[-1]), tgt.reshape(-1))
    return kl_w * t * t * kl.item() + lm_w * ce.item(), kl.item(), ce.item()


def test_distillation_loss_is_the_weighted_kl_plus_lm(models, tmp_path):
    d = {"teacher": models["teacher"], "kl_weight": 0.7, "lm_weight": 0.4, "temperature": 2.0}
    cfg = parse_config(run_cfg(models, steps=1, distill=d))
    student, teacher = kvlab.load(models["student"]), kvlab.load(models["teacher"])
    ids, tgt = first_batch(cfg)
    want, kl, ce = reference_loss(student, teacher, ids, tgt, 0.7, 0.4, 2.0)
    assert kl > 0.05  # the shared layer changed the student
    r = train(cfg, out=tmp_path / "run", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(want, rel=1e-5)
    assert rows[0]["kl"] == pytest.approx(kl, rel=1e-4) and rows[0]["lm"] == pytest.approx(ce, rel=1e-5)
    assert math.isfinite(r.summary["eval"]["eval_kl"]) and 0 <= r.summary["eval"]["eval_top1"] <= 1


def test_distillation_brings_the_student_to_the_teacher(models, tmp_path):
    cfg = parse_config(run_cfg(models, steps=12, distill={"teacher": models["teacher"]}, lr=1e-3))
    student, teacher = kvlab.load(models["student"]), kvlab.load(models["teacher"])
    from kvlab.train.dist import World
    from kvlab.train.trainer import evaluate

    before = evaluate(student, cfg, World(), teacher)
    r = train(cfg, out=tmp_path, progress=False)
    after = r.summary["eval"]
    assert r.summary["kl"][-1] < 0.5 * r.summary["kl"][0]
    assert after["eval_kl"] < 0.5 * before["eval_kl"]  # on the held-out split too
    assert after["eval_top1"] >= before["eval_top1"]


def test_a_teacher_distilled_into_itself_has_zero_kl(models, tmp_path):
    cfg = parse_config(run_cfg(models, steps=1, init=models["teacher"], distill={"teacher": models["teacher"]}))
    r = train(cfg, out=tmp_path, progress=False)
    assert r.summary["kl"][0] == pytest.approx(0.0, abs=1e-6)


def test_interrupted_distillation_resumes_to_the_same_weights(models, tmp_path):
    d = {"teacher": models["teacher"], "lm_weight": 0.5}
    whole = train(run_cfg(models, steps=6, distill=d, save_every=2), out=tmp_path / "whole", progress=False)
    part = train(run_cfg(models, steps=6, distill=d, save_every=2), out=tmp_path / "cut", progress=False,
                 max_steps=3)
    assert part.summary["steps"] == 3
    resumed = train(run_cfg(models, steps=6, distill=d, save_every=2), out=tmp_path / "cut", resume=True,
                    progress=False)
    assert resumed.summary["resumed_from"] == 3
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.summary["kl"] == whole.summary["kl"]
    saved = kvlab.load(tmp_path / "cut")  # the teacher is not in the checkpoint: only the student's tensors
    assert set(saved.state_dict()) == set(a)


def test_resume_refuses_another_init_or_teacher(models, tmp_path):
    d = {"teacher": models["teacher"]}
    train(run_cfg(models, steps=2, distill=d), out=tmp_path, progress=False, max_steps=1)
    with pytest.raises(ValueError, match="distill.kl_weight"):
        train(run_cfg(models, steps=2, distill={**d, "kl_weight": 0.5}), out=tmp_path, resume=True, progress=False)
    other = tmp_path.parent / f"{tmp_path.name}-other"
    save_native(kvlab.load(models["student"]), other)
    with pytest.raises(ValueError, match="init"):
        train(run_cfg(models, steps=2, distill=d, init=str(other)), out=tmp_path, resume=True, progress=False)


def test_recover_writes_a_run_that_every_verb_loads(models, tmp_path):
    r = recover(models["student"], models["teacher"], tmp_path / "rec", steps=3, seq_len=32, batch_size=2, lr=3e-3,
                threads=1, text_files=[models["text"]], progress=False)
    assert r.summary["steps"] == 3 and len(r.summary["kl"]) == 3 and r.summary["distill"]["teacher"]
    loaded = kvlab.load(tmp_path / "rec")
    assert loaded.config.layers[1].kv_source == 0
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in r.model.state_dict().items())
    assert main(["eval", models["teacher"], "--vs", str(tmp_path / "rec"), "--text", models["text"],
                 "--window", "64", "--json", "--no-progress"]) == 0


def test_recovery_shows_its_progress_on_stderr(models, tmp_path, capsys):
    """``progress=True`` (``kvlab retrofit`` without ``--no-progress``): a tqdm bar over the steps on standard error,
    with the loss; nothing on standard output; ``progress=False`` shows none."""
    kw = {"steps": 2, "seq_len": 32, "batch_size": 2, "lr": 3e-3, "threads": 1, "text_files": [models["text"]]}
    recover(models["student"], models["teacher"], tmp_path / "a", progress=True, **kw)
    out, err = capsys.readouterr()
    assert out == "" and "train: 100%" in err and "2/2" in err and "loss=" in err
    recover(models["student"], models["teacher"], tmp_path / "b", progress=False, **kw)
    assert "train:" not in capsys.readouterr().err


def _torchrun(argv: list[str]) -> dict:
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                        "kvlab", *argv, "--json", "--no-progress"], env=ENV, capture_output=True, text=True,
                       timeout=240, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads([x for x in r.stdout.splitlines() if x.startswith("{")][-1])


def test_fsdp_distillation_on_two_processes_equals_one_process(models, tmp_path):
    """FSDP2 on 2 gloo processes (student and teacher sharded, batch 2 each) computes what one process computes with
    batch 4: the same loss and KL at every step, the same weights in its checkpoint, and a sharded resume continues
    it exactly (the checkpoint's whole tensors sliced back into shards)."""
    d = {"teacher": models["teacher"], "lm_weight": 0.5}
    one = train(run_cfg(models, steps=3, distill=d, batch_size=4, save_every=1), out=tmp_path / "one",
                progress=False).summary
    cfg_file = tmp_path / "fsdp.json"
    cfg_file.write_text(json.dumps(run_cfg(models, steps=3, distill=d, batch_size=2, save_every=1)))
    # a 2-step run is the first 2 steps of the 3-step one (both at the peak lr: 1 warmup step, the cosine from step 1)
    two = _torchrun(["train", str(cfg_file), "--out", str(tmp_path / "two"), "--fsdp", "--steps", "2"])
    assert two["processes"] == 2 and two["fsdp"] and two["global_batch"] == 4 and two["steps"] == 2
    assert json.loads((tmp_path / "two" / "train_config.json").read_text())["train"]["fsdp"] is True
    two = _torchrun(["train", str(cfg_file), "--out", str(tmp_path / "two"), "--fsdp", "--resume"])
    assert two["resumed_from"] == 2 and two["steps"] == 3
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(two["kl"]), torch.tensor(one["kl"]), atol=1e-5, rtol=1e-5)
    a, b = kvlab.load(tmp_path / "one").state_dict(), kvlab.load(tmp_path / "two").state_dict()
    start = kvlab.load(models["student"]).state_dict()
    assert set(a) == set(b) and any(not torch.equal(a[k], start[k]) for k in a)  # trained, and the same tensors
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-5)


def test_fsdp_needs_torchrun(models, tmp_path):
    with pytest.raises(ValueError, match="launch it with torchrun"):
        train(run_cfg(models, steps=1, fsdp=True), out=tmp_path, progress=False)
    assert not (tmp_path / "latest.json").exists()


def test_text_task_is_a_function_of_seed_split_index_and_holds_out_kvlab_evals_corpus(models):
    assert not set(TRAIN_MODULES) & set(DEFAULT_MODULES)
    train_text, eval_text = training_corpus().text, default_corpus().text
    assert len(train_text) > 100_000
    para = [p for p in eval_text.split("\n\n") if len(p) > 200][:50]
    assert not any(p in train_text for p in para)  # kvlab eval's paragraphs are not in the training text
    cfg = parse_config(run_cfg(models))
    t = cfg.task
    a, b = t.example(0, "train", 7), t.example(0, "train", 7)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], t.example(1, "train", 7)[0])
    assert torch.equal(a[0][1:], a[1][:-1])  # targets are the next tokens
    from kvlab.train.text import text_tokens

    ids, _, _ = text_tokens(t.tokenizer, t.files)
    cut = int(len(ids) * (1 - t.eval_fraction))
    hay = ids[cut:].tolist()
    win = t.example(0, "eval", 3)[0].tolist()
    assert any(hay[i:i + len(win)] == win for i in range(len(hay) - len(win) + 1))  # eval windows: held-out tail


def test_bad_input_is_named(models, tmp_path):
    bad = [
        (run_cfg(models, init=str(tmp_path / "nope")), InitError, "model.init"),
        ({**run_cfg(models), "model": {"init": models["teacher"], "num_layers": 1}}, InitError, "num_layers"),
        (run_cfg(models, distill={"teacher": models["teacher"], "kl_weight": 0, "lm_weight": 0}), DistillError,
         "both 0"),
        (run_cfg(models, distill={"teacher": models["teacher"], "temperature": 0}), DistillError, "temperature"),
        (run_cfg(models, distill={"teacher": str(tmp_path / "nope")}), InitError, "distill.teacher"),
    ]
    no_tok = run_cfg(models)  # a kvlab checkpoint has no tokenizer.json, and no teacher to default to
    del no_tok["task"]["tokenizer"]
    bad.append((no_tok, TokenizerError, "task.tokenizer"))
    other = tmp_path / "other-vocab"  # a teacher with another vocabulary
    m = kvlab.load(models["teacher"])
    cfg = m.config.to_dict() | {"vocab_size": 300}
    from kvlab.config import ModelConfig
    from kvlab.model import Model

    save_native(Model.from_config(ModelConfig.from_dict(cfg)), other)
    bad.append((run_cfg(models, distill={"teacher": str(other)}), DistillError, "vocab_size 300"))
    for raw, err, msg in bad:
        with pytest.raises(err, match=msg):
            parse_config(raw)
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(bad[2][0]))
    assert main(["train", str(f), "--out", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r").exists()


def test_example_distillation_config_runs_on_a_tiny_student(models, tmp_path):
    import tomllib

    files = sorted((Path(__file__).resolve().parents[1] / "kvlab/train/examples").glob("distill*.toml"))
    assert files
    for f in files:
        raw = tomllib.loads(f.read_text())
        raw["model"]["init"], raw["distill"]["teacher"] = models["student"], models["teacher"]
        raw["task"] |= {"seq_len": 32, "files": [models["text"]]}
        raw["train"] |= {"steps": 2, "batch_size": 2, "warmup_steps": 1, "eval_every": 0, "save_every": 0, "threads": 1}
        r = train(raw, out=tmp_path / f.stem, progress=False)
        assert len(r.summary["kl"]) == 2 and r.summary["distill"]["teacher"] == models["teacher"]


def test_cli_trains_a_distillation_config_and_reports_kl(models, tmp_path, capsys):
    f = tmp_path / "d.json"
    f.write_text(json.dumps(run_cfg(models, steps=2, distill={"teacher": models["teacher"]})))
    assert main(["train", str(f), "--out", str(tmp_path / "r"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "teacher" in out and "KL vs teacher" in out and models["student"] in out
    assert main(["train", str(f), "--out", str(tmp_path / "j"), "--no-progress", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert len(s["kl"]) == 2 and s["eval"]["eval_kl"] >= 0 and s["init"] == models["student"]
    assert s["text"].startswith("file ")
