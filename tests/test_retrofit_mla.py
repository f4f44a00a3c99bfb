"""GQA/MHA -> MLA retrofit (kvlab/retrofit/mla.py): what must be exact is exact, the rest converts and runs."""

from __future__ import annotations

import pytest
import torch
from helpers import random_model

import kvlab
from kvlab.config import GQASpec, LayerSpec, MLASpec, ModelConfig, RopeSpec
from kvlab.model import Model
from kvlab.retrofit import RetrofitError, apply, to_mla
from kvlab.retrofit.mla import factorise, select_pairs

HID, D = 64, 16


def gqa_config(kv_heads: int, partial: float = 1.0, layers: int = 2, heads: int = 4, **kw) -> ModelConfig:
    return ModelConfig(vocab_size=61, hidden_size=HID, max_positions=128, tie_embeddings=True, layers=[
        LayerSpec(num_heads=heads, num_kv_heads=kv_heads, head_dim=D, intermediate_size=48,
                  rope=RopeSpec(theta=1000.0, partial=partial), **kw) for _ in range(layers)])


def ids_(seed: int = 0, shape: tuple[int, int] = (2, 21)) -> torch.Tensor:
    return torch.randint(0, 61, shape, generator=torch.Generator().manual_seed(seed))


def tie_rotary_rows(model: Model) -> None:
    """Make every KV head's rotary K rows equal to head 0's (the multi-KV-head case MLA's one rotary key holds)."""
    with torch.no_grad():
        for block in model.layers:
            spec = block.attn.spec
            rot = int(spec.head_dim * spec.rope.partial)
            w = block.attn.k_proj.weight.view(spec.num_kv_heads, spec.head_dim, -1)
            w[1:, :rot] = w[0, :rot]


