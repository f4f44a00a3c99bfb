"""The C++ decode attention over a plain float32 / bfloat16 K/V cache (kvlab/layers/dense_attend.py) against the
torch path it replaces (kvlab/layers/core.py ``attend``: SDPA, or two matmuls with sink logits) and plain softmax
attention: odd head dims (not a multiple of a vector), group sizes 1 to 11 (two head blocks), lengths
that are a multiple of no tile, views of a larger preallocated buffer, a left-padded mask, sink logits, K = V, values
wider than the keys, positions split over threads; layouts it does not read fall back; then every kind of the table
decoding a left-padded batch (window rings past their wrap-around) with the kernel on and off, and the calls counted
(GQA's and CCA's layers, MLA's absorbed latent)."""

import pytest
import torch
from helpers import count_calls, require_kernel
from test_contract import CASES, random_model, tiny

from kvlab.layers import core, cpu_attend, dense_attend


@pytest.fixture
def kernel(monkeypatch):
    require_kernel(monkeypatch, dense_attend, "dense decode-attention")


def _calls(monkeypatch) -> list[int]:
    """The positions each ``kvlab_dense_attend`` call attends (argument 9: n)."""
    return count_calls(monkeypatch, dense_attend, {"kvlab_dense_attend": lambda a: a[9]})


def _kernel(q, k, v, mask, scale, sinks=None) -> torch.Tensor:
    """The kernel's attention, checked to apply."""
    assert dense_attend.applies(q, k, v)
    return dense_attend.attend(q, k, v, mask, scale, sinks)


def _reference(q, k, v, mask, scale, sinks) -> torch.Tensor:
    """Plain softmax attention in float64, the KV heads repeated for their query heads."""
    b, h, _, _ = q.shape
    g = h // k.shape[1]
    kk, vv = (x.double().repeat_interleave(g, 1) for x in (k, v))
    s = (q.double() @ kk.transpose(-1, -2)) * scale
    if mask is not None:
        s = s + mask.double()
    if sinks is not None:
        s = torch.cat((s, sinks.double().view(1, h, 1, 1).expand(b, h, 1, 1)), -1)
    return (torch.softmax(s, -1)[..., :k.shape[2]] @ vv).to(q.dtype)


def _inputs(b, h, hkv, d, dv, n, cap, dtype, seed=0, same=False):
    gen = torch.Generator().manual_seed(seed)
    kb = torch.randn(b, hkv, cap, d, generator=gen).to(dtype)  # a preallocated buffer; its first n slots attended
    vb = kb if same else torch.randn(b, hkv, cap, dv, generator=gen).to(dtype)
    q = (torch.randn(b, h, 1, d, generator=gen) * 2).to(dtype)
    mask = torch.zeros(b, 1, 1, n, dtype=dtype)
    mask[-1, ..., :7] = float("-inf")  # the last row left-padded by 7 positions
    return q, kb.narrow(2, 0, n), vb.narrow(2, 0, n), mask, torch.randn(h, generator=gen)


