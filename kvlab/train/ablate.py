"""Ablations: variants of one base model, parameter-matched, trained over several seeds, compared honestly.

A sweep file (JSON or TOML) holds a base training config, the variants and the retrieval probes::

    context = "32k"            # KV bytes are priced at this context (kvlab.costs)
    seeds = [0, 1, 2]
    param_tolerance = 0.05     # every variant within 5% of the first variant's parameter count
    [base]                     # a training config: model, task, train (docs/training.md)
    ...
    [probe]                    # after training: answer accuracy by distance and by length (kvlab/train/probe.py)
    lengths = [64, 96, 128]    # beyond base.task.seq_len = beyond training; max_positions defaults to the longest
    distance_bins = [0, 16, 32, 48]
    samples = 256
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
    [[variants]]
    name = "CSA/HCA"
    layer_pattern = [{ attention = "csa", ... }, { attention = "hca", ... }]   # LayerSpec fields, cycled
    [[variants]]
    name = "budgeted heads"
    budget = { pattern = "1 global : 3 sliding", window = 16, heads = { global = 2, sliding = 4 } }  # kvlab.budget

A variant applies, in this order: ``layer_overrides``, ``layer_pattern``, ``sliding``, ``budget``,
``model``, then ``share_last`` / ``share_adjacent``. Parameter matching then adjusts the MLP width of
every dense layer (a bisection) until the variant's parameter count is within the tolerance of the
baseline's; when no width gets there, the sweep fails before anything trains, naming the variant.
Differences are tested with Welch's t-test against the baseline; the table marks those with p < 0.05
and says nothing else is a difference.

Built-in sweeps (``kvlab ablate --preset NAME``) are the ``sweep-NAME.toml`` files of
kvlab/train/examples/.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import multiprocessing as mp
import statistics
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from scipy import stats

from kvlab.budget import budget
from kvlab.config import ModelConfig
from kvlab.costs import costs
from kvlab.model import Model
from kvlab.sharing import share_adjacent, share_last
from kvlab.units import fmt_bytes, fmt_context, fmt_count, parse_context, table

from .checkpointing import write_json_atomic
from .config import parse_config, read_file
from .data import make_task
from .probe import bin_labels, parse_probe, probe
from .trainer import train

VARIANT_FIELDS = ("name", "layer_overrides", "layer_pattern", "sliding", "budget", "model", "share_last",
                  "share_adjacent")
SWEEP_FIELDS = ("base", "variants", "seeds", "context", "param_tolerance", "probe", "out")
BUDGET_FIELDS = ("pattern", "window", "heads", "kv_heads", "head_dim", "rope")
EXAMPLES = Path(__file__).parent / "examples"


# -- statistics ----------------------------------------------------------------------------------------
def welch(a: list[float], b: list[float]) -> dict[str, float]:
    """Welch's unequal-variance t-test of mean(a) - mean(b) (``scipy.stats.ttest_ind``, ``equal_var=False``):
    t, Welch-Satterthwaite df, two-sided p. NaN with fewer than two values on a side; with no spread on either
    side p is 0 for different means and 1 for equal ones."""
    if len(a) < 2 or len(b) < 2:
        return {"t": float("nan"), "df": float("nan"), "p": float("nan")}
    if statistics.variance(a) + statistics.variance(b) == 0:
        diff = statistics.fmean(a) - statistics.fmean(b)
        return {"t": float("inf") if diff else float("nan"), "df": float("inf"), "p": 0.0 if diff else 1.0}
    with warnings.catch_warnings():  # seeds that agree to many digits: scipy warns of cancellation in the moments
        warnings.simplefilter("ignore", RuntimeWarning)
        r = stats.ttest_ind(a, b, equal_var=False)
    return {"t": float(r.statistic), "df": float(r.df), "p": float(r.pvalue)}


# -- variants and parameter matching -----------------------------------------------------------------
def num_params(cfg: ModelConfig) -> int:
    return costs(cfg, context=1, dtype="float32").params_total


def _replace_layer(x, over: dict[str, Any], what: str):
    known = {f.name for f in dataclasses.fields(x)}
    bad = sorted(set(over) - known)
    if bad:
        raise ValueError(f"{what}: unknown LayerSpec field(s) {bad}")
    return dataclasses.replace(x, **copy.deepcopy(over))


def apply_variant(base: ModelConfig, v: dict[str, Any]) -> ModelConfig:
    """The base model with a variant's changes (an error names the variant and the field)."""
    name = v.get("name")
    try:
        cfg = copy.deepcopy(base)
        over = v.get("layer_overrides") or {}
        if not isinstance(over, dict):
            raise ValueError("layer_overrides: a table of LayerSpec fields")  # noqa: TRY004
        layers = [_replace_layer(x, over, "layer_overrides") for x in cfg.layers]
        if "layer_pattern" in v:
            pat = v["layer_pattern"]
            if not isinstance(pat, list) or not pat or not all(isinstance(p, dict) for p in pat):
                raise ValueError("layer_pattern: a non-empty list of tables of LayerSpec fields (layer i takes "
                                 "entry i mod len)")
            layers = [_replace_layer(x, pat[i % len(pat)], f"layer_pattern[{i % len(pat)}]")
                      for i, x in enumerate(layers)]
        if "sliding" in v:
            s = v["sliding"]
            if not isinstance(s, dict) or set(s) - {"window", "global_every"} or "window" not in s:
                raise ValueError("sliding: a table {window = W, global_every = N} (N: every Nth layer stays global)")
            every = s.get("global_every", 0)
            layers = [dataclasses.replace(x, window=None if every and i % every == every - 1 else s["window"])
                      for i, x in enumerate(layers)]
        cfg = dataclasses.replace(cfg, layers=layers)
        if "budget" in v:
            b = v["budget"]
            if not isinstance(b, dict) or set(b) - set(BUDGET_FIELDS):
                raise ValueError(f"budget: a table of kvlab.budget arguments {list(BUDGET_FIELDS)}"
                                 + (f"; unknown {sorted(set(b) - set(BUDGET_FIELDS))}" if isinstance(b, dict) else ""))
            try:
                cfg = budget(cfg, **b)
            except TypeError as e:
                raise ValueError(f"budget: {e}") from e
        top = v.get("model") or {}
        if not isinstance(top, dict):
            raise ValueError("model: a table of top-level ModelConfig fields")  # noqa: TRY004
        known = {f.name for f in dataclasses.fields(cfg)} - {"layers"}
        bad = sorted(set(top) - known)
        if bad:
            raise ValueError(f"model: unknown ModelConfig field(s) {bad}; allowed: {sorted(known)}")
        cfg = dataclasses.replace(cfg, **top)
        if "share_last" in v:
            cfg = share_last(cfg, v["share_last"])
        if "share_adjacent" in v:
            cfg = share_adjacent(cfg, v["share_adjacent"])
        return dataclasses.replace(cfg, name=str(name))
    except (TypeError, ValueError) as e:
        raise ValueError(f"variant {name!r}: {e}") from e


