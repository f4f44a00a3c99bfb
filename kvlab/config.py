"""The per-layer model description every part of kvlab reads.

A :class:`ModelConfig` is a list of :class:`LayerSpec`: the modules build it, the cache sizes itself
from it, the calculator prices it and the loaders fill it. Validation happens on construction and
every error names the layer, the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ATTENTION_KINDS = ("gqa",)
MLP_KINDS = ("dense", "moe")
ACTIVATIONS = ("silu", "gelu_tanh", "gelu")
ROPE_SCALINGS = ("default", "linear", "llama3", "yarn")
GATE_KINDS = (None, "sigmoid", "softplus")
MOE_SCORINGS = ("softmax", "sigmoid")


def _err(where: str, name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"{where}.{name}={value!r}: {allowed}" if where else f"{name}={value!r}: {allowed}")


def _positive_int(where: str, name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _err(where, name, value, "must be a positive integer")


@dataclass
class RopeSpec:
    """Rotary position embedding of one layer (RoFormer, arXiv 2104.09864) and its scalings.

    ``partial`` is the fraction of the head dim that is rotated (the first ``partial * head_dim``
    channels, rotate-half layout). ``scaling``: ``default``; ``linear`` (position interpolation,
    ``factor``); ``llama3`` (Llama 3.1 band-wise scaling: ``factor``, ``low_freq_factor``,
    ``high_freq_factor``, ``original_max_positions``); ``yarn`` (arXiv 2309.00071: ``factor``,
    ``original_max_positions``, ``beta_fast``, ``beta_slow``, ``attention_factor``, ``mscale``,
    ``mscale_all_dim``, ``truncate``).
    """

    theta: float = 10000.0
    partial: float = 1.0
    scaling: str = "default"
    factor: float = 1.0
    original_max_positions: int | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def validate(self, where: str) -> None:
        if not (isinstance(self.theta, (int, float)) and self.theta > 0):
            raise _err(where, "theta", self.theta, "must be a positive number")
        if not (0.0 < self.partial <= 1.0):
            raise _err(where, "partial", self.partial, "must be in (0, 1]")
        if self.scaling not in ROPE_SCALINGS:
            raise _err(where, "scaling", self.scaling, f"allowed: {', '.join(ROPE_SCALINGS)}")
        if self.scaling != "default" and not self.factor > 0:
            raise _err(where, "factor", self.factor, "must be > 0")
        if self.scaling in ("llama3", "yarn") and not self.original_max_positions:
            raise _err(where, "original_max_positions", self.original_max_positions,
                       f"required (a positive integer) for {self.scaling} scaling")


@dataclass
class MoESpec:
    """A routed mixture-of-experts MLP (Switch/GShard lineage; DeepSeek-V3 style options).

    ``scoring``: softmax or sigmoid router scores; ``bias_correction``: a per-expert bias added to
    the scores for the choice only (aux-loss-free balancing, DeepSeek-V3); ``norm_topk``: renormalise
    the chosen weights to sum to 1; ``routed_scaling``: multiplies the routed output;
    ``shared_experts``: always-on experts of width ``shared_size`` (default ``expert_size``).
    """

    num_experts: int
    top_k: int
    expert_size: int
    scoring: str = "softmax"
    norm_topk: bool = True
    bias_correction: bool = False
    routed_scaling: float = 1.0
    shared_experts: int = 0
    shared_size: int | None = None

    def validate(self, where: str) -> None:
        _positive_int(where, "num_experts", self.num_experts)
        _positive_int(where, "expert_size", self.expert_size)
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.num_experts:
            raise _err(where, "top_k", self.top_k, f"must be an integer in [1, num_experts={self.num_experts}]")
        if self.scoring not in MOE_SCORINGS:
            raise _err(where, "scoring", self.scoring, f"allowed: {', '.join(MOE_SCORINGS)}")
        if not isinstance(self.shared_experts, int) or self.shared_experts < 0:
            raise _err(where, "shared_experts", self.shared_experts, "must be an integer >= 0")

    @property
    def shared_width(self) -> int:
        return self.shared_experts * (self.shared_size or self.expert_size)


@dataclass
class LayerSpec:
    """One decoder layer: its attention, its K/V storage and its MLP.

    attention: ``gqa`` covers MHA (kv heads == heads), GQA and MQA (one kv head).
    window: sliding-window size in positions (a query sees itself and the ``window - 1`` before it);
        ``None`` is full causal attention. The cache of a window layer holds exactly ``window``
        positions.
    sinks: learned per-head sink logits added to the softmax denominator (gpt-oss style).
    qk_norm: RMSNorm over head_dim on q and k before RoPE (Qwen3, OLMo 2 style).
    output_gate: ``sigmoid`` or ``softplus`` gate on the attention output, computed from the
        attention input; ``gate_per_head`` gives one scalar per head, else one per channel.
    kv_source: index of an earlier layer whose K/V this layer reads; it computes and stores none.
    rope: ``None`` for a layer without positional rotation (NoPE).
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int = 0
    attention: str = "gqa"
    v_head_dim: int | None = None
    window: int | None = None
    sinks: bool = False
    qk_norm: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    output_gate: str | None = None
    gate_per_head: bool = True
    rope: RopeSpec | None = field(default_factory=RopeSpec)
    attn_scale: float | None = None
    kv_source: int | None = None
    mlp: str = "dense"
    activation: str = "silu"
    mlp_bias: bool = False
    moe: MoESpec | None = None

    def __post_init__(self) -> None:
        if isinstance(self.rope, dict):
            self.rope = RopeSpec(**self.rope)
        if isinstance(self.moe, dict):
            self.moe = MoESpec(**self.moe)

    @property
    def value_dim(self) -> int:
        return self.v_head_dim or self.head_dim

    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else 1.0 / math.sqrt(self.head_dim)

    @property
    def stores_kv(self) -> bool:
        return self.kv_source is None

    def validate(self, where: str, index: int) -> None:
        if self.attention not in ATTENTION_KINDS:
            raise _err(where, "attention", self.attention, f"allowed kinds: {', '.join(ATTENTION_KINDS)}")
        for name in ("num_heads", "num_kv_heads", "head_dim"):
            _positive_int(where, name, getattr(self, name))
        if self.v_head_dim is not None:
            _positive_int(where, "v_head_dim", self.v_head_dim)
        if self.num_heads % self.num_kv_heads:
            raise _err(where, "num_kv_heads", self.num_kv_heads,
                       f"must divide num_heads={self.num_heads}")
        if self.window is not None:
            _positive_int(where, "window", self.window)
        if self.output_gate not in GATE_KINDS:
            raise _err(where, "output_gate", self.output_gate, "allowed: None, 'sigmoid', 'softplus'")
        if self.kv_source is not None and (not isinstance(self.kv_source, int) or not 0 <= self.kv_source < index):
            raise _err(where, "kv_source", self.kv_source, "a layer can only read K/V from an earlier layer")
        if self.rope is not None:
            self.rope.validate(f"{where}.rope")
            rot = int(self.head_dim * self.rope.partial)
            if rot < 2 or rot % 2:
                raise _err(f"{where}.rope", "partial", self.rope.partial,
                           f"must rotate an even number >= 2 of the head_dim={self.head_dim} channels")
        if self.mlp not in MLP_KINDS:
            raise _err(where, "mlp", self.mlp, f"allowed: {', '.join(MLP_KINDS)}")
        if self.activation not in ACTIVATIONS:
            raise _err(where, "activation", self.activation, f"allowed: {', '.join(ACTIVATIONS)}")
        if self.mlp == "dense":
            _positive_int(where, "intermediate_size", self.intermediate_size)
        else:
            if self.moe is None:
                raise _err(where, "moe", None, "required when mlp='moe'")
            self.moe.validate(f"{where}.moe")


