"""Real text for training, cut by a model's own tokenizer (task ``kind = "text"``).

The default text is held out from what ``kvlab eval`` measures: ``kvlab eval``'s default corpus is the docstrings of
:data:`kvlab.eval.corpus.DEFAULT_MODULES`; training reads the docstrings of :data:`TRAIN_MODULES`, a disjoint list of
other pure-Python standard-library modules (about 400k characters, ~100k SmolLM2 tokens on Python 3.11), so a model
trained here is evaluated on text it never saw. Within the training text the last ``eval_fraction`` of the tokens
is the trainer's own ``eval`` split.

A sample is ``seq_len`` positions: the tokenizer's BOS (when it adds one, as ``kvlab eval`` opens every window) then
text tokens from an offset drawn from ``(seed, split, index)`` only (kvlab/train/data.py); every target is scored.
The text is tokenized once per (tokenizer, files) and kept in memory.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from typing import Any

import torch

from kvlab.eval.corpus import Corpus, _docstrings, load_corpus
from kvlab.tokenizer import TokenizerError, load_tokenizer

from .task import Task, sample_generator

# prose-carrying pure-Python modules, none of them in kvlab eval's DEFAULT_MODULES (a test checks the two are disjoint)
TRAIN_MODULES = (
    "zipfile", "csv", "pickle", "socket", "ssl", "unittest.case", "unittest.mock", "doctest", "pdb", "optparse",
    "calendar", "fractions", "heapq", "string", "gettext", "locale", "mailbox", "imaplib", "ftplib", "poplib", "sched",
    "queue", "contextlib", "dataclasses", "copy", "pprint", "tempfile", "glob", "shlex", "plistlib", "tokenize",
    "traceback", "warnings", "weakref", "selectors", "asyncio.events", "asyncio.tasks", "asyncio.base_events",
    "concurrent.futures._base", "multiprocessing.pool", "json.decoder", "json.encoder", "xml.dom.minidom",
    "email.utils", "http.server", "urllib.parse", "random", "uuid", "hashlib", "hmac", "base64", "secrets", "numbers",
    "bisect", "timeit", "trace", "pstats", "dis", "ast", "pydoc", "platform", "sysconfig", "pkgutil", "zipapp",
    "filecmp", "fileinput", "gzip", "bz2", "lzma", "wave", "colorsys")
TRAIN_TEXT = "stdlib-train-docstrings"


@functools.cache
def training_corpus() -> Corpus:
    """The docstrings of :data:`TRAIN_MODULES` (those this Python has as source), concatenated in order (parsed once
    per process)."""
    parts, used = [], []
    for m in TRAIN_MODULES:
        try:
            docs = _docstrings(m)
        except (ValueError, OSError, SyntaxError):  # a module a later Python dropped or freezes
            continue
        used.append(m)
        parts.extend(docs)
    prov = (f"docstrings of {len(used)} modules of the Python {platform.python_version()} standard library "
            f"({', '.join(used)}) in source order; disjoint from kvlab eval's default corpus")
    return Corpus(TRAIN_TEXT, "\n\n".join(parts), prov)


_TOKENS: dict[tuple, tuple[torch.Tensor, list[int], str]] = {}


def _tokenizer(spec: str):
    try:
        tok = load_tokenizer(spec)
    except ValueError as e:
        raise TokenizerError(f"task.tokenizer={spec!r}: {e}") from e
    if tok is None:
        raise TokenizerError(f"task.tokenizer={spec!r}: the directory has no tokenizer.json; name the model whose "
                         "tokenizer to use (a checkpoint directory with tokenizer.json, a .gguf file or a named model "
                         "such as smollm2-135m)")
    return tok


def text_tokens(tokenizer: str, files: list[str] | None) -> tuple[torch.Tensor, list[int], str]:
    """``(token ids [N] int64, BOS prefix ids, provenance)`` of the text, tokenized once and cached."""
    key = (tokenizer, tuple(files) if files else None)
    if key not in _TOKENS:
        tok = _tokenizer(tokenizer)
        corpora = [load_corpus(f) for f in files] if files else [training_corpus()]
        text = "\n\n".join(c.text for c in corpora)
        ids = torch.tensor(tok.encode(text, special=False), dtype=torch.long)
        prefix = tok.encode("", special=True)
        _TOKENS[key] = (ids, prefix, "; ".join(c.provenance for c in corpora))
    return _TOKENS[key]


@dataclass
class Text(Task):
    """Language modelling on real text with a model's tokenizer (see the module docstring).

    ``tokenizer``: a model kvlab can read a tokenizer from (a checkpoint directory with tokenizer.json, a ``.gguf``,
    a named model); ``files``: UTF-8 text files (default: :func:`training_corpus`).
    """

    tokenizer: str | None = None
    files: list[str] | None = None
    eval_fraction: float = 0.05

    @property
    def vocab_size(self) -> int:
        return _tokenizer(self.tokenizer).vocab_size

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            raise TokenizerError(f"task.tokenizer={self.tokenizer!r}: name the model whose tokenizer cuts the text (a "
                             "checkpoint directory, .gguf or named model; in a distillation it defaults to the "
                             "teacher's)")
        if self.files is not None and (not isinstance(self.files, list) or not self.files
                                       or not all(isinstance(f, str) for f in self.files)):
            raise ValueError(f"task.files={self.files!r}: a non-empty list of text file paths")
        if not isinstance(self.eval_fraction, (int, float)) or not 0 < self.eval_fraction < 1:
            raise ValueError(f"task.eval_fraction={self.eval_fraction!r}: must be in (0, 1)")
        ids, prefix, _ = text_tokens(self.tokenizer, self.files)
        span = self.seq_len + 1 - len(prefix)
        cut = int(len(ids) * (1 - self.eval_fraction))
        if min(cut, len(ids) - cut) < span:
            raise ValueError(f"task.seq_len={self.seq_len}: the text has {len(ids):,} tokens, too few for windows of "
                             f"{span} text tokens in both the train and the eval split (eval_fraction "
                             f"{self.eval_fraction}); add task.files or lower seq_len")

    def provenance(self) -> str:
        return text_tokens(self.tokenizer, self.files)[2]

    def example(self, seed: int, split: str, index: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        ids, prefix, _ = text_tokens(self.tokenizer, self.files)
        cut = int(len(ids) * (1 - self.eval_fraction))
        lo, hi = (0, cut) if split == "train" else (cut, len(ids))
        span = self.seq_len + 1 - len(prefix)
        at = lo + int(torch.randint(0, hi - lo - span + 1, (), generator=sample_generator(seed, split, index)))
        chunk = torch.cat([torch.tensor(prefix, dtype=torch.long), ids[at: at + span]])
        return chunk[:-1], chunk[1:].clone(), {}


__all__ = ["TRAIN_MODULES", "Text", "text_tokens", "training_corpus"]
