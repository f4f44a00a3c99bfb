"""kvlab fit: the inverse of the calculator (exact at the boundary), TP replication, engine rules, the roofline,
published cross-checks with their assumptions stated, and the CLI."""

from __future__ import annotations

import json

import pytest

from kvlab.cli import main
from kvlab.config import CCASpec, ModelConfig, uniform_layers
from kvlab.costs import costs
from kvlab.engines import VLLM, LlamaCpp, SGLang, Transformers, get_engine
from kvlab.fit import FitError, fit, fit_table, footprint
from kvlab.hardware import HARDWARE, Hardware, get_hardware, roofline
from kvlab.presets import get_preset
from kvlab.units import parse_memory

GiB = 1024**3


def tiny(n: int = 6, windows: tuple = (None, 64, 64), kv: int = 2, hd: int = 32, max_positions: int = 8192,
         **kw) -> ModelConfig:
    layers = uniform_layers(n, num_heads=4, num_kv_heads=kv, head_dim=hd, intermediate_size=256, **kw)
    for i, x in enumerate(layers):
        x.window = windows[i % len(windows)]
    return ModelConfig(vocab_size=1000, hidden_size=128, max_positions=max_positions, layers=layers, name="tiny")


# -- memory sizes --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("80GiB", 80 * GiB), ("80G", 80 * GiB), ("80gi", 80 * GiB), ("24GB", 24 * 10**9), ("512MiB", 512 * 1024**2),
    ("1.5TiB", int(1.5 * 1024**4)), ("141 GB", 141 * 10**9), ("123", 123), (4096, 4096)])
def test_memory_sizes_binary_with_i_or_bare_prefix_decimal_with_b(text, expected) -> None:
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["80XB", "", "abc", "80iB", "-1G", "0", "1,5G", True])
def test_bad_memory_size_is_a_named_error(text) -> None:
    with pytest.raises(ValueError, match="memory size"):
        parse_memory(text)


# -- the inverse of the calculator, exact at the boundary ------------------------------------------------------------

@pytest.mark.parametrize(("model", "engine", "tp", "memory"), [
    ("llama-3.1-8b", None, 1, 24 * GiB), ("gemma-4-31b", None, 1, 64 * GiB), ("gemma-4-31b", "vllm", 1, 80 * GiB),
    ("gemma-4-e2b", "llamacpp", 1, 9 * GiB), ("zaya1-8b", None, 1, 17 * GiB), ("qwen3-8b", "sglang", 2, 12 * GiB),
    ("deepseek-v3", None, 8, 160 * GiB), ("deepseek-v4-flash", "transformers", 4, 141 * GiB),
    ("deepseek-v4-flash", "llamacpp", 4, 141 * GiB), ("deepseek-v4-flash", "sglang", 4, 141 * GiB)])
def test_largest_context_is_exact_one_more_token_does_not_fit(model, engine, tp, memory) -> None:
    r = fit(model, memory, batch=2, engine=engine, tp=tp)
    assert r.limited_by == "memory" and r.value > 0
    # recomputed from scratch, not read back from the result
    here = footprint(model, r.value, 2, tp=tp, engine=engine)
    after = footprint(model, r.value + 1, 2, tp=tp, engine=engine)
    assert here.total_bytes <= r.usable < after.total_bytes
    assert r.next.context == r.value + 1 and r.next.total_bytes == after.total_bytes


@pytest.mark.parametrize(("model", "engine", "tp", "memory"), [
    ("llama-3.1-8b", None, 1, 80 * GiB), ("gemma-4-31b", "vllm", 1, 80 * GiB), ("gemma-4-e4b", "sglang", 1, 80 * GiB),
    ("laguna-xs.2", "llamacpp", 1, 80 * GiB), ("deepseek-v4-flash", "llamacpp", 4, 141 * GiB),
    ("deepseek-v4-flash", "sglang", 4, 141 * GiB)])
def test_largest_batch_is_exact_one_more_sequence_does_not_fit(model, engine, tp, memory) -> None:
    r = fit(model, memory, context=8192, engine=engine, tp=tp)
    assert r.solve == "batch" and r.value >= 1
    assert footprint(model, 8192, r.value, engine=engine, tp=tp).total_bytes <= r.usable
    assert footprint(model, 8192, r.value + 1, engine=engine, tp=tp).total_bytes > r.usable


