"""The C++ mHC kernel (kvlab/layers/mhc_kernel.py) against mHC's torch form (kvlab/layers/mhc.py): the Sinkhorn
alone over random logits of several shapes and scales, the maps of a hyper-connection, inside a model's eager and
compiled decode (the custom op traced), bad arguments, the off switch and the fallback without a compiler. The
kernel is built once per machine into the user's cache directory (a second the first time)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import warnings

import pytest
import torch
from helpers import count_calls, require_kernel, tiny_config

from kvlab.compiled import CompiledStep
from kvlab.layers import mhc_kernel
from kvlab.layers.mhc import READ_ROWS, HyperConnection, sinkhorn, sinkhorn_in_place
from kvlab.model import Model


@pytest.fixture
def kernel(monkeypatch):
    require_kernel(monkeypatch, mhc_kernel, "mHC")


def _count_calls(monkeypatch) -> list[str]:
    """Count the library's calls (a proxy in front of the loaded library: what the custom ops call at run time)."""
    return count_calls(monkeypatch, mhc_kernel, {f"kvlab_{name}": lambda a, name=name: name.removeprefix("mhc_")
                                                 for name in ("sinkhorn", "mhc_maps", "mhc_read", "mhc_write")})


@pytest.mark.parametrize("shape", [(4, 4), (1, 1, 4, 4), (3, 7, 4, 4), (50, 2, 2), (9, 3, 3), (5, 6, 6), (4, 8, 8),
                                   (2, 1, 1)])
@pytest.mark.parametrize("iters", [1, 2, 20])
@pytest.mark.parametrize("eps", [1e-6, 0.01])
def test_sinkhorn_equals_torch_form(kernel, shape, iters, eps):
    """The kernel's Sinkhorn (softmax over rows, + eps, alternating column / row normalisations) within 1e-6 of the
    whole-matrix torch form autograd takes and of the in-place one, over logits from 0.1 to 30 times a normal draw
    (V4's eps, and a large one that every eps term shows through); float32 out of a bfloat16 input too."""
    gen = torch.Generator().manual_seed(len(shape) * 100 + shape[-1] * 10 + iters)
    for s in (0.1, 1, 3, 10, 30):
        logits = torch.randn(shape, generator=gen) * s
        whole = sinkhorn(logits.clone().requires_grad_(True), iters, eps).detach()
        ours = mhc_kernel.sinkhorn(logits, iters, eps)
        assert ours.dtype == torch.float32 and ours.shape == logits.shape
        torch.testing.assert_close(ours, whole, atol=1e-6, rtol=0)
        torch.testing.assert_close(ours, sinkhorn_in_place(logits, iters, eps), atol=1e-6, rtol=0)
    half = logits.to(torch.bfloat16)
    torch.testing.assert_close(mhc_kernel.sinkhorn(half, iters, eps), sinkhorn_in_place(half, iters, eps),
                               atol=1e-6, rtol=0)


def test_sinkhorn_takes_the_kernel_without_autograd(kernel, monkeypatch):
    """``sinkhorn`` runs the kernel without autograd on the CPU (one call), the torch form with it (a gradient)."""
    logits = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(0))
    calls = _count_calls(monkeypatch)
    with torch.no_grad():
        sinkhorn(logits, 20, 1e-6)
    assert calls == ["sinkhorn"]
    x = logits.clone().requires_grad_(True)
    sinkhorn(x, 20, 1e-6)[..., 0, 1].sum().backward()
    assert calls == ["sinkhorn"] and x.grad is not None and bool(x.grad.abs().sum() > 0)


def _hyper_connection(n: int, d: int, iters: int, seed: int, eps: float = 1e-6) -> HyperConnection:
    hc = HyperConnection(n, d, iters, eps, 1e-6)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hc.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if p is hc.hc_fn else 1.0))
    return hc


@pytest.mark.parametrize("n,d,b,t,iters,eps", [(4, 512, 1, 1, 20, 1e-6), (4, 16, 2, 7, 20, 0.01),
                                               (3, 8, 1, 5, 7, 1e-6), (2, 8, 3, 1, 1, 0.01), (6, 4, 1, 3, 20, 1e-6),
                                               (4, 33, 2, 9, 20, 1e-6), (3, 8, 1, 40, 5, 0.01)])
