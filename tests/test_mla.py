"""Multi-head latent attention (``attention='mla'``): cached == uncached, absorbed == expanded, bytes, training, config."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import random_model, train_steps

import kvlab
from kvlab.cache.latent import LatentStore
from kvlab.config import LayerSpec, MLASpec, ModelConfig, MoESpec, RopeSpec
from kvlab.layers.mla import MLAttention, softmax_scale
from kvlab.model import Model
from kvlab.presets import get_preset
from kvlab.specs import mla_layer

H, R, DN, DR, DV = 4, 16, 8, 4, 6  # heads, kv_lora_rank, qk_nope, qk_rope, v_head
CASES = {
    "q-lora-interleave-yarn": {"q_lora_rank": 12, "rope": RopeSpec(theta=1000.0, scaling="yarn", factor=4.0,
                                                                   original_max_positions=16, mscale=0.9,
                                                                   mscale_all_dim=0.7)},
    "plain-q-rotate-half-bias": {"rope_interleave": False, "qkv_bias": True, "o_bias": True,
                                 "rope": RopeSpec(theta=500.0)},
}


def mla_config(case: str, moe: bool = False, layers: int = 3) -> ModelConfig:
    specs = []
    for i in range(layers):
        kw = dict(CASES[case])
        if moe and i:
            kw.update(mlp="moe", moe=MoESpec(num_experts=8, top_k=2, expert_size=16, scoring="sigmoid",
                                             bias_correction=True, shared_experts=1, n_group=4, topk_group=2,
                                             routed_scaling=2.5))
        specs.append(mla_layer(H, R, DN, DR, DV, intermediate_size=48, **kw))
    return ModelConfig(vocab_size=61, hidden_size=32, layers=specs, max_positions=128)


def modes(model: Model, mode: str) -> None:
    for block in model.layers:
        block.attn.mode = mode


def padded_batch(seed: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 61, (3, 23), generator=torch.Generator().manual_seed(seed))
    pad = torch.tensor([0, 5, 12])
    return ids, pad, (torch.arange(23)[None] >= pad[:, None]).long()


# -- cached == uncached; absorbed == expanded ---------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("chunk", [1, 3, 7])
@pytest.mark.parametrize("max_length", [30, None])
def test_chunked_prefill_then_decode_equal_full_forward(case: str, chunk: int, max_length: int | None) -> None:
    cfg = mla_config(case, moe=chunk == 3)
    model = random_model(cfg)
    ids, pad, mask = padded_batch()
    full = model(ids, attention_mask=mask)
    cache = model.new_cache(3, max_length=max_length)
    cache.set_padding(pad)
    prefill = 16  # chunked prefill of 16 positions, then token-by-token decode
    outs = [model(ids[:, s:min(s + chunk, prefill)], cache=cache) for s in range(0, prefill, chunk)]
    outs += [model(ids[:, s:s + 1], cache=cache) for s in range(prefill, ids.shape[1])]
    inc = torch.cat(outs, 1)
    for r, p in enumerate(pad.tolist()):
        torch.testing.assert_close(inc[r, p:], full[r, p:], atol=1e-5, rtol=0)
        # a padded row gives the logits of the same row alone, unpadded
        torch.testing.assert_close(model(ids[r:r + 1, p:])[0], full[r, p:], atol=1e-5, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("case", sorted(CASES))
def test_absorbed_equals_expanded(case: str) -> None:
    model = random_model(mla_config(case))
    ids, _, mask = padded_batch(5)
    modes(model, "expand")
    a = model(ids, attention_mask=mask)
    modes(model, "absorb")
    b = model(ids, attention_mask=mask)
    real = mask.bool()
    assert (a[real] - b[real]).abs().max().item() < 1e-5
    cache = model.new_cache(3, max_length=23)  # forced absorbed prefill + decode
    cache.set_padding(torch.tensor([0, 5, 12]))
    c = torch.cat([model(ids[:, :9], cache=cache)] + [model(ids[:, s:s + 1], cache=cache) for s in range(9, 23)], 1)
    assert (a[real] - c[real]).abs().max().item() < 1e-5
    model.layers[0].attn.mode = "fast"
    with pytest.raises(ValueError, match="MLAttention.mode='fast': allowed: auto, expand, absorb"):
        model(ids)


@torch.no_grad()
def test_module_matches_a_per_head_transcription() -> None:
    """The layer is ordinary attention over per-head keys [kv_b(c_kv)_nope, rot(k_pe)] and values kv_b(c_kv)_v."""
    spec = mla_layer(H, R, DN, DR, DV, q_lora_rank=12, rope=RopeSpec(theta=100.0), intermediate_size=8)
    cfg = ModelConfig(vocab_size=61, hidden_size=32, layers=[spec], max_positions=64)
    model = random_model(cfg)
    attn: MLAttention = model.layers[0].attn
    x = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(0))
    from kvlab.layers.core import Step
    from kvlab.layers.rope import Rotary

    cos, sin = Rotary(spec.rope, spec.head_dim)(torch.arange(7)[None])
    step = Step(start=0, qpos=torch.arange(7), pad=None, rope={0: (cos, sin)})
    got = attn(x, step, 0)
    q = attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(x)))[0].view(7, H, DN + DR)
    lat = attn.kv_a_proj_with_mqa(x)[0]
    c_kv, k_pe = attn.kv_a_layernorm(lat[:, :R]), lat[:, R:]
    kv = attn.kv_b_proj(c_kv).view(7, H, DN + DV)
    ang = torch.arange(7)[:, None] * Rotary(spec.rope, spec.head_dim)._inv[None]  # [T, DR/2]

    def rot(v: torch.Tensor) -> torch.Tensor:  # interleaved pairs, written de-interleaved
        a, b = v[..., 0::2], v[..., 1::2]
        c, s = (ang.cos(), ang.sin()) if v.dim() == 2 else (ang.cos()[:, None], ang.sin()[:, None])
        return torch.cat((a * c - b * s, b * c + a * s), -1)

    out = torch.zeros(7, H, DV)
    for h in range(H):
        qh = torch.cat((q[:, h, :DN], rot(q[:, h, DN:])), -1)
        kh = torch.cat((kv[:, h, :DN], rot(k_pe)), -1)
        s = (qh @ kh.T) / math.sqrt(DN + DR)
        s = s.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
        out[:, h] = F.softmax(s, -1) @ kv[:, h, DN:]
    torch.testing.assert_close(got[0], attn.o_proj(out.reshape(7, H * DV)), atol=1e-5, rtol=0)


def test_softmax_scale_takes_yarn_mscale_all_dim() -> None:
    spec = mla_config("q-lora-interleave-yarn").layers[0]
    m = 0.1 * 0.7 * math.log(4.0) + 1.0
    assert softmax_scale(spec) == pytest.approx((DN + DR) ** -0.5 * m * m)
    assert softmax_scale(mla_config("plain-q-rotate-half-bias").layers[0]) == pytest.approx((DN + DR) ** -0.5)
    assert softmax_scale(dataclasses.replace(spec, attn_scale=0.3)) == 0.3


# -- bytes: latent only, measured == calculated ------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("max_length,batch", [(3, 1), (17, 2), (40, 3)])
def test_cache_holds_only_the_latent_and_equals_calculator(dtype: torch.dtype, max_length: int, batch: int) -> None:
    cfg = mla_config("q-lora-interleave-yarn")
    model = random_model(cfg).to(dtype)
    cache = model.new_cache(batch, max_length=max_length)
    ids = torch.randint(0, cfg.vocab_size, (batch, max_length))
    model(ids[:, :max_length - 1], cache=cache)
    model(ids[:, max_length - 1:], cache=cache)
    c = kvlab.costs(cfg, context=max_length, dtype=dtype, batch=batch)
    assert cache.nbytes() == c.kv_cache_bytes
    assert cache.per_layer_nbytes() == [lc.kv_bytes for lc in c.per_layer]
    elt = torch.finfo(dtype).bits // 8
    for store, lc in zip(cache.layers, c.per_layer):
        assert isinstance(store, LatentStore)
        # one tensor [B, L, kv_lora_rank + qk_rope_head_dim]: no head axis, no per-head K or V
        assert [tuple(t.shape) for t in store.tensors()] == [(batch, max_length, R + DR)]
        assert store.c_kv.shape == (batch, max_length, R) and store.k_pe.shape == (batch, max_length, DR)
        assert store.components() == lc.kv_components == {"c_kv": batch * max_length * R * elt,
                                                               "k_pe": batch * max_length * DR * elt}
        assert lc.kv_bytes_per_token == (R + DR) * elt
    assert c.kv_cache_bytes == 3 * batch * max_length * (R + DR) * elt


def test_growing_cache_doubles_and_keeps_its_contents() -> None:
    model = random_model(mla_config("plain-q-rotate-half-bias"))
    ids = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2)  # no max_length: grows
        inc = torch.cat([model(ids[:, s:s + 1], cache=cache) for s in range(20)], 1)
    torch.testing.assert_close(inc, full, atol=1e-5, rtol=0)
    assert cache.layers[0].latent.shape[1] >= 20


def test_costs_use_the_absorbed_decode_and_expanded_prefill_forms() -> None:
    cfg = mla_config("q-lora-interleave-yarn")
    c = kvlab.costs(cfg, context=100, dtype="bf16")
    lc = c.per_layer[0]
    assert lc.attn_flops_per_token == 2 * H * (2 * R + DR) * 100
    assert lc.prefill_attn_flops == 2 * H * (DN + DR + DV) * 100 * 101 // 2
    assert lc.kv_read_bytes == 100 * (R + DR) * 2
    assert any("weight-absorbed" in a for a in c.assumptions)
    assert c.params_total == Model.from_config(cfg).num_parameters()  # the calculator counts the built module


def sparse_config(topk: int, heads: int = 16) -> ModelConfig:
    """Sparse MLA over ``heads`` indexer heads (ties at the top-k boundary go to the earlier key)."""
    specs = [mla_layer(H, R, DN, DR, DV, q_lora_rank=12, index_heads=heads, index_head_dim=8, index_topk=topk,
                       intermediate_size=48, rope=RopeSpec(theta=500.0)) for _ in range(2)]
    return ModelConfig(vocab_size=61, hidden_size=32, layers=specs, max_positions=128)


def test_sparse_mla_is_priced_as_it_is_stored() -> None:
    cfg = sparse_config(5, heads=2)
    c = kvlab.costs(cfg, context=40, dtype="bf16", batch=2)
    lc = c.per_layer[0]
    assert lc.kv_components == {"c_kv": 2 * 40 * R * 2, "k_pe": 2 * 40 * DR * 2, "index_keys": 2 * 40 * 8 * 2}
    assert lc.kv_read_bytes == 2 * 2 * (5 * (R + DR) + 40 * 8)  # top-5 latents + every indexer key
    assert lc.attn_flops_per_token == 2 * H * (2 * R + DR) * 5 + 2 * 2 * (8 + 1) * 40
    assert c.params_total == Model.from_config(cfg).num_parameters()
    model = random_model(cfg).to(torch.bfloat16)
    cache = model.new_cache(2, max_length=40)
    with torch.no_grad():
        model(torch.randint(0, 61, (2, 40)), cache=cache)
    assert cache.nbytes() == c.kv_cache_bytes and cache.per_layer_nbytes() == [x.kv_bytes for x in c.per_layer]
    assert [tuple(t.shape) for t in cache.layers[0].tensors()] == [(2, 40, R + DR), (2, 40, 8)]


@torch.no_grad()
@pytest.mark.parametrize("chunk", [1, 3, 7])
@pytest.mark.parametrize("ties", [False, True])
def test_sparse_chunked_prefill_then_decode_equal_full_forward(chunk: int, ties: bool) -> None:
    """ties: every indexer score equal (zero weights) — the earlier keys win, in a chunk as in the whole forward."""
    model = random_model(sparse_config(4, heads=2 if ties else 16))
    if ties:
        for layer in model.layers:
            layer.attn.indexer.weights_proj.weight.zero_()
    ids, pad, mask = padded_batch()
    full = model(ids, attention_mask=mask)
    cache = model.new_cache(3, max_length=23)
    cache.set_padding(pad)
    outs = [model(ids[:, s:min(s + chunk, 16)], cache=cache) for s in range(0, 16, chunk)]
    outs += [model(ids[:, s:s + 1], cache=cache) for s in range(16, 23)]
    inc = torch.cat(outs, 1)
    for r, p in enumerate(pad.tolist()):
        torch.testing.assert_close(inc[r, p:], full[r, p:], atol=1e-5, rtol=0)
        torch.testing.assert_close(model(ids[r:r + 1, p:])[0], full[r, p:], atol=1e-5, rtol=0)
    for n in (1, 4, 9):  # causal: a prefix's logits are the first positions of the longer forward
        torch.testing.assert_close(model(ids[:1, :n]), full[:1, :n], atol=1e-5, rtol=0)


@torch.no_grad()
def test_sparse_indexer_scores_in_blocks_of_heads_as_all_at_once(monkeypatch) -> None:
    """A long chunk scores the indexer heads a block at a time (bounded memory); the choice is the one-block one."""
    from kvlab.layers.mla import DSAIndexer

    model = random_model(sparse_config(4))
    ids, _, mask = padded_batch(7)
    ref = model(ids, attention_mask=mask)
    idx = model.layers[0].attn.indexer
    q, keys, w = torch.randn(3, 16, 9, 8), torch.randn(3, 23, 8), torch.randn(3, 9, 16)
    one = idx.weighted_scores(q, keys, w)
    monkeypatch.setattr(DSAIndexer, "SCORE_BYTES", 4 * 3 * 9 * 23 * 5)  # blocks of 5 heads: 5, 5, 5, 1
    torch.testing.assert_close(idx.weighted_scores(q, keys, w), one, atol=1e-5, rtol=1e-5)
    expect = (torch.relu(q @ keys.transpose(-1, -2)[:, None] / 8 ** 0.5) * w.transpose(1, 2)[..., None]).sum(1)
    torch.testing.assert_close(one, expect, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(ids, attention_mask=mask), ref, atol=1e-5, rtol=0)


@torch.no_grad()
def test_sparse_with_top_k_above_the_length_is_dense_mla_and_small_top_k_is_not() -> None:
    sparse = random_model(sparse_config(64))
    dense_cfg = sparse_config(64).replace_layers(
        lambda i, s: dataclasses.replace(s, mla=dataclasses.replace(s.mla, index_heads=None, index_head_dim=None,
                                                                   index_topk=None)))
    dense = Model(dense_cfg)
    dense.load_state_dict({k: v for k, v in sparse.state_dict().items() if ".indexer." not in k})
    ids = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sparse(ids), dense(ids), atol=1e-6, rtol=0)
    few = random_model(sparse_config(3))
    few.load_state_dict(sparse.state_dict())
    assert (few(ids)[:, 3:] - dense(ids)[:, 3:]).abs().max() > 1e-3  # beyond 3 keys the choice matters
    torch.testing.assert_close(few(ids)[:, :3], dense(ids)[:, :3], atol=1e-6, rtol=0)


# -- presets ------------------------------------------------------------------------------------------------------


def test_deepseek_v3_presets() -> None:
    v3, v32 = get_preset("deepseek-v3"), get_preset("deepseek-v3.2")
    for cfg in (v3, v32):
        assert (cfg.num_layers, cfg.hidden_size, cfg.vocab_size, cfg.max_positions) == (61, 7168, 129280, 163840)
        assert [x.mlp for x in cfg.layers].count("dense") == 3 and cfg.layers[0].intermediate_size == 18432
        moe = cfg.layers[3].moe
        assert (moe.num_experts, moe.top_k, moe.expert_size, moe.shared_width, moe.n_group, moe.topk_group,
                moe.routed_scaling) == (256, 8, 2048, 2048, 8, 4, 2.5)
        r = cfg.layers[0].rope
        assert (r.scaling, r.factor, r.original_max_positions, r.mscale, r.mscale_all_dim) == ("yarn", 40.0, 4096, 1.0, 1.0)
    m = v3.layers[0].mla
    assert (m.q_lora_rank, m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim) == (1536, 512, 128, 64, 128)
    assert not m.sparse and v32.layers[0].mla.index_topk == 2048
    c = kvlab.costs("deepseek-v3", context=131072, dtype="bf16")
    assert c.kv_bytes_per_token == 61 * 576 * 2 == 70272  # 68.6 KiB per token
    assert c.kv_cache_bytes == 61 * 576 * 2 * 131072
    assert 671e9 < c.params_total < 672e9 and 37e9 < c.params_active < 38e9  # 671B / 37B published (no MTP layer)
    c32 = kvlab.costs("deepseek-v3.2", context=1 << 20, dtype="bf16")
    assert c32.kv_cache_bytes == 61 * (576 + 128) * 2 * (1 << 20)
    # DSA: decode reads 2048 latents + every indexer key instead of every latent
    assert c32.kv_read_bytes_per_step == 61 * 2 * (2048 * 576 + (1 << 20) * 128)


# -- training -----------------------------------------------------------------------------------------------------


def test_mla_model_trains() -> None:
    torch.manual_seed(0)
    cfg = mla_config("q-lora-interleave-yarn", moe=True)
    model = Model.from_config(cfg, seed=0, std=0.05).train()
    ids = torch.randint(0, cfg.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = train_steps(model, ids, 15)
    assert losses[-1] < 0.7 * losses[0], losses
    assert model.layers[0].attn.kv_b_proj.weight.grad is not None


# -- config errors ------------------------------------------------------------------------------------------------


def _spec(**mla) -> dict:
    base = {"kv_lora_rank": R, "qk_nope_head_dim": DN, "qk_rope_head_dim": DR, "v_head_dim": DV}
    return {**base, **mla}


@pytest.mark.parametrize("mla,needle", [
    ({"kv_lora_rank": 0}, "layers[0].mla.kv_lora_rank=0: must be a positive integer"),
    ({"q_lora_rank": -3}, "layers[0].mla.q_lora_rank=-3: must be a positive integer"),
    ({"qk_rope_head_dim": 5}, "layers[0].mla.qk_rope_head_dim=5: must be even (rotary pairs)"),
    ({"v_head_dim": 2.5}, "layers[0].mla.v_head_dim=2.5: must be a positive integer"),
    ({"rope_interleave": "yes"}, "layers[0].mla.rope_interleave='yes': must be true or false"),
    ({"index_topk": 64}, ("layers[0].mla.index_heads=None: sparse MLA (DSA) needs index_heads, index_head_dim "
                          "and index_topk all set")),
    ({"index_heads": 2, "index_head_dim": 8, "index_topk": 4}, "layers[0].mla.q_lora_rank=None: the DSA indexer"),
    ({"q_lora_rank": 8, "index_heads": 2, "index_head_dim": 2, "index_topk": 4},
     "layers[0].mla.index_head_dim=2: must hold the qk_rope_head_dim=4 rotary channels"),
])
def test_bad_mla_spec_names_the_field(mla: dict, needle: str) -> None:
    m = MLASpec(**_spec(**mla))
    spec = LayerSpec(num_heads=H, num_kv_heads=1, head_dim=m.qk_head_dim if isinstance(m.qk_head_dim, int) else 12,
                     v_head_dim=DV, attention="mla", mla=m, rope=RopeSpec(partial=0.3334), intermediate_size=8)
    with pytest.raises(ValueError) as e:
        ModelConfig(vocab_size=11, hidden_size=16, layers=[spec])
    assert needle in str(e.value)


@pytest.mark.parametrize("override,needle", [
    ({"mla": None}, "layers[0].mla=None: required (an MLASpec) for attention='mla'"),
    ({"num_kv_heads": 2}, "layers[0].num_kv_heads=2: mla caches one shared latent: must be 1"),
    ({"head_dim": 16}, "layers[0].head_dim=16: must equal mla.qk_nope_head_dim + mla.qk_rope_head_dim = 12"),
    ({"v_head_dim": 8}, "layers[0].v_head_dim=8: must equal mla.v_head_dim=6"),
    ({"rope": None}, "layers[0].rope=None: mla rotates qk_rope_head_dim channels"),
    ({"rope": RopeSpec(partial=0.5)}, "layers[0].rope.partial=0.5: must rotate mla.qk_rope_head_dim=4 of head_dim=12"),
    ({"window": 8}, "layers[0].window=8: not supported by mla (an option of gqa, cca, csa, hca, swa)"),
    ({"sinks": True}, "layers[0].sinks=True: not supported by mla"),
    ({"output_gate": "sigmoid"}, "layers[0].output_gate='sigmoid': not supported by mla"),
])
def test_bad_mla_layer_names_the_field(override: dict, needle: str) -> None:
    spec = dataclasses.replace(mla_layer(H, R, DN, DR, DV, intermediate_size=8), **override)
    with pytest.raises(ValueError) as e:
        ModelConfig(vocab_size=11, hidden_size=16, layers=[spec])
    assert needle in str(e.value)


def test_mla_spec_on_another_kind_and_kv_sharing_are_errors() -> None:
    m = MLASpec(kv_lora_rank=R, qk_nope_head_dim=DN, qk_rope_head_dim=DR, v_head_dim=DV)
    with pytest.raises(ValueError, match=r"layers\[0\].mla=.*not supported by gqa \(an option of mla\)"):
        ModelConfig(vocab_size=11, hidden_size=16,
                    layers=[LayerSpec(num_heads=2, num_kv_heads=1, head_dim=8, intermediate_size=8, mla=m)])
    a, b = mla_layer(H, R, DN, DR, DV, intermediate_size=8), mla_layer(H, R, DN, DR, DV, intermediate_size=8)
    b.kv_source = 0
    with pytest.raises(ValueError, match=r"layers\[1\].kv_source=0: a mla layer computes its own K/V"):
        ModelConfig(vocab_size=11, hidden_size=16, layers=[a, b])


@pytest.mark.parametrize("moe,needle", [
    ({"n_group": 3}, "n_group=3: must divide num_experts=8"),
    ({"n_group": 4, "topk_group": 0}, "topk_group=0: must be None or an integer in [1, n_group=4]"),
    ({"n_group": 4, "topk_group": 1, "top_k": 3}, "topk_group=1: 1 groups of 2 experts hold fewer than top_k=3"),
])
def test_bad_group_routing_names_the_field(moe: dict, needle: str) -> None:
    spec = MoESpec(**{"num_experts": 8, "top_k": 2, "expert_size": 8, **moe})
    with pytest.raises(ValueError) as e:
        spec.validate("layers[1].moe")
    assert needle in str(e.value)


def test_config_round_trips_through_json(tmp_path) -> None:
    cfg = mla_config("q-lora-interleave-yarn", moe=True)
    cfg.save(tmp_path / "c.json")
    back = ModelConfig.load(tmp_path / "c.json")
    assert back == cfg and isinstance(back.layers[0].mla, MLASpec) and back.layers[1].moe.n_group == 4


def test_cpu_decode_step_reads_the_latent_cache_without_copying_it(monkeypatch):
    """On the CPU, SDPA with keys and values of different widths (MLA's absorbed decode: latent + rotary keys, latent
    values) runs its math fallback, which multiplies a copy of all of K by ``sqrt(scale)`` each call. A decode step
    hands SDPA the whole latent as keys and values (one width: its flash kernel), and its logits equal those of
    values ``c_kv`` alone (attended by two matmuls, kvlab/layers/core.py). (The C++ decode kernel off: it takes this
    step where it is built, tests/test_dense_attend.py.)"""
    from test_contract import tiny

    from kvlab.layers import core, dense_attend, mla

    monkeypatch.setattr(dense_attend, "ENABLED", False)

    with torch.no_grad():
        model = random_model(tiny("mla", 0))
    ids = torch.randint(0, 61, (2, 14), generator=torch.Generator().manual_seed(5))
    caches = [model.new_cache(2, max_length=16) for _ in range(2)]
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append((q.shape[-2], k.shape[-1], v.shape[-1]))
        return sdpa(q, k, v, *args, **kwargs)

    with torch.inference_mode():
        for c in caches:
            model(ids[:, :12], cache=c)
        monkeypatch.setattr(core.F, "scaled_dot_product_attention", spy)
        calls.clear()
        out = [model(ids[:, s:s + 1], cache=caches[0]) for s in (12, 13)]
        assert calls and all(kd == vd for _, kd, vd in calls)  # SDPA, K and V of one width (the whole latent)
        monkeypatch.setattr(mla, "whole_latent_values", lambda keys: False)  # values c_kv alone: two matmuls
        calls.clear()
        ref = [model(ids[:, s:s + 1], cache=caches[1]) for s in (12, 13)]
        assert not calls
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_cpu_prefill_hands_sdpa_keys_and_values_of_one_width(monkeypatch):
    """A multi-query chunk in the expanded form zero-pads the values to the key width (written straight from the
    up-projection, kvlab/layers/mla.py), so SDPA on the CPU takes its flash kernel rather than the math fallback;
    the logits equal the unpadded path's (taken with autograd on, where the padded buffers are not used)."""
    from test_contract import tiny

    from kvlab.layers import core

    with torch.no_grad():
        model = random_model(tiny("mla", 0))
    modes(model, "expand")
    ids = torch.randint(0, 61, (2, 14), generator=torch.Generator().manual_seed(5))
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append((q.shape[-2], k.shape[-1], v.shape[-1]))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(core.F, "scaled_dot_product_attention", spy)

    def chunked():
        cache = model.new_cache(2, max_length=16)
        return torch.cat([model(ids[:, s:s + 5], cache=cache) for s in range(0, 14, 5)], 1)

    with torch.inference_mode():
        out = chunked()
    assert calls and all(c[0] > 1 and c[1] == c[2] for c in calls)
    calls.clear()
    monkeypatch.setattr(core, "_narrow_values", lambda q, k, v: False)
    with torch.enable_grad():
        ref = chunked()
    assert calls and all(c[1] != c[2] for c in calls)  # the unpadded path: values narrower than keys
    torch.testing.assert_close(out, ref.detach(), atol=1e-5, rtol=1e-5)
