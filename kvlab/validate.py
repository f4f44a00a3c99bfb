"""One generic check of configuration values: types and ranges, every error naming the field by its path.

:func:`check_fields` walks a dataclass (ModelConfig, its LayerSpecs and their nested specs) and checks every
field's value against its type annotation (``int``, ``float``, ``bool``, ``str``, ``X | None``, ``tuple[...]``,
``list[...]``, nested dataclasses) and its range: ``field(metadata={"range": Range(...)})`` on the field, else
``RANGES["Class.field"]`` or ``RANGES["field"]``, else the default (any integer; floats finite and >= 0).
A string where a number belongs, a NaN, an infinity or a negative scale fails here, before anything reads it,
as ``layers[3].attn_scale=nan: must be a finite number > 0``.

:func:`check_hf_config` does the same for a Hugging Face ``config.json`` before a family translates it: the
numeric keys the families read must hold numbers (or null), at any depth (``rope_parameters.factor``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class Range:
    """An interval of allowed numbers; ``None`` bounds are open-ended."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, v: float) -> bool:
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return not (self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi))

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {_num(self.lo)}" if self.lo is not None else ""
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {_num(self.hi)}"
        return f"in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"


def _num(x: float | None) -> str:
    return str(int(x)) if x is not None and float(x).is_integer() else str(x)


POSITIVE = Range(0, lo_open=True)
NON_NEGATIVE = Range(0)
AT_LEAST_ONE = Range(1)

# ranges that differ from the default (any integer; floats finite and >= 0); "Class.field" wins over "field".
# Bounds that relate fields (top_k <= num_experts, divisibility, ...) stay with each class's validate().
RANGES: dict[str, Range] = {
    # ModelConfig
    "vocab_size": AT_LEAST_ONE, "hidden_size": AT_LEAST_ONE, "max_positions": AT_LEAST_ONE, "ple_dim": AT_LEAST_ONE,
    "ple_vocab_size": AT_LEAST_ONE, "mhc_streams": AT_LEAST_ONE, "mhc_sinkhorn_iters": AT_LEAST_ONE,
    "norm_eps": Range(0, 1, lo_open=True, hi_open=True), "embed_scale": POSITIVE, "final_logit_softcap": POSITIVE,
    "mhc_eps": Range(0, 1, hi_open=True),
    # LayerSpec
    "num_heads": AT_LEAST_ONE, "num_kv_heads": AT_LEAST_ONE, "head_dim": AT_LEAST_ONE, "v_head_dim": AT_LEAST_ONE,
    "window": AT_LEAST_ONE, "attn_scale": POSITIVE,
    # CCASpec
    "conv_kernels": AT_LEAST_ONE,
    # RopeSpec
    "theta": POSITIVE, "factor": POSITIVE, "original_max_positions": AT_LEAST_ONE, "low_freq_factor": POSITIVE,
    "high_freq_factor": POSITIVE, "beta_fast": POSITIVE, "beta_slow": POSITIVE, "attention_factor": POSITIVE,
    # MoESpec
    "num_experts": AT_LEAST_ONE, "expert_size": AT_LEAST_ONE, "n_group": AT_LEAST_ONE, "router_hidden": AT_LEAST_ONE,
    "shared_size": AT_LEAST_ONE, "routed_scaling": POSITIVE, "swiglu_limit": POSITIVE,
    # MLASpec / CompressSpec
    "kv_lora_rank": AT_LEAST_ONE, "qk_nope_head_dim": AT_LEAST_ONE, "qk_rope_head_dim": AT_LEAST_ONE,
    "q_lora_rank": AT_LEAST_ONE, "MLASpec.index_heads": AT_LEAST_ONE, "MLASpec.index_head_dim": AT_LEAST_ONE,
    "MLASpec.index_topk": AT_LEAST_ONE, "CompressSpec.o_groups": AT_LEAST_ONE, "CompressSpec.o_lora_rank": AT_LEAST_ONE,
}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def check_fields(obj: Any, where: str = "", ranges: dict[str, Range] | None = None) -> None:
    """Check every field of the dataclass ``obj`` (recursively) against its annotation and range; ConfigError naming
    the first field at fault by its path (``layers[3].rope.theta``)."""
    ranges = RANGES if ranges is None else ranges
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        if f.name in hints:
            rng = f.metadata.get("range") or ranges.get(f"{type(obj).__name__}.{f.name}") or ranges.get(f.name)
            _check(getattr(obj, f.name), hints[f.name], _join(where, f.name), rng, ranges)


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        parts = [_describe(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or None" if type(None) in args else "")
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a finite number"
    if tp is str:
        return "a string"
    if origin is tuple:
        return f"a list of {len(args)} values" if args and args[-1] is not Ellipsis else "a list"
    if origin is list:
        return "a list"
    return f"a {getattr(tp, '__name__', str(tp))}"


def _describe_tuple(args: tuple[Any, ...], rng: Range | None) -> str:
    if not args or args[-1] is Ellipsis or len(set(args)) != 1 or args[0] not in (int, float):
        return _describe(tuple[args] if args else tuple)  # type: ignore[valid-type]
    words = {1: "one", 2: "two", 3: "three", 4: "four"}
    count = words.get(len(args), str(len(args)))
    if args[0] is int:
        return f"{count} positive integers" if rng == AT_LEAST_ONE else f"{count} integers" + (f" {rng}" if rng else "")
    return f"{count} finite numbers {rng or NON_NEGATIVE}"


def _fail(path: str, value: Any, tp: Any, rng: Range | None = None) -> ConfigError:
    if typing.get_origin(tp) is tuple:
        return ConfigError(f"{path}={value!r}: must be {_describe_tuple(typing.get_args(tp), rng)}")
    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    options = [a for a in typing.get_args(tp) if a is not type(None)] if union else [tp]

    def one(a: Any) -> str:
        r = NON_NEGATIVE if rng is None and a is float else rng  # the default range of floats
        if a is int and r == AT_LEAST_ONE:
            return "a positive integer"
        return _describe(a) + (f" {r}" if r is not None and str(r) and a in (int, float) else "")

    text = " or ".join(one(a) for a in options)
    if union and type(None) in typing.get_args(tp):
        text += " or None"
    return ConfigError(f"{path}={value!r}: must be {text}")


def _check(value: Any, tp: Any, path: str, rng: Range | None, ranges: dict[str, Range]) -> None:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            try:
                _check(value, options[0], path, rng, ranges)
            except ConfigError as e:
                if type(None) in args and str(e).startswith(f"{path}="):  # say that None is allowed too
                    raise _fail(path, value, tp, rng) from None
                raise
            return
        for a in options:
            try:
                _check(value, a, path, rng, ranges)
                return
            except ConfigError:
                continue
        raise _fail(path, value, tp, rng)
    if tp is bool:
        if not isinstance(value, bool):
            raise _fail(path, value, tp)
    elif tp is int:
        if not isinstance(value, int) or isinstance(value, bool) or (rng is not None and value not in rng):
            raise _fail(path, value, tp, rng)
    elif tp is float:
        if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
                or value not in (rng or NON_NEGATIVE)):
            raise _fail(path, value, tp, rng or NON_NEGATIVE)
    elif tp is str:
        if not isinstance(value, str):
            raise _fail(path, value, tp)
    elif origin is tuple:
        if not isinstance(value, (tuple, list)) or (args and args[-1] is not Ellipsis and len(value) != len(args)):
            raise _fail(path, value, tp, rng)
        for i, v in enumerate(value):
            if args:
                try:
                    _check(v, args[0] if args[-1] is Ellipsis else args[i], f"{path}[{i}]", rng, ranges)
                except ConfigError:
                    raise _fail(path, value, tp, rng) from None
    elif origin is list:
        if not isinstance(value, list):
            raise _fail(path, value, tp)
        for i, v in enumerate(value):
            if args:
                _check(v, args[0], f"{path}[{i}]", None, ranges)
    elif isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, tp):
            raise _fail(path, value, tp)
        check_fields(value, path, ranges)
    # other annotations (Any, dict, callables): no check


