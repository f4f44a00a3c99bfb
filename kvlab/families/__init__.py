"""Checkpoint families: a HF ``config.json`` <-> :class:`~kvlab.config.ModelConfig`, HF tensors -> kvlab tensors.

``FAMILIES`` maps the ``architectures`` entry of ``config.json`` to its :class:`Family`.
``config_from_dir`` / ``config_from_gguf`` read a checkpoint's config (no weights; this package imports without
torch, so the calculator prices a checkpoint or a preset without it); ``to_hf_config(cfg)`` is the way back: the
transformers ``config.json`` of a ModelConfig's shape. Weights are read by kvlab/loading.py (``kvlab.load``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..checkpoint import read_config
from ..config import WEIGHT_DTYPES, ModelConfig
from ..errors import UnknownNameError
from ..gguf_checkpoint import GGUFFile, hf_config, read_gguf
from ..names import did_you_mean, find
from . import deepseek_v3, deepseek_v4, deepseek_v32, gemma3, gemma4, laguna, llama, mistral, qwen3, qwen3_moe, zaya
from .base import Family

FAMILIES: dict[str, Family] = {f.architecture: f for f in (
    llama.FAMILY, mistral.FAMILY, qwen3.FAMILY, qwen3.QWEN2_FAMILY, qwen3_moe.FAMILY, laguna.FAMILY)}
FAMILIES.update({f.architecture: f for f in (gemma4.FAMILY, gemma4.CG_FAMILY, gemma3.FAMILY, gemma3.CG_FAMILY)})
FAMILIES[zaya.ARCH] = zaya.FAMILY
FAMILIES[deepseek_v4.ARCH] = deepseek_v4.FAMILY
FAMILIES[deepseek_v3.ARCH] = deepseek_v3.FAMILY
FAMILIES[deepseek_v32.ARCH] = deepseek_v32.FAMILY

__all__ = ["FAMILIES", "Family", "config_from_dir", "config_from_gguf", "config_from_hf", "family_of", "register",
           "to_hf_config"]


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


def _shape(c: ModelConfig) -> dict[str, Any]:
    return {k: v for k, v in c.to_dict().items() if k not in ("name", "source", "family", "dtype")}


def _same(a: ModelConfig, b: ModelConfig) -> bool:
    return _shape(a) == _shape(b)


def _first_difference(got: Any, want: Any, path: str = "") -> str:
    """Where two ``to_dict`` trees first differ: ``"layers[5].rope.theta: 10000.0, not 1000000.0"``."""
    if isinstance(got, dict) and isinstance(want, dict):
        for k in list(want) + [k for k in got if k not in want]:
            if got.get(k) != want.get(k):
                return _first_difference(got.get(k), want.get(k), f"{path}.{k}" if path else str(k))
    if isinstance(got, list) and isinstance(want, list) and len(got) == len(want):
        for i, (g, w) in enumerate(zip(got, want)):
            if g != w:
                return _first_difference(g, w, f"{path}[{i}]")
    return f"{path}: {got!r}, not {want!r}"


def _written_by(family: Family, config: ModelConfig) -> dict[str, Any]:
    assert family.to_hf_config is not None
    d = family.to_hf_config(config)
    back = family.config_from_hf(d)
    if not _same(back, config):
        raise ValueError(f"{family.architecture} cannot hold {config.name}'s shape (it reads its config.json back "
                         f"as a different model: {_first_difference(_shape(back), _shape(config))})")
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


def config_from_gguf(path: str | Path | GGUFFile) -> ModelConfig:
    """The ModelConfig of a GGUF file, from its header only."""
    g = path if isinstance(path, GGUFFile) else read_gguf(path)
    config = config_from_hf(hf_config(g))
    config.name = g.path.name.removesuffix(".gguf")
    config.source = f"{g.path} (GGUF {g.arch}, {g.meta.get('general.name', 'unnamed')})"
    return config
