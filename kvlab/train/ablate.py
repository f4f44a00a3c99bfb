"""Ablations: variants of one base model, parameter-matched, trained over several seeds, compared honestly.

A sweep file (JSON or TOML) holds a base training config and the variants::

    context = "32k"            # KV bytes are priced at this context (kvlab.costs)
    seeds = [0, 1, 2]
    param_tolerance = 0.05     # every variant within 5% of the first variant's parameter count
    [base]                     # a training config: model, task, train (docs/training.md)
    ...
    [[variants]]
    name = "baseline GQA"      # the first variant is the baseline
    [[variants]]
    name = "sliding 3:1"
    sliding = { window = 16, global_every = 4 }
    [[variants]]
    name = "KV sharing"
    share_adjacent = 2         # or share_last = n
    [[variants]]
    name = "MQA"
    layer_overrides = { num_kv_heads = 1 }   # any LayerSpec fields, every layer; `model` sets top-level fields

Parameter matching adjusts the MLP width of every dense layer (a bisection) until the variant's
parameter count is within the tolerance of the baseline's; when no width gets there, the sweep fails
before anything trains, naming the variant. Differences are tested with Welch's t-test against the
baseline; the table marks those with p < 0.05 and says nothing else is a difference.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics
from pathlib import Path
from typing import Any

from kvlab.config import ModelConfig

from .config import parse_config, read_file

VARIANT_FIELDS = ("name", "layer_overrides", "model", "sliding", "share_last", "share_adjacent")
SWEEP_FIELDS = ("base", "variants", "seeds", "context", "param_tolerance", "out")


# -- statistics ----------------------------------------------------------------------------------------
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        de = d * c
        h *= de
        if abs(de - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """Two-sided p-value of Student's t with ``df`` degrees of freedom."""
    if math.isnan(t) or df <= 0:
        return float("nan")
    return betainc(df / 2, 0.5, df / (df + t * t))


def welch(a: list[float], b: list[float]) -> dict[str, float]:
    """Welch's unequal-variance t-test of mean(a) - mean(b): t, Welch-Satterthwaite df, two-sided p."""
    if len(a) < 2 or len(b) < 2:
        return {"t": float("nan"), "df": float("nan"), "p": float("nan")}
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    diff = statistics.fmean(a) - statistics.fmean(b)
    if va + vb == 0:
        return {"t": float("inf") if diff else float("nan"), "df": float("inf"), "p": 0.0 if diff else 1.0}
    t = diff / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return {"t": t, "df": df, "p": t_two_sided_p(t, df)}


# -- variants and parameter matching -----------------------------------------------------------------
def num_params(cfg: ModelConfig) -> int:
    from kvlab.costs import costs

    return costs(cfg, context=1, dtype="float32").params_total


def apply_variant(base: ModelConfig, v: dict[str, Any]) -> ModelConfig:
    """The base model with a variant's changes (an error names the variant and the field)."""
    from kvlab.sharing import share_adjacent, share_last

    name = v.get("name")
    try:
        cfg = copy.deepcopy(base)
        over = v.get("layer_overrides") or {}
        known = {f.name for f in dataclasses.fields(cfg.layers[0])}
        bad = sorted(set(over) - known)
        if bad:
            raise ValueError(f"layer_overrides: unknown LayerSpec field(s) {bad}")
        layers = [dataclasses.replace(x, **over) for x in cfg.layers]
        if "sliding" in v:
            s = v["sliding"]
            if not isinstance(s, dict) or set(s) - {"window", "global_every"} or "window" not in s:
                raise ValueError("sliding: a table {window = W, global_every = N} (N: every Nth layer stays global)")
            every = s.get("global_every", 0)
            layers = [dataclasses.replace(x, window=None if every and i % every == every - 1 else s["window"])
                      for i, x in enumerate(layers)]
        top = dict(v.get("model") or {})
        cfg = dataclasses.replace(cfg, layers=layers, **top)
        if "share_last" in v:
            cfg = share_last(cfg, v["share_last"])
        if "share_adjacent" in v:
            cfg = share_adjacent(cfg, v["share_adjacent"])
        return dataclasses.replace(cfg, name=str(name))
    except (TypeError, ValueError) as e:
        raise ValueError(f"variant {name!r}: {e}") from e


