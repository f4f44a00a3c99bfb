"""Cross-layer KV sharing patterns for any :class:`~kvlab.config.ModelConfig`.

A layer with ``kv_source = j`` reads layer ``j``'s K/V: it keeps its own query projection, query norm,
output projection and block norms, computes no K/V and stores nothing. These helpers write the common
patterns into a config (each returns a new, validated config and leaves its argument alone):

- :func:`share_last` — the last ``n`` layers read the last earlier layer of their own type (same
  attention kind and window): Gemma 3n, Gemma 4 E2B/E4B (``num_kv_shared_layers``).
- :func:`share_adjacent` — cross-layer attention (CLA, Brandon et al. 2024, arXiv 2405.12981): in every
  group of ``group`` adjacent layers the first produces K/V and the others read it.
- :func:`without_sharing` — every layer produces its own K/V again (the baseline a saving is measured
  against).
"""

from __future__ import annotations

import copy
import dataclasses

from . import kinds
from .config import LAYOUT, LayerSpec, ModelConfig, layout


def layer_type(spec: LayerSpec) -> tuple:
    """What 'the same type' means for sharing: attention kind, window (full = None) and sink tokens."""
    return spec.attention, spec.window, kinds.gqa.sink_tokens(spec)


def _type_name(spec: LayerSpec) -> str:
    return kinds.layer_label(spec)


def _check_layout(i: int, spec: LayerSpec, j: int, src: LayerSpec, why: str) -> None:
    for f in LAYOUT:
        if layout(spec, f) != layout(src, f):
            raise ValueError(f"{why}: layers[{i}] would read the K/V of layers[{j}], but "
                             f"layers[{i}].{f}={layout(spec, f)!r} differs from layers[{j}].{f}={layout(src, f)!r}; "
                             "a layer can only share K/V of the same layout")


def _with_sources(cfg: ModelConfig, sources: dict[int, int | None]) -> ModelConfig:
    layers = [dataclasses.replace(copy.deepcopy(x), kv_source=sources.get(i, x.kv_source))
              for i, x in enumerate(cfg.layers)]
    return dataclasses.replace(cfg, layers=layers)


def without_sharing(cfg: ModelConfig) -> ModelConfig:
    """The same model with every layer producing and storing its own K/V."""
    return _with_sources(cfg, {i: None for i in range(cfg.num_layers)})


def shared_layers(cfg: ModelConfig) -> list[int]:
    """Indices of the layers that read another layer's K/V."""
    return [i for i, x in enumerate(cfg.layers) if x.kv_source is not None]


def share_last(cfg: ModelConfig, n: int) -> ModelConfig:
    """The last ``n`` layers read the K/V of the last earlier non-shared layer of their own type.

    Any sharing already in ``cfg`` is replaced. Errors: ``n`` outside ``[0, num_layers)``; a shared
    layer whose type (attention kind and window) no earlier layer has; a producer of that type
    with another head layout (the message names both layers).
    """
    total = cfg.num_layers
    why = f"share_last(n={n})"
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"{why}: n must be an integer >= 0")
    if n >= total:
        raise ValueError(f"{why}: the model has {total} layers; at most {total - 1} can share "
                         "(at least one earlier layer must produce K/V)")
    first = total - n
    last_of_type: dict[tuple, int] = {}
    for j in range(first):
        last_of_type[layer_type(cfg.layers[j])] = j
    sources: dict[int, int | None] = {j: None for j in range(first)}
    for i in range(first, total):
        spec = cfg.layers[i]
        j = last_of_type.get(layer_type(spec))
        if j is None:
            have = ", ".join(sorted({_type_name(cfg.layers[k]) for k in range(first)}))
            raise ValueError(f"{why}: layers[{i}] ({_type_name(spec)}) has no earlier non-shared layer of its type "
                             f"among layers 0-{first - 1} ({have})")
        _check_layout(i, spec, j, cfg.layers[j], why)
        sources[i] = j
    return _with_sources(cfg, sources)


def share_adjacent(cfg: ModelConfig, group: int = 2) -> ModelConfig:
    """Cross-layer attention: layers ``g*k+1 .. g*k+group-1`` read layer ``g*k``'s K/V.

    Any sharing already in ``cfg`` is replaced; a trailing partial group shares the same way.
    A layer whose layout differs from its group's first layer is an error naming both.
    """
    why = f"share_adjacent(group={group})"
    if not isinstance(group, int) or isinstance(group, bool) or group < 2:
        raise ValueError(f"{why}: group must be an integer >= 2")
    sources: dict[int, int | None] = {}
    for i, spec in enumerate(cfg.layers):
        j = i - i % group
        if i == j:
            sources[i] = None
            continue
        _check_layout(i, spec, j, cfg.layers[j], why)
        sources[i] = j
    return _with_sources(cfg, sources)


__all__ = ["layer_type", "share_adjacent", "share_last", "shared_layers", "without_sharing"]
