"""Parity with transformers 5.23 Gemma 4 (text): logits of a left-padded batch, greedy generation, checkpoints.

Tiny random ``Gemma4TextConfig`` models (fp32, eager attention), saved with ``save_pretrained`` and
loaded with ``kvlab.load``. Offline; no downloads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from hf_tiny import assert_greedy_matches, assert_padded_logits_match, hf_logits, left_padded_batch, max_diff

import kvlab
from kvlab.families import config_from_hf

S, F = "sliding_attention", "full_attention"
BASE: dict[str, Any] = {
    "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "global_head_dim": 32, "sliding_window": 4, "max_position_embeddings": 256,
}
CASES: dict[str, dict[str, Any]] = {
    # sharing covers both types: layers 4 (full) and 6 (full) read layer 2, layer 5 (sliding) reads layer 3
    "shared-ple-wide-softcap": {"num_hidden_layers": 7, "layer_types": [S, S, F, S, F, S, F], "num_kv_shared_layers": 3,
                                "hidden_size_per_layer_input": 8, "vocab_size_per_layer_input": 128,
                                "use_double_wide_mlp": True, "final_logit_softcapping": 5.0},
    # 26B-A4B-like: K = V on full layers with their own KV-head count, dense MLP + MoE in parallel, no PLE
    "k_eq_v-moe": {"num_hidden_layers": 6, "layer_types": [S, S, F, S, S, F], "attention_k_eq_v": True,
                   "num_global_key_value_heads": 1, "enable_moe_block": True, "num_experts": 4, "top_k_experts": 2,
                   "moe_intermediate_size": 16, "hidden_size_per_layer_input": 0, "final_logit_softcapping": 5.0},
}
LENGTHS = (20, 13)  # unequal rows, left-padded; both longer than three windows of 4
NEW = 32


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial weights everywhere: norms and scales around 1, layer scalars in [0.5, 1.5]."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name or name.endswith("scale"):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.1 * noise)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen))


def text_config(**kw: Any) -> transformers.Gemma4TextConfig:
    cfg = transformers.Gemma4TextConfig(**{**BASE, **kw})
    cfg._attn_implementation = "eager"
    return cfg


def tiny_causal(case: str) -> transformers.Gemma4ForCausalLM:
    torch.manual_seed(0)
    model = transformers.Gemma4ForCausalLM(text_config(**CASES[case]))
    randomize(model)
    gc = model.generation_config
    gc.eos_token_id, gc.pad_token_id, gc.bos_token_id = None, 0, None
    return model.eval()


@pytest.fixture(scope="module", params=list(CASES))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, kvlab.Model]:
    hf = tiny_causal(request.param)
    path: Path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, kvlab.load(path)


@torch.no_grad()
def test_config_reads_every_feature(pair: tuple[Any, kvlab.Model]) -> None:
    hf, model = pair
    cfg, c = model.config, hf.config
    modes = c.kv_sharing_modes
    for i, spec in enumerate(cfg.layers):
        full = c.layer_types[i] == F
        assert spec.window == (None if full else c.sliding_window)
        assert spec.head_dim == (32 if full else 16)
        assert (spec.kv_source is not None) == (modes[i] == "reuse")
        assert spec.gqa.k_eq_v == (full and c.attention_k_eq_v)
        assert spec.rope.scaling == ("proportional" if full else "default")
        assert spec.sandwich_norm and spec.layer_scalar and spec.gqa.v_norm and spec.gqa.qk_norm and spec.attn_scale == 1.0
    # the sharing layers hold no K/V weights, and their double-wide MLPs are twice as wide
    for i, layer in enumerate(model.layers):
        assert hasattr(layer.attn, "k_proj") == (cfg.layers[i].kv_source is None)
        assert layer.mlp.up_proj.out_features == hf.model.layers[i].mlp.up_proj.out_features
    assert model.num_parameters() == kvlab.costs(cfg, context=64).params_total


@torch.no_grad()
def test_logits_match(pair: tuple[Any, kvlab.Model]) -> None:
    hf, model = pair
    ids, mask = left_padded_batch(hf.config.vocab_size, LENGTHS)
    want = hf_logits(hf, ids, mask)  # positions as transformers' generate uses them
    got = model(ids, attention_mask=mask)
    assert_padded_logits_match(model, ids, mask, got, want, row_alone=None)
    # chunked prefill + decode through the cache gives the same logits
    cache = model.new_cache(2, max_length=max(LENGTHS))
    cache.set_padding(torch.tensor([max(LENGTHS) - n for n in LENGTHS]))
    inc = torch.cat([model(ids[:, s:s + 3], cache=cache) for s in range(0, ids.shape[1], 3)], 1)
    assert max_diff(inc, want, mask) <= 1e-4


@torch.no_grad()
def test_greedy_generation_matches(pair: tuple[Any, kvlab.Model]) -> None:
    hf, model = pair
    ids, mask = left_padded_batch(hf.config.vocab_size, LENGTHS)
    assert_greedy_matches(hf, model, ids, mask, NEW, prefill_chunk=7)


@torch.no_grad()
def test_conditional_generation_checkpoint_text_logits(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """A tiny Gemma4ForConditionalGeneration (with a vision tower): kvlab loads the text model only."""
    text = text_config(**CASES["shared-ple-wide-softcap"])
    vision = transformers.Gemma4VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                                             position_embedding_size=64)
    cfg = transformers.Gemma4Config(text_config=text, vision_config=vision, audio_config=None)
    cfg._attn_implementation = "eager"
    cfg.text_config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = transformers.Gemma4ForConditionalGeneration(cfg)
    randomize(hf)
    hf.eval().save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["Gemma4ForConditionalGeneration"]
    model = kvlab.load(tmp_path)
    err = capfd.readouterr().err
    assert "loading the text model only" in err and "vision/audio" in err
    ids, mask = left_padded_batch(text.vocab_size, LENGTHS)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    want = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    got = model(ids, attention_mask=mask)
    assert max_diff(got, want, mask) <= 1e-4


def _hf_dict(**kw: Any) -> dict[str, Any]:
    cfg = text_config(**{**CASES["shared-ple-wide-softcap"], **kw})
    return {**cfg.to_dict(), "architectures": ["Gemma4ForCausalLM"]}


def test_too_many_shared_layers_is_a_clear_error() -> None:
    d = _hf_dict()
    d["num_kv_shared_layers"] = 9
    with pytest.raises(ValueError, match=r"Gemma4ForCausalLM config.json: num_kv_shared_layers=9 "
                                         r".*num_hidden_layers=7"):
        config_from_hf(d)


def test_shared_layer_with_another_head_layout_is_a_clear_error() -> None:
    d = _hf_dict()
    d["per_layer_config"] = {**d["per_layer_config"], "6": {"head_dim": 64}}  # layer 6 reads layer 2 (head_dim 32)
    with pytest.raises(ValueError, match=r"num_kv_shared_layers=3: .*layers\[6\]\.head_dim=64 differs from "
                                         r"layers\[2\]\.head_dim=32"):
        config_from_hf(d)


def test_shared_type_without_a_producer_is_a_clear_error() -> None:
    d = _hf_dict()
    d["layer_types"] = [S, S, S, S, F, F, F]
    d["per_layer_config"] = {"4": {"head_dim": 32}, "5": {"head_dim": 32}, "6": {"head_dim": 32}}
    with pytest.raises(ValueError, match=r"layers\[4\] \(full\) has no earlier non-shared layer of its type"):
        config_from_hf(d)


def test_hub_style_config_with_global_head_dim() -> None:
    """Published config.json files give global_head_dim / num_global_key_value_heads, not per_layer_config."""
    d = {k: v for k, v in _hf_dict(**CASES["k_eq_v-moe"]).items() if k != "per_layer_config"}
    d.update(global_head_dim=32, num_global_key_value_heads=1)
    cfg = config_from_hf(d)
    full = [x for x in cfg.layers if x.window is None]
    assert all(x.head_dim == 32 and x.num_kv_heads == 1 and x.gqa.k_eq_v for x in full)
    assert all(x.head_dim == 16 and x.num_kv_heads == 2 and not x.gqa.k_eq_v for x in cfg.layers if x.window)


@pytest.mark.parametrize("name", ["gemma-4-e2b", "gemma-4-e4b", "gemma-4-26b-a4b", "gemma-4-31b"])
def test_presets_round_trip_through_a_transformers_config(name: str) -> None:
    """``kvlab bench --vs transformers`` writes the preset (scaled to fit) as a Gemma4TextConfig."""
    from kvlab.families import to_hf_config
    from kvlab.presets import get_preset
    from kvlab.shrink import scale_to_fit

    cfg, _ = scale_to_fit(get_preset(name))
    d = to_hf_config(cfg)
    assert d["architectures"] == ["Gemma4ForCausalLM"]
    hf = transformers.Gemma4TextConfig(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
    assert hf.kv_sharing_modes.count("reuse") == sum(x.kv_source is not None for x in cfg.layers)
