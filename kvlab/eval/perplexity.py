"""Perplexity and mean log-likelihood of a text, computed through the model's cache.

The text's tokens are cut into windows of ``window`` positions (the model's BOS, when its tokenizer adds one,
opens every window), each starting ``stride`` text tokens after the previous one (by default: back to back, or
overlapping by one token without a BOS, whose first token has no context); a window scores only the tokens no
earlier window scored, so every token is scored once, with up to ``window`` positions of context.
Each window is prefilled in chunks of ``chunk`` tokens into ``model.new_cache`` -- the cache policy of every
layer (sliding windows, shared K/V, compressed or quantized stores) is what is measured, not a full-attention
forward pass. (The sliding-window perplexity of Hugging Face's "Perplexity of fixed-length models" guide.)
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import torch

from ..model import Model


class EvalError(ValueError):
    """Settings an evaluation cannot run with (window, stride, lengths, mismatched models)."""


@dataclass(frozen=True)
class Window:
    """Text tokens ``[start, end)`` in one window; those from ``score_from`` on are scored."""

    start: int
    end: int
    score_from: int


def plan_windows(n_tokens: int, window: int, stride: int | None = None, prefix: int = 0) -> list[Window]:
    """The windows covering ``n_tokens`` text tokens (``prefix`` positions of each window go to the BOS)."""
    span = window - prefix
    if span < 2:
        raise EvalError(f"window={window} leaves {span} text positions after the {prefix}-token prefix: need >= 2")
    # without a BOS a window's first token has no context: consecutive windows overlap by at least one token
    most = span if prefix else span - 1
    stride = most if stride is None else stride
    if not 1 <= stride <= most:
        raise EvalError(f"stride={stride} must lie in [1, {most}] (window {window}"
                        f"{f' less the {prefix}-token BOS prefix' if prefix else ' less one token of overlap'})")
    if n_tokens < 2:
        raise EvalError(f"the text has {n_tokens} token(s): need at least 2")
    out, done, start = [], 0, 0
    while True:
        end = min(start + span, n_tokens)
        first = max(done, start if prefix else start + 1)
        out.append(Window(start, end, first))
        done = end
        if end == n_tokens:
            return out
        start += stride


def scored_logits(model: Model, ids: Sequence[int], window: int, stride: int | None = None,
                  prefix: Sequence[int] = (), chunk: int = 256, progress: bool = False,
                  desc: str = "tokens") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(logits [n, V] fp32, targets [n])`` for every scored text token, chunk by chunk, in text order.

    Each window runs on a fresh ``model.new_cache(1, max_length=len(window))`` fed ``chunk`` tokens at a time.
    """
    if chunk < 1:
        raise EvalError(f"chunk={chunk} must be >= 1")
    dev = model.embed.weight.device
    text = torch.as_tensor(list(ids), dtype=torch.long)
    plan = plan_windows(len(text), window, stride, len(prefix))
    if len(prefix) + plan[0].end - plan[0].start > model.config.max_positions:
        raise EvalError(f"window={window} exceeds the model's max_positions={model.config.max_positions}")
    bar = _bar(sum(w.end - w.score_from for w in plan), progress, desc)
    pre = torch.as_tensor(list(prefix), dtype=torch.long)
    for w in plan:
        seq = torch.cat([pre, text[w.start:w.end]]).to(dev)
        # position p of seq predicts seq[p + 1]; the scored targets are text[score_from:end]
        first = len(pre) + (w.score_from - w.start) - 1
        cache = model.new_cache(1, max_length=len(seq))
        for s in range(0, len(seq), chunk):
            with torch.no_grad():  # per call: a grad mode held across the yield would leak into the caller
                logits = model(seq[None, s:s + chunk], cache=cache)[0]
            lo, hi = max(s, first), min(s + chunk, len(seq) - 1)
            if lo < hi:
                bar.update(hi - lo)
                yield logits[lo - s:hi - s].float(), seq[lo + 1:hi + 1]
    bar.close()


def _bar(total: int, show: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tok", file=sys.stderr, disable=not show, leave=False)


@dataclass(frozen=True)
class Perplexity:
    """Mean negative log-likelihood (nats/token) over ``tokens`` scored tokens, with its standard error."""

    tokens: int
    windows: int
    window: int
    stride: int
    mean_nll: float
    nll_se: float

    @property
    def ppl(self) -> float:
        return math.exp(self.mean_nll)

    @property
    def ppl_se(self) -> float:
        """The perplexity's standard error (delta method: ppl * se(nll)), as llama.cpp reports it."""
        return self.ppl * self.nll_se

    @property
    def mean_loglik(self) -> float:
        return -self.mean_nll

    def as_dict(self) -> dict[str, float | int]:
        return {**asdict(self), "ppl": self.ppl, "ppl_se": self.ppl_se, "mean_loglik": self.mean_loglik}


def token_nll(model: Model, ids: Sequence[int], window: int, stride: int | None = None, prefix: Sequence[int] = (),
              chunk: int = 256, progress: bool = False) -> torch.Tensor:
    """Negative log-likelihood ``[n]`` (fp32, nats) of every scored text token, through the cache."""
    out = [torch.nn.functional.cross_entropy(lg, tgt, reduction="none")
           for lg, tgt in scored_logits(model, ids, window, stride, prefix, chunk, progress, "perplexity")]
    return torch.cat(out).cpu()


def perplexity(model: Model, ids: Sequence[int], window: int, stride: int | None = None, prefix: Sequence[int] = (),
               chunk: int = 256, progress: bool = False) -> Perplexity:
    """Perplexity of the text ``ids`` with windows of ``window`` positions (see the module docstring)."""
    nll = token_nll(model, ids, window, stride, prefix, chunk, progress)
    plan = plan_windows(len(ids), window, stride, len(prefix))
    step = plan[1].start - plan[0].start if len(plan) > 1 else (stride or window - len(prefix) - (not prefix))
    return summarize(nll, len(plan), window, step)


def summarize(nll: torch.Tensor, windows: int, window: int, stride: int) -> Perplexity:
    """The :class:`Perplexity` of per-token NLLs ``[n]``."""
    nll = nll.double()
    n = nll.numel()
    se = float(nll.std() / math.sqrt(n)) if n > 1 else float("nan")
    return Perplexity(n, windows, window, stride, float(nll.mean()), se)


def perplexity_at(model: Model, ids: Sequence[int], lengths: Sequence[int], prefix: Sequence[int] = (),
                  chunk: int = 256, progress: bool = False) -> list[Perplexity]:
    """Perplexity of the first ``n`` positions (BOS included) for each ``n`` in ``lengths``, from ONE window of
    ``max(lengths)`` positions: attention is causal, so the first ``n`` positions of a longer window see exactly
    what a window of ``n`` would (the cache policy included)."""
    top = max(lengths)
    if min(lengths) < 2:
        raise EvalError(f"lengths {list(lengths)}: each must be >= 2 positions")
    if len(prefix) + len(ids) < top:
        raise EvalError(f"length {top:,} needs {top - len(prefix):,} text tokens, the text has {len(ids):,}")
    nll = token_nll(model, list(ids[:top - len(prefix)]), top, None, prefix, chunk, progress)
    return [summarize(nll[:n - 1], 1, n, n - 1) for n in lengths]  # positions 1..n-1 are predicted
