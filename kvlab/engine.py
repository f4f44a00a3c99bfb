"""Generation: chunked prefill, token-by-token decode, sampling, stop tokens, left-padded batches."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

from .compiled import check_backend, compiled_step
from .model import Model, left_padding


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens ``[B]`` from logits ``[B, V]``: greedy at temperature 0, else top-k / top-p sampling."""
    if temperature == 0.0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check(name: str, ok: bool, allowed: str, value) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r}: {allowed}")


@torch.inference_mode()
def generate(model: Model, input_ids: torch.Tensor, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             stop_tokens: Iterable[int] | None = None, attention_mask: torch.Tensor | None = None,
             lengths: Iterable[int] | None = None, prefill_chunk: int = 512, pad_token_id: int = 0,
             callback: Callable[[torch.Tensor], None] | None = None, compile: bool | str = False,
             stats: dict[str, Any] | None = None, kv_quant: Any = None) -> torch.Tensor:
    """Continue ``input_ids [B, T]`` by up to ``max_new_tokens``; returns ``[B, T + n]``.

    Batches of unequal lengths are left-padded: give ``attention_mask`` (1 = token) or ``lengths``
    (each row's real length, tokens right-aligned). Prefill runs in chunks of ``prefill_chunk``
    tokens so its peak memory is bounded by the chunk. A row stops at one of ``stop_tokens`` and is
    filled with ``pad_token_id`` after; generation ends when every row stopped. ``callback`` gets
    each step's new tokens ``[B]``.

    ``compile=True`` runs the decode step through ``torch.compile`` (kvlab/compiled.py: inductor, no CUDA graphs
    yet; one graph for the whole decode, built on the first step and kept on the model); greedy tokens are eager's.
    A backend name (``"eager"``, ``"aot_eager"``) traces without generating code. ``stats``, a dict, is filled
    with ``prefill_s``, ``decode_s`` (all steps), ``decode_steps``, ``first_step_s`` (the first decode step: the
    compile when compiled) and ``compiles`` (graphs compiled by this call). ``kv_quant``: the cache's K/V quantized
    (``"int8"``, ``"int4-g32-r64"``, a per-layer mapping...: ``Model.new_cache``; docs/kv-quantization.md).
    """
    cfg = model.config
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    b, t = input_ids.shape
    _check("max_new_tokens", isinstance(max_new_tokens, int) and max_new_tokens >= 0, "must be an integer >= 0",
           max_new_tokens)
    _check("temperature", temperature >= 0, "must be >= 0", temperature)
    _check("top_k", top_k is None or (isinstance(top_k, int) and top_k >= 1), "must be a positive integer", top_k)
    _check("top_p", top_p is None or 0 < top_p <= 1, "must be in (0, 1]", top_p)
    _check("prefill_chunk", isinstance(prefill_chunk, int) and prefill_chunk >= 1, "must be a positive integer",
           prefill_chunk)
    if t + max_new_tokens > cfg.max_positions:
        raise ValueError(f"prompt of {t} tokens + max_new_tokens={max_new_tokens} = {t + max_new_tokens} positions "
                         f"exceeds the model's max_positions={cfg.max_positions}")
    if lengths is not None:
        lens = torch.as_tensor(list(lengths), device=input_ids.device)
        if lens.shape != (b,) or bool((lens < 1).any()) or bool((lens > t).any()):
            raise ValueError(f"lengths must give each of the {b} rows a length in [1, {t}]")
        attention_mask = (torch.arange(t, device=input_ids.device)[None] >= (t - lens)[:, None]).long()
    pad = left_padding(attention_mask) if attention_mask is not None else None
    backend = check_backend(compile)
    if max_new_tokens == 0:
        if stats is not None:
            stats.update(prefill_s=0.0, first_step_s=0.0, decode_s=0.0, decode_steps=0, compiled=backend is not None,
                         compiles=0)
        return input_ids.clone()
    model.check_ids(input_ids)  # once, where input enters: the steps below read nothing back
    cache = model.new_cache(b, max_length=t + max_new_tokens, kv_quant=kv_quant)
    cache.set_padding(pad)
    step = compiled_step(model, backend) if backend else model.decode_step
    compiles = step.compiles if backend else 0
    clock = _Clock(input_ids.device, stats is not None)
    for s in range(0, t, prefill_chunk):
        logits = model(input_ids[:, s:s + prefill_chunk], cache=cache, last_only=True, check=False)
    prefill_s = clock.lap()
    first_s = 0.0
    stops = torch.tensor(sorted(set(stop_tokens or ())), dtype=torch.long, device=input_ids.device)
    gen = torch.Generator(device=input_ids.device).manual_seed(seed) if seed is not None else None
    out = torch.empty(b, t + max_new_tokens, dtype=torch.long, device=input_ids.device)
    out[:, :t] = input_ids
    done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
    n = 0
    for n in range(1, max_new_tokens + 1):
        nxt = sample(logits[:, -1], temperature, top_k, top_p, gen)
        nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
        out[:, t + n - 1] = nxt
        if callback is not None:
            callback(nxt)
        if stops.numel():
            done |= torch.isin(nxt, stops)
            if bool(done.all()):
                break
        if n < max_new_tokens:
            logits = step(nxt[:, None], cache)
            if n == 1:
                first_s = clock.lap()
    if stats is not None:
        stats.update(prefill_s=prefill_s, first_step_s=first_s, decode_s=first_s + clock.lap(),
                     decode_steps=max(n - 1, 0), compiled=backend is not None,
                     compiles=step.compiles - compiles if backend else 0)
    return out[:, :t + n]


class _Clock:
    """Wall-clock laps for ``generate``'s ``stats`` (synchronising a GPU only when asked for them)."""

    def __init__(self, device: torch.device, on: bool) -> None:
        self.device = device if on and device.type == "cuda" else None
        self.t = time.perf_counter()

    def lap(self) -> float:
        if self.device is not None:
            torch.cuda.synchronize(self.device)
        t, self.t = self.t, time.perf_counter()
        return self.t - t
