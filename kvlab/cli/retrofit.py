"""``kvlab retrofit``: convert a pretrained model to a technique, optionally recover it by distillation against the
original, and measure what it costs (perplexity, KL, needle) against what it saves (KV bytes, decode speed).

One conversion (``--to``) writes ``OUT/converted`` (a kvlab checkpoint with the tokenizer and ``retrofit.json``),
``OUT/recovered-seed<S>`` per recovery seed (a train run directory), and ``OUT/report.json``. ``--sweep`` runs a
list of conversions into ``OUT/<technique>/`` and writes one table (``OUT/table.md``) and the frontier plot.

Under ``torchrun`` the recovery runs data-parallel over the processes (or FSDP2-sharded with ``--fsdp``): process 0
converts and saves while the others wait, every process trains, then process 0 alone measures and writes the
outputs and reports; the others print nothing.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import re
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import kvlab
from kvlab.cli.common import add_json, describe_error, device_arg, emit_json, output_dir, output_file, report
from kvlab.cli.evaluate import parse_depths as depth_list
from kvlab.cli.generate import MODEL_HELP
from kvlab.native import latest
from kvlab.resolve import resolve_spec
from kvlab.retrofit import TECHNIQUES, RetrofitError, apply, check, parse
from kvlab.units import fmt_bytes, parse_context, parse_contexts, table

NAME = "retrofit"
HELP = "convert a pretrained model to a technique, recover it by distillation, measure cost against savings"
EXAMPLE = ("kvlab retrofit smollm2-135m --to share-last:6 --out out/share6 --recover 200\n"
           "  kvlab retrofit smollm2-135m --to window:512,sinks=4 --out out/win512\n"
           "  kvlab retrofit smollm2-135m --to mla:rank=256,rope=32 --out out/mla --recover 200 --export hf\n"
           "  kvlab retrofit smollm2-135m --sweep share-last:6 window:512 prune-heads:0.67 --out out/sweep --recover 100\n"
           "  torchrun --nproc_per_node 8 -m kvlab retrofit MODEL --to share-last:6 --out out/s6 --recover 2000 --fsdp")

DEFAULT_SWEEP = ("share-last:6", "share-adjacent:2", "window:512", "window:512,sinks=4",
                 "window:512,pattern=3sliding+1global,sinks=4", "prune-heads:0.67")


def add_arguments(q: argparse.ArgumentParser) -> None:
    q.add_argument("model", help=MODEL_HELP)
    what = q.add_mutually_exclusive_group(required=True)
    what.add_argument("--to", metavar="TECHNIQUE", help="the conversion: " + "; ".join(
        f"{t.example} ({t.help})" for t in TECHNIQUES.values()))
    what.add_argument("--sweep", nargs="*", metavar="TECHNIQUE",
                      help=f"several conversions, one table and plot (none given: {' '.join(DEFAULT_SWEEP)})")
    q.add_argument("--out", type=output_dir("--out"), required=True, help="output directory")
    q.add_argument("--recover", type=int, default=0, metavar="STEPS",
                   help="distillation steps against the original after converting (0: none)")
    q.add_argument("--seeds", default="0", help="recovery seeds, comma-separated (spread over seeds is reported)")
    q.add_argument("--seq-len", type=int, default=256, help="recovery sequence length (tokens)")
    q.add_argument("--batch", type=int, default=4, help="recovery batch size (per process under torchrun)")
    q.add_argument("--lr", type=float, default=1e-4, help="recovery learning rate")
    q.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="recovery precision: fp32, or bf16 autocast with fp32 master weights (default fp32)")
    q.add_argument("--lm-weight", type=float, default=0.0, help="weight of the LM loss beside the KL (default 0)")
    q.add_argument("--resume", action="store_true", help="continue interrupted recoveries from their checkpoints")
    q.add_argument("--fsdp", action="store_true", help="under torchrun, shard student and teacher of the recovery "
                   "with FSDP2 (without it the processes train data-parallel); process 0 converts and measures alone")
    q.add_argument("--length", default="2k", help="positions of the KL / perplexity window (default 2k)")
    q.add_argument("--needle", default="", help="needle lengths, e.g. 1k,2k (default: none)")
    q.add_argument("--depths", default="0.1,0.5,0.9", help="needle depths (default 0.1,0.5,0.9)")
    q.add_argument("--no-eval", action="store_true", help="convert (and recover) only; no measurements")
    q.add_argument("--decode-context", default="1k", help="context of the decode-speed measurement (0: skip)")
    q.add_argument("--export", choices=["hf"], help="also write each converted (and recovered) model as a transformers "
                   "checkpoint (OUT/hf, OUT/recovered-seed<S>-hf) where a transformers architecture expresses it "
                   "(MLA as DeepseekV3ForCausalLM, window patterns through layer_types); vLLM / SGLang serve it")
    q.add_argument("--plot", type=output_file("--plot"), help="frontier plot (PNG; default OUT/frontier.png)")
    q.add_argument("--device", type=device_arg, default="cpu")
    q.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    add_json(q, "print one JSON object with every row and its ground")


def slug(technique: str) -> str:
    """A directory name for a technique string (``window:512,sinks=4`` -> ``window-512-sinks-4``)."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", technique).strip("-")


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--seeds {text!r}: integers separated by commas, e.g. 0,1,2") from None
    if not seeds:
        raise ValueError("--seeds: give at least one seed")
    return seeds