def test_llama_fit_matches_the_hand_formula() -> None:
    # weights 2 B/param, K/V 131,072 B/token (32 layers x 8 KV heads x 128 x 2 x 2 B): the largest context is
    # floor((memory - weights - workspace) / 131072) once the workspace stops growing (context >= chunk)
    c = costs("llama-3.1-8b", context=4096)
    ws = footprint("llama-3.1-8b", 4096).workspace_bytes
    memory = 24 * GiB
    r = fit("llama-3.1-8b", memory, batch=1)
    assert r.value == (memory - 2 * c.params_total - ws) // 131072
    assert r.fits.kv_bytes == 131072 * r.value


def test_whole_max_positions_fits_and_nothing_fits_are_reported() -> None:
    r = fit("llama-3.1-8b", 141 * GiB)
    assert r.limited_by == "max_positions" and r.value == 131072 and r.next is None
    r = fit("deepseek-v3", 80 * GiB)  # 671B params in bf16 do not fit one device
    assert r.value == 0 and r.fits is None and r.next.total_bytes > r.usable


def test_fit_table_is_monotone_in_memory() -> None:
    rs = fit_table("gemma-4-31b", batch=1)
    assert [r.memory for r in rs] == [24 * GiB, 48 * GiB, 80 * GiB, 141 * GiB]
    values = [r.value for r in rs]
    assert values == sorted(values) and values[0] == 0 and values[-1] == 262144


def test_state_is_listed_apart_and_kv_components_sum() -> None:
    fp = footprint("deepseek-v4-flash", 65536)
    c = costs("deepseek-v4-flash", context=65536)
    assert fp.state_bytes == c.kv_state_bytes > 0
    assert fp.kv_bytes + fp.state_bytes == c.kv_cache_bytes == sum(fp.kv_components.values())
    z = footprint("zaya1-8b", 4096, batch=3)
    assert z.state_bytes == costs("zaya1-8b", context=4096, batch=3).kv_state_bytes == 3 * 40 * 5376


@pytest.mark.parametrize(("model", "fmt", "engine", "memory"), [
    ("llama-3.1-8b", "int8", None, 20 * GiB), ("llama-3.1-8b", "int4-g32-r128", "vllm", 20 * GiB),
    ("gemma-4-31b", "int4-g64-kc-asym-r64", None, 60 * GiB), ("zaya1-8b", "fp8-g32", None, 17 * GiB),
    ("deepseek-v3", "int8-g64", None, 1260 * GiB), ("qwen3-8b", "fp4-g16-rot", "sglang", 18 * GiB),
    ("deepseek-v4-flash", "deepseek-v4", None, 535 * GiB)])
def test_quantized_kv_fit_is_exact_one_more_token_does_not_fit(model, fmt, engine, memory) -> None:
    """Quantized formats priced with their scales, zero points, residual window and padding (kvlab/costs/quant.py):
    the boundary is exact, and the K/V held is what the calculator prices for that format."""
    r = fit(model, memory, batch=2, kv_quant=fmt, engine=engine)
    assert r.limited_by == "memory" and r.value > 0 and r.kv_quant != "none"
    here = footprint(model, r.value, 2, kv_quant=fmt, engine=engine)
    after = footprint(model, r.value + 1, 2, kv_quant=fmt, engine=engine)
    assert here.total_bytes <= r.usable < after.total_bytes
    q = costs(model, context=r.value, batch=2, kv_quant=fmt)
    assert here.kv_bytes + here.state_bytes == q.kv_cache_bytes < costs(model, context=r.value, batch=2).kv_cache_bytes
    assert r.value > fit(model, memory, batch=2, engine=engine).value  # a smaller cache: a longer context


def test_int8_kv_fit_matches_the_hand_formula() -> None:
    # int8 codes + one bf16 scale per group of 32 values: 131,072 x (1 + 2/32) / 2 = 69,632 B/token for Llama-3.1-8B
    c = costs("llama-3.1-8b", context=4096)
    ws = footprint("llama-3.1-8b", 4096).workspace_bytes
    memory = 16 * GiB
    r = fit("llama-3.1-8b", memory, kv_quant="int8-g32")
    assert r.value == (memory - 2 * c.params_total - ws) // 69632 and r.fits.kv_bytes == 69632 * r.value
    assert "quantized as int8-g32" in " ".join(r.assumptions)


