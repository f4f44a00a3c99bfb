"""DeepSeek V3 / V3.2 parity with transformers 5.23 on tiny random ``DeepseekV3Config`` / ``DeepseekV32Config``
models, and their checkpoint errors.

The tiny models keep what makes V3 V3: MLA with (and without) the low-rank query path, interleaved (and
rotate-half) RoPE on the shared rotary key, YaRN with ``mscale`` / ``mscale_all_dim`` (the softmax-scale factor),
two dense layers then MoE layers with sigmoid scores, a non-zero correction bias, group-limited routing
(``n_group`` 4, ``topk_group`` 2), routed scaling and a shared expert. The V3.2 case adds DeepSeek sparse
attention: the lightning indexer picks 5 keys per query.
"""

from __future__ import annotations

import json
import math
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
from safetensors.torch import load_file, save_file

import kvlab
from kvlab.families import config_from_hf
from kvlab.families.deepseek_v3 import dequantise_fp8
from kvlab.layers.mla import softmax_scale

LENGTHS = (21, 13)
NEW = 32
BASE: dict[str, Any] = {
    "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
    "num_hidden_layers": 4, "first_k_dense_replace": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
    "kv_lora_rank": 16, "q_lora_rank": 24, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 12,
    "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2, "n_shared_experts": 1,
    "routed_scaling_factor": 2.5, "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                        "original_max_position_embeddings": 64, "mscale": 0.9, "mscale_all_dim": 0.7,
                        "beta_fast": 32.0, "beta_slow": 1.0},
}
CASES: dict[str, dict[str, Any]] = {
    "q-lora-yarn-interleave": {},
    # DeepSeek V3.2: DSA with top-5 of up to 53 keys, so the indexer's choice shapes every later logit; 16 indexer
    # heads make score ties (a key at relu 0 in every head; topk may break them differently) improbable
    "v32-sparse-top5": {"v32": True, "index_topk": 5, "index_head_dim": 16, "index_n_heads": 16},
    "plain-q-rotate-half-bias": {"q_lora_rank": None, "rope_interleave": False, "attention_bias": True,
                                 "norm_topk_prob": False, "n_shared_experts": 2,
                                 "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}},
}


def tiny_deepseek(seed: int = 0, v32: bool = False, **overrides: Any) -> transformers.PreTrainedModel:
    kind = "DeepseekV32" if v32 else "DeepseekV3"
    cfg = getattr(transformers, f"{kind}Config")(**{**BASE, **overrides})
    # correction biases large enough to change which experts (and groups) are chosen
    return random_hf(cfg, f"{kind}ForCausalLM", seed, rules=(scaled("e_score_correction_bias", 0.5),),
                     buffers=("e_score_correction_bias",))


@pytest.fixture(scope="module", params=list(CASES))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, kvlab.Model, Path]:
    hf = tiny_deepseek(**CASES[request.param])
    path: Path = save(hf, tmp_path_factory.mktemp(request.param))
    return hf, kvlab.load(path), path


def test_config_follows_the_checkpoint(pair: tuple[Any, kvlab.Model, Path]) -> None:
    hf, model, _ = pair
    c, cfg = hf.config, model.config
    assert [x.mlp for x in cfg.layers] == ["dense", "dense", "moe", "moe"]
    for x in cfg.layers:
        m = x.mla
        assert x.attention == "mla" and x.num_kv_heads == 1 and x.head_dim == 24 and x.value_dim == 12
        assert (m.kv_lora_rank, m.q_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim) == (
            16, c.q_lora_rank, 16, 8, 12)
        assert m.rope_interleave == getattr(c, "rope_interleave", True) and int(x.head_dim * x.rope.partial) == 8
        assert m.index_topk == getattr(c, "index_topk", None)
    moe = cfg.layers[2].moe
    assert (moe.n_group, moe.topk_group, moe.scoring, moe.bias_correction, moe.routed_scaling) == (
        4, 2, "sigmoid", True, 2.5)
    assert moe.shared_width == c.n_shared_experts * 32 and moe.norm_topk == c.norm_topk_prob
    attn = hf.model.layers[0].self_attn
    assert softmax_scale(cfg.layers[0]) == pytest.approx(attn.scaling, rel=1e-12)


@torch.no_grad()
def test_logits_match(pair: tuple[Any, kvlab.Model, Path]) -> None:
    hf, model, _ = pair
    ids, mask = left_padded_batch(hf.config.vocab_size, LENGTHS)
    want = hf_logits(hf, ids, mask)
    # the short row alone gives the same logits
    assert_padded_logits_match(model, ids, mask, model(ids, attention_mask=mask), want)


@torch.no_grad()
def test_greedy_generation_matches(pair: tuple[Any, kvlab.Model, Path]) -> None:
    hf, model, _ = pair
    ids, mask = left_padded_batch(hf.config.vocab_size, LENGTHS)
    assert_greedy_matches(hf, model, ids, mask, NEW)


@torch.no_grad()
def test_group_limit_changes_the_choice(pair: tuple[Any, kvlab.Model, Path]) -> None:
    """Without the group limit some tokens would pick other experts (so the parity above tests it)."""
    _, model, _ = pair
    moe = model.layers[2].mlp
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(3))
    limited = moe.route(x)[0].sort(-1).values
    moe.spec.topk_group = None
    try:
        free = moe.route(x)[0].sort(-1).values
    finally:
        moe.spec.topk_group = 2
    assert not torch.equal(limited, free)


# -- checkpoints: multi-token-prediction layers, fp8, errors ----------------------------------------------------


