"""Cross-layer KV sharing as a retrofit: consumer layers read a producer's K/V instead of computing their own
(training-free start; recover by distillation).

- ``adjacent``: cross-layer attention (CLA, Brandon et al. 2024, arXiv 2405.12981): in every group of ``group``
  adjacent layers the first produces K/V, the others read it;
- ``last``: the last ``n`` layers read the last earlier layer of their own type (Gemma 3n / Gemma 4 E2B pattern).

A consumer keeps its query projection, query norm, output projection, block norms and MLP; its ``k_proj`` /
``v_proj`` (and k_norm) are dropped. Sharing needs the same K/V layout (kind, KV heads, head dims, window): a
pattern across layers of different layouts is an error naming both layers and the field.
"""

from __future__ import annotations

from ..config import ModelConfig
from ..model import Model
from ..sharing import share_adjacent, share_last
from .core import Converted, RetrofitError, convert


def shared_config(config: ModelConfig, last: int | None = None, group: int | None = None) -> tuple[ModelConfig, str]:
    """The shared config and the technique's name, from the config alone (RetrofitError naming both layers and the
    field of a pattern that cannot share)."""
    if (last is None) == (group is None):
        raise RetrofitError("share: give exactly one of last=<layers> (the last n layers share) or "
                            "group=<layers> (adjacent groups share, CLA)")
    try:
        if last is not None:
            new, what = share_last(config, last), f"share-last:{last}"
        else:
            new, what = share_adjacent(config, group), f"share-adjacent:{group}"
    except (TypeError, ValueError) as e:
        raise RetrofitError(f"share: {e}") from e
    new.name = f"{config.name} ({what})"
    return new, what


def check_shared(config: ModelConfig, last: int | None = None, group: int | None = None) -> None:
    """RetrofitError unless the sharing applies to a model of ``config`` (no weights needed)."""
    shared_config(config, last, group)


def to_shared(model: Model, last: int | None = None, group: int | None = None) -> Converted:
    """``model`` with its last ``last`` layers, or every ``group`` adjacent layers, sharing K/V (exactly one)."""
    cfg = model.config
    new, what = shared_config(cfg, last, group)
    out = convert(model, new, technique=what)
    consumers = [i for i, x in enumerate(new.layers) if x.kv_source is not None and cfg.layers[i].kv_source is None]
    out.report.notes.append(f"layers {consumers} read the K/V of layers "
                            f"{[new.layers[i].kv_source for i in consumers]}; their k/v projections are dropped")
    return out
