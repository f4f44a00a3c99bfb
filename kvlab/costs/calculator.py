"""The calculator: parameters, KV-cache bytes, bytes read per decode step and FLOPs, per layer and in total.

It reads the same :class:`~kvlab.config.ModelConfig` the modules and the cache read, so its
``kv_cache_bytes`` equals ``model.new_cache(batch_size, max_length=context).nbytes()`` byte for byte and
``params_total`` equals the number of parameters of the built model. Each attention kind is priced by the
``price`` of its record in the kinds table (kvlab/kinds/<kind>.py); the MLP, block extras and mHC by the
modules beside this one. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from kvlab import kinds
from kvlab.config import ModelConfig
from kvlab.kinds import AttnCost

from .block import block_extra
from .dtypes import DTYPE_BYTES, dtype_bytes, kv_dtype_for, model_dtype
from .mhc import assumption as mhc_assumption
from .mhc import mhc_cost
from .mlp import mlp_cost
from .quant import (
    buffer_bytes,
    bytes_per_token,
    check_layers,
    for_buffer,
    for_layer,
    layer_buffers,
    quant_name,
    quantized_price,
    resolve_kv_quant,
)


@dataclass
class LayerCosts:
    """One layer's share. Bytes/FLOPs conventions as in :class:`Costs`."""

    index: int
    kind: str
    mlp: str
    heads: int
    kv_heads: int
    head_dim: int
    v_head_dim: int
    window: int | None
    kv_source: int | None
    params: int
    params_active: int
    kv_bytes: int
    kv_bytes_per_token: int
    kv_read_bytes: int
    attn_flops_per_token: int
    prefill_attn_flops: int
    kv_state_bytes: int = 0  # the constant per-sequence part of kv_bytes (e.g. CCA's conv tail), whole batch
    kv_components: dict[str, int] = field(default_factory=dict)  # kv_bytes by named part (csa / hca / mla layers)
    attn_flop_components: dict[str, int] = field(default_factory=dict)  # attn_flops_per_token by named part
    attention: str = ""  # the layer's kind: LayerSpec.attention, a name of the kinds table (kvlab/kinds)


