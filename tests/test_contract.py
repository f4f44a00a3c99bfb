"""One contract over every attention kind in the table (kvlab/kinds) and every preset.

Every example layer of every kind's record, in a tiny 3-layer model (the last layer reading layer 1's cache where
the kind can share): chunked prefill (chunks of 1, 3, 7) then token-by-token decode of a left-padded batch equals
the full forward, with the cache preallocated and growing; a padded row equals the same row alone; the bytes each
store holds equal the calculator's, per layer, per component and for the constant state; the calculator's
parameter count equals the built model's. Every preset: the calculator's parameter count equals the model's built
on the meta device. The last test adds a throwaway kind with one table entry and runs the same contract on it.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from kvlab import kinds
from kvlab.archplot import architecture_figure, colours
from kvlab.cache.cache import quant_rows
from kvlab.cache.quant import QuantRows
from kvlab.cache.storage import KVStore, positions
from kvlab.config import LayerSpec, ModelConfig
from kvlab.costs import costs
from kvlab.engines import ENGINES, get_engine
from kvlab.kinds import AttnCost, Kind, causal_positions
from kvlab.kinds.base import DEEPSEEK_V4, PAGED, PAGED_STATE, UNMODELLED
from kvlab.layers.core import attend_out, publish_kv
from kvlab.layers.rope import apply_rope
from kvlab.model import Model
from kvlab.presets import get_preset, presets

CASES = [pytest.param(name, i, id=f"{name}-{i}") for name, k in kinds.KINDS.items() for i in range(len(k.examples))]


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def test_every_kind_has_an_example_and_resolves():
    for name, k in kinds.KINDS.items():
        assert k.name == name and k.examples, name
        assert issubclass(k.module_class(), nn.Module) and callable(k.store_factory())
        assert k.options <= kinds.kind_options()
        assert k.serving in (PAGED, PAGED_STATE, DEEPSEEK_V4, UNMODELLED) and (k.colour is None or k.colour in colours().values())
        if k.detail is not None:  # what a diagram writes on each example layer
            assert all(isinstance(k.detail(LayerSpec(attention=name, **copy.deepcopy(ex))), str) for ex in k.examples)


def tiny(kind: str, example: int = 0, layers: int = 3) -> ModelConfig:
    ex = kinds.KINDS[kind].examples[example]
    specs = [LayerSpec(attention=kind, intermediate_size=40, **copy.deepcopy(ex)) for _ in range(layers)]
    if kinds.KINDS[kind].can_share:
        specs[-1].kv_source = layers - 2
    return ModelConfig(vocab_size=61, hidden_size=32, layers=specs, max_positions=256)


def random_model(cfg: ModelConfig, seed: int = 0) -> Model:
    model = Model.from_config(cfg, seed=seed, std=0.1)
    gen = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():  # non-trivial sinks, norms and biases so they matter
        if name.endswith(("sinks", "bias", "norm.weight")):
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


def check_chunked_equals_full(cfg: ModelConfig, chunk: int, max_length: int | None) -> None:
    model = random_model(cfg)
    n, prefill = 29, 20
    ids = torch.randint(0, cfg.vocab_size, (3, n), generator=torch.Generator().manual_seed(2))
    pad = torch.tensor([0, 6, 11])
    mask = (torch.arange(n)[None] >= pad[:, None]).long()
    full = model(ids, attention_mask=mask)
    cache = model.new_cache(3, max_length=max_length)
    cache.set_padding(pad)
    outs = [model(ids[:, s:min(s + chunk, prefill)], cache=cache) for s in range(0, prefill, chunk)]
    outs += [model(ids[:, s:s + 1], cache=cache) for s in range(prefill, n)]  # decode
    inc = torch.cat(outs, 1)
    for r, p in enumerate(pad.tolist()):
        torch.testing.assert_close(inc[r, p:], full[r, p:], atol=1e-5, rtol=0)
        torch.testing.assert_close(model(ids[r:r + 1, p:])[0], full[r, p:], atol=1e-5, rtol=0)
    assert cache.seq_len == n


def _held_quant_rows(x, seen: set[int] | None = None) -> list[QuantRows]:
    """Every QuantRows object reachable from a store through its attributes, lists and dicts (the oracle for
    ``store.rows()``: a store that forgot one in ``rows()`` would not have it fused)."""
    seen = set() if seen is None else seen
    if id(x) in seen:
        return []
    seen.add(id(x))
    if isinstance(x, QuantRows):
        return [x]
    if isinstance(x, (list, tuple, dict)):
        items = list(x.values() if isinstance(x, dict) else x)
    elif type(x).__module__.startswith("kvlab.cache"):
        items = list(vars(x).values())
    else:
        return []
    return [r for y in items for r in _held_quant_rows(y, seen)]


def check_measured_equals_calculated(cfg: ModelConfig, max_length: int, batch: int = 2, kv_quant=None) -> None:
    model = random_model(cfg)
    cache = model.new_cache(batch, max_length=max_length, kv_quant=kv_quant)
    c = costs(cfg, context=max_length, dtype="float32", batch=batch, kv_quant=kv_quant)
    model(torch.randint(0, cfg.vocab_size, (batch, max_length)), cache=cache)  # filled: nothing grows
    for i, (store, lc) in enumerate(zip(cache.layers, c.per_layer)):
        if store is None:
            assert lc.kv_bytes == 0 and cfg.layers[i].kv_source is not None
            continue
        assert store.nbytes() == lc.kv_bytes, f"layer {i}"
        assert store.components() == lc.kv_components, f"layer {i}"
        assert store.state_nbytes() == lc.kv_state_bytes, f"layer {i}"
        found = {id(r) for r in quant_rows(store)}  # the store protocol's rows() (what fused=True marks) ...
        assert found == {id(r) for r in _held_quant_rows(store)}, f"layer {i}"  # ... is every QuantRows it holds
    assert cache.nbytes() == c.kv_cache_bytes
    assert sum(p.numel() for p in model.parameters()) == c.params_total


@pytest.mark.parametrize("max_length", [40, None], ids=["preallocated", "growing"])
@pytest.mark.parametrize("chunk", [1, 3, 7])
@pytest.mark.parametrize("kind,example", CASES)
def test_chunked_prefill_and_decode_equal_full_forward(kind, example, chunk, max_length):
    check_chunked_equals_full(tiny(kind, example), chunk, max_length)


@pytest.mark.parametrize("kind,example", CASES)
def test_no_kind_looks_ahead_and_history_matters(kind, example):
    """A prefix's logits are the first positions of the longer forward; changing an earlier token (inside every
    example's window) changes the last logits (a cache or mask that ignored its contents would not)."""
    model = random_model(tiny(kind, example), seed=3)
    ids = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(4))
    full = model(ids)
    for n in (1, 5, 13, 23):
        torch.testing.assert_close(model(ids[:, :n]), full[:, :n], atol=1e-5, rtol=0)
    other = ids.clone()
    other[:, -3] = (other[:, -3] + 1) % 61
    assert (model(other)[:, -1] - full[:, -1]).abs().max() > 1e-4