def match_params(cfg: ModelConfig, target: int, tolerance: float, name: str) -> ModelConfig:
    """``cfg`` with every dense MLP width scaled so its parameter count is within ``tolerance`` of ``target``."""
    if abs(num_params(cfg) - target) <= tolerance * target:
        return cfg
    widths = [x.intermediate_size for x in cfg.layers]

    def scaled(f: float) -> ModelConfig:
        return dataclasses.replace(cfg, layers=[dataclasses.replace(x, intermediate_size=max(1, round(w * f)))
                                                if w else x for x, w in zip(cfg.layers, widths)])

    lo, hi = 1e-3, 64.0
    if not any(widths) or not num_params(scaled(lo)) <= target <= num_params(scaled(hi)):
        raise ValueError(f"variant {name!r}: {num_params(cfg):,} parameters; no MLP width brings it within "
                         f"{tolerance:.0%} of the baseline's {target:,} (the parameter budget cannot be matched)")
    best = cfg
    for _ in range(60):
        mid = (lo * hi) ** 0.5
        best = scaled(mid)
        n = num_params(best)
        if abs(n - target) <= tolerance * target / 4:
            break
        lo, hi = (mid, hi) if n < target else (lo, mid)
    if abs(num_params(best) - target) > tolerance * target:
        raise ValueError(f"variant {name!r}: parameters cannot be matched within {tolerance:.0%} of {target:,}")
    return best


def parse_sweep(raw: dict[str, Any]) -> dict[str, Any]:
    """Validate a sweep and build every variant's training config (matched) before anything trains."""
    from kvlab.units import parse_context

    unknown = sorted(set(raw) - set(SWEEP_FIELDS))
    if unknown:
        raise ValueError(f"sweep: unknown field(s) {unknown}; allowed: {list(SWEEP_FIELDS)}")
    for k in ("base", "variants"):
        if k not in raw:
            raise ValueError(f"sweep: missing field {k!r}")
    variants = raw["variants"]
    if not isinstance(variants, list) or not variants:
        raise ValueError("sweep.variants: a non-empty list of variant tables (the first is the baseline)")
    seeds = raw.get("seeds", [0, 1, 2])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ValueError(f"sweep.seeds={seeds!r}: a non-empty list of integers >= 0")
    tol = raw.get("param_tolerance", 0.05)
    if not isinstance(tol, (int, float)) or not 0 < tol < 1:
        raise ValueError(f"sweep.param_tolerance={tol!r}: a fraction in (0, 1)")
    base = parse_config(raw["base"])
    context = parse_context(str(raw.get("context", base.task.seq_len)))
    names = set()
    built = []
    target = None
    for i, v in enumerate(variants):
        if not isinstance(v, dict) or "name" not in v:
            raise ValueError(f"sweep.variants[{i}]: missing field 'name'")
        bad = sorted(set(v) - set(VARIANT_FIELDS))
        if bad:
            raise ValueError(f"variant {v['name']!r}: unknown field(s) {bad}; allowed: {list(VARIANT_FIELDS)}")
        if v["name"] in names:
            raise ValueError(f"variant {v['name']!r} appears twice")
        names.add(v["name"])
        cfg = apply_variant(base.model, v)
        target = num_params(cfg) if target is None else target
        cfg = match_params(cfg, target, tol, v["name"])
        built.append({"name": v["name"], "model": cfg, "params": num_params(cfg)})
    return {"base": base, "variants": built, "seeds": seeds, "context": context, "tolerance": tol,
            "out": raw.get("out")}