@dataclass
class ModelConfig:
    """A decoder-only language model described layer by layer.

    norm_offset: RMSNorm weights stored as ``w`` and applied as ``1 + w`` (Gemma style).
    embed_scale: multiplies the token embeddings (Gemma: sqrt(hidden)); ``None`` for none.
    final_logit_softcap: ``cap * tanh(logits / cap)`` on the output logits; ``None`` for none.
    source: where the numbers come from (a preset cites its model card or config).
    """

    vocab_size: int
    hidden_size: int
    layers: list[LayerSpec]
    max_positions: int = 4096
    norm_eps: float = 1e-6
    norm_offset: bool = False
    tie_embeddings: bool = False
    embed_scale: float | None = None
    final_logit_softcap: float | None = None
    name: str = "custom"
    source: str = ""

    def __post_init__(self) -> None:
        self.layers = [_as_layer(x) for x in self.layers]
        self.validate()

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "max_positions"):
            _positive_int("", name, getattr(self, name))
        if not self.layers:
            raise _err("", "layers", [], "a model needs at least one layer")
        if not (isinstance(self.norm_eps, (int, float)) and 0 < self.norm_eps < 1):
            raise _err("", "norm_eps", self.norm_eps, "must be in (0, 1)")
        if self.final_logit_softcap is not None and not self.final_logit_softcap > 0:
            raise _err("", "final_logit_softcap", self.final_logit_softcap, "must be > 0 or None")
        for i, layer in enumerate(self.layers):
            layer.validate(f"layers[{i}]", i)
            if layer.kv_source is not None:
                src = self.layers[layer.kv_source]
                if src.kv_source is not None:
                    raise _err(f"layers[{i}]", "kv_source", layer.kv_source,
                               f"layers[{layer.kv_source}] reads its K/V from layers[{src.kv_source}]; "
                               "name the producing layer")
                for f in ("num_kv_heads", "head_dim", "value_dim", "window", "attention"):
                    if getattr(src, f) != getattr(layer, f):
                        raise _err(f"layers[{i}]", "kv_source", layer.kv_source,
                                   f"layers[{i}].{f}={getattr(layer, f)!r} differs from "
                                   f"layers[{layer.kv_source}].{f}={getattr(src, f)!r}; "
                                   "a layer can only share K/V of the same layout")

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s) {unknown}; allowed: {sorted(known)}")
        d["layers"] = [_as_layer(x) for x in d.get("layers", [])]
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def replace_layers(self, fn) -> ModelConfig:
        """A copy with ``fn(index, LayerSpec) -> LayerSpec`` applied to every layer."""
        layers = [fn(i, dataclasses.replace(x)) for i, x in enumerate(self.layers)]
        return dataclasses.replace(self, layers=layers)


def _as_layer(x: LayerSpec | dict[str, Any]) -> LayerSpec:
    if isinstance(x, LayerSpec):
        return x
    if not isinstance(x, dict):
        raise TypeError(f"layers entries must be LayerSpec or dict, got {type(x).__name__}")
    x = dict(x)
    known = {f.name for f in dataclasses.fields(LayerSpec)}
    unknown = sorted(set(x) - known)
    if unknown:
        raise ValueError(f"unknown LayerSpec field(s) {unknown}; allowed: {sorted(known)}")
    return LayerSpec(**x)


def uniform_layers(n: int, **kw: Any) -> list[LayerSpec]:
    """``n`` identical layers (each a fresh object)."""
    return [LayerSpec(**{k: (dataclasses.replace(v) if dataclasses.is_dataclass(v) else v) for k, v in kw.items()})
            for _ in range(n)]
