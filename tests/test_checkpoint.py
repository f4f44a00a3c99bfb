"""Checkpoint reading, config.json translation and the loader's error cases (offline, tiny models)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from parity.hf_tiny import hf_json, save, tiny_hf
from safetensors.torch import load_file, save_file

import kvlab
from kvlab.checkpoint import load_tokenizer, read_config, read_tensors, tensor_shapes, weight_files
from kvlab.families import FAMILIES, config_from_dir, config_from_hf
from kvlab.loading import load_state


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread avoids oversubscription
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save(tiny_hf("LlamaForCausalLM"), tmp_path_factory.mktemp("llama"))


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit(d: Path, fn) -> None:
    """Rewrite model.safetensors as ``fn(state)``."""
    state = load_file(d / "model.safetensors")
    save_file(fn(state), d / "model.safetensors", metadata={"format": "pt"})


# -- reading the directory ----------------------------------------------------------------------


def test_read_config_tensors_and_shapes(llama_dir: Path) -> None:
    cfg = read_config(llama_dir)
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert weight_files(llama_dir) == [llama_dir / "model.safetensors"]
    lazy = read_tensors(llama_dir, dtype=torch.bfloat16)
    assert "model.embed_tokens.weight" in lazy and len(lazy) == len(tensor_shapes(llama_dir))
    assert lazy["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert lazy.shape("model.embed_tokens.weight") == (128, 64)


def test_tokenizer(tmp_path: Path, llama_dir: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    assert load_tokenizer(llama_dir) is None
    tok = Tokenizer(models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    assert load_tokenizer(tmp_path).encode("hello world").ids == [0, 1]


def test_sharded_checkpoint_loads(tmp_path: Path, llama_dir: Path) -> None:
    hf = tiny_hf("LlamaForCausalLM")
    d = save(hf, tmp_path / "sharded", max_shard_size="50KB")
    assert (d / "model.safetensors.index.json").is_file() and len(weight_files(d)) > 1
    a, b = kvlab.load(d), kvlab.load(llama_dir)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert na == nb and torch.equal(pa, pb)
    shard = weight_files(d)[-1]
    shard.unlink()
    with pytest.raises(ValueError, match=shard.name):
        kvlab.load(d)


def test_index_names_tensor_missing_from_shard(tmp_path: Path) -> None:
    d = save(tiny_hf("LlamaForCausalLM"), tmp_path / "sharded", max_shard_size="50KB")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.ghost.weight"] = weight_files(d)[0].name
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="model.layers.0.ghost.weight"):
        read_tensors(d)


# -- config.json -> ModelConfig -----------------------------------------------------------------


def test_llama_config_biases_head_dim_and_rope() -> None:
    hf = tiny_hf("LlamaForCausalLM", attention_bias=True, mlp_bias=True, head_dim=8,
                 rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 64})
    c = config_from_hf(hf_json(hf))
    spec = c.layers[0]
    assert (spec.qkv_bias, spec.o_bias, spec.mlp_bias, spec.head_dim, spec.num_kv_heads) == (True, True, True, 8, 2)
    assert spec.window is None and not spec.gqa.qk_norm
    r = spec.rope
    assert (r.scaling, r.theta, r.factor, r.original_max_positions, r.high_freq_factor) == ("llama3", 5e5, 8.0, 64, 4.0)
    assert (c.vocab_size, c.hidden_size, c.num_layers, c.max_positions) == (128, 64, 3, 256)


def test_old_style_rope_keys() -> None:
    cfg = {"architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 1, "num_attention_heads": 4, "max_position_embeddings": 4096, "rope_theta": 1e6,
           "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024},
           "rms_norm_eps": 1e-5}
    c = config_from_hf(cfg)
    r = c.layers[0].rope
    assert (r.scaling, r.theta, r.factor, r.original_max_positions, r.beta_fast, r.truncate) == \
        ("yarn", 1e6, 4.0, 1024, 32.0, True)
    assert c.norm_eps == 1e-5 and c.layers[0].num_kv_heads == 4 and c.layers[0].head_dim == 8
    assert config_from_hf({**cfg, "partial_rotary_factor": 0.5}).layers[0].rope.partial == 1.0  # as transformers
    cfg["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}
    assert config_from_hf(cfg).layers[0].rope.factor == 2.0
    cfg["rope_scaling"] = {"rope_type": "dynamic", "factor": 2.0}
    with pytest.raises(ValueError, match="dynamic.*allowed: default, linear, llama3, yarn"):
        config_from_hf(cfg)


def test_qwen3_windows_follow_layer_types() -> None:
    hf = tiny_hf("Qwen3ForCausalLM", use_sliding_window=True, sliding_window=4,
                 layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    c = config_from_hf(hf_json(hf))
    assert [x.window for x in c.layers] == [4, None, 4]
    assert all(x.gqa.qk_norm and not x.qkv_bias and not x.o_bias for x in c.layers)
    # sliding_window is ignored unless use_sliding_window (Qwen3Config sets it to None)
    off = config_from_hf({**hf_json(hf), "use_sliding_window": False, "sliding_window": 4,
                          "layer_types": None, "max_window_layers": 1})
    assert [x.window for x in off.layers] == [None] * 3
    on = config_from_hf({**hf_json(hf), "layer_types": None, "max_window_layers": 1})
    assert [x.window for x in on.layers] == [None, 4, 4]


def test_mistral_and_qwen2_config() -> None:
    m = config_from_hf(hf_json(tiny_hf("MistralForCausalLM", sliding_window=4)))
    assert [x.window for x in m.layers] == [4, 4, 4]
    assert config_from_hf(hf_json(tiny_hf("MistralForCausalLM"))).layers[0].window is None
    q2 = config_from_hf(hf_json(tiny_hf("Qwen2ForCausalLM"))).layers[0]
    assert (q2.qkv_bias, q2.o_bias, q2.gqa.qk_norm) == (True, False, False)


def test_qwen3_moe_config() -> None:
    hf = tiny_hf("Qwen3MoeForCausalLM", mlp_only_layers=[1], norm_topk_prob=True)
    c = config_from_hf(hf_json(hf))
    assert [x.mlp for x in c.layers] == ["moe", "dense", "moe"]
    moe = c.layers[0].moe
    assert (moe.num_experts, moe.top_k, moe.expert_size, moe.norm_topk, moe.scoring) == (4, 2, 32, True, "softmax")


# -- the loader's error cases -------------------------------------------------------------------


def test_unknown_architecture(tmp_path: Path, llama_dir: Path) -> None:
    d = _copy(llama_dir, tmp_path / "x")
    cfg = read_config(d)
    cfg["architectures"] = ["FancyNewForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="FancyNewForCausalLM") as e:
        config_from_dir(d)
    for arch in FAMILIES:
        assert arch in str(e.value)


def test_missing_tensor(tmp_path: Path, llama_dir: Path) -> None:
    d = _copy(llama_dir, tmp_path / "x")
    _edit(d, lambda s: {k: v for k, v in s.items() if k != "model.layers.1.self_attn.k_proj.weight"})
    with pytest.raises(ValueError, match=r"missing layers\.1\.attn\.k_proj\.weight \(HF model\.layers\.1\."
                                         r"self_attn\.k_proj\.weight\): expected shape \[32, 64\]"):
        kvlab.load(d)


def test_extra_tensor(tmp_path: Path, llama_dir: Path) -> None:
    d = _copy(llama_dir, tmp_path / "x")
    _edit(d, lambda s: {**s, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64),
                        "model.layers.0.mystery.weight": torch.zeros(3)})
    with pytest.raises(ValueError) as e:
        kvlab.load(d)
    msg = str(e.value)
    assert "unexpected layers.0.attn.q_proj.bias (HF model.layers.0.self_attn.q_proj.bias): shape [64]" in msg
    assert "unexpected model.layers.0.mystery.weight: shape [3]" in msg


def test_misshaped_tensor(tmp_path: Path, llama_dir: Path) -> None:
    d = _copy(llama_dir, tmp_path / "x")
    _edit(d, lambda s: {**s, "model.layers.2.mlp.up_proj.weight": torch.zeros(95, 64)})
    with pytest.raises(ValueError, match=r"wrong shape layers\.2\.mlp\.up_proj\.weight .*expected \[96, 64\], "
                                         r"got \[95, 64\]"):
        kvlab.load(d)


def test_truncated_safetensors(tmp_path: Path, llama_dir: Path) -> None:
    d = _copy(llama_dir, tmp_path / "x")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(ValueError, match="model.safetensors.*truncated or corrupt"):
        kvlab.load(d)


def test_pickle_only_dir_is_refused(tmp_path: Path, llama_dir: Path) -> None:
    d = _copy(llama_dir, tmp_path / "x")
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ValueError, match="pytorch_model.bin.*safetensors only"):
        kvlab.load(d)
    (d / "pytorch_model.bin").unlink()
    with pytest.raises(ValueError, match="no weights"):
        kvlab.load(d)
    with pytest.raises(ValueError, match="config.json"):
        read_config(tmp_path)


def test_tied_embeddings(tmp_path: Path) -> None:
    hf = tiny_hf("Qwen3ForCausalLM", tie_word_embeddings=True)
    d = save(hf, tmp_path / "tied")
    model = kvlab.load(d)
    assert model.config.tie_embeddings and "lm_head.weight" not in model.state_dict()
    # a stored copy of the embedding is dropped; a different head contradicts the config
    _edit(d, lambda s: {**s, "lm_head.weight": s["model.embed_tokens.weight"].clone()})
    assert "lm_head.weight" not in load_state(d)
    _edit(d, lambda s: {**s, "lm_head.weight": s["model.embed_tokens.weight"] + 1})
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        load_state(d)


def test_load_dtype_and_values(llama_dir: Path) -> None:
    hf = load_file(llama_dir / "model.safetensors")
    model = kvlab.load(llama_dir, dtype=torch.bfloat16)
    sd = model.state_dict()
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    assert torch.equal(sd["layers.1.attn.o_proj.weight"], hf["model.layers.1.self_attn.o_proj.weight"].bfloat16())
    assert torch.equal(sd["layers.2.mlp_norm.weight"], hf["model.layers.2.post_attention_layernorm.weight"].bfloat16())


def test_qwen3_moe_fused_expert_layout(tmp_path: Path) -> None:
    """transformers keeps experts fused in memory (gate_up_proj [E, 2I, H]); such a file reads the same."""
    hf = tiny_hf("Qwen3MoeForCausalLM", mlp_only_layers=[1])
    per_expert = kvlab.load(save(hf, tmp_path / "per_expert")).state_dict()
    fused = _copy(tmp_path / "per_expert", tmp_path / "fused")
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, fused / "model.safetensors", metadata={"format": "pt"})
    got = kvlab.load(fused).state_dict()
    assert got.keys() == per_expert.keys()
    assert all(torch.equal(got[k], per_expert[k]) for k in got)
