"""The technique lab: train small kvlab models from scratch, or any model kvlab loads, on data that needs no download.

- :mod:`kvlab.train.data` — synthetic long-context tasks (associative recall, passkey, copy) and
  byte-level text, deterministic from a seed and a sample index; :mod:`kvlab.train.text` — real text cut by a
  model's own tokenizer, held out from kvlab eval's corpus;
- :mod:`kvlab.train.init` — start from a checkpoint (``[model] init = ...``);
- :mod:`kvlab.train.distill` — recovery by distillation from a frozen teacher (``[distill]``, :func:`recover`);
- :mod:`kvlab.train.config` — the training config file (JSON/TOML), validated before training starts;
- :mod:`kvlab.train.trainer` — AdamW + warmup/cosine, clipping, accumulation, bf16 autocast, evaluation;
- :mod:`kvlab.train.checkpointing` — atomic safetensors + JSON checkpoints, exact ``--resume``;
- :mod:`kvlab.train.dist` — data parallelism on torch.distributed (torchrun; gloo on CPU, nccl on GPU);
  :mod:`kvlab.train.fsdp` — the same, sharded with PyTorch's FSDP2 (``train.fsdp``, ``--fsdp``);
- :mod:`kvlab.train.ablate` — parameter-matched sweeps over techniques, seeds and Welch's t-test (``kvlab ablate``);
- :mod:`kvlab.train.probe` — answer accuracy by distance and by length beyond the training length.

See docs/training.md.
"""

from .config import TrainConfig, TrainSettings, load_config, parse_config, scale_model
from .data import TASKS, make_task
from .trainer import TrainResult, evaluate, train

__all__ = ["TASKS", "TrainConfig", "TrainResult", "TrainSettings", "evaluate", "load_config", "make_task",
           "parse_config", "scale_model", "train"]
