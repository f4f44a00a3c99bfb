"""Needle in a haystack on real prose: can the model retrieve a fact from anywhere in a long context?

For each context length and depth, a haystack of real text (the corpus, from its start) gets one sentence --
``The secret number of {name} is {number}.`` -- inserted at that fraction of its length (moved to the nearest
line break so no sentence is cut), and the context ends with the question as a completion:
``... The secret number of {name} is``. The model continues greedily through its cache (kvlab.generate); a
trial is correct when the continuation starts with the number (exact match). Each trial draws its own name and
7-digit number from ``seed``; accuracy per (length, depth) is the fraction of ``trials`` correct. (After Kamradt's
"needle in a haystack" test and RULER's single-needle task, Hsieh et al. 2024.)
"""

from __future__ import annotations

import random
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..engine import generate
from ..model import Model
from ..tokenizer import Tokenizer
from .perplexity import EvalError

NAMES = ("the lighthouse keeper", "the night librarian", "the orchard", "the blue ferry", "the old observatory",
         "the glass bridge", "the clockmaker", "the river mill")
NEEDLE = "The secret number of {name} is {number}."
QUESTION = "\n\nWhat is the secret number of {name}? The secret number of {name} is"


@dataclass
class NeedleResult:
    """Exact-match accuracy per (length, depth): ``accuracy[i][j]`` for ``lengths[i]`` and ``depths[j]``."""

    lengths: list[int]
    depths: list[float]
    trials: int
    seed: int
    accuracy: list[list[float]]
    answers: list[dict] = field(default_factory=list)  # every trial: length, depth, expected, generated, correct

    @property
    def overall(self) -> float:
        cells = [a for row in self.accuracy for a in row]
        return sum(cells) / len(cells)

    def as_dict(self) -> dict:
        return {**asdict(self), "overall": self.overall}


def build_prompt(tok: Tokenizer, hay: Sequence[int], length: int, depth: float, name: str,
                 number: str) -> list[int]:
    """``length`` token ids: BOS (if the tokenizer adds one), haystack with the needle at ``depth``, question."""
    prefix = tok.encode("", special=True)
    needle = tok.encode(NEEDLE.format(name=name, number=number) + "\n", special=False)
    question = tok.encode(QUESTION.format(name=name), special=False)
    room = length - len(prefix) - len(needle) - len(question)
    if room < 16:
        raise EvalError(f"needle length {length} leaves {room} tokens of haystack: use a longer length")
    if room > len(hay):
        raise EvalError(f"needle length {length} needs {room:,} haystack tokens, the text has {len(hay):,}: "
                        "give a longer text")
    body = list(hay[:room])
    at = round(depth * room)
    breaks = [i for i in range(max(0, at - 64), min(room, at + 64) + 1)
              if i == 0 or tok.decode(body[i - 1:i]).endswith("\n")]
    if breaks:
        at = min(breaks, key=lambda i: abs(i - at))
    return prefix + body[:at] + needle + body[at:] + question


def needle_test(model: Model, tok: Tokenizer, text: str, lengths: Sequence[int], depths: Sequence[float],
                trials: int = 1, seed: int = 0, progress: bool = False, max_new_tokens: int = 12) -> NeedleResult:
    """Exact-match retrieval accuracy of a needle at each (length, depth); see the module docstring."""
    from tqdm import tqdm


    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise EvalError(f"needle depth {d} must lie in [0, 1]")
    if trials < 1:
        raise EvalError(f"trials={trials} must be >= 1")
    top = max(lengths) + max_new_tokens
    if top > model.config.max_positions:
        raise EvalError(f"needle length {max(lengths)} + {max_new_tokens} new tokens exceeds the model's "
                        f"max_positions={model.config.max_positions}")
    hay = tok.encode(text, special=False)
    rng = random.Random(seed)
    dev = model.embed.weight.device
    acc: list[list[float]] = []
    answers: list[dict] = []
    bar = tqdm(total=len(lengths) * len(depths) * trials, desc="needle", unit="trial", file=sys.stderr,
               disable=not progress, leave=False)
    for length in lengths:
        row = []
        for depth in depths:
            good = 0
            for _ in range(trials):
                name, number = rng.choice(NAMES), str(rng.randrange(1_000_000, 10_000_000))
                ids = build_prompt(tok, hay, length, depth, name, number)
                out = generate(model, torch.tensor([ids], device=dev), max_new_tokens=max_new_tokens)
                said = tok.decode(out[0, len(ids):].tolist(), skip_special=True)
                ok = said.strip().startswith(number)
                good += ok
                answers.append({"length": length, "depth": depth, "expected": number, "generated": said,
                                "correct": ok})
                bar.update(1)
            row.append(good / trials)
        acc.append(row)
    bar.close()
    return NeedleResult(list(lengths), list(depths), trials, seed, acc, answers)


def plot_needle(result: NeedleResult, path: str | Path, title: str) -> Path:
    """Heat map of accuracy: context length (rows) x needle depth (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(1.2 * len(result.depths) + 2.5, 0.6 * len(result.lengths) + 1.8))
    im = ax.imshow(result.accuracy, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(result.depths)), [f"{d:.0%}" for d in result.depths])
    ax.set_yticks(range(len(result.lengths)), [f"{n:,}" for n in result.lengths])
    ax.set_xlabel("needle depth (fraction of the context)")
    ax.set_ylabel("context length (tokens)")
    for i, row in enumerate(result.accuracy):
        for j, a in enumerate(row):
            ax.text(j, i, f"{a:.0%}", ha="center", va="center", fontsize=9)
    ax.set_title(f"{title}\n{result.trials} trial(s) per cell, seed {result.seed}", fontsize=9)
    fig.colorbar(im, ax=ax, label="exact-match accuracy")
    fig.tight_layout()
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return p
