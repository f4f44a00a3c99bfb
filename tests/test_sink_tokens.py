"""Sink tokens on sliding-window layers (``GQASpec.sink_tokens``, StreamingLLM: Xiao et al. 2023, arXiv
2309.17453): the model equals an oracle whose attention mask is written out position by position, the sinks reach
past the window, the store holds S + window positions (one view read per decode step), the price counts them, and
bad input is a named error. The contract suite (tests/test_contract.py) runs the gqa example with sink tokens too.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_contract import random_model

import kvlab
from kvlab import kinds
from kvlab.budget import budget
from kvlab.config import GQASpec, LayerSpec, ModelConfig
from kvlab.eval.variant import VariantError, with_window
from kvlab.layers import core
from kvlab.sharing import share_adjacent

W, S = 4, 2


def cfg_with(window: int | None = W, sink_tokens: int = S, layers: int = 3, **kw) -> ModelConfig:
    specs = [LayerSpec(num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=40, window=window,
                       gqa=GQASpec(sink_tokens=sink_tokens), **kw) for _ in range(layers)]
    return ModelConfig(vocab_size=61, hidden_size=32, layers=specs, max_positions=256)


def oracle_mask(n: int, pad: list[int], window: int, sinks: int) -> torch.Tensor:
    """``[B, 1, n, n]`` additive: row b's query q sees key k iff pad_b <= k <= q and (k > q - window or k is one of
    the row's first ``sinks`` real positions); a pad query sees itself. Written out with loops, on purpose."""
    m = torch.full((len(pad), 1, n, n), float("-inf"))
    for b, p in enumerate(pad):
        for q in range(n):
            for k in range(n):
                if (p <= k <= q and (k > q - window or k < p + sinks)) or k == q:
                    m[b, 0, q, k] = 0.0
    return m


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def test_model_equals_an_explicit_mask_oracle(monkeypatch):
    """The sink-token model (full forward and chunked cache) equals the same weights without any window, attending
    through an oracle mask built key by key, on a left-padded batch."""
    model = random_model(cfg_with())
    n, pad = 23, [0, 5]
    ids = torch.randint(0, 61, (2, n), generator=torch.Generator().manual_seed(7))
    am = (torch.arange(n)[None] >= torch.tensor(pad)[:, None]).long()
    got = model(ids, attention_mask=am)
    cache = model.new_cache(2, max_length=n)
    cache.set_padding(torch.tensor(pad))
    inc = torch.cat([model(ids[:, s:s + 3], cache=cache) for s in range(0, 12, 3)]
                    + [model(ids[:, s:s + 1], cache=cache) for s in range(12, n)], 1)
    plain = dataclasses.replace(model.config, layers=[dataclasses.replace(x, window=None, gqa=GQASpec())
                                                      for x in model.config.layers])
    ref_model = kvlab.Model.from_config(plain).eval()
    ref_model.load_state_dict(model.state_dict())
    mask = oracle_mask(n, pad, W, S)
    monkeypatch.setattr(core.Step, "mask", lambda self, kpos, window, sink_tokens=0: (mask, False))
    ref = ref_model(ids, attention_mask=am)
    for b, p in enumerate(pad):
        torch.testing.assert_close(got[b, p:], ref[b, p:], atol=1e-5, rtol=0)
        torch.testing.assert_close(inc[b, p:], ref[b, p:], atol=1e-5, rtol=0)


def test_the_first_tokens_reach_past_the_window():
    """Three layers of window 4 see 9 positions back: the last logits of 24 tokens ignore token 0 without sink
    tokens and depend on it with them."""
    ids = torch.randint(0, 61, (1, 24), generator=torch.Generator().manual_seed(3))
    other = ids.clone()
    other[0, 0] = (other[0, 0] + 1) % 61
    plain, sinks = random_model(cfg_with(sink_tokens=0)), random_model(cfg_with())
    assert (plain(other)[0, -1] - plain(ids)[0, -1]).abs().max() == 0
    assert (sinks(other)[0, -1] - sinks(ids)[0, -1]).abs().max() > 1e-4


