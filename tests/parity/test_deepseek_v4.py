"""DeepSeek V4 (mHC, sliding / CSA / HCA attention, hash-MoE and MoE) against transformers 5.23.

transformers' compressor does not skip left padding (it pools the pad tokens into the first blocks), so a padded
row is compared with transformers running that row alone; kvlab's padded batch equals its rows alone
(tests/test_compressed.py). Parity needs the indexer's top-k to cover every block: beyond that the reference is not
causal (shown below), and kvlab follows the causal oracle of tests/test_compressed.py instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hf_tiny import left_padded_batch, random_hf

import kvlab
from kvlab.families import deepseek_v4
from kvlab.loading import load_state

transformers = pytest.importorskip("transformers")

SIZES: dict[str, Any] = {
    "vocab_size": 96, "hidden_size": 48, "moe_intermediate_size": 24, "num_hidden_layers": 4,
    "num_attention_heads": 4, "head_dim": 16, "q_lora_rank": 12, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "sliding_window": 5, "o_groups": 2, "o_lora_rank": 8, "index_n_heads": 2, "index_head_dim": 8,
    "index_topk": 64, "hc_mult": 3, "partial_rotary_factor": 0.5,
    "layer_types": ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                    "compressed_sparse_attention"],
    "compress_rates": {"compressed_sparse_attention": 3, "heavily_compressed_attention": 4},
    "mlp_layer_types": ["hash_moe", "moe", "moe", "hash_moe"], "max_position_embeddings": 512, "swiglu_limit": 0.5,
    "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
                        "beta_slow": 1},
}


def tiny_v4(seed: int = 0, **overrides: Any) -> Any:
    """A random fp32 DeepseekV4ForCausalLM with non-trivial norms, sinks, biases and hash tables."""
    cfg = transformers.DeepseekV4Config(**{**SIZES, **overrides})

    def hash_table(name: str, b: torch.Tensor, gen: torch.Generator) -> torch.Tensor | None:
        if not name.endswith("tid2eid"):
            return None  # distinct experts per token, as a real table has
        return torch.rand(b.shape[0], cfg.n_routed_experts, generator=gen).argsort(-1)[:, :b.shape[1]]

    return random_hf(cfg, "DeepseekV4ForCausalLM", seed, rules=(hash_table,),
                     buffers=("tid2eid", "e_score_correction_bias"))


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, kvlab.Model]:
    hf = tiny_v4()
    path = tmp_path_factory.mktemp("v4")
    hf.save_pretrained(path)
    return hf, kvlab.load(path)


def test_config_follows_the_layers(pair: tuple[Any, kvlab.Model]) -> None:
    cfg = pair[1].config
    assert [x.attention for x in cfg.layers] == ["swa", "csa", "hca", "csa"]
    assert [x.compress.ratio for x in cfg.layers] == [0, 3, 4, 3]
    assert [x.moe.hash_routing for x in cfg.layers] == [True, False, False, True]
    assert cfg.mhc_streams == 3 and all(x.sinks and x.window == 5 for x in cfg.layers)
    assert cfg.layers[0].rope.scaling == "default" and cfg.layers[0].rope.theta == 10000.0  # main rope
    assert cfg.layers[1].rope.scaling == "yarn" and cfg.layers[1].rope.theta == 160000.0  # compress rope
    assert cfg.layers[1].rope.attention_factor == 1.0


def test_logits_match_on_rows_of_unequal_length(pair: tuple[Any, kvlab.Model]) -> None:
    """37 and 22 tokens: several windows (5) and compression blocks (3, 4); each row against transformers alone."""
    hf, model = pair
    ids, mask = left_padded_batch(96, (37, 22))
    got = model(ids, attention_mask=mask)
    worst = 0.0
    for r in range(ids.shape[0]):
        real = ids[r:r + 1, mask[r].bool()]
        want = hf(input_ids=real).logits
        worst = max(worst, (got[r:r + 1, -real.shape[1]:] - want).abs().max().item())
        torch.testing.assert_close(model(real), want, atol=1e-4, rtol=0)
    assert worst < 1e-4, worst


def test_greedy_generation_matches(pair: tuple[Any, kvlab.Model]) -> None:
    """32 new tokens (past 23 CSA blocks of 3), each row alone (transformers' compressor pools pad tokens)."""
    hf, model = pair
    ids, mask = left_padded_batch(96, (21, 14), seed=3)
    got = kvlab.generate(model, ids, max_new_tokens=32, temperature=0.0, attention_mask=mask)
    for r in range(ids.shape[0]):
        real = ids[r:r + 1, mask[r].bool()]
        want = hf.generate(input_ids=real, do_sample=False, max_new_tokens=32, min_new_tokens=32, eos_token_id=None,
                           pad_token_id=0)
        assert torch.equal(got[r:r + 1, -want.shape[1]:], want)


def test_cached_decode_equals_full_forward(pair: tuple[Any, kvlab.Model]) -> None:
    model = pair[1]
    ids, mask = left_padded_batch(96, (30, 19), seed=4)
    full = model(ids, attention_mask=mask)
    for chunk in (1, 4, 7):
        cache = model.new_cache(2, max_length=30)
        cache.set_padding((mask == 0).sum(-1))  # the second row's first chunks are all padding
        outs = [model(ids[:, s:s + chunk], cache=cache) for s in range(0, 20, chunk)]
        done = sum(o.shape[1] for o in outs)
        outs += [model(ids[:, s:s + 1], cache=cache) for s in range(done, 30)]
        got = torch.cat(outs, 1)
        real = mask.bool()
        assert (got[real] - full[real]).abs().max().item() < 1e-4
        c = kvlab.costs(model.config, context=30, dtype=torch.float32, batch=2)
        assert cache.per_layer_nbytes() == [x.kv_bytes for x in c.per_layer]
        for store, lc in zip(cache.layers, c.per_layer):
            assert store.components() == lc.kv_components


def test_reference_is_not_causal_beyond_top_k(tmp_path: Path) -> None:
    """top-k 2 with 13 complete blocks: transformers' logits of a prefix change when tokens are appended (its
    indexer ranks blocks that lie in the future); kvlab's do not, and both agree while top-k covers the blocks."""
    hf = tiny_v4(index_topk=2)
    hf.save_pretrained(tmp_path)
    model = kvlab.load(tmp_path)
    ids = torch.randint(1, 96, (1, 40), generator=torch.Generator().manual_seed(0))
    hf_full, kv_full = hf(input_ids=ids).logits, model(ids)
    hf_prefix, kv_prefix = hf(input_ids=ids[:, :30]).logits, model(ids[:, :30])
    assert (hf_prefix - hf_full[:, :30]).abs().max().item() > 1e-2  # the reference's defect
    torch.testing.assert_close(kv_prefix, kv_full[:, :30], atol=1e-5, rtol=0)
    short = ids[:, :6]  # two CSA blocks of 3: top-2 covers them
    torch.testing.assert_close(model(short), hf(input_ids=short).logits, atol=1e-4, rtol=0)


def _save_native(hf: Any, path: Path, **extra: torch.Tensor) -> None:
    """The checkpoint under DeepSeek's own names (no ``model.`` prefix), as the released repositories hold it."""
    from safetensors.torch import load_file, save_file

    hf.save_pretrained(path)
    f = next(path.glob("*.safetensors"))
    state = load_file(f)
    state = {k.removeprefix("model."): v for k, v in state.items()}
    state.update(extra)
    f.unlink()
    for idx in path.glob("*.index.json"):
        idx.unlink()
    save_file(state, path / "model.safetensors")


def test_native_names_and_mtp_head_load(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hf = tiny_v4(seed=1)
    _save_native(hf, tmp_path, **{"mtp.0.emb.weight": torch.zeros(96, 48)})
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", "pt") as fh:
        names = set(fh.keys())
    assert "layers.1.attn.wq_a.weight" in names and not any(k.startswith("model.") for k in names)
    model = kvlab.load(tmp_path)
    assert "multi-token-prediction" in capsys.readouterr().err
    ids = torch.randint(1, 96, (1, 17), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(model(ids), hf(input_ids=ids).logits, atol=1e-4, rtol=0)


def test_fp8_block_scaled_weights_are_dequantised(tmp_path: Path) -> None:
    """A weight stored as float8 with a per-128x128-block ``weight_scale_inv`` loads as ``W * scale``."""
    hf = tiny_v4(seed=2)
    hf.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    f = next(tmp_path.glob("*.safetensors"))
    state = load_file(f)
    name = "model.layers.1.attn.wq_b.weight"  # [64, 12]: one block
    w8 = (state[name] * 4).to(torch.float8_e4m3fn)
    state[name] = w8
    state[name + "_scale_inv"] = torch.full((1, 1), 0.25)
    save_file(state, f)
    got = load_state(tmp_path)["layers.1.attn.q_b_proj.weight"]
    torch.testing.assert_close(got, w8.float() * 0.25)


def test_fp4_packed_experts_are_refused_by_name(tmp_path: Path) -> None:
    hf = tiny_v4(seed=3)
    hf.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    f = next(tmp_path.glob("*.safetensors"))
    state = load_file(f)
    name = "model.layers.1.ffn.experts.0.w1.weight"
    state[name] = torch.zeros(24, 24, dtype=torch.int8)  # two e2m1 values per byte
    state["model.layers.1.ffn.experts.0.w1.scale"] = torch.ones(24, 1)
    save_file(state, f)
    with pytest.raises(ValueError, match=r"FP4.*experts\.0\.gate_proj|experts\.0\.gate_proj.*FP4"):
        kvlab.load(tmp_path)


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    hf = tiny_v4(seed=4)
    hf.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    f = next(tmp_path.glob("*.safetensors"))
    state = load_file(f)
    del state["model.layers.2.attn.compressor.ape"]
    save_file(state, f)
    with pytest.raises(ValueError, match=r"missing layers\.2\.attn\.compressor\.position_bias"):
        kvlab.load(tmp_path)


@pytest.mark.parametrize("key,value,needle", [
    ("num_key_value_heads", 2, "one shared K/V head"),
    ("scoring_func", "relu", "scoring_func"),
    ("layer_types", ["sliding_attention", "full_attention"], "layer_types"),
    ("mlp_layer_types", ["dense"] * 4, "mlp_layer_types"),
])
def test_unsupported_config_is_a_clear_error(key: str, value: Any, needle: str) -> None:
    cfg = {**transformers.DeepseekV4Config(**SIZES).to_dict(), "architectures": [deepseek_v4.ARCH], key: value}
    with pytest.raises(ValueError, match=needle):
        deepseek_v4.config_from_hf(cfg)


def test_defaults_follow_transformers() -> None:
    """kvlab's defaults for absent keys are DeepseekV4Config's, and its default schedules too."""
    ref = transformers.DeepseekV4Config()
    for k, v in deepseek_v4.DEFAULTS.items():
        assert getattr(ref, k) == v, k
    cfg = deepseek_v4.config_from_hf({"architectures": [deepseek_v4.ARCH]})
    kinds = {"swa": "sliding_attention", "csa": "compressed_sparse_attention", "hca": "heavily_compressed_attention"}
    assert [kinds[x.attention] for x in cfg.layers] == ref.layer_types
    assert [("hash_moe" if x.moe.hash_routing else "moe") for x in cfg.layers] == ref.mlp_layer_types


def test_bench_twin_has_the_description_shape(tmp_path: Path) -> None:
    """`kvlab bench <V4 shape> --vs transformers` writes a DeepseekV4 checkpoint that transformers and kvlab both
    read as the same model (DeepseekV4Config maps ``intermediate_size`` onto the expert width: it must agree)."""
    from kvlab.bench import save_random_hf
    from kvlab.config import ModelConfig
    from kvlab.families import to_hf_config

    cfg = ModelConfig.load(Path(__file__).parents[2] / "benchmarks" / "deepseek-v4-small.json")
    cfg = cfg.replace_layers(lambda _i, x: x)
    cfg.layers = cfg.layers[:4]
    d = to_hf_config(cfg)
    assert d["architectures"] == [deepseek_v4.ARCH]
    save_random_hf(cfg, tmp_path)
    hf = transformers.DeepseekV4ForCausalLM.from_pretrained(tmp_path)
    model = kvlab.load(tmp_path)
    assert model.config.layers == cfg.layers
    # transformers keeps the routers' correction biases as buffers; kvlab as parameters
    biases = sum(b.numel() for n, b in hf.named_buffers() if n.endswith("e_score_correction_bias"))
    assert biases and sum(p.numel() for p in hf.parameters()) + biases == model.num_parameters()
    assert model.num_parameters() == kvlab.costs(cfg, 1).params_total


def test_bf16_load_keeps_what_transformers_keeps_in_fp32(pair: tuple[Any, kvlab.Model], tmp_path: Path) -> None:
    """kvlab.load(dtype=bf16) keeps the mHC maps, norms, sinks, compressor position biases and router correction
    biases in fp32 (exactly their checkpoint values), as transformers' V4 does; logits stay within bf16 noise of
    transformers' own bf16 model."""
    hf, ref = pair
    hf.save_pretrained(tmp_path)
    model = kvlab.load(tmp_path, dtype=torch.bfloat16)
    kept = {n for n, p in model.named_parameters() if p.dtype == torch.float32}
    assert kept and all(n.endswith(("norm.weight", "sinks", "position_bias", "router_bias", ".hc_fn", ".hc_bias",
                                    ".hc_scale")) for n in kept), kept
    assert {"layers.1.mlp.router_bias", "layers.1.attn.compressor.position_bias", "layers.0.attn.sinks",
            "layers.0.attn_norm.weight", "norm.weight"} <= kept
    exact = dict(ref.named_parameters())
    for n in kept:
        assert torch.equal(dict(model.named_parameters())[n], exact[n]), n
    assert model.layers[0].attn.q_b_proj.weight.dtype == torch.bfloat16
    hf16 = transformers.DeepseekV4ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ids = torch.randint(1, 96, (1, 30), generator=torch.Generator().manual_seed(0))
    want = hf(input_ids=ids).logits
    got, theirs = model(ids).float(), hf16(input_ids=ids).logits.float()
    assert got.dtype == torch.float32 and model(ids).dtype == torch.bfloat16
    assert (got - theirs).abs().max() < 0.1 and (got - want).abs().max() < 0.1


def test_transformers_engine_rule_matches_a_real_v4_cache(pair: tuple[Any, kvlab.Model]) -> None:
    """kvlab.engines.Transformers prices what transformers' DynamicCache holds for V4 (window rows, compressed
    entries, indexer keys, compressor buffers and overlap rows), counted tensor by tensor after prefills that end
    before, inside and after whole compression windows."""
    from kvlab.costs import costs
    from kvlab.engines import Transformers

    hf, model = pair

    def held(cache: Any) -> int:
        total = 0
        for layer in cache.layers:
            tensors = [layer.keys] + ([] if layer.values is layer.keys else [layer.values])
            for name in ("compressed_kv", "buffer_kv", "buffer_gate", "overlap_kv", "overlap_gate"):
                tensors += [t for t in getattr(layer, name, {}).values() if t is not None]
            total += sum(t.numel() * t.element_size() for t in tensors)
        return total

    for n in (1, 2, 7, 12, 13, 24):
        cache = transformers.DynamicCache(config=hf.config)
        hf(input_ids=torch.randint(0, 96, (2, n)), past_key_values=cache, use_cache=True)
        c = costs(model.config, context=n, batch=2, dtype="float32")
        assert Transformers().reserve(model.config, c, n, 2).kv_bytes == held(cache), n