@torch.no_grad()
def test_mtp_layer_is_dropped_and_fp8_is_dequantised(pair: tuple[Any, kvlab.Model, Path],
                                                      tmp_path: Path) -> None:
    hf, _, path = pair
    state = load_file(str(path / "model.safetensors"))
    state["model.layers.4.eh_proj.weight"] = torch.zeros(64, 128)  # DeepSeek-V3's MTP layer after the last one
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    w = state[name]
    scale = torch.tensor([[w.abs().max().item() / 448.0]])
    state[name] = (w / scale).to(torch.float8_e4m3fn)
    state[name.replace(".weight", ".weight_scale_inv")] = scale
    save_file(state, str(tmp_path / "model.safetensors"))
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                                  "activation_scheme": "dynamic"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    q = kvlab.load(tmp_path)
    want = state[name].float() * scale
    assert torch.equal(q.layers[1].attn.kv_b_proj.weight, want)
    assert (want - w).abs().max() > 0  # really quantised
    ref = kvlab.load(path)  # the same model with the dequantised weight put in by hand
    ref.layers[1].attn.kv_b_proj.weight.copy_(want)
    ids, mask = left_padded_batch(hf.config.vocab_size, LENGTHS)
    assert torch.equal(q(ids, attention_mask=mask), ref(ids, attention_mask=mask))


def test_fp8_blocks_dequantise_per_128x128_block() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(300, 200, generator=gen).to(torch.float8_e4m3fn)
    s = torch.rand(3, 2, generator=gen) + 0.5
    out = dequantise_fp8(w, s)
    assert out.dtype == torch.float32 and out.shape == (300, 200)
    assert torch.equal(out[130:140, 150:160], w[130:140, 150:160].float() * s[1, 1])
    assert torch.equal(out[299, :128], w[299, :128].float() * s[2, 0])
    with pytest.raises(ValueError, match=r"w: fp8 block scales of shape \[2, 2\] do not fit a weight of shape "
                                         r"\[300, 200\] in 128 x 128 blocks \(expected \[3, 2\]\)"):
        dequantise_fp8(w, s[:2], "w")


def _json(**overrides: Any) -> dict[str, Any]:
    return {**BASE, "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", **overrides}


@pytest.mark.parametrize("overrides,needle", [
    ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, "quant_method='gptq' is not supported"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 64]}},
     "fp8 weight_block_size=[64, 64] is not supported"),
    ({"topk_group": 5}, "topk_group=5: must be None or an integer in [1, n_group=4]"),
    ({"n_group": 3}, "n_group=3: must divide num_experts=8"),
    ({"qk_rope_head_dim": 7}, "qk_rope_head_dim=7: must be even"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}}, "rope_type='dynamic'"),
])
def test_unsupported_config_is_a_clear_error(overrides: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError, match="DeepseekV3ForCausalLM config.json") as e:
        config_from_hf(_json(**overrides))
    assert needle in str(e.value)


def test_defaults_follow_transformers() -> None:
    """An empty config.json is transformers' DeepseekV3Config(): the published V3 shape (at 4096 positions)."""
    cfg = config_from_hf({"architectures": ["DeepseekV3ForCausalLM"]})
    hf = transformers.DeepseekV3Config()
    assert cfg.num_layers == hf.num_hidden_layers == 61 and cfg.hidden_size == 7168 and cfg.vocab_size == 129280
    assert [x.mlp for x in cfg.layers[:4]] == ["dense", "dense", "dense", "moe"]
    m = cfg.layers[0].mla
    assert (m.q_lora_rank, m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim) == (
        1536, 512, 128, 64, 128)
    assert cfg.layers[0].rope.scaling == "default"
    assert softmax_scale(cfg.layers[0]) == pytest.approx(1 / math.sqrt(192))


def test_misshaped_and_missing_tensors_are_named(pair: tuple[Any, kvlab.Model, Path], tmp_path: Path) -> None:
    _, _, path = pair
    state = load_file(str(path / "model.safetensors"))
    del state["model.layers.0.self_attn.kv_a_layernorm.weight"]
    state["model.layers.2.self_attn.kv_b_proj.weight"] = torch.zeros(4 * 28, 15)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(ValueError, match="does not match the model its config describes") as e:
        kvlab.load(tmp_path)
    msg = str(e.value)
    assert "missing layers.0.attn.kv_a_layernorm.weight (HF model.layers.0.self_attn.kv_a_layernorm.weight)" in msg
    assert ("wrong shape layers.2.attn.kv_b_proj.weight (HF model.layers.2.self_attn.kv_b_proj.weight): "
            "expected [112, 16], got [112, 15]") in msg


def test_bench_twin_has_the_description_shape(tmp_path: Path) -> None:
    """`kvlab bench <V3 shape> --vs transformers` writes a DeepseekV3 checkpoint that transformers and kvlab read as
    the same model (its head_dim / num_key_value_heads follow transformers' MLA conventions, not kvlab's)."""
    from kvlab.bench import save_random_hf
    from kvlab.config import ModelConfig
    from kvlab.families import to_hf_config

    cfg = ModelConfig.load(Path(__file__).parents[2] / "benchmarks" / "deepseek-v3-small.json")
    cfg.layers = cfg.layers[:3]
    assert to_hf_config(cfg)["architectures"] == ["DeepseekV3ForCausalLM"]
    save_random_hf(cfg, tmp_path)
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()
    model = kvlab.load(tmp_path)
    assert model.config.layers == cfg.layers
    biases = sum(b.numel() for n, b in hf.named_buffers() if n.endswith("e_score_correction_bias"))
    assert sum(p.numel() for p in hf.parameters()) + biases == model.num_parameters() == kvlab.costs(cfg, 1).params_total
    ids = torch.randint(1, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(input_ids=ids).logits, atol=1e-4, rtol=0)
