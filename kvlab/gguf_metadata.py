"""A GGUF file's key/value metadata (tokenizer arrays included), read without its tensors.

The header is parsed once, by kvlab/gguf_checkpoint.py (``read_gguf``), for the model and the tokenizer alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .gguf_checkpoint import GGUFFileError, read_gguf

GGUFMetadataError = GGUFFileError  # a file that is not a readable GGUF header


def read_metadata(path: str | Path) -> dict[str, Any]:
    """All metadata of a GGUF file: key -> int / float / bool / str / list."""
    return read_gguf(path, arrays=True).meta
