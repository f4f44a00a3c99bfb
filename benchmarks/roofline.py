"""Roofline of the decode step: tok/s and achieved GB/s against context, eager vs compiled, fp32 vs bf16,
transformers beside, the copy bandwidth as the limit; one plot per benchmark shape (outside CI).

For each shape (``benchmarks/*.json``, random weights scaled as ``kvlab bench`` scales them) it calls
``kvlab.bench.run_bench`` (the library function behind ``kvlab bench``) once per dtype with ``compile=True``
(each context eager, then compiled) and, with ``--vs transformers``, once more for transformers' loop in fp32.
The JSON (``--out``) is rewritten after every run, so a partial run keeps what it measured; ``--plot-only``
redraws the plots from it. ``--profile SHAPE`` instead profiles one eager and one compiled decode step
(torch.profiler) at the first context and prints where the time goes.

    PYTHONPATH=$PWD nice -n 10 .venv/bin/python benchmarks/roofline.py benchmarks/qwen3-100m.json \\
        --context 1k,4k --dtypes fp32,bf16 --vs transformers --out docs/img/roofline.json
    PYTHONPATH=$PWD .venv/bin/python benchmarks/roofline.py --plot-only docs/img/roofline.json
    PYTHONPATH=$PWD .venv/bin/python benchmarks/roofline.py --profile benchmarks/qwen3-100m.json --context 4k
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def measure(shapes: list[Path], contexts: list[int], dtypes: list[str], vs: str | None, decode_tokens: int,
            threads: int | None, out: Path) -> dict[str, Any]:
    from kvlab.bench import run_bench

    data: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {"runs": []}
    for shape in shapes:
        for d in dtypes:
            print(f"{shape.stem} {d} eager + compiled ...", file=sys.stderr, flush=True)
            r = run_bench(str(shape), contexts, decode_tokens=decode_tokens, dtype=DTYPES[d], threads=threads,
                          progress=False, compile=True, log=lambda m: print(m, file=sys.stderr))
            data["runs"].append({"shape": shape.stem, "what": f"kvlab {d}", **r})
            out.write_text(json.dumps(data, indent=1))
        if vs == "transformers":
            from kvlab.bench import bench_transformers, save_random_hf
            from kvlab.resolve import resolve_spec
            from kvlab.shrink import scale_to_fit

            print(f"{shape.stem} transformers fp32 ...", file=sys.stderr, flush=True)
            import tempfile

            cfg, _ = scale_to_fit(resolve_spec(str(shape)))
            with tempfile.TemporaryDirectory(prefix="roofline-") as tmp:
                save_random_hf(cfg, tmp)
                hf = bench_transformers(tmp, contexts, decode_tokens, "float32", progress=False)
            data["runs"].append({"shape": shape.stem, "what": "transformers fp32", "results": hf})
            out.write_text(json.dumps(data, indent=1))
    return data


def plot(data: dict[str, Any], img_dir: Path) -> list[Path]:
    """One figure per shape: decode tok/s (with the bandwidth limit: copy bandwidth / bytes read per step) and
    achieved GB/s (with the copy bandwidth) against context; prefill tok/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for shape in dict.fromkeys(r["shape"] for r in data["runs"]):
        runs = [r for r in data["runs"] if r["shape"] == shape]
        fig, (ax_tok, ax_bw, ax_pre) = plt.subplots(1, 3, figsize=(15, 4.2))
        kvlab_runs = [r for r in runs if not r["what"].startswith("transformers")]
        for r in runs:
            if r["what"].startswith("transformers"):
                xs = [x["context"] for x in r["results"]]
                ax_tok.plot(xs, [x["decode_tok_s"] for x in r["results"]], "k:s", label=r["what"])
                ax_pre.plot(xs, [x["prefill_tok_s"] for x in r["results"]], "k:s", label=r["what"])
                continue
            color = f"C{kvlab_runs.index(r)}"
            bw = r["copy_bandwidth_bytes_s"]
            for compiled, style in ((False, "-o"), (True, "--^")):
                rows = [x for x in r["results"] if x["compiled"] == compiled]
                xs = [x["context"] for x in rows]
                label = f"{r['what']} {'compiled' if compiled else 'eager'}"
                ax_tok.plot(xs, [x["decode_tok_s"] for x in rows], style, color=color, label=label)
                ax_bw.plot(xs, [x["achieved_bandwidth"] / 1e9 for x in rows], style, color=color, label=label)
                if not compiled:
                    ax_pre.plot(xs, [x["prefill_tok_s"] for x in rows], style, color=color, label=r["what"])
                    ax_tok.plot(xs, [bw / x["bytes_read_per_step"] for x in rows], ":", color=color, alpha=0.6,
                                label=f"{r['what']} limit: copy bw {bw / 1e9:.1f} GB/s / bytes per step")
                    ax_bw.axhline(bw / 1e9, color=color, ls=":", alpha=0.6, label=f"copy bw ({r['what']} run)")
        for ax, title, unit in ((ax_tok, "decode", "tok/s"), (ax_bw, "decode: achieved read bandwidth", "GB/s"),
                                (ax_pre, "prefill", "tok/s")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("context (tokens)")
            ax.set_ylabel(unit)
            ax.set_title(f"{shape}: {title}")
            ax.grid(alpha=0.3)
        ax_tok.legend(fontsize=7)
        ax_bw.legend(fontsize=7)
        ax_pre.legend(fontsize=7)
        fig.tight_layout()
        p = img_dir / f"roofline-{shape}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def table(data: dict[str, Any]) -> str:
    """A markdown table: one line per shape, dtype and context; eager and compiled side by side."""
    lines = [("| shape | dtype | context | eager tok/s | compiled tok/s | compiled/eager | eager of copy bw | "
             "compiled of copy bw | first compiled step | transformers tok/s | prefill tok/s (eager) |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    hf = {(r["shape"], x["context"]): x for r in data["runs"] if r["what"].startswith("transformers")
          for x in r["results"]}
    for r in data["runs"]:
        if r["what"].startswith("transformers"):
            continue
        for q in r.get("compile_speedup", []):
            e = next(x for x in r["results"] if not x["compiled"] and x["context"] == q["context"])
            h = hf.get((r["shape"], q["context"])) if r["dtype"] == "float32" else None
            lines.append(f"| {r['shape']} | {r['dtype']} | {q['context']} | {q['eager_decode_tok_s']:.2f} | "
                         f"{q['compiled_decode_tok_s']:.2f} | {q['speedup']:.2f}x | "
                         f"{100 * q['eager_bandwidth_utilisation']:.0f}% | "
                         f"{100 * q['compiled_bandwidth_utilisation']:.0f}% | {q['first_step_s']:.0f} s | "
                         f"{format(h['decode_tok_s'], '.2f') if h else '-'} | {e['prefill_tok_s']:.1f} |")
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
    ap.add_argument("--out", type=Path, default=HERE.parent / "docs" / "img" / "roofline.json")
    ap.add_argument("--plot-only", type=Path, metavar="JSON", help="redraw the plots and the table from a JSON")
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
    else:
        shapes = [Path(s) for s in args.shapes] or sorted(HERE.glob("*.json"))
        dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
        bad = [d for d in dtypes if d not in DTYPES]
        if bad:
            ap.error(f"--dtypes {bad[0]!r}: one of {list(DTYPES)}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        data = measure(shapes, contexts, dtypes, args.vs, args.decode_tokens, args.threads, args.out)
        img_dir = args.out.parent
    for p in plot(data, img_dir):
        print(f"wrote {p}", file=sys.stderr)
    print(table(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
