"""The calculator against published figures, hand formulas, brute force and transformers' module sizes."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvlab.config import LayerSpec, ModelConfig, MoESpec, uniform_layers
from kvlab.costs import Costs, causal_positions, costs, dtype_bytes

GiB = 2**30


def dense(n: int = 32, kv: int = 8, hd: int = 128, heads: int = 32, hidden: int = 4096, **kw) -> ModelConfig:
    return ModelConfig(vocab_size=kw.pop("vocab", 32000), hidden_size=hidden, max_positions=131072,
                       layers=uniform_layers(n, num_heads=heads, num_kv_heads=kv, head_dim=hd,
                                             intermediate_size=kw.pop("inter", 11008), **kw))


# -- published KV figures --------------------------------------------------------------------------------------------

def test_gqa_32_layers_8_kv_heads_at_32k_bf16_stores_4_294_967_296_bytes() -> None:
    # 2 (K and V) x 32 layers x 8 heads x 128 dims x 32768 tokens x 2 bytes
    assert 2 * 32 * 8 * 128 * 32768 * 2 == 4_294_967_296
    c = costs(dense(), context=32768, dtype="bfloat16")
    assert c.kv_cache_bytes == 4_294_967_296
    assert c.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2 == 131072
    assert [x.kv_bytes for x in c.per_layer] == [4_294_967_296 // 32] * 32


def test_llama_3_1_8b_at_128k_is_16_gib() -> None:
    c = costs("llama-3.1-8b", context=131072, dtype="bf16")
    assert c.kv_cache_bytes == 16 * GiB
    assert costs("llama-3.1-8b", context=32768).kv_cache_bytes == 4_294_967_296


def test_rasbt_mha_and_gqa_figures_at_32k() -> None:
    # rasbt LLMs-from-scratch ch04/04_gqa: MHA 17.18 GB, GQA (8 KV heads) 4.29 GB, bf16, 32 layers, 32K tokens.
    mha = costs("mha-32l-4096", context=32768).kv_cache_bytes
    gqa = costs("gqa-32l-4096", context=32768).kv_cache_bytes
    assert round(mha / 1e9, 2) == 17.18 and round(gqa / 1e9, 2) == 4.29
    assert mha == 4 * gqa


def test_window_layers_cap_at_the_window() -> None:
    window_bytes = 32 * 2 * 8 * 128 * 4096 * 2  # every layer holds exactly 4096 positions
    c8k = costs("mistral-7b", context=8192)
    assert c8k.kv_cache_bytes == window_bytes == 536_870_912
    assert costs("mistral-7b", context=4096).kv_cache_bytes == window_bytes
    assert costs("mistral-7b", context=2048).kv_cache_bytes == window_bytes // 2  # below the window: context
    assert costs(dense(inter=14336), context=8192).kv_cache_bytes == 2 * window_bytes  # no window: all 8192
    assert {x.kind for x in c8k.per_layer} == {"window 4096"}
    assert c8k.kv_bytes_per_token == 0 and c8k.kv_bytes_per_token_window == 131072
    assert c8k.kv_read_bytes_per_step == window_bytes
    # decode attention also sees only the window
    assert c8k.attn_flops_per_token == 32 * 2 * 32 * 256 * 4096


def test_window_cap_uses_min_of_window_and_context_per_layer() -> None:
    layers = [LayerSpec(4, 2, 16, intermediate_size=64, window=w) for w in (None, 8, 100)]
    cfg = ModelConfig(vocab_size=50, hidden_size=64, layers=layers)
    per_pos = 2 * 2 * 16 * 4  # K+V, 2 kv heads, 16 dims, fp32
    c = costs(cfg, context=50, dtype="fp32")
    assert [x.kv_bytes for x in c.per_layer] == [50 * per_pos, 8 * per_pos, 50 * per_pos]
    assert [x.kind for x in c.per_layer] == ["full", "window 8", "window 100"]


# -- shared K/V -----------------------------------------------------------------------------------------------------

def _shared_cfg() -> ModelConfig:
    layers = uniform_layers(4, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=64)
    layers[1].window = layers[3].window = 8
    layers[2].kv_source, layers[3].kv_source = 0, 1
    return ModelConfig(vocab_size=50, hidden_size=64, layers=layers)


def test_shared_layers_store_nothing_but_their_reads_count() -> None:
    c = costs(_shared_cfg(), context=32, dtype="fp32")
    full, win = 2 * 2 * 16 * 32 * 4, 2 * 2 * 16 * 8 * 4
    assert [x.kv_bytes for x in c.per_layer] == [full, win, 0, 0]
    assert [x.kv_read_bytes for x in c.per_layer] == [full, win, full, win]
    assert c.kv_cache_bytes == full + win and c.kv_read_bytes_per_step == 2 * (full + win)
    assert [x.kind for x in c.per_layer] == ["full", "window 8", "shared<-0", "shared<-1"]
    assert [x.kv_source for x in c.per_layer] == [None, None, 0, 1]
    # shared layers still do the attention
    assert c.per_layer[2].attn_flops_per_token == c.per_layer[0].attn_flops_per_token == 2 * 4 * 32 * 32


def test_shared_layer_has_no_k_v_projections() -> None:
    c = costs(_shared_cfg(), context=8)
    q_o, k_v = 2 * 4 * 16 * 64, 2 * 2 * 16 * 64
    assert c.per_layer[0].params - c.per_layer[2].params == k_v
    assert c.per_layer[2].params == q_o + 3 * 64 * 64 + 2 * 64


def test_attention_extras_params_by_hand() -> None:
    h = 64
    extras = {"gqa": {"qk_norm": True}, "sinks": True, "output_gate": "sigmoid", "v_head_dim": 32}
    layers = [LayerSpec(4, 2, 16, intermediate_size=8, gate_per_head=False, **extras),
              LayerSpec(4, 2, 16, intermediate_size=8, gate_per_head=True, kv_source=0, **extras)]
    c = costs(ModelConfig(vocab_size=5, hidden_size=h, layers=layers), context=3)
    q, k, v, o, mlp, norms = 4 * 16 * h, 2 * 16 * h, 2 * 32 * h, h * 4 * 32, 3 * 8 * h, 2 * h
    assert c.per_layer[0].params == q + k + v + o + 4 * 32 * h + 2 * 16 + 4 + mlp + norms  # per-channel gate
    assert c.per_layer[1].params == q + o + 4 * h + 16 + 4 + mlp + norms  # per-head gate, q_norm only
    assert c.per_layer[0].kv_bytes == 2 * 3 * 2 * (16 + 32)  # K and V of different widths
    assert c.per_layer[0].attn_flops_per_token == 2 * 4 * (16 + 32) * 3


def test_gemma4_e2b_sharing_figures_from_reference() -> None:
    """REFERENCE.md: real head dims, windows of 512: 1.89 GB -> 0.81 GB at 128K, 57.1% saved."""

    def e2b(share: bool) -> ModelConfig:
        layers = []
        for i in range(35):
            full = i % 5 == 4
            src = (14 if full else 13) if share and i >= 15 else None
            layers.append(LayerSpec(num_heads=8, num_kv_heads=1, head_dim=512 if full else 256,
                                    window=None if full else 512, intermediate_size=6144, kv_source=src))
        return ModelConfig(vocab_size=262144, hidden_size=1536, max_positions=131072, layers=layers)

    plain, shared = (costs(e2b(s), context=131072).kv_cache_bytes for s in (False, True))
    assert round(plain / 1e9, 2) == 1.89 and round(shared / 1e9, 2) == 0.81
    assert round(1 - shared / plain, 3) == 0.571
    assert costs(e2b(True), context=131072).kv_read_bytes_per_step == plain  # reads are not saved


# -- a MoE with windows: Laguna XS.2 figures from REFERENCE.md -----------------------------------------------------

def _laguna(all_global: bool = False) -> ModelConfig:
    moe = MoESpec(num_experts=256, top_k=8, expert_size=512, scoring="sigmoid", bias_correction=True,
                  routed_scaling=2.5, shared_experts=1)
    layers = []
    for i in range(40):
        full = i % 4 == 0
        layers.append(LayerSpec(num_heads=48 if full else 64, num_kv_heads=8, head_dim=128,
                                window=None if full or all_global else 512, output_gate="softplus",
                                gate_per_head=True, mlp="dense" if i == 0 else "moe",
                                intermediate_size=8192 if i == 0 else 0, moe=None if i == 0 else moe))
    return ModelConfig(vocab_size=100352, hidden_size=2048, max_positions=131072, layers=layers)


def test_laguna_kv_and_decode_attention_flops() -> None:
    xs2, glob = costs(_laguna(), context=131072), costs(_laguna(all_global=True), context=131072)
    assert glob.kv_cache_bytes == 20 * GiB
    assert round(xs2.kv_cache_bytes / GiB, 2) == 5.06
    assert round(xs2.attn_flops_per_token / 1e9, 1) == 32.7 and round(glob.attn_flops_per_token / 1e9) == 161


def test_laguna_total_and_active_params() -> None:
    # published: 33.4B total / 3.0B active (untied head assumed)
    c = costs(_laguna(), context=1)
    assert round(c.params_total / 1e9, 1) == 33.4 and round(c.params_active / 1e9, 1) == 3.0


def test_moe_params_by_hand() -> None:
    h, e, k, w = 16, 6, 2, 8
    moe = MoESpec(num_experts=e, top_k=k, expert_size=w, shared_experts=2, shared_size=4, bias_correction=True)
    cfg = ModelConfig(vocab_size=10, hidden_size=h, layers=[LayerSpec(2, 1, 8, mlp="moe", moe=moe)])
    attn = 2 * 8 * h + 2 * 8 * h + 2 * 8 * h  # q, k+v, o
    router, bias, experts, shared = e * h, e, e * 3 * w * h, 3 * 8 * h
    c = costs(cfg, context=4)
    assert c.per_layer[0].params == attn + 2 * h + router + bias + experts + shared
    assert c.per_layer[0].params_active == attn + 2 * h + router + bias + k * 3 * w * h + shared
    assert c.params_active < c.params_total
    assert c.params_total - c.params_active == (e - k) * 3 * w * h
    # a decode step of a batch touches up to min(E, batch * top_k) distinct experts
    w1 = costs(cfg, context=4, batch=1).weight_read_bytes_per_step
    w3 = costs(cfg, context=4, batch=3).weight_read_bytes_per_step
    w9 = costs(cfg, context=4, batch=9).weight_read_bytes_per_step
    assert w3 - w1 == 2 * (4 * 3 * w * h + 2 * h)  # 4 more experts, 2 more embedding rows, bf16
    assert w9 - w3 == 2 * 6 * h  # experts saturate at E; only embedding rows grow


# -- FLOPs ------------------------------------------------------------------------------------------------------------

def _attn_brute(cfg: ModelConfig, n: int) -> int:
    total = 0
    for layer in cfg.layers:
        for i in range(1, n + 1):
            seen = i if layer.window is None else min(i, layer.window)
            total += 2 * layer.num_heads * (layer.head_dim + layer.value_dim) * seen
    return total


@pytest.mark.parametrize("n", [1, 5, 8, 9, 23])
def test_prefill_closed_form_equals_per_position_sum(n: int) -> None:
    cfg = _shared_cfg()
    c = costs(cfg, context=n)
    assert c.prefill_attn_flops == _attn_brute(cfg, n)
    decode_sum = sum(costs(cfg, context=i).flops_per_token for i in range(1, n + 1))
    assert c.prefill_flops == decode_sum
    assert c.prefill_flops == c.other_flops_per_token * n + _attn_brute(cfg, n)
    assert sum(x.prefill_attn_flops for x in c.per_layer) == c.prefill_attn_flops
    assert costs(cfg, context=n, batch=3).prefill_flops == 3 * c.prefill_flops


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 400), w=st.one_of(st.none(), st.integers(1, 300)))
def test_causal_positions_closed_form(n: int, w: int | None) -> None:
    assert causal_positions(n, w) == sum(i if w is None else min(i, w) for i in range(1, n + 1))


def test_llama_decode_flops_by_hand() -> None:
    per_layer_mats = 4096 * (4096 + 1024 + 1024 + 4096) + 3 * 14336 * 4096
    c = costs("llama-3.1-8b", context=131072)
    assert c.other_flops_per_token == 2 * (32 * per_layer_mats + 128256 * 4096)
    assert c.attn_flops_per_token == 32 * 2 * 32 * 256 * 131072
    assert c.flops_per_token == c.other_flops_per_token + c.attn_flops_per_token
    # weights: every parameter once, but only one row of the embedding table
    assert c.weight_read_bytes_per_step == 2 * (c.params_total - 128256 * 4096 + 4096)


def test_tied_head_reads_the_table_once_and_has_no_lm_head_params() -> None:
    tied = dense(n=2, hidden=64, heads=4, kv=2, hd=16, inter=128, vocab=1000)
    tied.tie_embeddings = True
    untied = dense(n=2, hidden=64, heads=4, kv=2, hd=16, inter=128, vocab=1000)
    t, u = costs(tied, context=16), costs(untied, context=16)
    assert t.params_lm_head == 0 and u.params_lm_head == 1000 * 64
    assert u.params_total - t.params_total == 1000 * 64
    assert t.weight_read_bytes_per_step == u.weight_read_bytes_per_step  # the head is read either way
    assert t.other_flops_per_token == u.other_flops_per_token


# -- batch, dtypes, inputs -----------------------------------------------------------------------------------------

def test_batch_scales_cache_and_reads_but_not_weights() -> None:
    c1, c4 = costs("qwen3-8b", context=1000), costs("qwen3-8b", context=1000, batch=4)
    assert c4.kv_cache_bytes == 4 * c1.kv_cache_bytes and c4.kv_read_bytes_per_step == 4 * c1.kv_read_bytes_per_step
    assert c4.weight_read_bytes_per_step - c1.weight_read_bytes_per_step == 3 * 4096 * 2  # 3 more embedding rows
    assert c4.flops_per_token == c1.flops_per_token and c4.kv_bytes_per_token == c1.kv_bytes_per_token


def test_kv_dtype_prices_the_cache_only() -> None:
    bf, f8 = costs("llama-3.1-8b", context=4096), costs("llama-3.1-8b", context=4096, kv_dtype="fp8")
    assert f8.kv_cache_bytes * 2 == bf.kv_cache_bytes and f8.kv_dtype == "float8" and f8.dtype == "bfloat16"
    assert f8.weight_read_bytes_per_step == bf.weight_read_bytes_per_step
    assert costs("llama-3.1-8b", context=4096, dtype="fp32").kv_cache_bytes == 2 * bf.kv_cache_bytes


def test_dtype_names_and_torch_dtypes() -> None:
    torch = pytest.importorskip("torch")
    for d, expect in [("bfloat16", 2), ("bf16", 2), ("float16", 2), ("fp16", 2), ("float32", 4), ("fp32", 4),
                      ("float8", 1), ("fp8", 1), ("int8", 1), (torch.bfloat16, 2), (torch.float32, 4),
                      (torch.float16, 2), (torch.int8, 1), (torch.float8_e4m3fn, 1)]:
        assert dtype_bytes(d)[1] == expect, d
    assert dtype_bytes(torch.bfloat16)[0] == dtype_bytes("BF16")[0] == "bfloat16"


@pytest.mark.parametrize("bad", ["bfloat17", "int4", 2, ""])  # None: the default (a Model's own, else bf16)
def test_bad_dtype_lists_the_allowed_values(bad: object) -> None:
    with pytest.raises(ValueError, match="allowed: .*bfloat16.*fp8") as e:
        costs("llama-3.1-8b", context=16, dtype=bad)
    assert repr(bad) in str(e.value)
    with pytest.raises(ValueError, match="allowed"):
        costs("llama-3.1-8b", context=16, kv_dtype="bfloat17")


def test_bad_model_and_context_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="neither a preset, a named model, a .gguf file nor a directory") as e:
        costs("llama-9", context=16)
    assert "llama-3.1-8b" in str(e.value) and "smollm2-135m" in str(e.value)
    with pytest.raises(ValueError, match="neither a preset"):
        costs(tmp_path, context=16)  # a directory without config.json
    with pytest.raises(ValueError, match="must be a ModelConfig"):
        costs(42, context=16)
    for ctx in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="context"):
            costs("llama-3.1-8b", context=ctx)
    with pytest.raises(ValueError, match="batch"):
        costs("llama-3.1-8b", context=16, batch=0)


def test_accepts_a_model_object_and_a_checkpoint_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = dense(n=2, hidden=64, heads=4, kv=2, hd=16, inter=128, vocab=1000)
    expect = costs(cfg, context=64).to_dict()
    assert costs(types.SimpleNamespace(config=cfg), context=64).to_dict() == expect
    (tmp_path / "config.json").write_text("{}")
    seen: list[Path] = []
    import kvlab.resolve

    monkeypatch.setattr(kvlab.resolve, "config_from_dir", lambda p: seen.append(Path(p)) or cfg)
    assert costs(str(tmp_path), context=64).to_dict() == expect
    assert seen == [tmp_path]


def test_to_dict_is_json_and_names_every_field() -> None:
    c = costs("mistral-7b", context=65536)
    d = json.loads(json.dumps(c.to_dict()))
    assert d["kv_cache_bytes"] == c.kv_cache_bytes and d["name"] == "mistral-7b" and d["dtype"] == "bfloat16"
    assert len(d["per_layer"]) == 32 and d["per_layer"][5]["window"] == 4096
    assert set(d) == {f for f in Costs.__dataclass_fields__}
    assert any("exceeds the model's max_positions 32768" in a for a in c.assumptions)
    assert not any("exceeds" in a for a in costs("mistral-7b", context=32768).assumptions)


# -- parameter counts against transformers' modules ---------------------------------------------------------------

def _hf_numel(model_cls: type, hf_cfg: object) -> int:
    torch = pytest.importorskip("torch")
    with torch.device("meta"):
        m = model_cls(hf_cfg)
    return sum(p.numel() for p in m.parameters())


def test_published_param_counts() -> None:
    # model cards: Llama 3.1 8B "8.03B"; Qwen3-8B "8.2B, 6.95B non-embedding"; Mistral 7B "7.24B"
    assert costs("llama-3.1-8b", context=1).params_total == 8_030_261_248
    q = costs("qwen3-8b", context=1)
    assert round(q.params_total / 1e9, 1) == 8.2 and round(q.params_active_non_embedding / 1e9, 2) == 6.95
    assert costs("mistral-7b", context=1).params_total == 7_241_732_096
    assert costs("mha-32l-4096", context=1).params_total == 6_738_415_616  # Llama-2-7B's count


def test_presets_match_transformers_param_counts() -> None:
    tf = pytest.importorskip("transformers")
    llama = tf.LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
    qwen = tf.Qwen3Config(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                          num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False)
    mistral = tf.MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                               num_attention_heads=32, num_key_value_heads=8, sliding_window=4096)
    assert costs("llama-3.1-8b", context=1).params_total == _hf_numel(tf.LlamaForCausalLM, llama)
    assert costs("qwen3-8b", context=1).params_total == _hf_numel(tf.Qwen3ForCausalLM, qwen)
    assert costs("mistral-7b", context=1).params_total == _hf_numel(tf.MistralForCausalLM, mistral)


def test_biases_tied_head_and_moe_match_transformers() -> None:
    tf = pytest.importorskip("transformers")
    small = {"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
             "num_key_value_heads": 2}
    hf = tf.LlamaConfig(intermediate_size=48, attention_bias=True, mlp_bias=True, tie_word_embeddings=True, **small)
    ours = ModelConfig(vocab_size=100, hidden_size=32, tie_embeddings=True,
                       layers=uniform_layers(3, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=48,
                                             qkv_bias=True, o_bias=True, mlp_bias=True))
    assert costs(ours, context=1).params_total == _hf_numel(tf.LlamaForCausalLM, hf)

    hf = tf.MixtralConfig(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, **small)
    moe = MoESpec(num_experts=4, top_k=2, expert_size=24)
    ours = ModelConfig(vocab_size=100, hidden_size=32,
                       layers=uniform_layers(3, num_heads=4, num_kv_heads=2, head_dim=8, mlp="moe", moe=moe))
    assert costs(ours, context=1).params_total == _hf_numel(tf.MixtralForCausalLM, hf)


def test_config_dtype_follows_the_model_and_is_what_costs_prices(tmp_path):
    """README: ``costs(model.config, n)`` prices what ``model.new_cache(1, n)`` holds, whatever dtype the model is
    in (and after ``.to()``); the user's config is not changed; a saved checkpoint's config carries its dtype."""
    import torch

    import kvlab
    from kvlab.model import Model

    cfg = ModelConfig(vocab_size=64, hidden_size=32, max_positions=128, name="dt",
                      layers=uniform_layers(2, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64))
    model = Model.from_config(cfg)
    assert cfg.dtype is None and model.config.dtype == "float32" and model.config == cfg
    for dt, name in ((None, "float32"), (torch.bfloat16, "bfloat16"), (torch.float16, "float16")):
        if dt is not None:
            model.to(dt)
        assert model.config.dtype == name
        want = model.new_cache(1, 100).nbytes()
        assert costs(model.config, context=100).kv_cache_bytes == want == costs(model, context=100).kv_cache_bytes
    assert costs(cfg, context=100).kv_cache_bytes == 2 * 2 * 2 * 8 * 2 * 100  # no dtype known: bf16
    model.float()
    kvlab.save(model, tmp_path / "m")
    assert kvlab.load(tmp_path / "m", dtype=torch.float32).config.dtype == "float32"
    assert costs(str(tmp_path / "m"), context=100).kv_cache_bytes == 2 * 2 * 2 * 8 * 4 * 100


def test_a_model_holds_its_own_copy_of_the_config_without_validating_it_again(monkeypatch):
    """Model copies its config (its dtype follows the weights) without re-running the config's validation."""
    import torch

    from kvlab.model import Model

    cfg = ModelConfig(vocab_size=64, hidden_size=32, max_positions=128,
                      layers=uniform_layers(2, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64))
    calls = []
    monkeypatch.setattr(ModelConfig, "validate", lambda self: calls.append(self))
    model = Model(cfg).to(torch.float16)
    assert not calls
    assert model.config == cfg and model.config is not cfg and model.config.layers is not cfg.layers
    assert model.config.dtype == "float16" and cfg.dtype is None
    model.config.layers.append(model.config.layers[0])
    assert len(cfg.layers) == 2


@pytest.mark.parametrize("key", ["dtype", "torch_dtype"])
def test_an_hf_config_carries_its_stored_dtype(key):
    from kvlab.families import config_from_hf

    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64, "hidden_size": 32,
          "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "max_position_embeddings": 128, key: "float16"}
    assert config_from_hf(hf).dtype == "float16"
    assert costs(config_from_hf(hf), context=10).kv_dtype == "float16"
    assert config_from_hf({**hf, key: "auto"}).dtype is None


def test_config_dtype_out_of_range_is_named():
    with pytest.raises(ValueError, match="dtype") as e:
        ModelConfig(vocab_size=64, hidden_size=32, layers=uniform_layers(1, num_heads=4, num_kv_heads=2,
                                                                         head_dim=8, intermediate_size=64),
                    dtype="float8")
    assert "bfloat16" in str(e.value)
