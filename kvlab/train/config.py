"""The training configuration file: a model, a task and training settings, validated before anything runs.

A file (JSON or TOML) holds three tables::

    [model]                 # a preset scaled down ...
    preset = "gemma-4-e2b"  # or a ModelConfig .json file / checkpoint directory
    hidden_size = 64
    num_layers = 4
    head_dim = 16

    [task]                  # kvlab/train/data.py: recall, passkey, copy, bytes
    kind = "recall"
    seq_len = 64

    [train]
    steps = 200

``model`` is either ``{"preset": ..., <scale fields>}`` or a ModelConfig written out (``vocab_size``,
``hidden_size``, ``layers`` [...]); a layer entry may carry ``"repeat": n``. ``vocab_size`` and
``max_positions`` default to what the task needs. Every error names the table and field at fault.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvlab.config import ModelConfig
from kvlab.shrink import FIELDS as SHRINK_FIELDS
from kvlab.shrink import shrink
from kvlab.validate import check_fields

from .data import Task, make_task

TOP_LEVEL = ("model", "task", "train", "out")
SCALE_FIELDS = {
    "preset": "preset name, kvlab ModelConfig .json file or checkpoint directory to start from",
    **SHRINK_FIELDS,
    "share_last": "the last n layers read the K/V of an earlier layer of their type (kvlab.sharing.share_last)",
    "layer_overrides": "a table of LayerSpec fields set on every layer",
}


@dataclass
class TrainSettings:
    """Optimisation and bookkeeping settings (the ``[train]`` table).

    ``batch_size`` is per process and per micro-batch: the global batch of one optimizer step is
    ``batch_size * grad_accum * processes`` samples. The learning rate warms up linearly over
    ``warmup_steps`` then follows a cosine down to ``lr * min_lr_ratio`` at ``steps``.
    ``eval_every`` / ``save_every``: 0 means only at the end.
    """

    steps: int
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float | None = 1.0
    dtype: str = "fp32"
    seed: int = 0
    init_std: float = 0.02
    eval_every: int = 0
    eval_batches: int = 4
    save_every: int = 0
    keep: int = 2
    device: str = "auto"
    threads: int | None = None

    # settings that may change between a run and its resumption (they do not change the arithmetic)
    RESUMABLE = ("steps", "eval_every", "eval_batches", "save_every", "keep", "threads")

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else min(100, self.steps // 10)

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine to the floor."""
        w = self.warmup
        if step < w:
            return self.lr * (step + 1) / w
        span = max(1, self.steps - w)
        t = min(1.0, (step - w) / span)
        floor = self.lr * self.min_lr_ratio
        return floor + (self.lr - floor) * 0.5 * (1 + math.cos(math.pi * t))

    def validate(self) -> None:
        check_fields(self, "train")  # every field's type, finite numbers (kvlab/validate.py)

        def pos_int(name: str, zero: bool = False) -> None:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if zero else 1):
                raise ValueError(f"train.{name}={v!r}: must be an integer >= {0 if zero else 1}")

        for n in ("steps", "batch_size", "grad_accum", "eval_batches", "keep"):
            pos_int(n)
        for n in ("eval_every", "save_every", "seed"):
            pos_int(n, zero=True)
        if self.warmup_steps is not None:
            pos_int("warmup_steps", zero=True)
        if self.threads is not None:
            pos_int("threads")
        for n in ("lr", "eps", "init_std"):
            v = getattr(self, n)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                raise ValueError(f"train.{n}={v!r}: must be a number > 0")
        if not isinstance(self.min_lr_ratio, (int, float)) or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"train.min_lr_ratio={self.min_lr_ratio!r}: must be in [0, 1]")
        if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            raise ValueError(f"train.weight_decay={self.weight_decay!r}: must be >= 0")
        b = self.betas
        if not (isinstance(b, (list, tuple)) and len(b) == 2 and all(isinstance(x, (int, float)) and 0 <= x < 1
                                                                      for x in b)):
            raise ValueError(f"train.betas={b!r}: two numbers in [0, 1)")
        self.betas = (float(b[0]), float(b[1]))
        if self.grad_clip is not None and (not isinstance(self.grad_clip, (int, float)) or self.grad_clip < 0):
            raise ValueError(f"train.grad_clip={self.grad_clip!r}: a number >= 0 (0 or null: no clipping)")
        if self.dtype not in ("fp32", "bf16"):
            raise ValueError(f"train.dtype={self.dtype!r}: allowed fp32 (no autocast), bf16 (bf16 autocast)")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"train.device={self.device!r}: allowed auto, cpu, cuda")


@dataclass
class TrainConfig:
    """A validated training configuration: the resolved ModelConfig, the task and the settings."""

    model: ModelConfig
    task: Task
    train: TrainSettings
    out: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> dict[str, Any]:
        """What a resumed run must share with the run it continues."""
        t = {k: v for k, v in dataclasses.asdict(self.train).items() if k not in TrainSettings.RESUMABLE}
        return json.loads(json.dumps({"model": self.model.to_dict(), "task": dataclasses.asdict(self.task),
                                      "train": t}, default=str))


