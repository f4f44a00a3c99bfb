"""Atomic training checkpoints: safetensors (model, optimizer state, RNG) + a JSON state.

Layout of a run directory::

    out/
      ckpt-0000200/        one complete checkpoint per saved step
        model.safetensors      the model's state dict (loadable with safetensors alone)
        optimizer.safetensors  AdamW moments and step counts named ``<param>.<key>``; RNG states ``rng.*``
        state.json             step, data position, settings, optimizer hyper-parameters
      latest.json          {"step": 200, "dir": "ckpt-0000200"}: the checkpoint to resume from
      log.jsonl            one line per step (loss, lr, tokens/s) and per evaluation

A checkpoint is written into a temporary directory, flushed, then renamed into place; only then is
``latest.json`` replaced (write to a temporary file + ``os.replace``). A kill at any moment therefore
leaves ``latest.json`` naming a complete checkpoint: the new one or the previous one. Older
checkpoints are deleted only after the pointer moved. A write that fails (disk full, ...) removes what it
wrote and raises :class:`~kvlab.errors.CheckpointWriteError`; the previous checkpoint stays the latest.

``state.json`` holds the SHA-256 of both tensor files; :func:`verify_checkpoint` checks them before a resume
and :func:`resumable` falls back to the newest checkpoint that verifies (moving a damaged one aside).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kvlab.errors import CheckpointError, CheckpointWriteError
from kvlab.native import LATEST, MODEL, STATE, latest

from .fsdp import full, like

OPTIM = "optimizer.safetensors"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` via a temporary file and ``os.replace`` (the temporary file is removed
    when the write fails)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_tensors(model: torch.nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """The model's state dict as whole CPU tensors (a sharded model's DTensors gathered: then every process calls
    this, and only the one with ``keep`` holds the result, one tensor at a time on the others)."""
    out = {}
    for k, v in model.state_dict().items():
        t = full(v.detach())
        if keep:
            out[k] = t.to("cpu").contiguous()
    return out


def optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer, keep: bool = True
                      ) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """The optimizer's per-parameter state as named tensors, and its param groups (hyper-parameters); a sharded
    model's moments gathered whole (every process calls this; ``keep`` as in :func:`model_tensors`)."""
    names = {id(p): n for n, p in model.named_parameters()}
    sd = optimizer.state_dict()
    order = [p for g in optimizer.param_groups for p in g["params"]]
    tensors: dict[str, torch.Tensor] = {}
    for idx in sorted(sd["state"]):  # the same order on every process (the gathers are collectives)
        name = names[id(order[idx])]
        for k, v in sd["state"][idx].items():
            t = full(v.detach()) if isinstance(v, torch.Tensor) else torch.tensor(v)
            if keep:
                tensors[f"{name}.{k}"] = t.to("cpu").contiguous()
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": [names[id(p)] for p in g2["params"]]}
              for g, g2 in zip(sd["param_groups"], optimizer.param_groups)]
    return tensors, groups


def load_optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                           groups: list[dict[str, Any]]) -> None:
    names = {id(p): n for n, p in model.named_parameters()}
    order = [p for g in optimizer.param_groups for p in g["params"]]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for idx, p in enumerate(order):
        prefix = names[id(p)] + "."
        st = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
        if st:
            state[idx] = {k: (v if k == "step" else like(v, p)) for k, v in st.items()}
    pg = []
    start = 0
    for g, saved in zip(optimizer.param_groups, groups):
        pg.append({k: v for k, v in saved.items() if k != "params"} | {"params": list(range(start, start + len(g["params"])))})
        start += len(g["params"])
    optimizer.load_state_dict({"state": state, "param_groups": pg})


