"""Layer-wise attention budgeting: a budgeted variant of any :class:`~kvlab.config.ModelConfig`.

A budget says, layer by layer, whether attention is *global* (full causal, the cache grows with the
context) or *sliding* (a window of ``window`` positions, the cache stays constant), and how many
query heads (and, where wanted, KV heads, head dim and RoPE) each kind of layer gets. Laguna XS.2 is
the worked example: ``1 global : 3 sliding``, window 512, 48 query heads on global layers and 64 on
sliding ones, so the expensive full-context scans are few and narrow.

Per decoded token at context ``n`` a layer with ``h`` query heads costs
``2 * h * (d_k + d_v) * min(n, window)`` attention FLOPs and stores
``kv_heads * (d_k + d_v) * min(n, window)`` elements of K/V; :func:`kvlab.costs` prices the result.

    >>> from kvlab.budget import budget
    >>> cfg = budget(base, pattern="1 global : 3 sliding", window=512, heads={"global": 48, "sliding": 64})
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

from .config import LayerSpec, ModelConfig, RopeSpec
from .kinds import GQASpec, with_spec

KINDS = ("global", "sliding")
_ALIASES = {"global": "global", "full": "global", "full_attention": "global",
            "sliding": "sliding", "local": "sliding", "window": "sliding", "swa": "sliding",
            "sliding_attention": "sliding"}
_PART = re.compile(r"^\s*(?:(\d+)\s*[x*]?\s*)?([A-Za-z_]+)\s*$")
_KEEP = object()


def kind_name(text: Any, where: str = "pattern") -> str:
    """``'global'`` or ``'sliding'`` for a kind name or alias (full, local, window, swa, ...)."""
    k = _ALIASES.get(text.strip().lower()) if isinstance(text, str) else None
    if k is None:
        raise ValueError(f"{where}: unknown layer kind {text!r}; allowed: global (full) or sliding (local, window, "
                         "swa)")
    return k


def parse_pattern(pattern: str | Sequence[str], num_layers: int) -> list[str]:
    """Per-layer kinds from a pattern string or a per-layer list.

    A string is a period of ``<count> <kind>`` parts separated by ``:`` or ``,`` (``"1 global : 3 sliding"``,
    ``"3 sliding : 1 global"``, ``"global"``); it repeats from layer 0 and the last repetition may be cut
    short. A list names the kind of every layer and must have ``num_layers`` entries.
    """
    if isinstance(pattern, str):
        period: list[str] = []
        for part in re.split(r"[:,]", pattern):
            m = _PART.match(part)
            if not m:
                raise ValueError(f"pattern {pattern!r}: cannot read {part.strip()!r}; write parts like "
                                 "'1 global : 3 sliding'")
            n = int(m.group(1)) if m.group(1) else 1
            if n < 1:
                raise ValueError(f"pattern {pattern!r}: a count must be >= 1, got {n}")
            period += [kind_name(m.group(2), f"pattern {pattern!r}")] * n
        return [period[i % len(period)] for i in range(num_layers)]
    if not isinstance(pattern, Sequence) or isinstance(pattern, bytes):
        raise TypeError(f"pattern must be a string or a list of layer kinds, got {type(pattern).__name__}")
    kinds = list(pattern)
    if len(kinds) != num_layers:
        raise ValueError(f"pattern has {len(kinds)} entries; the model has {num_layers} layers")
    return [kind_name(k, f"pattern[{i}]") for i, k in enumerate(kinds)]


def layer_kinds(cfg: ModelConfig) -> list[str]:
    """``'global'`` / ``'sliding'`` for every layer of ``cfg`` (by its window)."""
    return ["global" if x.window is None else "sliding" for x in cfg.layers]


def describe_pattern(cfg_or_kinds: ModelConfig | Sequence[str]) -> str:
    """The shortest repeating period of the layer kinds, written as ``"1 global : 3 sliding"``.

    The period must tile the layers exactly; otherwise the whole sequence is written out.
    """
    kinds = layer_kinds(cfg_or_kinds) if isinstance(cfg_or_kinds, ModelConfig) else list(cfg_or_kinds)
    n = len(kinds)
    p = next(p for p in range(1, n + 1) if n % p == 0 and kinds == kinds[:p] * (n // p))
    parts: list[list[Any]] = []
    for k in kinds[:p]:
        if parts and parts[-1][1] == k:
            parts[-1][0] += 1
        else:
            parts.append([1, k])
    return " : ".join(f"{c} {k}" for c, k in parts)


def _is_kind_map(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(
        isinstance(k, str) and k.strip().lower() in _ALIASES for k in value)


def _per_layer(name: str, value: Any, kinds: list[str], scalar: tuple[type, ...]) -> list[Any]:
    """Expand ``value`` (None, a scalar, a {kind: value} map or a per-layer list) to one entry per layer.

    ``_KEEP`` marks a layer whose current setting stays.
    """
    n = len(kinds)
    if value is None:
        return [_KEEP] * n
    if _is_kind_map(value):
        by_kind = {kind_name(k, name): v for k, v in value.items()}
        return [by_kind.get(k, _KEEP) for k in kinds]
    if isinstance(value, Mapping):
        raise ValueError(f"{name}: keys must be layer kinds (global, sliding), "  # noqa: TRY004 (a bad value)
                         f"got {sorted(map(str, value))}")
    if isinstance(value, scalar):
        return [value] * n
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries; the model has {n} layers (one per layer, or a "
                             "{'global': .., 'sliding': ..} map, or one value for all)")
        return list(value)
    raise ValueError(f"{name}={value!r}: expected one value, a {{'global': .., 'sliding': ..}} map or a per-layer "
                     "list")


def _count(name: str, i: int, kind: str, v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name} for layers[{i}] ({kind}) = {v!r}: must be a positive integer")
    return v


def _rope(v: Any, i: int, kind: str) -> RopeSpec | None:
    if v is None or isinstance(v, RopeSpec):
        return dataclasses.replace(v) if v is not None else None
    if isinstance(v, Mapping):
        try:
            return RopeSpec(**v)
        except TypeError as e:
            raise ValueError(f"rope for layers[{i}] ({kind}): {e}") from e
    raise ValueError(f"rope for layers[{i}] ({kind}) = {v!r}: expected a RopeSpec, a dict of its fields or None")


def budget(cfg: ModelConfig, pattern: str | Sequence[str] | None = None, *, window: int | Sequence | None = None,
           heads: int | Mapping[str, int] | Sequence[int] | None = None,
           kv_heads: int | Mapping[str, int] | Sequence[int] | None = None,
           head_dim: int | Mapping[str, int] | Sequence[int] | None = None,
           rope: Any = None, sink_tokens: int | None = None, name: str | None = None,
           source: str | None = None) -> ModelConfig:
    """A copy of ``cfg`` whose layers follow an attention budget.

    pattern: which layers are global and which sliding: a string such as ``"1 global : 3 sliding"``
        (repeated from layer 0) or a per-layer list of kinds; ``None`` keeps each layer's kind (its window,
        or the per-layer ``window`` list when one is given).
    window: the sliding window: one size for every sliding layer, or a per-layer list (``None`` entries
        for global layers). ``None`` keeps the windows sliding layers already have.
    heads, kv_heads, head_dim: each one value for all layers, a ``{"global": n, "sliding": m}`` map (a kind
        left out keeps its layers' values) or a per-layer list; ``None`` keeps every layer's own.
    rope: a RopeSpec (or dict of its fields) for all layers, a ``{"global": .., "sliding": ..}`` map of them
        (``None`` as a value means no rotation), or a per-layer list; ``None`` keeps each layer's own.
    sink_tokens: each sliding layer's first positions kept visible past its window (StreamingLLM's attention
        sinks, arXiv 2309.17453; ``GQASpec.sink_tokens``): one count for every sliding layer; ``None`` keeps
        each sliding layer's own. Global layers have none.
    name: the new config's name (default ``<name>-budget``); source: its citation (default: the pattern and
        the base model's source).

    Everything else (MLP, norms, gates, ...) is kept. Errors name the argument, the layer and the value.
    """
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"budget() needs a ModelConfig, got {type(cfg).__name__}")
    n = cfg.num_layers
    windows_given = isinstance(window, Sequence) and not isinstance(window, (str, bytes))
    if pattern is not None:
        kinds = parse_pattern(pattern, n)
    elif windows_given:
        if len(window) != n:
            raise ValueError(f"window has {len(window)} entries; the model has {n} layers")
        kinds = ["global" if w is None else "sliding" for w in window]
    else:
        kinds = layer_kinds(cfg)

    if windows_given:
        if len(window) != n:
            raise ValueError(f"window has {len(window)} entries; the model has {n} layers")
        wins = list(window)
    elif window is None:
        wins = [_KEEP] * n
    elif isinstance(window, int) and not isinstance(window, bool):
        wins = [window] * n
    else:
        raise ValueError(f"window={window!r}: expected a positive integer or a per-layer list")

    if sink_tokens is not None and (not isinstance(sink_tokens, int) or isinstance(sink_tokens, bool)
                                    or sink_tokens < 0):
        raise ValueError(f"sink_tokens={sink_tokens!r}: expected a non-negative integer (or None: keep)")
    hs = _per_layer("heads", heads, kinds, (int,))
    kvs = _per_layer("kv_heads", kv_heads, kinds, (int,))
    hds = _per_layer("head_dim", head_dim, kinds, (int,))
    if rope is None:
        ropes = [_KEEP] * n
    elif isinstance(rope, (RopeSpec, Mapping)) and not _is_kind_map(rope):
        ropes = [rope] * n
    else:
        ropes = _per_layer("rope", rope, kinds, ())

    layers: list[LayerSpec] = []
    for i, (spec, kind) in enumerate(zip(cfg.layers, kinds)):
        s = dataclasses.replace(spec, rope=dataclasses.replace(spec.rope) if spec.rope else None,
                                moe=dataclasses.replace(spec.moe) if spec.moe else None)
        w = wins[i]
        if kind == "global":
            if w is not _KEEP and w is not None and windows_given:
                raise ValueError(f"window for layers[{i}] is {w!r} but the pattern makes it a global layer "
                                 "(use None for global layers)")
            s.window = None
            if s.gqa is not None:
                s.gqa = dataclasses.replace(s.gqa, sink_tokens=0)
        else:
            w = spec.window if w is _KEEP else w
            if w is None:
                raise ValueError(f"layers[{i}] is a sliding layer but has no window: pass window=<positions>")
            s.window = _count("window", i, kind, w)
            if sink_tokens is not None and s.gqa is not None:
                s.gqa = dataclasses.replace(s.gqa, sink_tokens=sink_tokens)
            elif sink_tokens:
                raise ValueError(f"sink_tokens={sink_tokens}: layers[{i}] is a {s.attention!r} layer; sink tokens are "
                                 f"an option of {', '.join(with_spec(GQASpec))} (GQASpec.sink_tokens)")
        if hs[i] is not _KEEP:
            s.num_heads = _count("heads", i, kind, hs[i])
        if kvs[i] is not _KEEP:
            s.num_kv_heads = _count("kv_heads", i, kind, kvs[i])
        if hds[i] is not _KEEP:
            s.head_dim = _count("head_dim", i, kind, hds[i])
        if ropes[i] is not _KEEP:
            s.rope = _rope(ropes[i], i, kind)
        if s.num_heads % s.num_kv_heads:
            raise ValueError(f"layers[{i}] ({kind}): {s.num_heads} query heads cannot be shared by "
                             f"{s.num_kv_heads} KV heads: the KV heads must divide the query heads "
                             f"(e.g. {_nearest(s.num_heads, s.num_kv_heads)})")
        layers.append(s)

    new_name = name or f"{cfg.name}-budget"
    if source is None:
        source = f"budget of {cfg.name} ({describe_pattern(kinds)})" + (f"; base: {cfg.source}" if cfg.source else "")
    try:
        return dataclasses.replace(cfg, layers=layers, name=new_name, source=source)
    except ValueError as e:
        raise ValueError(f"budget of {cfg.name}: the budgeted model is invalid: {e}") from e


def _nearest(h: int, kv: int) -> str:
    lo = (h // kv) * kv
    opts = [x for x in (lo, lo + kv) if x >= kv]
    return " or ".join(str(x) for x in opts) + " query heads"


__all__ = ["KINDS", "budget", "describe_pattern", "kind_name", "layer_kinds", "parse_pattern"]
