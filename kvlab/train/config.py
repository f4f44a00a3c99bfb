"""The training configuration file: a model, a task and training settings, validated before anything runs.

A file (JSON or TOML) holds three tables (and an optional fourth, ``[distill]``)::

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
``max_positions`` default to what the task needs. Or ``{"init": <anything kvlab.load accepts>}``: training starts
from that model's weights (fp32 master weights) and its own ModelConfig; ``init`` takes no other field (a changed
architecture is a conversion: convert first, then start from the converted checkpoint) -- InitError otherwise.

``[distill]`` (kvlab/train/distill.py): ``teacher`` (anything kvlab.load accepts, same vocabulary as the student),
``kl_weight`` (1.0), ``lm_weight`` (0.0), ``temperature`` (1.0). With a ``text`` task the tokenizer defaults to the
teacher's (else to ``model.init``'s). Every error names the table and field at fault.
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
from kvlab.errors import ConfigError
from kvlab.resolve import resolve_spec
from kvlab.sharing import share_last
from kvlab.shrink import FIELDS as SHRINK_FIELDS
from kvlab.shrink import shrink
from kvlab.validate import check_fields

from .data import Task, make_task
from .init import InitError, init_config

TOP_LEVEL = ("model", "task", "train", "distill", "out")
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
    fsdp: bool = False  # under torchrun: shard weights, gradients, AdamW moments with FSDP2 (kvlab/train/fsdp.py)

    # settings that may change between a run and its resumption (they do not change the arithmetic; a sharded run
    # computes what data parallel computes, up to float summation order, and writes the same checkpoint layout)
    RESUMABLE = ("steps", "eval_every", "eval_batches", "save_every", "keep", "threads", "fsdp")

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


class DistillError(ConfigError):
    """A ``[distill]`` table that cannot be run (no teacher, a teacher of another vocabulary, zero loss weights)."""


@dataclass
class DistillSettings:
    """The ``[distill]`` table: loss per scored token = ``kl_weight * T^2 * KL(teacher_T || student_T) +
    lm_weight * cross-entropy``, where ``_T`` is the next-token softmax at temperature ``T`` (Hinton et al. 2015,
    arXiv 1503.02531: ``T^2`` keeps the gradient scale when ``T != 1``)."""

    teacher: str
    kl_weight: float = 1.0
    lm_weight: float = 0.0
    temperature: float = 1.0

    def validate(self) -> None:
        if not isinstance(self.teacher, str) or not self.teacher:
            raise DistillError(f"distill.teacher={self.teacher!r}: a model kvlab.load accepts (checkpoint directory, "
                               ".gguf, named model such as smollm2-135m, kvlab run directory)")
        for n in ("kl_weight", "lm_weight"):
            v = getattr(self, n)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise DistillError(f"distill.{n}={v!r}: a number >= 0")
        if self.kl_weight == 0 and self.lm_weight == 0:
            raise DistillError("distill.kl_weight and distill.lm_weight are both 0: the loss would be zero; set "
                               "kl_weight > 0 (distillation) and/or lm_weight > 0 (language-model loss)")
        t = self.temperature
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t <= 0:
            raise DistillError(f"distill.temperature={t!r}: a number > 0")


@dataclass
class TrainConfig:
    """A validated training configuration: the resolved ModelConfig, the task and the settings; ``init`` the model
    whose weights training starts from (None: random init), ``distill`` the teacher and loss weights (None: LM loss)."""

    model: ModelConfig
    task: Task
    train: TrainSettings
    out: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)
    init: str | None = None
    distill: DistillSettings | None = None

    def fingerprint(self) -> dict[str, Any]:
        """What a resumed run must share with the run it continues."""
        t = {k: v for k, v in dataclasses.asdict(self.train).items() if k not in TrainSettings.RESUMABLE}
        fp: dict[str, Any] = {"model": self.model.to_dict(), "task": dataclasses.asdict(self.task), "train": t}
        if self.init is not None:
            fp["init"] = self.init
        if self.distill is not None:
            fp["distill"] = dataclasses.asdict(self.distill)
        return json.loads(json.dumps(fp, default=str))


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
    if "init" in spec:
        extra = sorted(set(spec) - {"init"})
        if extra:
            raise InitError(f"model.init={spec['init']!r} starts from that checkpoint's own ModelConfig; field(s) "
                            f"{extra} cannot be set beside it (a changed architecture is a conversion: convert the "
                            "model first, e.g. with kvlab retrofit, and start from the converted checkpoint)")
        cfg = init_config(spec["init"])
        if cfg.vocab_size < task.vocab_size:
            raise InitError(f"model.init={spec['init']!r} has vocab_size {cfg.vocab_size:,}; the task needs at least "
                            f"{task.vocab_size:,}")
        if cfg.max_positions < task.seq_len:
            raise InitError(f"model.init={spec['init']!r} has max_positions {cfg.max_positions:,}; the task's "
                            f"seq_len is {task.seq_len:,}")
        return cfg
    spec = dict(spec)
    spec.setdefault("vocab_size", task.vocab_size)
    spec.setdefault("max_positions", task.seq_len)
    if "preset" in spec:
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
    dist = _distill(raw.get("distill"))
    model_spec = raw["model"]
    init = model_spec.get("init") if isinstance(model_spec, dict) else None
    task_spec = raw["task"]
    if isinstance(task_spec, dict) and task_spec.get("kind") == "text" and "tokenizer" not in task_spec:
        default = dist.teacher if dist is not None else init
        if default is not None:  # the teacher's tokenizer (else the starting model's)
            task_spec = {**task_spec, "tokenizer": str(default)}
    task = make_task(task_spec)
    tr = raw["train"]
    if not isinstance(tr, dict):
        raise ValueError("train: a table of training settings")  # noqa: TRY004
    _known_fields(tr, TrainSettings, "train", ValueError)
    if "steps" not in tr:
        raise ValueError("train: missing field 'steps'")
    settings = TrainSettings(**tr)
    settings.validate()
    model = build_model_config(model_spec, task)
    if dist is not None:
        teacher = init_config(dist.teacher, field="distill.teacher")
        if teacher.vocab_size != model.vocab_size:
            raise DistillError(f"distill.teacher={dist.teacher!r} has vocab_size {teacher.vocab_size:,}, the student "
                               f"{model.vocab_size:,}: KL on next-token distributions needs the same vocabulary")
    out = raw.get("out")
    if out is not None and not isinstance(out, str):
        raise ValueError(f"out={out!r}: a directory path")
    return TrainConfig(model=model, task=task, train=settings, out=out, raw=copy.deepcopy(raw),
                       init=str(init) if init is not None else None, distill=dist)


def _known_fields(table: dict[str, Any], cls: type, where: str, error: type[ValueError]) -> None:
    """``error`` naming the fields of ``table`` that dataclass ``cls`` does not have, and the ones it does."""
    known = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(table) - known)
    if bad:
        raise error(f"{where}: unknown field(s) {bad}; allowed: {sorted(known)}")


def _distill(spec: Any) -> DistillSettings | None:
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise DistillError(f"distill: a table with a 'teacher', got {type(spec).__name__}")
    _known_fields(spec, DistillSettings, "distill", DistillError)
    if "teacher" not in spec:
        raise DistillError("distill: missing field 'teacher' (the model to distil from)")
    d = DistillSettings(**spec)
    d.validate()
    return d


def load_config(path: str | Path) -> TrainConfig:
    """Read and validate a training configuration file (JSON or TOML)."""
    try:
        return parse_config(read_file(path))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


__all__ = ["SCALE_FIELDS", "DistillError", "DistillSettings", "TrainConfig", "TrainSettings", "build_model_config", "load_config", "parse_config",
           "scale_model"]
