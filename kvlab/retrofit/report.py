"""What a retrofit costs against what it saves, on real text: one row per (conversion, recovery budget).

Quality: perplexity and KL divergence of the converted model against the original on the same tokens
(kvlab/eval/kl.py: llama.cpp's convention, through each model's own cache), top-1 agreement, and needle retrieval
accuracy by length and depth (kvlab/eval/needle.py). Savings: KV-cache bytes at 4K / 32K / 128K from the
calculator, the measured cache of the converted model after a prefill of the evaluation window next to the
calculated bytes, and the cache it allocates at each of 4K / 32K / 128K within its positions (all must be equal),
parameters, and decode tokens/s (kvlab/bench.py's timed loop, same process).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..cache import Cache
from ..costs import costs
from ..model import Model
from ..units import fmt_bytes

CONTEXTS = (4096, 32768, 131072)


def _dtype_name(model: Model) -> str:
    return str(model.embed.weight.dtype).removeprefix("torch.")


def kv_bytes(model: Model, contexts: Sequence[int] = CONTEXTS) -> dict[str, int]:
    """Calculated KV-cache bytes (batch 1, the model's dtype, its cache format) at each context, keyed by context."""
    q = getattr(model, "kv_quant", None)
    return {str(n): costs(model.config, context=n, dtype=_dtype_name(model), kv_quant=q).kv_cache_bytes
            for n in contexts}


@torch.no_grad()
def cache_bytes(model: Model, ids: Sequence[int]) -> tuple[int, int]:
    """(measured, calculated) bytes of the model's own cache (its format) after a prefill of ``ids``, allocated for
    exactly ``len(ids)`` positions."""
    n = len(ids)
    cache = model.new_cache(1, n)
    model(torch.tensor([list(ids)], device=model.embed.weight.device), cache=cache)
    calc = costs(model.config, context=n, dtype=_dtype_name(model), kv_quant=getattr(model, "kv_quant", None))
    return cache.nbytes(), calc.kv_cache_bytes


def allocated_bytes(model: Model, contexts: Sequence[int] = CONTEXTS) -> dict[str, dict[str, int]]:
    """``{context: {"allocated", "calculated"}}``: the bytes of the cache the model allocates for each context (batch
    1, its dtype and cache format, preallocated on the meta device: no memory used) beside the calculator's, for the
    contexts within the model's positions (a cache longer than them is refused)."""
    q = getattr(model, "kv_quant", None)
    dtype = model.embed.weight.dtype
    return {str(n): {"allocated": Cache(model.config, 1, n, dtype=dtype, device="meta", kv_quant=q).nbytes(),
                     "calculated": costs(model.config, context=n, dtype=_dtype_name(model), kv_quant=q).kv_cache_bytes}
            for n in contexts if n <= model.config.max_positions}


def measure(reference: Model, variant: Model, ids: Sequence[int], prefix: Sequence[int] = (), length: int = 2048,
            tok: Any = None, text: str | None = None, needle_lengths: Sequence[int] = (),
            needle_depths: Sequence[float] = (0.1, 0.5, 0.9), trials: int = 1, seed: int = 0,
            decode_context: int = 1024, decode_tokens: int = 16, progress: bool = False) -> dict[str, Any]:
    """One report row for ``variant`` against ``reference`` (see the module docstring). ``ids``: text tokens;
    ``length``: positions per KL window (BOS ``prefix`` included); needle retrieval when ``needle_lengths`` (needs
    ``tok`` and ``text``); decode speed at ``decode_context`` (0: skipped)."""
    from ..eval.kl import kl_divergence  # the evaluations (tokenizers) when a row is measured
    from ..eval.needle import needle_test

    t0 = time.perf_counter()
    n = min(len(ids), length - len(prefix))
    k = kl_divergence(reference, variant, list(ids[:n]), length, None, prefix, 256, progress)
    row: dict[str, Any] = {
        "model": variant.config.name, "params": variant.num_parameters(),
        "eval_tokens": k.tokens, "window": length,
        "ppl": k.variant_ppl, "ref_ppl": k.ref_ppl, "kl": k.mean_kl, "kl_se": k.kl_se, "kl_p99": k.p99_kl,
        "top1": k.top1, "top1_se": k.top1_se,
        "kv_bytes": kv_bytes(variant), "ref_kv_bytes": kv_bytes(reference),
    }
    row["kv_ratio_32k"] = row["kv_bytes"]["32768"] / row["ref_kv_bytes"]["32768"]
    if needle_lengths:
        if tok is None or text is None:
            raise ValueError("needle retrieval needs the tokenizer and the text")
        r = needle_test(variant, tok, text, list(needle_lengths), list(needle_depths), trials, seed, progress)
        row["needle"] = {"lengths": list(needle_lengths), "depths": list(needle_depths), "trials": trials,
                         "seed": seed, "accuracy": r.accuracy, "overall": r.overall}
    measured, calculated = cache_bytes(variant, list(prefix) + list(ids[:n]))
    allocated = allocated_bytes(variant)
    match = measured == calculated and all(a["allocated"] == a["calculated"] for a in allocated.values())
    row["cache"] = {"context": len(prefix) + n, "measured": measured, "calculated": calculated, "allocated": allocated,
                    "match": match}
    if decode_context:
        row["decode"] = decode_speed(variant, decode_context, decode_tokens)
    row["seconds"] = time.perf_counter() - t0
    return row


def decode_speed(model: Model, context: int = 1024, tokens: int = 16) -> dict[str, Any]:
    """Greedy decode tokens/s of ``model`` (batch 1) after a prefill of ``context`` positions (capped at the model's
    positions), kvlab's benchmark: ``{"context", "tok_s"}``."""
    from ..bench import bench_kvlab

    ctx = min(context, model.config.max_positions - tokens)
    b = bench_kvlab(model, [ctx], tokens, _dtype_name(model), progress=False)[0]
    return {"context": ctx, "tok_s": b["decode_tok_s"]}


def plot_frontier(rows: Sequence[dict[str, Any]], path: str | Path, title: str) -> Path:
    """KV bytes at 32K (x, log) against KL divergence from the original (y, log) for every row; a conversion's
    point before recovery (hollow) is joined to its points after recovery (filled) by an arrow; the original
    model's KV bytes is the dashed line."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    techs = list(dict.fromkeys(r["technique"] for r in rows))
    cmap = plt.get_cmap("tab10")
    markers = "osD^vP*Xh<>"
    for i, t in enumerate(techs):
        mine = [r for r in rows if r["technique"] == t]
        color, marker = cmap(i % 10), markers[i % len(markers)]
        before = [r for r in mine if not r.get("recovery_steps")]
        after = [r for r in mine if r.get("recovery_steps")]
        for r in before:
            ax.scatter(r["kv_bytes"]["32768"], max(r["kl"], 1e-5), facecolors="none", edgecolors=[color], marker=marker,
                       s=70, label=f"{t} (converted)")
        for r in after:
            ax.scatter(r["kv_bytes"]["32768"], max(r["kl"], 1e-5), color=color, marker=marker, s=70,
                       label=f"{t} (+{r['recovery_steps']} steps, seed {r.get('seed', 0)})")
            if before:
                ax.annotate("", xy=(r["kv_bytes"]["32768"], max(r["kl"], 1e-5)),
                            xytext=(before[0]["kv_bytes"]["32768"], max(before[0]["kl"], 1e-5)),
                            arrowprops={"arrowstyle": "->", "color": color, "alpha": 0.6})
    if rows:
        ax.axvline(rows[0]["ref_kv_bytes"]["32768"], ls="--", color="gray", lw=1, label="original model's KV")
    ax.set_xscale("log", base=2)  # ticks at powers of two, written as bytes (MiB, GiB), the data's range inside them
    xs = [r["kv_bytes"]["32768"] for r in rows] + ([rows[0]["ref_kv_bytes"]["32768"]] if rows else [])
    if xs and min(xs) > 0:
        ax.set_xlim(2 ** math.floor(math.log2(min(xs)) - 0.05), 2 ** math.ceil(math.log2(max(xs)) + 0.05))
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=2, numticks=8))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: fmt_bytes(v, short=True)))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_yscale("log")
    ax.set_xlabel("KV cache at 32K context, batch 1 (bytes, calculator; = measured cache)")
    ax.set_ylabel("KL divergence from the original (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    seen = dict(zip(labels, handles))
    ax.legend(seen.values(), seen.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")  # the title and the legend beside the axes, whole
    plt.close(fig)
    return out