@pytest.mark.parametrize("max_length", [3, 7, 40])
@pytest.mark.parametrize("kind,example", CASES)
def test_measured_bytes_equal_calculated(kind, example, max_length):
    check_measured_equals_calculated(tiny(kind, example), max_length)


# quantized caches (kvlab/costs/quant.py): formats every example's channel counts and windows allow
QUANT = ["int8", "int4-g4", "fp8-g4-rope", "int4-g2-r2-asym-rot", "fp4-g4-r1", "deepseek-v4",
         {"*": "int8-g4-r3", "index_keys": "int4", "v": None}, {"*": "int8-g4-r3", 0: None, 1: "int4-g4"}]
QUANT_IDS = [q if isinstance(q, str) else "per-layer" if 0 in q else "mixed" for q in QUANT]


@pytest.mark.parametrize("kv_quant", QUANT, ids=QUANT_IDS)
@pytest.mark.parametrize("max_length", [3, 40])
@pytest.mark.parametrize("kind,example", CASES)
def test_quantized_bytes_equal_calculated(kind, example, max_length, kv_quant):
    """Codes, scales, zero points, residual, exact rotary channels: the store holds what the calculator prices."""
    check_measured_equals_calculated(tiny(kind, example), max_length, kv_quant=kv_quant)


@pytest.mark.parametrize("kind,example", CASES)
def test_keys_per_channel_bytes_or_a_named_error(kind, example):
    """KIVI keys (groups of 2 positions per channel) on every kind: priced exactly, or, on a ring whose window is
    not a multiple of the group, an error naming the layer, the option and the window."""
    cfg = tiny(kind, example)
    window = cfg.layers[0].window
    if kinds.KINDS[kind].name in ("gqa", "cca") and window is not None and window % 2:
        with pytest.raises(ValueError, match=rf"layers\[0\]\.kv_quant\[k\]\.group=2: .*multiple.*window={window}"):
            cfg_model = random_model(cfg)
            cfg_model.new_cache(1, max_length=40, kv_quant="int8-g2-r2-kc")
        return
    for max_length in (3, 9, 40):
        check_measured_equals_calculated(cfg, max_length, kv_quant="int8-g2-r2-kc")