@pytest.mark.parametrize("extras", ["plain", "mask+sinks"])
@pytest.mark.parametrize("b,h,hkv,d,dv,n,cap", [
    (2, 12, 4, 64, 64, 203, 256),  # qwen3-100m's groups of 3
    (1, 12, 2, 64, 64, 517, 517),  # laguna's groups of 6, the whole buffer
    (2, 16, 2, 64, 64, 77, 100),  # groups of 8
    (1, 8, 1, 36, 36, 45, 50),  # MQA, channels not a multiple of a vector
    (3, 5, 5, 24, 40, 130, 140),  # MHA, values wider than the keys
    (1, 11, 1, 16, 16, 33, 33),  # 11 query heads: two head blocks (8 + 3)
    (1, 8, 1, 512, 512, 70, 80),  # gemma 4's wide layer
])
def test_kernel_equals_torch(kernel, monkeypatch, b, h, hkv, d, dv, n, cap, extras):
    q, k, v, mask, sinks = _inputs(b, h, hkv, d, dv, n, cap, torch.float32)
    if extras == "plain":
        mask = sinks = None
    calls = _calls(monkeypatch)
    out = _kernel(q, k, v, mask, d ** -0.5, sinks)
    assert calls == [n]
    torch.testing.assert_close(out, core.attend(q, k, v, mask, d ** -0.5, sinks=sinks), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, _reference(q, k, v, mask, d ** -0.5, sinks), rtol=1e-5, atol=1e-5)
    assert (out - v.mean(-2, keepdim=True).repeat_interleave(h // hkv, 1)).abs().max() > 1e-2  # the scores matter


@pytest.mark.parametrize("d", [64, 20])
def test_bfloat16_cache(kernel, d):
    """bfloat16 K/V read as they are (widened exactly), the output rounded once: within bfloat16's rounding of the
    float64 reference, and the torch path's."""
    q, k, v, mask, sinks = _inputs(2, 12, 2, d, d, 203, 210, torch.bfloat16, seed=3)
    out = _kernel(q, k, v, mask, d ** -0.5, sinks)
    assert out.dtype == torch.bfloat16
    ref = _reference(q, k, v, mask, d ** -0.5, sinks)
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out.float(), core.attend(q, k, v, mask, d ** -0.5, sinks=sinks).float(),
                               rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("h,d,dv", [(8, 32, 24), (8, 40, 32), (3, 40, 20)])
def test_keys_as_values_read_once(kernel, h, d, dv):
    """K = V (the same tensor): one buffer, each tile read once for both products; ``value_channels`` (MLA's
    ``c_kv`` of its latent rows): the values the rows' first channels, the same numbers as all of them cut."""
    q, k, v, mask, _ = _inputs(2, h, 1, d, d, 150, 160, torch.float32, seed=4, same=True)
    assert v is not k and v.data_ptr() == k.data_ptr()
    out = _kernel(q, k, k, mask, 0.2)
    torch.testing.assert_close(out, _reference(q, k, k, mask, 0.2, None), rtol=1e-5, atol=1e-5)
    first = dense_attend.attend(q, k, k, mask, 0.2, value_channels=dv)
    assert first.shape == (2, h, 1, dv) and torch.equal(first, out[..., :dv])
    with pytest.raises(ValueError, match="value_channels"):
        dense_attend.attend(q, k, v, mask, 0.2, value_channels=dv)


def test_positions_split_over_threads(kernel):
    """Two torch threads: the positions in two parts of at least ``MIN_PART``, merged by their maxima and
    denominators; equal to the one-thread result within float32 summation order."""
    n = 2 * cpu_attend.MIN_PART + 101
    q, k, v, mask, sinks = _inputs(2, 6, 2, 64, 64, n, n, torch.float32, seed=5)
    one = _kernel(q, k, v, mask, 0.125, sinks)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        two = _kernel(q, k, v, mask, 0.125, sinks)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(one, _reference(q, k, v, mask, 0.125, sinks), rtol=1e-5, atol=1e-5)


def test_other_layouts_are_refused(kernel):
    """What the kernel does not read is refused (the torch path then): values inside wider rows (MLA's latent), keys
    transposed in memory, a query of several positions, another dtype, autograd; a mask of other positions, an error."""
    q, k, v, _, _ = _inputs(1, 4, 1, 16, 16, 40, 40, torch.float32, seed=6)
    wide = torch.randn(1, 1, 40, 24)
    for qq, kk, vv in [(q, wide[..., :16], wide[..., :16]), (q, k.transpose(-1, -2).contiguous().transpose(-1, -2), v),
                       (torch.randn(1, 4, 3, 16), k, v), (q, k.double(), v.double())]:
        assert not dense_attend.applies(qq, kk, vv)
    assert dense_attend.applies(q, k, v)
    with pytest.raises(ValueError, match="mask"):  # its pointer is passed as it is: a mask of other positions is refused
        dense_attend.attend(q, k, v, torch.zeros(1, 1, 1, 41), 0.25)
    with torch.enable_grad():
        assert not dense_attend.applies(q.requires_grad_(), k, v)


def test_switch_off(monkeypatch):
    """``ENABLED`` False (``KVLAB_DENSE_KERNEL=0``): never applies."""
    monkeypatch.setattr(dense_attend, "ENABLED", False)
    q, k, v, _, _ = _inputs(1, 4, 2, 16, 16, 10, 10, torch.float32)
    assert not dense_attend.applies(q, k, v) and dense_attend.library() is None


def _decode(model, ids, pad, prefill, max_length):
    cache = model.new_cache(ids.shape[0], max_length=max_length)
    cache.set_padding(pad)
    outs = [model(ids[:, :prefill], cache=cache)]
    outs += [model(ids[:, s:s + 1], cache=cache) for s in range(prefill, ids.shape[1])]
    return torch.cat(outs, 1)


@pytest.mark.parametrize("max_length", [40, None], ids=["preallocated", "growing"])
@pytest.mark.parametrize("kind,example", CASES)
def test_every_kind_decodes_alike_on_and_off(kernel, monkeypatch, kind, example, max_length):
    """Every kind's example in a tiny model (the last layer sharing the K/V of another where the kind can): a
    left-padded batch prefilled then decoded 17 tokens (past every window ring's wrap-around) with the kernel on and
    off; the decode steps of GQA's and CCA's layers and MLA's absorbed latent call it, once per layer and step; no
    other kind's (CSA/HCA/SWA: kvlab/layers/compressed_kernel.py; DSA: its chosen latents)."""
    cfg = tiny(kind, example)
    ids = torch.randint(0, cfg.vocab_size, (3, 29), generator=torch.Generator().manual_seed(2))
    pad = torch.tensor([0, 6, 11])
    with torch.no_grad():
        model = random_model(cfg)
        calls = _calls(monkeypatch)
        on = _decode(model, ids, pad, 12, max_length)
        monkeypatch.setattr(dense_attend, "ENABLED", False)
        off = _decode(model, ids, pad, 12, max_length)
    torch.testing.assert_close(on, off, rtol=1e-5, atol=1e-5)
    # sink tokens in a growing cache: two buffers joined as readers, attended block by block
    growing_sinks = kind == "gqa" and cfg.layers[0].gqa.sink_tokens and max_length is None
    takes = kind in ("gqa", "cca") or (kind == "mla" and not cfg.layers[0].mla.sparse)
    assert len(calls) == (17 * len(cfg.layers) if takes and not growing_sinks else 0)


def test_long_sums_stay_exact(kernel):
    """Sharp softmax over many positions (Gemma 4's full layers: 512 channels, scale 1, normed keys): the float32 sums
    run in three levels (a tile, a block of tiles, the blocks), so the error stays that of a short sum; summed in one
    chain across the tiles it was 1.3e-5 here (SDPA's 5e-6)."""
    gen = torch.Generator().manual_seed(7)
    n, d = 4096, 512
    k, v = (torch.nn.functional.rms_norm(torch.randn(1, 1, n, d, generator=gen), (d,)) for _ in range(2))
    q = torch.nn.functional.rms_norm(torch.randn(1, 8, 1, d, generator=gen), (d,)) * 0.3
    out = _kernel(q, k, v, None, 1.0)
    torch.testing.assert_close(out.double(), _reference(q.double(), k.double(), v.double(), None, 1.0, None),
                               rtol=0, atol=5e-6)