@dataclass
class Costs:
    """Sizes, traffic and FLOPs of a model at one context length.

    Bytes stored/read cover the whole ``batch``; ``*_per_token`` figures are per token of one sequence;
    ``prefill_flops`` covers ``batch`` sequences of ``context`` tokens. ``assumptions`` says what each assumes.
    """

    name: str
    context: int
    batch: int
    dtype: str
    kv_dtype: str
    params_total: int
    params_embedding: int
    params_lm_head: int
    params_active: int
    params_active_non_embedding: int
    kv_cache_bytes: int
    kv_bytes_per_token: int
    kv_bytes_per_token_window: int
    kv_read_bytes_per_step: int
    weight_read_bytes_per_step: int
    flops_per_token: int
    attn_flops_per_token: int
    other_flops_per_token: int
    prefill_flops: int
    prefill_attn_flops: int
    per_layer: list[LayerCosts] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)
    params_ple_table: int = 0  # per-layer embedding table (a lookup); included in params_total
    params_ple: int = 0  # all PLE parameters: table, projection, norms, per-layer gates and projections
    kv_cache_bytes_no_sharing: int = 0  # kv_cache_bytes with every layer storing its own K/V
    kv_state_bytes: int = 0  # the part of kv_cache_bytes that does not grow with context (recurrent state)
    kv_quant: str = "none"  # the quantized K/V format (kvlab/costs/quant.py), "none": every value in kv_dtype
    params_mhc: int = 0  # hyper-connection maps (mhc_streams): included in params_total and params_active
    mhc_flops_per_token: int = 0  # their projections, stream mixing and Sinkhorn; included in flops_per_token
    kv_components: dict[str, int] = field(default_factory=dict)  # kv_cache_bytes by named part, summed over layers
    attn_flops_components: dict[str, int] = field(default_factory=dict)  # attn_flops_per_token by named part
    weights_bytes: int = 0  # params_total in dtype (mHC maps in fp32): what the weights hold in memory
    resident_bytes: int = 0  # weights_bytes + kv_cache_bytes (K/V and constant state): held between steps

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (per_layer as a list of dicts)."""
        return dataclasses.asdict(self)


def resolve_config(model: Any) -> ModelConfig:
    """A ModelConfig from a ModelConfig, a preset name, a checkpoint directory or an object with ``.config``
    (kvlab/resolve.py)."""
    if isinstance(model, ModelConfig):
        return model
    # not at the top: `import kvlab` imports this module, and the presets and families it would pull in load only
    # when a name is priced
    from kvlab import resolve

    return resolve.resolve_config(model)


def _kind(layer: Any) -> str:
    return f"shared<-{layer.kv_source}" if layer.kv_source is not None else kinds.layer_label(layer)


def _mlp_label(layer: Any) -> str:
    if layer.mlp == "dense":
        return f"dense {layer.intermediate_size}"
    moe = layer.moe
    assert moe is not None
    shared = f" +{moe.shared_experts} shared" if moe.shared_experts else ""
    return f"moe {moe.top_k}/{moe.num_experts}x{moe.expert_size}{shared}" + (" hash" if moe.hash_routing else "")


def costs(model: Any, context: int, dtype: Any = None, batch: int = 1, kv_dtype: Any = None,
          kv_quant: Any = None) -> Costs:
    """Price ``model`` (ModelConfig, preset name, checkpoint dir or Model) at ``context`` tokens.

    ``context`` is the cache length (a preallocated cache's ``max_length``) and the decode position;
    ``dtype`` prices weights: default the dtype a loaded Model holds them in, else the config's ``dtype`` (a
    checkpoint's stored dtype; a Model keeps its config's up to date, so ``costs(model.config, n).kv_cache_bytes
    == model.new_cache(1, n).nbytes()`` for an fp32 model too), else bf16. ``kv_dtype`` (default ``dtype``; bf16
    when the weights are 8-bit) prices the K/V cache (and, with ``kv_quant``, its
    full-precision parts: residual window, exact rotary channels, constant state). ``kv_quant``: a quantized cache
    (``"int8"``, ``"int4-g32-r64"``, ``"deepseek-v4"``, a QuantSpec or a mapping; kvlab/costs/quant.py): codes,
    scales, zero points, residual and group padding priced per component, as ``Cache(kv_quant=...)`` holds them.
    """
    cfg = resolve_config(model)
    for nm, v in (("context", context), ("batch", batch)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{nm}={v!r}: must be a positive integer")
    if dtype is None:
        dtype = model_dtype(model) or cfg.dtype or "bfloat16"
    w_name, w_elt = dtype_bytes(dtype)
    kv_name, kv_elt = kv_dtype_for(dtype, kv_dtype)
    hidden, vocab = cfg.hidden_size, cfg.vocab_size
    quant = resolve_kv_quant(kv_quant)
    if quant:
        check_layers(cfg, quant, context)

    def price(layer: Any, where: str, index: int) -> Any:
        a = kinds.get(layer.attention).price(layer, hidden, context, batch, kv_elt)  # kvlab/kinds/<kind>.py
        q = for_layer(quant, index)  # the layer's own components (a reader: its producer's)
        return quantized(a, layer, context, batch, kv_elt, q, where) if q else a

    per_layer: list[LayerCosts] = []
    matmul_active = read_params = kv_unshared = 0
    for i, layer in enumerate(cfg.layers):
        a = price(layer, f"layers[{i}]", i if layer.kv_source is None else layer.kv_source)
        m = mlp_cost(layer, hidden, batch)
        norms, block_mats = block_extra(layer, hidden, cfg.ple_dim)
        if layer.kv_source is not None:  # what the layer would store without sharing
            kv_unshared += price(dataclasses.replace(layer, kv_source=None), f"layers[{i}]", i).kv_bytes
        else:
            kv_unshared += a.kv_bytes
        matmul_active += a.matmul_params + m.matmul + block_mats
        read_params += a.params + m.read + norms
        per_layer.append(LayerCosts(
            index=i, kind=_kind(layer), mlp=_mlp_label(layer), heads=layer.num_heads,
            kv_heads=layer.num_kv_heads, head_dim=layer.head_dim, v_head_dim=layer.value_dim,
            window=layer.window, kv_source=layer.kv_source, params=a.params + m.params + norms,
            params_active=a.params + m.active + norms, kv_bytes=a.kv_bytes, kv_bytes_per_token=a.kv_bytes_per_token,
            kv_read_bytes=a.kv_read_bytes, attn_flops_per_token=a.flops_per_token,
            prefill_attn_flops=batch * a.prefill_flops, kv_state_bytes=a.state_bytes, kv_components=a.components,
            attn_flop_components=a.flop_components, attention=layer.attention))

    embed = vocab * hidden
    lm_head = 0 if cfg.tie_embeddings else vocab * hidden
    # PLE: the packed token table is a lookup (one row per token: memory, not compute); the projection
    # of the main embedding into the per-layer space and its norm are compute
    ple_cols = cfg.num_layers * cfg.ple_dim if cfg.ple_dim else 0
    ple_table = cfg.ple_rows * ple_cols
    ple_model = hidden * ple_cols + (cfg.ple_dim or 0)
    outside = embed + lm_head + hidden + ple_table + ple_model  # embedding, untied head, final norm, PLE
    outside += 2 * hidden if cfg.embed_affine else 0  # embedding scale and bias
    params_total = outside + sum(x.params for x in per_layer)
    params_active = outside + sum(x.params_active for x in per_layer)
    matmul_active += vocab * hidden + hidden * ple_cols  # the lm head, tied or not; the PLE projection
    read_params += min(batch, vocab) * hidden + vocab * hidden + hidden  # embedding rows, head, final norm
    read_params += min(batch, cfg.ple_rows) * ple_cols + ple_model  # PLE: one table row per sequence

    mhc = {"params": 0, "matmul_params": 0, "flops_per_token": 0, "mixing_flops_per_token": 0}
    if cfg.mhc_streams is not None:
        mhc = mhc_cost(cfg.mhc_streams, hidden, cfg.num_layers, cfg.mhc_sinkhorn_iters)
        params_total += mhc["params"]
        params_active += mhc["params"]
        matmul_active += mhc["matmul_params"]
        read_params += -(-mhc["params"] * 4 // w_elt)  # held in fp32: 4 B each, priced at w_elt below
    attn_tok = sum(x.attn_flops_per_token for x in per_layer)
    other_tok = 2 * matmul_active + mhc["mixing_flops_per_token"]
    prefill_attn = sum(x.prefill_attn_flops for x in per_layer)
    full = [x for x in per_layer if x.window is None]
    assumptions = [
        f"weights in {w_name} ({w_elt} B/param), K/V cache in {kv_name} ({kv_elt} B/element); batch {batch}"
        + ("; 8-bit weights compute and cache in bf16 unless a K/V dtype is given" if kv_dtype is None and w_elt == 1
           else ""),
        *([QUANT_ASSUMPTION.format(name=quant_name(quant), kv=kv_name)] if quant else []),
        ("kv_bytes_per_token: per position of one sequence over full-attention layers; "
         "kv_bytes_per_token_window: the same over window layers (held only up to the window)"),
        ("kv_read_bytes_per_step: one decode step of the batch at position context reads min(context, window) "
         "entries per layer; shared layers read their producer's entries again"),
        ("weight_read_bytes_per_step: every active parameter once per step, one embedding row per sequence, the "
         "full lm head (the embedding table when tied); MoE: min(num_experts, batch*top_k) distinct experts"),
        ("flops_per_token: 2 x active matmul params (no embedding lookup, lm head included) + attention "
         "2 x heads x (head_dim + v_head_dim) x min(context, window); norms, activations, softmax and RoPE ignored"),
        ("prefill_flops: batch x (2 x active matmul params x context + causal attention sum_i min(i, window)); "
         "logits computed for every position; no FlashAttention-style masking savings beyond causality"),
        ("params_active: everything a token touches: dense params, router, shared experts and top_k routed experts, "
         "embedding and lm head included (params_active_non_embedding excludes them)"),
    ]
    if cfg.ple_dim:
        assumptions.append(
            f"per-layer embeddings: params_ple_table = {cfg.ple_rows:,} rows x {cfg.num_layers} layers x {cfg.ple_dim} "
            "is a lookup (one row read per sequence per step, no FLOPs), counted in params_total and params_active "
            "like the embedding and excluded from params_active_non_embedding; the PLE projection and the "
            "per-layer gates are matmuls")
    # each attention kind of the model says what its figures assume (its record, kvlab/kinds)
    assumptions += list(dict.fromkeys(kinds.get(x.attention).assumption for x in cfg.layers))
    if cfg.mhc_streams is not None:
        assumptions.append(mhc_assumption(cfg.mhc_streams))
    if any(x.kv_source is not None for x in cfg.layers):
        assumptions.append(
            "kv_cache_bytes_no_sharing: the same model with every layer storing its own K/V (same head dims and "
            "window caps); the difference is what cross-layer KV sharing saves")
    if context > cfg.max_positions:
        assumptions.append(f"context {context} exceeds the model's max_positions {cfg.max_positions}")
    weights = params_total * w_elt + mhc["params"] * max(0, 4 - w_elt)  # mHC maps held in fp32
    kv_total = sum(x.kv_bytes for x in per_layer)
    return Costs(
        name=cfg.name, context=context, batch=batch, dtype=w_name, kv_dtype=kv_name, kv_quant=quant_name(quant),
        params_total=params_total, params_embedding=embed, params_lm_head=lm_head, params_active=params_active,
        params_active_non_embedding=params_active - embed - lm_head - ple_table,
        kv_cache_bytes=kv_total, weights_bytes=weights, resident_bytes=weights + kv_total,
        kv_bytes_per_token=sum(x.kv_bytes_per_token for x in full),
        kv_bytes_per_token_window=sum(x.kv_bytes_per_token for x in per_layer if x.window is not None),
        kv_read_bytes_per_step=sum(x.kv_read_bytes for x in per_layer),
        weight_read_bytes_per_step=read_params * w_elt,
        flops_per_token=attn_tok + other_tok, attn_flops_per_token=attn_tok, other_flops_per_token=other_tok,
        prefill_flops=batch * other_tok * context + prefill_attn, prefill_attn_flops=prefill_attn,
        per_layer=per_layer, assumptions=assumptions, params_ple_table=ple_table,
        params_ple=ple_table + ple_model + sum(block_extra(x, hidden, cfg.ple_dim)[1] + (hidden if cfg.ple_dim else 0)
                                               for x in cfg.layers),
        kv_cache_bytes_no_sharing=kv_unshared, kv_state_bytes=sum(x.kv_state_bytes for x in per_layer),
        params_mhc=mhc["params"], mhc_flops_per_token=mhc["flops_per_token"],
        kv_components=_summed(x.kv_components for x in per_layer),
        attn_flops_components=_summed(x.attn_flop_components for x in per_layer),
    )


QUANT_ASSUMPTION = (
    "K/V quantized as {name}: per buffer codes (int4 / fp4 two per byte) + scales (+ zero points) per group + a "
    "{kv} residual of the last R positions (and, keys per channel, the incomplete group) + {kv} rotary channels "
    "(rope) + group padding; constant state (conv tail, partial blocks) stays {kv}; kv_bytes_per_token and "
    "kv_read_bytes_per_step scale by the buffers' quantized / unquantized bytes; shared layers read the "
    "producer's quantized entries")


def quantized(a: AttnCost, layer: Any, context: int, batch: int, elt: int, quant: dict, where: str) -> AttnCost:
    """The kind's price ``a`` with its per-position buffers quantized per ``quant`` (kvlab/costs/quant.py)."""
    bufs = layer_buffers(layer, context, where)
    delta, total = quantized_price(bufs, quant, batch, elt, where)
    plain = sum(buffer_bytes(None, b, batch, elt) for b in bufs)
    grow = [b for b in bufs if b.ring is None] or bufs
    tp = sum((bytes_per_token(None, b, elt) for b in grow), Fraction(0))
    tq = sum((bytes_per_token(for_buffer(quant, b.name), b, elt) for b in grow), Fraction(0))
    ratio = Fraction(plain + total, plain) if plain else Fraction(1)
    comps = {k: v + delta.get(k, 0) for k, v in a.components.items()}
    return dataclasses.replace(
        a, kv_bytes=a.kv_bytes + total if layer.stores_kv else a.kv_bytes, components=comps,
        kv_bytes_per_token=math.floor(a.kv_bytes_per_token * tq / tp) if tp else a.kv_bytes_per_token,
        kv_read_bytes=a.state_bytes + math.floor((a.kv_read_bytes - a.state_bytes) * ratio))