@pytest.mark.parametrize("kv_quant", ["int8-g4-r2-kc", "int4-g4-r3-rot"], ids=["int8-kc", "int4-rot"])
@pytest.mark.parametrize("max_length", [40, None], ids=["preallocated", "growing"])
@pytest.mark.parametrize("kind,example", CASES)
def test_quantized_decode_stays_close(kind, example, max_length, kv_quant):
    """Chunked prefill + decode through a quantized cache stays close to the unquantized forward (int8: logits
    within 0.1 on these random models, int4: 0.6); kinds that pick keys by a top-k (DSA, CSA) are compared with
    their indexer keys exact, and only before their first discrete choice can flip (the prefill)."""
    cfg = tiny(kind, example)
    if any(x.window is not None for x in cfg.layers) and kv_quant.startswith("int8"):
        kv_quant = "int8-g4-r2"  # keys per channel in groups of 4 positions need a ring of a multiple of 4 > 5
    model = random_model(cfg)
    n, prefill = 29, 20
    ids = torch.randint(0, cfg.vocab_size, (2, n), generator=torch.Generator().manual_seed(2))
    full = model(ids)
    cache = model.new_cache(2, max_length=max_length, kv_quant={"*": kv_quant, "index_keys": None})
    outs = [model(ids[:, s:min(s + 3, prefill)], cache=cache) for s in range(0, prefill, 3)]
    outs += [model(ids[:, s:s + 1], cache=cache) for s in range(prefill, n)]
    inc = torch.cat(outs, 1)
    tol = 0.1 if kv_quant.startswith("int8") else 0.6
    selects = kind == "csa" or (kind == "mla" and cfg.layers[0].mla.sparse)
    upto = 4 if selects else n  # before any top-k over quantized state can differ
    err = (inc[:, :upto] - full[:, :upto]).abs().max()
    assert err < tol
    assert err > 0  # the cache really is quantized


@pytest.mark.parametrize("name", presets())
def test_preset_params_equal_the_model_on_meta(name):
    cfg = get_preset(name)
    with torch.device("meta"):
        model = Model(cfg)
    assert sum(p.numel() for p in model.parameters()) == costs(cfg, context=1).params_total


def test_an_option_of_another_kind_is_an_error_naming_its_owner():
    for flat in ("conv_kernels", "qk_norm", "v_norm", "k_eq_v", "sink_tokens"):  # each in its kind's own spec
        with pytest.raises(TypeError, match=flat):
            LayerSpec(num_heads=2, num_kv_heads=1, head_dim=8, **{flat: (9, 9) if flat == "conv_kernels" else 1})
    with pytest.raises(ValueError, match=r"layers\[0\]\.gqa=GQASpec\(qk_norm=True, .*\): not supported by cca "
                                         r"\(an option of gqa\); leave it at None"):
        ModelConfig(vocab_size=11, hidden_size=16,
                    layers=[LayerSpec(num_heads=2, num_kv_heads=1, head_dim=8, intermediate_size=8, attention="cca",
                                      gqa=kinds.GQASpec(qk_norm=True))])
    with pytest.raises(ValueError, match=r"layers\[0\]\.cca=CCASpec\(conv_kernels=\(9, 9\)\): not supported by gqa "
                                         r"\(an option of cca\); leave it at None"):
        ModelConfig(vocab_size=11, hidden_size=16,
                    layers=[LayerSpec(num_heads=2, num_kv_heads=1, head_dim=8, intermediate_size=8,
                                      cca=kinds.CCASpec(conv_kernels=(9, 9)))])


