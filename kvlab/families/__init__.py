"""Checkpoint families: a HF ``config.json`` <-> :class:`~kvlab.config.ModelConfig`, HF tensors -> kvlab tensors.

``FAMILIES`` maps the ``architectures`` entry of ``config.json`` to its :class:`Family`.
``load(dir)`` is ``kvlab.load``: config, weights (safetensors only), shape check, model.
``to_hf_config(cfg)`` is the way back: the transformers ``config.json`` of a ModelConfig's shape.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..checkpoint import read_config, read_tensors
from ..config import WEIGHT_DTYPES, ModelConfig
from ..errors import CheckpointError, UnknownNameError
from ..gguf_checkpoint import GGUFFile, GGUFTensors, hf_config, is_gguf, read_gguf
from ..names import did_you_mean, find
from . import deepseek_v3, deepseek_v4, deepseek_v32, gemma3, gemma4, laguna, llama, mistral, qwen3, qwen3_moe, zaya
from .base import Family

if TYPE_CHECKING:
    from ..model import Model

FAMILIES: dict[str, Family] = {f.architecture: f for f in (
    llama.FAMILY, mistral.FAMILY, qwen3.FAMILY, qwen3.QWEN2_FAMILY, qwen3_moe.FAMILY, laguna.FAMILY)}
FAMILIES.update({f.architecture: f for f in (gemma4.FAMILY, gemma4.CG_FAMILY, gemma3.FAMILY, gemma3.CG_FAMILY)})
FAMILIES[zaya.ARCH] = zaya.FAMILY
FAMILIES[deepseek_v4.ARCH] = deepseek_v4.FAMILY
FAMILIES[deepseek_v3.ARCH] = deepseek_v3.FAMILY
FAMILIES[deepseek_v32.ARCH] = deepseek_v32.FAMILY

__all__ = ["FAMILIES", "Family", "config_from_dir", "config_from_hf", "expected_shapes", "family_of", "load",
           "load_state", "register", "to_hf_config"]


def register(family: Family) -> Family:
    """Add a family to the registry (replacing any with the same architecture)."""
    FAMILIES[family.architecture] = family
    return family


def family_of(cfg: dict[str, Any]) -> Family:
    """The family named by ``cfg['architectures']``; ValueError listing the supported ones otherwise."""
    archs = cfg.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    for a in archs:
        found = find(a, FAMILIES) if isinstance(a, str) else None
        if found is not None:
            return FAMILIES[found]
    got = ", ".join(map(str, archs)) if archs else "none (no 'architectures' entry)"
    near = did_you_mean(str(archs[0]), FAMILIES) if archs else ""
    raise UnknownNameError(f"unsupported architecture {got}{near}; supported: {', '.join(sorted(FAMILIES))}")


def config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    """A ModelConfig from a parsed ``config.json``; its ``family`` records the architecture it was read as."""
    family = family_of(cfg)
    config = family.config_from_hf(cfg)
    config.family = family.architecture
    stored = cfg.get("dtype") or cfg.get("torch_dtype") or (cfg.get("text_config") or {}).get("dtype")
    config.dtype = stored if stored in WEIGHT_DTYPES else None  # what the checkpoint holds ("auto", absent: unknown)
    return config


def _same(a: ModelConfig, b: ModelConfig) -> bool:
    def key(c: ModelConfig) -> dict[str, Any]:
        return {k: v for k, v in c.to_dict().items() if k not in ("name", "source", "family", "dtype")}

    return key(a) == key(b)


def _written_by(family: Family, config: ModelConfig) -> dict[str, Any]:
    assert family.to_hf_config is not None
    d = family.to_hf_config(config)
    if not _same(family.config_from_hf(d), config):
        raise ValueError(f"{family.architecture} cannot hold {config.name}'s shape (it reads its config.json back "
                         "as a different model)")
    return d


def to_hf_config(config: ModelConfig) -> dict[str, Any]:
    """The transformers ``config.json`` dict of ``config``'s shape (with ``architectures`` and ``model_type``).

    Written by the family ``config.family`` names when it writes configs, else by the first family in
    ``FAMILIES`` that does; either way the family must read the dict back as the same model (all but name,
    source and family). ValueError when no family can.
    """
    named = FAMILIES.get(config.family) if config.family else None
    if named is not None and named.to_hf_config is not None:
        return _written_by(named, config)
    writers = [f for f in FAMILIES.values() if f.to_hf_config is not None]
    for family in writers:
        try:
            return _written_by(family, config)
        except (ValueError, KeyError, TypeError):
            continue
    raise ValueError(f"{config.name}: no transformers family ({', '.join(f.architecture for f in writers)}) "
                     "has this shape; for --vs transformers pass a checkpoint directory instead")


def config_from_dir(path: str | Path) -> ModelConfig:
    """A ModelConfig from a checkpoint directory's ``config.json``."""
    cfg = read_config(path)
    config = config_from_hf(cfg)
    config.source = f"{path} ({config.family})"
    return config


def _skeleton(config: ModelConfig) -> Model:
    """The model with its parameters on ``meta`` (no memory, no init cost); rope tables stay on the CPU."""
    from ..model import Model

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


def config_from_gguf(path: str | Path | GGUFFile) -> ModelConfig:
    """The ModelConfig of a GGUF file, from its header only."""
    g = path if isinstance(path, GGUFFile) else read_gguf(path)
    config = config_from_hf(hf_config(g))
    config.name = g.path.name.removesuffix(".gguf")
    config.source = f"{g.path} (GGUF {g.arch}, {g.meta.get('general.name', 'unnamed')})"
    return config


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
    directory written by ``kvlab train`` (kvlab/native.py)."""
    from ..models import resolve_file
    from ..native import native_checkpoint

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
    return model.to(device).eval()
