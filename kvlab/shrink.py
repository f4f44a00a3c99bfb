"""One config shrinker: a ModelConfig at a smaller size with every sub-spec shrunk consistently.

:func:`shrink` serves the trainer (``[model] preset = ...`` plus sizes), :func:`tiny` the demo and the
tests (every preset at a few hundred thousand parameters), :func:`scale_to_fit` the benchmark (a preset
whose weights fit a byte budget, its attention and KV cache kept). Each size applies to every layer and to
each sub-spec that holds it: MoE (experts, top-k, expert groups, shared experts), MLA (latent, rotary and
value dims, indexer), CSA/HCA compression (query and output low ranks, output groups, indexer), PLE.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

from kvlab.config import CompressSpec, LayerSpec, ModelConfig, MoESpec
from kvlab.costs import costs
from kvlab.units import fmt_bytes

FIELDS = {
    "hidden_size": "model width (an embed_scale keeps its ratio to sqrt(hidden): Gemma's sqrt(hidden) follows)",
    "num_layers": "keep the first n layers (their pattern of kinds, windows and K/V sources)",
    "num_heads": "query heads of every layer (KV heads keep the layer's ratio unless num_kv_heads is given)",
    "num_kv_heads": "KV heads of every layer (MLA and CSA/HCA layers keep their one shared K/V head)",
    "max_kv_heads": "at most this many KV heads per layer; query heads keep their number per KV head",
    "max_heads": "at most this many query heads per layer (KV heads shrink to keep dividing them)",
    "head_dim": "head dim of every layer (v_head_dim follows; MLA: non-rotary, rotary and value dims head_dim/2; "
                "sparse-attention indexers head_dim/2)",
    "intermediate_size": "dense MLP width of every layer that has one",
    "mlp_factor": "multiply every dense MLP, expert and shared-expert width by this (at least 16)",
    "window": "window size of every sliding-window layer",
    "num_experts": "experts of every MoE layer (top_k and expert groups capped to fit)",
    "max_top_k": "at most this many experts per token in every MoE layer",
    "expert_size": "expert width of every MoE layer (a shared expert's width follows)",
    "router_hidden": "width of every MLP router (ZAYA1's router_hidden)",
    "latent": "low ranks: MLA kv_lora_rank and q_lora_rank, CSA/HCA q_lora_rank and o_lora_rank",
    "index_heads": "heads of every sparse-attention indexer (DeepSeek V3.2 MLA, V4 CSA)",
    "index_topk": "entries each query selects in every sparse-attention indexer",
    "ple_dim": "per-layer-embedding width (models with PLE)",
    "vocab_size": "vocabulary size (a PLE table's rows are capped to it)",
    "max_positions": "max positions",
}

TINY: dict[str, Any] = {"hidden_size": 32, "max_kv_heads": 2, "max_heads": 16, "head_dim": 16, "intermediate_size": 32,
                        "window": 8, "num_experts": 4, "max_top_k": 2,
                        "expert_size": 16, "router_hidden": 16, "latent": 16,
                        "index_heads": 2, "index_topk": 8, "ple_dim": 8, "vocab_size": 97, "max_positions": 512}
MIN_WIDTH = 16  # mlp_factor never takes an MLP below this


def shrink(cfg: ModelConfig, name: str | None = None, **sizes: Any) -> ModelConfig:
    """``cfg`` with the sizes in ``sizes`` (keys of :data:`FIELDS`) applied; validated, a new object.

    ``name`` defaults to ``"<cfg.name> (scaled)"``. ValueError names an unknown or non-positive size and,
    through the config's validation, a combination the result cannot hold.
    """
    unknown = sorted(set(sizes) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown size(s) {unknown}; allowed: {sorted(FIELDS)}")
    for k, v in sizes.items():
        ok = isinstance(v, (int, float)) and v > 0 if k == "mlp_factor" else isinstance(v, int) and v >= 1
        if not ok or isinstance(v, bool):
            raise ValueError(f"{k}={v!r}: must be a positive {'number' if k == 'mlp_factor' else 'integer'}")
    cfg = copy.deepcopy(cfg)  # the result shares no sub-spec with ``cfg``
    layers = cfg.layers
    if "num_layers" in sizes:
        if sizes["num_layers"] > len(layers):
            raise ValueError(f"num_layers={sizes['num_layers']}: must be in [1, {len(layers)}] for {cfg.name}")
        layers = layers[:sizes["num_layers"]]
    top: dict[str, Any] = {"layers": [_layer(x, sizes) for x in layers], "name": name or f"{cfg.name} (scaled)"}
    if "hidden_size" in sizes:
        top["hidden_size"] = sizes["hidden_size"]
        if cfg.embed_scale is not None:
            ratio = cfg.embed_scale / math.sqrt(cfg.hidden_size)  # exactly 1.0 for Gemma's sqrt(hidden)
            top["embed_scale"] = math.sqrt(sizes["hidden_size"]) * ratio
    if "vocab_size" in sizes:
        top["vocab_size"] = sizes["vocab_size"]
        if cfg.ple_vocab_size is not None:
            top["ple_vocab_size"] = min(cfg.ple_vocab_size, sizes["vocab_size"])
    if "ple_dim" in sizes and cfg.ple_dim is not None:
        top["ple_dim"] = sizes["ple_dim"]
    if "max_positions" in sizes:
        top["max_positions"] = sizes["max_positions"]
    return dataclasses.replace(cfg, **top)


def tiny(cfg: ModelConfig, name: str | None = None) -> ModelConfig:
    """``cfg``'s layer pattern (kinds, windows, sharing, heads per KV head) at :data:`TINY` sizes."""
    return shrink(cfg, name=name or f"{cfg.name} (tiny)", **TINY)


