"""What every training task is: the :class:`Task` base and the per-sample generator that makes sample ``i`` of a
stream the same whatever the batching (kvlab/train/data.py: the synthetic and byte tasks; text.py: real text)."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any

import torch

IGNORE = -100
SPLITS = {"train": 0, "eval": 1}


def sample_generator(seed: int, split: str, index: int) -> torch.Generator:
    """The generator of one sample: a hash of (seed, split, index), independent of batching and world size."""
    h = hashlib.blake2b(f"{seed}/{SPLITS[split]}/{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(h, "little") & (2**63 - 1))


@dataclass
class Task:
    """Base of the tasks: ``seq_len`` tokens per sample; subclasses fill :meth:`sample`."""

    seq_len: int = 128

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def sample(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """``(tokens [seq_len + 1], loss mask [seq_len + 1] over the tokens, info)``."""
        raise NotImplementedError

    def validate(self) -> None:
        if not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ValueError(f"task.seq_len={self.seq_len!r}: must be an integer >= 2")

    def token_distances(self, info: dict[str, Any], n_scored: int) -> list[int] | None:
        """Per scored token of a sample (in order), positions from the information it needs to where it is
        predicted; ``None`` for tasks without a retrieval distance."""
        return None

    def at_length(self, seq_len: int) -> Task:
        """The same task at another sequence length (fields that scale with the length scale with it)."""
        t = dataclasses.replace(self, seq_len=seq_len)
        t.validate()
        return t

    def example(self, seed: int, split: str, index: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Sample ``index`` of ``split`` as ``(input_ids [T], targets [T], info)``."""
        tokens, scored, info = self.sample(sample_generator(seed, split, index))
        targets = torch.where(scored[1:], tokens[1:], torch.full_like(tokens[1:], IGNORE))
        return tokens[:-1], targets, info

    def batch(self, seed: int, split: str, start: int, size: int
              ) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]]]:
        """Samples ``start .. start + size - 1`` stacked: ``(input_ids [B, T], targets [B, T], infos)``."""
        rows = [self.example(seed, split, start + i) for i in range(size)]
        return (torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]), [r[2] for r in rows])


__all__ = ["IGNORE", "SPLITS", "Task", "sample_generator"]
