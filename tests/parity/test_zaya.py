"""ZAYA1 parity with transformers 5.23 on tiny random ``ZayaConfig`` models, and its config errors.

The tiny models keep what makes ZAYA ZAYA: CCA in every layer (hybrid and hybrid-sliding), convolutions
whose weights matter, a non-zero key temperature (ZAYA initialises it to 0: keys would be all zero),
the router MLP carrying the previous layer's state, balancing biases that make some tokens take the
skip expert, per-channel residual scaling and the affine embedding, all with non-trivial values.
"""

from __future__ import annotations

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
from kvlab.layers.moe import MoE

LENGTHS = (20, 13)  # unequal rows, left-padded; 20 tokens cross a window of 4 several times
NEW = 32
BASE: dict[str, Any] = {
    "vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "moe_intermediate_size": 32, "num_experts": 4,
    "router_hidden_size": 16, "max_position_embeddings": 256, "sliding_window": 4,
    "layer_types": ["hybrid", "hybrid_sliding", "hybrid"],
}
CASES: dict[str, dict[str, Any]] = {
    "hybrid-sliding": {},
    "bias-kernel3-untied": {"attention_bias": True, "cca_time0": 3, "tie_word_embeddings": False,
                            "layer_types": ["hybrid_sliding", "hybrid", "hybrid_sliding"]},
}


def tiny_zaya(seed: int = 0, **overrides: Any) -> transformers.PreTrainedModel:
    def conv(name: str, p: torch.Tensor, gen: torch.Generator) -> torch.Tensor | None:
        if ".conv_qk_" in name and name.endswith("weight"):
            return 0.5 * torch.randn(p.shape, generator=gen)  # large enough for the convolutions to matter
        return None

    rules = (scaled(("norm.weight", "_scale"), 0.2, 1.0),
             scaled("qk_norm.temp", 0.3, 1.0),  # non-zero key temperature
             conv,
             scaled("router_mlp.out_proj.weight", 1.0))  # router choices that vary from token to token
    # balancing biases (the skip expert's too: some tokens take it) get the default 0.1 N(0, 1)
    return random_hf(transformers.ZayaConfig(**{**BASE, **overrides}), "ZayaForCausalLM", seed, rules,
                     buffers=("balancing_biases",))


@pytest.fixture(scope="module", params=list(CASES))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, kvlab.Model]:
    hf = tiny_zaya(**CASES[request.param])
    path: Path = save(hf, tmp_path_factory.mktemp(request.param))
    return hf, kvlab.load(path)


def test_config_and_values_follow_the_checkpoint(pair: tuple[Any, kvlab.Model]) -> None:
    hf, model = pair
    cfg, c = model.config, hf.config
    assert all(x.attention == "cca" and x.cca.conv_kernels == (c.cca_time0, c.cca_time1) for x in cfg.layers)
    assert [x.window for x in cfg.layers] == [4 if t == "hybrid_sliding" else None for t in c.layer_types]
    assert [x.moe.router_carry for x in cfg.layers] == [False, True, True]
    assert cfg.embed_affine and cfg.residual_fp32 and cfg.tie_embeddings == c.tie_word_embeddings
    # loading keeps every value: spot-check tensors of each kind against the transformers model
    hs = hf.state_dict()
    ks = model.state_dict()
    for hf_name, kv_name in [
        ("model.layers.1.self_attn.qk_norm.temp", "layers.1.attn.key_temp"),
        ("model.layers.1.self_attn.qkv_proj.conv_qk_grouped.weight", "layers.1.attn.conv_grouped.weight"),
        ("model.layers.2.mlp.gate.balancing_biases", "layers.2.mlp.router_bias"),
        ("model.layers.2.mlp.gate.router_states_scale", "layers.2.mlp.router_state_scale"),
        ("model.layers.0.post_mlp_residual_scale.residual_bias", "layers.0.mlp_residual.res_bias"),
        ("model.input_hidden_states_scale", "embed_affine_scale"),
    ]:
        assert torch.equal(hs[hf_name], ks[kv_name]), hf_name
    gate, up = hs["model.layers.0.mlp.experts.gate_up_proj"].chunk(2, dim=1)
    assert torch.equal(ks["layers.0.mlp.experts.gate_proj"], gate) and torch.equal(ks["layers.0.mlp.experts.up_proj"], up)