@torch.no_grad()
def test_factorisation_at_full_rank_reproduces_the_kv_projections() -> None:
    m = torch.randn(40, HID, generator=torch.Generator().manual_seed(0))
    up, down = factorise(m, 40)
    assert (up @ down - m.double()).abs().max().item() < 1e-12
    up, down = factorise(m, 20)  # truncated: the best rank-20 approximation, not the matrix
    assert (up @ down - m.double()).abs().max().item() > 1e-2
    # activation-aware: exact at full rank; truncated, a smaller error on the inputs it measured than plain SVD
    x = torch.randn(500, HID, generator=torch.Generator().manual_seed(1)).double() * torch.linspace(0.01, 3, HID)
    c = x.T @ x / 500
    up, down = factorise(m, 40, c)
    assert (up @ down - m.double()).abs().max().item() < 1e-8
    err = [((x @ (m.double() - u @ d).T) ** 2).mean().item() for u, d in (factorise(m, 20), factorise(m, 20, c))]
    assert err[1] < 0.8 * err[0]  # (the optimum for that error; plain SVD is optimal for the Frobenius one)
    # in a converted GQA model: kv_b_proj @ kv_a (latent rows) gives back every head's non-rotary K rows and V rows,
    # and the kept rotary rows as k_pe (from kv_a) plus the residual off it (from the latent)
    model = random_model(gqa_config(2)).float()
    rank = 2 * (D + D)
    out = to_mla(model, rank=rank, rope_dims=8)
    kept = select_pairs(model, 8, "high")
    rope_rows = list(kept.pairs) + [j + D // 2 for j in kept.pairs]
    nope = [c for c in range(D) if c not in rope_rows]
    for i, block in enumerate(out.model.layers):
        a = block.attn
        w = (a.kv_b_proj.weight @ a.kv_a_proj_with_mqa.weight[:rank]).view(4, D + D, HID)
        src = model.layers[i].attn
        k = src.k_proj.weight.view(2, D, HID).repeat_interleave(2, 0)
        v = src.v_proj.weight.view(2, D, HID).repeat_interleave(2, 0)
        torch.testing.assert_close(w[:, :len(nope)], k[:, nope], atol=1e-5, rtol=0)
        torch.testing.assert_close(w[:, D:], v, atol=1e-5, rtol=0)
        q = a.q_proj.weight.view(4, D + 8, HID)
        wr = model.layers[i].attn.q_proj.weight.view(4, D, HID)[:, rope_rows]
        u = (q[:, D:] * wr).sum(-1) / (wr * wr).sum(-1)  # the shared-key weight u_g(h) of each rotary channel
        k_pe = a.kv_a_proj_with_mqa.weight[rank:]
        torch.testing.assert_close(w[:, len(nope):D] + u[:, :, None] * k_pe, k[:, rope_rows], atol=1e-5, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("case", ["mqa", "gqa-equal-rotary-keys"])
def test_nothing_dropped_reproduces_the_logits(case: str) -> None:
    """One KV head (or KV heads with equal rotary rows), every rotary channel kept, full rank: exact."""
    model = random_model(gqa_config(1 if case == "mqa" else 2, partial=0.5)).float()
    if case != "mqa":
        tie_rotary_rows(model)
    g = model.config.layers[0].num_kv_heads
    ids = ids_()
    out = to_mla(model, rank=g * ((D - 8 if g == 1 else D) + D), rope_dims=8, ids=ids)
    assert out.model.config.layers[0].attention == "mla" and not out.model.config.layers[0].mla.latent_norm
    assert out.report.initialised == {} and out.report.dropped == []
    assert "layers.0.attn.kv_b_proj.weight" in out.report.derived
    torch.testing.assert_close(out.model(ids), model(ids), atol=1e-4, rtol=0)
    if case == "mqa":
        assert "nothing approximated" in out.report.notes[-1]


@torch.no_grad()
def test_what_is_dropped_changes_the_logits() -> None:
    """The approximate parts are approximations: unequal KV heads' rotary keys, fewer rotary pairs, lower rank."""
    model = random_model(gqa_config(2, partial=0.5)).float()
    ids = ids_()
    ref = model(ids)
    full = 2 * (D + D)
    for rank, rope in ((full, 8), (full, 4), (full - 8, 8)):  # unequal rotary keys; 2 of 4 pairs; lower rank
        out = to_mla(model, rank=rank, rope_dims=rope)
        assert (out.model(ids) - ref).abs().max().item() > 1e-3
        assert "approximate" in out.report.notes[-1]


def test_two_norm_selection_keeps_the_pairs_that_contribute() -> None:
    model = random_model(gqa_config(2)).float()
    with torch.no_grad():
        for block in model.layers:  # pairs 2 and 3 (channels 2, 3, 10, 11) dominate q.k
            for w in (block.attn.q_proj.weight, block.attn.k_proj.weight):
                v = w.view(-1, D, HID)
                v *= 0.01
                v[:, [2, 3, 10, 11]] *= 1000.0
    kept = select_pairs(model, 4, "2norm")
    assert kept.pairs == (2, 3)
    assert kept.rope.scaling == "linear" and kept.rope.factor == pytest.approx(1000.0 ** (4 / 16))
    assert kept.rope.theta == pytest.approx(1000.0 ** (2 * 2 / 16))
    assert select_pairs(model, 4, "high").pairs == (0, 1)
    assert select_pairs(model, 4, "uniform").pairs == (0, 4)


@torch.no_grad()
def test_kept_pairs_rotate_with_the_source_frequencies() -> None:
    """The MLA layer's RoPE (theta', linear factor) gives kept pair j exactly the source's angle theta^(-2j/rot)."""
    from kvlab.layers.rope import Rotary

    model = random_model(gqa_config(2)).float()
    out = to_mla(model, rank=16, rope_dims=6, select="uniform")
    spec = out.model.config.layers[0]
    kept = select_pairs(model, 6, "uniform")
    src = Rotary(model.config.layers[0].rope, D)
    new = Rotary(spec.rope, spec.head_dim)
    pos = torch.arange(50)[None]
    torch.testing.assert_close(new(pos)[0][..., :3], src(pos)[0][..., list(kept.pairs)], atol=1e-4, rtol=0)


@torch.no_grad()
def test_cache_bytes_and_chunked_decode_of_the_converted_model() -> None:
    model = random_model(gqa_config(2, layers=3)).float()
    out = to_mla(model, rank=12, rope_dims=4)
    m = out.model
    cfg = m.config
    half = to_mla(random_model(gqa_config(2, layers=3)).to(torch.bfloat16), rank=12, rope_dims=4).model
    assert half.new_cache(1, max_length=100).nbytes() == kvlab.costs(cfg, context=100, dtype="bf16").kv_cache_bytes
    cache = m.new_cache(2, max_length=40)
    c = kvlab.costs(cfg, context=40, dtype="float32", batch=2)
    assert cache.nbytes() == c.kv_cache_bytes == 3 * 2 * 40 * (12 + 4) * 4
    assert c.params_total == m.num_parameters()  # no kv_a_layernorm weight counted
    ids = ids_(3, (2, 19))
    full = m(ids)
    outs = [m(ids[:, s:min(s + 5, 12)], cache=cache) for s in range(0, 12, 5)]
    outs += [m(ids[:, s:s + 1], cache=cache) for s in range(12, 19)]
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=0)


def test_technique_string_and_save_load(tmp_path) -> None:
    model = random_model(gqa_config(2)).float()
    a = apply(model, "mla:rank=16,rope=4")
    b = to_mla(model, 16, 4)
    ids = ids_()
    torch.testing.assert_close(a.model(ids), b.model(ids), atol=0, rtol=0)
    assert a.report.technique == "mla:rank=16,rope=4"
    kvlab.save(a.model, tmp_path / "ckpt")
    back = kvlab.load(tmp_path / "ckpt", dtype=torch.float32)
    torch.testing.assert_close(back(ids), a.model(ids), atol=0, rtol=0)


@pytest.mark.parametrize("kw, match", [
    ({"rank": 97}, r"mla: rank=97 must be an integer in \[1, 64\]: the joint K/V width is 2 KV heads x \(16 "),
    ({"rank": 0}, r"rank=0"),
    ({"rank": 8, "rope_dims": 5}, r"rope_dims=5 must be an even number of rotary channels in \[2, 16\]"),
    ({"rank": 8, "rope_dims": 18}, r"rope_dims=18 must be an even number of rotary channels in \[2, 16\]"),
    ({"rank": 8, "svd": "activations"}, r"svd='activations' measures the inputs on text: give ids="),
    ({"rank": 8, "svd": "exact"}, r"svd='exact'; allowed: auto, weights, activations"),
    ({"rank": 8, "select": "random"}, r"select='random'; allowed: high, 2norm, uniform"),
])
def test_bad_options_are_named(kw, match) -> None:
    with pytest.raises(RetrofitError, match=match):
        to_mla(random_model(gqa_config(2)), **kw)


@pytest.mark.parametrize("layer, match", [
    ({"window": 8}, r"layers\[1\] sets window"),
    ({"gqa": GQASpec(qk_norm=True)}, r"layers\[1\] sets gqa\.qk_norm"),
    ({"gqa": GQASpec(v_norm=True, k_eq_v=True)}, r"layers\[1\] sets gqa\.v_norm, gqa\.k_eq_v"),
    ({"rope": None}, r"layers\[1\]\.rope is absent"),
    ({"head_dim": 8}, r"layers\[1\] has other heads"),
])
def test_layers_it_cannot_convert_are_named(layer, match) -> None:
    cfg = gqa_config(2)
    for k, v in layer.items():
        setattr(cfg.layers[1], k, v)
    with pytest.raises(RetrofitError, match=match):
        to_mla(random_model(cfg), 8, ids=ids_())


def test_mqa_needs_a_non_rotary_part() -> None:
    with pytest.raises(RetrofitError, match=r"rope_dims=16 makes every channel of the single KV head rotary"):
        to_mla(random_model(gqa_config(1)), 8, 16)


def test_a_non_gqa_layer_and_scaled_rope_are_named() -> None:
    from kvlab.specs import mla_layer

    cfg = ModelConfig(vocab_size=61, hidden_size=HID, max_positions=64,
                      layers=[mla_layer(4, 8, 8, 4, 8, intermediate_size=16)])
    with pytest.raises(RetrofitError, match=r"layers\[0\] is a 'mla' layer; the MLA retrofit converts gqa layers"):
        to_mla(random_model(cfg), 8)
    cfg = gqa_config(2)
    for x in cfg.layers:
        x.rope = RopeSpec(theta=1000.0, scaling="linear", factor=2.0)
    with pytest.raises(RetrofitError, match=r"rope_dims=4 < 16 keeps some rotary pairs.*scaling='linear'"):
        to_mla(random_model(cfg), 8, 4)


def test_latent_norm_option_is_validated_and_priced() -> None:
    with pytest.raises(ValueError, match="latent_norm"):
        MLASpec(8, 8, 4, 8, latent_norm="no").validate("layers[0].mla")
    from kvlab.specs import mla_layer

    for norm in (True, False):
        cfg = ModelConfig(vocab_size=61, hidden_size=HID, max_positions=64,
                          layers=[mla_layer(4, 8, 8, 4, 8, intermediate_size=16, latent_norm=norm)])
        m = Model.from_config(cfg)
        assert kvlab.costs(cfg, context=8).params_total == m.num_parameters()
        assert ("layers.0.attn.kv_a_layernorm.weight" in m.state_dict()) == norm



@pytest.mark.parametrize("text, match", [
    ("mla", r"mla: needs a latent rank, e.g. mla:rank=128,rope=32"),
    ("mla:16,rank=16", r"give the rank once"),
    ("mla:rank=16,rope=x", r"rope='x' must be an integer"),
    ("mla:rank=16,window=3", r"unknown option\(s\) \['window'\]"),
])
def test_bad_technique_strings_are_named(text: str, match: str) -> None:
    with pytest.raises(RetrofitError, match=match):
        apply(random_model(gqa_config(2)), text)