def test_read_and_write_equal_torch_form(kernel, monkeypatch, n, d, b, t, iters, eps):
    """A hyper-connection's maps, read and write by the kernel within float rounding of the torch form's (the
    kernel off): pre, post and M within 1e-6 (``W x`` summed in another order), f's input and the written streams
    within 1e-5 relative. Up to READ_ROWS tokens the read is one call (norm, ``W x``, maps, mix), more take torch's
    ``W x`` and the kernel's maps; the write is one call either way."""
    hc = _hyper_connection(n, d, iters, seed=n * 10 + t, eps=eps)
    x = torch.randn(b, t, n, d, generator=torch.Generator().manual_seed(1)) * 2
    out = torch.randn(b, t, d, generator=torch.Generator().manual_seed(2))
    calls = _count_calls(monkeypatch)
    with torch.no_grad():
        ours = hc.maps(x)
        mix, ctx = hc.read(x)
        written = hc.write(ctx, out, x)
        monkeypatch.setattr(mhc_kernel, "ENABLED", False)
        ref = hc.maps(x)
        ref_mix, ref_ctx = hc.read(x)
        ref_written = hc.write(ref_ctx, out, x)
    assert calls == ["maps", "read" if b * t <= READ_ROWS else "maps", "write"]
    for a, r in zip(ours, ref, strict=True):
        assert a.shape == r.shape and a.dtype == torch.float32
        torch.testing.assert_close(a, r, atol=1e-6, rtol=0)
    for a, r in zip(ctx, ref_ctx, strict=True):  # the kernel's context unpacks as (post, M)
        torch.testing.assert_close(a, r, atol=1e-6, rtol=0)
    assert mix.shape == ref_mix.shape and written.shape == ref_written.shape == x.shape
    torch.testing.assert_close(mix, ref_mix, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(written, ref_written, atol=1e-5, rtol=1e-5)


def test_maps_with_autograd_take_the_torch_form(kernel, monkeypatch):
    """Training (a gradient asked for): the torch form, and the gradient reaches ``hc_fn``."""
    hc = _hyper_connection(4, 8, 20, seed=0)
    calls = _count_calls(monkeypatch)
    x = torch.randn(1, 3, 4, 8)
    pre, post, m = hc.maps(x)
    mix, ctx = hc.read(x)
    y = hc.write(ctx, torch.randn(1, 3, 8), x)
    (pre.sum() + post.sum() + m[..., 0].sum() + mix.sum() + y.sum()).backward()
    assert calls == [] and hc.hc_fn.grad is not None


def _model(streams: int = 4) -> Model:
    cfg = dataclasses.replace(tiny_config(), mhc_streams=streams)
    torch.manual_seed(0)
    model = Model.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "hc_" in name:
                p.copy_(torch.randn(p.shape) * 0.3)
    return model.eval()


def test_model_decode_eager_and_compiled(kernel, monkeypatch):
    """A tiny mHC model's prefill and decode steps: a read and a write call per hyper-connection, eager and inside a
    compiled step (the custom ops traced, fullgraph); logits within float rounding of the torch form's."""
    model = _model()
    ids = torch.randint(0, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(2))
    hcs = sum(isinstance(m, HyperConnection) for m in model.modules())
    with torch.no_grad():
        calls = _count_calls(monkeypatch)
        cache = model.new_cache(1, 16)
        logits = [model(ids[:, :6], cache=cache)[:, -1]]
        logits += [model(ids[:, i:i + 1], cache=cache)[:, -1] for i in (6, 7)]
        assert calls == ["read", "write"] * (3 * hcs)  # prefill (6 tokens) and steps: one read, one write each
        step = CompiledStep(model, "eager")  # dynamo traces the custom op; no inductor compile (seconds)
        compiled_cache = model.new_cache(1, 16)
        model(ids[:, :6], cache=compiled_cache)
        del calls[:]
        compiled = [step(ids[:, i:i + 1], compiled_cache)[:, -1] for i in (6, 7)]
        assert calls == ["read", "write"] * (2 * hcs)  # the graph calls the kernels (custom ops), not a torch form
        monkeypatch.setattr(mhc_kernel, "ENABLED", False)
        ref_cache = model.new_cache(1, 16)
        ref = [model(ids[:, :6], cache=ref_cache)[:, -1]]
        ref += [model(ids[:, i:i + 1], cache=ref_cache)[:, -1] for i in (6, 7)]
    for a, r in zip(logits, ref, strict=True):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)
    for a, r in zip(compiled, logits[1:], strict=True):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)


