"""Roofline of the decode step: tok/s and achieved GB/s against context, eager vs compiled, fp32 vs bf16,
transformers beside, the copy bandwidth as the limit; one plot per benchmark shape (outside CI).

For each shape (``benchmarks/*.json``, random weights scaled as ``kvlab bench`` scales them) it calls
``kvlab.bench.run_bench`` (the library function behind ``kvlab bench``) once per dtype with ``compile=True``
(each context eager, then compiled; ``--eager-only``: no compiled lane) and, with ``--vs transformers``, once more
for transformers' loop in fp32.
The JSON (``--out``) is rewritten after every run, so a partial run keeps what it measured; ``--plot-only``
redraws the plots from it. ``--add-same-load JSON`` appends the runs of ``benchmarks/same_load.py`` (kvlab eager,
compiled and transformers decoding in turns, one process per shape: the 16K points of issue 17's table) to
``--out`` as chunks of their own, then redraws. ``--profile SHAPE`` instead profiles one eager and one compiled decode step
(torch.profiler) at the first context and prints where the time goes.

    PYTHONPATH=$PWD nice -n 10 .venv/bin/python benchmarks/roofline.py benchmarks/qwen3-100m.json \\
        --context 1k,4k --dtypes fp32,bf16 --vs transformers --out docs/img/roofline.json
    PYTHONPATH=$PWD .venv/bin/python benchmarks/roofline.py --plot-only docs/img/roofline.json
    PYTHONPATH=$PWD .venv/bin/python benchmarks/roofline.py --add-same-load same_load.json --out docs/img/roofline.json
    PYTHONPATH=$PWD .venv/bin/python benchmarks/roofline.py --profile benchmarks/qwen3-100m.json --context 4k
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def measure(shapes: list[Path], contexts: list[int], dtypes: list[str], vs: str | None, decode_tokens: int,
            threads: int | None, out: Path, compile: bool = True) -> dict[str, Any]:
    from kvlab.bench import run_bench

    data: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {"runs": []}
    for shape in shapes:
        for d in dtypes:
            print(f"{shape.stem} {d} eager{' + compiled' if compile else ''} ...", file=sys.stderr, flush=True)
            g = ground()
            r = run_bench(str(shape), contexts, decode_tokens=decode_tokens, dtype=DTYPES[d], threads=threads,
                          progress=False, compile=compile, log=lambda m: print(m, file=sys.stderr))
            data["runs"].append({"shape": shape.stem, "what": f"kvlab {d}", **r, "ground": ground(g)})
            out.write_text(json.dumps(data, indent=1))
        if vs == "transformers":
            from kvlab.bench import bench_transformers, copy_bandwidth, save_random_hf
            from kvlab.resolve import resolve_spec
            from kvlab.shrink import scale_to_fit

            print(f"{shape.stem} transformers fp32 ...", file=sys.stderr, flush=True)
            import tempfile

            g = ground()
            cfg, _ = scale_to_fit(resolve_spec(str(shape)))
            with tempfile.TemporaryDirectory(prefix="roofline-") as tmp:
                save_random_hf(cfg, tmp)
                bw = copy_bandwidth()
                hf = bench_transformers(tmp, contexts, decode_tokens, "float32", progress=False)
            data["runs"].append({"shape": shape.stem, "what": "transformers fp32", "copy_bandwidth_bytes_s": bw,
                                 "results": hf, "ground": ground(g)})
            out.write_text(json.dumps(data, indent=1))
    return data


def ground(start: dict[str, Any] | None = None) -> dict[str, Any]:
    """Where a run stands: the command, the commit, UTC start / end and the load average (1 min) at each;
    ``start``: the dict this returned before the run, completed with the end."""
    now = {"utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "load": round(os.getloadavg()[0], 2)}
    if start is not None:
        return {**{k: v for k, v in start.items() if k != "t"}, "end_utc": now["utc"], "end_load": now["load"],
                "wall_s": round(time.time() - start["t"], 1)}
    git = ["git", "-C", str(HERE.parent)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    dirty = subprocess.run([*git, "status", "--porcelain", "kvlab"], capture_output=True, text=True, check=False)
    return {"command": " ".join(sys.argv), "commit": commit.stdout.strip() + (" (kvlab/ modified)"
            if dirty.stdout.strip() else ""), "start_utc": now["utc"], "start_load": now["load"], "t": time.time()}


def from_same_load(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The records of a ``benchmarks/same_load.py`` JSON as this file's runs: per record one kvlab run (its eager
    and compiled lanes; the copy bandwidth the lower of the two measured around the decode, as its table divides by)
    and one transformers run (prefill ``None`` where its bf16 lane decoded from its fp32 cache cast), with the
    record's ground (a record without one: the file's command, commit unrecorded)."""
    runs = []
    for r in data["runs"]:
        g = r.get("ground") or {"command": data.get("command", "(not recorded)"), "commit": "(not recorded)",
                                "start_utc": "-", "end_utc": "-", "start_load": min(r["load"].values()),
                                "end_load": max(r["load"].values()), "wall_s": 0.0}
        g = {**g, "command": re.sub(r"--out \S+", "--out <json>", g["command"].replace("benchmarks/same_load.py",
                                                                                        "same_load.py"))}
        bw = min(r["copy_bandwidth_before"], r["copy_bandwidth_after"])
        read = r["weight_read_bytes_per_step"] + r["kv_read_bytes_per_step"]
        pre = r["kvlab_prefill"]["tok_s"]
        results = []
        for lane in ("eager", "compiled"):
            x = r.get(lane)
            if x:
                results.append({"context": r["context"], "compiled": lane == "compiled", "decode_tok_s": x["tok_s"],
                                "bytes_read_per_step": read, "achieved_bandwidth": read / x["median_s"],
                                "prefill_tok_s": pre, "first_step_s": r.get("first_compiled_step_s")})
        short = "fp32" if r["dtype"] == "float32" else "bf16"
        runs.append({"shape": r["shape"], "what": f"kvlab {short}", "dtype": r["dtype"], "copy_bandwidth_bytes_s": bw,
                     "results": results, "ground": g})
        t, tp = r.get("transformers"), r.get("transformers_prefill")
        if t:
            runs.append({"shape": r["shape"], "what": f"transformers {short}", "copy_bandwidth_bytes_s": bw,
                         "results": [{"context": r["context"], "decode_tok_s": t["tok_s"],
                                      "prefill_tok_s": tp["tok_s"] if tp else None}], "ground": g})
    return runs