def run_sweep(path_or_raw: str | Path | dict[str, Any], out: str | Path | None = None,
              progress: bool = False) -> dict[str, Any]:
    """Train every variant and seed; returns the rows of the table (means, std, Welch p vs the baseline)."""
    from kvlab.costs import costs

    from .trainer import train

    raw = read_file(path_or_raw) if not isinstance(path_or_raw, dict) else path_or_raw
    sweep = parse_sweep(raw)
    out = Path(out or sweep["out"] or "runs/ablate")
    base = sweep["base"]
    rows = []
    for k, v in enumerate(sweep["variants"]):
        runs = []
        for seed in sweep["seeds"]:
            cfg = dataclasses.replace(base, model=v["model"], train=dataclasses.replace(base.train, seed=seed))
            r = train(cfg, out=out / f"v{k}-seed{seed}", progress=progress).summary
            runs.append(r)
        ev = [r["eval"] or {} for r in runs]
        rows.append({
            "name": v["name"], "params": v["params"],
            "kv_cache_bytes": costs(v["model"], context=sweep["context"], dtype="bfloat16").kv_cache_bytes,
            "tokens_per_s": statistics.fmean(r["tokens_per_s"] or 0 for r in runs),
            "eval_loss": [e.get("eval_loss", float("nan")) for e in ev],
            "eval_accuracy": [e.get("eval_accuracy", float("nan")) for e in ev],
            "loss_curves": [r["losses"] for r in runs],
        })
    ref = rows[0]
    for r in rows:
        for key in ("eval_loss", "eval_accuracy"):
            xs = r[key]
            r[f"{key}_mean"] = statistics.fmean(xs)
            r[f"{key}_std"] = statistics.stdev(xs) if len(xs) > 1 else 0.0
            r[f"{key}_p"] = None if r is ref else welch(xs, ref[key])["p"]
            r[f"{key}_significant"] = r[f"{key}_p"] is not None and r[f"{key}_p"] < 0.05
    return {"context": sweep["context"], "seeds": sweep["seeds"], "tolerance": sweep["tolerance"],
            "baseline": ref["name"], "rows": rows, "out": str(out)}


def format_table(result: dict[str, Any]) -> str:
    from kvlab.units import fmt_bytes, fmt_context, fmt_count, table

    def cell(r: dict[str, Any], key: str, fmt: str) -> str:
        s = f"{r[key + '_mean']:{fmt}} ± {r[key + '_std']:{fmt}}"
        p = r[key + "_p"]
        return s if p is None else s + f" (p={p:.3f}{'*' if p < 0.05 else ''})"

    rows = [[r["name"], fmt_count(r["params"]), fmt_bytes(r["kv_cache_bytes"]), f"{r['tokens_per_s']:,.0f}",
             cell(r, "eval_loss", ".4f"), cell(r, "eval_accuracy", ".3f")] for r in result["rows"]]
    head = ["variant", "params", f"KV @ {fmt_context(result['context'])} bf16", "tokens/s", "eval loss",
            "eval accuracy"]
    n = len(result["seeds"])
    return (table(head, rows) + f"\n\nmean ± std over {n} seeds; p: Welch's t-test against {result['baseline']!r}; "
            "* = significant at 0.05 (a difference without * is not shown to be real)")


def plot_sweep(result: dict[str, Any], path: str | Path) -> Path:
    """Two panels: eval accuracy (mean ± std) against KV bytes, and the training loss curves (seed mean)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=110)
    for r in result["rows"]:
        a.errorbar(r["kv_cache_bytes"] / 2**20, r["eval_accuracy_mean"], yerr=r["eval_accuracy_std"], marker="o",
                   capsize=3, label=r["name"] + (" *" if r["eval_accuracy_significant"] else ""))
        curves = r["loss_curves"]
        n = min(len(c) for c in curves)
        b.plot(range(1, n + 1), [statistics.fmean(c[i] for c in curves) for i in range(n)], label=r["name"])
    a.set_xscale("log", base=2)
    a.set_xlabel(f"KV cache at {result['context']:,} tokens, bf16 (MiB)")
    a.set_ylabel("eval accuracy (scored tokens)")
    a.set_title(f"accuracy vs KV bytes (mean ± std, {len(result['seeds'])} seeds; * p<0.05)")
    b.set_xlabel("step")
    b.set_ylabel("training loss (mean over seeds)")
    b.set_title("loss curves")
    for ax in (a, b):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


__all__ = ["apply_variant", "betainc", "format_table", "match_params", "parse_sweep", "plot_sweep", "run_sweep",
           "welch"]
