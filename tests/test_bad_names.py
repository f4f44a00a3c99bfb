"""Unknown names: a misspelt preset or architecture suggests the nearest names, names match ignoring case, a hub id
is answered with what kvlab can read instead, a checkpoint's config.json given for its directory says so."""

from __future__ import annotations

import json

import pytest

from kvlab.cli import main
from kvlab.costs import costs
from kvlab.errors import UnknownNameError
from kvlab.families import config_from_hf
from kvlab.names import did_you_mean, find
from kvlab.presets import get_preset
from kvlab.resolve import resolve_spec


def test_unknown_preset_suggests_the_nearest_names(capsys):
    with pytest.raises(UnknownNameError, match=r"unknown preset 'gemma-4-e2'; did you mean gemma-4-e2b"):
        get_preset("gemma-4-e2")
    assert main(["calc", "gema-4-e2b", "--context", "1k"]) == 2
    err = capsys.readouterr().err
    assert "did you mean gemma-4-e2b" in err and "Traceback" not in err
    assert did_you_mean("zzzzzz", ["gemma-4-e2b"]) == ""


def test_names_match_ignoring_case(capsys):
    assert get_preset("Gemma-4-E2B").name == "gemma-4-e2b"
    assert resolve_spec("LLAMA-3.1-8B").name == "llama-3.1-8b"
    assert costs("Llama-3.1-8B", context=1024).kv_cache_bytes == costs("llama-3.1-8b", context=1024).kv_cache_bytes
    assert main(["calc", "Llama-3.1-8B", "--context", "1k", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "llama-3.1-8b"
    assert find("a", ["A", "a"]) == "a" and find("b", ["B", "b2"]) == "B" and find("c", ["C", "c "]) == "C"


def test_a_hub_id_is_answered_with_what_kvlab_can_read(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(UnknownNameError) as e:
        resolve_spec("meta-llama/Llama-3.1-8B")
    msg = str(e.value)
    assert "Hugging Face hub id" in msg and "never downloads" in msg and "the preset llama-3.1-8b" in msg
    assert "local checkpoint directory" in msg and "GGUF" in msg
    snap = tmp_path / "hub" / "models--meta-llama--Llama-3.1-8B" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    assert main(["calc", "meta-llama/Llama-3.1-8B"]) == 2
    assert f"it is in your Hugging Face cache: pass {str(snap)!r}" in capsys.readouterr().err


def test_an_unknown_architecture_suggests_the_nearest_family_and_case_is_ignored():
    hf = {"vocab_size": 32, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
          "num_attention_heads": 4, "max_position_embeddings": 64}
    with pytest.raises(UnknownNameError, match=r"LlamaForCausalLMM; did you mean LlamaForCausalLM\?"):
        config_from_hf({**hf, "architectures": ["LlamaForCausalLMM"]})
    assert config_from_hf({**hf, "architectures": ["llamaforcausallm"]}).hidden_size == 32


def test_a_checkpoint_config_json_given_for_its_directory_says_pass_the_directory(tmp_path, capsys):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    assert main(["calc", str(d / "config.json"), "--context", "1k"]) == 2
    assert f"pass the directory {str(d)!r}" in capsys.readouterr().err
