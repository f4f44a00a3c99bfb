"""The default thread count (kvlab/threads.py): the rule on given inputs, the cgroup quota, OpenMP's wait policy,
and --threads on the verbs that compute."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvlab import threads
from kvlab.threads import ThreadPlan, cgroup_quota, default_threads, usable_cpus

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("usable", "host", "load", "procs", "expect"), [
    (2, 2, 0.1, 1, 2),  # a quiet 2-core machine: both cores
    (2, 2, 0.6, 1, 1),  # 1.4 idle CPUs rounds to 1
    (2, 2, 0.4, 1, 2),  # 1.6 idle rounds to 2
    (2, 2, 8.0, 1, 1),  # six agents on two cores: one thread, never zero
    (16, 16, 3.4, 1, 13),
    (8, 64, 40.0, 1, 8),  # a container with 8 CPUs on a 64-CPU host with 24 idle: its 8
    (8, 64, 60.0, 1, 4),  # the same host with 4 idle
    (16, 16, 0.0, 4, 4),  # torchrun, 4 processes on the node: a quarter each
    (3, 3, 0.0, 2, 1),
])
def test_default_threads_on_given_inputs(usable, host, load, procs, expect):
    assert default_threads(usable, host, load, procs) == expect


@pytest.mark.parametrize(("kw", "field"), [({"usable": 0}, "usable"), ({"host_cpus": 1.5}, "host_cpus"),
                                           ({"processes": 0}, "processes"), ({"load": -1.0}, "load"),
                                           ({"load": float("nan")}, "load")])
def test_default_threads_names_bad_input(kw, field):
    args = {"usable": 2, "host_cpus": 2, "load": 0.0, "processes": 1, **kw}
    with pytest.raises(ValueError, match=f"^{field}="):
        default_threads(**args)


def test_usable_cpus_takes_the_smallest_limit():
    assert usable_cpus(8) == 8
    assert usable_cpus(8, quota=2.5) == 2  # a quota of 2.5 CPUs: 2 threads keep inside it
    assert usable_cpus(8, quota=0.5) == 1
    assert usable_cpus(8, quota=None, physical=4) == 4  # hyperthreads not counted, as torch does
    assert usable_cpus(2, quota=16.0, physical=8) == 2  # the affinity set


def test_cgroup_quota_v2_v1_and_none(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("0::/job/a\n")
    (tmp_path / "job" / "a").mkdir(parents=True)
    (tmp_path / "job" / "a" / "cpu.max").write_text("150000 100000\n")
    assert cgroup_quota(tmp_path, proc) == 1.5
    (tmp_path / "job" / "a" / "cpu.max").write_text("max 100000\n")
    assert cgroup_quota(tmp_path, proc) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_quota(v1, tmp_path / "missing") == 3.0
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # v1: no quota
    assert cgroup_quota(v1, tmp_path / "missing") is None
    assert cgroup_quota(tmp_path / "nothing", tmp_path / "missing") is None


def test_machine_plan_is_within_the_usable_cpus():
    plan = threads.machine()
    assert 1 <= plan.threads <= plan.usable <= len(os.sched_getaffinity(0))
    assert plan.given is None and f"{plan.usable} usable CPUs" in plan.describe()


def test_passive_wait_policy_only_on_a_busy_machine_unset_by_the_user_before_torch():
    busy, quiet = ThreadPlan(1, 2, 2, 3.0), ThreadPlan(2, 2, 2, 0.1)
    code = ("import sys, json; from kvlab import threads as t; env = {}; user = {'OMP_WAIT_POLICY': 'ACTIVE'}\n"
            f"busy, quiet = t.{busy!r}, t.{quiet!r}\n"
            "out = [t.prepare_openmp(quiet, env), dict(env), t.prepare_openmp(busy, user), user['OMP_WAIT_POLICY'],\n"
            "       t.prepare_openmp(busy, env), dict(env), 'torch' in sys.modules]\n"
            "import torch; out.append(t.prepare_openmp(busy, {})); print(json.dumps(out))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    assert json.loads(res.stdout) == [None, {}, None, "ACTIVE", "PASSIVE", {"OMP_WAIT_POLICY": "PASSIVE"}, False,
                                      None]  # torch loaded: too late to matter, nothing set


def test_apply_sets_torch_and_names_who_chose(monkeypatch):
    n = torch.get_num_threads()
    try:
        monkeypatch.setenv("KVLAB_THREADS", "2")
        assert threads.apply().describe().startswith("2 threads (KVLAB_THREADS)") and torch.get_num_threads() == 2
        assert threads.apply(1).given == "--threads" and torch.get_num_threads() == 1
        monkeypatch.delenv("KVLAB_THREADS")
        plan = threads.apply(plan=ThreadPlan(1, 2, 2, 5.0))
        assert threads.chosen() is plan and plan.describe() == "1 threads (default: 2 usable CPUs, load 5.00 on 2 host CPUs)"
        monkeypatch.setenv("KVLAB_THREADS", "two")
        with pytest.raises(ValueError, match="KVLAB_THREADS='two': must be a positive integer"):
            threads.apply()
        with pytest.raises(ValueError, match="threads=0"):
            threads.apply(0)
    finally:
        torch.set_num_threads(n)


def test_threads_flag_on_the_computing_verbs_and_in_the_bench_card(tmp_path, capsys):
    from kvlab.cli import build_parser, main

    p = build_parser()
    for verb in (["bench", "m"], ["generate", "m"], ["chat", "m"], ["eval", "m"], ["train", "c.toml"]):
        assert p.parse_args([*verb, "--threads", "3"]).threads == 3
    from helpers import tiny_config

    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(tiny_config().to_dict()))
    n = torch.get_num_threads()
    try:
        assert main(["bench", str(path), "--context", "16", "--decode-tokens", "2", "--bandwidth-mib", "1",
                     "--no-progress", "--threads", "2", "--json"]) == 0
        out, err = capsys.readouterr()
        m = json.loads(out)["machine"]
        assert m["threads"] == 2 and m["threads_chosen"] == "2 threads (--threads)" and "2 threads (--threads)" in err
        assert main(["bench", str(path), "--threads", "0"]) == 2
        assert "kvlab: error: --threads 0: must be a positive integer" in capsys.readouterr().err
    finally:
        torch.set_num_threads(n)


def test_train_threads_flag_overrides_and_is_recorded(tmp_path, capsys):
    from kvlab.cli import main

    cfg = {"model": {"hidden_size": 32, "layers": [{"repeat": 1, "num_heads": 2, "num_kv_heads": 1, "head_dim": 16,
                                                    "intermediate_size": 64}]},
           "task": {"kind": "passkey", "seq_len": 24, "digits": 3},
           "train": {"steps": 1, "batch_size": 2, "threads": 1, "eval_batches": 1}}
    (tmp_path / "run.json").write_text(json.dumps(cfg))
    n = torch.get_num_threads()
    try:
        assert main(["train", str(tmp_path / "run.json"), "--out", str(tmp_path / "run"), "--threads", "2",
                     "--no-progress", "--json"]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(n)
    capsys.readouterr()
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["train"]["threads"] == 2
