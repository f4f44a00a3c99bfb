"""A decode step reads nothing back to the host: it compiles as one graph (``torch.compile(fullgraph=True)``; a
``.item()``, ``bool(tensor)``, ``.tolist()`` or data-dependent branch would break the graph and fail) for every
example layer of every kind in the table (kvlab/kinds) and for the tiny presets that add the rest of the block
(MoE routing, hash routing, mHC, per-layer embeddings), on a left-padded batch and an unpadded one, past the
windows' wrap-around; and the compiled step's logits equal eager's, two steps in a row (the cache state it writes
is the state eager writes).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from helpers import count_calls, require_kernel
from test_contract import CASES, random_model, tiny
from torch.fx.experimental import _config as fx_config

from kvlab import kinds
from kvlab.compiled import SEQ_LEN
from kvlab.layers import dense_attend
from kvlab.presets import get_preset
from kvlab.shrink import tiny as shrink_tiny

PRESETS = ["zaya1-8b", "deepseek-v4-flash", "gemma-4-e2b"]  # MoE (router carry, hash routing, dense), mHC, PLE
# a run of layers holding every block feature of each (tracing all 40 / 43 / 35 layers cost 46 s / 103 s / 78 s of the
# suite; more layers of one pattern trace the same code again): ZAYA1 4 CCA + MoE layers (the router carry crosses 3
# boundaries); V4 swa, swa, csa, hca, csa, hca (hash-routed MoE on the first 3, score-routed after); Gemma 4 E2B
# layers 10-19: 4 windowed + 1 full layer, the last two the producers of the 5 after them that read their K/V
# (4 windowed reading layer 13, 1 full reading layer 14, as layers 15-34 of the whole model do)
LAYERS = {"zaya1-8b": slice(0, 4), "deepseek-v4-flash": slice(0, 6), "gemma-4-e2b": slice(10, 20)}


def layer_run(cfg, keep: slice):
    """``cfg`` with its layers ``keep`` only; a shared layer's ``kv_source`` renumbered to its producer's new index."""
    layers = copy.deepcopy(cfg.layers[keep])
    for spec in layers:
        if spec.kv_source is not None:
            assert keep.start <= spec.kv_source < keep.stop, "the run must hold the producer of each shared layer"
            spec.kv_source -= keep.start
    return dataclasses.replace(cfg, layers=layers)


def check_decode_compiles(cfg, pad: list[int] | None, backend: str = "eager", kv_quant: str | None = None,
                          calls: list | None = None, symbol: bool = True) -> int:
    """Two decode steps eager and compiled on copies of one cache, their logits equal; the entries the compiled steps
    appended to ``calls`` (a kernel's counting list, tests/helpers.py ``count_calls``), if given. ``symbol``: the
    position count ``cache.seq_len`` traced as a symbol, as kvlab/compiled.py traces it (a constant guards on it and
    traces the whole model again for the second step; with the symbol the second step runs the first step's graph at
    the next position). Off (a constant per step): a quantized cache's step guards on its residual's boundary anyway,
    and there the symbol's trace costs 2-4x a constant one (sympy through the block loops); inductor's code
    generation for a symbol costs more than for two constants."""
    with torch.no_grad():
        model = random_model(cfg)
    b, prompt = 3, 20
    ids = torch.randint(0, cfg.vocab_size, (b, prompt + 2), generator=torch.Generator().manual_seed(2))
    cache = model.new_cache(b, max_length=40, kv_quant=kv_quant)
    if pad is not None:
        cache.set_padding(torch.tensor(pad))
    with torch.inference_mode():
        model(ids[:, :prompt], cache=cache)
        other = copy.deepcopy(cache)
        torch._dynamo.reset()
        step = torch.compile(model.decode_step, fullgraph=True, backend=backend, dynamic=False)
        inside = 0
        for s in (prompt, prompt + 1):
            eager = model(ids[:, s:s + 1], cache=cache)
            before = len(calls or ())
            with torch.compiler.config.patch(dynamic_sources=SEQ_LEN if symbol else ""), \
                    fx_config.patch(use_duck_shape=not symbol):
                compiled = step(ids[:, s:s + 1], other)
            inside += len(calls or ()) - before
            torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
        assert other.seq_len == cache.seq_len == prompt + 2
    return inside


@pytest.mark.parametrize("kind,example", CASES)
def test_decode_step_of_every_kind_is_one_graph(kind, example):
    check_decode_compiles(tiny(kind, example), [0, 6, 11])  # left-padded: masks, per-row positions


@pytest.mark.parametrize("kind", list(kinds.KINDS))
def test_unpadded_decode_step_of_every_kind_is_one_graph(kind):
    check_decode_compiles(tiny(kind, 0), None)


@pytest.mark.parametrize("name", PRESETS)
def test_decode_step_of_tiny_presets_is_one_graph(name):
    cfg = shrink_tiny(get_preset(name))
    cfg = layer_run(cfg, LAYERS[name])
    check_decode_compiles(cfg, [0, 6, 11])


@pytest.mark.parametrize("kind,example,kv_quant", [("gqa", 0, "int8"), ("gqa", 1, "int4-g8-r3"),
                                                   ("cca", 1, "int8-g4-kc-rot"), ("gqa", 4, "int4-g4-r2"),
                                                   ("mla", 0, "int4-g4-r3"), ("mla", 1, "deepseek-v4"),
                                                   ("csa", 0, "deepseek-v4"), ("hca", 0, "int8-g4-r2"),
                                                   ("swa", 0, "fp8-g4-rope")])
def test_quantized_decode_step_is_one_graph(kind, example, kv_quant, monkeypatch):
    """A quantized cache's decode step (attention walking the cache in blocks of 2 to 4 positions,
    kvlab/layers/blocked.py) too: full layers, a window ring with sinks and a residual, CCA keys per channel
    rotated, a sink-token window (sinks then ring), MLA's latent and rotary key (DSA: its indexer keys scored by
    blocks, the chosen latents gathered), CSA/HCA/SWA rings, entries written by row masks and indexer keys."""
    from kvlab.cache import quant

    spec = tiny(kind, example).layers[0]
    monkeypatch.setattr(quant, "DECODE_BLOCK_BYTES", 4 * 2 * 3 * spec.num_kv_heads * spec.head_dim)
    check_decode_compiles(tiny(kind, example), [0, 6, 11], kv_quant=kv_quant, symbol=False)


def test_decode_step_compiled_by_inductor_equals_eager(monkeypatch):
    """The real compiler (inductor, C++ on the CPU) on a windowed GQA layer with sinks; its attention the C++ kernel's
    op (kvlab/layers/dense_attend.py), once per layer and step, over inductor's views of the cache's buffers (the
    ring written in place: eager's logits)."""
    require_kernel(monkeypatch, dense_attend, "dense decode-attention")
    calls = count_calls(monkeypatch, dense_attend, {"kvlab_dense_attend": lambda a: a[9]})
    cfg = tiny("gqa", 1)
    assert check_decode_compiles(cfg, [0, 6, 11], backend="inductor", calls=calls, symbol=False) == 2 * len(cfg.layers)


# -- the compiled decode step of generate and the benchmark (kvlab/compiled.py) ----------------------------------
def test_generate_compiled_by_inductor_gives_eager_tokens_and_compiles_once():
    """``generate(compile=True)``: inductor's C++ kernels; greedy tokens equal eager's (a left-padded batch); the
    23 decode steps compile one graph (the position count is a symbol, not a constant per step), also where the
    window rings (5 slots, full from the 10-token prompt on) are written at slot 0 (the first step, then every fifth:
    the write's slot is a tensor index in a trace, else inductor's in-place pass guards on its view's offset being 0);
    a second call on the same shapes compiles none."""
    from kvlab.engine import generate

    with torch.no_grad():
        model = random_model(tiny("gqa", 1))
    ids = torch.randint(0, 61, (2, 10), generator=torch.Generator().manual_seed(3))
    eager = generate(model, ids, max_new_tokens=24, lengths=[10, 5])
    stats: dict = {}
    assert torch.equal(generate(model, ids, max_new_tokens=24, lengths=[10, 5], compile=True, stats=stats), eager)
    assert stats["compiled"] and stats["compiles"] == 1 and stats["decode_steps"] == 23
    again: dict = {}
    assert torch.equal(generate(model, ids, max_new_tokens=24, lengths=[10, 5], compile=True, stats=again), eager)
    assert again["compiles"] == 0


@pytest.mark.parametrize("kind,example", [("gqa", 1), ("csa", 0)])  # a ring with sinks; a ring + compressor
def test_compiled_decode_compiles_per_regime_not_per_step(kind, example):
    """Traced by dynamo without code generation (backend "eager"): greedy tokens equal eager's; a full cache
    compiles one graph for 40 steps (the inductor test above); a window ring (and a compressor) one more where it
    first wraps, and none in the 20 steps after every ring wrapped."""
    from kvlab.compiled import compiled_step
    from kvlab.engine import generate

    with torch.no_grad():
        model = random_model(tiny(kind, example))
    ids = torch.randint(0, 61, (3, 6), generator=torch.Generator().manual_seed(4))
    stats: dict = {}
    out = generate(model, ids, max_new_tokens=40, lengths=[6, 4, 2], compile="eager", stats=stats)
    assert torch.equal(out, generate(model, ids, max_new_tokens=40, lengths=[6, 4, 2]))
    windowed = any(s.window for s in model.config.layers)
    assert 1 <= stats["compiles"] <= (3 if windowed else 1)
    step = compiled_step(model, "eager")
    cache = model.new_cache(3, max_length=46)
    with torch.inference_mode():
        model(ids, cache=cache)
        for i in range(40):
            step(out[:, 6 + i:7 + i].clone(), cache)
            if i == 19:
                after_wrap = step.compiles
    assert step.compiles == after_wrap  # steps 20-39: past every wrap, nothing new