class Setup:
    """What every conversion of one run shares: the original model, its tokenizer, the text and its ground."""

    def __init__(self, args: argparse.Namespace) -> None:
        from kvlab.eval.corpus import default_corpus
        from kvlab.tokenizer import load_tokenizer

        self.args = args
        self.model = kvlab.load(args.model, device=args.device).eval()
        self.tok = load_tokenizer(args.model)
        if self.tok is None:
            raise ValueError(f"{str(args.model)!r} has no tokenizer: kvlab retrofit measures on real text with the "
                             "model's own tokenizer")
        self.corpus = default_corpus()
        self.prefix = self.tok.encode("", special=True)
        self.length = parse_context(args.length)
        if not args.no_eval and self.length > self.model.config.max_positions:
            raise ValueError(f"--length {args.length}: exceeds the model's max_positions="
                             f"{self.model.config.max_positions}")
        self.ground = {"model": str(args.model), "model_name": self.model.config.name, "text": self.corpus.name,
                       "provenance": self.corpus.provenance, "text_sha256": self.corpus.sha256,
                       "eval_window": self.length, "dtype": "float32"}

    @functools.cached_property
    def ids(self) -> list[int]:
        """The evaluation text's token ids (tokenized when first measured: not at all with ``--no-eval``)."""
        return self.tok.encode(self.corpus.text, special=False)

    @functools.cached_property
    def calibration(self) -> list[int]:
        """What conversions that measure first (head importance, MLA's activation SVD) measure on: the training text,
        disjoint from the evaluation corpus, never what is scored."""
        from kvlab.train.text import training_corpus

        return self.tok.encode(training_corpus().text[:200_000], special=False)[:4096]


def saved_conversion(out: Path) -> str | None:
    """The technique string of the conversion saved in ``out/converted``, or None when there is none."""
    f = out / "converted" / "retrofit.json"
    return json.loads(f.read_text()).get("requested") if f.is_file() else None


def check_out(args: argparse.Namespace, techniques: list[str]) -> None:
    """Before anything loads: every technique's output directory holds no other conversion, and ``--resume`` has a
    recovery checkpoint to continue (of at least one technique and seed)."""
    out = Path(args.out)
    dirs = {t: out if args.to is not None else out / slug(t) for t in techniques}
    for t, d in dirs.items():
        saved = saved_conversion(d)
        if saved is not None and saved != t:
            raise ValueError(f"{str(d / 'converted')!r} holds the conversion {saved!r}, not {t!r}: choose another "
                             "--out" + (" (--resume continues the same command)" if args.resume else ""))
    if not args.resume:
        return
    if not args.recover:
        raise ValueError("--resume continues interrupted recoveries: give --recover STEPS (and the other options) "
                         "of the interrupted command")
    runs = [d / f"recovered-seed{s}" for d in dirs.values() for s in _seeds(args.seeds)]
    if not any(latest(r) for r in runs):
        raise ValueError(f"--resume: no recovery checkpoint to continue in {str(out)!r} (looked for "
                         f"{', '.join(repr(str(r / 'latest.json')) for r in runs[:4])}{', ...' if len(runs) > 4 else ''}"
                         "): run the command without --resume to start (a saved conversion there is reused)")


