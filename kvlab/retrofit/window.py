"""Attention budget as a retrofit: a sliding-window : global pattern with window ``W`` and optional sink tokens
(StreamingLLM, Xiao et al. 2023, arXiv 2309.17453: the first ``S`` positions stay visible to window layers) — on
every window layer, or (``sinks_on="converted"``) only on the layers the conversion makes sliding: a model that
already has sliding layers (Gemma 3: 5 sliding : 1 global) was trained with those layers never seeing the first
positions past their window, and sinks there hurt it (docs/retrofit.md).

Weights are unchanged (every tensor carried); only the cache policy changes, so this is a training-free start.
"""

from __future__ import annotations

import dataclasses

from .. import kinds
from ..budget import budget
from ..config import ModelConfig
from ..model import Model
from .core import Converted, RetrofitError, convert


def window_config(config: ModelConfig, window: int, pattern: str | None = None, sink_tokens: int = 0,
                  sinks_on: str = "all") -> tuple[ModelConfig, list[bool], str]:
    """From the config alone: the windowed config, which layers got sink tokens, and the technique's name
    (RetrofitError naming the option or the layer that cannot take a window)."""
    cfg = config
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise RetrofitError(f"window: window={window!r} must be a positive integer")
    if window >= cfg.max_positions:
        raise RetrofitError(f"window: window={window} is not smaller than the model's max_positions="
                            f"{cfg.max_positions}: every layer would still see every position")
    if not isinstance(sink_tokens, int) or isinstance(sink_tokens, bool) or sink_tokens < 0:
        raise RetrofitError(f"window: sink_tokens={sink_tokens!r} must be an integer >= 0")
    if sinks_on not in ("all", "converted"):
        raise RetrofitError(f"window: sinks_on={sinks_on!r}; allowed: 'all' (every window layer) or 'converted' (the "
                            "layers that were global)")
    for i, x in enumerate(cfg.layers):
        if not kinds.takes(x.attention, "window"):
            raise RetrofitError(f"window: layers[{i}] is a {x.attention!r} layer; the window retrofit applies to "
                                f"{kinds.taking('window')} layers")
    try:
        new = budget(cfg, pattern or "sliding", window=window)
    except (TypeError, ValueError) as e:
        raise RetrofitError(f"window: {e}") from e
    sink = [False] * len(new.layers)
    if sink_tokens:
        sink = [x.window is not None and (sinks_on == "all" or old.window is None)
                for x, old in zip(new.layers, cfg.layers)]
        if sinks_on == "converted" and not any(sink):
            raise RetrofitError(f"window: sinks-on=converted: no layer of {cfg.name} becomes sliding (every layer the "
                                "pattern makes sliding already was), so no layer would get the sink tokens; use "
                                "sinks-on=all or a pattern that windows a global layer")
        new = dataclasses.replace(new, layers=[
            dataclasses.replace(x, gqa=dataclasses.replace(x.gqa, sink_tokens=sink_tokens)) if s else x
            for x, s in zip(new.layers, sink)])
    what = f"window:{window}" + (f",pattern={pattern.replace(' ', '').replace(':', '+')}" if pattern else "") + \
        (f",sinks={sink_tokens}" if sink_tokens else "") + \
        (",sinks-on=converted" if sink_tokens and sinks_on == "converted" else "")
    new.name = f"{cfg.name} ({what})"
    return new, sink, what


def check_window(config: ModelConfig, window: int, pattern: str | None = None, sink_tokens: int = 0,
                 sinks_on: str = "all") -> None:
    """RetrofitError unless the window conversion applies to a model of ``config`` (no weights needed)."""
    window_config(config, window, pattern, sink_tokens, sinks_on)


def to_window(model: Model, window: int, pattern: str | None = None, sink_tokens: int = 0,
              sinks_on: str = "all") -> Converted:
    """``model`` with sliding windows of ``window`` positions on the layers ``pattern`` makes sliding
    (``"1 global : 3 sliding"``; None: every layer) and ``sink_tokens`` first positions kept visible on every window
    layer (``sinks_on="all"``) or only on those that were global in ``model`` (``"converted"``)."""
    new, sink, what = window_config(model.config, window, pattern, sink_tokens, sinks_on)
    out = convert(model, new, technique=what)
    where = f" on layers {[i for i, s in enumerate(sink) if s]}, global before" if sink_tokens and \
        sinks_on == "converted" else ""
    out.report.notes.append("weights unchanged; only the cache policy differs (window layers keep "
                            f"{window} positions" + (f" plus the first {sink_tokens}{where}" if sink_tokens else "")
                            + ")")
    return out