def read_file(path: str | Path) -> dict[str, Any]:
    """Parse a JSON or TOML file (by extension; otherwise JSON then TOML)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file {str(p)!r} not found")
    text = p.read_text()
    try:
        if p.suffix == ".toml":
            return tomllib.loads(text)
        if p.suffix == ".json":
            return json.loads(text)
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"{str(p)!r} is not valid {p.suffix.lstrip('.').upper() or 'JSON/TOML'}: {e}") from e


def _expand_layers(layers: Any) -> list[dict[str, Any]]:
    if not isinstance(layers, list) or not layers:
        raise ValueError("model.layers: a non-empty list of layer tables")
    out = []
    for i, x in enumerate(layers):
        if not isinstance(x, dict):
            raise ValueError(f"model.layers[{i}]: a table of LayerSpec fields, got {type(x).__name__}")  # noqa: TRY004
        x = dict(x)
        n = x.pop("repeat", 1)
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"model.layers[{i}].repeat={n!r}: must be a positive integer")
        out.extend(copy.deepcopy(x) for _ in range(n))
    return out


def _model_error(e: Exception) -> ValueError:
    msg = str(e)
    if "missing" in msg and "required" in msg:  # TypeError of a dataclass constructor
        cls = msg.split(".__init__")[0].split()[-1] if ".__init__" in msg else "model"
        missing = msg.split("argument")[-1].strip(": s")
        return ValueError(f"model: {cls} is missing required field(s) {missing}")
    return ValueError(f"model: {msg}")


def scale_model(cfg: ModelConfig, spec: dict[str, Any]) -> ModelConfig:
    """``cfg`` scaled down by the fields of ``spec`` (see ``SCALE_FIELDS``, sizes by :func:`kvlab.shrink.shrink`),
    then ``layer_overrides`` on every layer and ``share_last``; validated."""
    from kvlab.sharing import share_last

    unknown = sorted(set(spec) - set(SCALE_FIELDS))
    if unknown:
        raise ValueError(f"model: unknown field(s) {unknown} for a preset-based model; allowed: "
                         f"{sorted(SCALE_FIELDS)}")
    over = spec.get("layer_overrides") or {}
    if not isinstance(over, dict):
        raise ValueError("model.layer_overrides: a table of LayerSpec fields")  # noqa: TRY004
    known = {f.name for f in dataclasses.fields(cfg.layers[0])}
    bad = sorted(set(over) - known)
    if bad:
        raise ValueError(f"model.layer_overrides: unknown LayerSpec field(s) {bad}; allowed: {sorted(known)}")
    try:
        out = shrink(cfg, **{k: v for k, v in spec.items() if k in SHRINK_FIELDS})
        if over:
            out = dataclasses.replace(out, layers=[dataclasses.replace(x, **over) for x in out.layers])
        if "share_last" in spec:
            out = share_last(out, spec["share_last"])
    except (TypeError, ValueError) as e:
        raise _model_error(e) from e
    return out


def build_model_config(spec: Any, task: Task) -> ModelConfig:
    """The ModelConfig a ``model`` table describes, with vocab and positions defaulted from the task."""
    if not isinstance(spec, dict):
        raise ValueError(f"model: a table (a preset to scale, or a ModelConfig), got {type(spec).__name__}")  # noqa: TRY004
    spec = dict(spec)
    spec.setdefault("vocab_size", task.vocab_size)
    spec.setdefault("max_positions", task.seq_len)
    if "preset" in spec:
        from kvlab.bench import resolve_spec

        base = resolve_spec(spec["preset"])
        rest = {k: v for k, v in spec.items() if k != "preset"}
        cfg = scale_model(base, rest)
    else:
        if "layers" not in spec:
            raise ValueError("model: missing field 'layers' (or name a 'preset' to scale down)")
        spec["layers"] = _expand_layers(spec["layers"])
        try:
            cfg = ModelConfig.from_dict(spec)
        except (TypeError, ValueError) as e:
            raise _model_error(e) from e
    if cfg.vocab_size < task.vocab_size:
        raise ValueError(f"model.vocab_size={cfg.vocab_size}: the task needs at least {task.vocab_size}")
    if cfg.max_positions < task.seq_len:
        raise ValueError(f"model.max_positions={cfg.max_positions}: the task's seq_len is {task.seq_len}")
    return cfg


def parse_config(raw: dict[str, Any]) -> TrainConfig:
    """Validate a parsed training configuration; every error names the table and field."""
    if not isinstance(raw, dict):
        raise ValueError("a training config is a table with 'model', 'task' and 'train'")  # noqa: TRY004
    unknown = sorted(set(raw) - set(TOP_LEVEL))
    if unknown:
        raise ValueError(f"unknown top-level field(s) {unknown}; allowed: {list(TOP_LEVEL)}")
    for k in ("model", "task", "train"):
        if k not in raw:
            raise ValueError(f"missing field {k!r} (a training config needs model, task and train)")
    task = make_task(raw["task"])
    tr = raw["train"]
    if not isinstance(tr, dict):
        raise ValueError("train: a table of training settings")  # noqa: TRY004
    known = {f.name for f in dataclasses.fields(TrainSettings)}
    bad = sorted(set(tr) - known)
    if bad:
        raise ValueError(f"train: unknown field(s) {bad}; allowed: {sorted(known)}")
    if "steps" not in tr:
        raise ValueError("train: missing field 'steps'")
    settings = TrainSettings(**tr)
    settings.validate()
    model = build_model_config(raw["model"], task)
    out = raw.get("out")
    if out is not None and not isinstance(out, str):
        raise ValueError(f"out={out!r}: a directory path")
    return TrainConfig(model=model, task=task, train=settings, out=out, raw=copy.deepcopy(raw))


def load_config(path: str | Path) -> TrainConfig:
    """Read and validate a training configuration file (JSON or TOML)."""
    try:
        return parse_config(read_file(path))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


__all__ = ["SCALE_FIELDS", "TrainConfig", "TrainSettings", "build_model_config", "load_config", "parse_config",
           "scale_model"]
