"""Retrieval probes of a trained model: accuracy by distance and by length beyond the training length.

A probe evaluates a model on held-out samples (the ``eval`` split, a fixed probe seed so every model sees
the same samples) of its task and scores the answer tokens, the same next-token accuracy as training's
evaluation:

- **by distance**, at the training length: every scored token carries the distance (in positions) from
  the information it needs to where it is predicted (``Task.token_distances``: a recall query's pair, the
  passkey, the copied span); the tokens are binned by ``distance_bins`` (edges, ``[e0, e1)``, ...);
- **by length**: the same task at each of ``lengths`` (``Task.at_length``: a passkey's depth range and a
  recall gap range stretch with the length, so the answer can sit anywhere in the longer context);
  lengths above the training ``seq_len`` are positions and distances the model never trained on, so the
  model's ``max_positions`` must cover the longest.

``probe(model, task, ...)`` returns plain numbers (JSON-ready)::

    {"by_distance": {"0-15": {"accuracy": 0.97, "tokens": 512}, ...},
     "by_length": {"64": {"accuracy": 0.93, "loss": 0.21, "tokens": 1024}, "128": {...}},
     "by_length_distance": {"128": {"0-15": {...}, ...}}}
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
import torch.nn.functional as F

from .data import IGNORE, Task

PROBE_SEED = 1234567
PROBE_FIELDS = ("lengths", "distance_bins", "samples", "batch_size")


def bin_label(lo: int, hi: int | None) -> str:
    return f"{lo}+" if hi is None else f"{lo}-{hi - 1}"


def bin_labels(edges: list[int]) -> list[str]:
    """Labels of the bins ``[e0, e1), [e1, e2), ..., [e_last, inf)``: ``"0-15"``, ..., ``"64+"``."""
    return [bin_label(lo, edges[i + 1] if i + 1 < len(edges) else None) for i, lo in enumerate(edges)]


def default_bins(seq_len: int, n: int = 4) -> list[int]:
    """``n`` equal bins over the distances possible at the training length."""
    step = max(1, math.ceil(seq_len / n))
    return [i * step for i in range(n)]


def _which(d: int, edges: list[int]) -> int | None:
    k = None
    for i, e in enumerate(edges):
        if d >= e:
            k = i
    return k


def parse_probe(spec: Any, task: Task, where: str = "probe") -> dict[str, Any]:
    """Validate a probe table ``{lengths, distance_bins, samples, batch_size}``; defaults from the task."""
    spec = {} if spec is None else spec
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: a table of {list(PROBE_FIELDS)}")  # noqa: TRY004
    bad = sorted(set(spec) - set(PROBE_FIELDS))
    if bad:
        raise ValueError(f"{where}: unknown field(s) {bad}; allowed: {list(PROBE_FIELDS)}")
    T = task.seq_len
    lengths = spec.get("lengths", [T, 2 * T])
    if (not isinstance(lengths, list) or not lengths
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 2 for x in lengths)):
        raise ValueError(f"{where}.lengths={lengths!r}: a non-empty list of sequence lengths (integers >= 2)")
    lengths = sorted(set(lengths))
    for n in lengths:
        try:
            task.at_length(n)
        except ValueError as e:
            raise ValueError(f"{where}.lengths: the task cannot be probed at length {n}: {e}") from e
    edges = spec.get("distance_bins", default_bins(T))
    if (not isinstance(edges, list) or not edges or not all(isinstance(x, int) and x >= 0 for x in edges)
            or any(b <= a for a, b in itertools.pairwise(edges))):
        raise ValueError(f"{where}.distance_bins={edges!r}: increasing integers >= 0 (bin edges: [e0, e1), ..., "
                         "[e_last, inf))")
    for k in ("samples", "batch_size"):
        v = spec.get(k, 256 if k == "samples" else 64)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{where}.{k}={v!r}: a positive integer")
    return {"lengths": lengths, "distance_bins": list(edges), "samples": spec.get("samples", 256),
            "batch_size": spec.get("batch_size", 64)}


@torch.no_grad()
def _run(model, task: Task, samples: int, batch_size: int, edges: list[int], device, seed: int
         ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Loss/accuracy over all scored tokens of ``samples`` held-out samples, and accuracy per distance bin."""
    labels = bin_labels(edges)
    hits = [0] * len(edges)
    counts = [0] * len(edges)
    loss_sum, correct, total = 0.0, 0, 0
    has_distance = True
    for start in range(0, samples, batch_size):
        n = min(batch_size, samples - start)
        ids, tgt, infos = task.batch(seed, "eval", start, n)
        ids, tgt = ids.to(device), tgt.to(device)
        logits = model(ids).float()
        loss_sum += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                          ignore_index=IGNORE, reduction="sum"))
        mask = tgt != IGNORE
        ok = (logits.argmax(-1) == tgt) & mask
        correct += int(ok.sum())
        total += int(mask.sum())
        for b, info in enumerate(infos):
            pos = mask[b].nonzero().flatten().tolist()
            dist = task.token_distances(info, len(pos))
            if dist is None:
                has_distance = False
                continue
            if len(dist) != len(pos):
                raise RuntimeError(f"{type(task).__name__}.token_distances gave {len(dist)} distances for "
                                   f"{len(pos)} scored tokens")
            for p, d in zip(pos, dist):
                k = _which(d, edges)
                if k is not None:
                    counts[k] += 1
                    hits[k] += int(ok[b, p])
    overall = {"accuracy": correct / max(1, total), "loss": loss_sum / max(1, total), "tokens": total}
    by_bin = {lab: {"accuracy": (h / c) if c else float("nan"), "tokens": c}
              for lab, h, c in zip(labels, hits, counts)} if has_distance else {}
    return overall, by_bin


def probe(model, task: Task, lengths: list[int] | None = None, distance_bins: list[int] | None = None,
          samples: int = 256, batch_size: int = 64, seed: int = PROBE_SEED) -> dict[str, Any]:
    """Accuracy of ``model`` on ``task``'s answers by distance (at the task's length) and at every length."""
    lengths = sorted(set(lengths or [task.seq_len]))
    edges = distance_bins or default_bins(task.seq_len)
    limit = getattr(getattr(model, "config", None), "max_positions", None)
    if limit is not None and max(lengths) > limit:
        raise ValueError(f"probe length {max(lengths)} exceeds the model's max_positions={limit}")
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        by_length, by_length_distance = {}, {}
        for n in lengths:
            overall, by_bin = _run(model, task.at_length(n), samples, batch_size, edges, device, seed)
            by_length[str(n)] = overall
            by_length_distance[str(n)] = by_bin
        if task.seq_len in lengths:
            by_distance = by_length_distance[str(task.seq_len)]
        else:
            by_distance = _run(model, task, samples, batch_size, edges, device, seed)[1]
    finally:
        model.train(was)
    return {"seq_len": task.seq_len, "distance_bins": edges, "by_distance": by_distance, "by_length": by_length,
            "by_length_distance": by_length_distance}


__all__ = ["PROBE_FIELDS", "bin_labels", "default_bins", "parse_probe", "probe"]
