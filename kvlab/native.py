"""kvlab's own checkpoints: what ``kvlab train`` writes (kvlab/train/checkpointing.py), loadable like any model.

Accepted directories:
- a run directory: ``latest.json`` names the checkpoint to load (``ckpt-NNNNNNN/``), ``config.json`` holds the
  kvlab ModelConfig;
- one checkpoint directory: ``model.safetensors`` (kvlab tensor names) and ``state.json`` with its ``model_config``;
- any directory with ``model.safetensors`` and a ``config.json`` that is a kvlab ModelConfig (a ``layers`` list and
  no ``architectures`` entry).
Weights are read with safetensors only (never pickle); the tensors already carry kvlab's names.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import ModelConfig
from .errors import CheckpointWriteError

if TYPE_CHECKING:
    import torch

MODEL, STATE, LATEST, CONFIG = "model.safetensors", "state.json", "latest.json", "config.json"


@dataclass
class NativeCheckpoint:
    """A kvlab checkpoint: its ModelConfig and the safetensors file of its weights."""

    config: ModelConfig
    weights: Path

    def state(self, dtype: torch.dtype | None = None, device: str | torch.device | None = None
              ) -> dict[str, torch.Tensor]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(self.weights))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read {str(self.weights)!r} (truncated or corrupt?): {e}") from e
        out = {}
        for k, v in tensors.items():
            v = v.to(dtype) if dtype is not None and v.is_floating_point() else v
            out[k] = v.to(device) if device is not None else v
        return out


def _json(f: Path) -> Any:
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{str(f)!r} is not readable JSON: {e}") from e


def is_native_config(d: Any) -> bool:
    """A parsed config.json that is kvlab's own ModelConfig (not a transformers config)."""
    return isinstance(d, dict) and isinstance(d.get("layers"), list) and "architectures" not in d


def _config(d: Any, where: Path) -> ModelConfig:
    try:
        cfg = ModelConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{str(where)!r}: not a valid kvlab ModelConfig: {e}") from e
    cfg.source = cfg.source or f"{where.parent} (kvlab checkpoint)"
    return cfg


def latest(out: str | Path) -> tuple[Path, int] | None:
    """The directory and step of the checkpoint ``latest.json`` names, or None when there is none."""
    out = Path(out)
    f = out / LATEST
    if not f.is_file():
        return None
    try:
        info = json.loads(f.read_text())
        d = out / info["dir"]
        step = int(info["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{str(f)!r} is not a valid checkpoint pointer: {e}") from e
    if not (d / STATE).is_file():
        raise ValueError(f"{str(f)!r} names {str(d)!r}, which is not a complete checkpoint")
    return d, step


def native_checkpoint(path: Any) -> NativeCheckpoint | None:
    """The kvlab checkpoint at ``path``, or None when ``path`` is not one (a HF checkpoint, a file, a name...)."""
    if not isinstance(path, (str, Path)) or not Path(path).is_dir():
        return None
    d = Path(path)
    if (d / LATEST).is_file():  # a run directory: follow the pointer
        found = latest(d)
        if found is None:
            return None
        d = found[0]
    state = d / STATE
    if (d / MODEL).is_file() and state.is_file():
        s = _json(state)
        if isinstance(s, dict) and is_native_config(s.get("model_config")):
            return NativeCheckpoint(_config(s["model_config"], state), d / MODEL)
    cfg = Path(path) / CONFIG
    if (d / MODEL).is_file() and cfg.is_file():
        c = _json(cfg)
        if is_native_config(c):
            return NativeCheckpoint(_config(c, cfg), d / MODEL)
    return None


def save(model: Any, path: str | Path, tokenizer: Any = None, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as a kvlab checkpoint directory ``path``: ``model.safetensors`` (kvlab tensor names, CPU,
    contiguous), ``config.json`` (its ModelConfig) and, when given, the tokenizer (``tokenizer.json`` and friends,
    kvlab/tokenizer.py) and ``extra`` JSON files (name -> object, e.g. a retrofit report). ``kvlab.load(path)`` and
    every verb accept the result. Written into a temporary directory and moved into place, so a crash never leaves
    a half-written checkpoint under ``path``; an existing non-empty ``path`` is refused (name the error, no overwrite).
    """
    from safetensors.torch import save_file

    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointWriteError(f"{str(out)!r} already exists and is not an empty directory; choose another path")
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        seen: set[int] = set()
        weights = {}
        for k, v in model.state_dict().items():  # safetensors refuses aliased tensors: a second name gets a copy
            t = v.detach().to("cpu")
            weights[k] = t.clone() if t.data_ptr() in seen else t.contiguous()
            seen.add(t.data_ptr())
        save_file(weights, str(tmp / MODEL), metadata={"format": "pt", "kvlab": "checkpoint"})
        (tmp / CONFIG).write_text(json.dumps(model.config.to_dict(), indent=1, default=str))
        if tokenizer is not None:
            from .tokenizer import save_tokenizer

            save_tokenizer(tokenizer, tmp)
        for name, obj in (extra or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=1, default=str))
        if out.exists():
            out.rmdir()
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
