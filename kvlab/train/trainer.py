"""The training loop: AdamW, warmup + cosine, clipping, accumulation, bf16 autocast, exact resumption.

Determinism: the model is initialised from ``train.seed``; sample ``i`` of the data is a function of
``(seed, i)`` only (kvlab/train/data.py), and optimizer step ``s`` consumes the global samples
``s * G .. (s + 1) * G - 1`` (``G = batch_size * grad_accum * processes``), process ``r`` taking its
contiguous share of each micro-batch. The loss of a step is the sum of the token losses over the global
batch divided by the global number of scored tokens, so the arithmetic does not depend on how the
batch is split. A checkpoint holds the model, the AdamW moments, the RNG states and the step (which
is the data position); resuming from it replays the same steps as a run that never stopped.

``model.init`` starts from a loaded model's weights instead of ``train.seed``'s random init; a ``[distill]`` table
adds a frozen teacher (kvlab/train/distill.py) whose next-token distribution the loss pulls the student towards.
The teacher is deterministic and never saved, so the resume guarantee holds for distillation too.

``train.fsdp`` (under ``torchrun``) shards the model, its gradients and AdamW moments, and the teacher, with FSDP2
(kvlab/train/fsdp.py); the data split, the loss and the checkpoints are those of data parallel.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kvlab.errors import TrainingDivergedError
from kvlab.model import Model

from .checkpointing import (
    latest,
    load_checkpoint,
    model_tensors,
    optimizer_tensors,
    resumable,
    save_checkpoint,
    write_json_atomic,
)
from .config import TrainConfig, load_config, parse_config
from .data import IGNORE
from .dist import World, setup
from .fsdp import scalar, shard
from .init import init_model
from .lock import RunLock
from .teacher import kl_sum

LOG = "log.jsonl"


@dataclass
class TrainResult:
    """What :func:`train` returns: the trained model and a summary (the CLI's JSON)."""

    model: Model
    summary: dict[str, Any] = field(default_factory=dict)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (embeddings included), none on vectors (norms, biases, scales)."""
    s = cfg.train
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=s.lr, betas=s.betas, eps=s.eps)


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.train.dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def _loss_sum(model: Model, ids: torch.Tensor, targets: torch.Tensor, ctx, cfg: TrainConfig | None = None,
              teacher: Model | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """``(loss summed over the scored tokens, student logits [B, T, V] fp32, parts)``; with a teacher the loss is
    ``kl_weight * T^2 * KL + lm_weight * CE`` and ``parts`` holds the (unweighted) sums ``kl`` and ``lm``."""
    with ctx:
        logits = model(ids)
    logits = logits.float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE,
                         reduction="sum")
    if teacher is None or cfg is None or cfg.distill is None:
        return ce, logits, {}
    d = cfg.distill
    kl = kl_sum(teacher, ids, targets, logits, ctx, d.temperature)
    loss = d.kl_weight * d.temperature ** 2 * kl
    if d.lm_weight:  # no backward through the cross-entropy when it only is logged
        loss = loss + d.lm_weight * ce
    return loss, logits, {"kl": kl.detach(), "lm": ce.detach()}


def micro_batches(cfg: TrainConfig, world: World, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This process's micro-batches of optimizer step ``step``."""
    s = cfg.train
    b = s.batch_size
    per_step = b * s.grad_accum * world.size
    out = []
    for a in range(s.grad_accum):
        start = step * per_step + a * b * world.size + world.rank * b
        ids, tgt, _ = cfg.task.batch(s.seed, "train", start, b)
        out.append((ids.to(world.device), tgt.to(world.device)))
    return out


@torch.no_grad()
def evaluate(model: Model, cfg: TrainConfig, world: World, teacher: Model | None = None) -> dict[str, float]:
    """Mean loss (cross-entropy) and next-token accuracy over the scored tokens of the fixed eval samples; with a
    ``teacher`` also ``eval_kl``, the mean KL(teacher || student) per token at temperature 1 (kvlab eval's KL), and
    ``eval_top1``, how often both pick the same next token."""
    s = cfg.train
    was = model.training
    model.eval()
    totals = torch.zeros(5, dtype=torch.float64, device=world.device)
    ctx = _autocast(cfg, world.device)
    for k in range(s.eval_batches):
        start = (k * world.size + world.rank) * s.batch_size
        ids, tgt, _ = cfg.task.batch(s.seed, "eval", start, s.batch_size)
        ids, tgt = ids.to(world.device), tgt.to(world.device)
        loss, logits, _ = _loss_sum(model, ids, tgt, ctx)
        mask = tgt != IGNORE
        kl = agree = torch.zeros((), device=world.device)
        if teacher is not None:
            kl, agree = kl_sum(teacher, ids, tgt, logits, ctx, 1.0, agreement=True)
        totals += torch.stack([loss.double(), ((logits.argmax(-1) == tgt) & mask).sum().double(),
                               mask.sum().double(), kl.double(), agree.double()])
    world.all_reduce_(totals)
    model.train(was)
    n = max(1.0, float(totals[2]))
    out = {"eval_loss": float(totals[0]) / n, "eval_accuracy": float(totals[1]) / n, "eval_tokens": int(totals[2])}
    if teacher is not None:
        out |= {"eval_kl": float(totals[3]) / n, "eval_top1": float(totals[4]) / n}
    return out


def _read_log(out: Path) -> list[dict[str, Any]]:
    f = out / LOG
    if not f.is_file():
        return []
    rows = []
    for line in f.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
            break
    return rows


def _truncate_log(out: Path, step: int) -> None:
    """Keep the log lines of steps up to ``step`` (a resumed run rewrites what came after)."""
    rows = [r for r in _read_log(out) if r.get("step", 0) <= step]
    tmp = out / f".{LOG}.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(out / LOG)


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{path}.{k}" if path else k)
        return out
    return [] if a == b else [f"{path}: {a!r} -> {b!r}"]


def train(config: TrainConfig | dict[str, Any] | str | Path, out: str | Path | None = None, resume: bool = False,
          progress: bool = True, max_steps: int | None = None) -> TrainResult:
    """Train the model a config describes; checkpoints and ``log.jsonl`` go to ``out``.

    ``resume``: continue from ``out/latest.json`` when it exists (a fresh start otherwise).
    ``max_steps``: stop after this many steps of this call (the schedule still spans ``train.steps``).
    Under ``torchrun`` the processes train data-parallel (kvlab/train/dist.py), or fully sharded with
    ``train.fsdp`` (kvlab/train/fsdp.py; the returned model is then the sharded one: load ``out`` for a whole one).
    """
    if isinstance(config, (str, Path)):
        cfg = load_config(config)
    elif isinstance(config, dict):
        cfg = parse_config(config)
    else:
        cfg = config
    s = cfg.train
    out = Path(out or cfg.out or "runs/train")
    check_out_dir(out)
    world = setup(s.device)
    if s.fsdp and world.size < 2:
        world.close()
        raise ValueError("train.fsdp (--fsdp) shards the model over the processes of torchrun; this run has one "
                         "process: launch it with torchrun --nproc_per_node N (N >= 2), or drop fsdp")
    lock = RunLock(out) if world.main else None
    try:
        if lock is not None:
            lock.acquire()
            if lock.stale:
                _notice(f"took over the stale lock of {str(out)!r} left by pid {lock.stale.get('pid')} "
                        f"(started {lock.stale.get('started')}), which is no longer running")
        with torch.enable_grad():
            return _train(cfg, out, resume, progress, max_steps, world)
    finally:
        if lock is not None:
            lock.release()
        world.close()


RUN_FILES = ("latest.json", "train_config.json", LOG, ".lock")
MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json")


def check_out_dir(out: Path) -> None:
    """Refuse an output path that is a file, or a directory holding a model checkpoint rather than a kvlab run."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file; a run directory is needed")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"--out {str(out)!r}: {str(parent)!r} is a file, not a directory")
    if not out.is_dir() or any((out / f).exists() for f in RUN_FILES):
        return
    found = [f for f in MODEL_FILES if (out / f).exists()] + sorted(p.name for p in out.glob("*.gguf"))
    if found:
        raise ValueError(f"--out {str(out)!r} holds a model checkpoint ({', '.join(found)}), not a kvlab run "
                         "directory; refusing to overwrite it: choose another --out")


def _notice(msg: str) -> None:
    print(f"kvlab: warning: {msg}", file=sys.stderr)


def _train(cfg: TrainConfig, out: Path, resume: bool, progress: bool, max_steps: int | None,
           world: World) -> TrainResult:
    s = cfg.train
    if s.threads:
        torch.set_num_threads(s.threads)
    torch.manual_seed(s.seed)
    if cfg.init is not None:  # fp32 master weights of the model to start from
        model = init_model(cfg.init, world.device).train()
        if model.config != cfg.model:  # the shape; not the dtype (a GGUF header has none, master weights are fp32)
            raise ValueError(f"model.init={cfg.init!r} changed since the config was read: its ModelConfig differs")
    else:
        model = Model.from_config(cfg.model, seed=s.seed, std=s.init_std).to(world.device).train()
    teacher = None
    if cfg.distill is not None:  # frozen, never in a checkpoint
        teacher = init_model(cfg.distill.teacher, world.device, field="distill.teacher").requires_grad_(False)
    if s.fsdp:  # before the optimizer: it holds the sharded parameters
        shard(model)
        if teacher is not None:
            shard(teacher)
    opt = build_optimizer(model, cfg)
    global_batch = s.batch_size * s.grad_accum * world.size
    start = 0
    if not resume:
        found = latest(out) if out.exists() else None
        if found is not None:
            raise ValueError(f"{str(out)!r} already holds a checkpoint (step {found[1]}); pass --resume to continue "
                             "it or choose another --out")
    else:
        if world.main:  # verifies checksums, falls back past damaged checkpoints, repoints latest.json
            found, notes = resumable(out)
            for n in notes:
                _notice(n)
        world.barrier()
        if not world.main:
            found = latest(out)
    if resume and found is not None:
        if s.steps < found[1]:
            raise ValueError(f"--resume: train.steps={s.steps} is below the step {found[1]} of the checkpoint "
                             f"{str(found[0])!r}; pass --steps {found[1]} or more")
        def fits(state: dict[str, Any]) -> None:  # before the tensors load: another model would not fit them
            changed = _diff(state["fingerprint"], cfg.fingerprint())
            if changed:
                raise ValueError(f"--resume: the config differs from the checkpoint's in: {'; '.join(changed)}")
            if state["global_batch"] != global_batch:
                raise ValueError(f"--resume: global batch {global_batch} (batch_size x grad_accum x processes) "
                                 f"differs from the checkpoint's {state['global_batch']}")

        start = load_checkpoint(found[0], model, opt, check=fits)["step"]
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        if start:
            _truncate_log(out, start)
        elif (out / LOG).exists():
            (out / LOG).unlink()
        write_json_atomic(out / "config.json", cfg.model.to_dict())
        write_json_atomic(out / "train_config.json", cfg.raw)
    world.barrier()
    params = [p for p in model.parameters()]
    n_params = sum(p.numel() for p in params)
    ctx = _autocast(cfg, world.device)
    tokens_per_step = global_batch * cfg.task.seq_len
    stop = s.steps if max_steps is None else min(s.steps, start + max_steps)
    bar = None
    if progress and world.main:
        from tqdm import tqdm

        bar = tqdm(total=s.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    log = open(out / LOG, "a") if world.main else None  # noqa: SIM115
    evals: list[dict[str, Any]] = []
    losses: list[float] = []
    t_run = time.perf_counter()
    loss_value = float("nan")
    try:
        for step in range(start, stop):
            t0 = time.perf_counter()
            lr = s.lr_at(step)
            for g in opt.param_groups:
                g["lr"] = lr
            batches = micro_batches(cfg, world, step)
            count = torch.tensor(float(sum(int((t != IGNORE).sum()) for _, t in batches)), dtype=torch.float64,
                                 device=world.device)
            world.all_reduce_(count)
            denom = max(1.0, float(count))
            total = torch.zeros(3, dtype=torch.float64, device=world.device)  # loss, kl, lm sums
            for ids, tgt in batches:
                loss, _, parts = _loss_sum(model, ids, tgt, ctx, cfg, teacher)
                (loss / denom).backward()
                total[0] += loss.detach().double()
                if parts:
                    total[1] += parts["kl"].double()
                    total[2] += parts["lm"].double()
            if not s.fsdp:  # FSDP2 has reduce-scattered (summed) the gradients in backward
                world.sum_grads_(params)
            world.all_reduce_(total)
            loss_value = float(total[0]) / denom
            gnorm = scalar(torch.nn.utils.clip_grad_norm_(params, s.grad_clip if s.grad_clip else float("inf")))
            if not (math.isfinite(loss_value) and math.isfinite(gnorm)):
                if log is not None:
                    log.write(json.dumps({"step": step + 1, "loss": loss_value, "lr": lr, "grad_norm": gnorm,
                                          "stopped": "non-finite"}) + "\n")
                raise _diverged(out, step + 1, loss_value, gnorm, s.lr)
            opt.step()
            opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            losses.append(loss_value)
            row: dict[str, Any] = {"step": step + 1, "loss": loss_value, "lr": lr, "grad_norm": gnorm,
                                   "tokens_per_s": tokens_per_step / dt if dt > 0 else None}
            if teacher is not None:
                row |= {"kl": float(total[1]) / denom, "lm": float(total[2]) / denom}
            done = step + 1
            if (s.eval_every and done % s.eval_every == 0) or done == s.steps:
                ev = evaluate(model, cfg, world, teacher)
                row |= ev
                evals.append({"step": done, **ev})
            if log is not None:
                log.write(json.dumps(row) + "\n")
                log.flush()
            if bar is not None:
                post = {"loss": f"{loss_value:.4f}", "tok/s": f"{row['tokens_per_s'] or 0:,.0f}"}
                if "kl" in row:
                    post["kl"] = f"{row['kl']:.4f}"
                if "eval_loss" in row:
                    post["eval"] = f"{row['eval_loss']:.4f}"
                if "eval_kl" in row:
                    post["eval_kl"] = f"{row['eval_kl']:.4f}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
            if (s.save_every and done % s.save_every == 0) or done == stop:
                # sharded: every process gathers the whole tensors (collectives), rank 0 keeps and writes them
                gathered = (model_tensors(model, world.main), *optimizer_tensors(model, opt, world.main)) \
                    if s.fsdp else None
                if world.main:
                    save_checkpoint(out, done, model, opt, _state(cfg, done, global_batch, world), keep=s.keep,
                                    gathered=gathered)
                world.barrier()
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
    wall = time.perf_counter() - t_run
    steps_run = stop - start
    history = _read_log(out) if world.main else []
    summary = {
        "out": str(out), "model": cfg.model.name, "params": n_params, "task": type(cfg.task).__name__.lower(),
        "steps": stop, "steps_this_run": steps_run, "resumed_from": start, "processes": world.size,
        "fsdp": s.fsdp, "dtype": s.dtype, "global_batch": global_batch, "seq_len": cfg.task.seq_len,
        "final_loss": loss_value,
        "losses": [r["loss"] for r in history] if world.main else losses,
        "eval": evals[-1] if evals else None, "wall_s": wall,
        "tokens_per_s": steps_run * tokens_per_step / wall if wall > 0 and steps_run else None,
        "checkpoint": str(latest(out)[0]) if world.main and latest(out) else None,
        "init": cfg.init,
    }
    if hasattr(cfg.task, "provenance"):  # real text: where it came from
        summary["text"] = cfg.task.provenance()
    if cfg.distill is not None:
        summary["distill"] = dataclasses.asdict(cfg.distill)
        summary["kl"] = [r.get("kl") for r in history] if world.main else None
        summary["lm"] = [r.get("lm") for r in history] if world.main else None
    return TrainResult(model=model, summary=summary)


def _diverged(out: Path, step: int, loss: float, gnorm: float, lr: float) -> TrainingDivergedError:
    what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {gnorm}"
    last = latest(out) if out.exists() else None
    kept = (f"the last good checkpoint {str(last[0])!r} (step {last[1]}) is kept (resume it with --resume)"
            if last else "no checkpoint had been written yet")
    return TrainingDivergedError(f"step {step}: non-finite {what}; training stopped before the optimizer step, so "
                                 f"no non-finite weights were saved; {kept}; try a lower train.lr (now {lr}) or "
                                 "train.grad_clip")


def _state(cfg: TrainConfig, step: int, global_batch: int, world: World) -> dict[str, Any]:
    return {"step": step, "samples_seen": step * global_batch, "global_batch": global_batch,
            "processes": world.size, "fingerprint": cfg.fingerprint(),
            "train": dataclasses.asdict(cfg.train), "model_config": cfg.model.to_dict(), "raw_config": cfg.raw}


__all__ = ["TrainResult", "build_optimizer", "evaluate", "micro_batches", "train"]