# -- Hugging Face config.json ------------------------------------------------------------------------

HF_INTS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "original_max_position_embeddings",
    "moe_intermediate_size", "num_experts", "num_experts_per_tok", "n_routed_experts", "n_shared_experts",
    "num_local_experts", "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
    "n_group", "topk_group", "first_k_dense_replace", "index_n_heads", "index_head_dim", "index_topk", "o_groups",
    "o_lora_rank", "hc_mult", "hc_sinkhorn_iters", "num_hash_layers", "global_head_dim", "num_global_key_value_heads",
    "hidden_size_per_layer_input", "vocab_size_per_layer_input", "num_kv_shared_layers", "router_hidden_size",
    "shared_expert_intermediate_size", "top_k_experts", "decoder_sparse_step", "sliding_window"})
HF_FLOATS = frozenset({
    "rms_norm_eps", "layer_norm_eps", "rope_theta", "partial_rotary_factor", "factor", "low_freq_factor",
    "high_freq_factor", "beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim",
    "routed_scaling_factor", "moe_routed_scaling_factor", "final_logit_softcapping", "attn_logit_softcapping",
    "moe_router_logit_softcapping", "swiglu_limit", "hc_eps", "compress_rope_theta", "query_pre_attn_scalar"})
HF_BOOLS = frozenset({"tie_word_embeddings", "attention_bias", "mlp_bias", "norm_topk_prob", "rope_interleave",
                      "use_sliding_window", "attention_k_eq_v", "truncate"})


def check_hf_config(cfg: dict[str, Any], where: str) -> None:
    """Check the numeric and boolean keys of a parsed ``config.json`` (at any depth); ConfigError naming
    ``where`` (the file) and the key's path otherwise. Null is allowed (a family default applies)."""
    _walk_hf(cfg, "", where)


def _hf_value_ok(key: str, v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, list):  # per-layer lists (intermediate_size of Gemma 3n, ...)
        return all(_hf_value_ok(key, x) for x in v)
    if key in HF_INTS:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0
    if key in HF_FLOATS:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return isinstance(v, bool)


HF_EXPECT = {"int": "an integer >= 0 (or null)", "float": "a finite number (or null)", "bool": "true or false"}


def _walk_hf(node: Any, path: str, where: str) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            p = _join(path, str(k))
            kind = "int" if k in HF_INTS else "float" if k in HF_FLOATS else "bool" if k in HF_BOOLS else None
            if kind is not None and not _hf_value_ok(k, v):
                raise ConfigError(f"{where}: {p}={v!r}: must be {HF_EXPECT[kind]}")
            _walk_hf(v, p, where)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _walk_hf(v, f"{path}[{i}]", where)


__all__ = ["AT_LEAST_ONE", "NON_NEGATIVE", "POSITIVE", "RANGES", "Range", "check_fields", "check_hf_config"]
