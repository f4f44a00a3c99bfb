"""Training data that needs no download: synthetic long-context tasks and byte-level text.

Every task is a pure function of ``(seed, split, sample index)``: sample ``i`` of the training stream
is the same whatever the batch size, the number of processes or whether the run was resumed, so
the data position of a run is just the number of samples it has consumed.

A batch is ``(input_ids [B, T], targets [B, T])``; ``targets[b, t]`` is the token that should be
predicted at position ``t`` (the next token) or ``IGNORE`` where no loss is taken.

Tasks (``kind``):

- ``recall`` — multi-query associative recall (Zoology MQAR, arXiv 2312.04927): ``num_pairs`` key-value
  pairs, then ``gap`` filler tokens (a number, or a ``[lo, hi]`` range sampled per example), then queries
  ``k`` whose answers ``v`` are scored. The distance of a query (positions from its pair to the query) is
  reported per sample, so accuracy can be binned by it.
- ``passkey`` — needle retrieval: filler text of ``length`` tokens with a ``digits``-long key inserted at
  ``depth`` (a fraction, or a range sampled per example), then a query marker; the key is scored.
- ``copy`` — ``span`` random tokens, a separator, then the same tokens again (the copy is scored).
- ``bytes`` — byte-level language modelling (vocab 256) on local text files; the default corpus is the
  Python standard library's source tree (``sysconfig.get_paths()["stdlib"]``), present on every machine.
  The last ``eval_fraction`` of the concatenated bytes is held out for evaluation.
- ``text`` — language modelling on real text cut by a model's own tokenizer (kvlab/train/text.py); the default
  text is standard-library docstrings disjoint from ``kvlab eval``'s default corpus.
"""

from __future__ import annotations

import dataclasses
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .task import IGNORE, Task, sample_generator
from .text import Text


def _randint(gen: torch.Generator, lo: int, hi: int, n: int = 1) -> torch.Tensor:
    return torch.randint(lo, hi, (n,), generator=gen)


@dataclass
class _Symbolic(Task):
    """Synthetic tasks over ``vocab`` content tokens followed by a few special tokens."""

    vocab: int = 64
    SPECIALS = ("SEP", "QUERY", "KEY", "END")

    @property
    def vocab_size(self) -> int:
        return self.vocab + len(self.SPECIALS)

    def special(self, name: str) -> int:
        return self.vocab + self.SPECIALS.index(name)

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.vocab, int) or self.vocab < 4:
            raise ValueError(f"task.vocab={self.vocab!r}: must be an integer >= 4")


@dataclass
class Recall(_Symbolic):
    """Multi-query associative recall: pairs ``k v``, ``gap`` fillers, SEP, then ``q a`` queries.

    Keys come from the first half of the content tokens and values from the second half, so the
    model cannot confuse them. Queries ask ``num_queries`` distinct keys in random order; only the
    answer tokens are scored. ``info['distances']`` gives, per query, positions from its pair's value
    to the query token.
    """

    num_pairs: int = 8
    num_queries: int = 4
    gap: int | list[int] = 0

    def _gaps(self) -> tuple[int, int]:
        return (self.gap[0], self.gap[1]) if isinstance(self.gap, list) else (self.gap, self.gap)

    def _length(self, gap: int | None = None) -> int:
        return 2 * self.num_pairs + (self._gaps()[1] if gap is None else gap) + 1 + 2 * self.num_queries

    def token_distances(self, info, n_scored):
        return list(info["distances"])

    def at_length(self, seq_len):
        """Longer (or shorter) filler; a ``gap`` range's upper end moves with the length, so the pairs can sit
        anywhere in the longer context (like passkey's depth)."""
        if isinstance(self.gap, list):
            lo, hi = self._gaps()
            hi = max(lo, hi + seq_len - self.seq_len)
            t = dataclasses.replace(self, seq_len=seq_len, gap=[lo, hi])
            t.validate()
            return t
        return super().at_length(seq_len)

    def validate(self) -> None:
        super().validate()
        for name in ("num_pairs", "num_queries"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"task.{name}={v!r}: must be a positive integer")
        g = self.gap
        if not ((isinstance(g, int) and not isinstance(g, bool) and g >= 0)
                or (isinstance(g, list) and len(g) == 2 and all(isinstance(x, int) and x >= 0 for x in g)
                    and g[0] <= g[1])):
            raise ValueError(f"task.gap={g!r}: an integer >= 0 or a range [lo, hi] of them")
        if self.num_queries > self.num_pairs:
            raise ValueError(f"task.num_queries={self.num_queries}: at most num_pairs={self.num_pairs}")
        if self.num_pairs > self.vocab // 2:
            raise ValueError(f"task.num_pairs={self.num_pairs}: distinct keys need vocab >= 2 * num_pairs "
                             f"(vocab={self.vocab})")
        if self._length() > self.seq_len + 1:
            raise ValueError(f"task.seq_len={self.seq_len}: recall needs {self._length() - 1} positions "
                             f"(2*num_pairs + gap + 1 + 2*num_queries - 1, with the largest gap)")

    def sample(self, gen):
        half = self.vocab // 2
        keys = torch.randperm(half, generator=gen)[: self.num_pairs]
        values = _randint(gen, half, self.vocab, self.num_pairs)
        lo, hi = self._gaps()
        gap = lo if lo == hi else int(_randint(gen, lo, hi + 1))
        tokens = torch.empty(self.seq_len + 1, dtype=torch.long)
        scored = torch.zeros(self.seq_len + 1, dtype=torch.bool)
        pad = self.seq_len + 1 - self._length(gap)  # filler before the pairs keeps every sample the same length
        tokens[: pad] = _randint(gen, 0, self.vocab, pad)
        p = pad
        tokens[p: p + 2 * self.num_pairs: 2] = keys
        tokens[p + 1: p + 2 * self.num_pairs: 2] = values
        p += 2 * self.num_pairs
        tokens[p: p + gap] = _randint(gen, 0, self.vocab, gap)
        p += gap
        tokens[p] = self.special("SEP")
        p += 1
        order = torch.randperm(self.num_pairs, generator=gen)[: self.num_queries]
        distances = []
        for j in order.tolist():
            tokens[p], tokens[p + 1] = keys[j], values[j]
            scored[p + 1] = True
            distances.append(p - (pad + 2 * j + 1))
            p += 2
        return tokens, scored, {"distances": distances}


