"""Small random model descriptions shared by the tests."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from kvlab.config import LayerSpec, ModelConfig, MoESpec, uniform_layers
from kvlab.model import Model


def require_kernel(monkeypatch, module: ModuleType, what: str) -> None:
    """Turn a C++ kernel's module (kvlab/layers/*_kernel.py, cpu_attend.py: ``ENABLED``, ``library()``) on for the
    test; fail when it does not build (a C++ compiler is a test requirement)."""
    monkeypatch.setattr(module, "ENABLED", True)
    if module.library() is None:
        pytest.fail(f"the C++ {what} kernel did not build (a C++ compiler is a test requirement)")


def count_calls(monkeypatch, module: ModuleType, record: dict[str, Callable[[tuple], object]]) -> list:
    """A proxy in front of a kernel module's loaded library (``module.KERNEL.lib``): each call of a function named in
    ``record`` appends ``record[name](args)`` to the returned list, then runs; the library's other functions as
    they are. What the custom ops call at run time is counted too (they read ``KERNEL.lib``)."""
    calls: list = []
    lib = module.KERNEL.lib

    class Counting:
        def __getattr__(self, name: str):
            fn = getattr(lib, name)
            if name not in record:
                return fn

            def counted(*a):
                calls.append(record[name](a))
                return fn(*a)
            return counted

    monkeypatch.setattr(module.KERNEL, "lib", Counting())
    return calls


def load_benchmark(name: str) -> ModuleType:
    """A script of benchmarks/ (outside the package; run outside CI) imported as a module, for tests of its pieces."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tiny_config(shared: bool = True, moe: bool = False, layers: int = 3, **overrides) -> ModelConfig:
    """A 3-layer model; with ``shared`` the last layer reads layer 1's K/V (not for cca: it cannot share)."""
    base = {"num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "intermediate_size": 64}
    base.update(overrides)
    specs = uniform_layers(layers, **base)
    if shared and base.get("attention") != "cca":
        specs[-1].kv_source = layers - 2
    if moe:
        specs[0].mlp = "moe"
        specs[0].moe = MoESpec(num_experts=4, top_k=2, expert_size=32, shared_experts=1)
    return ModelConfig(vocab_size=97, hidden_size=64, layers=specs, max_positions=512)


def random_model(cfg: ModelConfig, seed: int = 0) -> Model:
    model = Model.from_config(cfg, seed=seed, std=0.1)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-trivial sinks, norms and biases so they matter in the comparisons
        for name, p in model.named_parameters():
            if name.endswith(("sinks", "bias", "norm.weight")):
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


def train_steps(model: Model, ids: torch.Tensor, steps: int, lr: float = 3e-3) -> list[float]:
    """``steps`` AdamW steps of next-token cross-entropy on ``ids [B, T]``; the losses, one per step."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, model.config.vocab_size), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def assert_sweep_fails_before_training(raw: dict, message: str, tmp_path) -> None:
    """``kvlab ablate`` on the sweep ``raw`` exits with 2 and creates no run directory, and parsing it raises a
    ValueError containing ``message``."""
    import json
    import re

    import pytest

    from kvlab.cli import main
    from kvlab.train.ablate import parse_sweep

    f = tmp_path / "sweep.json"
    f.write_text(json.dumps(raw))
    assert main(["ablate", str(f), "--out", str(tmp_path / "runs")]) == 2
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_sweep(raw)


__all__ = ["LayerSpec", "assert_sweep_fails_before_training", "random_model", "tiny_config",
           "train_steps"]


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def save_text_checkpoint(d, eos_token_id: int | None = None):
    """A tiny random Llama checkpoint (vocab 258) with a byte-level BPE tokenizer (256 byte tokens, no merges,
    ``<|im_start|>`` = 256, ``<|im_end|>`` = 257), a ChatML template and ``eos_token_id`` in
    generation_config.json; returns the directory."""
    import json
    from pathlib import Path

    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from kvlab.bench import save_random_hf
    from kvlab.tokenizer import _bytes_to_unicode

    d = Path(d)
    cfg = ModelConfig(vocab_size=258, hidden_size=32, max_positions=1024, name="tiny-text",
                      layers=uniform_layers(2, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64))
    save_random_hf(cfg, d)
    vocab = {c: i for i, c in enumerate(_bytes_to_unicode()[b] for b in range(256))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML, "eos_token": "<|im_end|>",
                                                         "bos_token": "<|im_start|>"}))
    if eos_token_id is not None:
        (d / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_token_id}))
    return d


def with_shared_kv(model: Model, n: int) -> Model:
    """``model``'s weights under ``kvlab.sharing.share_last(config, n)``: the last ``n`` layers read an earlier
    layer's K/V, so their own K/V projections (and K norms) are dropped; every other tensor is carried as is.
    (A test stand-in for kvlab.retrofit's public conversion.)"""
    from kvlab.sharing import share_last

    new = Model.from_config(share_last(model.config, n))
    state = model.state_dict()
    new.load_state_dict({k: state[k] for k in new.state_dict()}, strict=True)
    return new.eval()


def save_native(model: Model, d) -> None:
    """Write ``model`` as a kvlab checkpoint directory: ``model.safetensors`` (kvlab names) + its ModelConfig as
    ``config.json`` (loadable by kvlab.load, kvlab/native.py)."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(model.config.to_dict()))


def fake(x: torch.Tensor, spec, buf, upto: int) -> torch.Tensor:
    """The quantization oracle: ``x [B, H, L, D]`` with positions ``< upto`` passed through quantize-dequantize as a
    quantized cache groups them (per token in groups of channels, or keys per channel in groups of positions),
    rotated if asked (``spec`` a kvlab.costs.quant.QuantSpec, ``buf`` the kvlab.kinds.Buffer it fills)."""
    from kvlab.cache.quant import dequantize, quantize, rotate
    from kvlab.costs.quant import layout

    lay = layout(spec, buf)
    out = x.clone()
    if upto <= 0:
        return out
    q = x[..., :upto, :lay["dq"]].float()  # the rotary tail (``rope_exact``) stays exact
    block = lay["dq"] & -lay["dq"] if spec.rotate and buf.key else 0
    q = rotate(q, block) if block else q
    if lay["span"] > 1:
        g = q.reshape(*q.shape[:-2], upto // lay["span"], lay["span"], lay["dq"])
        c, s, z = quantize(g, spec, -2)
        d = dequantize(c, s, z, spec, -2).reshape(q.shape)
    else:
        g = q.reshape(*q.shape[:-1], lay["dq"] // lay["group"], lay["group"])
        c, s, z = quantize(g, spec, -1)
        d = dequantize(c, s, z, spec, -1).reshape(q.shape)
    out[..., :upto, :lay["dq"]] = (rotate(d, block) if block else d).to(x.dtype)
    return out


class FakeRows:
    """The storage oracle of one quantized buffer: the exact values of every position written (a ring's evicted
    ones too), read back through :func:`fake` at the positions a quantized buffer holds quantized -- those before
    ``floor((n - R) / span) * span`` of the ``n`` written (every position when the buffer has no residual window:
    quantized when written). Same interface as kvlab.cache.storage.Rows (and QuantRows' ``view``), none of
    QuantRows' code (codes, packing, scales, ring groups, residual slots, blocked reads)."""

    def __init__(self, buf, spec, lead: tuple[int, ...], dtype: torch.dtype, device, max_length: int | None = None):
        from kvlab.costs.quant import layout

        self.buf, self.spec, self.ring = buf, spec, buf.ring is not None
        self.span = layout(spec, buf)["span"]
        self.hist = torch.zeros(*lead, 0, buf.dim, dtype=dtype, device=device)  # by position
        self.cap = 0
        self.n = 0

    @property
    def capacity(self) -> int:
        return self.cap

    def _grow(self, n: int) -> None:
        if self.hist.shape[-2] < n:
            more = self.hist.new_zeros(*self.hist.shape[:-2], n - self.hist.shape[-2], self.hist.shape[-1])
            self.hist = torch.cat((self.hist, more), dim=-2)

    def resize(self, capacity: int, keep: int) -> None:
        self.cap = capacity
        self._grow(0 if self.ring else capacity)

    def write(self, start: int, x: torch.Tensor, rows: slice | None = None) -> None:
        end = start + x.shape[-2]
        self._grow(end)
        (self.hist if rows is None else self.hist[rows])[..., start:end, :] = x
        self.n = max(self.n, end)

    def write_rows(self, at: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> None:
        rows = torch.arange(x.shape[0])
        slot = at.clamp(0, max(self.cap - 1, 0))
        self.hist[rows, slot] = torch.where(mask[:, None], x[:, 0], self.hist[rows, slot])

    def write_at(self, rows: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> None:
        self.hist[rows, slots] = x

    def read(self, n: int | None = None, rows: slice | None = None) -> torch.Tensor:
        n = self.cap if n is None else n
        upto = max(0, self.n - self.spec.residual) // self.span * self.span if self.buf.residual else self.hist.shape[-2]
        f = fake(self.hist, self.spec, self.buf, upto)
        f = f if rows is None else f[rows]
        if not self.ring:
            return f[..., :n, :]
        s = torch.arange(n)
        p = s + self.cap * torch.div(self.n - 1 - s, self.cap, rounding_mode="floor")  # the position slot s holds
        return torch.where((p >= 0)[:, None], f.index_select(-2, p.clamp(min=0)), 0)

    def view(self, n: int, heads: bool = False) -> torch.Tensor:
        t = self.read(n)
        return t[:, None] if heads else t

    def tensors(self) -> list[torch.Tensor]:
        return [self.hist]


def fake_storage_decode(model: Model, kv_quant: str, monkeypatch, pad: tuple[int, ...] = (0, 3), n_total: int = 30,
                        prefill: int = 11) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The decode oracle of every kind: a left-padded batch prefilled (``prefill`` tokens) then decoded one token at a
    time up to ``n_total`` through a ``kv_quant`` cache and, call for call, through the same cache with each
    quantized buffer replaced by a :class:`FakeRows` (the kind's store unchanged: what it writes and reads, in
    which order, at which positions; the values it reads passed through :func:`fake` at the positions held
    quantized) and through an unquantized cache. Yields ``(n, step, want, exact)``: the last logits of each after
    ``n`` positions."""
    from kvlab.cache import storage

    b = len(pad)
    ids = torch.randint(0, model.config.vocab_size, (b, n_total), generator=torch.Generator().manual_seed(7))
    pads = torch.tensor(pad)
    caches = [model.new_cache(b, max_length=n_total, kv_quant=kv_quant)]
    with monkeypatch.context() as m:
        m.setattr(storage, "QuantRows", FakeRows)
        caches.append(model.new_cache(b, max_length=n_total, kv_quant=kv_quant))
    caches.append(model.new_cache(b, max_length=n_total))
    for c in caches:
        c.set_padding(pads)
        model(ids[:, :prefill], cache=c)
    for n in range(prefill + 1, n_total + 1):
        yield n, *(model(ids[:, n - 1:n], cache=c)[:, -1] for c in caches)


def fake_quantized_decode(model: Model, kv_quant: str, monkeypatch, n_total: int = 30, prefill: int = 11
                          ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The decode oracle of a quantized GQA / CCA cache: prefill ``prefill`` tokens (a batch of 2) through a
    ``kv_quant`` cache, then decode one token at a time up to ``n_total``; yields ``(n, step, want)`` per step: the
    step's last logits and those of a full forward of the same ``n`` tokens whose K/V pass through :func:`fake` at
    exactly the positions the cache holds quantized after ``n`` writes (a position leaves the residual in groups).

    The oracle quantizes the K/V the cache was handed (recorded as each layer published them), not its own
    recomputation: a matmul over 1 row and one over ``n`` rows may differ in the last bits (AVX2 kernels do), and a
    value on a rounding boundary then lands on another code, a jump a tolerance cannot tell from a bug. That the
    recomputed K/V agree with the recorded ones within 1e-5 is checked at every layer and step."""
    from kvlab.costs.quant import Buffer, layout, parse_quant
    from kvlab.layers import attention, cca

    cfg = model.config
    spec = parse_quant(kv_quant)
    kb = Buffer("kv", "k", 1, 0, cfg.layers[0].head_dim, key=True)
    vb = Buffer("kv", "v", 1, 0, cfg.layers[0].value_dim)
    ids = torch.randint(0, cfg.vocab_size, (2, n_total), generator=torch.Generator().manual_seed(5))
    cache = model.new_cache(2, max_length=n_total, kv_quant=kv_quant)
    real = attention.publish_kv
    handed: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def record(step_, index, store, k, v):
        handed.setdefault(index, []).append((k.clone(), v.clone()))
        return real(step_, index, store, k, v)

    def run(x: torch.Tensor) -> torch.Tensor:
        with monkeypatch.context() as m:
            m.setattr(attention, "publish_kv", record)
            m.setattr(cca, "publish_kv", record)
            return model(x, cache=cache)

    run(ids[:, :prefill])
    for n in range(prefill + 1, n_total + 1):
        step = run(ids[:, n - 1:n])[:, -1]
        upto = {b.name: max(0, n - spec.residual) // layout(spec, b)["span"] * layout(spec, b)["span"] for b in (kb, vb)}

        def fake_publish(step_, index, store, k, v, upto=upto):
            hk, hv = (torch.cat(parts, dim=2) for parts in zip(*handed[index]))
            torch.testing.assert_close(hk, k, atol=1e-5, rtol=0)  # only the last bits may differ
            torch.testing.assert_close(hv, v, atol=1e-5, rtol=0)
            return real(step_, index, store, fake(hk, spec, kb, upto["k"]), fake(hv, spec, vb, upto["v"]))

        with monkeypatch.context() as m:
            m.setattr(attention, "publish_kv", fake_publish)
            m.setattr(cca, "publish_kv", fake_publish)
            want = model(ids[:, :n])[:, -1]
        yield ids[:, :n], step, want
