"""Conversions by name: ``"share-last:6"``, ``"share-adjacent:2"``, ``"window:512,pattern=3sliding+1global,sinks=4"``,
``"window:512,sinks=4,sinks-on=converted"``, ``"prune-heads:0.5"`` — what ``kvlab retrofit --to`` and ``--sweep``
take. A technique string is ``NAME[:VALUE][,KEY=VALUE...]``; ``+`` in a pattern stands for ``:`` (``3sliding+1global`` = ``3 sliding : 1 global``).

``TECHNIQUES`` maps each name to a :class:`Technique`: what it does, its options, and the function applying it;
a new conversion is one entry here plus its own module. This table imports without torch (the CLI lists it in
``kvlab retrofit --help`` and checks a technique string before loading anything); the conversion itself is named
``"package.module:function"`` and imported when it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..costs.quant import resolve_kv_quant
from ..errors import RetrofitError
from ..kinds.base import resolve
from ..names import did_you_mean

if TYPE_CHECKING:
    from ..config import ModelConfig
    from ..model import Model
    from .core import Converted

SELECT = ("high", "2norm", "uniform")  # mla: which rotary pairs are kept (kvlab/retrofit/mla.py)
SVD = ("auto", "weights", "activations")  # mla: the factorisation of K/V


@dataclass(frozen=True)
class Technique:
    """One conversion: ``read(value, options) -> kwargs`` checks and converts the technique string's parts (no model
    needed, so a bad string fails before anything loads); ``apply``: ``"package.module:function"`` (or the function)
    called as ``function(model, **kwargs)``, plus ``ids=`` when the technique measures on text (``ids`` given, or
    ``needs_text``: it must) -> Converted. ``example`` is shown in errors and help."""

    name: str
    help: str
    example: str
    read: Callable[[str | None, dict[str, str]], dict[str, Any]]
    apply: str | Callable[..., Converted]
    needs_text: bool = False
    takes_text: bool = False  # apply accepts ids= (measures on text when given)
    whole_value: bool = False  # everything after the colon is the value, read as is (kv-quant:int4-g32+0=int8)
    check: str | Callable[..., Any] | None = None  # function(config, **kwargs): the conversion's errors, config only

    def function(self) -> Callable[..., Converted]:
        return resolve(self.apply) if isinstance(self.apply, str) else self.apply


def _int(name: str, key: str, v: str | None) -> int:
    try:
        return int(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise RetrofitError(f"{name}: {key}={v!r} must be an integer") from None


def _number(name: str, key: str, v: str | None) -> int | float:
    try:
        return int(v) if v is not None and v.isdigit() else float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise RetrofitError(f"{name}: {key}={v!r} must be a number (a head count or a fraction in (0, 1])") from None


def _options(name: str, opts: dict[str, str], allowed: tuple[str, ...] = ()) -> None:
    bad = sorted(set(opts) - set(allowed))
    if bad:
        raise RetrofitError(f"{name}: unknown option(s) {bad}; allowed: {list(allowed) or 'none'}")


def _read_share_last(value, opts):
    _options("share-last", opts)
    return {"last": _int("share-last", "layers", value)}


def _read_share_adjacent(value, opts):
    _options("share-adjacent", opts)
    return {"group": _int("share-adjacent", "group", value or "2")}


SINKS_ON = ("all", "converted")  # window: which window layers get the sink tokens (kvlab/retrofit/window.py)


def _read_window(value, opts):
    _options("window", opts, ("pattern", "sinks", "sinks-on"))
    pattern, sinks_on = opts.get("pattern"), opts.get("sinks-on", "all").lower()
    if sinks_on not in SINKS_ON:
        raise RetrofitError(f"window: sinks-on={sinks_on!r}; allowed: {', '.join(SINKS_ON)} (every window layer, or "
                            "only the layers the conversion makes sliding)")
    if "sinks-on" in opts and "sinks" not in opts:
        raise RetrofitError("window: sinks-on= says where the sink tokens go; give their count too (sinks=4)")
    return {"window": _int("window", "window", value), "pattern": pattern.replace("+", ":") if pattern else None,
            "sink_tokens": _int("window", "sinks", opts.get("sinks", "0")), "sinks_on": sinks_on}


def _read_prune(value, opts):
    _options("prune-heads", opts, ("global", "sliding"))
    if opts:
        if value is not None:
            raise RetrofitError("prune-heads: give one keep value (prune-heads:0.5) or per-kind ones "
                                "(prune-heads:global=0.5,sliding=1.0), not both")
        return {"keep": {k: _number("prune-heads", k, v) for k, v in opts.items()}}
    return {"keep": _number("prune-heads", "keep", value)}


def _read_kv_quant(value, opts):
    _options("kv-quant", opts)
    if not value:
        raise RetrofitError("kv-quant: name a format, e.g. kv-quant:int8 or kv-quant:int4-g32-r64")
    try:
        resolve_kv_quant(value)
    except ValueError as e:
        raise RetrofitError(f"kv-quant: {e}") from e
    return {"fmt": value}


def _read_mla(value: str | None, opts: dict[str, str]) -> dict:
    """``mla:rank=128,rope=32[,select=high][,svd=auto]`` (or ``mla:128,...``) -> ``to_mla`` keyword arguments."""
    _options("mla", opts, ("rank", "rope", "select", "svd"))
    if value is not None and "rank" in opts:
        raise RetrofitError("mla: give the rank once (mla:128 or mla:rank=128)")
    rank = opts.get("rank", value)
    if rank is None:
        raise RetrofitError("mla: needs a latent rank, e.g. mla:rank=128,rope=32")
    select, svd = opts.get("select", "high"), opts.get("svd", "auto")
    if select not in SELECT:
        raise RetrofitError(f"mla: select={select!r}; allowed: {', '.join(SELECT)}")
    if svd not in SVD:
        raise RetrofitError(f"mla: svd={svd!r}; allowed: {', '.join(SVD)}")
    rope = opts.get("rope")
    return {"rank": _int("mla", "rank", rank), "rope_dims": None if rope is None else _int("mla", "rope", rope),
            "select": select, "svd": svd}


TECHNIQUES: dict[str, Technique] = {t.name: t for t in (
    Technique("share-last", "the last N layers read an earlier layer's K/V (Gemma 4 pattern)", "share-last:6",
              _read_share_last, "kvlab.retrofit.sharing:to_shared", check="kvlab.retrofit.sharing:check_shared"),
    Technique("share-adjacent", "every G adjacent layers share one layer's K/V (CLA)", "share-adjacent:2",
              _read_share_adjacent, "kvlab.retrofit.sharing:to_shared", check="kvlab.retrofit.sharing:check_shared"),
    Technique("window", "sliding window W on every layer or on a pattern's sliding layers, optional sink tokens "
              "(StreamingLLM) on every window layer or, with sinks-on=converted, only on the layers that were global",
              "window:512,pattern=3sliding+1global,sinks=4", _read_window,
              "kvlab.retrofit.window:to_window", check="kvlab.retrofit.window:check_window"),
    Technique("prune-heads", "keep the most important query heads per layer (count or fraction; per kind with "
              "global=/sliding=)", "prune-heads:0.5", _read_prune, "kvlab.retrofit.heads:prune_heads",
              needs_text=True, takes_text=True,
              check="kvlab.retrofit.heads:check_prune"),
    Technique("kv-quant", "quantized K/V cache, same weights (a run-time cache format; kvlab calc --help lists them)",
              "kv-quant:int4-g32-r64", _read_kv_quant, "kvlab.retrofit.quant:to_kv_quant", whole_value=True,
              check="kvlab.retrofit.quant:check_kv_quant"),
    Technique("mla", "GQA/MHA -> DeepSeek MLA: partial RoPE (rope= kept rotary channels) and a joint SVD of "
              "K/V at latent rank (MHA2MLA / TransMLA; calibrated on the text when given)",
              "mla:rank=128,rope=32", _read_mla, "kvlab.retrofit.mla:to_mla", takes_text=True,
              check="kvlab.retrofit.mla:check_mla"),
)}


def register(t: Technique) -> Technique:
    """Add a conversion to :data:`TECHNIQUES`."""
    TECHNIQUES[t.name] = t
    return t


def parse(text: str) -> tuple[Technique, dict[str, Any]]:
    """``"window:512,sinks=4"`` -> (the window Technique, ``{"window": 512, "pattern": None, "sink_tokens": 4,
    "sinks_on": "all"}``);
    every part checked (a RetrofitError naming it), no model needed."""
    if not isinstance(text, str) or not text.strip():
        raise RetrofitError(f"technique {text!r}: write NAME[:VALUE][,KEY=VALUE...]; known: {', '.join(TECHNIQUES)}")
    head, _, rest = text.strip().partition(":")
    name = head.strip().lower()
    if name not in TECHNIQUES:
        raise RetrofitError(f"unknown technique {name!r}{did_you_mean(name, TECHNIQUES)}; known: "
                            + "; ".join(f"{t.name} (e.g. {t.example})" for t in TECHNIQUES.values()))
    value, opts = None, {}
    t = TECHNIQUES[name]
    if t.whole_value:
        return t, t.read(rest.strip() or None, {})
    for part in [p.strip() for p in rest.split(",") if p.strip()] if rest else []:
        if "=" in part:
            k, _, v = part.partition("=")
            opts[k.strip().lower()] = v.strip()
        elif value is None:
            value = part
        else:
            raise RetrofitError(f"technique {text!r}: a second value {part!r}; options are KEY=VALUE")
    return t, t.read(value, opts)


def check(config: ModelConfig, technique: str) -> None:
    """A RetrofitError, naming the layer and the option, unless ``technique`` applies to a model of ``config``: every
    check a conversion makes before its work, from the config alone (no weights; ``kvlab retrofit`` runs it for every
    technique before any model loads)."""
    t, kwargs = parse(technique)
    if t.check is not None:
        (resolve(t.check) if isinstance(t.check, str) else t.check)(config, **kwargs)


def apply(model: Model, technique: str, ids: Any = None) -> Converted:
    """``model`` converted by ``technique`` (a technique string); ``ids``: real text token ids for conversions that
    measure something first (head importance)."""
    t, kwargs = parse(technique)
    if t.needs_text and ids is None:
        raise RetrofitError(f"{t.name}: needs text token ids (ids=...) to measure on")
    return t.function()(model, **kwargs, **({"ids": ids} if t.takes_text else {}))