def test_cli_fit_takes_a_kv_format(capsys) -> None:
    assert main(["fit", "llama-3.1-8b", "--memory", "16GiB", "--kv-quant", "int8", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["fit"]["kv_quant"] == "int8-g32" and d["fit"]["value"] == fit("llama-3.1-8b", 16 * GiB, kv_quant="int8").value
    assert main(["fit", "llama-3.1-8b", "--memory", "16GiB", "--kv-dtype", "int8", "--json"]) == 0  # as calc reads it
    assert json.loads(capsys.readouterr().out)["fit"]["value"] == d["fit"]["value"]
    assert main(["fit", "llama-3.1-8b", "--memory", "16GiB", "--kv-quant", "int4-g7"]) == 2
    assert "kvlab: error: " in capsys.readouterr().err


def test_fp8_weights_halve_the_weights_and_kv_dtype_is_separate() -> None:
    a = footprint("qwen3-8b", 4096, weights_dtype="bf16")
    b = footprint("qwen3-8b", 4096, weights_dtype="fp8", kv_dtype="bf16")
    assert b.weights_bytes * 2 == a.weights_bytes and b.kv_bytes == a.kv_bytes


def test_bad_questions_are_named_errors() -> None:
    with pytest.raises(FitError, match="not both"):
        fit("llama-3.1-8b", GiB, batch=1, context=10)
    with pytest.raises(FitError, match="batch=0"):
        fit("llama-3.1-8b", GiB, batch=0)
    with pytest.raises(ValueError, match="engine='vlm'"):
        fit("llama-3.1-8b", GiB, engine="vlm")


# -- tensor parallelism ----------------------------------------------------------------------------------------------

def test_tp_splits_kv_heads_then_replicates_them() -> None:
    one = footprint("llama-3.1-8b", 8192)  # 8 KV heads on every layer
    two = footprint("llama-3.1-8b", 8192, tp=2)
    sixteen = footprint("llama-3.1-8b", 8192, tp=16)
    assert two.kv_bytes * 2 == one.kv_bytes and not two.replication
    assert sixteen.kv_bytes * 8 == one.kv_bytes  # one KV head per device, each on 2 devices
    assert sixteen.replication == ["layers 0-31: fewer KV heads than tp=16: each KV head stored on 2 devices"]
    assert two.weights_bytes == -(-one.weights_bytes // 2)
    with pytest.raises(FitError, match="tp=3"):
        footprint("llama-3.1-8b", 8192, tp=3)


@pytest.mark.parametrize("model", ["deepseek-v3", "deepseek-v4-flash"])
def test_tp_replicates_mla_and_compressed_latents_on_every_device(model) -> None:
    one = footprint(model, 8192)
    eight = footprint(model, 8192, tp=8)
    assert eight.kv_bytes == one.kv_bytes and eight.state_bytes == one.state_bytes
    assert "replicated on all 8 devices" in eight.replication[0]


# -- engines ---------------------------------------------------------------------------------------------------------

def test_vllm_full_attention_reserves_whole_pages() -> None:
    c = costs("llama-3.1-8b", context=1000)
    assert VLLM().reserve(None, c, 1000, 3).kv_bytes == 3 * 1008 * 131072  # cdiv(1000, 16) pages of 16 tokens
    assert VLLM().reserve(None, c, 1024, 1).kv_bytes == 1024 * 131072


def test_vllm_hybrid_groups_pad_and_charge_sliding_layers_their_window_plus_batched_tokens() -> None:
    # 2 full + 4 sliding layers, one per-token size: groups of 2 layers (1 full, 2 sliding), page 16 tokens
    cfg = tiny(6, windows=(None, 64, 64))
    per_tok = 2 * 2 * 32 * 2  # kv heads x (K + V) x head_dim x 2 B
    eng = VLLM(max_num_batched_tokens=32)
    for n in (10, 100, 1000):
        c = costs(cfg, context=n)
        full_pages = -(-n // 16)
        sw_pages = -(-min(64 - 1 + 32, n) // 16) + 1
        assert eng.reserve(cfg, c, n, 1).kv_bytes == 2 * 16 * per_tok * (full_pages + 2 * sw_pages)
    # 1 full + 5 sliding: group size 1, every layer its own group, no padding
    cfg5 = tiny(6, windows=(None, 64, 64, 64, 64, 64))
    c5 = costs(cfg5, context=1000)
    assert eng.reserve(cfg5, c5, 1000, 1).kv_bytes == 16 * per_tok * (63 + 5 * (-(-95 // 16) + 1))


def test_vllm_unifies_page_sizes_by_scaling_block_size() -> None:
    # full layers with head_dim 64, sliding with 32: the sliding page is half, so its block holds 32 tokens
    cfg = tiny(2, windows=(None, 64))
    cfg.layers[0].head_dim = 64
    c = costs(cfg, context=1000)
    full_tok = 2 * 2 * 64 * 2  # sliding layers: half of it per token
    page = 16 * full_tok
    eng = VLLM(max_num_batched_tokens=32)
    assert eng.reserve(cfg, c, 1000, 1).kv_bytes == page * (-(-1000 // 16) + (-(-95 // 32) + 1))
    assert eng.bytes_per_token_logged(c) == page * 1 * 2 / 16  # 2 groups of 1 layer, min block 16
    cfg.layers[0].head_dim = 48  # 3:2 pages: vLLM cannot unify them
    with pytest.raises(ValueError, match="does not divide"):
        VLLM().reserve(cfg, costs(cfg, context=100), 100, 1)


def test_vllm_deepseek_v4_pages_are_fp8_ds_mla_entries_padded_to_576_bytes() -> None:
    """V4 in vLLM: 584-B entries (448 fp8 + 64 bf16 rotary + 7 scales + 1 pad) whatever the K/V dtype; compressed
    and indexer pages of 256 tokens hold 256 / ratio entries (132-B indexer keys), padded to a multiple of 576 B;
    window pages of 64 tokens under the sliding-window rule; the compressor state at kvlab's physical bytes."""
    cfg = get_engine("vllm")
    n, batch = 65536, 2
    c = costs("deepseek-v4-flash", context=n, batch=batch)
    kinds = [x.kind.split()[0] for x in c.per_layer]
    assert (kinds.count("swa"), kinds.count("csa"), kinds.count("hca")) == (2, 21, 20)  # the published schedule

    def up(b: int) -> int:
        return -(-b // 576) * 576

    window = (-(-min(128 - 1 + 8192, n) // 64) + 1) * up(64 * 584)  # 131 pages of 37,440 B
    csa = (n // 256) * (up(256 // 4 * 584) + up(256 // 4 * 132))
    hca = (n // 256) * up(256 // 128 * 584)  # 2 entries: 1,168 B padded to 1,728
    per_request = 43 * window + 21 * csa + 20 * hca
    state = sum(x.kv_state_bytes for x in c.per_layer)
    from kvlab.presets import get_preset

    got = cfg.reserve(get_preset("deepseek-v4-flash"), c, n, batch).kv_bytes
    assert got == batch * per_request + state
    fp32 = costs("deepseek-v4-flash", context=n, batch=batch, dtype="float32")  # entries stay fp8_ds_mla
    assert cfg.reserve(get_preset("deepseek-v4-flash"), fp32, n, batch).kv_bytes == got - state + 2 * state


def test_vllm_cca_state_takes_one_attention_page_and_raises_the_block_size_when_needed() -> None:
    z = costs("zaya1-8b", context=1000, batch=3)  # 2 KV heads x 128 x (K+V) x 2 B = 1,024 B/token, state 5,376 B
    per_seq_state = z.per_layer[0].kv_state_bytes // 3
    assert z.per_layer[0].kv_bytes_per_token == 1024 and per_seq_state <= 16 * 1024
    assert VLLM().reserve(None, z, 1000, 3).kv_bytes == 3 * 40 * 16384 * (-(-1000 // 16) + 1)
    cfg = tiny(2, windows=(None,), kv=1, hd=16, attention="cca", cca=CCASpec(conv_kernels=(8, 8)))
    c = costs(cfg, context=300)
    per_tok, state = c.per_layer[0].kv_bytes_per_token, c.per_layer[0].kv_state_bytes
    assert state > 16 * per_tok  # a page of 16 tokens cannot hold the state: the block grows
    bs = 16 * -(-state // (16 * per_tok))
    assert VLLM().reserve(cfg, c, 300, 1).kv_bytes == 2 * bs * per_tok * (-(-300 // bs) + 1)
    assert f"block_size raised to {bs}" in VLLM().reserve(cfg, c, 300, 1).details[0]


def test_sglang_names_the_kinds_it_charges_physically() -> None:
    text = " ".join(get_engine("sglang").rules)
    assert "models/zaya.py" in text and "charged kvlab's physical bytes" in text
    z = costs("zaya1-8b", context=4096, batch=2)
    assert SGLang().reserve(get_preset("zaya1-8b"), z, 4096, 2).kv_bytes == z.kv_cache_bytes


@pytest.mark.parametrize(("n", "batch"), [(4096, 1), (65536, 2), (100, 3)])
def test_sglang_deepseek_v4_pools_are_priced_per_full_token_as_its_configurator_does(n, batch) -> None:
    """SGLang's DSV4PoolConfigurator by hand for V4-Flash (43 layers: 21 CSA, 20 HCA; swa_full_tokens_ratio 0.8):
    per full token 0.8 x 584 B x 43 (SWA pool) + 584/4 x 21 (CSA) + 584/128 x 20 (HCA) + 132/4 x 21 (indexer keys)
    + 0.8 x 8/128 x (8,192 + 2,048) x 21 (CSA compressor rings, fp32) = 34,691.85 B; F = batch x pages of 256
    tokens (and enough for the SWA pool to hold batch x min(N, 128)); plus the HCA state for batch + 1 slots."""
    from fractions import Fraction

    cfg = get_preset("deepseek-v4-flash")
    c = costs(cfg, context=n, batch=batch)
    r = Fraction(4, 5)
    per_token = (r * 584 * 43 + Fraction(584, 4) * 21 + Fraction(584, 128) * 20 + Fraction(132, 4) * 21
                 + r * Fraction(8, 128) * (8192 + 2048) * 21)
    assert float(per_token) == 34691.85
    full = batch * -(-n // 256) * 256
    assert int(full * 0.8) // 256 * 256 >= batch * min(n, 128)  # the SWA pool holds the windows at these shapes
    c128 = -(-((batch + 1) * 128 + 129) // 128) * 128 * 2 * 512 * 4 * 20
    expected = -(-full * per_token.numerator // per_token.denominator) + c128
    assert SGLang().reserve(cfg, c, n, batch).kv_bytes == expected


def _pad256(n: int) -> int:
    return -(-n // 256) * 256


@pytest.mark.parametrize(("n", "batch"), [(4096, 1), (65536, 2), (1000, 3)])
def test_llamacpp_deepseek_v4_keeps_a_stream_per_sequence_sized_for_n_ctx_seq(n, batch) -> None:
    """llama.cpp's V4 cache (src/llama-kv-cache-dsv4.cpp), by hand for V4-Flash (head_dim 512, 1 KV head, window
    128, indexer keys of 128, f16 = 2 B like bf16): with kv_unified every sequence's stream is sized for the whole
    n_ctx; window 768 cells (pad256(128 + n_ubatch 512)), CSA/indexer pad256(n_ctx / 4), HCA pad256(n_ctx / 128)
    cells, and fp32 compressor states (CSA 8 rows x 1,024 + its indexer 8 x 256, HCA 128 x 512; kv and score)."""
    cfg = get_preset("deepseek-v4-flash")
    c = costs(cfg, context=n, batch=batch)
    n_ctx = _pad256(batch * n)
    window = _pad256(min(n_ctx, 128 + 512)) * 512 * 2
    csa = _pad256(-(-n_ctx // 4)) * (512 + 128) * 2 + 2 * 8 * (1024 + 256) * 4
    hca = _pad256(-(-n_ctx // 128)) * 512 * 2 + 2 * 128 * 512 * 4
    per_seq = 43 * window + 21 * csa + 20 * hca  # 2 swa + 21 csa + 20 hca layers, every one with a window
    assert LlamaCpp().reserve(cfg, c, n, batch).kv_bytes == batch * per_seq
    # one stream per sequence (llama-server -np B): each stream sized for pad256(n_ctx / batch) only
    n_seq = _pad256(n_ctx // batch)
    per_seq = 43 * _pad256(min(n_seq, 640)) * 1024 + 21 * (_pad256(-(-n_seq // 4)) * 1280 + 81920) + 20 * (
        _pad256(-(-n_seq // 128)) * 1024 + 524288)
    assert LlamaCpp(kv_unified=False).reserve(cfg, c, n, batch).kv_bytes == batch * per_seq


def test_llamacpp_non_unified_gives_each_sequence_its_own_stream() -> None:
    cfg = tiny(3, windows=(None, 64, 64))
    per_tok = 2 * 2 * 32 * 2
    c = costs(cfg, context=1000, batch=2)
    n_seq = _pad256(_pad256(2000) // 2)  # 1,024 cells a stream
    swa = _pad256(min(n_seq, 64 + 512))
    assert LlamaCpp(kv_unified=False).reserve(cfg, c, 1000, 2).kv_bytes == 2 * per_tok * (n_seq + 2 * swa)


def test_llamacpp_refuses_cca_it_has_no_mainline_support() -> None:
    with pytest.raises(FitError, match="CCA layer.*23112"):
        footprint("zaya1-8b", 4096, engine="llamacpp")
    assert "23112" in " ".join(get_engine("llamacpp").rules)


def test_gemma_4_31b_vllm_bytes_per_token_is_the_published_983k() -> None:
    # vLLM's log for Gemma-4-31B implies ~983,000 B/token (REFERENCE.md). Assumption: bf16 K/V, block 16; 50 sliding
    # layers (16 KV heads x 256, 16,384 B/token) and 10 full (4 x 512 x 2 with K and V stored, 8,192 B/token): pages
    # unified to 16 x 16,384 B, 6 groups of 10 layers -> every layer charged the sliding layers' 16,384 B
    c = costs("gemma-4-31b", context=8192)
    assert VLLM().bytes_per_token_logged(c) == 983_040
    physical = sum(x.kv_bytes_per_token for x in c.per_layer)
    assert physical == 50 * 16384 + 10 * 8192 == 901_120  # before window caps: what each layer needs per position
    assert abs(983_040 - 983_000) / 983_000 < 1e-4


def test_llamacpp_pads_n_ctx_and_gives_swa_layers_window_times_seqs_plus_ubatch() -> None:
    cfg = tiny(3, windows=(None, 64, 64))
    per_tok = 2 * 2 * 32 * 2
    c = costs(cfg, context=1000, batch=2)
    n_ctx = -(-2000 // 256) * 256
    swa = -(-min(n_ctx, 64 * 2 + 512) // 256) * 256
    assert LlamaCpp().reserve(cfg, c, 1000, 2).kv_bytes == per_tok * (n_ctx + 2 * swa)


def test_llamacpp_reproduces_kvplans_40192_tokens_for_llama_8b_with_4_91_gib_for_kv() -> None:
    # kvplan: Llama-3.1-8B on an L4 with 4.91 GiB left for KV -> max 40,192 tokens. 4.91 GiB / 131,072 B = 40,222
    # tokens; llama.cpp pads n_ctx to a multiple of 256, and the largest multiple <= 40,222 is 40,192
    fp = footprint("llama-3.1-8b", 4096, engine="llamacpp")
    memory = fp.weights_bytes + fp.workspace_bytes + int(4.91 * GiB)
    assert fit("llama-3.1-8b", memory).value == 40222  # physical
    r = fit("llama-3.1-8b", memory, engine="llamacpp")
    assert r.value == 40192 and r.fits.engine_kv_bytes == 40192 * 131072


def test_llamacpp_mla_is_k_only_latent() -> None:
    c = costs("deepseek-v3", context=65536)
    assert LlamaCpp().reserve(None, c, 65536, 1).kv_bytes == c.kv_cache_bytes == 61 * (512 + 64) * 2 * 65536


def test_sglang_splits_full_and_swa_pools_by_the_ratio() -> None:
    cfg = tiny(3, windows=(None, 64, 64))
    per_tok = 2 * 2 * 32 * 2
    c = costs(cfg, context=1000)
    full_tokens = 2 * 1000
    assert SGLang().reserve(cfg, c, 1000, 2).kv_bytes == full_tokens * per_tok + int(full_tokens * 0.8) * 2 * per_tok
    c = costs(cfg, context=40)  # short sequences: the SWA pool (ratio 0.8) must still hold min(40, 64) per sequence
    full_tokens = -(-2 * 40 * 10**6 // 800000)
    assert SGLang().reserve(cfg, c, 40, 2).kv_bytes == full_tokens * per_tok + int(full_tokens * 0.8) * 2 * per_tok


@pytest.mark.slow
def test_transformers_rule_matches_a_real_dynamic_cache() -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from kvlab.config import GQASpec, RopeSpec
    from kvlab.families import to_hf_config

    cfg = tiny(4, windows=(None, 16), kv=2, hd=32, gqa=GQASpec(qk_norm=True), rope=RopeSpec(theta=10000.0), activation="silu")
    d = to_hf_config(cfg)  # a Qwen3 with layer_types full / sliding
    hf_cfg = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    for n in (10, 40):
        cache = transformers.DynamicCache(config=hf_cfg)
        with torch.no_grad():
            model(input_ids=torch.randint(0, 1000, (2, n)), past_key_values=cache, use_cache=True)
        held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
        c = costs(cfg, context=n, batch=2, dtype="float32")
        assert Transformers().reserve(cfg, c, n, 2).kv_bytes == held


def test_every_engine_states_its_rules_with_sources() -> None:
    for name in ("vllm", "llamacpp", "sglang", "transformers"):
        eng = get_engine(name)
        assert eng.rules and all(r.startswith(name) for r in eng.rules)
        assert any(".py" in r or ".cpp" in r for r in eng.rules)


# -- hardware and the roofline ---------------------------------------------------------------------------------------

def test_decode_at_batch_1_is_memory_bound_bytes_over_bandwidth() -> None:
    c = costs("llama-3.1-8b", context=8192)
    r = roofline("llama-3.1-8b", "h100", context=8192)
    assert r.decode_bound == "memory"
    assert r.decode_bytes == c.weight_read_bytes_per_step + c.kv_read_bytes_per_step
    assert r.decode_tok_s_per_sequence == pytest.approx(3.35e12 / r.decode_bytes, rel=1e-12)


def test_large_batch_short_context_turns_compute_bound_and_aggregate_is_batch_over_step() -> None:
    hw = Hardware("toy", "toy", bandwidth=1e12, flops={"bfloat16": 1e12}, memory=GiB, source="test")
    r = roofline("llama-3.1-8b", hw, context=16, batch=512)
    assert r.decode_bound == "compute"
    assert r.decode_step_s == pytest.approx(r.decode_flops / 1e12)
    assert r.decode_tok_s_aggregate == pytest.approx(512 * r.decode_tok_s_per_sequence)
    assert r.prefill_bound == "compute" and r.prefill_s == pytest.approx(r.prefill_flops / 1e12)


def test_hardware_table_cites_a_source_and_unknown_names_are_named_errors() -> None:
    for hw in HARDWARE.values():
        assert hw.source and hw.bandwidth > 0 and hw.memory > 0
    assert HARDWARE["h200"].memory == 141 * GiB
    with pytest.raises(ValueError, match="hardware='b300'"):
        get_hardware("b300")
    assert roofline("llama-3.1-8b", "m3-max", context=1024).prefill_s is None  # no published FLOP/s


def test_measured_hardware_uses_the_bench_copy_bandwidth(monkeypatch) -> None:
    import kvlab.bench
    import kvlab.hardware

    monkeypatch.setattr(kvlab.bench, "copy_bandwidth", lambda _n=0: 2e10)
    monkeypatch.setattr(kvlab.hardware, "matmul_flops", lambda _d="float32": 1e11)
    r = roofline("qwen3-8b", "measured", context=512, weights_dtype="fp32")
    assert r.decode_tok_s_per_sequence == pytest.approx(2e10 / r.decode_bytes)


def test_tp_divides_weight_traffic() -> None:
    one = roofline("llama-3.1-8b", "h100", context=8192)
    two = roofline("llama-3.1-8b", "h100", context=8192, tp=2)
    assert two.decode_bytes == pytest.approx(one.decode_bytes / 2, abs=2)


# -- published cross-checks (assumptions in each docstring) -----------------------------------------------------------

def test_llama_3_1_8b_is_131072_bytes_per_token_bf16() -> None:
    """32 layers x 8 KV heads x 128 x (K + V) x 2 B (bf16)."""
    fp = footprint("llama-3.1-8b", 1000)
    assert fp.kv_bytes == 1000 * 131072 == 1000 * 32 * 8 * 128 * 2 * 2


def test_deepseek_v3_at_65k_with_mla_is_4_29_gib_not_hundreds() -> None:
    """MLA caches kv_lora_rank 512 + rope 64 per layer (61 layers, bf16): 70,272 B/token, 4.29 GiB at 65,536 tokens.
    gguf-parser-go's 697 GiB did not apply MLA; even the expanded per-head K/V (128 heads x (192 + 128) x 2 B) is
    4,997,120 B/token, 71x the latent."""
    fp = footprint("deepseek-v3", 65536)
    assert fp.kv_bytes == 61 * 576 * 2 * 65536
    assert round(fp.kv_bytes / GiB, 2) == 4.29


def test_deepseek_v4_flash_per_token_cost_by_component() -> None:
    """V4-Flash (transformers 5.23 defaults): 43 layers, 2 SWA + 21 CSA (ratio 4, indexer keys 128) + 20 HCA
    (ratio 128), head 512, window 128, bf16. At 1M: compressed 21 x 1M/4 x 512 x 2 + 20 x 1M/128 x 512 x 2,
    indexer keys 21 x 1M/4 x 128 x 2, the window ring 43 x 128 x 512 x 2; per token of context 6,880 B (compressed
    + indexer), 0.08 of DeepSeek-V3's 70,272."""
    n = 1 << 20
    fp = footprint("deepseek-v4-flash", n)
    comp = fp.kv_components
    assert comp["compressed"] == 21 * (n // 4) * 1024 + 20 * (n // 128) * 1024
    assert comp["index_keys"] == 21 * (n // 4) * 256
    assert comp["window"] == 43 * 128 * 1024
    per_token = (comp["compressed"] + comp["index_keys"]) / n
    assert per_token == 21 * 1024 / 4 + 20 * 1024 / 128 + 21 * 256 / 4 == 6880
    assert per_token / (61 * 576 * 2) < 0.1


# -- CLI -------------------------------------------------------------------------------------------------------------

def test_cli_fit_prints_the_answer_and_json_holds_only_the_object(capsys) -> None:
    assert main(["fit", "llama-3.1-8b", "--memory", "24GiB"]) == 0
    out = capsys.readouterr().out
    assert "largest context:" in out and "does not fit" in out and "assumptions:" in out
    assert main(["fit", "gemma-4-31b", "--memory", "80G", "--engine", "vllm", "--hardware", "h100", "--json"]) == 0
    captured = capsys.readouterr()
    d = json.loads(captured.out)
    assert d["fit"]["value"] == fit("gemma-4-31b", 80 * GiB, engine="vllm").value
    assert d["roofline"]["hardware"] == "h100" and "largest context" in captured.err


def test_cli_fit_table_and_tp(capsys) -> None:
    assert main(["fit", "deepseek-v3", "--table", "--tp", "8", "--weights-dtype", "fp8", "--context", "32k"]) == 0
    out = capsys.readouterr().out
    assert "largest batch" in out and "141.00 GiB" in out and "tp 8" in out


@pytest.mark.parametrize(("argv", "message"), [
    (["fit", "llama-3.1-8b", "--memory", "80 gigs"], "memory size"),
    (["fit", "llama-3.1-8b"], "--memory"),
    (["fit", "llama-3.1-8b", "--memory", "8G", "--engine", "tgi"], "engine='tgi'"),
    (["fit", "llama-3.1-8b", "--memory", "8G", "--tp", "3"], "tp=3"),
    (["fit", "llama-3.1-8b", "--memory", "8G", "--weights-dtype", "int3"], "dtype='int3'"),
])
def test_cli_fit_bad_input_is_a_named_error_exit_2(capsys, argv, message) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvlab: error:") and message in err



# -- GGUF files: weights at their quantized size ----------------------------------------------------------------------

def _smollm2() -> str:
    from kvlab.models import resolve_file

    try:
        return str(resolve_file("smollm2-135m"))
    except ValueError as e:
        pytest.skip(f"smollm2-135m is not installed: {e}")


def test_gguf_weights_are_the_files_quantized_bytes_and_the_fit_is_exact() -> None:
    from kvlab.gguf_checkpoint import read_gguf

    path = _smollm2()
    g = read_gguf(path)
    r = fit(path, 400 * 1024**2, batch=4)  # 400 MiB: Q4_1 weights (~92 MiB) + f16 K/V of 4 sequences
    assert r.fits.weights_bytes == g.weight_bytes < 2 * costs(path, context=1).params_total
    assert r.kv_dtype == "float16" and "GGUF file's tensor bytes" in r.assumptions[0]
    assert r.limited_by == "memory"
    per_token = 30 * 3 * 64 * 2 * 2  # layers x KV heads x head_dim x (K + V) x f16
    assert r.fits.kv_bytes == 4 * per_token * r.value
    assert r.fits.total_bytes <= r.usable < r.next.total_bytes
    assert fit(path, 400 * 1024**2, batch=4, weights_dtype="bf16").fits.weights_bytes == 2 * costs(path, 1).params_total


def test_gguf_roofline_reads_the_quantized_weights(capsys) -> None:
    path = _smollm2()
    assert main(["fit", "smollm2-135m", "--memory", "1GiB", "--hardware", "h100", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    from kvlab.gguf_checkpoint import read_gguf

    c = costs(path, context=d["fit"]["value"], kv_dtype="float16")
    w = read_gguf(path).weight_bytes
    expected = round(c.weight_read_bytes_per_step * w / (c.params_total * 2)) + c.kv_read_bytes_per_step
    assert d["roofline"]["decode_bytes"] == expected
