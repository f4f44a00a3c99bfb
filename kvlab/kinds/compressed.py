"""DeepSeek V4's attention layers (``csa``, ``hca``, ``swa``; kvlab/layers/compressed.py, kvlab/cache/compressed.py):
a sliding-window branch over one shared K = V head, plus K/V compressed along the sequence (``ratio`` tokens pooled
into one entry; none for ``swa``), and for CSA a lightning indexer choosing the ``index_topk`` entries a query reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import AttnCost, Buffer, causal_positions, field_error, positive_int

OPTIONS = frozenset({"compress", "window", "sinks", "attn_scale"})

_BASE = {"num_heads": 4, "num_kv_heads": 1, "head_dim": 16, "sinks": True, "rope": {"theta": 1000.0, "partial": 0.5}}
_C = {"q_lora_rank": 24, "o_groups": 2, "o_lora_rank": 12}
CSA_EXAMPLES = ({**_BASE, "window": 5, "compress": {**_C, "ratio": 3, "index_heads": 3, "index_head_dim": 12,
                                                      "index_topk": 2}},)
HCA_EXAMPLES = ({**_BASE, "window": 3, "compress": {**_C, "ratio": 4}},)
SWA_EXAMPLES = ({**_BASE, "window": 4, "compress": {**_C, "ratio": 0}},)

ASSUMPTION = (
    "csa/hca/swa layers (swa: the window ring only): kv_bytes = window ring (min(window, context) x head_dim, K = V) "
    "+ context // ratio compressed entries x head_dim (+ csa: x index_head_dim indexer keys) + constant compressor "
    "state (partial block: ratio - 1 raw K/V and gate rows; csa: the previous block's first series), per component "
    "in per_layer[i].kv_components; kv_bytes_per_token = (head_dim [+ index_head_dim]) x bytes / ratio, rounded "
    "down; decode attends window + top-k (csa) or all complete entries (hca); the indexer scores every entry")


@dataclass
class CompressSpec:
    """Sequence-compressed attention of a ``csa`` / ``hca`` / ``swa`` layer (DeepSeek V4).

    ``ratio``: tokens pooled into one compressed K/V entry (CSA 4, HCA 128; 0 for an ``swa`` layer, V4's
    sliding-window-only layer, which has the same query, K/V and output paths and no compressor); ``q_lora_rank``:
    the low-rank query path ``q = W_b norm(W_a x)``; ``o_groups`` x ``o_lora_rank``: the grouped output projection
    (the heads split into ``o_groups`` groups, each projected to ``o_lora_rank``, then mixed to hidden). CSA only:
    the indexer's ``index_heads`` x ``index_head_dim`` and the ``index_topk`` compressed entries each query attends
    to (all three 0 for HCA and SWA).
    """

    ratio: int
    q_lora_rank: int
    o_groups: int = 1
    o_lora_rank: int = 0
    index_heads: int = 0
    index_head_dim: int = 0
    index_topk: int = 0

    @property
    def indexed(self) -> bool:
        """CSA: a lightning indexer picks the compressed entries each query reads."""
        return self.index_topk > 0

    def validate(self, where: str, compressor: bool, indexer: bool) -> None:
        if compressor:
            positive_int(where, "ratio", self.ratio)
        elif self.ratio != 0:
            raise field_error(where, "ratio", self.ratio, "an swa layer has no compressor: must be 0")
        for name in ("q_lora_rank", "o_groups", "o_lora_rank"):
            positive_int(where, name, getattr(self, name))
        for name in ("index_heads", "index_head_dim", "index_topk"):
            if indexer:
                positive_int(where, name, getattr(self, name))
            elif getattr(self, name):
                raise field_error(where, name, getattr(self, name), "only a csa layer has an indexer: must be 0")


def _validate(layer: Any, where: str, compressor: bool, indexer: bool) -> None:
    c = layer.compress
    if c is None:
        raise field_error(where, "compress", None, f"required (a CompressSpec) for attention={layer.attention!r}")
    c.validate(f"{where}.compress", compressor, indexer)
    if layer.num_kv_heads != 1:
        raise field_error(where, "num_kv_heads", layer.num_kv_heads,
                          f"{layer.attention} has one shared K/V head: must be 1")
    if layer.window is None:
        raise field_error(where, "window", None,
                          f"{layer.attention} needs the sliding-window branch: a positive window")
    if (layer.num_heads * layer.head_dim) % c.o_groups:
        raise field_error(f"{where}.compress", "o_groups", c.o_groups,
                          f"must divide num_heads x head_dim = {layer.num_heads * layer.head_dim}")
    if layer.rope is not None and indexer and int(layer.head_dim * layer.rope.partial) > c.index_head_dim:
        raise field_error(f"{where}.compress", "index_head_dim", c.index_head_dim,
                          f"must hold the {int(layer.head_dim * layer.rope.partial)} rotary channels")
    if layer.rope is not None and layer.rope.scaling == "proportional":
        raise field_error(f"{where}.rope", "scaling", "proportional", f"not supported by {layer.attention}")
    if layer.v_head_dim not in (None, layer.head_dim):
        raise field_error(where, "v_head_dim", layer.v_head_dim, f"{layer.attention} reads V = K: must equal head_dim")


def validate_csa(layer: Any, where: str) -> None:
    _validate(layer, where, compressor=True, indexer=True)


def validate_hca(layer: Any, where: str) -> None:
    _validate(layer, where, compressor=True, indexer=False)


def validate_swa(layer: Any, where: str) -> None:
    _validate(layer, where, compressor=False, indexer=False)


def detail(layer: Any) -> str:
    """``/4 +index`` (ratio, CSA's indexer) for per-layer diagrams; "" for swa."""
    c = layer.compress
    return f"/{c.ratio}" + (" +index" if c.indexed else "") if c.ratio else ""


def params(spec: Any, hidden: int) -> tuple[int, int]:
    """(parameters, matmul parameters) of one csa / hca / swa layer."""
    c = spec.compress
    h, d, r, m = spec.num_heads, spec.head_dim, c.q_lora_rank, c.ratio
    f = 2 if c.indexed else 1
    mats = hidden * r + r * h * d + hidden * d + h * d * c.o_lora_rank + c.o_groups * c.o_lora_rank * hidden
    extra = r + d + (h if spec.sinks else 0)  # q_a_norm, kv_norm, sinks
    if m:  # the compressor: kv / gate projections, position bias, its norm
        mats += 2 * hidden * f * d
        extra += m * f * d + d
    if c.indexed:
        hi, di = c.index_heads, c.index_head_dim
        mats += 2 * hidden * 2 * di + r * hi * di + hidden * hi
        extra += m * 2 * di + di
    return mats + extra, mats


def visible_sum(n: int, m: int, cap: int | None = None) -> int:
    """sum over positions p = 0..n-1 of min(cap, (p + 1) // m): entries seen over a prefill of n tokens."""
    def s(k: int) -> int:  # sum_{i=1..k} floor(i / m)
        q, r = divmod(k, m)
        return m * q * (q - 1) // 2 + q * (r + 1)
    if cap is None or n < cap * m:
        return s(n)
    return s(cap * m - 1) + cap * (n - cap * m + 1)


def cache_components(spec: Any, context: int, batch: int, elt: int) -> dict[str, int]:
    """Bytes of each component of the layer's cache at ``max_length = context`` (kvlab/cache/compressed.py)."""
    c = spec.compress
    d, m = spec.head_dim, c.ratio
    f = 2 if c.indexed else 1
    out = {"window": batch * min(spec.window, context) * d * elt}
    if not m:  # swa: the window ring only
        return out
    out |= {"compressed": batch * (context // m) * d * elt,
            "partial": 2 * batch * (m - 1) * f * d * elt}
    if c.indexed:
        di = c.index_head_dim
        out["overlap"] = 2 * batch * m * d * elt
        out["index_keys"] = batch * (context // m) * di * elt
        out["index_partial"] = 2 * batch * (m - 1) * 2 * di * elt
        out["index_overlap"] = 2 * batch * m * di * elt
    return out


def rotary_channels(spec: Any) -> int:
    """The rotated trailing channels of each K = V row (and indexer key): ``int(head_dim * rope.partial)``."""
    return int(spec.head_dim * spec.rope.partial) if spec.rope is not None else 0


def buffers(spec: Any, context: int) -> list:
    """The window ring, the compressed entries and CSA's indexer keys (entries are written row by row: no residual
    window; their rotary tail kept whole with ``rope_exact``)."""
    c, rot = spec.compress, rotary_channels(spec)
    out = [Buffer("window", "window", 1, min(spec.window, context), spec.head_dim, ring=spec.window, rope=rot)]
    if c.ratio:
        out.append(Buffer("compressed", "compressed", 1, context // c.ratio, spec.head_dim, rope=rot, residual=False))
    if c.indexed:
        out.append(Buffer("index_keys", "index_keys", 1, context // c.ratio, c.index_head_dim, rope=rot,
                          residual=False))
    return out


def price(layer: Any, hidden: int, context: int, batch: int, kv_elt: int) -> AttnCost:
    """Window ring + compressed entries (+ CSA's indexer keys) + the constant compressor state (partial block,
    overlap block). Decode reads the window, the state and: HCA every complete entry; CSA every indexer key and its
    top-k entries. Attention FLOPs: 4 x heads x head_dim per key (QK and PV, V = K) plus CSA's indexer
    2 x (index_heads x index_head_dim + index_heads) per scored entry."""
    c = layer.compress
    h, d, m = layer.num_heads, layer.head_dim, c.ratio
    p, mats = params(layer, hidden)
    comp = cache_components(layer, context, batch, kv_elt)
    state = sum(v for k, v in comp.items() if k.endswith(("partial", "overlap")))
    n = context // m if m else 0  # swa (ratio 0): no compressed entries
    win = min(layer.window, context)
    idx = 2 * (c.index_heads * c.index_head_dim + c.index_heads) if c.indexed else 0
    attended = min(c.index_topk, n) if c.indexed else n
    read = batch * kv_elt * (win * d + attended * d + (n * c.index_head_dim if c.indexed else 0)) + state
    parts = {"window": 4 * h * d * win, "compressed": 4 * h * d * attended, "indexer": idx * n}
    return AttnCost(
        params=p, matmul_params=mats, kv_bytes=sum(comp.values()),
        kv_bytes_per_token=(d + (c.index_head_dim if c.indexed else 0)) * kv_elt // m if m else 0, kv_read_bytes=read,
        flops_per_token=4 * h * d * (win + attended) + idx * n,
        prefill_flops=4 * h * d * (causal_positions(context, layer.window)
                                   + (visible_sum(context, m, c.index_topk if c.indexed else None) if m else 0))
        + (idx * visible_sum(context, m) if m else 0),
        state_bytes=state, components=comp, flop_components={k: v for k, v in parts.items() if v or k == "window"})
