"""Parity with transformers 5.23 Gemma 3 (text): logits of a left-padded batch, chunked prefill, greedy generation.

Tiny random ``Gemma3TextConfig`` models (fp32, eager attention) saved with ``save_pretrained`` and loaded with
``kvlab.load``; a tiny ``Gemma3ForConditionalGeneration`` (with its vision tower) for the text-part loader.
Offline; no downloads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from hf_tiny import (
    assert_greedy_matches,
    assert_padded_logits_match,
    hf_json,
    hf_logits,
    left_padded_batch,
    max_diff,
    random_hf,
)

import kvlab
from kvlab.families import config_from_hf

S, F = "sliding_attention", "full_attention"
BASE: dict[str, Any] = {
    "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "sliding_window": 4, "max_position_embeddings": 256,
}
CASES: dict[str, dict[str, Any]] = {
    # the published layout: 5 sliding : 1 global by the default pattern, separate RoPE bases per layer type
    "pattern-default": {"num_hidden_layers": 7, "query_pre_attn_scalar": 16,
                        "rope_parameters": {S: {"rope_type": "default", "rope_theta": 100.0},
                                            F: {"rope_type": "default", "rope_theta": 10000.0}}},
    # explicit layer types, a query scalar other than head_dim (as 27B), linear scaling on the global layers only,
    # biases, a final soft-cap, one KV head
    "scaled-softcap-bias": {"num_hidden_layers": 4, "layer_types": [S, F, S, F], "query_pre_attn_scalar": 24,
                            "num_key_value_heads": 1, "attention_bias": True, "final_logit_softcapping": 5.0,
                            "rope_parameters": {S: {"rope_type": "default", "rope_theta": 50.0},
                                                F: {"rope_type": "linear", "factor": 4.0, "rope_theta": 5000.0}}},
}
LENGTHS = (20, 13)  # unequal rows, left-padded; both longer than three windows of 4
NEW = 24


def text_config(**kw: Any) -> transformers.Gemma3TextConfig:
    return transformers.Gemma3TextConfig(**{**BASE, **kw})


@pytest.fixture(scope="module", params=list(CASES))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, kvlab.Model]:
    hf = random_hf(text_config(**CASES[request.param]), "Gemma3ForCausalLM", seed=0)
    path: Path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, kvlab.load(path)


def test_config_reads_every_feature(pair: tuple[Any, kvlab.Model]) -> None:
    hf, model = pair
    cfg, c = model.config, hf.config
    assert cfg.norm_offset and cfg.tie_embeddings and cfg.embed_scale == pytest.approx(c.hidden_size ** 0.5)
    assert cfg.final_logit_softcap == c.final_logit_softcapping
    for i, spec in enumerate(cfg.layers):
        kind = c.layer_types[i]
        assert spec.window == (None if kind == F else c.sliding_window)
        assert spec.rope.theta == c.rope_parameters[kind]["rope_theta"]
        assert spec.rope.scaling == c.rope_parameters[kind]["rope_type"]
        assert spec.attn_scale == pytest.approx(c.query_pre_attn_scalar ** -0.5)
        assert spec.gqa.qk_norm and spec.sandwich_norm and spec.qkv_bias == c.attention_bias
    assert model.num_parameters() == sum(p.numel() for p in hf.parameters())  # tied head counted once
    assert model.num_parameters() == kvlab.costs(cfg, context=64).params_total


@torch.no_grad()
def test_logits_match(pair: tuple[Any, kvlab.Model]) -> None:
    hf, model = pair
    ids, mask = left_padded_batch(hf.config.vocab_size, LENGTHS)
    want = hf_logits(hf, ids, mask)
    got = model(ids, attention_mask=mask)
    assert_padded_logits_match(model, ids, mask, got, want)
    # chunked prefill + decode through the cache gives the same logits as the full forward
    cache = model.new_cache(2, max_length=max(LENGTHS))
    cache.set_padding(torch.tensor([max(LENGTHS) - n for n in LENGTHS]))
    inc = torch.cat([model(ids[:, s:s + 3], cache=cache) for s in range(0, ids.shape[1], 3)], 1)
    assert max_diff(inc, want, mask) <= 1e-4


@torch.no_grad()
def test_chunked_prefill_then_decode_equals_full_forward(pair: tuple[Any, kvlab.Model]) -> None:
    _, model = pair
    ids = torch.randint(1, 128, (1, 23), generator=torch.Generator().manual_seed(3))
    full = model(ids)
    cache = model.new_cache(1, max_length=ids.shape[1])
    parts = [model(ids[:, s:s + 5], cache=cache) for s in range(0, 15, 5)]
    parts += [model(ids[:, s:s + 1], cache=cache) for s in range(15, ids.shape[1])]
    # 1e-4 plus 2e-5 of the logit: one position of this random model is ill-conditioned (its logits are 2.6e-5 from
    # the float64 forward's, chunked 7.8e-5; 1.04e-4 apart on an AVX2 machine, needing 5e-6 of the logit)
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-4, rtol=2e-5)


@torch.no_grad()
def test_greedy_generation_matches(pair: tuple[Any, kvlab.Model]) -> None:
    hf, model = pair
    ids, mask = left_padded_batch(hf.config.vocab_size, LENGTHS)
    assert_greedy_matches(hf, model, ids, mask, NEW, prefill_chunk=7)


@torch.no_grad()
def test_conditional_generation_checkpoint_text_logits(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """A tiny Gemma3ForConditionalGeneration (with a vision tower): kvlab loads the text model only."""
    # no final soft-cap here: transformers 5.23's Gemma3ForConditionalGeneration.forward never applies it (kvlab
    # applies the config's value; every published Gemma 3 config has none)
    text = text_config(**{**CASES["scaled-softcap-bias"], "final_logit_softcapping": None})
    vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14)
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    hf = random_hf(cfg, "Gemma3ForConditionalGeneration", seed=1)
    hf.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["Gemma3ForConditionalGeneration"]
    model = kvlab.load(tmp_path)
    err = capfd.readouterr().err
    assert "loading the text model only" in err
    ids, mask = left_padded_batch(text.vocab_size, LENGTHS)
    got = model(ids, attention_mask=mask)
    assert max_diff(got, hf_logits(hf, ids, mask), mask) <= 1e-4


def test_old_style_rope_keys() -> None:
    """Hub config.json files of Gemma 3 give rope_theta / rope_local_base_freq / rope_scaling (global only)."""
    d = {**BASE, "architectures": ["Gemma3ForCausalLM"], "num_hidden_layers": 6, "rope_theta": 1e6,
         "rope_local_base_freq": 1e4, "rope_scaling": {"rope_type": "linear", "factor": 8.0}}
    hf = transformers.Gemma3TextConfig(**{k: v for k, v in d.items() if k != "architectures"})
    cfg = config_from_hf(d)
    for i, spec in enumerate(cfg.layers):
        p = hf.rope_parameters[hf.layer_types[i]]
        assert (spec.rope.theta, spec.rope.scaling, spec.rope.factor) == (p["rope_theta"], p["rope_type"],
                                                                          p.get("factor", 1.0))
    assert [x.window is None for x in cfg.layers] == [t == F for t in hf.layer_types]


@pytest.mark.parametrize(("key", "value"), [("attn_logit_softcapping", 50.0), ("use_bidirectional_attention", True)])
def test_unsupported_options_are_named(key: str, value: Any) -> None:
    d = {**hf_json(random_hf(text_config(num_hidden_layers=2), "Gemma3ForCausalLM")), key: value}
    with pytest.raises(ValueError, match=rf"Gemma3ForCausalLM config.json: {key}={value!r} is not supported"):
        config_from_hf(d)


@pytest.mark.parametrize("name", ["gemma-3-270m", "gemma-3-1b", "gemma-3-4b", "gemma-3-12b", "gemma-3-27b"])
def test_presets_match_transformers_parameter_count(name: str) -> None:
    """Each preset, written back as a transformers config (what ``kvlab bench --vs transformers`` does), builds the
    transformers model of the same shape (on meta): same parameter count, same layer types and query scale."""
    from kvlab.families import to_hf_config
    from kvlab.presets import get_preset
    from kvlab.presets.gemma3 import TEXT

    cfg = get_preset(name)
    d = to_hf_config(cfg)
    hf_cfg = text_config(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        hf = transformers.Gemma3ForCausalLM(hf_cfg)
    assert kvlab.costs(cfg, context=1).params_total == sum(p.numel() for p in hf.parameters())  # tied head once
    assert [x.window is None for x in cfg.layers] == [t == F for t in hf_cfg.layer_types]
    assert hf_cfg.query_pre_attn_scalar == TEXT[name]["query_pre_attn_scalar"]
    assert hf_cfg.rope_parameters[F].get("factor", 1.0) == (TEXT[name]["rope_scaling"] or {}).get("factor", 1.0)
