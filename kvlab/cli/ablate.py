"""``kvlab ablate``: parameter-matched variants of one base model over several seeds, with Welch's t-test."""

from __future__ import annotations

import argparse
from pathlib import Path

from kvlab.cli.common import add_json, emit_json, output_dir, output_file

NAME = "ablate"
HELP = ("train parameter-matched variants of one base model over several seeds; table of params, "
        "KV bytes, tokens/s, eval loss and answer accuracy (overall, by distance, by length beyond training; "
        "mean ± std) with Welch's t-test against the baseline")
EXAMPLE = ("kvlab ablate --preset small --jobs 2 --plot out/ablate-small.png\n"
           "  kvlab ablate --preset small --dry-run   (build and parameter-match every variant, train nothing)\n"
           "  kvlab ablate kvlab/train/examples/sweep-tiny.toml --out runs/ablate-tiny")


def add_arguments(q: argparse.ArgumentParser) -> None:
    q.add_argument("sweep", nargs="?", help="sweep file, JSON or TOML: base (a training config), variants, seeds, "
                   "probe (kvlab/train/ablate.py)")
    q.add_argument("--preset", help="a built-in sweep by name (kvlab/train/examples/sweep-<name>.toml): small, tiny")
    q.add_argument("--dry-run", action="store_true", help="parse, build and parameter-match every variant (and run "
                   "one forward pass), then stop")
    q.add_argument("--jobs", type=int, default=1, help="runs at a time, each its own process (default 1)")
    q.add_argument("--out", type=output_dir("--out"), help="directory of the runs (default: the sweep's out, else runs/ablate-<name>)")
    q.add_argument("--plot", type=output_file("--plot"), help="write a PNG here: accuracy vs KV bytes, loss curves, accuracy by distance and "
                   "by length")
    q.add_argument("--markdown", type=output_file("--markdown"), help="also write the tables as markdown to this file")
    q.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    add_json(q, "print one JSON object (rows, per-seed values, probes, loss curves)")


def run(args: argparse.Namespace) -> int:
    from kvlab.train.ablate import dry_run, format_dry_run, format_table, load_sweep, preset_path, run_sweep
    from kvlab.train.config import read_file

    if (args.sweep is None) == (args.preset is None):
        raise ValueError("give a sweep file or --preset NAME (one of them)")
    path = preset_path(args.preset) if args.preset else args.sweep
    raw = read_file(path)
    if args.dry_run:  # parse, build and parameter-match every variant; train nothing
        r = dry_run(path)
        if args.json:
            emit_json(r)
            return 0
        print(format_dry_run(r))
        return 0
    load_sweep(path)  # every variant built and parameter-matched before anything trains
    name = args.preset or Path(args.sweep).stem
    out = args.out or raw.get("out") or str(Path("runs") / ("ablate-" + name.removeprefix("sweep-")))
    r = run_sweep(raw, out=out, progress=not args.no_progress, jobs=args.jobs)
    if args.plot:
        from kvlab.train.ablate import plot_sweep

        r["plot"] = str(plot_sweep(r, args.plot))
    if args.markdown:
        Path(args.markdown).write_text(format_table(r, markdown=True) + "\n")
    if args.json:
        emit_json(r)
        return 0
    print(format_table(r))
    print(f"\n{len(r['rows'])} variants x {len(r['seeds'])} seeds in {r['wall_s']:.0f} s ({r['jobs']} at a time)")
    return 0