def test_a_kind_whose_sub_spec_has_only_defaults_gets_one():
    """A layer of a kind whose record has a sub-spec with a default for every option (gqa, cca) gets that sub-spec,
    so ``LayerSpec(attention=...)`` alone is a complete layer, and a layer of any other kind gets none; kinds with
    required sub-spec options (mla) do not."""
    filled = 0
    for name, k in kinds.KINDS.items():
        if k.spec_field is None:
            continue
        try:
            default = k.spec_type()
        except TypeError:  # a required option: the layer must give the sub-spec
            continue
        filled += 1
        assert getattr(LayerSpec(num_heads=2, num_kv_heads=1, head_dim=8, attention=name), k.spec_field) == default
        for other in kinds.KINDS.keys() - {name}:
            assert getattr(LayerSpec(num_heads=2, num_kv_heads=1, head_dim=8, attention=other), k.spec_field) is None
    assert filled >= 2
    assert LayerSpec(num_heads=2, num_kv_heads=1, head_dim=8, attention="cca").cca == kinds.CCASpec((2, 2))
    assert LayerSpec(num_heads=2, num_kv_heads=1, head_dim=8).gqa == kinds.GQASpec(False, False, False, 0)
    # a layer switched to another kind drops its old kind's untouched sub-spec and gets the new one's
    switched = dataclasses.replace(LayerSpec(num_heads=2, num_kv_heads=1, head_dim=8), attention="cca")
    assert switched.gqa is None and switched.cca == kinds.CCASpec()
    back = dataclasses.replace(switched, attention="gqa")
    assert back.cca is None and back.gqa == kinds.GQASpec()
    with pytest.raises(ValueError, match=r"layers\[0\]\.gqa=GQASpec\(qk_norm=True, .*not supported by cca"):
        ModelConfig(vocab_size=11, hidden_size=16, layers=[dataclasses.replace(
            LayerSpec(num_heads=2, num_kv_heads=1, head_dim=8, intermediate_size=8, gqa={"qk_norm": True}),
            attention="cca")])  # a set option is never dropped


def _cross_options() -> list:
    """(kind, option of other kinds, a value the owners' own examples give it): every option a kind does not read."""
    default = LayerSpec(num_heads=1, num_kv_heads=1, head_dim=2)  # every option at its default
    out = []
    for name, k in kinds.KINDS.items():
        for option in sorted(kinds.kind_options() - k.options):
            value = next(ex[option] for owner in kinds.owners(option) for ex in kinds.KINDS[owner].examples
                         if option in ex and ex[option] != getattr(default, option))
            out.append(pytest.param(name, option, value, id=f"{name}-{option}"))
    return out


@pytest.mark.parametrize(("kind", "option", "value"), _cross_options())
def test_every_option_of_another_kind_is_refused_naming_the_field_and_its_owners(kind, option, value):
    """From the table alone: each kind's record lists its options; any other kind's option, set to a value its owner
    accepts, is a ValueError naming the layer, the field, this kind and the owners."""
    layer = {**copy.deepcopy(kinds.KINDS[kind].examples[0]), option: copy.deepcopy(value)}
    owners = ", ".join(kinds.owners(option))
    with pytest.raises(ValueError, match=rf"^layers\[0\]\.{option}=.*: not supported by {kind} \(an option of "
                                         rf"{owners}\); leave it at "):
        ModelConfig(vocab_size=61, hidden_size=32, layers=[LayerSpec(attention=kind, intermediate_size=40, **layer)])


# -- a throwaway kind: one table entry, and the whole contract runs on it ----------------------------------------
class KeyOnlyStore(KVStore):
    """Stores K only ``[B, Hkv, L, D]`` (the layer's V is its K): half of a GQA cache."""

    def __init__(self, spec, batch, max_length, dtype, device):
        self.max_length = max_length
        self.k = torch.empty(batch, spec.num_kv_heads, max_length or 0, spec.head_dim, dtype=dtype, device=device)

    def tensors(self):
        return [self.k]

    def append(self, k, v, start):
        end = start + k.shape[2]
        if end > self.k.shape[2]:
            grown = torch.empty(*self.k.shape[:2], max(end, 2 * self.k.shape[2]), self.k.shape[3], dtype=self.k.dtype)
            grown[:, :, :start] = self.k[:, :, :start]
            self.k = grown
        self.k[:, :, start:end] = k
        return self.k[:, :, :end], self.k[:, :, :end], positions(end, k.device)