def test_a_cache_with_sink_tokens_runs_with_autograd_on():
    """Outside torch.no_grad() (as a user calls a model) a chunked prefill past the window through a sink-token cache
    gives the same logits as under no_grad; it raised "a leaf Variable that requires grad is being used in an
    in-place operation" (found converting Gemma 3 270M with window:512 + sinks)."""
    model = random_model(cfg_with())
    ids = torch.randint(0, 61, (1, 20), generator=torch.Generator().manual_seed(5))
    want = torch.cat([model(ids[:, s:s + 5], cache=c) for c in [model.new_cache(1, 20)] for s in range(0, 20, 5)], 1)
    with torch.enable_grad():
        cache = model.new_cache(1, 20)
        got = torch.cat([model(ids[:, s:s + 5], cache=cache) for s in range(0, 20, 5)], 1)
    assert got.requires_grad
    torch.testing.assert_close(got.detach(), want, atol=1e-6, rtol=0)


def test_store_holds_sinks_and_ring_and_decode_reads_one_view():
    model = random_model(cfg_with())
    cache = model.new_cache(2, max_length=40)
    store = cache.layers[0]
    assert [t.shape[2] for t in store.tensors()] == [S + W, S + W]  # no position held twice
    ids = torch.randint(0, 61, (2, 20))
    model(ids, cache=cache)
    k, v, kpos = store.append(torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8), 20)
    assert k.data_ptr() == store.tensors()[0].data_ptr() and v.data_ptr() == store.tensors()[1].data_ptr()  # views
    assert k.shape[2] == S + W
    assert kpos.tolist() == [0, 1, 18, 19, 20, 17]  # sinks, then the ring: slot (p - S) % W


@pytest.mark.parametrize("kv_quant", [None, "int8-g4-r2", "int4-g4"])
@pytest.mark.parametrize("context", [1, 2, 5, 6, 40])
def test_price_counts_the_sink_positions(context, kv_quant):
    """The calculator stores min(context, window + S) positions per layer (the sinks counted once), the built cache
    holds exactly those bytes, and decode reads and FLOPs and prefill FLOPs (pairs counted from the oracle mask)
    follow."""
    cfg = cfg_with()
    c = kvlab.costs(cfg, context=context, dtype="float32", kv_quant=kv_quant)
    wider = kvlab.costs(cfg_with(window=W + S, sink_tokens=0), context=context, dtype="float32")
    if kv_quant is None:  # the same positions as a window of W + S
        assert c.kv_cache_bytes == wider.kv_cache_bytes
        assert c.per_layer[0].kv_bytes == 2 * 16 * 4 * min(context, W + S)  # 2 kv heads x (8 + 8) dims x fp32
        assert c.per_layer[0].kv_read_bytes == c.per_layer[0].kv_bytes
    pairs = int((oracle_mask(context, [0], W, S) == 0).sum())  # (query, key) pairs a prefill attends
    assert c.per_layer[0].prefill_attn_flops == 2 * 4 * 16 * pairs  # 4 heads x (QK 8 + PV 8) x 2
    assert c.per_layer[0].attn_flops_per_token == 2 * 4 * 16 * min(context, W + S)
    model = random_model(cfg)
    cache = model.new_cache(1, max_length=context, kv_quant=kv_quant)
    model(torch.randint(0, 61, (1, context)), cache=cache)
    assert cache.nbytes() == c.kv_cache_bytes


def test_quantized_sinks_on_a_padded_batch_stay_close():
    """int8 K/V (sinks quantized like the ring) through chunked prefill and decode of a left-padded batch."""
    model = random_model(cfg_with())
    n, pad = 21, torch.tensor([0, 6])
    ids = torch.randint(0, 61, (2, n), generator=torch.Generator().manual_seed(5))
    full = model(ids, attention_mask=(torch.arange(n)[None] >= pad[:, None]).long())
    cache = model.new_cache(2, max_length=n, kv_quant="int8-g4")
    cache.set_padding(pad)
    inc = torch.cat([model(ids[:, s:s + 5], cache=cache) for s in range(0, 15, 5)]
                    + [model(ids[:, s:s + 1], cache=cache) for s in range(15, n)], 1)
    for b, p in enumerate(pad.tolist()):
        err = (inc[b, p:] - full[b, p:]).abs().max()
        assert 0 < err < 0.1