def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    if "rng.cpu" in tensors:
        torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def save_checkpoint(out: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], keep: int = 2,
                    gathered: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[dict[str, Any]]] | None
                    = None) -> Path:
    """Write checkpoint ``step`` atomically and point ``latest.json`` at it; keep the newest ``keep``.

    ``gathered``: ``(model_tensors(...), *optimizer_tensors(...))`` already taken (a sharded model: every process
    gathers, rank 0 writes); by default they are taken here.

    An OSError while writing (disk full, ...) removes the partial checkpoint and raises CheckpointWriteError;
    ``latest.json`` keeps naming the previous checkpoint.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"ckpt-{step:07d}"
    final = out / name
    tmp = out / f".tmp-{name}-{os.getpid()}"
    current = _latest_or_none(out)
    moved = False
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        weights, opt, groups = gathered or (model_tensors(model), *optimizer_tensors(model, optimizer))
        save_file(weights, str(tmp / MODEL), metadata={"format": "pt"})
        save_file(opt | rng_tensors(), str(tmp / OPTIM), metadata={"format": "pt"})
        sums = {f: sha256(tmp / f) for f in (MODEL, OPTIM)}
        (tmp / STATE).write_text(json.dumps(state | {"step": step, "optimizer_groups": groups, "sha256": sums},
                                            indent=1, default=str))
        for f in (MODEL, OPTIM, STATE):
            _fsync_file(tmp / f)
        _fsync_dir(tmp)
        if final.exists():  # a stale copy from a run killed before it moved the pointer (never the latest)
            if current is not None and current[0] == final:
                shutil.rmtree(tmp)
                return final
            shutil.rmtree(final)
        os.replace(tmp, final)
        moved = True
        _fsync_dir(out)
        write_json_atomic(out / LATEST, {"step": step, "dir": name})
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if moved:  # the pointer did not move: the new directory is not a checkpoint anyone names
            shutil.rmtree(final, ignore_errors=True)
        kept = (f"the previous checkpoint {str(current[0])!r} (step {current[1]}) is kept and still the latest"
                if current else "no earlier checkpoint exists")
        raise CheckpointWriteError(f"writing checkpoint step {step} into {str(out)!r} failed: "
                                   f"{e.strerror or e}{f' ({e.filename})' if e.filename else ''}; the partial "
                                   f"checkpoint was removed; {kept}") from e
    kept = sorted(p for p in out.glob("ckpt-*") if p.is_dir())
    for old in kept[:-keep] if keep > 0 else []:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    for stale in out.glob(".tmp-ckpt-*"):
        if stale.is_dir() and not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)
    return final


def _latest_or_none(out: Path) -> tuple[Path, int] | None:
    try:
        return latest(out)
    except ValueError:
        return None


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check a checkpoint directory (its files exist, ``state.json`` parses, the tensor files' SHA-256 match the
    stored ones); returns its JSON state. CheckpointError naming the file at fault otherwise."""
    path = Path(path)
    f = path / STATE
    if not f.is_file():
        raise CheckpointError(f"checkpoint file {str(f)!r} is missing")
    try:
        state = json.loads(f.read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("not an object with an integer 'step'")  # noqa: TRY004
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint file {str(f)!r} is damaged: {e}") from e
    sums = state.get("sha256") or {}  # absent in checkpoints written before checksums were stored
    for name in (MODEL, OPTIM):
        t = path / name
        if not t.is_file():
            raise CheckpointError(f"checkpoint file {str(t)!r} is missing")
        if name in sums and sha256(t) != sums[name]:
            raise CheckpointError(f"checkpoint file {str(t)!r} is damaged: its SHA-256 differs from the one stored "
                                  f"in {STATE} when it was written")
    return state


def checkpoints(out: str | Path) -> list[tuple[Path, int]]:
    """Every ``ckpt-*`` directory of a run with its step, newest first."""
    found = []
    for p in Path(out).glob("ckpt-*"):
        tail = p.name.removeprefix("ckpt-")
        if p.is_dir() and tail.isdigit():
            found.append((p, int(tail)))
    return sorted(found, key=lambda x: -x[1])


def resumable(out: str | Path) -> tuple[tuple[Path, int] | None, list[str]]:
    """The newest checkpoint of run ``out`` that verifies, and notices about the damaged ones skipped.

    A damaged checkpoint newer than the one returned is renamed ``damaged-ckpt-*`` (kept for inspection, never
    resumed or overwritten) and ``latest.json`` is pointed at the good one. (None, notices) when there is no
    checkpoint at all; CheckpointError naming every damaged file when none verifies.
    """
    out = Path(out)
    notes: list[str] = []
    problems: list[str] = []
    try:
        pointed = latest(out)
    except ValueError as e:
        pointed = None
        problems.append(str(e))
    candidates = checkpoints(out)
    if pointed is not None:  # the pointer's checkpoint first, then the older ones
        candidates = [pointed] + [c for c in candidates if c[1] < pointed[1]]
    damaged: list[Path] = []
    for d, step in candidates:
        try:
            verify_checkpoint(d)
        except CheckpointError as e:
            problems.append(str(e))
            damaged.append(d)
            continue
        for bad in problems:
            notes.append(f"{bad}; resuming from the previous good checkpoint {str(d)!r} (step {step})")
        for p in damaged:
            aside = p.with_name(f"damaged-{p.name}")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(p, aside)
            notes.append(f"moved the damaged checkpoint {str(p)!r} aside to {str(aside)!r}")
        if pointed is None or pointed[0] != d:
            write_json_atomic(out / LATEST, {"step": step, "dir": d.name})
        return (d, step), notes
    if problems:
        raise CheckpointError(f"no checkpoint of {str(out)!r} can be resumed: " + "; ".join(problems))
    return None, notes


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    check: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Load a checkpoint directory into ``model`` (and ``optimizer``) after verifying it; returns its JSON state.
    ``check(state)`` runs before any tensor is read (it raises when the checkpoint does not fit the run)."""
    path = Path(path)
    state = verify_checkpoint(path)
    if check is not None:
        check(state)
    weights = _load(path / MODEL)
    current = model.state_dict()  # a sharded model's DTensors: each process takes its shard of the whole tensors
    model.load_state_dict({k: like(v, current[k]) if k in current else v for k, v in weights.items()}, strict=True)
    tensors = _load(path / OPTIM)
    if optimizer is not None:
        load_optimizer_tensors(model, optimizer, {k: v for k, v in tensors.items() if not k.startswith("rng.")},
                               state["optimizer_groups"])
    restore_rng(tensors)
    return state


def _load(f: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(f))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"checkpoint file {str(f)!r} cannot be read (truncated or corrupt?): {e}") from e


__all__ = ["checkpoints", "latest", "load_checkpoint", "model_tensors", "optimizer_tensors", "resumable",
           "save_checkpoint", "sha256", "verify_checkpoint", "write_json_atomic"]