def chunks(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The invocations behind ``data`` in order (one per command and commit), each with its runs' grounds."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for r in data["runs"]:
        g = r.get("ground")
        key = (g["command"], g["commit"]) if g else ("(not recorded)", "")
        c = out.setdefault(key, {"command": key[0], "commit": key[1], "grounds": []})
        if g:
            c["grounds"].append(g)
    return list(out.values())


def points(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per shape, lane (eager, compiled, transformers), dtype and context, the latest run winning:
    decode tok/s, achieved GB/s (the calculated bytes a step reads / the median step; transformers' step is
    priced with kvlab's bytes of the same shape, context and dtype), the copy bandwidth of its run (a
    transformers run without one: its invocation's kvlab run's), prefill tok/s and the chunk (invocation) index."""
    index = {(c["command"], c["commit"]): i for i, c in enumerate(chunks(data), 1)}
    rows: dict[tuple[str, str, str, int], dict[str, Any]] = {}

    def chunk(r: dict[str, Any]) -> int:
        g = r.get("ground")
        return index[(g["command"], g["commit"]) if g else ("(not recorded)", "")]

    kvlab_bw = {chunk(r): r["copy_bandwidth_bytes_s"] for r in data["runs"] if "copy_bandwidth_bytes_s" in r}
    for r in data["runs"]:
        if r["what"].startswith("transformers"):
            continue
        for x in r["results"]:
            lane = "compiled" if x["compiled"] else "eager"
            rows[(r["shape"], lane, r["dtype"], x["context"])] = {
                "shape": r["shape"], "lane": lane, "dtype": r["dtype"], "context": x["context"],
                "decode_tok_s": x["decode_tok_s"], "bytes_read_per_step": x["bytes_read_per_step"],
                "achieved_bandwidth": x["achieved_bandwidth"], "copy_bandwidth": r["copy_bandwidth_bytes_s"],
                "prefill_tok_s": x["prefill_tok_s"], "first_step_s": x.get("first_step_s") if x["compiled"] else None,
                "chunk": chunk(r)}
    for r in data["runs"]:
        if not r["what"].startswith("transformers"):
            continue
        dtype = DTYPES[r["what"].split()[-1]]
        for x in r["results"]:
            ref = rows.get((r["shape"], "eager", dtype, x["context"]))
            read = ref["bytes_read_per_step"] if ref else None
            rows[(r["shape"], "transformers", dtype, x["context"])] = {
                "shape": r["shape"], "lane": "transformers", "dtype": dtype, "context": x["context"],
                "decode_tok_s": x["decode_tok_s"], "bytes_read_per_step": read,
                "achieved_bandwidth": read * x["decode_tok_s"] if read else None,
                "copy_bandwidth": r.get("copy_bandwidth_bytes_s") or kvlab_bw.get(chunk(r)),
                "prefill_tok_s": x["prefill_tok_s"], "first_step_s": None, "chunk": chunk(r)}
    return sorted(rows.values(), key=lambda q: (q["context"]))


def plot(data: dict[str, Any], img_dir: Path) -> list[Path]:
    """One figure per shape: decode tok/s (with the limit: each run's copy bandwidth / the bytes a step reads),
    achieved GB/s (with each run's copy bandwidth) and prefill tok/s against context; kvlab eager (solid) and
    compiled (dashed) per dtype, transformers (black)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    pts = points(data)
    paths = []
    for shape in dict.fromkeys(q["shape"] for q in pts):
        fig, (ax_tok, ax_bw, ax_pre) = plt.subplots(1, 3, figsize=(16, 4.6))
        mine = [q for q in pts if q["shape"] == shape]
        dtypes = list(dict.fromkeys(q["dtype"] for q in mine))
        for i, dtype in enumerate(dtypes):
            color = f"C{i}"
            for lane, style in (("eager", "-o"), ("compiled", "--^"), ("transformers", ":s")):
                rows = [q for q in mine if q["dtype"] == dtype and q["lane"] == lane]
                if not rows:
                    continue
                c = "k" if lane == "transformers" else color
                label = f"{'transformers' if lane == 'transformers' else 'kvlab ' + lane} {dtype}"
                xs = [q["context"] for q in rows]
                ax_tok.plot(xs, [q["decode_tok_s"] for q in rows], style, color=c, label=label,
                            alpha=0.6 if lane == "transformers" and i else 1.0)
                bw_rows = [q for q in rows if q["achieved_bandwidth"]]
                ax_bw.plot([q["context"] for q in bw_rows], [q["achieved_bandwidth"] / 1e9 for q in bw_rows], style,
                           color=c, label=label, alpha=0.6 if lane == "transformers" and i else 1.0)
                pre = [q for q in rows if q["prefill_tok_s"] is not None]
                if lane != "compiled" and pre:
                    ax_pre.plot([q["context"] for q in pre], [q["prefill_tok_s"] for q in pre], style, color=c,
                                label=label)
                if lane == "eager":
                    ax_tok.plot(xs, [q["copy_bandwidth"] / q["bytes_read_per_step"] for q in rows], ":x", color=color,
                                lw=2.5, alpha=0.45, label=f"limit {dtype}: copy bw / bytes per step")
                    ax_bw.plot(xs, [q["copy_bandwidth"] / 1e9 for q in rows], ":x", color=color, lw=2.5, alpha=0.45,
                               label=f"copy bw ({dtype} runs)")
        for ax, title, unit in ((ax_tok, "decode", "tok/s"), (ax_bw, "decode: achieved read bandwidth", "GB/s"),
                                (ax_pre, "prefill (chunks of 512)", "tok/s")):
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({q["context"] for q in mine}))
            ax.set_xticklabels([fmt_ctx(c) for c in sorted({q["context"] for q in mine})])
            ax.set_xlabel("context (tokens)")
            ax.set_ylabel(unit)
            ax.set_ylim(bottom=0)
            ax.set_title(f"{shape}: {title}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        p = img_dir / f"roofline-{shape}.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)
    return paths


def fmt_ctx(n: int) -> str:
    """1024 -> 1K; a context just under a power of two (32752) -> ~32K."""
    k = n / 1024
    return f"{k:.0f}K" if n % 1024 == 0 else f"~{k:.0f}K"


def table(data: dict[str, Any]) -> str:
    """Markdown: one line per shape, dtype and context (eager, compiled and transformers side by side; GB/s the
    calculated bytes a step reads / its median step; "of copy bw" against the copy bandwidth of that lane's run),
    then the chunks (invocations) with their commands, commits, times and load."""
    pts = points(data)
    lines = [("| shape | dtype | context | tok/s eager / compiled / tf | GB/s eager / compiled / tf | copy bw GB/s | "
              "of copy bw eager / compiled / tf | eager / tf | compiled / tf | prefill tok/s kvlab / tf | "
              "first compiled step | chunk |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    keys = dict.fromkeys((q["shape"], q["dtype"], q["context"]) for q in sorted(pts, key=lambda q: (
        [c for c in dict.fromkeys(r["shape"] for r in data["runs"])].index(q["shape"]), q["dtype"] != "float32",
        q["context"])))
    for shape, dtype, ctx in keys:
        lane = {q["lane"]: q for q in pts if (q["shape"], q["dtype"], q["context"]) == (shape, dtype, ctx)}
        e, c, t = (lane.get(k) for k in ("eager", "compiled", "transformers"))

        def f(q: dict[str, Any] | None, key: str, scale: float = 1.0, fmt: str = ".2f") -> str:
            return format(q[key] / scale, fmt) if q and q.get(key) is not None else "-"

        def share(q: dict[str, Any] | None) -> str:
            ok = q and q.get("achieved_bandwidth") and q.get("copy_bandwidth")
            return f"{100 * q['achieved_bandwidth'] / q['copy_bandwidth']:.0f}%" if ok else "-"

        def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> str:
            return f"{a['decode_tok_s'] / b['decode_tok_s']:.2f}x" if a and b else "-"

        bws = sorted({f(q, "copy_bandwidth", 1e9, ".1f") for q in (e, c, t) if q and q.get("copy_bandwidth")})
        lines.append(
            f"| {shape} | {dtype} | {fmt_ctx(ctx)} | {f(e, 'decode_tok_s')} / {f(c, 'decode_tok_s')} / "
            f"{f(t, 'decode_tok_s')} | {f(e, 'achieved_bandwidth', 1e9, '.1f')} / "
            f"{f(c, 'achieved_bandwidth', 1e9, '.1f')} / {f(t, 'achieved_bandwidth', 1e9, '.1f')} | "
            f"{', '.join(bws) or '-'} | {share(e)} / {share(c)} / {share(t)} | {ratio(e, t)} | {ratio(c, t)} | "
            f"{f(e, 'prefill_tok_s', fmt='.0f')} / {f(t, 'prefill_tok_s', fmt='.0f')} | "
            f"{f(c, 'first_step_s', fmt='.0f') + ' s' if c else '-'} | "
            f"{', '.join(str(n) for n in sorted({q['chunk'] for q in (e, c, t) if q}))} |")
    lines += ["", "| chunk | command | commit | UTC | wall | load (1 min) |", "|---|---|---|---|---|---|"]
    for i, ch in enumerate(chunks(data), 1):
        gs = ch["grounds"]
        if not gs:
            lines.append(f"| {i} | (not recorded) | - | - | - | - |")
            continue
        wall = sum({(g["start_utc"], g["end_utc"]): g["wall_s"] for g in gs}.values())  # a same_load record's
        # kvlab and transformers runs (lanes in turns) share one ground: one wall
        loads = [g[k] for g in gs for k in ("start_load", "end_load")]
        cmd = ch["command"].replace("benchmarks/roofline.py ", "")
        lines.append(f"| {i} | `{cmd}` | {ch['commit']} | {gs[0]['start_utc'][5:16]}-{gs[-1]['end_utc'][11:16]} | "
                     f"{wall:.0f} s | {min(loads):.1f}-{max(loads):.1f} |")
    return "\n".join(lines)


def profile(shape: Path, context: int, dtype: str, threads: int | None, rows: int = 12) -> dict[str, Any]:
    """Self CPU time by operator of 8 eager and 8 compiled decode steps after a ``context``-token prefill, and the
    step split into the weight matmuls (``aten::mm``, with the bandwidth they reach reading the weights),
    attention (SDPA) and the rest, beside a copy bandwidth measured just before."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    from kvlab import threads as threads_mod
    from kvlab.bench import TORCH_DTYPES, copy_bandwidth
    from kvlab.compiled import CompiledStep
    from kvlab.costs import costs
    from kvlab.model import Model
    from kvlab.resolve import resolve_spec
    from kvlab.shrink import scale_to_fit

    threads_mod.apply(threads)
    cfg, _ = scale_to_fit(resolve_spec(str(shape)))
    model = Model.from_config(cfg, dtype=TORCH_DTYPES[DTYPES[dtype]], seed=0).eval()
    c = costs(cfg, context=context + 6, dtype=DTYPES[dtype])
    ids = torch.randint(0, cfg.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    out: dict[str, Any] = {"shape": shape.stem, "dtype": dtype, "context": context,
                           "weight_read_bytes_per_step": c.weight_read_bytes_per_step,
                           "kv_read_bytes_per_step": c.kv_read_bytes_per_step}
    for how in ("eager", "compiled"):
        step = CompiledStep(model, "inductor") if how == "compiled" else model.decode_step
        with torch.inference_mode():
            cache = model.new_cache(1, max_length=context + 20)
            for s in range(0, context, 512):
                model(ids[:, s:s + 512], cache=cache, last_only=True)
            nxt = torch.zeros(1, 1, dtype=torch.long)
            for _ in range(2):  # the compile, and one more
                step(nxt, cache)
            bw = copy_bandwidth()
            with tprofile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(8):
                    step(nxt, cache)
        ev = {e.key: e.self_cpu_time_total / 8 / 1e6 for e in prof.key_averages()}  # seconds per step
        total = sum(ev.values())
        mm = ev.get("aten::mm", 0.0) + ev.get("aten::addmm", 0.0) + ev.get("aten::bmm", 0.0)
        attn = sum(v for k, v in ev.items() if "scaled_dot_product" in k)
        r = {"copy_bandwidth_bytes_s": bw, "step_s": total, "mm_s": mm, "attention_s": attn,
             "rest_s": total - mm - attn, "mm_bandwidth_bytes_s": c.weight_read_bytes_per_step / mm if mm else None,
             "step_bandwidth_bytes_s": (c.weight_read_bytes_per_step + c.kv_read_bytes_per_step) / total}
        out[how] = r
        print(f"\n== {shape.stem} {dtype} {how}, context {context}, 8 decode steps, {torch.get_num_threads()} "
              f"threads; copy bandwidth just before {bw / 1e9:.2f} GB/s ==")
        print(f"step {total * 1e3:.1f} ms: weight matmuls {mm * 1e3:.1f} ms ({100 * mm / total:.0f}%, reading "
              f"{c.weight_read_bytes_per_step / 1e6:.0f} MB at {r['mm_bandwidth_bytes_s'] / 1e9:.2f} GB/s = "
              f"{100 * r['mm_bandwidth_bytes_s'] / bw:.0f}% of copy bw), attention {attn * 1e3:.1f} ms "
              f"({100 * attn / total:.0f}%, {c.kv_read_bytes_per_step / 1e6:.0f} MB of K/V), the rest "
              f"{r['rest_s'] * 1e3:.1f} ms ({100 * r['rest_s'] / total:.0f}%); whole step "
              f"{100 * r['step_bandwidth_bytes_s'] / bw:.0f}% of copy bw")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    print(json.dumps(out))
    return out


def main(argv: list[str] | None = None) -> int:
    from kvlab.units import parse_contexts

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("shapes", nargs="*", help="benchmark JSON files (default benchmarks/*.json)")
    ap.add_argument("--context", default="1k,4k,16k")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--vs", choices=["transformers"])
    ap.add_argument("--eager-only", action="store_true",
                    help="no compiled lane (one prefill per context instead of two, no compile)")
    ap.add_argument("--out", type=Path, default=HERE.parent / "docs" / "img" / "roofline.json")
    ap.add_argument("--plot-only", type=Path, metavar="JSON", help="redraw the plots and the table from a JSON")
    ap.add_argument("--add-same-load", type=Path, nargs="+", metavar="JSON",
                    help="append these benchmarks/same_load.py runs to --out, then redraw")
    ap.add_argument("--profile", type=Path, metavar="SHAPE", help="profile one eager and one compiled step")
    args = ap.parse_args(argv)
    contexts = parse_contexts(args.context)
    if args.profile:
        for d in args.dtypes.split(","):
            profile(args.profile, contexts[0], d.strip(), args.threads)
        return 0
    if args.plot_only:
        data = json.loads(args.plot_only.read_text())
        img_dir = args.plot_only.parent
    elif args.add_same_load:
        data = json.loads(args.out.read_text()) if args.out.is_file() else {"runs": []}
        for f in args.add_same_load:
            try:
                data["runs"] += from_same_load(json.loads(f.read_text()))
            except (OSError, ValueError, KeyError, TypeError) as err:
                ap.error(f"--add-same-load {f}: not a benchmarks/same_load.py JSON ({type(err).__name__}: {err})")
        args.out.write_text(json.dumps(data, indent=1))
        img_dir = args.out.parent
    else:
        shapes = [Path(s) for s in args.shapes] or sorted(HERE.glob("*.json"))
        dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
        bad = [d for d in dtypes if d not in DTYPES]
        if bad:
            ap.error(f"--dtypes {bad[0]!r}: one of {list(DTYPES)}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        data = measure(shapes, contexts, dtypes, args.vs, args.decode_tokens, args.threads, args.out,
                       compile=not args.eager_only)
        img_dir = args.out.parent
    for p in plot(data, img_dir):
        print(f"wrote {p}", file=sys.stderr)
    print(table(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
