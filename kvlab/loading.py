"""``kvlab.load``: a checkpoint's weights read under kvlab names, checked against its config, in a model.

The config side (which family, its ModelConfig) is kvlab/families; the files are read by kvlab/checkpoint.py
(safetensors), kvlab/gguf_checkpoint.py and kvlab/native.py (kvlab's own checkpoints). Never pickle.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import hugepages
from .checkpoint import read_config, read_tensors
from .config import ModelConfig
from .errors import CheckpointError
from .families import Family, config_from_dir, config_from_gguf, family_of
from .gguf_checkpoint import GGUFFile, GGUFTensors, is_gguf, read_gguf
from .model import Model
from .models import resolve_file
from .native import native_checkpoint


def _skeleton(config: ModelConfig) -> Model:
    """The model with its parameters on ``meta`` (no memory, no init cost); rope tables stay on the CPU."""
    with torch.device("meta"):
        return Model(config)


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """kvlab tensor name -> shape for ``config`` (from a parameter-free skeleton of the model)."""
    return {k: tuple(v.shape) for k, v in _skeleton(config).state_dict().items()}


def check_state(state: dict[str, torch.Tensor], config: ModelConfig, family: Family | None = None,
                where: str = "checkpoint") -> None:
    """Raise one CheckpointError naming every missing, unexpected or mis-shaped tensor, every integer tensor where a
    float weight belongs and every tensor holding NaN or inf values (with their count)."""
    skeleton = _skeleton(config).state_dict()
    want = {k: tuple(v.shape) for k, v in skeleton.items()}
    problems = []

    def hf(name: str) -> str:
        h = family.hf_name(name) if family else None
        return f" (HF {h})" if h and h != name else ""

    for name in sorted(want.keys() - state.keys()):
        problems.append(f"missing {name}{hf(name)}: expected shape {list(want[name])}")
    for name in sorted(state.keys() - want.keys()):
        problems.append(f"unexpected {name}{hf(name)}: shape {list(state[name].shape)}")
    for name in sorted(want.keys() & state.keys()):
        if tuple(state[name].shape) != want[name]:
            problems.append(f"wrong shape {name}{hf(name)}: expected {list(want[name])}, "
                            f"got {list(state[name].shape)}")
    for name in sorted(want.keys() & state.keys()):
        t = state[name]
        if skeleton[name].is_floating_point() and not t.is_floating_point():
            problems.append(f"wrong dtype {name}{hf(name)}: {t.dtype}, where a floating-point weight belongs")
        elif not t.is_meta and t.is_floating_point() and t.dtype.itemsize > 1 and not torch.isfinite(t).all():
            nan = int(torch.isnan(t).sum())
            inf = int(torch.isinf(t).sum())
            problems.append(f"non-finite values in {name}{hf(name)}: {nan + inf} of {t.numel()} ({nan} NaN, {inf} inf)")
    if problems:
        arch = f" ({family.architecture})" if family else ""
        raise CheckpointError(f"{where}{arch} does not match the model its config describes:\n  "
                              + "\n  ".join(problems))


def load_state(path: str | Path, config: ModelConfig | None = None, dtype: torch.dtype | None = None,
               device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under kvlab names, checked against ``config`` (default: its config.json).

    Floating tensors are cast to ``dtype`` (if given) as they are read, one at a time, except those the family
    keeps in fp32 as transformers does (``Family.keep_fp32``; e.g. DeepSeek's router biases, V4's norms and sinks).
    """
    cfg = read_config(path)
    family = family_of(cfg)
    config = config if config is not None else family.config_from_hf(cfg)
    lazy = read_tensors(path, dtype, family.keep_fp32)
    state = family.map_weights(lazy, config)
    if device is not None:
        state = {k: v.to(device) for k, v in state.items()}
    check_state(state, config, family, where=f"checkpoint {str(path)!r}")
    return state


def load_gguf_state(path: str | Path | GGUFFile, config: ModelConfig | None = None, dtype: torch.dtype | None = None,
                    device: str | torch.device | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The file's config and its tensors under kvlab names (dequantised), checked against the config."""
    g = path if isinstance(path, GGUFFile) else read_gguf(path)
    config = config if config is not None else config_from_gguf(g)
    tensors = GGUFTensors(g, dtype)
    family = family_of(tensors.cfg)
    state = family.map_weights(tensors, config)
    if device is not None:
        state = {k: v.to(device) for k, v in state.items()}
    check_state(state, config, family, where=f"GGUF file {str(g.path)!r}")
    return config, state


def load(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Model:
    """``kvlab.load``: a Model with its weights, from a HF-layout checkpoint directory (safetensors only), a ``.gguf``
    file, a named installed model (``smollm2-135m``, ``gemma-3-270m``: kvlab/models.py) or a kvlab run / checkpoint
    directory written by ``kvlab train`` (kvlab/native.py). Its big CPU weights in huge pages (kvlab/hugepages.py)."""
    path = resolve_file(path)
    native = None if is_gguf(path) else native_checkpoint(path)
    if is_gguf(path):
        config, state = load_gguf_state(path, dtype=dtype, device=device)
    elif native is not None:
        config, state = native.config, native.state(dtype, device)
        check_state(state, config, where=f"kvlab checkpoint {str(native.weights)!r}")
    else:
        config = config_from_dir(path)
        state = load_state(path, config, dtype=dtype, device=device)
    model = _skeleton(config)
    model.load_state_dict(state, strict=True, assign=True)
    return hugepages.adopt(model.to(device)).eval()  # big CPU weights in huge pages (a decode step streams them)


__all__ = ["check_state", "expected_shapes", "load", "load_gguf_state", "load_state"]
