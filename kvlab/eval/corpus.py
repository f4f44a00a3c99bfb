"""Texts to measure on: a user's file, or the default corpus that every machine with Python already has.

The default corpus is the documentation strings of a fixed list of Python standard-library modules, in that
order, each in source order (module, classes, functions), separated by blank lines. It needs no download; it
depends on the Python version, so its provenance names the version and the text's SHA-256, and every figure
measured on it can be reproduced from that line.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import platform
from dataclasses import dataclass
from pathlib import Path

# prose-heavy modules (few doctest listings), pure Python on every CPython
DEFAULT_MODULES = ("argparse", "textwrap", "difflib", "statistics", "threading", "typing", "inspect", "logging",
                   "subprocess", "shutil", "configparser", "ipaddress", "email.message", "http.client",
                   "urllib.request", "collections", "functools", "enum", "tarfile", "smtplib", "_pydecimal")
DEFAULT = "stdlib-docstrings"


class CorpusError(ValueError):
    """A text file that cannot be read as UTF-8 text, or an empty one."""


@dataclass(frozen=True)
class Corpus:
    """A text and where it came from (``provenance``: enough to rebuild exactly this text)."""

    name: str
    text: str
    provenance: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def describe(self, n_tokens: int | None = None) -> str:
        """One line: name, provenance, characters, tokens (when counted) and the text's SHA-256 prefix."""
        toks = f", {n_tokens:,} tokens" if n_tokens is not None else ""
        return f"{self.name}: {self.provenance}; {len(self.text):,} characters{toks}; sha256 {self.sha256[:16]}"


def _docstrings(module: str) -> list[str]:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        raise CorpusError(f"default corpus: standard-library module {module!r} has no Python source here")
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    nodes = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)]
    nodes.sort(key=lambda n: n.lineno)
    docs = [ast.get_docstring(n) for n in (tree, *nodes)]
    return [d for d in docs if d]


@functools.cache
def default_corpus() -> Corpus:
    """The docstrings of :data:`DEFAULT_MODULES` of the running Python's standard library, concatenated (parsed once
    per process: the same frozen Corpus after the first call)."""
    text = "\n\n".join(d for m in DEFAULT_MODULES for d in _docstrings(m))
    prov = (f"docstrings of {len(DEFAULT_MODULES)} modules of the Python {platform.python_version()} standard library "
            f"({', '.join(DEFAULT_MODULES)}) in source order")
    return Corpus(DEFAULT, text, prov)


def load_corpus(path: str | Path | None = None) -> Corpus:
    """The text of ``path`` (UTF-8), or the default corpus when ``path`` is None or ``'stdlib-docstrings'``."""
    if path is None or str(path) == DEFAULT:
        return default_corpus()
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CorpusError(f"cannot read text file {str(p)!r}: {e}") from e
    if not text.strip():
        raise CorpusError(f"text file {str(p)!r} is empty")
    return Corpus(p.name, text, f"file {p.resolve()!s}")