def match_params(cfg: ModelConfig, target: int, tolerance: float, name: str) -> ModelConfig:
    """``cfg`` with every dense MLP width scaled so its parameter count is within ``tolerance`` of ``target``
    (aiming at a quarter of it where the widths allow)."""
    n0 = num_params(cfg)
    if abs(n0 - target) <= tolerance * target / 4:
        return cfg
    widths = [x.intermediate_size for x in cfg.layers]

    def scaled(f: float) -> ModelConfig:
        return dataclasses.replace(cfg, layers=[dataclasses.replace(x, intermediate_size=max(1, round(w * f)))
                                                if w else x for x, w in zip(cfg.layers, widths)])

    lo, hi = 1e-3, 64.0
    if not any(widths) or not num_params(scaled(lo)) <= target <= num_params(scaled(hi)):
        if abs(n0 - target) <= tolerance * target:
            return cfg
        raise ValueError(f"variant {name!r}: {n0:,} parameters; no MLP width brings it within "
                         f"{tolerance:.0%} of the baseline's {target:,} (the parameter budget cannot be matched)")
    best = cfg
    for _ in range(60):
        mid = (lo * hi) ** 0.5
        cand = scaled(mid)
        n = num_params(cand)
        if abs(n - target) < abs(num_params(best) - target):
            best = cand
        if abs(n - target) <= tolerance * target / 4:
            break
        lo, hi = (mid, hi) if n < target else (lo, mid)
    if abs(num_params(best) - target) > tolerance * target:
        raise ValueError(f"variant {name!r}: parameters cannot be matched within {tolerance:.0%} of {target:,}")
    return best


