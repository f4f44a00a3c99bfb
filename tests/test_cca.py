"""Compressed convolutional attention (``attention='cca'``): its math, chunk boundaries, bytes, training, config."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import random_model, train_steps
from torch import nn

import kvlab
from kvlab.cache.cca import CCAStore
from kvlab.config import CCASpec, LayerSpec, ModelConfig, MoESpec
from kvlab.layers.cca import CCAttention, causal_conv
from kvlab.layers.core import Step
from kvlab.model import Model


def cca_config(kernels=(2, 2), window=None, zaya_block=False, **kw) -> ModelConfig:
    """Three CCA layers (the middle one windowed when ``window``); ``zaya_block`` adds ZAYA's block options."""
    layers = []
    for i in range(3):
        spec = LayerSpec(num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=48, attention="cca",
                         cca=CCASpec(conv_kernels=kernels), window=window if i == 1 else None,
                         rope={"theta": 1000.0, "partial": 0.5}, **kw)
        if zaya_block:
            spec.residual_scaling = True
            spec.mlp = "moe"
            spec.moe = MoESpec(num_experts=4, top_k=1, expert_size=16, norm_topk=False, bias_correction=True,
                               router_hidden=8, router_carry=i > 0, skip_expert=True)
        layers.append(spec)
    return ModelConfig(vocab_size=61, hidden_size=32, layers=layers, max_positions=128, embed_affine=zaya_block,
                       residual_fp32=zaya_block)