def _width(n: int, s: dict[str, Any]) -> int:
    return max(MIN_WIDTH, int(n * s["mlp_factor"])) if "mlp_factor" in s else n


def _layer(x: LayerSpec, s: dict[str, Any]) -> LayerSpec:
    one_kv = x.mla is not None or x.compress is not None  # kinds with one shared K/V head
    h, kv = x.num_heads, x.num_kv_heads
    if "max_kv_heads" in s and kv > s["max_kv_heads"]:
        h, kv = h // kv * s["max_kv_heads"], s["max_kv_heads"]
    if "max_heads" in s and h > s["max_heads"]:
        h, kv = s["max_heads"], min(kv, s["max_heads"])
        while h % kv:
            kv -= 1
    if "num_heads" in s:
        if "num_kv_heads" not in s and not one_kv:
            kv = max(1, s["num_heads"] * kv // h)
            while s["num_heads"] % kv:
                kv -= 1
        h = s["num_heads"]
    if "num_kv_heads" in s and not one_kv:
        kv = s["num_kv_heads"]
    kw: dict[str, Any] = {"num_heads": h, "num_kv_heads": kv}
    if "head_dim" in s:
        kw["head_dim"] = s["head_dim"]
        if x.v_head_dim is not None:
            kw["v_head_dim"] = s["head_dim"]
    if x.intermediate_size:
        kw["intermediate_size"] = _width(s.get("intermediate_size", x.intermediate_size), s)
    if "window" in s and x.window is not None:
        kw["window"] = s["window"]
    if x.moe is not None:
        kw["moe"] = _moe(x.moe, s)
    if x.compress is not None:
        kw["compress"] = _compress(x.compress, h * kw.get("head_dim", x.head_dim), x, s)
    x = dataclasses.replace(x, **kw)
    return _mla(x, s) if x.mla is not None else x


def _moe(m: MoESpec, s: dict[str, Any]) -> MoESpec:
    e = s.get("num_experts", m.num_experts)
    size = s.get("expert_size", m.expert_size)
    top_k = min(m.top_k, e, s.get("max_top_k", e))
    n_group = max(g for g in range(1, min(m.n_group, e) + 1) if e % g == 0)
    topk_group = None if m.topk_group is None else max(min(m.topk_group, n_group), math.ceil(top_k / (e // n_group)))
    router = s.get("router_hidden", m.router_hidden) if m.router_hidden else None
    return dataclasses.replace(m, num_experts=e, top_k=top_k, router_hidden=router, n_group=n_group, topk_group=topk_group,
                               expert_size=_width(size, s),
                               shared_size=_width(size if "expert_size" in s else m.shared_size, s)
                               if m.shared_size else None)


def _index_head_dim(s: dict[str, Any], rotary: int, old: int) -> int:
    return max(s["head_dim"] // 2, rotary) if "head_dim" in s else old


def _mla(x: LayerSpec, s: dict[str, Any]) -> LayerSpec:
    m = x.mla
    assert m is not None
    kw: dict[str, Any] = {}
    if "head_dim" in s:
        half = s["head_dim"] // 2
        kw.update(qk_nope_head_dim=half, qk_rope_head_dim=half, v_head_dim=half)
    if "latent" in s:
        kw.update(kv_lora_rank=s["latent"], q_lora_rank=s["latent"] if m.q_lora_rank else None)
    if m.sparse:
        kw["index_heads"] = s.get("index_heads", m.index_heads)
        kw["index_topk"] = s.get("index_topk", m.index_topk)
        kw["index_head_dim"] = _index_head_dim(s, kw.get("qk_rope_head_dim", m.qk_rope_head_dim), m.index_head_dim)
    m = dataclasses.replace(m, **kw)
    rope = dataclasses.replace(x.rope, partial=m.rope_partial) if x.rope is not None else None
    return dataclasses.replace(x, mla=m, head_dim=m.qk_head_dim, v_head_dim=m.v_head_dim, rope=rope)


def _compress(c: CompressSpec, width: int, x: LayerSpec, s: dict[str, Any]) -> CompressSpec:
    kw: dict[str, Any] = {}
    if "latent" in s:
        kw.update(q_lora_rank=s["latent"], o_lora_rank=s["latent"])
    groups = c.o_groups
    while width % groups:  # the grouped output projection splits the heads' width evenly
        groups -= 1
    kw["o_groups"] = groups
    if c.index_heads:  # CSA's indexer
        rotary = int(s.get("head_dim", x.head_dim) * (x.rope.partial if x.rope is not None else 0))
        kw.update(index_heads=s.get("index_heads", c.index_heads), index_topk=s.get("index_topk", c.index_topk),
                  index_head_dim=_index_head_dim(s, rotary, c.index_head_dim))
    return dataclasses.replace(c, **kw)


# -- the benchmark's budget ------------------------------------------------------------------------------
def weight_bytes(cfg: ModelConfig, elt: int) -> int:
    """Bytes of ``cfg``'s weights at ``elt`` bytes per parameter (the calculator's parameter count)."""
    return costs(cfg, context=1, dtype="float32").params_total * elt


def scale_to_fit(cfg: ModelConfig, budget_bytes: int = 4 * 1024**3, elt: int = 4) -> tuple[ModelConfig, list[str]]:
    """Shrink ``cfg`` until its weights take at most ``budget_bytes``; returns the config and what changed.

    Steps, in order, stopping as soon as it fits: vocab to 32768; MoE experts down to top_k (active
    width unchanged); hidden and MLP widths halved (attention heads and head dims, hence the K/V cache,
    kept); then layers truncated. Only the last step changes the KV cache.
    """
    notes: list[str] = []
    original = weight_bytes(cfg, elt)
    if original <= budget_bytes:
        return cfg, notes

    def fits(c: ModelConfig) -> bool:
        return weight_bytes(c, elt) <= budget_bytes

    name = cfg.name
    if cfg.vocab_size > 32768:
        notes.append(f"vocab {cfg.vocab_size} -> 32768")
        cfg = shrink(cfg, name=name, vocab_size=32768)
    moes = [x.moe for x in cfg.layers if x.moe is not None]
    if not fits(cfg) and any(m.num_experts > m.top_k for m in moes):
        counts = sorted({m.num_experts for m in moes})
        cfg = shrink(cfg, name=name, num_experts=max(m.top_k for m in moes))
        notes.append(f"MoE experts {'/'.join(map(str, counts))} -> top_k per layer (active width unchanged)")
    hidden0 = cfg.hidden_size
    while not fits(cfg) and cfg.hidden_size > 128:
        try:
            cfg = shrink(cfg, name=name, hidden_size=cfg.hidden_size // 2, mlp_factor=0.5)
        except ValueError:
            break
    if cfg.hidden_size != hidden0:
        notes.append(f"hidden {hidden0} -> {cfg.hidden_size}, MLP widths x{cfg.hidden_size / hidden0:g} "
                     "(attention heads and head dims kept)")
    n0 = cfg.num_layers
    while not fits(cfg) and cfg.num_layers > 1:
        cfg = shrink(cfg, name=name, num_layers=cfg.num_layers - 1)
    if cfg.num_layers != n0:
        notes.append(f"layers {n0} -> {cfg.num_layers} (the KV cache shrinks with them)")
    if not fits(cfg):
        raise ValueError(f"weight budget {fmt_bytes(budget_bytes)} (--max-weight-gib): {name} does not fit even "
                         f"scaled down to one layer ({fmt_bytes(weight_bytes(cfg, elt))}); raise the budget")
    notes.insert(0, f"weights {fmt_bytes(original)} -> {fmt_bytes(weight_bytes(cfg, elt))} "
                    f"(budget {fmt_bytes(budget_bytes)})")
    return dataclasses.replace(cfg, name=f"{name} (scaled)"), notes
