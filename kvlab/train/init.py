"""Starting points other than random weights: any model ``kvlab.load`` accepts (a HF checkpoint directory, a
``.gguf`` file, a named installed model such as ``smollm2-135m``, or a kvlab run / checkpoint directory).

:func:`init_config` reads only the ModelConfig (so a training config is validated before any weights are read);
:func:`init_model` loads the weights as fp32 master weights. Both raise :class:`InitError` naming the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import kvlab
from kvlab.config import ModelConfig
from kvlab.errors import KvlabError
from kvlab.families import config_from_dir, config_from_gguf
from kvlab.gguf_checkpoint import is_gguf
from kvlab.models import resolve_file
from kvlab.native import native_checkpoint

if TYPE_CHECKING:
    from kvlab.model import Model


class InitError(KvlabError):
    """A model to start from (``model.init``, ``distill.teacher``) that kvlab cannot load."""


def _check_spec(spec: Any, field: str) -> str:
    if isinstance(spec, Path):
        spec = str(spec)
    if not isinstance(spec, str) or not spec:
        raise InitError(f"{field}={spec!r}: a model kvlab.load accepts (a checkpoint directory, a .gguf file, a "
                        "named model such as smollm2-135m, or a kvlab run directory)")
    return spec


def _explain(spec: str, field: str, e: Exception) -> InitError:
    return InitError(f"{field}={spec!r} cannot be loaded: {e} (allowed: a HF checkpoint directory with config.json "
                     "and safetensors, a .gguf file, a named model such as smollm2-135m, or a kvlab run / checkpoint "
                     "directory)")


def init_config(spec: str | Path, field: str = "model.init") -> ModelConfig:
    """The ModelConfig of the model ``spec`` names, read without its weights."""
    spec = _check_spec(spec, field)
    try:
        path = resolve_file(spec)
        if is_gguf(path):
            return config_from_gguf(path)
        native = native_checkpoint(path)
        if native is not None:
            return native.config
        if not Path(str(path)).exists():
            raise ValueError("no such file or directory, and not a named model")
        return config_from_dir(path)
    except (ValueError, OSError) as e:
        raise _explain(spec, field, e) from e


def init_model(spec: str | Path, device: str | torch.device = "cpu", field: str = "model.init") -> Model:
    """The model ``spec`` names with its weights in fp32 (master weights for training), in eval mode."""
    spec = _check_spec(spec, field)
    try:
        return kvlab.load(spec, dtype=torch.float32, device=device)
    except (ValueError, OSError) as e:
        raise _explain(spec, field, e) from e


__all__ = ["InitError", "init_config", "init_model"]
