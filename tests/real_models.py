"""Paths of the real GGUF files of the installed model packages (kvlab.models; skipped when not installed)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest


def real_model_path(name: str) -> Path:
    """The GGUF file of the named model (``smollm2-135m``, ``gemma-3-270m``), or skip the test naming the package."""
    from kvlab.models import model_file

    try:
        return model_file(name)
    except ValueError as e:
        pytest.skip(str(e))


class _PlainGGUFReader(gguf.GGUFReader):
    """gguf's reader parsing from a plain ndarray view of its ``numpy.memmap``: the same bytes and the same parse,
    without memmap's Python-level ``__getitem__``/``__array_finalize__`` on each of the ~1.5M metadata slices of
    Gemma 3's 262K-token vocabulary (23 s -> 8 s a parse on a busy 2-core machine)."""

    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> np.ndarray:
        if type(self.data) is np.memmap:  # the view still maps the file (read-only, as opened)
            self.data = self.data.view(np.ndarray)
        return super()._get(offset, dtype, count, override_order)


@contextmanager
def share_gguf_parsing() -> Iterator[None]:
    """Within the block, transformers' GGUF loading does its file-reading work once: ``gguf.GGUFReader(path)`` (called
    once for the config and once for the weights or the tokenizer) parses each file once, through
    :class:`_PlainGGUFReader`, and hands the same read-only reader to later calls; ``gguf.get_tensor_name_map(arch,
    n_blocks)`` (rebuilt for every submodule of the model, ~400 times for SmolLM2: 19 s of its 38 s load) is built once
    per architecture and depth. Both are pure functions of their arguments; transformers converts and dequantizes as
    always."""
    readers: dict[tuple[str, str], gguf.GGUFReader] = {}
    name_maps: dict[tuple[Any, int], Any] = {}
    get_tensor_name_map = gguf.get_tensor_name_map

    def reader(path: Any, mode: str = "r") -> gguf.GGUFReader:
        key = (str(Path(path).resolve()), mode)
        if mode != "r":
            return _PlainGGUFReader(path, mode)
        if key not in readers:
            readers[key] = _PlainGGUFReader(path, mode)
        return readers[key]

    def name_map(arch: Any, n_blocks: int) -> Any:
        if (arch, n_blocks) not in name_maps:
            name_maps[arch, n_blocks] = get_tensor_name_map(arch, n_blocks)
        return name_maps[arch, n_blocks]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFReader", reader)
        mp.setattr(gguf, "get_tensor_name_map", name_map)
        yield
