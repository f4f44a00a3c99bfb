"""``kvlab train``: train a model from scratch or from any checkpoint kvlab loads, on synthetic long-context tasks or
real text, optionally by distillation from a teacher (a ``[distill]`` table)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from kvlab.cli.common import THREADS_HELP, add_json, emit_json, output_dir
from kvlab.units import fmt_count, table

NAME = "train"
HELP = ("train a model from scratch (a preset scaled down or a ModelConfig) or from any checkpoint kvlab loads "
        "([model] init = ...), on synthetic long-context tasks or real text, optionally distilling a teacher "
        "([distill]); atomic checkpoints, exact --resume, data-parallel or FSDP2-sharded (--fsdp) under torchrun")
EXAMPLE = ("kvlab train kvlab/train/examples/recall-gqa.toml --out runs/recall --steps 200\n"
           "  kvlab train kvlab/train/examples/recall-gqa.toml --out runs/recall --resume\n"
           "  kvlab train kvlab/train/examples/distill-smollm2-shared.toml --out runs/distilled   (a converted\n"
           "    checkpoint as [model] init, [task] kind = \"text\", [distill] teacher = \"smollm2-135m\")\n"
           "  torchrun --nproc_per_node 2 -m kvlab train CONFIG --out runs/dp   (see docs/training.md)\n"
           "  torchrun --nproc_per_node 8 -m kvlab train CONFIG --out runs/big --fsdp   (shard a model that does not fit "
           "one process)")


def add_arguments(q: argparse.ArgumentParser) -> None:
    q.add_argument("config", help="training config, JSON or TOML: [model], [task], [train], optional [distill] "
                               "(docs/training.md)")
    q.add_argument("--out", type=output_dir("--out"), help="run directory for checkpoints and log.jsonl (default: the config's out, "
                   "else runs/<config name>)")
    q.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    q.add_argument("--steps", type=int, help="override train.steps")
    q.add_argument("--seed", type=int, help="override train.seed")
    q.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override train.device")
    q.add_argument("--threads", type=int, help="override train.threads: " + THREADS_HELP)
    q.add_argument("--fsdp", action="store_true", default=None,
                   help="shard weights, gradients and AdamW moments over the torchrun processes with PyTorch's FSDP2 "
                   "(train.fsdp; same data split, loss and checkpoints as data parallel)")
    q.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_json(q, "print one JSON summary object (with the loss of every step)")


def run(args: argparse.Namespace) -> int:
    from kvlab.train import load_config, train

    cfg = load_config(args.config)  # validated before anything is built or written
    if args.steps is not None:
        if args.steps < 1:
            raise ValueError(f"--steps {args.steps}: must be >= 1")
        cfg.train.steps = args.steps
    if args.seed is not None:
        cfg.train.seed = args.seed
    if args.device is not None:
        cfg.train.device = args.device
    if args.threads is not None:
        cfg.train.threads = args.threads
    if args.fsdp:
        cfg.train.fsdp = True
    for k in ("steps", "seed", "device", "threads", "fsdp"):  # the run directory's train_config.json records the overrides
        if getattr(args, k) is not None:
            cfg.raw["train"][k] = getattr(args, k)
    out = args.out or cfg.out or str(Path("runs") / Path(args.config).stem)
    r = train(cfg, out=out, resume=args.resume, progress=not args.no_progress).summary
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports (lines would interleave)
        return 0
    if args.json:
        emit_json(r)
        return 0
    ev = r["eval"] or {}
    rows = [["model", f"{r['model']} ({fmt_count(r['params'])} parameters)"],
            ["task", f"{r['task']}, seq_len {r['seq_len']}, global batch {r['global_batch']}"],
            ["steps", f"{r['steps']} ({r['steps_this_run']} this run, from step {r['resumed_from']})"],
            ["processes", str(r["processes"]) + (" (FSDP2-sharded)" if r.get("fsdp") else "")],
            ["final train loss", f"{r['final_loss']:.4f}"],
            ["eval loss / accuracy", f"{ev['eval_loss']:.4f} / {ev['eval_accuracy']:.3f}" if ev else "-"],
            *([["started from", str(r["init"])]] if r.get("init") else []),
            *([["teacher", str(r["distill"]["teacher"])],
               ["KL vs teacher (train, first -> last step)", f"{r['kl'][0]:.4f} -> {r['kl'][-1]:.4f}"
                if r.get("kl") and r["kl"][0] is not None and r["kl"][-1] is not None else "-"],
               ["eval KL vs teacher / top-1 agreement", f"{ev['eval_kl']:.4f} / {ev['eval_top1']:.3f}"
                if "eval_kl" in ev else "-"]] if r.get("distill") else []),
            ["tokens/s", f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "-"],
            ["checkpoint", str(r["checkpoint"])]]
    print(table(["run", str(r["out"])], rows, align="ll"))
    return 0