@dataclass
class Passkey(_Symbolic):
    """Needle retrieval: filler, ``KEY d1..dn END`` at ``depth``, more filler, ``QUERY d1..dn``.

    ``depth`` is a fraction in [0, 1] of the filler placed before the key, or a ``[lo, hi]`` range
    sampled per example. Digits are content tokens ``0..9``; filler is drawn from tokens ``10..vocab-1``,
    so the key is the only run of digits. ``info['depth']`` and ``info['distance']`` are reported.
    """

    digits: int = 5
    depth: float | list[float] = field(default_factory=lambda: [0.0, 1.0])

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.digits, int) or self.digits < 1:
            raise ValueError(f"task.digits={self.digits!r}: must be a positive integer")
        if self.vocab < 12:
            raise ValueError(f"task.vocab={self.vocab}: passkey needs vocab >= 12 (10 digits + filler)")
        d = self.depth if isinstance(self.depth, list) else [self.depth, self.depth]
        if len(d) != 2 or not all(isinstance(x, (int, float)) and 0 <= x <= 1 for x in d) or d[0] > d[1]:
            raise ValueError(f"task.depth={self.depth!r}: a fraction in [0, 1] or a range [lo, hi]")
        if self.seq_len + 1 < 2 * self.digits + 3:
            raise ValueError(f"task.seq_len={self.seq_len}: passkey needs at least {2 * self.digits + 2} positions")

    def sample(self, gen):
        n = self.digits
        filler_len = self.seq_len + 1 - (2 * n + 3)
        lo, hi = self.depth if isinstance(self.depth, list) else (self.depth, self.depth)
        depth = lo + (hi - lo) * float(torch.rand((), generator=gen))
        at = round(depth * filler_len)
        key = _randint(gen, 0, 10, n)
        filler = _randint(gen, 10, self.vocab, filler_len)
        mark = torch.tensor([self.special("KEY")])
        end = torch.tensor([self.special("END")])
        query = torch.tensor([self.special("QUERY")])
        tokens = torch.cat([filler[:at], mark, key, end, filler[at:], query, key])
        scored = torch.zeros(self.seq_len + 1, dtype=torch.bool)
        scored[-n:] = True
        return tokens, scored, {"depth": depth, "distance": self.seq_len - n - at - 1}

    def token_distances(self, info, n_scored):
        return [info["distance"]] * n_scored


