"""A GGUF file's key/value metadata, read without its tensors.

``gguf.GGUFReader`` builds a numpy view per array element, which takes ~18 s for Gemma 3's 262,144-token
vocabulary on a busy 2-core machine; this reads the same header (GGUF v2/v3, little-endian: magic, version,
tensor count, key/value count, then ``key, type, value`` records; ggml-org/ggml docs/gguf.md) in well under a second.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class GGUFMetadataError(ValueError):
    """A file that is not a readable GGUF header."""


def _read(f: BinaryIO, n: int, path: str) -> bytes:
    b = f.read(n)
    if len(b) != n:
        raise GGUFMetadataError(f"{path!r}: GGUF header ends early (truncated file?)")
    return b


def _value(f: BinaryIO, kind: int, path: str, key: str) -> Any:
    if kind in _SCALARS:
        fmt = _SCALARS[kind]
        return struct.unpack(fmt, _read(f, struct.calcsize(fmt), path))[0]
    if kind == _STRING:
        (n,) = struct.unpack("<Q", _read(f, 8, path))
        return _read(f, n, path).decode("utf-8", errors="replace")
    if kind == _ARRAY:
        sub, count = struct.unpack("<IQ", _read(f, 12, path))
        if sub in _SCALARS:
            fmt = _SCALARS[sub]
            size = struct.calcsize(fmt)
            return list(struct.unpack(f"<{count}{fmt[1]}", _read(f, size * count, path)))
        return [_value(f, sub, path, key) for _ in range(count)]
    raise GGUFMetadataError(f"{path!r}: metadata key {key!r} has unknown value type {kind}")


def read_metadata(path: str | Path) -> dict[str, Any]:
    """All metadata of a GGUF file: key -> int / float / bool / str / list."""
    p = str(path)
    try:
        with open(p, "rb") as f:
            magic = _read(f, 4, p)
            if magic != b"GGUF":
                raise GGUFMetadataError(f"{p!r} is not a GGUF file (magic {magic!r}, expected b'GGUF')")
            version, _tensors, count = struct.unpack("<IQQ", _read(f, 20, p))
            if version not in (2, 3):
                raise GGUFMetadataError(f"{p!r}: GGUF version {version} is not supported (2 or 3)")
            out: dict[str, Any] = {}
            for _ in range(count):
                (n,) = struct.unpack("<Q", _read(f, 8, p))
                key = _read(f, n, p).decode("utf-8", errors="replace")
                (kind,) = struct.unpack("<I", _read(f, 4, p))
                out[key] = _value(f, kind, p, key)
            return out
    except OSError as e:
        raise GGUFMetadataError(f"cannot read GGUF file {p!r}: {e}") from e
