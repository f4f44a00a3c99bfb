"""Hostile checkpoints: NaN/inf weights, shard names that leave the checkpoint directory, integer tensors where a
float weight belongs. Each error names the tensor or shard at fault; symlinked shards (the HF cache layout) load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from parity.hf_tiny import save, tiny_hf
from safetensors.torch import load_file, save_file

import kvlab
from kvlab.cli import main
from kvlab.errors import CheckpointError

Q1 = "model.layers.1.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save(tiny_hf("LlamaForCausalLM"), tmp_path_factory.mktemp("llama"))


def _edited(src: Path, dst: Path, fn) -> Path:
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    fn(state)
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_non_finite_weights_name_the_tensor_and_count(tmp_path, llama_dir, capsys):
    def poison(state):
        w = state[Q1].clone()
        w[0, :3] = float("nan")
        w[5, 7] = float("inf")
        state[Q1] = w

    d = _edited(llama_dir, tmp_path / "nan", poison)
    with pytest.raises(CheckpointError) as e:
        kvlab.load(d)
    msg = str(e.value)
    assert "layers.1.attn.q_proj.weight" in msg and Q1 in msg and f"4 of {64 * 64}" in msg and "3 NaN, 1 inf" in msg
    assert main(["generate", str(d), "--ids", "1,2,3", "--max-new-tokens", "2"]) == 2
    assert Q1 in capsys.readouterr().err


def test_an_integer_tensor_where_a_float_weight_belongs_is_named(tmp_path, llama_dir):
    def to_int(state):
        state["model.norm.weight"] = torch.ones_like(state["model.norm.weight"], dtype=torch.int64)

    d = _edited(llama_dir, tmp_path / "int", to_int)
    with pytest.raises(CheckpointError, match=r"wrong dtype norm\.weight \(HF model\.norm\.weight\): torch\.int64"):
        kvlab.load(d, dtype=torch.bfloat16)


def _sharded(tmp_path: Path) -> tuple[Path, dict, Path]:
    d = save(tiny_hf("LlamaForCausalLM"), tmp_path / "sharded", max_shard_size="50KB")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = d / max(index["weight_map"].values())
    return d, index, shard


@pytest.mark.parametrize("escape", ["../outside.safetensors", "sub/../../outside.safetensors", "/abs"])
def test_shard_names_leaving_the_checkpoint_directory_are_refused(tmp_path, escape):
    d, index, shard = _sharded(tmp_path)
    name = escape if escape != "/abs" else str(tmp_path / "outside.safetensors")
    shutil.move(shard, tmp_path / "outside.safetensors")  # the file exists where the name points
    index["weight_map"] = {k: (name if v == shard.name else v) for k, v in index["weight_map"].items()}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as e:
        kvlab.load(d)
    assert repr(name) in str(e.value) and "outside the checkpoint directory" in str(e.value)


def test_symlinked_shards_as_in_the_hf_cache_still_load(tmp_path):
    d, _, _ = _sharded(tmp_path)
    ref = kvlab.load(d).state_dict()
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for f in d.glob("*.safetensors"):  # snapshots/<rev>/<file> -> ../../blobs/<hash>
        target = blobs / f"blob-{f.name}"
        shutil.move(f, target)
        f.symlink_to(Path("..") / "blobs" / target.name)
    got = kvlab.load(d).state_dict()
    assert all(torch.equal(got[k], v) for k, v in ref.items())