# -- built-in sweeps ------------------------------------------------------------------------------------
def sweep_presets() -> dict[str, Path]:
    """The built-in sweeps: ``{name: path}`` of kvlab/train/examples/sweep-<name>.toml."""
    return {p.stem.removeprefix("sweep-"): p for p in sorted(EXAMPLES.glob("sweep-*.toml"))}


def preset_path(name: str) -> Path:
    """The file of a built-in sweep; an unknown name is an error listing the available ones."""
    found = sweep_presets()
    if name not in found:
        raise ValueError(f"--preset {name!r}: no such built-in sweep; available: {', '.join(found) or 'none'}")
    return found[name]


# -- parsing -----------------------------------------------------------------------------------------
def parse_sweep(raw: dict[str, Any]) -> dict[str, Any]:
    """Validate a sweep and build every variant's training config (matched) before anything trains."""
    if not isinstance(raw, dict):
        raise ValueError("a sweep is a table with 'base' and 'variants'")  # noqa: TRY004
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
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"sweep.seeds={seeds!r}: the seeds must differ")
    tol = raw.get("param_tolerance", 0.05)
    if not isinstance(tol, (int, float)) or not 0 < tol < 1:
        raise ValueError(f"sweep.param_tolerance={tol!r}: a fraction in (0, 1)")
    base_raw = raw["base"]
    probe = None
    if isinstance(base_raw, dict) and isinstance(base_raw.get("task"), dict) and isinstance(base_raw.get("model"),
                                                                                            dict):
        try:
            task = make_task(base_raw["task"])
        except ValueError as e:
            raise ValueError(f"base: {e}") from e
        probe = parse_probe(raw.get("probe"), task, "sweep.probe")
        base_raw = copy.deepcopy(base_raw)
        base_raw["model"].setdefault("max_positions", max(max(probe["lengths"]), task.seq_len))
    try:
        base = parse_config(base_raw)
    except ValueError as e:
        raise ValueError(f"base: {e}") from e
    if probe is None:
        probe = parse_probe(raw.get("probe"), base.task, "sweep.probe")
    if max(probe["lengths"]) > base.model.max_positions:
        raise ValueError(f"sweep.probe.lengths: {max(probe['lengths'])} exceeds base.model.max_positions="
                         f"{base.model.max_positions} (leave max_positions out to default to the longest length)")
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
            "probe": probe, "out": raw.get("out")}


def load_sweep(path_or_raw: str | Path | dict[str, Any]) -> dict[str, Any]:
    """A sweep file (or its parsed table), validated; errors are prefixed with the file name."""
    if isinstance(path_or_raw, dict):
        return parse_sweep(path_or_raw)
    raw = read_file(path_or_raw)
    try:
        return parse_sweep(raw)
    except ValueError as e:
        raise ValueError(f"{path_or_raw}: {e}") from e


def dry_run(path_or_raw: str | Path | dict[str, Any]) -> dict[str, Any]:
    """Everything a sweep does before training: parse, build every variant's model (weights and all),
    check its parameter count against the calculator's and the baseline's, and run one forward pass at the
    longest probe length. Returns the rows of :func:`format_dry_run`."""
    import torch  # the dry run builds the models; reading, planning and tabulating a sweep need no torch


    sweep = load_sweep(path_or_raw)
    base = sweep["base"]
    L = max(sweep["probe"]["lengths"])
    target = sweep["variants"][0]["params"]
    rows = []
    for v in sweep["variants"]:
        model = Model.from_config(v["model"], seed=0)
        actual = sum(p.numel() for p in model.parameters())
        if actual != v["params"]:
            raise ValueError(f"variant {v['name']!r}: the built model has {actual:,} parameters, the calculator "
                             f"says {v['params']:,}")
        with torch.no_grad():
            ids = torch.randint(0, v["model"].vocab_size, (1, L), generator=torch.Generator().manual_seed(0))
            out = model(ids)
        if out.shape != (1, L, v["model"].vocab_size) or not torch.isfinite(out).all():
            raise ValueError(f"variant {v['name']!r}: a forward pass at length {L} gave {tuple(out.shape)} "
                             "or non-finite logits")
        kinds = sorted({(x.attention, x.window) for x in v["model"].layers}, key=str)
        rows.append({"name": v["name"], "params": actual, "params_vs_baseline": actual / target - 1,
                     "kv_cache_bytes": costs(v["model"], context=sweep["context"], dtype="bfloat16").kv_cache_bytes,
                     "layers": ", ".join(f"{a}" + (f"/w{w}" if w else "") for a, w in kinds)
                     + (f", mhc {v['model'].mhc_streams}" if v["model"].mhc_streams else "")
                     + (f", ple {v['model'].ple_dim}" if v["model"].ple_dim else "")
                     + (f", {sum(x.kv_source is not None for x in v['model'].layers)} shared"
                        if any(x.kv_source is not None for x in v["model"].layers) else "")})
    return {"context": sweep["context"], "tolerance": sweep["tolerance"], "seeds": sweep["seeds"],
            "steps": base.train.steps, "probe": sweep["probe"], "runs": len(rows) * len(sweep["seeds"]), "rows": rows}


