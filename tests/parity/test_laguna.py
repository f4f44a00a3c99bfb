"""Laguna parity with transformers 5.23 on tiny random ``LagunaConfig`` models, and its config/weight errors.

The tiny models keep what makes Laguna Laguna: unequal per-layer query heads over shared KV heads,
sliding and full layers with their own RoPE (YaRN on half the head on full layers, plain on sliding
ones), per-head q/k norms, the softplus output gate (per head and per element), a dense first layer and
sigmoid-routed MoE layers with a non-zero correction bias, routed scaling and the shared expert.
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
    hf_logits,
    left_padded_batch,
    random_hf,
    save,
    scaled,
)

import kvlab
from kvlab.families import config_from_hf

LENGTHS = (21, 13)  # unequal rows, left-padded; 21 tokens cross a window of 4 five times
NEW = 32
BASE: dict[str, Any] = {
    "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 5,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256,
    "num_attention_heads_per_layer": [4, 8, 6, 2, 4],
    "layer_types": ["full_attention", "sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
    "mlp_layer_types": ["dense", "sparse", "sparse", "sparse", "sparse"], "sliding_window": 4,
    "num_experts": 6, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 24,
    "moe_routed_scaling_factor": 2.5, "rms_norm_eps": 1e-6,
    "rope_parameters": {
        "full_attention": {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 4.0, "partial_rotary_factor": 0.5,
                           "original_max_position_embeddings": 64, "beta_fast": 64.0, "beta_slow": 1.0,
                           "attention_factor": 1.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0}},
}
CASES: dict[str, dict[str, Any]] = {
    "per-head": {"gating": "per-head"},
    "per-element-bias-tied": {
        "gating": "per-element", "attention_bias": True, "tie_word_embeddings": True,
        "mlp_layer_types": ["dense", "dense", "sparse", "sparse", "dense"],
        "rope_parameters": {  # YaRN with its derived attention factor (0.1 ln 4 + 1)
            "full_attention": {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 4.0,
                               "partial_rotary_factor": 0.5, "original_max_position_embeddings": 64},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
}


def tiny_laguna(seed: int = 0, **overrides: Any) -> transformers.PreTrainedModel:
    # correction biases large enough to change which experts are chosen
    return random_hf(transformers.LagunaConfig(**{**BASE, **overrides}), "LagunaForCausalLM", seed,
                     rules=(scaled("e_score_correction_bias", 0.5),))


@pytest.fixture(scope="module", params=list(CASES))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, kvlab.Model]:
    hf = tiny_laguna(**CASES[request.param])
    path: Path = save(hf, tmp_path_factory.mktemp(request.param))
    return hf, kvlab.load(path)


def test_config_follows_the_layers(pair: tuple[Any, kvlab.Model]) -> None:
    hf, model = pair
    cfg = model.config
    assert [x.num_heads for x in cfg.layers] == BASE["num_attention_heads_per_layer"]
    assert [x.window for x in cfg.layers] == [None, 4, 4, 4, None]
    assert [x.mlp == "moe" for x in cfg.layers] == [t == "sparse" for t in hf.config.mlp_layer_types]
    full, sliding = cfg.layers[0].rope, cfg.layers[1].rope
    assert (full.scaling, full.partial, full.factor, full.original_max_positions) == ("yarn", 0.5, 4.0, 64)
    assert (sliding.scaling, sliding.partial, sliding.theta) == ("default", 1.0, 10000.0)
    assert all(x.output_gate == "softplus" and x.gate_per_head == (hf.config.gating == "per-head")
               for x in cfg.layers)


@torch.no_grad()
def test_logits_match(pair: tuple[Any, kvlab.Model]) -> None:
    hf, model = pair
    ids, mask = left_padded_batch(hf.config.vocab_size, LENGTHS)
    want = hf_logits(hf, ids, mask)  # positions as transformers' generate uses them
    # the short row alone gives the same logits
    assert_padded_logits_match(model, ids, mask, model(ids, attention_mask=mask), want)


@torch.no_grad()
def test_greedy_generation_matches(pair: tuple[Any, kvlab.Model]) -> None:
    hf, model = pair
    ids, mask = left_padded_batch(hf.config.vocab_size, LENGTHS)
    assert_greedy_matches(hf, model, ids, mask, NEW)


# -- config.json and weight errors ---------------------------------------------------------------------


def _json(**overrides: Any) -> dict[str, Any]:
    return {**BASE, "architectures": ["LagunaForCausalLM"], "model_type": "laguna", **overrides}


def test_head_list_of_the_wrong_length_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"num_attention_heads_per_layer has 4 entries; it needs one entry per "
                                         r"layer \(num_hidden_layers=5\)"):
        config_from_hf(_json(num_attention_heads_per_layer=[4, 8, 6, 2]))


def test_heads_the_kv_heads_do_not_divide_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"num_attention_heads_per_layer\[2\]=5 is not a multiple of "
                                         r"num_key_value_heads=2"):
        config_from_hf(_json(num_attention_heads_per_layer=[4, 8, 5, 2, 4]))


@pytest.mark.parametrize("key,value,needle", [
    ("layer_types", ["full_attention"] * 4, "layer_types has 4 entries"),
    ("layer_types", ["full_attention", "chunked_attention", "full_attention", "full_attention", "full_attention"],
     "layer_types ['chunked_attention'] not supported"),
    ("mlp_layer_types", ["dense", "moe", "sparse", "sparse", "sparse"], "mlp_layer_types ['moe'] not supported"),
    ("gating", "per-channel", "gating='per-channel' is not supported"),
    ("moe_router_logit_softcapping", 30.0, "moe_router_logit_softcapping=30.0 is not supported"),
    ("rope_parameters", {"rope_type": "default", "rope_theta": 10000.0}, "one dict per layer type"),
])
def test_unsupported_config_is_a_clear_error(key: str, value: Any, needle: str) -> None:
    with pytest.raises(ValueError, match="LagunaForCausalLM config.json") as e:
        config_from_hf(_json(**{key: value}))
    assert needle in str(e.value)


def test_defaults_follow_transformers() -> None:
    """Without rope_parameters/layer_types/mlp_layer_types: all full, layer 0 dense, theta 5e5 on half the head."""
    cfg = config_from_hf({"architectures": ["LagunaForCausalLM"], "num_hidden_layers": 3, "hidden_size": 64,
                          "vocab_size": 100, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                          "num_experts": 4, "num_experts_per_tok": 2})
    assert [x.window for x in cfg.layers] == [None, None, None]
    assert [x.mlp for x in cfg.layers] == ["dense", "moe", "moe"]
    assert (cfg.layers[0].rope.theta, cfg.layers[0].rope.partial) == (500000.0, 0.5)
    moe = cfg.layers[1].moe
    assert (moe.scoring, moe.bias_correction, moe.norm_topk, moe.shared_experts, moe.shared_size) == (
        "sigmoid", True, True, 1, 512)


def test_gate_shape_disagreeing_with_config_is_an_error(tmp_path: Path) -> None:
    hf = tiny_laguna(gating="per-element", num_hidden_layers=2, num_attention_heads_per_layer=[4, 8],
                     layer_types=["full_attention", "sliding_attention"], mlp_layer_types=["dense", "sparse"])
    path = save(hf, tmp_path / "ckpt")
    cfg = json.loads((path / "config.json").read_text())
    cfg["gating"] = "per-head"  # the weights are per-element
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"g_proj.weight has 64 rows, a per-element gate \(4 heads x 16\), but "
                                         r"config.json's gating says per-head \(4 rows\)"):
        kvlab.load(path)


def test_bench_can_write_a_laguna_twin() -> None:
    """`kvlab bench laguna-xs.2 --vs transformers` needs a LagunaConfig of the (scaled) preset's shape."""
    from kvlab.families import to_hf_config
    from kvlab.presets import get_preset
    from kvlab.shrink import scale_to_fit

    cfg, _ = scale_to_fit(get_preset("laguna-xs.2"), 256 * 2**20)
    d = to_hf_config(cfg)
    assert d["architectures"] == ["LagunaForCausalLM"]
    assert config_from_hf(d).layers == cfg.layers
    hf_cfg = transformers.LagunaConfig(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
    assert hf_cfg.num_attention_heads_per_layer == [x.num_heads for x in cfg.layers]