class KeyOnlyAttention(nn.Module):
    """Attention whose values are its rotated keys (one projection, one cached tensor)."""

    def __init__(self, spec, hidden, eps=1e-6, norm_offset=False):
        super().__init__()
        self.spec, self.sinks = spec, None
        self.q_proj = nn.Linear(hidden, spec.num_heads * spec.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, spec.num_kv_heads * spec.head_dim, bias=False)
        self.o_proj = nn.Linear(spec.num_heads * spec.head_dim, hidden, bias=False)

    def forward(self, x, step, index, store=None):
        s, (b, t, _) = self.spec, x.shape
        rope = step.rope.get(index)
        q = self.q_proj(x).view(b, t, s.num_heads, s.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, s.num_kv_heads, s.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k, v, kpos = step.kv[s.kv_source] if s.kv_source is not None else publish_kv(step, index, store, k, k)
        return attend_out(self, x, step, q, k, v, kpos)


def key_only_price(layer, hidden, context, batch, kv_elt):
    h, kvh, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
    mats = (2 * h * d + kvh * d) * hidden
    per_pos = kvh * d * kv_elt
    return AttnCost(params=mats, matmul_params=mats, kv_bytes=batch * per_pos * context if layer.stores_kv else 0,
                    kv_bytes_per_token=per_pos if layer.stores_kv else 0, kv_read_bytes=batch * per_pos * context,
                    flops_per_token=4 * h * d * context, prefill_flops=4 * h * d * causal_positions(context, None))


KEY_ONLY = Kind(name="key-only", label="K = V, keys cached once", page="docs/adding-a-technique.md",
                options=frozenset({"attn_scale"}), validate=lambda layer, where: None, price=key_only_price,
                assumption="key-only layers: K [batch, kv_heads, L, head_dim] per storing layer; V is K",
                module=KeyOnlyAttention, store=KeyOnlyStore, can_share=True,
                examples=({"num_heads": 4, "num_kv_heads": 2, "head_dim": 8},))


@pytest.fixture
def key_only():
    kinds.register(KEY_ONLY)
    yield "key-only"
    kinds.unregister("key-only")


def test_a_new_kind_is_one_table_entry(key_only):
    cfg = tiny(key_only)
    for chunk in (1, 3, 7):
        for max_length in (40, None):
            check_chunked_equals_full(cfg, chunk, max_length)
    for max_length in (3, 40):
        check_measured_equals_calculated(cfg, max_length)
    c = costs(cfg, context=100, dtype="bfloat16")
    assert c.kv_cache_bytes == 2 * 2 * 8 * 100 * 2  # two storing layers x 2 kv heads x 8 dims x 100 x 2 B
    with pytest.raises(ValueError, match=r"layers\[0\]\.attention='key-only': this kind's store has no quantizable"):
        random_model(cfg).new_cache(1, 8, kv_quant="int8")  # its record names no buffers
    assert KEY_ONLY.assumption in c.assumptions
    for engine in ENGINES:  # no serving rule in its record: every engine charges the calculator's bytes
        assert get_engine(engine).reserve(cfg, c, 100, 1).kv_bytes == c.kv_cache_bytes
    texts = [t.get_text() for t in architecture_figure(cfg).axes[0].texts]  # drawn in the plain full colour
    assert len(texts) == 3 and texts[2].split()[:3] == ["2", "4q/2kv", "x"] and "<- 1" in texts[2]
    with pytest.raises(ValueError, match=r"layers\[0\]\.window=4: not supported by key-only"):
        ModelConfig(vocab_size=11, hidden_size=32,
                    layers=[LayerSpec(attention=key_only, num_heads=4, num_kv_heads=2, head_dim=8,
                                      intermediate_size=8, window=4)])


def test_a_kind_name_is_registered_once(key_only):
    with pytest.raises(ValueError, match="already in the table"):
        kinds.register(KEY_ONLY)


def test_a_chunk_builds_one_mask_for_all_full_cache_layers(monkeypatch):
    """Every full-cache layer of one call attends to the same positions, so the step builds their mask once (a
    ``[1, 1, 512, 16K]`` fp32 mask is 32 MiB: one per layer was most of a 16K prefill's memory above the cache).
    A left-padded batch: without padding a chunk needs no mask (kvlab/layers/chunk_attend.py)."""
    from kvlab.layers import core

    model = random_model(tiny("gqa", 0, layers=4))
    built = []
    build = core.build_mask

    def spy(*args, **kwargs):
        built.append(1)
        return build(*args, **kwargs)

    monkeypatch.setattr(core, "build_mask", spy)
    ids = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(3))
    pad = (torch.arange(24)[None] >= torch.tensor([[0], [3]])).long()
    with torch.inference_mode():
        cache = model.new_cache(2, max_length=24)
        model(ids[:, :8], cache=cache, attention_mask=pad)
        built.clear()
        model(ids[:, 8:16], cache=cache)
    assert len(built) == 1