def format_dry_run(r: dict[str, Any]) -> str:
    rows = [[x["name"], fmt_count(x["params"]), f"{x['params_vs_baseline']:+.1%}", fmt_bytes(x["kv_cache_bytes"]),
             x["layers"]] for x in r["rows"]]
    head = ["variant", "params", "vs baseline", f"KV @ {fmt_context(r['context'])} bf16", "attention (/window)"]
    return (table(head, rows) + f"\n\n{len(r['rows'])} variants built and parameter-matched within "
            f"{r['tolerance']:.0%}; would train {r['runs']} runs ({len(r['seeds'])} seeds x {r['steps']} steps) "
            f"and probe lengths {r['probe']['lengths']}")


# -- running -----------------------------------------------------------------------------------------
def _run_one(cfg, out: str, probe_spec: dict[str, Any], progress: bool) -> dict[str, Any]:
    """Train one variant x seed and probe it (also the worker of a parallel sweep)."""
    t0 = time.perf_counter()
    r = train(cfg, out=out, progress=progress)
    pr = probe(r.model, cfg.task, lengths=probe_spec["lengths"], distance_bins=probe_spec["distance_bins"],
               samples=probe_spec["samples"], batch_size=probe_spec["batch_size"])
    return {**r.summary, "probe": pr, "wall_s": time.perf_counter() - t0}


def _stat(xs: list[float], ref: list[float] | None) -> dict[str, Any]:
    ok = [x for x in xs if not math.isnan(x)]
    p = None
    if ref is not None:
        p = welch(ok, [x for x in ref if not math.isnan(x)])["p"]
        p = None if math.isnan(p) else p
    return {"mean": statistics.fmean(ok) if ok else float("nan"),
            "std": statistics.stdev(ok) if len(ok) > 1 else 0.0 if ok else float("nan"),
            "p": p, "significant": p is not None and p < 0.05}