def cca_model(cfg: ModelConfig, seed: int = 0) -> Model:
    """A random model whose convolutions and key temperatures matter (larger than the default init)."""
    model = random_model(cfg, seed=seed)
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".conv_" in name and name.endswith("weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif name.endswith("key_temp"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith(("_scale", "affine_bias")):
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model.eval()


# -- the math, against a token-by-token transcription -----------------------------------------------------------


def naive_project(attn: CCAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k (before norm) and v of one unpadded sequence ``x [T, hidden]``, one position and channel at a time."""
    s = attn.spec
    h, hkv, d = s.num_heads, s.num_kv_heads, s.head_dim
    g, (k0, k1) = h // hkv, s.cca.conv_kernels
    t_len = x.shape[0]
    q, k = attn.q_proj(x), attn.k_proj(x)
    qk = torch.cat((q, k), -1)  # [T, C]
    c = qk.shape[1]

    def inp(t: int) -> torch.Tensor:  # the zero history before the sequence
        return qk[t] if t >= 0 else torch.zeros(c)

    w0, b0 = attn.conv_dw.weight[:, 0], attn.conv_dw.bias  # [C, k0]
    w1, b1 = attn.conv_grouped.weight, attn.conv_grouped.bias  # [C, d, k1]: group = the channel's head

    def depthwise(t: int) -> torch.Tensor:
        return b0 + sum(w0[:, j] * inp(t - (k0 - 1) + j) for j in range(k0))

    out = torch.zeros(t_len, c)
    for t in range(t_len):
        ys = [depthwise(t - (k1 - 1) + j) for j in range(k1)]
        for ch in range(c):
            head = ch // d
            out[t, ch] = b1[ch] + sum((w1[ch, :, j] * ys[j][head * d:(head + 1) * d]).sum() for j in range(k1))
    qh, kh = q.view(t_len, h, d), k.view(t_len, hkv, d)
    r_q = torch.stack([(qh[:, i] + kh[:, i // g]) / 2 for i in range(h)], 1)
    r_k = torch.stack([r_q[:, j * g:(j + 1) * g].mean(1) for j in range(hkv)], 1)
    q_out = out[:, :h * d].view(t_len, h, d) + r_q
    k_out = out[:, h * d:].view(t_len, hkv, d) + r_k
    cur, shifted = attn.v_proj(x), attn.v_shift_proj(x)
    prev = torch.cat((attn.v_shift_proj(torch.zeros(1, x.shape[1])), shifted[:-1]))
    v = torch.cat((cur, prev), -1).view(t_len, hkv, s.value_dim)
    return q_out, k_out, v


@pytest.mark.parametrize("kernels", [(2, 2), (3, 2), (1, 3)])
@torch.no_grad()
def test_projection_equals_token_by_token_transcription(kernels):
    spec = LayerSpec(num_heads=4, num_kv_heads=2, head_dim=4, attention="cca", cca=CCASpec(kernels), qkv_bias=True,
                     intermediate_size=8)
    attn = CCAttention(spec, hidden=12)
    gen = torch.Generator().manual_seed(0)
    for p in attn.parameters():
        p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    x = torch.randn(1, 7, 12, generator=gen)
    step = Step(start=0, qpos=torch.arange(7), pad=None)
    got = attn.project(x, step)
    want = naive_project(attn, x[0])
    for a, b in zip(got, want):
        torch.testing.assert_close(a[0], b, atol=1e-5, rtol=1e-5)


# -- chunk boundaries and padding ---------------------------------------------------------------------------------


CHUNK_CASES = {
    "full": {},
    "window": {"window": 4},
    "kernels-3-2+bias": {"kernels": (3, 2), "qkv_bias": True, "o_bias": True},
    "kernels-1-1": {"kernels": (1, 1)},
    "sinks+gate": {"sinks": True, "output_gate": "sigmoid"},
    "zaya-block": {"zaya_block": True, "window": 5},
}


@pytest.mark.parametrize("case", sorted(CHUNK_CASES))
@pytest.mark.parametrize("chunk", [1, 3, 7])
@pytest.mark.parametrize("max_length", [40, None])
@torch.no_grad()
def test_chunked_prefill_and_decode_equal_full_forward(case, chunk, max_length):
    cfg = cca_config(**CHUNK_CASES[case])
    model = cca_model(cfg)
    t = 23
    ids = torch.randint(0, cfg.vocab_size, (3, t), generator=torch.Generator().manual_seed(2))
    pad = torch.tensor([0, 5, 9])
    mask = (torch.arange(t)[None] >= pad[:, None]).long()
    full = model(ids, attention_mask=mask)
    cache = model.new_cache(3, max_length=max_length)
    cache.set_padding(pad)
    inc = torch.cat([model(ids[:, s:s + chunk], cache=cache) for s in range(0, t, chunk)], 1)
    for r, p in enumerate(pad.tolist()):
        torch.testing.assert_close(inc[r, p:], full[r, p:], atol=1e-5, rtol=0)
        if not CHUNK_CASES[case].get("qkv_bias"):  # with projection biases, pads feed the bias (as transformers)
            torch.testing.assert_close(model(ids[r:r + 1, p:])[0], full[r, p:], atol=1e-5, rtol=0)


@torch.no_grad()
def test_padding_does_not_leak_and_history_matters():
    cfg = cca_config()
    model = cca_model(cfg)
    ids = torch.randint(1, cfg.vocab_size, (1, 10), generator=torch.Generator().manual_seed(0))
    base = model(ids)
    # whatever sits in the padding, a padded row gives the row's logits
    for junk in (0, 7, 60):
        padded = torch.cat((torch.full((1, 4), junk), ids), 1)
        mask = torch.cat((torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 10, dtype=torch.long)), 1)
        torch.testing.assert_close(model(padded, attention_mask=mask)[:, 4:], base, atol=1e-5, rtol=0)
    # the conv tail and the delayed value carry information: the previous token changes the next logits
    other = ids.clone()
    other[0, 8] = (other[0, 8] + 1) % cfg.vocab_size
    assert (model(other)[0, 9] - base[0, 9]).abs().max() > 1e-4


@torch.no_grad()
def test_greedy_generation_equals_full_forward_argmax():
    cfg = cca_config(zaya_block=True, window=4)
    model = cca_model(cfg, seed=1)
    ids = torch.randint(1, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    got = kvlab.generate(model, ids, max_new_tokens=12, temperature=0.0, attention_mask=mask, prefill_chunk=4)
    seq = ids
    for _ in range(12):
        nxt = model(seq, attention_mask=torch.cat((mask, torch.ones(2, seq.shape[1] - 9, dtype=torch.long)), 1))
        seq = torch.cat((seq, nxt[:, -1].argmax(-1, keepdim=True)), 1)
    assert torch.equal(got, seq)


# -- bytes: measured == calculated --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("max_length,batch", [(3, 1), (17, 2), (40, 3)])
@torch.no_grad()
def test_cache_bytes_per_token_and_state_equal_calculator(dtype, max_length, batch):
    cfg = cca_config(kernels=(3, 2), window=5)
    cfg.layers[2] = LayerSpec(num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=48)  # a GQA layer beside
    model = cca_model(cfg).to(dtype)
    cache = model.new_cache(batch, max_length=max_length)
    ids = torch.randint(0, cfg.vocab_size, (batch, max_length))
    model(ids[:, :max_length - 1], cache=cache)
    model(ids[:, max_length - 1:], cache=cache)
    c = kvlab.costs(cfg, context=max_length, dtype=dtype, batch=batch)
    assert cache.nbytes() == c.kv_cache_bytes
    assert cache.per_layer_nbytes() == [lc.kv_bytes for lc in c.per_layer]
    elt = 2 if dtype == torch.bfloat16 else 4
    for spec, store, lc in zip(cfg.layers, cache.layers, c.per_layer):
        if spec.attention != "cca":
            assert lc.kv_state_bytes == 0
            continue
        assert isinstance(store, CCAStore)
        seen = max_length if spec.window is None else min(max_length, spec.window)
        assert store.token_nbytes() == lc.kv_bytes - lc.kv_state_bytes == batch * seen * lc.kv_bytes_per_token
        # conv tail: (4 + 2) heads x 8 channels x (3 + 2 - 2) columns; delayed values: 2 x 8 / 2
        assert store.state_nbytes() == lc.kv_state_bytes == batch * (6 * 8 * 3 + 8) * elt
    assert c.kv_state_bytes == sum(lc.kv_state_bytes for lc in c.per_layer)


def test_state_is_allocated_once_and_never_grows():
    cfg = cca_config()
    model = cca_model(cfg)
    cache = model.new_cache(2)  # no max_length: the K/V grow, the state does not
    sizes = [s.state_nbytes() for s in cache.layers]
    for _ in range(5):
        model(torch.randint(0, 61, (2, 3)), cache=cache)
    assert [s.state_nbytes() for s in cache.layers] == sizes


def test_zaya1_8b_preset_numbers():
    """The published figures: 1 KiB K/V per token per layer, 8x below MHA, 5,376 B of state per layer."""
    cca, gqa, mha = (kvlab.costs(n, context=131072, dtype="bf16") for n in ("zaya1-8b", "zaya1-8b-gqa", "zaya1-8b-mha"))
    assert all(lc.kv_bytes_per_token == 1024 and lc.kv_state_bytes == 5376 for lc in cca.per_layer)
    assert cca.kv_cache_bytes == 40 * (1024 * 131072 + 5376)
    assert mha.kv_cache_bytes == 8 * (cca.kv_cache_bytes - cca.kv_state_bytes) == 40 * 2**30
    assert gqa.kv_cache_bytes == cca.kv_cache_bytes - cca.kv_state_bytes
    assert 2 * cca.attn_flops_per_token == gqa.attn_flops_per_token == mha.attn_flops_per_token
    assert round(cca.params_total / 1e9, 2) == 8.84
    assert round(cca.params_active_non_embedding / 1e9, 2) == 0.75


def test_compare_shows_cache_ratio_flops_and_state(capsys):
    from kvlab.cli import main

    assert main(["compare", "zaya1-8b", "zaya1-8b-gqa", "zaya1-8b-mha", "--context", "128k"]) == 0
    out = capsys.readouterr().out
    assert "8.000x" in out and "40.00 GiB" in out and "5.00 GiB" in out
    assert "21.47 GFLOP" in out and "42.95 GFLOP" in out and "zaya1-8b 210.00 KiB" in out


def test_calculator_params_equal_built_model():
    cfg = cca_config(kernels=(3, 2), zaya_block=True, qkv_bias=True, sinks=True, output_gate="softplus")
    assert kvlab.costs(cfg, context=8).params_total == Model.from_config(cfg).num_parameters()


# -- training -----------------------------------------------------------------------------------------------------


@torch.enable_grad()  # other test modules turn gradients off at import
def test_cca_model_trains():
    torch.manual_seed(0)
    cfg = cca_config()
    model = Model.from_config(cfg, seed=0, std=0.05).train()
    data = torch.randint(0, cfg.vocab_size, (4, 24), generator=torch.Generator().manual_seed(1))
    losses = train_steps(model, data, 25)
    assert losses[-1] < 0.7 * losses[0], losses
    attn = model.layers[0].attn
    for p in (attn.conv_dw.weight, attn.conv_grouped.weight, attn.key_temp, attn.v_shift_proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


# -- config -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override,needle", [
    ({"cca": {"conv_kernels": (0, 2)}}, "cca.conv_kernels=(0, 2): must be two positive integers"),
    ({"cca": {"conv_kernels": (2, 2, 2)}}, "must be two positive integers"),
    ({"gqa": {"qk_norm": True}}, "gqa=GQASpec(qk_norm=True, v_norm=False, k_eq_v=False, sink_tokens=0): not supported"),
    ({"gqa": {"k_eq_v": True}}, "k_eq_v=True, sink_tokens=0): not supported by cca (an option of gqa)"),
    ({"num_kv_heads": 1, "v_head_dim": 3, "num_heads": 2}, "the product must be even"),
])
def test_bad_cca_spec_is_a_clear_error(override, needle):
    spec = {"num_heads": 4, "num_kv_heads": 2, "head_dim": 8, "intermediate_size": 16, "attention": "cca",
            **override}
    with pytest.raises(ValueError, match="layers\\[0\\]") as e:
        ModelConfig(vocab_size=10, hidden_size=16, layers=[spec])
    assert needle in str(e.value)


def test_cca_cannot_share_kv():
    specs = [LayerSpec(num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=16, attention="cca")
             for _ in range(2)]
    specs[1].kv_source = 0
    with pytest.raises(ValueError, match="no cross-layer sharing"):
        ModelConfig(vocab_size=10, hidden_size=16, layers=specs)


def test_router_carry_needs_a_router_state_before():
    cfg = cca_config(zaya_block=True)
    layers = [dataclasses.replace(x) for x in cfg.layers]
    layers[0] = dataclasses.replace(layers[0], mlp="dense", moe=None)
    with pytest.raises(ValueError, match=r"layers\[1\].moe.router_carry=True: needs the previous layer"):
        dataclasses.replace(cfg, layers=layers)
    with pytest.raises(ValueError, match="router_carry=True: needs router_hidden"):
        MoESpec(num_experts=2, top_k=1, expert_size=4, router_carry=True).validate("moe")


def test_config_round_trips_through_json(tmp_path):
    cfg = cca_config(kernels=(3, 2), zaya_block=True)
    cfg.save(tmp_path / "c.json")
    back = ModelConfig.load(tmp_path / "c.json")
    assert back == cfg and back.layers[0].cca == CCASpec(conv_kernels=(3, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("groups", [12, 3, 1])  # depthwise, one group per head, dense
@torch.no_grad()
def test_causal_conv_as_shifted_products_equals_conv1d(k, groups, dtype):
    conv = nn.Conv1d(12, 12, k, groups=groups)
    x = torch.randn(2, 12, 9, generator=torch.Generator().manual_seed(k))
    want = conv(x)  # fp32 reference
    got = causal_conv(x.to(dtype), conv.to(dtype))
    assert got.dtype == dtype and got.shape == (2, 12, 10 - k)
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
    conv.float().bias = None
    torch.testing.assert_close(causal_conv(x, conv), conv(x), atol=1e-5, rtol=1e-5)