def preflight(model: str, techniques: list[str]) -> None:
    """Before any weight loads: every conversion's RetrofitError that the model's config alone decides (a rank above
    the K/V width, sharing across head dims, a window not smaller than the positions, ...), read from the config
    (a GGUF header, a config.json). A model argument whose config cannot be read here is left to the loader's error."""
    try:
        cfg = resolve_spec(model)
    except (ValueError, OSError):
        return
    for t in techniques:
        check(cfg, t)


def convert_one(setup: Setup, technique: str, out: Path, out_stream) -> tuple[Any, Path | None]:
    """Convert, save to ``out/converted`` (or reuse a saved one when resuming); the converted model and its path
    (None for a cache format: same weights, nothing to save)."""
    target = out / "converted"
    saved = saved_conversion(out)
    if saved is not None:
        if saved != technique:
            raise ValueError(f"{str(target)!r} holds the conversion {saved!r}, not {technique!r}: choose another --out")
        print(f"{technique}: reusing {target}", file=out_stream)
        return kvlab.load(target, device=setup.args.device).eval(), target
    t0 = time.perf_counter()
    t, _ = parse(technique)
    conv = apply(setup.model, technique, ids=setup.calibration if t.needs_text or t.takes_text else None)
    if getattr(conv.model, "kv_quant", None) is not None:  # a cache format: nothing new to save
        print(f"{conv.report.summary()}; {conv.report.notes[0]}", file=out_stream)
        return conv.model, None
    kvlab.save(conv.model, target, tokenizer=setup.tok,
               extra={"retrofit.json": {**conv.report.to_dict(), "requested": technique,
                                        "source_model": str(setup.args.model)}})
    print(f"{conv.report.summary()}; saved {target} in {time.perf_counter() - t0:.1f} s", file=out_stream)
    for n in conv.report.notes:
        print(f"  {n}", file=out_stream)
    return conv.model, target


def recover_one(args: argparse.Namespace, tok: Any, student: Path, out: Path, seed: int, out_stream,
                world: Any) -> dict[str, Any]:
    """One recovery run (every process under torchrun); what process 0 reports of it."""
    from kvlab.train.distill import recover

    a = args
    run = out / f"recovered-seed{seed}"
    # one decision for every process, taken before any of them starts (process 0 creates the run directory)
    resume = world.broadcast_json(a.resume or run.exists())
    r = recover(student, a.model, run, steps=a.recover, seq_len=a.seq_len, batch_size=a.batch, lr=a.lr,
                lm_weight=a.lm_weight, seed=seed, resume=resume, progress=not a.no_progress, fsdp=a.fsdp,
                dtype=a.dtype)
    if not world.main:
        return {}
    s = r.summary
    from kvlab.tokenizer import save_tokenizer

    save_tokenizer(tok, run)  # the run directory carries the tokenizer: kvlab eval / chat run on it
    # the loss of the run's last step (from its log: a resumed run that had nothing left to do trained no step now)
    final = s["losses"][-1] if s.get("losses") else s.get("final_loss")
    done = f", {s['steps_this_run']} this run" if s.get("resumed_from") else ""
    print(f"recovered {student.parent.name} seed {seed}: {s.get('steps')} steps{done}, final loss {final:.4f}, "
          f"{s.get('wall_s', 0):.0f} s" + (f", {s['processes']} processes" if s.get("processes", 1) > 1 else ""),
          file=out_stream)
    return {"seed": seed, "steps": s.get("steps"), "resumed_from": s.get("resumed_from"),
            "steps_this_run": s.get("steps_this_run"), "final_loss": final, "wall_s": s.get("wall_s"), "run": str(run),
            "processes": s.get("processes"), "fsdp": bool(s.get("fsdp")), "dtype": s.get("dtype")}