@dataclass
class Copy(_Symbolic):
    """Copying: filler, ``span`` random tokens, SEP, the same tokens again (scored)."""

    span: int = 16

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.span, int) or self.span < 1:
            raise ValueError(f"task.span={self.span!r}: must be a positive integer")
        if 2 * self.span + 1 > self.seq_len + 1:
            raise ValueError(f"task.seq_len={self.seq_len}: copy needs 2*span={2 * self.span} positions")

    def sample(self, gen):
        pad = self.seq_len + 1 - (2 * self.span + 1)
        x = _randint(gen, 0, self.vocab, self.span)
        tokens = torch.cat([_randint(gen, 0, self.vocab, pad), x, torch.tensor([self.special("SEP")]), x])
        scored = torch.zeros(self.seq_len + 1, dtype=torch.bool)
        scored[-self.span:] = True
        return tokens, scored, {}

    def token_distances(self, info, n_scored):
        return [self.span] * n_scored


_CORPUS: dict[tuple, torch.Tensor] = {}


def default_text_root() -> str:
    """The Python standard library's source tree."""
    return sysconfig.get_paths()["stdlib"]


def read_corpus(paths: list[str], pattern: str, max_bytes: int) -> torch.Tensor:
    """Bytes of the files matching ``pattern`` under ``paths`` (sorted, deterministic), at most ``max_bytes``."""
    key = (tuple(paths), pattern, max_bytes)
    if key in _CORPUS:
        return _CORPUS[key]
    files: list[Path] = []
    for root in paths:
        r = Path(root)
        if r.is_file():
            files.append(r)
        elif r.is_dir():
            files.extend(sorted(f for f in r.rglob(pattern) if f.is_file() and "site-packages" not in f.parts))
        else:
            raise ValueError(f"task.paths: {root!r} does not exist")
    buf = bytearray()
    for f in files:
        try:
            buf += f.read_bytes()
        except OSError:
            continue
        if len(buf) >= max_bytes:
            break
    if len(buf) < 1024:
        raise ValueError(f"task.paths {paths!r} (pattern {pattern!r}) hold only {len(buf)} bytes of text")
    data = torch.frombuffer(bytearray(buf[:max_bytes]), dtype=torch.uint8).to(torch.long)
    _CORPUS[key] = data
    return data


@dataclass
class Bytes(Task):
    """Byte-level LM on local text; ``paths`` default to the standard library's source tree."""

    paths: list[str] | None = None
    pattern: str = "*.py"
    max_bytes: int = 16 * 1024 * 1024
    eval_fraction: float = 0.05

    @property
    def vocab_size(self) -> int:
        return 256

    def validate(self) -> None:
        super().validate()
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"task.eval_fraction={self.eval_fraction!r}: must be in (0, 1)")
        if not isinstance(self.max_bytes, int) or self.max_bytes < 1024:
            raise ValueError(f"task.max_bytes={self.max_bytes!r}: must be an integer >= 1024")

    def corpus(self) -> torch.Tensor:
        return read_corpus(self.paths or [default_text_root()], self.pattern, self.max_bytes)

    def example(self, seed, split, index):
        data = self.corpus()
        cut = int(len(data) * (1 - self.eval_fraction))
        lo, hi = (0, cut) if split == "train" else (cut, len(data))
        room = hi - lo - (self.seq_len + 1)
        if room < 1:
            raise ValueError(f"task.seq_len={self.seq_len}: the {split} text has only {hi - lo} bytes")
        gen = sample_generator(seed, split, index)
        at = lo + int(torch.randint(0, room, (), generator=gen))
        chunk = data[at: at + self.seq_len + 1]
        return chunk[:-1], chunk[1:].clone(), {}


TASKS: dict[str, type[Task]] = {"recall": Recall, "passkey": Passkey, "copy": Copy, "bytes": Bytes, "text": Text}


def make_task(spec: dict[str, Any]) -> Task:
    """A task from ``{"kind": ..., **fields}``; unknown kinds or fields raise ValueError naming them."""
    if not isinstance(spec, dict):
        raise ValueError(f"task must be a table/object with a 'kind', got {type(spec).__name__}")  # noqa: TRY004
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind is None:
        raise ValueError(f"task: missing field 'kind' (one of {', '.join(TASKS)})")
    if kind not in TASKS:
        raise ValueError(f"task.kind={kind!r}: unknown task; allowed: {', '.join(TASKS)}")
    cls = TASKS[kind]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ValueError(f"task ({kind}): unknown field(s) {unknown}; allowed: {sorted(known)}")
    task = cls(**spec)
    task.validate()
    return task


__all__ = ["IGNORE", "TASKS", "Bytes", "Copy", "Passkey", "Recall", "Task", "Text", "default_text_root", "make_task",
           "sample_generator"]