@torch.no_grad()
def test_logits_match(pair: tuple[Any, kvlab.Model], monkeypatch: pytest.MonkeyPatch) -> None:
    hf, model = pair
    ids, mask = left_padded_batch(hf.config.vocab_size, LENGTHS)
    want = hf_logits(hf, ids, mask)  # positions as transformers' generate uses them
    chosen: list[torch.Tensor] = []
    choose = MoE.choose  # the experts each token goes to (MoE.forward's call; MoE.route adds the routed scaling)

    def spy(self: MoE, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        idx, w = choose(self, x, token_ids)
        chosen.append(idx)
        return idx, w

    monkeypatch.setattr(MoE, "choose", spy)
    got = model(ids, attention_mask=mask)
    skip = torch.cat(chosen) == hf.config.num_experts
    assert 0 < skip.float().mean() < 0.5  # the skip expert is exercised, and not everywhere
    # the short row alone gives the same logits, except with projection biases (transformers' conv sees the
    # pads' biases)
    assert_padded_logits_match(model, ids, mask, got, want, row_alone=None if hf.config.attention_bias else 1)


@pytest.mark.parametrize("chunk", [1, 3, 7])
@torch.no_grad()
def test_chunked_prefill_equals_full_forward(pair: tuple[Any, kvlab.Model], chunk: int) -> None:
    _, model = pair
    ids, mask = left_padded_batch(model.config.vocab_size, LENGTHS)
    full = model(ids, attention_mask=mask)
    cache = model.new_cache(ids.shape[0], max_length=ids.shape[1])
    cache.set_padding((mask == 0).sum(-1))  # a first chunk may be all padding
    outs = [model(ids[:, s:s + chunk], cache=cache) for s in range(0, ids.shape[1], chunk)]
    got = torch.cat(outs, 1)
    real = mask.bool()
    assert (got[real] - full[real]).abs().max().item() <= 1e-5


@torch.no_grad()
def test_greedy_generation_matches(pair: tuple[Any, kvlab.Model]) -> None:
    hf, model = pair
    ids, mask = left_padded_batch(hf.config.vocab_size, LENGTHS)
    assert_greedy_matches(hf, model, ids, mask, NEW)


# -- config.json errors and defaults ---------------------------------------------------------------------------


def _json(**overrides: Any) -> dict[str, Any]:
    return {**BASE, "architectures": ["ZayaForCausalLM"], "model_type": "zaya", **overrides}


@pytest.mark.parametrize("key,value,needle", [
    ("num_experts_per_tok", 2, "num_experts_per_tok=2 is not supported"),
    ("lm_head_bias", True, "lm_head_bias=true is not supported"),
    ("layer_types", ["hybrid", "full_attention", "hybrid"], "layer_types ['full_attention'] not supported"),
    ("layer_types", ["hybrid"], "layer_types has 1 entries for num_hidden_layers=3"),
    ("sliding_window", None, "hybrid_sliding layers but sliding_window is null"),
])
def test_unsupported_config_is_a_clear_error(key: str, value: Any, needle: str) -> None:
    with pytest.raises(ValueError, match="ZayaForCausalLM config.json") as e:
        config_from_hf(_json(**{key: value}))
    assert needle in str(e.value)


def test_defaults_follow_transformers() -> None:
    """The hub config's nested rope_parameters plus a stray flat rope_type; defaults for everything else."""
    cfg = config_from_hf({"architectures": ["ZayaForCausalLM"], "rope_parameters": {
        "rope_type": "default", "hybrid": {"rope_type": "default", "rope_theta": 5e6, "partial_rotary_factor": 0.5}}})
    want = kvlab.presets.get_preset("zaya1-8b")
    assert cfg.layers == want.layers
    assert (cfg.vocab_size, cfg.hidden_size, cfg.norm_eps, cfg.tie_embeddings) == (262272, 2048, 1e-5, True)


def test_bench_can_write_a_zaya_twin() -> None:
    """`kvlab bench zaya1-8b --vs transformers` needs a ZayaConfig of the (scaled) preset's shape."""
    from kvlab.families import to_hf_config
    from kvlab.shrink import scale_to_fit

    cfg, _ = scale_to_fit(kvlab.presets.get_preset("zaya1-8b"), 256 * 2**20)
    d = to_hf_config(cfg)
    assert d["architectures"] == ["ZayaForCausalLM"]
    assert config_from_hf(d).layers == cfg.layers
    hf_cfg = transformers.ZayaConfig(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
    assert (hf_cfg.num_attention_heads, hf_cfg.num_key_value_heads, hf_cfg.cca_time0) == (8, 2, 2)
