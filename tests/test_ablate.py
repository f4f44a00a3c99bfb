"""Ablations: retrieval probes by distance and length, built-in sweeps (--preset, --dry-run), parallel runs,
and sweeps that fail before training, naming the problem."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import assert_sweep_fails_before_training

from kvlab.cli import main
from kvlab.train.ablate import dry_run, parse_sweep, preset_path, run_sweep, sweep_presets
from kvlab.train.data import make_task
from kvlab.train.probe import bin_labels, parse_probe, probe

PASSKEY = {"kind": "passkey", "seq_len": 32, "vocab": 16, "digits": 3, "depth": [0.0, 1.0]}


class PasskeyOracle(torch.nn.Module):
    """Answers a passkey by reading the digits after KEY, but only when the key is closer than ``reach``
    positions; otherwise it says a filler token (never right)."""

    def __init__(self, task, reach: int = 10**9):
        super().__init__()
        self.task, self.reach = task, reach
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids):
        B, T = ids.shape
        V, n = self.task.vocab_size, self.task.digits
        out = torch.zeros(B, T, V)
        out[..., V - 5] = 1.0  # a filler token
        for b in range(B):
            k = int((ids[b] == self.task.special("KEY")).nonzero()[0])
            q = int((ids[b] == self.task.special("QUERY")).nonzero()[-1])
            if q - k - 1 < self.reach:  # the distance of the first digit, as Passkey reports it
                for j in range(n):
                    out[b, q + j] = 0.0
                    out[b, q + j, ids[b, k + 1 + j]] = 1.0
        return out


def test_probe_bins_accuracy_by_distance_and_length():
    task = make_task(PASSKEY)
    edges = [0, 8, 16, 24]
    r = probe(PasskeyOracle(task), task, lengths=[32, 48, 64], distance_bins=edges, samples=96, batch_size=32)
    assert list(r["by_distance"]) == bin_labels(edges) == ["0-7", "8-15", "16-23", "24+"]
    assert all(b["accuracy"] == 1.0 for b in r["by_distance"].values())
    assert sum(b["tokens"] for b in r["by_distance"].values()) == r["by_length"]["32"]["tokens"] == 96 * 3
    assert all(r["by_length"][str(n)]["accuracy"] == 1.0 for n in (32, 48, 64))
    assert r["by_length_distance"]["64"]["24+"]["tokens"] > r["by_length_distance"]["32"]["24+"]["tokens"]

    # a model that only reaches 12 positions back: right below, wrong above, each bin by its own tokens
    r = probe(PasskeyOracle(task, reach=12), task, lengths=[32, 64], distance_bins=[0, 12, 24], samples=96)
    acc = {k: v["accuracy"] for k, v in r["by_distance"].items()}
    assert acc == {"0-11": 1.0, "12-23": 0.0, "24+": 0.0}
    short = r["by_length_distance"]["32"]["0-11"]["tokens"] / r["by_length"]["32"]["tokens"]
    assert abs(r["by_length"]["32"]["accuracy"] - short) < 1e-9
    assert r["by_length"]["64"]["accuracy"] < r["by_length"]["32"]["accuracy"]  # the key is further away on average


def test_probe_of_a_trained_tiny_model_and_recall_gap_ranges(tmp_path):
    from helpers import tiny_config

    from kvlab.train import train

    cfg = tiny_config(shared=False, layers=2).to_dict() | {"max_positions": 96}
    task = {"kind": "recall", "seq_len": 40, "vocab": 16, "num_pairs": 4, "num_queries": 2, "gap": [0, 12]}
    run = {"model": cfg, "task": task, "train": {"steps": 6, "batch_size": 8, "threads": 1, "eval_batches": 1}}
    r = train(run, out=tmp_path, progress=False)
    t = make_task(task)
    assert t.at_length(80).gap == [0, 52]  # the gap range stretches with the length
    p = probe(r.model, t, lengths=[40, 80], distance_bins=[0, 10, 20, 40], samples=32, batch_size=16)
    assert set(p["by_length"]) == {"40", "80"}
    for v in (*p["by_distance"].values(), *p["by_length"].values()):
        assert (0.0 <= v["accuracy"] <= 1.0 and v["tokens"] > 0) or (math.isnan(v["accuracy"]) and v["tokens"] == 0)
    assert p["by_distance"]["40+"]["tokens"] == 0  # no distance that long fits in 40 positions
    assert sum(v["tokens"] for v in p["by_distance"].values()) == p["by_length"]["40"]["tokens"] == 64
    assert p["by_length_distance"]["80"]["40+"]["tokens"] > 0  # distances past the training length
    with pytest.raises(ValueError, match="max_positions=96"):
        probe(r.model, t, lengths=[128])


def test_preset_small_dry_run_builds_and_matches_every_variant(capsys):
    assert {"small", "tiny"} <= set(sweep_presets())
    assert main(["ablate", "--preset", "small", "--dry-run"]) == 0
    text = capsys.readouterr().out
    r = dry_run(preset_path("small"))
    names = [x["name"] for x in r["rows"]]
    for want in ("baseline", "sliding", "sharing", "PLE", "budget", "CCA", "CSA/HCA", "mHC"):
        assert any(want in n for n in names), (want, names)
    assert all(n in text for n in names)
    assert all(abs(x["params_vs_baseline"]) <= 0.05 for x in r["rows"])
    assert len(set(r["seeds"])) >= 3 and r["runs"] == len(names) * len(r["seeds"])
    kv = {x["name"]: x["kv_cache_bytes"] for x in r["rows"]}
    assert kv[names[1]] < kv[names[0]]  # sliding saves cache
    assert max(r["probe"]["lengths"]) >= 2 * 64  # probes up to 2x the training length


def test_unknown_preset_lists_the_available_ones(capsys):
    assert main(["ablate", "--preset", "nope"]) == 2
    err = capsys.readouterr().err
    assert "'nope'" in err and "available: " in err and "small" in err and "tiny" in err
    assert main(["ablate"]) == 2  # neither a file nor a preset
    assert "--preset" in capsys.readouterr().err


def _sweep(variants: list[dict], steps: int = 3, **extra) -> dict:
    base = {"model": {"hidden_size": 32, "layers": [{"repeat": 2, "num_heads": 2, "num_kv_heads": 2, "head_dim": 16,
                                                     "intermediate_size": 64}]},
            "task": dict(PASSKEY), "train": {"steps": steps, "batch_size": 4, "lr": 3e-3, "warmup_steps": 1,
                                             "threads": 1, "eval_batches": 1}}
    return {"base": base, "variants": variants, "seeds": [0, 1], "context": "8k",
            "probe": {"lengths": [32, 64], "distance_bins": [0, 16], "samples": 8}} | extra


def test_sweep_reports_probe_columns_and_parallel_runs_match(tmp_path):
    from kvlab.train.ablate import format_table, plot_sweep

    raw = _sweep([{"name": "base"}, {"name": "sliding", "sliding": {"window": 4, "global_every": 2}}])
    a = run_sweep(raw, out=tmp_path / "a")
    b = run_sweep(raw, out=tmp_path / "b", jobs=2)
    assert [r["eval_loss"] for r in a["rows"]] == [r["eval_loss"] for r in b["rows"]]
    assert [r["acc_len_64"] for r in a["rows"]] == [r["acc_len_64"] for r in b["rows"]]
    assert a["columns"] == {"distance": {"acc_dist_0-15": "0-15", "acc_dist_16+": "16+"},
                            "length": {"acc_len_32": "32", "acc_len_64": "64"}}
    s = a["rows"][1]
    assert len(s["acc_dist_0-15"]) == 2 and 0 <= s["acc_dist_0-15_mean"] <= 1
    assert s["acc_len_64_p"] is None or 0 <= s["acc_len_64_p"] <= 1
    assert a["rows"][0]["acc_len_64_p"] is None
    text = format_table(a)
    assert "d 0-15" in text and "len 64 (2x)" in text and "Welch" in text
    md = format_table(a, markdown=True)
    assert md.startswith("| variant |") and "|---|" in md
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert saved["rows"][1]["name"] == "sliding" and "probe" in saved["rows"][1]
    assert plot_sweep(saved, tmp_path / "p.png").stat().st_size > 10_000


@pytest.mark.parametrize("change, message", [
    ({"variants": [{"name": "base"}, {"name": "x", "layer_pattern": [{"attention": "nope"}]}]}, "attention='nope'"),
    ({"variants": [{"name": "base"}, {"name": "x", "layer_pattern": [{"windw": 4}]}]}, "unknown LayerSpec field"),
    ({"variants": [{"name": "base"}, {"name": "x", "budget": {"pattern": "3 sliding : 1 global"}}]},
     "sliding layer but has no window"),
    ({"variants": [{"name": "base"}, {"name": "x", "budget": {"heads": 2, "ratio": 3}}]}, "unknown ['ratio']"),
    ({"variants": [{"name": "base"}, {"name": "x", "model": {"hidden": 8}}]}, "unknown ModelConfig field"),
    ({"variants": [{"name": "base"}, {"name": "big", "model": {"ple_dim": 4096}}]}, "cannot be matched"),
    ({"variants": [{"name": "base"}, {"layer_overrides": {"num_kv_heads": 1}}]}, "missing field 'name'"),
    ({"probe": {"lengths": [32, 64], "bins": [0, 8]}}, "sweep.probe: unknown field(s) ['bins']"),
    ({"probe": {"distance_bins": [8, 4]}}, "sweep.probe.distance_bins"),
    ({"probe": {"lengths": [4]}}, "cannot be probed at length 4"),
    ({"seeds": [0, 0]}, "the seeds must differ"),
])
def test_malformed_sweeps_fail_before_training_naming_the_problem(change, message, tmp_path):
    assert_sweep_fails_before_training(_sweep([{"name": "base"}]) | change, message, tmp_path)


def test_probe_lengths_beyond_max_positions_fail_before_training(tmp_path):
    raw = _sweep([{"name": "base"}])
    raw["base"]["model"]["max_positions"] = 48
    with pytest.raises(ValueError, match="sweep.probe.lengths: 64 exceeds base.model.max_positions=48"):
        parse_sweep(raw)
    del raw["base"]["model"]["max_positions"]  # defaults to the longest probe length
    assert parse_sweep(raw)["variants"][0]["model"].max_positions == 64
    with pytest.raises(ValueError, match="sweep.probe.lengths"):
        parse_probe({"lengths": "64"}, make_task(PASSKEY), "sweep.probe")
