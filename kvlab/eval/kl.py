"""KL divergence of a variant's next-token distribution against a reference's, on the same tokens.

The convention of llama.cpp's ``perplexity --kl-divergence`` (used there to rank KV-cache and weight types):
for every scored token, ``KL(P_ref || P_var) = sum_v P_ref(v) (log P_ref(v) - log P_var(v))`` and whether both
pick the same top-1 token; reported as the mean with its standard error, the median, 99th percentile and maximum
of the per-token KL, and the top-1 agreement with its binomial standard error. Both models run window by window
through their own caches (kvlab/eval/perplexity.py), in lockstep, so no logits are kept beyond one chunk.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import torch

from ..model import Model
from .perplexity import EvalError, scored_logits


@dataclass(frozen=True)
class KLResult:
    """Per-token KL(reference || variant) in nats and top-1 agreement, over ``tokens`` scored tokens."""

    tokens: int
    mean_kl: float
    kl_se: float
    median_kl: float
    p99_kl: float
    max_kl: float
    top1: float
    top1_se: float
    ref_nll: float
    variant_nll: float

    @property
    def ref_ppl(self) -> float:
        return math.exp(self.ref_nll)

    @property
    def variant_ppl(self) -> float:
        return math.exp(self.variant_nll)

    def as_dict(self) -> dict[str, float | int]:
        return {**asdict(self), "ref_ppl": self.ref_ppl, "variant_ppl": self.variant_ppl}


def kl_divergence(reference: Model, variant: Model, ids: Sequence[int], window: int, stride: int | None = None,
                  prefix: Sequence[int] = (), chunk: int = 256, progress: bool = False) -> KLResult:
    """KL of ``variant`` against ``reference`` on the text ``ids`` (same windows for both; see the module doc)."""
    if reference.config.vocab_size != variant.config.vocab_size:
        raise EvalError(f"reference and variant have different vocabularies ({reference.config.vocab_size:,} vs "
                        f"{variant.config.vocab_size:,} tokens): KL needs the same one")
    ref_it = scored_logits(reference, ids, window, stride, prefix, chunk, progress, "KL divergence")
    var_it = scored_logits(variant, ids, window, stride, prefix, chunk, False)
    return kl_from_logits((lr, lv, tgt) for (lr, tgt), (lv, _) in zip(ref_it, var_it, strict=True))


def kl_from_logits(chunks: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> KLResult:
    """The :class:`KLResult` of ``(reference logits [n, V], variant logits [n, V], targets [n])`` chunks, in text
    order: logits of the same scored tokens from any two runs (another engine's included, e.g. llama.cpp's)."""
    kls, agree, nll_r, nll_v = [], [], [], []
    for lr, lv, tgt in chunks:
        if lr.shape != lv.shape or lr.ndim != 2 or tgt.shape != lr.shape[:1]:
            raise EvalError(f"KL needs reference and variant logits of one shape [n, V] and targets [n]; got "
                            f"{tuple(lr.shape)}, {tuple(lv.shape)} and {tuple(tgt.shape)}")
        lp_r, lp_v = lr.float().log_softmax(-1), lv.to(lr.device).float().log_softmax(-1)
        tgt = tgt.to(lr.device)
        kls.append((lp_r.exp() * (lp_r - lp_v)).sum(-1).clamp(min=0).double().cpu())  # clamp: fp rounding below 0
        agree.append((lp_r.argmax(-1) == lp_v.argmax(-1)).cpu())
        nll_r.append(-lp_r.gather(-1, tgt[:, None])[:, 0].double().cpu())
        nll_v.append(-lp_v.gather(-1, tgt[:, None])[:, 0].double().cpu())
    if not kls:
        raise EvalError("KL needs at least one scored token")
    kl, top = torch.cat(kls), torch.cat(agree).double()
    n = kl.numel()
    p = float(top.mean())
    return KLResult(n, float(kl.mean()), float(kl.std() / math.sqrt(n)) if n > 1 else float("nan"),
                    float(kl.median()), float(kl.quantile(0.99)), float(kl.max()), p, math.sqrt(p * (1 - p) / n),
                    float(torch.cat(nll_r).mean()), float(torch.cat(nll_v).mean()))