def test_bad_arguments_are_refused(kernel):
    """Arguments the kernel cannot take: a named error; more streams than it holds: the torch form instead."""
    with pytest.raises(ValueError, match="kvlab::mhc_maps: lin's last dim and bias must be"):
        mhc_kernel.maps(torch.zeros(1, 23), torch.ones(3), torch.zeros(24), 4, 20, 1e-6)
    with pytest.raises(ValueError, match="kvlab::mhc_maps: .*scale 3 values"):
        mhc_kernel.maps(torch.zeros(1, 24), torch.ones(2), torch.zeros(24), 4, 20, 1e-6)
    with pytest.raises(ValueError, match="kvlab::sinkhorn: arguments refused .*iters >= 1"):
        mhc_kernel.sinkhorn(torch.zeros(4, 4), 0, 1e-6)
    x = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match="kvlab mhc read: x float32 .*w \\[\\(2 \\+ n\\) n, n D\\]"):
        mhc_kernel.read(x, torch.zeros(24, 31), torch.ones(3), torch.zeros(24), 20, 1e-6, 1e-6)
    with pytest.raises(ValueError, match="kvlab mhc read: x float32"):
        mhc_kernel.read(x.double(), torch.zeros(24, 32), torch.ones(3), torch.zeros(24), 20, 1e-6, 1e-6)
    with pytest.raises(ValueError, match="kvlab mhc write: packed .*out \\[..., D\\]"):
        mhc_kernel.write(torch.zeros(1, 2, 24), torch.zeros(1, 2, 7), x)
    with pytest.raises(ValueError, match="kvlab mhc write: packed \\[..., \\(2 \\+ n\\) n\\]"):
        mhc_kernel.write(torch.zeros(1, 2, 23), torch.zeros(1, 2, 8), x)
    n = mhc_kernel.MAX_STREAMS + 1
    assert not mhc_kernel.applies(torch.zeros(n, n), n)
    with torch.no_grad():
        m = sinkhorn(torch.randn(n, n), 3, 1e-6)  # the torch form
    torch.testing.assert_close(m.sum(-2), torch.ones(n), atol=1e-5, rtol=0)


def test_no_compiler_warns_once_and_falls_back(monkeypatch, tmp_path):
    """No C++ compiler: one warning, the kernel off, mHC in its torch form (the same maps), nothing left behind."""
    monkeypatch.setattr(mhc_kernel, "ENABLED", True)
    monkeypatch.setattr(mhc_kernel, "KERNEL", mhc_kernel.kernel())  # not built yet
    monkeypatch.setenv("CXX", "kvlab-no-such-compiler")
    monkeypatch.setenv("KVLAB_KERNEL_DIR", str(tmp_path))
    hc = _hyper_connection(4, 8, 20, seed=3)
    x = torch.randn(1, 2, 4, 8)
    with torch.no_grad():
        with pytest.warns(UserWarning, match="C\\+\\+ kernel mhc_kernel.cpp unavailable .*no C\\+\\+ compiler.*mHC runs its torch form"):
            pre, post, m = hc.maps(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once only
            again = hc.maps(x)
            mix, ctx = hc.read(x)
            assert isinstance(ctx, tuple)  # the torch form's context
            torch.testing.assert_close(mix, (pre[..., None] * x).sum(2), atol=0, rtol=0)
            logits = torch.randn(3, 4, 4)
            assert torch.equal(sinkhorn(logits, 20, 1e-6), sinkhorn_in_place(logits, 20, 1e-6))
    assert mhc_kernel.KERNEL.lib is None and not mhc_kernel.applies(x, 4)
    for a, r in zip((pre, post, m), again, strict=True):
        assert torch.equal(a, r)
    torch.testing.assert_close(m.sum(-2), torch.ones(1, 2, 4), atol=1e-5, rtol=0)
    assert list(tmp_path.iterdir()) == []


def test_off_switch():
    """``KVLAB_MHC_KERNEL=0`` turns the kernel off (read at import)."""
    code = "from kvlab.layers import mhc_kernel as k; print(k.ENABLED, k.library())"
    env = {**os.environ, "KVLAB_MHC_KERNEL": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split() == ["False", "None"]