def test_label_budget_and_variant():
    cfg = budget(cfg_with(window=None, sink_tokens=0, layers=4), pattern="1 global : 3 sliding", window=W,
                 sink_tokens=S)
    assert [x.gqa.sink_tokens for x in cfg.layers] == [0, S, S, S]
    assert kinds.layer_label(cfg.layers[1]) == f"window {W} + {S} sink tokens"
    assert kinds.layer_label(cfg.layers[0]) == "full"
    model = random_model(cfg_with(window=None, sink_tokens=0))
    v = with_window(model, W, sink_tokens=S)
    assert [(x.window, x.gqa.sink_tokens) for x in v.config.layers] == [(W, S)] * 3
    assert v.config.name.endswith(f"(window {W} + {S} sink tokens)")
    ids = torch.randint(0, 61, (1, 24))
    ref = kvlab.Model.from_config(cfg_with()).eval()
    ref.load_state_dict(model.state_dict())
    torch.testing.assert_close(v(ids), ref(ids), atol=0, rtol=0)  # same weights, the sink-token config
    assert (v(ids) - model(ids)).abs().max() > 1e-4
    with pytest.raises(VariantError, match=r"sink_tokens=2: needs a window"):
        with_window(model, None, sink_tokens=2)
    with pytest.raises(VariantError, match=r"sink_tokens=-1: must be a non-negative integer"):
        with_window(model, W, sink_tokens=-1)
    with pytest.raises(ValueError, match=r"sink_tokens=-1: expected a non-negative integer"):
        budget(cfg, sink_tokens=-1)


@pytest.mark.parametrize("fields,match", [
    ({"gqa": {"sink_tokens": -1}}, r"layers\[0\]\.gqa\.sink_tokens=-1: must be a non-negative integer"),
    ({"gqa": {"sink_tokens": True}}, r"layers\[0\]\.gqa\.sink_tokens=True: must be an integer"),
    ({"gqa": {"sink_tokens": 2.0}}, r"layers\[0\]\.gqa\.sink_tokens=2\.0: must be an integer"),
    ({"gqa": {"sink_tokens": 4}, "window": None}, r"layers\[0\]\.gqa\.sink_tokens=4: needs a window"),
    ({"gqa": {"sink_tokens": 4}, "attention": "cca", "window": 4},
     r"layers\[0\]\.gqa=GQASpec\(.*sink_tokens=4\): not supported by cca \(an option of gqa\)"),
])
def test_bad_sink_tokens_are_named_errors(fields, match):
    kw = {"num_heads": 4, "num_kv_heads": 2, "head_dim": 8, "intermediate_size": 8, "window": 4, **fields}
    with pytest.raises(ValueError, match=match):
        ModelConfig(vocab_size=11, hidden_size=32, layers=[LayerSpec(**kw)])


def test_a_shared_layer_needs_its_producers_sink_tokens():
    layers = [LayerSpec(num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=8, window=4,
                        gqa=GQASpec(sink_tokens=s)) for s in (2, 0)]
    with pytest.raises(ValueError, match=r"layers\[1\]\.gqa\.sink_tokens=0 differs from layers\[0\]\.gqa\.sink_tokens=2"):
        ModelConfig(vocab_size=11, hidden_size=32, layers=[layers[0], dataclasses.replace(layers[1], kv_source=0)])
    cfg = ModelConfig(vocab_size=11, hidden_size=32, layers=layers)
    with pytest.raises(ValueError, match=r"share_adjacent\(group=2\): .*layers\[1\]\.gqa\.sink_tokens=0 differs"):
        share_adjacent(cfg)


@pytest.mark.parametrize("argv,needle", [
    (["--sink-tokens", "4"], "--sink-tokens 4: only with --variant window=N"),
    (["--variant", "global", "--sink-tokens", "4"], "--sink-tokens 4: only with --variant window=N"),
    (["--variant", "window=512", "--sink-tokens", "-1"], "--sink-tokens -1: must be a non-negative integer"),
])
def test_eval_cli_rejects_sink_tokens_without_a_window(capsys, argv, needle):
    from kvlab.cli import main

    rc = main(["eval", "smollm2-135m", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"kvlab: error: {needle}") and "Traceback" not in err


@pytest.mark.slow
def test_sink_tokens_bring_a_windowed_smollm2_closer_to_itself():
    """On the real SmolLM2-135M (every layer cut to a 128 window, first 512 tokens of the default corpus), keeping 4
    sink tokens lowers the KL divergence from the unmodified model (docs/attention.md measures it at 2K)."""
    from real_models import real_model_path

    from kvlab.eval import kl_divergence, load_corpus
    from kvlab.tokenizer import load_tokenizer

    path = real_model_path("smollm2-135m")
    model = kvlab.load(path).eval()
    ids = load_tokenizer("smollm2-135m").encode(load_corpus().text[:20000], special=False)[:512]
    plain = kl_divergence(model, with_window(model, 128), ids, window=512, chunk=128)
    sinks = kl_divergence(model, with_window(model, 128, sink_tokens=4), ids, window=512, chunk=128)
    assert sinks.mean_kl < plain.mean_kl, (sinks.mean_kl, plain.mean_kl)