def _summed(parts: Any) -> dict[str, int]:
    """Named parts summed over the layers (insertion order of first appearance)."""
    out: dict[str, int] = {}
    for p in parts:
        for k, v in p.items():
            out[k] = out.get(k, 0) + v
    return out


def kv_sharing_report(model: Any, context: int, dtype: Any = None, batch: int = 1,
                      kv_dtype: Any = None) -> dict[str, Any]:
    """What cross-layer KV sharing saves, under each assumption a published figure may use.

    ``rows[0]`` is the cache as kvlab stores it (real head dims, window layers capped at their window),
    with and without sharing. The other rows are the simplified estimate behind figures such as
    "Gemma 4 E2B saves about 2.7 GB at 128K": every layer treated as full attention (no window cap) with
    one head_dim — that of layer 0, and hidden/heads where it differs. The saved fraction (shared layers /
    layers) is the same under every assumption only when the layers have one layout.
    """
    cfg = resolve_config(model)
    c = costs(model, context=context, dtype=dtype, batch=batch, kv_dtype=kv_dtype)
    kv_elt = DTYPE_BYTES[c.kv_dtype]
    shared = [i for i, x in enumerate(cfg.layers) if x.kv_source is not None]

    def row(assumption: str, without: int, with_: int, head_dim: int | None) -> dict[str, Any]:
        return {"assumption": assumption, "head_dim": head_dim, "without_sharing": without, "with_sharing": with_,
                "saved": without - with_, "saved_fraction": (without - with_) / without if without else 0.0}

    rows = [row("as kvlab stores it: real head dims, window layers hold min(window, context) positions",
                c.kv_cache_bytes_no_sharing, c.kv_cache_bytes, None)]
    first = cfg.layers[0]
    dims = [(first.head_dim, f"layer 0's head_dim {first.head_dim}")]
    per_head = cfg.hidden_size // first.num_heads
    if per_head != first.head_dim:
        dims.append((per_head, f"hidden/heads = {cfg.hidden_size}/{first.num_heads} = {per_head}"))
    for hd, label in dims:
        per_layer = [batch * x.num_kv_heads * 2 * hd * kv_elt * context for x in cfg.layers]
        rows.append(row(f"simplified: every layer full attention (no window cap), one head_dim: {label}",
                        sum(per_layer), sum(b for b, x in zip(per_layer, cfg.layers) if x.kv_source is None), hd))
    return {"name": cfg.name, "context": context, "batch": batch, "kv_dtype": c.kv_dtype,
            "num_layers": cfg.num_layers, "shared_layers": shared,
            "sources": {i: cfg.layers[i].kv_source for i in shared}, "rows": rows}