def run_sweep(path_or_raw: str | Path | dict[str, Any], out: str | Path | None = None,
              progress: bool = False, jobs: int = 1) -> dict[str, Any]:
    """Train every variant and seed (``jobs`` at a time, each its own process when > 1), probe each model,
    and return the rows of the table: per-seed values, mean, std and Welch's p against the baseline."""
    sweep = load_sweep(path_or_raw)
    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs={jobs!r}: a positive integer")
    out = Path(out or sweep["out"] or "runs/ablate")
    base = sweep["base"]
    work = []
    for k, v in enumerate(sweep["variants"]):
        for seed in sweep["seeds"]:
            cfg = dataclasses.replace(base, model=v["model"], train=dataclasses.replace(base.train, seed=seed))
            work.append((k, seed, cfg, str(out / f"v{k}-seed{seed}")))
    t0 = time.perf_counter()
    results: dict[tuple[int, int], dict[str, Any]] = {}
    if jobs == 1:
        for k, seed, cfg, d in work:
            results[(k, seed)] = _run_one(cfg, d, sweep["probe"], progress)
    else:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            futs = {pool.submit(_run_one, cfg, d, sweep["probe"], False): (k, seed) for k, seed, cfg, d in work}
            for f, key in futs.items():
                results[key] = f.result()
                if progress:
                    print(f"ablate: {sweep['variants'][key[0]]['name']} seed {key[1]} done "
                          f"({len(results)}/{len(work)})", file=sys.stderr, flush=True)
    wall = time.perf_counter() - t0
    T = base.task.seq_len
    labels = bin_labels(sweep["probe"]["distance_bins"])
    dist_keys = [f"acc_dist_{lab}" for lab in labels]
    len_keys = [f"acc_len_{n}" for n in sweep["probe"]["lengths"]]
    rows = []
    for k, v in enumerate(sweep["variants"]):
        runs = [results[(k, s)] for s in sweep["seeds"]]
        ev = [r["eval"] or {} for r in runs]
        row: dict[str, Any] = {
            "name": v["name"], "params": v["params"],
            "kv_cache_bytes": costs(v["model"], context=sweep["context"], dtype="bfloat16").kv_cache_bytes,
            "tokens_per_s": statistics.fmean(r["tokens_per_s"] or 0 for r in runs),
            "wall_s": [r["wall_s"] for r in runs],
            "final_loss": [r["final_loss"] for r in runs],
            "eval_loss": [e.get("eval_loss", float("nan")) for e in ev],
            "eval_accuracy": [e.get("eval_accuracy", float("nan")) for e in ev],
            "loss_curves": [r["losses"] for r in runs],
            "probe": [r["probe"] for r in runs],
        }
        for lab, key in zip(labels, dist_keys):
            row[key] = [r["probe"]["by_distance"].get(lab, {}).get("accuracy", float("nan")) for r in runs]
        for n, key in zip(sweep["probe"]["lengths"], len_keys):
            row[key] = [r["probe"]["by_length"][str(n)]["accuracy"] for r in runs]
        rows.append(row)
    ref = rows[0]
    metrics = ["final_loss", "eval_loss", "eval_accuracy", *dist_keys, *len_keys]
    for r in rows:
        for key in metrics:
            st = _stat(r[key], None if r is ref else ref[key])
            for f, val in st.items():
                r[f"{key}_{f}"] = val
    result = {"context": sweep["context"], "seeds": sweep["seeds"], "tolerance": sweep["tolerance"],
              "baseline": ref["name"], "rows": rows, "out": str(out), "wall_s": wall, "jobs": jobs,
              "task": {"kind": type(base.task).__name__.lower(), **dataclasses.asdict(base.task)},
              "steps": base.train.steps, "tokens_per_step": base.train.batch_size * base.train.grad_accum * T,
              "probe": sweep["probe"],
              "columns": {"distance": dict(zip(dist_keys, labels)),
                          "length": {key: str(n) for key, n in zip(len_keys, sweep["probe"]["lengths"])}}}

    write_json_atomic(out / "results.json", result)  # the table and plot can be redrawn from it
    return result


# -- the table ---------------------------------------------------------------------------------------
def _cell(r: dict[str, Any], key: str, fmt: str) -> str:
    m, s, p = r[key + "_mean"], r[key + "_std"], r[key + "_p"]
    if math.isnan(m):
        return "-"
    out = f"{m:{fmt}} ± {s:{fmt}}"
    return out if p is None else out + f" (p={p:.3f}{'*' if p < 0.05 else ''})"


def table_rows(result: dict[str, Any]) -> tuple[list[list[str]], list[str], list[list[str]], list[str]]:
    """The two tables' headers and rows: costs and losses; retrieval accuracy by distance and by length."""
    head1 = ["variant", "params", f"KV @ {fmt_context(result['context'])} bf16", "train tokens/s",
             "final eval loss", "answer accuracy"]
    rows1 = [[r["name"], fmt_count(r["params"]), fmt_bytes(r["kv_cache_bytes"]), f"{r['tokens_per_s']:,.0f}",
              _cell(r, "eval_loss", ".3f"), _cell(r, "eval_accuracy", ".3f")] for r in result["rows"]]
    cols = result.get("columns") or {"distance": {}, "length": {}}
    T = (result.get("task") or {}).get("seq_len")
    head2 = ["variant"]
    head2 += [f"d {lab}" for lab in cols["distance"].values()]
    head2 += [f"len {n}" + (" (train)" if T and int(n) == T else f" ({int(n) / T:.2g}x)" if T else "")
              for n in cols["length"].values()]
    rows2 = [[r["name"]] + [_cell(r, k, ".2f") for k in (*cols["distance"], *cols["length"])]
             for r in result["rows"]]
    return head1, rows1, head2, rows2