def measure_one(setup: Setup, model: Any) -> dict[str, Any]:
    from kvlab.retrofit.report import measure

    a = setup.args
    needle = parse_contexts(a.needle) if a.needle else []
    depths = depth_list(a.depths)
    return measure(setup.model, model, setup.ids, setup.prefix, setup.length, setup.tok, setup.corpus.text, needle,
                   depths, decode_context=parse_context(a.decode_context) if a.decode_context != "0" else 0,
                   progress=not a.no_progress)


def export_one(setup: Setup, model: Any, target: Path, out_stream) -> None:
    """``--export hf``: the model as a transformers checkpoint at ``target`` (kept when it already exists)."""
    from kvlab.retrofit.export import export_hf

    if setup.args.export != "hf" or (target / "config.json").is_file():
        return
    export_hf(model, target, tokenizer=setup.tok)
    print(f"exported {target} (transformers)", file=out_stream)


def run_technique(setup: Setup | None, args: argparse.Namespace, technique: str, out: Path, out_stream,
                  world: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows for one technique (converted, then each recovery seed; none with ``--no-eval``) and its recoveries.
    Process 0 converts (the others wait for its checkpoint's path), every process recovers, process 0 measures
    (``setup`` is None on the others)."""
    a = args
    model = path = None
    failed = None
    if world.main:
        try:
            model, path = convert_one(setup, technique, out, out_stream)
            if path is not None:
                export_one(setup, model, out / "hf", out_stream)
        except Exception as e:  # noqa: BLE001  (re-raised by _shared: the others must not wait for a checkpoint)
            failed = e
    shared = _shared(world, failed, {"path": str(path) if path else None})
    path = Path(shared["path"]) if shared["path"] else None
    if path is None and a.recover:
        if world.main:
            print(f"{technique}: a cache format changes no weights: nothing to recover", file=out_stream)
        a = argparse.Namespace(**{**vars(a), "recover": 0})
    infos = {seed: recover_one(a, setup.tok if setup else None, path, out, seed, out_stream, world)
             for seed in (_seeds(a.seeds) if a.recover else [])}
    if not world.main:
        return [], []
    rows = [] if a.no_eval else [{"technique": technique, "recovery_steps": 0,
                                  "checkpoint": str(path) if path else None, **measure_one(setup, model)}]
    for seed, info in infos.items():
        if a.no_eval and a.export is None:
            continue
        rec = kvlab.load(info["run"], device=a.device).eval()
        export_one(setup, rec, out / f"recovered-seed{seed}-hf", out_stream)
        if not a.no_eval:
            rows.append({"technique": technique, "recovery_steps": a.recover, "seed": seed, "recovery": info,
                         "checkpoint": info["run"], **measure_one(setup, rec)})
    return rows, [{"technique": technique, **info} for info in infos.values()]


class _Quiet(Exception):
    """Process 0 failed and reported it; another process of the same torchrun ends with the same status, silently."""


def _shared(world: Any, failed: Exception | None, value: Any) -> Any:
    """Process 0's ``value`` on every process, after work that process 0 did alone; its error ``failed`` ends every
    process (exit code 2) instead of leaving the others waiting. Under torchrun process 0 prints the error line before
    the others learn of it: torchrun stops the whole group as soon as one process ends."""
    if failed is not None and world.size > 1:
        print(f"kvlab: error: {describe_error(failed)}", file=sys.stderr, flush=True)
    shared = world.broadcast_json({"value": value if failed is None else None,
                                   "error": None if failed is None else str(failed)})
    if failed is not None and world.size == 1:
        raise failed
    if shared["error"] is not None:
        raise _Quiet(shared["error"])
    return shared["value"]


def format_rows(rows: list[dict[str, Any]], ref: dict[str, Any] | None) -> str:
    head = ["technique", "recovery", "KV @4K", "KV @32K", "KV @128K", "KV vs orig", "ppl", "KL (± se)", "top-1",
            "needle", "decode tok/s"]
    body = []
    if ref is not None:
        on, od = ref.get("original_needle"), ref.get("original_decode")
        body.append(["original", "-", *(fmt_bytes(ref["ref_kv_bytes"][k]) for k in ("4096", "32768", "131072")),
                     "1.00x", f"{ref['ref_ppl']:.3f}", "0", "100%", f"{on['overall']:.0%}" if on else "",
                     f"{od['tok_s']:.1f}" if od else ""])
    for r in rows:
        rec = f"{r['recovery_steps']} steps, seed {r['seed']}" if r.get("recovery_steps") else "none"
        needle = f"{r['needle']['overall']:.0%}" if "needle" in r else ""
        dec = f"{r['decode']['tok_s']:.1f}" if "decode" in r else ""
        body.append([r["technique"], rec, *(fmt_bytes(r["kv_bytes"][k]) for k in ("4096", "32768", "131072")),
                     f"{r['kv_ratio_32k']:.2f}x", f"{r['ppl']:.3f}", f"{r['kl']:.4f} ± {r['kl_se']:.4f}",
                     f"{r['top1']:.1%}", needle, dec])
    return table(head, body)


def spread(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per technique with several recovery seeds: mean and sample standard deviation of KL and perplexity."""
    out = []
    for t in dict.fromkeys(r["technique"] for r in rows):
        rec = [r for r in rows if r["technique"] == t and r.get("recovery_steps")]
        if len(rec) > 1:
            kls, ppls = [r["kl"] for r in rec], [r["ppl"] for r in rec]
            out.append({"technique": t, "seeds": [r["seed"] for r in rec], "kl_mean": statistics.mean(kls),
                        "kl_sd": statistics.stdev(kls), "ppl_mean": statistics.mean(ppls),
                        "ppl_sd": statistics.stdev(ppls)})
    return out


def run(args: argparse.Namespace) -> int:
    from kvlab.train.dist import setup as dist_setup

    if args.recover < 0:
        raise ValueError(f"--recover {args.recover}: must be >= 0 steps")
    techniques = [args.to] if args.to is not None else list(args.sweep or DEFAULT_SWEEP)
    for t in techniques:
        parse(t)  # a named error before anything loads
    if args.export and args.sweep is not None:
        raise ValueError("--export writes one conversion: use it with --to, not --sweep")
    _seeds(args.seeds)
    depth_list(args.depths)
    check_out(args, techniques)
    torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
    try:
        preflight(args.model, techniques)
    except RetrofitError:
        if int(os.environ.get("RANK", "0")) != 0:
            return 2  # every process finds the same error; process 0 alone reports it
        raise
    if args.fsdp and not (torchrun and args.recover):
        raise ValueError("--fsdp shards the recovery over the processes of torchrun: launch it with torchrun "
                         "--nproc_per_node N (N >= 2) and --recover STEPS, or drop --fsdp")
    # process 0 converts (and measures) alone while the others wait: a generous timeout for their first collective
    world = dist_setup("auto", timeout_s=4 * 3600) if torchrun else dist_setup("cpu")
    try:
        return _run(args, techniques, world)
    except _Quiet:
        return 2
    finally:
        world.close()


def _run(args: argparse.Namespace, techniques: list[str], world: Any) -> int:
    """The conversions, recoveries and measurements of :func:`run`, on one process of ``world``."""
    from kvlab.train.lock import RunLock

    out = Path(args.out)
    if world.main:
        out_stream = report(args)
        out.mkdir(parents=True, exist_ok=True)
    else:  # only process 0 reports
        out_stream = io.StringIO()
        args = argparse.Namespace(**{**vars(args), "no_progress": True})
    t0 = time.perf_counter()
    with RunLock(out) if world.main else nullcontext():
        setup = failed = None
        if world.main:
            try:
                setup = Setup(args)
            except Exception as e:  # noqa: BLE001  (re-raised by _shared)
                failed = e
        _shared(world, failed, None)
        if setup is not None:
            print(f"model: {args.model} ({setup.model.config.name}, {setup.model.num_parameters():,} parameters); "
                  f"text: {setup.corpus.describe(None if args.no_eval else len(setup.ids))}", file=out_stream)
        rows: list[dict[str, Any]] = []
        recoveries: list[dict[str, Any]] = []
        for t in techniques:
            print(f"\n== {t}", file=out_stream)
            got, rec = run_technique(setup, args, t, out if args.to is not None else out / slug(t), out_stream, world)
            rows += got
            recoveries += rec
            sys.stderr.flush()
        if setup is None:
            return 0
        if args.needle and not args.no_eval:  # the original's own retrieval on the same grid, for comparison
            from kvlab.eval.needle import needle_test

            needle = parse_contexts(args.needle)
            depths = depth_list(args.depths)
            r = needle_test(setup.model, setup.tok, setup.corpus.text, needle, depths, 1, 0, not args.no_progress)
            setup.ground["original_needle"] = {"lengths": needle, "depths": depths, "accuracy": r.accuracy,
                                               "overall": r.overall}
        if args.decode_context != "0" and not args.no_eval:  # the original's decode speed, in the same process
            from kvlab.retrofit.report import decode_speed

            setup.ground["original_decode"] = decode_speed(setup.model, parse_context(args.decode_context))
        result = {**setup.ground, "techniques": techniques, "rows": rows, "recoveries": recoveries,
                  "spread": spread(rows), "processes": world.size, "wall_s": time.perf_counter() - t0}
        if rows:
            rows[0]["original_needle"] = setup.ground.get("original_needle")
            rows[0]["original_decode"] = setup.ground.get("original_decode")
            print("\n" + format_rows(rows, rows[0]), file=out_stream)
            for s in result["spread"]:
                print(f"{s['technique']}: seeds {s['seeds']}: KL {s['kl_mean']:.4f} ± {s['kl_sd']:.4f} (sd), "
                      f"ppl {s['ppl_mean']:.3f} ± {s['ppl_sd']:.3f}", file=out_stream)
            (out / "table.md").write_text(_markdown(rows))
            from kvlab.retrofit.report import plot_frontier

            plot = plot_frontier(rows, args.plot or out / "frontier.png",
                                 f"{setup.model.config.name}: retrofits on {setup.corpus.name}, KL at "
                                 f"{setup.length:,} positions")
            result["plot"] = str(plot)
            print(f"table: {out / 'table.md'}; plot: {plot}", file=out_stream)
        (out / "report.json").write_text(json.dumps(result, indent=1, default=str))
    if args.json:
        emit_json(result)
    return 0


def _markdown(rows: list[dict[str, Any]]) -> str:
    ref = rows[0]
    lines = [("| technique | recovery | KV @4K | KV @32K | KV @128K | KV vs original | perplexity | KL (nats/token) | "
             "top-1 | needle | decode tok/s |"), "|---|---|---|---|---|---|---|---|---|---|---|",
             (f"| original | - | {fmt_bytes(ref['ref_kv_bytes']['4096'])} | {fmt_bytes(ref['ref_kv_bytes']['32768'])} | "
             f"{fmt_bytes(ref['ref_kv_bytes']['131072'])} | 1.00x | {ref['ref_ppl']:.2f} | 0 | 100% | "
             f"{format(ref['original_needle']['overall'], '.0%') if ref.get('original_needle') else ''} | "
             f"{format(ref['original_decode']['tok_s'], '.1f') if ref.get('original_decode') else ''} |")]
    for r in rows:
        rec = f"{r['recovery_steps']} steps (seed {r['seed']})" if r.get("recovery_steps") else "none"
        needle = f"{r['needle']['overall']:.0%}" if "needle" in r else ""
        dec = f"{r['decode']['tok_s']:.1f}" if "decode" in r else ""
        lines.append(f"| `{r['technique']}` | {rec} | {fmt_bytes(r['kv_bytes']['4096'])} | "
                     f"{fmt_bytes(r['kv_bytes']['32768'])} | {fmt_bytes(r['kv_bytes']['131072'])} | "
                     f"{r['kv_ratio_32k']:.2f}x | {r['ppl']:.2f} | {r['kl']:.4f} ± {r['kl_se']:.4f} | {r['top1']:.1%} | "
                     f"{needle} | {dec} |")
    return "\n".join(lines) + "\n"
