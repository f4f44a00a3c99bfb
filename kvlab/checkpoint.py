"""Reading Hugging Face-layout checkpoint directories: ``config.json``, safetensors weights, tokenizer.

Only safetensors is read: pickle files (``pytorch_model.bin``, ``*.pt``) can run code on load and are
refused with a clear error. Weights are opened lazily (memory-mapped by safetensors) and a tensor
is read only when asked for, so a loader can cast and place tensors one at a time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError, safe_open

from .errors import CheckpointError
from .validate import check_hf_config

if TYPE_CHECKING:
    import torch

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.json"
PICKLE_PATTERNS = ("pytorch_model*.bin", "*.bin", "*.pt", "*.pth", "*.ckpt")


def _dir(path: str | Path) -> Path:
    p = Path(path)
    if p.is_file() and (p.name in (CONFIG, INDEX, TOKENIZER) or p.suffix == ".safetensors"):
        raise CheckpointError(f"{str(p)!r} is a file of a checkpoint: pass the directory {str(p.parent)!r}")
    if not p.is_dir():
        raise ValueError(f"checkpoint directory {str(p)!r} does not exist or is not a directory")
    return p


def read_config(path: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint directory."""
    f = _dir(path) / CONFIG
    if not f.is_file():
        raise ValueError(f"{str(f)!r} not found: a checkpoint directory needs a config.json")
    try:
        cfg = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(f)!r} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{str(f)!r} must hold a JSON object, got {type(cfg).__name__}")  # noqa: TRY004
    check_hf_config(cfg, str(f))
    return cfg


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: ``model.safetensors``, or the shards the index names.

    Raises ValueError when there are none (naming any pickle files found instead), when the index is
    unreadable, or when a shard it names is missing.
    """
    d = _dir(path)
    if (d / SINGLE).is_file():
        return [d / SINGLE]
    if (d / INDEX).is_file():
        index = _read_index(d)
        files = sorted(set(index.values()))
        missing = [f for f in files if not (d / f).is_file()]
        if missing:
            raise ValueError(f"{str(d / INDEX)!r} names shard(s) that do not exist: {', '.join(missing)}")
        return [d / f for f in files]
    pickles = sorted({p.name for pat in PICKLE_PATTERNS for p in d.glob(pat)})
    if pickles:
        raise ValueError(f"{str(d)!r} holds only pickle weights ({', '.join(pickles)}); kvlab reads safetensors "
                         "only (pickle can execute code on load). Convert with transformers: "
                         "model.save_pretrained(dir, safe_serialization=True)")
    raise ValueError(f"no weights in {str(d)!r}: expected {SINGLE} or {INDEX} with its shards")


def _read_index(d: Path) -> dict[str, str]:
    f = d / INDEX
    try:
        weight_map = json.loads(f.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{str(f)!r} is not a valid safetensors index (needs a 'weight_map' object): {e}") from e
    if not isinstance(weight_map, dict):
        raise ValueError(f"{str(f)!r}: 'weight_map' must map tensor names to shard files")  # noqa: TRY004
    for shard in set(weight_map.values()):
        inside_dir(d, shard, f"{str(f)!r} names shard")
    return weight_map


def inside_dir(d: Path, name: Any, what: str) -> Path:
    """``d / name`` when ``name`` is a relative path that stays inside ``d`` (checked on the path's text, so files
    that are symlinks into a cache, as the Hugging Face hub cache lays them out, stay allowed); CheckpointError
    naming ``what`` and the name otherwise."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise CheckpointError(f"{what} {name!r}: not a file name")
    p = Path(name)
    if p.is_absolute() or os.path.normpath(name).split(os.sep)[0] == os.pardir:
        raise CheckpointError(f"{what} {name!r}, which resolves outside the checkpoint directory {str(d)!r}; "
                              "shard names must be files inside it")
    return d / p


def _open(f: Path) -> Any:
    try:
        return safe_open(str(f), framework="pt")
    except SafetensorError as e:
        raise ValueError(f"cannot read safetensors file {str(f)!r} (truncated or corrupt?): {e}") from e


class LazyTensors(Mapping[str, "torch.Tensor"]):
    """A read-only name -> tensor mapping over a checkpoint's safetensors files.

    Tensors are read on access (optionally cast to ``dtype``; those whose name ``keep_fp32(name)`` accepts are
    read as fp32 instead, as transformers keeps some tensors of some families); nothing is cached, so each tensor
    lives only as long as its caller keeps it. ``shape(name)`` reads only the header.
    """

    def __init__(self, path: str | Path, dtype: torch.dtype | None = None,
                 keep_fp32: Callable[[str], bool] | None = None) -> None:
        self.path = _dir(path)
        self.dtype = dtype
        self.keep_fp32 = keep_fp32
        self._handles: dict[Path, Any] = {}
        self._where: dict[str, Path] = {}
        for f in weight_files(self.path):
            h = self._handles[f] = _open(f)
            names = h.keys()  # a safe_open handle is not iterable
            for name in names:
                if name in self._where:
                    raise ValueError(f"tensor {name!r} appears in both {self._where[name].name!r} and {f.name!r}")
                self._where[name] = f
        if (self.path / INDEX).is_file() and not (self.path / SINGLE).is_file():
            index = _read_index(self.path)
            absent = [f"{n} (index says {s})" for n, s in index.items() if self._where.get(n, None) != self.path / s]
            if absent:
                raise ValueError(f"tensor(s) named in {INDEX} not found in their shard: {', '.join(sorted(absent))}")

    def __getitem__(self, name: str) -> torch.Tensor:
        f = self._where[name]
        try:
            t = self._handles[f].get_tensor(name)
        except SafetensorError as e:
            raise ValueError(f"cannot read tensor {name!r} from {str(f)!r} (truncated or corrupt?): {e}") from e
        if self.dtype is None or not t.is_floating_point():
            return t
        return t.float() if self.keep_fp32 is not None and self.keep_fp32(name) else t.to(self.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape of ``name`` without reading its data."""
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())


def read_tensors(path: str | Path, dtype: torch.dtype | None = None,
                 keep_fp32: Callable[[str], bool] | None = None) -> LazyTensors:
    """All tensors of a checkpoint as a lazy mapping (read on access, optionally cast to ``dtype`` except the
    names ``keep_fp32`` accepts, read as fp32)."""
    return LazyTensors(path, dtype, keep_fp32)


def tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every stored tensor, from the file headers only."""
    lazy = LazyTensors(path)
    return {n: lazy.shape(n) for n in lazy}


def load_tokenizer(path: str | Path) -> Any | None:
    """The ``tokenizers.Tokenizer`` from ``tokenizer.json``, or None when the directory has none."""
    f = _dir(path) / TOKENIZER
    if not f.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(f))
    except Exception as e:  # tokenizers raises a bare Exception subclass
        raise ValueError(f"cannot read tokenizer {str(f)!r}: {e}") from e
