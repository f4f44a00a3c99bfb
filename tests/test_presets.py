"""Presets: the registry API and the published numbers of each baseline config."""

from __future__ import annotations

import pytest

from kvlab.config import ModelConfig, uniform_layers
from kvlab.presets import get_preset, preset_source, presets, register
from kvlab.presets import registry as _registry


def test_presets_lists_the_baselines_sorted() -> None:
    names = presets()
    assert names == sorted(names)
    for name in ("llama-3.1-8b", "qwen3-8b", "mistral-7b", "mha-32l-4096", "gqa-32l-4096"):
        assert name in names


def test_get_preset_returns_a_fresh_object() -> None:
    a = get_preset("llama-3.1-8b")
    b = get_preset("llama-3.1-8b")
    assert a is not b and a.layers[0] is not b.layers[0]
    a.layers[0].num_kv_heads = 32
    a.vocab_size = 7
    assert b.layers[0].num_kv_heads == 8 and get_preset("llama-3.1-8b").vocab_size == 128256


def test_every_preset_names_itself_and_cites_a_config_json() -> None:
    for name in presets():
        cfg = get_preset(name)
        assert isinstance(cfg, ModelConfig)
        assert cfg.name == name
        assert "config.json" in cfg.source or "memory_estimator" in cfg.source, (name, cfg.source)
        assert cfg.source == preset_source(name)


def test_unknown_preset_lists_available_names() -> None:
    with pytest.raises(ValueError, match="unknown preset 'llama-9'") as e:
        get_preset("llama-9")
    assert "llama-3.1-8b" in str(e.value) and "mistral-7b" in str(e.value)
    with pytest.raises(ValueError, match="available"):
        preset_source("nope")


def test_llama_3_1_8b_matches_its_config_json() -> None:
    c = get_preset("llama-3.1-8b")
    assert (c.num_layers, c.hidden_size, c.vocab_size, c.max_positions, c.norm_eps) == (32, 4096, 128256, 131072, 1e-5)
    assert not c.tie_embeddings and c.source == "meta-llama/Llama-3.1-8B config.json"
    for x in c.layers:
        assert (x.num_heads, x.num_kv_heads, x.head_dim, x.intermediate_size) == (32, 8, 128, 14336)
        assert x.window is None and not x.gqa.qk_norm and not x.qkv_bias
        r = x.rope
        assert (r.theta, r.scaling, r.factor, r.low_freq_factor, r.high_freq_factor, r.original_max_positions) == (
            500000.0, "llama3", 8.0, 1.0, 4.0, 8192)


def test_qwen3_8b_matches_its_config_json() -> None:
    c = get_preset("qwen3-8b")
    assert (c.num_layers, c.hidden_size, c.vocab_size, c.max_positions, c.norm_eps) == (36, 4096, 151936, 40960, 1e-6)
    assert not c.tie_embeddings
    for x in c.layers:
        assert (x.num_heads, x.num_kv_heads, x.head_dim, x.intermediate_size) == (32, 8, 128, 12288)
        assert x.gqa.qk_norm and x.window is None and x.rope.theta == 1e6 and x.rope.scaling == "default"


def test_mistral_7b_matches_its_config_json() -> None:
    c = get_preset("mistral-7b")
    assert (c.num_layers, c.hidden_size, c.vocab_size, c.max_positions, c.norm_eps) == (32, 4096, 32000, 32768, 1e-5)
    for x in c.layers:
        assert (x.num_heads, x.num_kv_heads, x.head_dim, x.intermediate_size) == (32, 8, 128, 14336)
        assert x.window == 4096 and x.rope.theta == 1e4


def test_rasbt_generic_pair_differs_only_in_kv_heads() -> None:
    mha, gqa = get_preset("mha-32l-4096"), get_preset("gqa-32l-4096")
    assert [x.num_kv_heads for x in mha.layers] == [32] * 32
    assert [x.num_kv_heads for x in gqa.layers] == [8] * 32
    for c in (mha, gqa):
        assert (c.hidden_size, c.layers[0].num_heads, c.layers[0].head_dim, c.layers[0].intermediate_size) == (
            4096, 32, 128, 11008)


@pytest.fixture
def scratch_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_registry, "_REGISTRY", dict(_registry._REGISTRY))


def _tiny() -> ModelConfig:
    return ModelConfig(vocab_size=64, hidden_size=32,
                       layers=uniform_layers(2, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64))


@pytest.mark.usefixtures("scratch_registry")
def test_register_adds_a_preset_and_fills_name_and_source() -> None:
    register("tiny-test", _tiny, "hand-written test config")
    assert "tiny-test" in presets()
    cfg = get_preset("tiny-test")
    assert cfg.name == "tiny-test" and cfg.source == "hand-written test config"
    with pytest.raises(ValueError, match="already registered"):
        register("tiny-test", _tiny, "again")
    register("tiny-test", _tiny, "replaced", replace=True)
    assert get_preset("tiny-test").source == "replaced"


@pytest.mark.usefixtures("scratch_registry")
def test_register_rejects_bad_entries() -> None:
    with pytest.raises(ValueError, match="source"):
        register("x", _tiny, "  ")
    with pytest.raises(ValueError, match="name"):
        register("", _tiny, "src")
    with pytest.raises(TypeError, match="callable"):
        register("x", 3, "src")  # type: ignore[arg-type]
    register("bad-builder", lambda: {"not": "a config"}, "src")  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError, match="expected ModelConfig"):
        get_preset("bad-builder")


def test_scratch_registry_left_the_real_one_alone() -> None:
    assert "tiny-test" not in presets() and "bad-builder" not in presets()
