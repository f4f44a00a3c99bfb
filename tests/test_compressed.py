"""CSA / HCA (DeepSeek V4 sequence-compressed attention): causal oracle, prefix and cache consistency, bytes."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from helpers import random_model

import kvlab
from kvlab.config import CompressSpec, LayerSpec, ModelConfig
from kvlab.kinds.compressed import visible_sum
from kvlab.layers import compressed as compressed_mod
from kvlab.layers.compressed import CompressedAttention, rope_tables, rotate_tail
from kvlab.layers.core import Step
from kvlab.layers.rope import rotate_part


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def layer(kind, ratio, window=5, topk=2, sinks=True, rope=None, **kw):
    idx = {"index_heads": 3, "index_head_dim": 12, "index_topk": topk} if kind == "csa" else {}  # csa's indexer
    return LayerSpec(num_heads=4, num_kv_heads=1, head_dim=16, intermediate_size=48, attention=kind, window=window,
                     sinks=sinks, rope=rope or {"theta": 1000.0, "partial": 0.5},
                     compress=CompressSpec(ratio=ratio, q_lora_rank=24, o_groups=2, o_lora_rank=12, **idx), **kw)


def config(layers=None, mhc=None):
    layers = layers or [layer("csa", 3), layer("hca", 4, window=3), layer("swa", 0, window=4),
                        layer("csa", 4, window=1, sinks=False, topk=3)]
    return ModelConfig(vocab_size=61, hidden_size=32, layers=layers, max_positions=256, mhc_streams=mhc)


# -- the oracle: one query at a time, every quantity written out ------------------------------------------------
def rotate(v, pos, inv, scale, sign=1.0):
    """DeepSeek rope: interleaved pairs on the trailing 2 * len(inv) channels of the vector v."""
    out = v.clone()
    base = v.shape[-1] - 2 * len(inv)
    for i, f in enumerate(inv.tolist()):
        cs, sn = math.cos(pos * f) * scale, sign * math.sin(pos * f) * scale
        a, b = v[..., base + 2 * i], v[..., base + 2 * i + 1]
        out[..., base + 2 * i] = a * cs - b * sn
        out[..., base + 2 * i + 1] = b * cs + a * sn
    return out


def pooled_entries(comp, x, ratio, overlap, inv, scale):
    """Every complete block's entry of one sequence x [T, hidden]."""
    d = comp.dim
    kv, gate = comp.kv_proj(x), comp.gate_proj(x)
    entries = []
    for w in range(x.shape[0] // ratio):
        rows = range(w * ratio, (w + 1) * ratio)
        if overlap:
            vals = [kv[j, d:] for j in rows]
            logits = [gate[j, d:] + comp.position_bias[j - w * ratio, d:] for j in rows]
            if w > 0:
                prev = range((w - 1) * ratio, w * ratio)
                vals = [kv[j, :d] for j in prev] + vals
                logits = [gate[j, :d] + comp.position_bias[j - (w - 1) * ratio, :d] for j in prev] + logits
        else:
            vals = [kv[j] for j in rows]
            logits = [gate[j] + comp.position_bias[j - w * ratio] for j in rows]
        weights = torch.stack(logits).softmax(dim=0)  # per channel, over the block's rows
        e = comp.kv_norm((weights * torch.stack(vals)).sum(0))
        entries.append(rotate(e, w * ratio, inv, scale))
    return entries


def naive(att: CompressedAttention, x):
    s, c = att.spec, att.cspec
    h, d, m, win = s.num_heads, s.head_dim, c.ratio, s.window
    inv, scale = att._rope
    out = torch.zeros(x.shape[0], x.shape[1], x.shape[2])
    for b in range(x.shape[0]):
        xs = x[b]
        entries = pooled_entries(att.compressor, xs, m, att.csa, inv, scale) if m else []  # swa: none
        if att.csa:
            ix = att.compressor.indexer
            ikeys = pooled_entries(ix, xs, m, True, inv, scale)
        kv = [rotate(att.kv_norm(att.kv_proj(xs[j])), j, inv, scale) for j in range(xs.shape[0])]
        for t in range(xs.shape[0]):
            cq = att.q_a_norm(att.q_a_proj(xs[t]))
            q = att.q_b_proj(cq).view(h, d)
            q = q / torch.sqrt(q.pow(2).mean(-1, keepdim=True) + att.eps)
            q = rotate(q, t, inv, scale)
            visible = list(range((t + 1) // m)) if m else []
            if att.csa:
                qi = rotate(ix.q_b_proj(cq).view(ix.heads, ix.dim), t, inv, scale)
                u = ix.weights_proj(xs[t]) / math.sqrt(ix.heads)
                score = {w: float(sum(u[k] * torch.relu(qi[k] @ ikeys[w]) / math.sqrt(ix.dim) for k in range(ix.heads)))
                         for w in visible}
                visible = sorted(visible, key=lambda w: (-score[w], w))[:c.index_topk]
            keys = [kv[j] for j in range(max(0, t - win + 1), t + 1)] + [entries[w] for w in visible]
            heads = []
            for k in range(h):
                logits = [float(q[k] @ key) * s.scale for key in keys]
                if s.sinks:
                    logits.append(float(att.sinks[k]))
                p = torch.tensor(logits).softmax(0)
                o = sum(p[i] * keys[i] for i in range(len(keys)))
                heads.append(rotate(o, t, inv, scale, sign=-1.0))
            flat = torch.cat(heads)
            g = c.o_groups
            per = flat.shape[0] // g
            w_a = att.o_a_proj.weight.view(g, -1, per)
            y = torch.cat([w_a[i] @ flat[i * per:(i + 1) * per] for i in range(g)])
            out[b, t] = att.o_b_proj(y)
    return out


@pytest.mark.parametrize("which,ties", [(0, False), (1, False), (2, False), (3, False), (0, True)])
def test_equals_naive_causal_oracle(which, ties):
    """top-k smaller than the completed blocks: kvlab == the per-position oracle (ties: every indexer score
    equal, the earlier entries win); layer 2 is an swa layer (window branch only)."""
    cfg = config()
    model = random_model(cfg, seed=which)
    att = model.layers[which].attn
    if ties:
        att.compressor.indexer.weights_proj.weight.zero_()
    x = torch.randn(2, 23, cfg.hidden_size, generator=torch.Generator().manual_seed(5))
    got = att(x, Step(start=0, qpos=torch.arange(23), pad=None), which)
    torch.testing.assert_close(got, naive(att, x), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dense_topk", [0, 1000])
@pytest.mark.parametrize("which", [0, 1, 2, 3])
def test_query_blocks_of_one_window(which, dense_topk, monkeypatch):
    """A chunk's queries attend in blocks of one window (kvlab.layers.compressed._MIN_BLOCK lowered so the tiny
    windows split a chunk): each block reads only the rows its window reaches (the ring held before the call while
    it can still be seen, then this call's rows from the block's first query less the window); equal to the
    oracle, and a chunked prefill (chunks of 9 after 7: the ring, then a gap to the rows) to the whole forward.
    CSA both ways: each query's chosen entries gathered (``_DENSE_TOPK`` 0) and every entry scored, the top-k a
    mask (1000)."""
    monkeypatch.setattr(compressed_mod, "_MIN_BLOCK", 1)
    monkeypatch.setattr(compressed_mod, "_DENSE_TOPK", dense_topk)
    cfg = config()
    model = random_model(cfg, seed=which)
    att = model.layers[which].attn
    x = torch.randn(2, 23, cfg.hidden_size, generator=torch.Generator().manual_seed(5))
    got = att(x, Step(start=0, qpos=torch.arange(23), pad=None), which)
    torch.testing.assert_close(got, naive(att, x), atol=2e-5, rtol=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (2, 25), generator=torch.Generator().manual_seed(3))
    cache = model.new_cache(2, max_length=25)
    outs = [model(ids[:, a:b], cache=cache) for a, b in ((0, 7), (7, 16), (16, 25))]
    torch.testing.assert_close(torch.cat(outs, 1), model(ids), atol=1e-5, rtol=0)
    pad = torch.tensor([0, 6])  # left-padded rows, chunks of 9: each equals the row alone
    cache = model.new_cache(2, max_length=27)
    cache.set_padding(pad)
    out = torch.cat([model(ids[:, a:a + 9], cache=cache) for a in range(0, 25, 9)], 1)
    for r, p in enumerate(pad.tolist()):
        torch.testing.assert_close(out[r, p:], model(ids[r:r + 1, p:])[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("mhc", [None, 2])
def test_prefix_consistency(mhc):
    cfg = config(mhc=mhc)
    model = random_model(cfg, seed=1)
    ids = torch.randint(0, cfg.vocab_size, (2, 31), generator=torch.Generator().manual_seed(1))
    full = model(ids)
    for n in (1, 2, 3, 4, 7, 12, 13, 30):
        torch.testing.assert_close(model(ids[:, :n]), full[:, :n], atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 5, 8, 12])
@pytest.mark.parametrize("max_length", [40, None])
def test_chunked_prefill_and_decode_equal_full_forward(chunk, max_length):
    """Chunks that divide the ratios (3, 4) and chunks that do not; then token-by-token decode."""
    cfg = config(mhc=2 if chunk == 5 else None)
    model = random_model(cfg, seed=2)
    ids = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(3))
    full = model(ids)
    cache = model.new_cache(2, max_length=max_length)
    outs = [model(ids[:, s:s + chunk], cache=cache) for s in range(0, 24, chunk)]
    outs += [model(ids[:, s:s + 1], cache=cache) for s in range(sum(o.shape[1] for o in outs), 33)]
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=0)


def test_generate_matches_full_forward_argmax():
    cfg = config()
    model = random_model(cfg, seed=4)
    ids = torch.randint(0, cfg.vocab_size, (1, 9), generator=torch.Generator().manual_seed(4))
    out = kvlab.generate(model, ids, max_new_tokens=15, temperature=0.0)
    full = model(out[:, :-1])
    assert torch.equal(full[:, 8:].argmax(-1), out[:, 9:])


@pytest.mark.parametrize("max_length,batch", [(3, 1), (17, 2), (40, 3)])
def test_measured_bytes_equal_calculated_per_component(max_length, batch):
    cfg = config()
    model = random_model(cfg)
    cache = model.new_cache(batch, max_length=max_length)
    ids = torch.randint(0, cfg.vocab_size, (batch, max_length))
    model(ids[:, :max_length - 1], cache=cache)
    model(ids[:, max_length - 1:], cache=cache)
    c = kvlab.costs(cfg, context=max_length, dtype=torch.float32, batch=batch)
    assert cache.nbytes() == c.kv_cache_bytes
    assert cache.per_layer_nbytes() == [lc.kv_bytes for lc in c.per_layer]
    for store, lc in zip(cache.layers, c.per_layer):
        assert store.components() == lc.kv_components
    assert c.params_total == model.num_parameters()


def test_bytes_by_hand_bf16():
    cfg = config()
    model = random_model(cfg).to(torch.bfloat16)
    cache = model.new_cache(1, max_length=64)
    model(torch.randint(0, 61, (1, 64)), cache=cache)
    # csa ratio 3, window 5: ring 5x16, 21 entries x 16, partial 2 x (2 rows x 32), overlap 2 x (3 x 16),
    # indexer 21 x 12, partial 2 x (2 x 24), overlap 2 x (3 x 12)
    first = 5 * 16 + 21 * 16 + 2 * 2 * 32 + 2 * 3 * 16 + 21 * 12 + 2 * 2 * 24 + 2 * 3 * 12
    assert cache.per_layer_nbytes()[0] == 2 * first
    hca = 3 * 16 + 16 * 16 + 2 * 3 * 16  # ring 3, 16 entries, partial 3 rows of K/V and gate
    assert cache.per_layer_nbytes()[1] == 2 * hca
    assert cache.nbytes() == kvlab.costs(cfg, context=64, dtype="bf16").kv_cache_bytes


def test_prefill_cost_is_linear_for_fixed_topk():
    cfg = config([layer("csa", 4, window=8, topk=4)])
    f = [kvlab.costs(cfg, context=n).per_layer[0].prefill_attn_flops for n in (4096, 8192)]
    spec = cfg.layers[0]
    main = [4 * spec.num_heads * spec.head_dim * (n * 8 - 28 + visible_sum(n, 4, 4)) for n in (4096, 8192)]
    assert main[1] < 2.01 * main[0]  # window and top-k terms are linear; the indexer scores are not
    assert f[1] > main[1]
    assert visible_sum(10, 3) == sum((p + 1) // 3 for p in range(10))
    assert visible_sum(50, 4, 5) == sum(min(5, (p + 1) // 4) for p in range(50))


@pytest.mark.parametrize("chunk", [None, 1, 3, 5])
def test_left_padded_rows_equal_rows_alone(chunk):
    """Each padded row compresses its own tokens (blocks aligned to its first token), cached or not."""
    cfg = config(mhc=2 if chunk == 3 else None)
    model = random_model(cfg, seed=7)
    ids = torch.randint(0, cfg.vocab_size, (3, 21), generator=torch.Generator().manual_seed(7))
    pad = torch.tensor([0, 5, 10])
    mask = (torch.arange(21)[None] >= pad[:, None]).long()
    if chunk is None:
        out = model(ids, attention_mask=mask)
    else:
        cache = model.new_cache(3, max_length=24)
        cache.set_padding(pad)
        out = torch.cat([model(ids[:, s:s + chunk], cache=cache) for s in range(0, 21, chunk)], 1)
    assert torch.isfinite(out).all()
    for r, p in enumerate(pad.tolist()):
        torch.testing.assert_close(out[r, p:], model(ids[r:r + 1, p:])[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kv_quant", [None, "int8", "int4-g4"])
def test_left_padded_prefill_runs_every_row_at_once(kv_quant):
    """A left-padded prefill compresses all rows in one pass (each compressor projects the batch once per call, not
    once per row), chunks ending mid-block at different points per row; with a quantized cache too (entries written
    at each row's own blocks), the padded rows equal the rows alone."""
    cfg = config()
    model = random_model(cfg, seed=3)
    ids = torch.randint(0, cfg.vocab_size, (4, 19), generator=torch.Generator().manual_seed(3))
    pad = torch.tensor([0, 2, 7, 13])
    calls = []
    for mod in model.modules():
        if isinstance(mod, CompressedAttention) and mod.compressor is not None:
            mod.compressor.kv_proj.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    cache = model.new_cache(4, max_length=24, kv_quant=kv_quant)
    cache.set_padding(pad)
    chunks = [0, 5, 9, 19]
    out = torch.cat([model(ids[:, a:b], cache=cache) for a, b in itertools.pairwise(chunks)], 1)
    compressors = sum(isinstance(m, CompressedAttention) and m.compressor is not None for m in model.modules())
    assert calls == [4] * compressors * (len(chunks) - 1)  # the whole batch, once per layer and call
    assert torch.isfinite(out).all()
    for r, p in enumerate(pad.tolist()):  # the row alone, cut where the batch was (a quantized cache reads earlier
        alone = model.new_cache(1, max_length=24, kv_quant=kv_quant)  # calls' positions quantized, its own exact)
        cuts = sorted({max(0, c - p) for c in chunks})
        want = torch.cat([model(ids[r:r + 1, p + a:p + b], cache=alone) for a, b in itertools.pairwise(cuts)], 1)[0]
        torch.testing.assert_close(out[r, p:], want, atol=1e-5, rtol=0)


def test_validation():
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig(vocab_size=11, hidden_size=32, layers=[dict(layer("csa", 4).__dict__, num_kv_heads=2)])
    with pytest.raises(ValueError, match="compress"):
        ModelConfig(vocab_size=11, hidden_size=32, layers=[dict(layer("hca", 4).__dict__, compress=None)])
    with pytest.raises(ValueError, match="window"):
        ModelConfig(vocab_size=11, hidden_size=32, layers=[dict(layer("hca", 4).__dict__, window=None)])
    with pytest.raises(ValueError, match="index_topk"):
        ModelConfig(vocab_size=11, hidden_size=32, layers=[layer("csa", 4, topk=0)])
    cfg = config()
    assert ModelConfig.from_dict(cfg.to_dict()).layers[0].compress == cfg.layers[0].compress


# -- parity with transformers' DeepseekV4Attention where the reference is self-consistent -----------------------
@pytest.mark.parametrize("kind,topk", [("csa", 64), ("hca", 64), ("csa", 2)])
def test_module_parity_with_transformers(kind, topk):
    """top-k covering every block; and (csa, 2) below the completed blocks, where transformers 5.23.0's module is
    causal too in this sample (no tied indexer scores)."""
    from transformers.models.deepseek_v4.configuration_deepseek_v4 import DeepseekV4Config
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4Attention, DeepseekV4RotaryEmbedding

    lt = {"csa": "compressed_sparse_attention", "hca": "heavily_compressed_attention"}[kind]
    hf = DeepseekV4Config(hidden_size=32, num_attention_heads=4, num_key_value_heads=1, head_dim=16, q_lora_rank=24,
                          o_groups=2, o_lora_rank=12, sliding_window=5, index_n_heads=3, index_head_dim=12,
                          index_topk=topk, partial_rotary_factor=0.5, rope_theta=1000.0, compress_rope_theta=5000.0,
                          compress_rates={"compressed_sparse_attention": 3, "heavily_compressed_attention": 4},
                          num_hidden_layers=1, layer_types=[lt], mlp_layer_types=["moe"], rms_norm_eps=1e-6,
                          vocab_size=61)
    hf._attn_implementation = "eager"
    ref = DeepseekV4Attention(hf, 0).eval()
    g = torch.Generator().manual_seed(0)
    for p in ref.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    spec = layer(kind, 3 if kind == "csa" else 4, topk=topk, rope={"theta": 5000.0, "partial": 0.5})
    ours = CompressedAttention(spec, 32)
    sd = {k.replace("indexer.scorer.", "indexer."): v for k, v in ref.state_dict().items()}
    ours.load_state_dict(sd)
    t = 22
    x = torch.randn(2, t, 32, generator=g)
    pos = torch.arange(t)[None]
    rot = DeepseekV4RotaryEmbedding(hf)
    pe = {k: rot(x, position_ids=pos, layer_type=k) for k in ("main", "compress")}
    i, j = torch.arange(t)[:, None], torch.arange(t)[None]
    mask = torch.zeros(2, 1, t, t).masked_fill(~((j <= i) & (j > i - 5)), float("-inf"))
    expect, _ = ref(x, position_embeddings=pe, position_ids=pos, attention_mask=mask)
    got = ours(x, Step(start=0, qpos=torch.arange(t), pad=None), 0)
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-4)


def test_bf16_runs_and_decode_tracks_full_forward():
    cfg = config(mhc=2)
    model = random_model(cfg, seed=6).to(torch.bfloat16)
    ids = torch.randint(0, cfg.vocab_size, (1, 20), generator=torch.Generator().manual_seed(6))
    full = model(ids).float()
    cache = model.new_cache(1, max_length=20)
    inc = torch.cat([model(ids[:, :7], cache=cache)] + [model(ids[:, s:s + 1], cache=cache) for s in range(7, 20)], 1)
    assert torch.isfinite(full).all()
    torch.testing.assert_close(inc.float(), full, atol=0.1, rtol=0.05)


def test_calc_table_shows_components_and_mhc(capsys, tmp_path):
    from kvlab.cli import main

    path = tmp_path / "v4tiny.json"
    config(mhc=2).save(path)
    assert main(["calc", str(path), "--context", "128"]) == 0
    text = capsys.readouterr().out
    for row in ("parameters, mHC maps (fp32)", "compressed (csa/hca)", "index keys (csa)", "of which mHC"):
        assert row in text


@pytest.mark.parametrize("preset", ["deepseek-v4-flash", "deepseek-v4-pro", "deepseek-v3.2"])
@pytest.mark.parametrize("context", [100, 131072, 1048576])
def test_components_add_up(preset, context):
    """Per-component KV bytes and decode attention FLOPs sum to the totals (what `kvlab calc` breaks down)."""
    c = kvlab.costs(preset, context=context)
    assert sum(c.kv_components.values()) == c.kv_cache_bytes
    assert sum(c.attn_flops_components.values()) == c.attn_flops_per_token
    for lc in c.per_layer:
        assert sum(lc.attn_flop_components.values()) == lc.attn_flops_per_token


def test_compare_shows_components_and_flops_fraction(capsys):
    """`kvlab compare deepseek-v3.2 deepseek-v4-pro --context 1m`: V4's FLOPs as a fraction of V3.2's, and where the
    bytes and attention FLOPs of each go."""
    from kvlab.cli import main

    assert main(["compare", "deepseek-v3.2", "deepseek-v4-pro", "--context", "128k,1m"]) == 0
    text = capsys.readouterr().out
    ref, v4 = kvlab.costs("deepseek-v3.2", context=1048576), kvlab.costs("deepseek-v4-pro", context=1048576)
    assert f"({100 * v4.flops_per_token / ref.flops_per_token:.1f}%)" in text
    for row in ("KV: c_kv", "KV: index_keys", "attn FLOPs: indexer", "KV: compressed", "attn FLOPs: window"):
        assert row in text


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotate_tail_is_the_real_rotation(dtype):
    """The eager complex form of the trailing interleaved rotation against the real one (``rotate_part``, what compiled
    steps use): equal to the bit on a strided [B, H, T, D] view, forwards and back (the conjugate table)."""
    g = torch.Generator().manual_seed(0)
    inv = 1.0 / (10000 ** (torch.arange(0, 64, 2).float() / 64))
    cos, sin = rope_tables(inv, 1.3, torch.tensor([0, 7, 5000]))
    x = torch.randn(2, 3, 8, 128, generator=g).transpose(1, 2).to(dtype)  # [2, 8, 3, 128], not contiguous
    for s in (sin, -sin):
        want = rotate_part(x, cos, s, "interleaved", at="tail", dtype=torch.float32)
        got = rotate_tail(x, torch.complex(cos, s))
        assert got.dtype == dtype
        assert torch.equal(got, want)
        mine = x.clone()
        assert torch.equal(rotate_tail(mine, torch.complex(cos, s), in_place=True), want)
        assert torch.equal(mine, want) == (dtype == torch.float32)  # fp32: rotated where it lies


@pytest.mark.parametrize("kv_quant", [None, "int8", {"*": "int8", "compressed": "int4-g4-r2", "index_keys": "int4-g4-r3"}],
                         ids=["plain", "int8", "int4-residual"])
def test_eager_compressor_steps_equal_the_masked_step(kv_quant, monkeypatch):
    """An eager decode step without padding branches on its position: a token that does not complete its block only
    joins the partial block, one that does is pooled and stored without masks. Against the masked step every row
    takes otherwise (what a compiled step runs), over 20 steps crossing block ends of ratios 3 and 4: the same
    logits to the bit, plain, int8 and int4 with a residual window."""
    from kvlab.layers.compressed import Compressor

    cfg = config()
    model = random_model(cfg, seed=5)
    ids = torch.randint(0, cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(5))

    def decode(masked: bool) -> torch.Tensor:
        cache = model.new_cache(2, max_length=32, kv_quant=kv_quant)
        logits = [model(ids, cache=cache)[:, -1:]]
        with monkeypatch.context() as m:
            if masked:
                step = Compressor.step
                m.setattr(Compressor, "step", lambda self, x, pos, ps, rope, n, start=None:
                          step(self, x, pos, ps, rope, n, None))
            for _ in range(20):
                logits.append(model.decode_step(logits[-1].argmax(-1), cache))
        return torch.cat(logits, 1)

    assert torch.equal(decode(False), decode(True))


@pytest.mark.parametrize("n", [40, 3000])
def test_stable_topk_takes_the_earlier_of_tied_scores(n):
    """Both forms of ``stable_topk`` (a stable sort for short rows, the threshold for long ones) against the
    definition row by row: the k best by (score descending, index ascending), returned in index order; rows full of
    ties (zeros and -inf, as relu'd and masked indexer scores) and rows without."""
    from kvlab.layers.core import SORT_TOPK_MAX, stable_topk

    assert (n <= SORT_TOPK_MAX) == (n == 40)
    gen = torch.Generator().manual_seed(n)
    scores = torch.relu(torch.randn(3, 4, n, generator=gen)).round(decimals=1)
    scores[0, 1, n // 2:] = float("-inf")
    scores[1] = torch.randn(4, n, generator=gen)
    for k in (1, 7, n // 2 + 3):
        val, idx = stable_topk(scores, k)
        for row, v, i in zip(scores.reshape(-1, n).tolist(), val.reshape(-1, k), idx.reshape(-1, k), strict=True):
            best = sorted(sorted(range(n), key=lambda j: (-row[j], j))[:k])
            assert i.tolist() == best
            assert v.tolist() == [row[j] for j in best]