def _footer(result: dict[str, Any]) -> str:
    n = len(result["seeds"])
    t = result.get("task") or {}
    return (f"mean ± std over {n} seeds; p: Welch's t-test against {result['baseline']!r}; * = significant at "
            "0.05 (a difference without * is not shown to be real). Retrieval: answer-token accuracy on held-out "
            f"samples, by distance (positions from the needed token) at the training length {t.get('seq_len')}, "
            "and at each probe length (beyond the training length: positions never trained on).")


def format_table(result: dict[str, Any], markdown: bool = False) -> str:
    head1, rows1, head2, rows2 = table_rows(result)
    if markdown:
        def md(head: list[str], rows: list[list[str]]) -> str:
            lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
            return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])

        return md(head1, rows1) + "\n\n" + md(head2, rows2) + "\n\n" + _footer(result)
    parts = [table(head1, rows1)]
    if len(head2) > 1:
        parts.append("retrieval accuracy by distance (at the training length) and by length:\n" + table(head2, rows2))
    return "\n\n".join(parts) + "\n\n" + _footer(result)


def plot_sweep(result: dict[str, Any], path: str | Path) -> Path:
    """Four panels: answer accuracy (mean ± std) against KV bytes, the training loss curves (seed mean), and
    accuracy by distance and by length (* marks p < 0.05 against the baseline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5), dpi=110)
    (a, b), (c, d) = axes
    cols = result.get("columns") or {"distance": {}, "length": {}}
    markers = "osD^v<>ph*X"
    for i, r in enumerate(result["rows"]):
        color, mk = f"C{i % 10}", markers[i % len(markers)]
        a.errorbar(r["kv_cache_bytes"] / 2**20, r["eval_accuracy_mean"], yerr=r["eval_accuracy_std"], marker=mk,
                   color=color, capsize=3, linestyle="none",
                   label=r["name"] + (" *" if r["eval_accuracy_significant"] else ""))
        curves = r["loss_curves"]
        n = min(len(x) for x in curves)
        b.plot(range(1, n + 1), [statistics.fmean(x[j] for x in curves) for j in range(n)], color=color,
               label=r["name"], lw=1)
        for ax, keys in ((c, list(cols["distance"])), (d, list(cols["length"]))):
            if not keys:
                continue
            ys = [r[k + "_mean"] for k in keys]
            es = [r[k + "_std"] for k in keys]
            ax.errorbar(range(len(keys)), ys, yerr=es, marker=mk, color=color, capsize=2, lw=1,
                        label=r["name"])
            for j, k in enumerate(keys):
                if r[k + "_significant"]:
                    ax.annotate("*", (j, ys[j]), textcoords="offset points", xytext=(4, 2), color=color)
    a.set_xscale("log", base=2)
    a.set_xlabel(f"KV cache at {result['context']:,} tokens, bf16 (MiB)")
    a.set_ylabel("answer accuracy at the training length")
    a.set_title(f"accuracy vs KV bytes (mean ± std, {len(result['seeds'])} seeds; * p<0.05)")
    b.set_xlabel("step")
    b.set_ylabel("training loss (mean over seeds)")
    b.set_title("loss curves")
    T = (result.get("task") or {}).get("seq_len")
    c.set_xticks(range(len(cols["distance"])), list(cols["distance"].values()))
    c.set_xlabel(f"distance to the needed token (positions), at the training length {T}")
    c.set_ylabel("answer accuracy")
    c.set_title("accuracy by distance (* p<0.05 vs baseline)")
    d.set_xticks(range(len(cols["length"])), list(cols["length"].values()))
    d.set_xlabel(f"sequence length (trained at {T})")
    d.set_ylabel("answer accuracy")
    d.set_title("accuracy by length (* p<0.05 vs baseline)")
    for ax in (a, b, c, d):
        ax.grid(True, alpha=0.3)
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


__all__ = ["apply_variant", "dry_run", "format_dry_run", "format_table", "load_sweep", "match_params",
           "parse_sweep", "plot_sweep", "preset_path", "run_sweep", "sweep_presets", "welch"]
