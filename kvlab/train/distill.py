"""Recovery by distillation: fine-tune a (converted) student against a frozen teacher's next-token distributions.

The loss of a scored token is ``kl_weight * T^2 * KL(p_teacher,T || p_student,T) + lm_weight * CE(student)``
(kvlab/train/teacher.py, which the trainer reads).

:func:`recover` is the Python entry point (used by ``kvlab retrofit``): a student and a teacher that ``kvlab.load``
accepts, real text (kvlab/train/text.py, held out from ``kvlab eval``'s corpus) cut by the teacher's tokenizer, and
a normal ``kvlab train`` run directory as output (``kvlab.load(out)`` and every verb accept it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import parse_config
from .trainer import TrainResult, train


def distill_config(student: str | Path, teacher: str | Path, *, steps: int = 200, seq_len: int = 256,
                   batch_size: int = 4, lr: float = 1e-4, kl_weight: float = 1.0, lm_weight: float = 0.0,
                   temperature: float = 1.0, seed: int = 0, dtype: str = "fp32", threads: int | None = None,
                   text_files: list[str] | None = None, tokenizer: str | Path | None = None,
                   eval_batches: int = 4, fsdp: bool = False, keep: int = 1) -> dict[str, Any]:
    """The ``kvlab train`` config (a dict, as in a TOML file) of one recovery run; see :func:`recover`."""
    for name, v in (("student", student), ("teacher", teacher)):
        if not isinstance(v, (str, Path)):
            raise TypeError(f"{name}: a path or a model name kvlab.load accepts, got {type(v).__name__}")
    task: dict[str, Any] = {"kind": "text", "seq_len": seq_len, "tokenizer": str(tokenizer or teacher)}
    if text_files:
        task["files"] = [str(f) for f in text_files]
    # a checkpoint every quarter of the run: an interrupted recovery (kvlab retrofit --resume) loses at most that;
    # only the newest ``keep`` are kept (each holds the weights and two AdamW moments: 3x the fp32 model on disk)
    train: dict[str, Any] = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "dtype": dtype,
                             "eval_batches": eval_batches, "save_every": max(1, steps // 4), "keep": keep}
    if threads is not None:
        train["threads"] = threads
    if fsdp:
        train["fsdp"] = True
    return {"model": {"init": str(student)}, "task": task, "train": train,
            "distill": {"teacher": str(teacher), "kl_weight": kl_weight, "lm_weight": lm_weight,
                        "temperature": temperature}}


def recover(student: str | Path, teacher: str | Path, out: str | Path, *, steps: int = 200, seq_len: int = 256,
            batch_size: int = 4, lr: float = 1e-4, kl_weight: float = 1.0, lm_weight: float = 0.0,
            temperature: float = 1.0, seed: int = 0, resume: bool = False, progress: bool = True,
            dtype: str = "fp32", threads: int | None = None, text_files: list[str] | None = None,
            tokenizer: str | Path | None = None, fsdp: bool = False, keep: int = 1) -> TrainResult:
    """Distil ``teacher`` into ``student`` for ``steps`` AdamW steps; the run directory ``out`` loads with kvlab.load.

    ``student`` / ``teacher``: anything ``kvlab.load`` accepts (a kvlab checkpoint directory of a converted model, a
    named model such as ``smollm2-135m``, a HF directory, a ``.gguf``); same vocabulary. ``tokenizer`` (default: the
    teacher's) cuts ``text_files`` (default: the training corpus of kvlab/train/text.py, disjoint from kvlab eval's)
    into windows of ``seq_len`` positions, ``batch_size`` per step. ``lr``: peak of a warmup (10% of the steps, at
    most 100) + cosine schedule. ``dtype``: ``fp32`` or ``bf16`` (autocast; fp32 master weights). ``resume``:
    continue ``out`` exactly. ``fsdp``: under ``torchrun``, shard student and teacher with FSDP2 (every process calls
    ``recover``; kvlab/train/fsdp.py). ``keep``: how many of the newest checkpoints stay on disk (writes are atomic:
    one is enough to resume). Returns the :class:`~kvlab.train.trainer.TrainResult` (trained student, summary with the
    per-step ``kl`` / ``lm`` and the final ``eval`` incl. ``eval_kl`` against the teacher).
    """
    raw = distill_config(student, teacher, steps=steps, seq_len=seq_len, batch_size=batch_size, lr=lr,
                         kl_weight=kl_weight, lm_weight=lm_weight, temperature=temperature, seed=seed, dtype=dtype,
                         threads=threads, text_files=text_files, tokenizer=tokenizer, fsdp=fsdp, keep=keep)
    return train(parse_config(raw), out=out, resume=resume, progress=progress)


__all__ = ["distill_config", "recover"]
