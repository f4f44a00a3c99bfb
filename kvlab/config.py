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

from . import kinds
from .kinds import CCASpec, CompressSpec, GQASpec, MLASpec, field_error, positive_int
from .validate import check_fields

MLP_KINDS = ("dense", "moe", "dense+moe")
ACTIVATIONS = ("silu", "gelu_tanh", "gelu")
ROPE_SCALINGS = ("default", "linear", "llama3", "yarn", "proportional")
GATE_KINDS = (None, "sigmoid", "softplus")
WEIGHT_DTYPES = ("bfloat16", "float16", "float32", "float64")  # ModelConfig.dtype: what a Model can hold
MOE_SCORINGS = ("softmax", "sigmoid", "sqrtsoftplus")


_err = field_error
_positive_int = positive_int


@dataclass
class RopeSpec:
    """Rotary position embedding of one layer (RoFormer, arXiv 2104.09864) and its scalings.

    ``partial`` is the fraction of the head dim that is rotated (the first ``partial * head_dim``
    channels, rotate-half layout). ``scaling``: ``default``; ``linear`` (position interpolation,
    ``factor``); ``llama3`` (Llama 3.1 band-wise scaling: ``factor``, ``low_freq_factor``,
    ``high_freq_factor``, ``original_max_positions``); ``yarn`` (arXiv 2309.00071: ``factor``,
    ``original_max_positions``, ``beta_fast``, ``beta_slow``, ``attention_factor``, ``mscale``,
    ``mscale_all_dim``, ``truncate``); ``proportional`` (Gemma 4 full layers: the rotated pairs are channels
    ``(i, i + head_dim/2)`` for ``i < partial * head_dim / 2`` with frequencies ``theta^(-2i/head_dim)`` divided
    by ``factor``; the other pairs are not rotated).
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
    ``shared_experts``: always-on experts of width ``shared_size`` (default ``expert_size``);
    ``router_norm``: the router reads the block's residual stream (not the MoE input), RMS-normalised
    without a weight, times a learned per-channel scale and ``1/sqrt(hidden)`` (Gemma 4);
    ``expert_scale``: a learned per-expert factor on the chosen weights, after renormalisation (Gemma 4).
    ``router_hidden``: the router logits come from a small MLP in a ``router_hidden``-wide space
    (kvlab/layers/router.py; ZAYA1); ``router_carry``: that router space also receives the previous
    layer's router state times a learned per-channel scale (the previous layer must have the same
    ``router_hidden``); ``skip_expert``: one extra router class that computes nothing (its tokens get
    no routed output), with its own balancing bias under ``bias_correction`` (ZAYA1).
    ``scoring='sqrtsoftplus'``: scores ``sqrt(softplus(logits))`` (DeepSeek V4). ``hash_routing``: the experts
    of a token are a fixed lookup ``tid2eid[token id]`` (a ``[vocab, top_k]`` table loaded with the weights);
    the router still weights them (DeepSeek V4's hash-MoE layers). ``swiglu_limit``: the routed and shared
    experts clamp the gate pre-activation to ``<= limit`` and the up pre-activation to ``[-limit, limit]``.
    ``n_group`` / ``topk_group``: group-limited routing (DeepSeek-V3): the experts split into ``n_group`` equal
    groups, each scored by the sum of its two best choice scores; only experts of the ``topk_group`` best groups
    can be chosen (``topk_group`` None: every group; the defaults route freely).
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
    router_norm: bool = False
    expert_scale: bool = False
    router_hidden: int | None = None
    router_carry: bool = False
    skip_expert: bool = False
    hash_routing: bool = False
    swiglu_limit: float | None = None
    n_group: int = 1
    topk_group: int | None = None

    def validate(self, where: str) -> None:
        _positive_int(where, "num_experts", self.num_experts)
        _positive_int(where, "expert_size", self.expert_size)
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.num_experts:
            raise _err(where, "top_k", self.top_k, f"must be an integer in [1, num_experts={self.num_experts}]")
        if self.scoring not in MOE_SCORINGS:
            raise _err(where, "scoring", self.scoring, f"allowed: {', '.join(MOE_SCORINGS)}")
        if not isinstance(self.shared_experts, int) or self.shared_experts < 0:
            raise _err(where, "shared_experts", self.shared_experts, "must be an integer >= 0")
        for name in ("router_norm", "expert_scale", "router_carry", "skip_expert", "hash_routing"):
            if not isinstance(getattr(self, name), bool):
                raise _err(where, name, getattr(self, name), "must be true or false")
        if self.swiglu_limit is not None and not (isinstance(self.swiglu_limit, (int, float)) and self.swiglu_limit > 0):
            raise _err(where, "swiglu_limit", self.swiglu_limit, "must be a positive number or None")
        if self.hash_routing:
            for name in ("bias_correction", "router_hidden", "skip_expert", "router_norm"):
                if getattr(self, name):
                    raise _err(where, name, getattr(self, name),
                               "not supported with hash_routing (the experts come from the token-id table)")
        _validate_groups(self, where)
        if self.router_hidden is not None:
            _positive_int(where, "router_hidden", self.router_hidden)
            if self.router_norm:
                raise _err(where, "router_norm", self.router_norm, "not supported together with router_hidden")
        elif self.router_carry:
            raise _err(where, "router_carry", self.router_carry, "needs router_hidden (the router state it carries)")

    @property
    def shared_width(self) -> int:
        return self.shared_experts * (self.shared_size or self.expert_size)


def _validate_groups(m: MoESpec, where: str) -> None:
    """Group-limited routing: ``n_group`` divides the experts, ``topk_group`` groups hold at least top_k experts."""
    _positive_int(where, "n_group", m.n_group)
    if m.num_experts % m.n_group:
        raise _err(where, "n_group", m.n_group, f"must divide num_experts={m.num_experts}")
    if m.topk_group is not None:
        if not isinstance(m.topk_group, int) or isinstance(m.topk_group, bool) or not 1 <= m.topk_group <= m.n_group:
            raise _err(where, "topk_group", m.topk_group, f"must be None or an integer in [1, n_group={m.n_group}]")
        if m.topk_group * (m.num_experts // m.n_group) < m.top_k:
            raise _err(where, "topk_group", m.topk_group,
                       f"{m.topk_group} groups of {m.num_experts // m.n_group} experts hold fewer than top_k={m.top_k}")
    if m.n_group > 1 and (m.skip_expert or m.hash_routing):
        raise _err(where, "n_group", m.n_group, "group-limited routing is not supported with skip_expert or hash_routing")


@dataclass
class LayerSpec:
    """One decoder layer: its attention, its K/V storage and its MLP.

    attention: the name of a record in the kinds table (kvlab/kinds): ``gqa`` (MHA, GQA, MQA), ``cca``, ``mla``,
        ``csa``, ``hca``, ``swa``. The record says which of the options below the kind reads (``Kind.options``):
        an option of another kind left away from its default is an error naming the field and its owner, and the
        kind's own checks (``Kind.validate``) run after the shared ones. ``gqa``, ``mla``, ``compress`` and ``cca``
        hold the sub-specs of GQA, MLA, CSA/HCA/SWA and CCA (kvlab/kinds/gqa.py, mla.py, compressed.py, cca.py):
        options only that kind has (GQASpec: ``qk_norm``, ``v_norm``, ``k_eq_v``, ``sink_tokens``; CCASpec:
        ``conv_kernels``), so they cannot even be written on another kind's layer. A saved config with the old flat
        fields of these options still loads (``Kind.moved``: the value moves into ``gqa`` / ``cca``).
        Which options stay flat here, and why (``Kind.options`` of each record, checked in tests/test_contract.py):
        ``window`` (gqa, cca, csa, hca, swa), ``sinks`` (gqa, cca, csa, hca, swa), ``qkv_bias`` / ``o_bias``
        (gqa, cca, mla), ``output_gate`` / ``gate_per_head`` (gqa, cca) and ``attn_scale`` (all) are read by several
        kinds. Set on a layer of a kind that does not list them, they are refused with the error above.
    window: sliding-window size in positions (a query sees itself and the ``window - 1`` before it);
        ``None`` is full causal attention. The cache of a window layer holds exactly ``window``
        positions.
    sinks: learned per-head sink logits added to the softmax denominator (gpt-oss style): a parameter, no
        cached position (not to be confused with ``GQASpec.sink_tokens``).
    output_gate: ``sigmoid`` or ``softplus`` gate on the attention output, computed from the
        attention input; ``gate_per_head`` gives one scalar per head, else one per channel.
    kv_source: index of an earlier layer whose K/V this layer reads; it computes and stores none.
    rope: ``None`` for a layer without positional rotation (NoPE).
    sandwich_norm: also normalise the attention output and the MLP output before they are added to the
        residual (Gemma 2/3/4 ``post_attention`` / ``post_feedforward`` norms).
    layer_scalar: a learned scalar multiplying the block's output residual stream (Gemma 4).
    residual_scaling: the residual adds after attention and after the MLP become
        ``(h + b_h) * s_h + (x + b_x) * s_x`` with learned per-channel vectors (ZAYA1).
    mlp ``dense+moe``: a dense MLP of ``intermediate_size`` and the MoE ``moe`` in parallel on the same
        residual, each with its own pre-norm (and post-norm with ``sandwich_norm``); their sum is the MLP
        output (Gemma 4 26B-A4B).
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int = 0
    attention: str = kinds.DEFAULT
    v_head_dim: int | None = None
    window: int | None = None
    sinks: bool = False
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
    sandwich_norm: bool = False
    layer_scalar: bool = False
    residual_scaling: bool = False
    compress: CompressSpec | None = None
    mla: MLASpec | None = None
    cca: CCASpec | None = None
    gqa: GQASpec | None = None

    def __post_init__(self) -> None:
        if isinstance(self.rope, dict):
            self.rope = RopeSpec(**self.rope)
        if isinstance(self.moe, dict):
            self.moe = MoESpec(**self.moe)
        kind = kinds.KINDS.get(self.attention) if isinstance(self.attention, str) else None
        for other in kinds.KINDS.values():  # each kind's sub-spec (gqa, mla, compress, cca...), also given as a dict
            f = other.spec_field
            if f is not None and isinstance(getattr(self, f, None), dict):
                setattr(self, f, _sub_spec(other.spec_type, getattr(self, f), f))
            if (kind is not None and f is not None and f != kind.spec_field and _all_defaults(other.spec_type)
                    and getattr(self, f) == other.spec_type()):
                setattr(self, f, None)  # switched to another kind (replace(x, attention=...)): no option was set
        if (kind is not None and kind.spec_field is not None and getattr(self, kind.spec_field, None) is None
                and _all_defaults(kind.spec_type)):
            setattr(self, kind.spec_field, kind.spec_type())  # e.g. a gqa layer without options: GQASpec()

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
        if self.attention not in kinds.KINDS:
            raise _err(where, "attention", self.attention, f"allowed kinds: {', '.join(kinds.KINDS)}")
        kind = kinds.KINDS[self.attention]  # the kind's record (kvlab/kinds): its options, checks and sharing
        for name in ("num_heads", "num_kv_heads", "head_dim"):
            _positive_int(where, name, getattr(self, name))
        if self.v_head_dim is not None:
            _positive_int(where, "v_head_dim", self.v_head_dim)
        if self.num_heads % self.num_kv_heads:
            raise _err(where, "num_kv_heads", self.num_kv_heads,
                       f"must divide num_heads={self.num_heads}")
        _check_options(self, kind, where)
        if self.window is not None:
            _positive_int(where, "window", self.window)
        if self.output_gate not in GATE_KINDS:
            raise _err(where, "output_gate", self.output_gate, "allowed: None, 'sigmoid', 'softplus'")
        if self.kv_source is not None:
            if not kind.can_share:
                raise _err(where, "kv_source", self.kv_source, f"a {self.attention} layer computes its own K/V "
                           "(no cross-layer sharing)")
            if not isinstance(self.kv_source, int) or not 0 <= self.kv_source < index:
                raise _err(where, "kv_source", self.kv_source, "a layer can only read K/V from an earlier layer")
        for name in ("sinks", "qkv_bias", "o_bias", "gate_per_head", "sandwich_norm", "layer_scalar", "residual_scaling",
                     "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                raise _err(where, name, getattr(self, name), "must be true or false")
        kind.validate(self, where)
        if self.rope is not None:
            self.rope.validate(f"{where}.rope")
            rot = int(self.head_dim * self.rope.partial)
            if self.rope.scaling == "proportional":
                rot = 2 * int(self.head_dim * self.rope.partial // 2)
                if self.head_dim % 2:
                    raise _err(where, "head_dim", self.head_dim, "proportional RoPE needs an even head_dim")
            if rot < 2 or rot % 2:
                raise _err(f"{where}.rope", "partial", self.rope.partial,
                           f"must rotate an even number >= 2 of the head_dim={self.head_dim} channels")
        if self.mlp not in MLP_KINDS:
            raise _err(where, "mlp", self.mlp, f"allowed: {', '.join(MLP_KINDS)}")
        if self.activation not in ACTIVATIONS:
            raise _err(where, "activation", self.activation, f"allowed: {', '.join(ACTIVATIONS)}")
        if self.mlp in ("dense", "dense+moe"):
            _positive_int(where, "intermediate_size", self.intermediate_size)
        if self.mlp != "dense":
            if self.moe is None:
                raise _err(where, "moe", None, f"required when mlp={self.mlp!r}")
            self.moe.validate(f"{where}.moe")


@dataclass
class ModelConfig:
    """A decoder-only language model described layer by layer.

    norm_offset: RMSNorm weights stored as ``w`` and applied as ``1 + w`` (Gemma style).
    embed_scale: multiplies the token embeddings (Gemma: sqrt(hidden)); ``None`` for none.
    final_logit_softcap: ``cap * tanh(logits / cap)`` on the output logits; ``None`` for none.
    ple_dim: per-layer embeddings (PLE, Gemma 3n/4): every layer gets a ``ple_dim`` slice of a token table
        of ``ple_vocab_size`` rows (default ``vocab_size``) and of a projection of the main embedding,
        gated into the residual after the MLP (see kvlab/layers/ple.py); ``None`` for none.
    embed_affine: the token embeddings become ``(e + b) * s`` with learned per-channel ``b``, ``s`` (ZAYA1).
    residual_fp32: the residual stream between blocks is kept in fp32 whatever the weights' dtype; each
        norm reads it cast to the weights' dtype (ZAYA1's ``residual_in_fp32``).
    mhc_streams: manifold-constrained hyper-connections (DeepSeek V4, kvlab/layers/mhc.py): the residual stream
        is widened into this many streams mixed by Sinkhorn-projected doubly stochastic maps around every
        attention and MLP; ``mhc_sinkhorn_iters`` iterations with floor ``mhc_eps``; ``None`` for a plain residual.
    source: where the numbers come from (a preset cites its model card or config).
    family: the transformers architecture it was read from and is written back as (``kvlab.families``);
        ``None``: the first family that writes its shape exactly.
    dtype: the dtype the weights are held in (``bfloat16``, ``float16``, ``float32``, ``float64``): a checkpoint's
        ``config.json`` ``dtype``/``torch_dtype``, kept up to date by a Model holding this config (after ``.to()``
        too); what ``kvlab.costs(config, ...)`` prices unless told otherwise. ``None``: not known (priced as
        bf16). Not part of the shape: configs that differ only in ``dtype`` compare equal.
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
    ple_dim: int | None = None
    ple_vocab_size: int | None = None
    embed_affine: bool = False
    residual_fp32: bool = False
    mhc_streams: int | None = None
    mhc_sinkhorn_iters: int = 20
    mhc_eps: float = 1e-6
    name: str = "custom"
    source: str = ""
    family: str | None = None
    dtype: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        self.layers = [_as_layer(x, i) for i, x in enumerate(self.layers)]
        self.validate()

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def ple_rows(self) -> int:
        """Rows of the PLE token table (0 without PLE)."""
        return 0 if self.ple_dim is None else (self.ple_vocab_size or self.vocab_size)

    def validate(self) -> None:
        check_fields(self)  # every field's type and range (kvlab/validate.py), named by its path
        for name in ("vocab_size", "hidden_size", "max_positions"):
            _positive_int("", name, getattr(self, name))
        if not self.layers:
            raise _err("", "layers", [], "a model needs at least one layer")
        if not (isinstance(self.norm_eps, (int, float)) and 0 < self.norm_eps < 1):
            raise _err("", "norm_eps", self.norm_eps, "must be in (0, 1)")
        if self.final_logit_softcap is not None and not self.final_logit_softcap > 0:
            raise _err("", "final_logit_softcap", self.final_logit_softcap, "must be > 0 or None")
        if self.family is not None and not isinstance(self.family, str):
            raise _err("", "family", self.family, "an architecture name such as 'LlamaForCausalLM', or None")
        if self.dtype is not None and self.dtype not in WEIGHT_DTYPES:
            raise _err("", "dtype", self.dtype, f"one of {', '.join(WEIGHT_DTYPES)}, or None")
        if self.ple_dim is not None:
            _positive_int("", "ple_dim", self.ple_dim)
        if self.ple_vocab_size is not None:
            if self.ple_dim is None:
                raise _err("", "ple_vocab_size", self.ple_vocab_size, "only meaningful with ple_dim set")
            _positive_int("", "ple_vocab_size", self.ple_vocab_size)
        if self.mhc_streams is not None:
            _positive_int("", "mhc_streams", self.mhc_streams)
            _positive_int("", "mhc_sinkhorn_iters", self.mhc_sinkhorn_iters)
            if not (isinstance(self.mhc_eps, (int, float)) and 0 <= self.mhc_eps < 1):
                raise _err("", "mhc_eps", self.mhc_eps, "must be in [0, 1)")
            if self.ple_dim is not None:
                raise _err("", "mhc_streams", self.mhc_streams, "not supported together with ple_dim")
            bad = [i for i, x in enumerate(self.layers) if getattr(x, "residual_scaling", False)]
            if bad:
                raise _err("", "mhc_streams", self.mhc_streams,
                           f"not supported together with residual_scaling (layers {bad})")
        for name in ("embed_affine", "residual_fp32"):
            if not isinstance(getattr(self, name), bool):
                raise _err("", name, getattr(self, name), "must be true or false")
        for i, layer in enumerate(self.layers):
            layer.validate(f"layers[{i}]", i)
            if layer.mlp != "dense" and layer.moe.router_carry:
                prev = self.layers[i - 1] if i else None
                width = prev.moe.router_hidden if prev is not None and prev.mlp != "dense" else None
                if width != layer.moe.router_hidden:
                    raise _err(f"layers[{i}].moe", "router_carry", True,
                               f"needs the previous layer to have an MoE router of the same router_hidden="
                               f"{layer.moe.router_hidden} (it has {width})")
            if layer.kv_source is not None:
                src = self.layers[layer.kv_source]
                if src.kv_source is not None:
                    raise _err(f"layers[{i}]", "kv_source", layer.kv_source,
                               f"layers[{layer.kv_source}] reads its K/V from layers[{src.kv_source}]; "
                               "name the producing layer")
                for f in LAYOUT:
                    if layout(src, f) != layout(layer, f):
                        raise _err(f"layers[{i}]", "kv_source", layer.kv_source,
                                   f"layers[{i}].{f}={layout(layer, f)!r} differs from "
                                   f"layers[{layer.kv_source}].{f}={layout(src, f)!r}; "
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
        d["layers"] = [_as_layer(x, i) for i, x in enumerate(d.get("layers", []))]
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


# what a layer reading another layer's K/V (``kv_source``) must have in common with it (also kvlab/sharing.py)
LAYOUT = ("attention", "num_kv_heads", "head_dim", "value_dim", "window", "gqa.sink_tokens")


def layout(layer: LayerSpec, name: str) -> Any:
    """Field ``name`` of :data:`LAYOUT` on ``layer`` (``gqa.sink_tokens``: 0 on a layer of another kind)."""
    return kinds.gqa.sink_tokens(layer) if name == "gqa.sink_tokens" else getattr(layer, name)


def _check_options(layer: LayerSpec, kind: kinds.Kind, where: str) -> None:
    """A field that belongs to other kinds (kvlab/kinds) must keep its default on a layer of ``kind``."""
    for name in sorted(kinds.kind_options() - kind.options):
        value, default = getattr(layer, name), _DEFAULTS[name]
        if value != default:
            raise _err(where, name, value, f"not supported by {kind.name} (an option of "
                       f"{', '.join(kinds.owners(name))}); leave it at {default!r}")


def _sub_spec(cls: type, d: dict[str, Any], name: str) -> Any:
    """``cls(**d)``; a ValueError naming the field and what is allowed when ``d`` has a key ``cls`` does not."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{name}: unknown {cls.__name__} field(s) {unknown}; allowed: {sorted(known)}")
    return cls(**d)


def _all_defaults(cls: type) -> bool:
    """Whether ``cls()`` can be built: every field of the dataclass has a default."""
    return all(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
               for f in dataclasses.fields(cls))


def _moved_fields(x: dict[str, Any], where: str) -> None:
    """Older kvlab versions saved some kind options as flat LayerSpec fields (``conv_kernels``): move each into its
    kind's sub-spec (``Kind.moved``), in place. On a layer of another kind the field must hold its old default."""
    attention = x.get("attention", _DEFAULTS["attention"])
    for kind in kinds.KINDS.values():
        for name, spec_field in kind.moved.items():
            if name not in x:
                continue
            value = x.pop(name)
            value = _listless(value)
            default = next(f.default for f in dataclasses.fields(kind.spec_type) if f.name == name)
            if attention == kind.name:
                sub = x.get(spec_field)
                sub = dict(sub) if isinstance(sub, dict) else dataclasses.asdict(sub) if sub is not None else {}
                if name in sub and _listless(sub[name]) != value:
                    raise _err(where, name, value, f"differs from {spec_field}.{name}={sub[name]!r}; give it once, "
                               f"in {spec_field}")
                x[spec_field] = {name: value, **sub}
            elif value != default:
                raise _err(where, name, value, f"not supported by {attention} (an option of {kind.name}); "
                           f"leave it at {default!r}")


def _listless(value: Any) -> Any:
    """A JSON list as the tuple the dataclass holds; any other value as is."""
    return tuple(value) if isinstance(value, list) else value


def _as_layer(x: LayerSpec | dict[str, Any], index: int = 0) -> LayerSpec:
    if isinstance(x, LayerSpec):
        return x
    if not isinstance(x, dict):
        raise TypeError(f"layers entries must be LayerSpec or dict, got {type(x).__name__}")
    x = dict(x)
    _moved_fields(x, f"layers[{index}]")
    known = {f.name for f in dataclasses.fields(LayerSpec)}
    unknown = sorted(set(x) - known)
    if unknown:
        raise ValueError(f"unknown LayerSpec field(s) {unknown}; allowed: {sorted(known)}")
    return LayerSpec(**x)


_DEFAULTS: dict[str, Any] = {
    f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    for f in dataclasses.fields(LayerSpec)
    if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}


def uniform_layers(n: int, **kw: Any) -> list[LayerSpec]:
    """``n`` identical layers (each a fresh object)."""
    return [LayerSpec(**{k: (dataclasses.replace(v) if dataclasses.is_dataclass(v) else v) for k, v in kw.items()})
            for _ in range(n)]
