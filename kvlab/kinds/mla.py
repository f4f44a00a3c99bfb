"""Multi-head latent attention (``mla``; DeepSeek-V2 arXiv 2405.04434, V3 arXiv 2412.19437; V3.2's DSA sparse
attention): the cache holds one latent per token, no per-head K/V. Module: kvlab/layers/mla.py; store:
kvlab/cache/latent.py."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .base import AttnCost, Buffer, causal_positions, field_error, positive_int

OPTIONS = frozenset({"mla", "qkv_bias", "o_bias", "attn_scale"})

_MLA = {"kv_lora_rank": 12, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 6}
EXAMPLES = (
    {"num_heads": 4, "num_kv_heads": 1, "head_dim": 16, "v_head_dim": 6, "rope": {"partial": 0.5}, "mla": _MLA},
    {"num_heads": 4, "num_kv_heads": 1, "head_dim": 16, "v_head_dim": 6, "rope": {"partial": 0.5},  # DSA (V3.2)
     "mla": {**_MLA, "q_lora_rank": 10, "index_heads": 2, "index_head_dim": 8, "index_topk": 3}},
)

ASSUMPTION = (
    "mla layers: kv_bytes = context x (kv_lora_rank + qk_rope_head_dim) latent values (+ index_head_dim indexer keys "
    "with DSA, in the K/V dtype as transformers caches them; DeepSeek's kernels keep them in fp8), per component in "
    "per_layer[i].kv_components; no per-head K/V. Decode priced in the weight-absorbed form (each cached latent read "
    "once; attention 2 x heads x (2 kv_lora_rank + qk_rope_head_dim) per attended key; DSA attends min(index_topk, "
    "context) and its indexer scores every cached key); prefill in the expanded form (2 x heads x (qk_head_dim + "
    "v_head_dim) per visible key); kv_b_proj counted once per token as matmul parameters")


@dataclass
class MLASpec:
    """Multi-head latent attention of an ``mla`` layer (DeepSeek V2/V3; kvlab/layers/mla.py).

    Per token the layer caches only the normalised KV latent ``c_kv`` (``kv_lora_rank``) and one rotated key
    ``k_pe`` (``qk_rope_head_dim``) shared by every head; per-head keys ``[k_nope, k_pe]`` (``qk_nope_head_dim +
    qk_rope_head_dim``) and values (``v_head_dim``) are up-projections of ``c_kv`` by ``kv_b_proj``.
    ``q_lora_rank``: the low-rank query path ``q = W_b norm(W_a x)`` (None: one ``q_proj``). ``rope_interleave``:
    the rotary channels are interleaved pairs (transformers' DeepSeek-V3 default), else rotate-half.
    ``latent_norm``: ``c_kv`` is RMS-normalised by ``kv_a_layernorm`` (DeepSeek; the default); False: the latent is
    the plain linear ``W_a x`` (no norm weight), as a K/V factorisation of a GQA model needs to be exact
    (kvlab/retrofit/mla.py).
    DeepSeek V3.2 sparse attention (DSA): a lightning indexer of ``index_heads`` x ``index_head_dim`` scores every
    cached token and each query attends to its ``index_topk`` best; all three set, or none.
    """

    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    rope_interleave: bool = True
    index_heads: int | None = None
    index_head_dim: int | None = None
    index_topk: int | None = None
    latent_norm: bool = True

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def sparse(self) -> bool:
        """DeepSeek sparse attention (an indexer and top-k selection)."""
        return self.index_topk is not None

    @property
    def rope_partial(self) -> float:
        """The RopeSpec ``partial`` that rotates exactly ``qk_rope_head_dim`` of the ``qk_head_dim`` channels."""
        d = self.qk_head_dim
        p = self.qk_rope_head_dim / d
        while int(d * p) < self.qk_rope_head_dim:
            p = math.nextafter(p, 1.0)
        return p

    def validate(self, where: str) -> None:
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            positive_int(where, name, getattr(self, name))
        if self.qk_rope_head_dim % 2:
            raise field_error(where, "qk_rope_head_dim", self.qk_rope_head_dim, "must be even (rotary pairs)")
        if self.q_lora_rank is not None:
            positive_int(where, "q_lora_rank", self.q_lora_rank)
        if not isinstance(self.rope_interleave, bool):
            raise field_error(where, "rope_interleave", self.rope_interleave, "must be true or false")
        if not isinstance(self.latent_norm, bool):
            raise field_error(where, "latent_norm", self.latent_norm, "must be true or false")
        idx = ("index_heads", "index_head_dim", "index_topk")
        given = [n for n in idx if getattr(self, n) is not None]
        if given and len(given) != 3:
            missing = [n for n in idx if n not in given]
            raise field_error(where, missing[0], None, "sparse MLA (DSA) needs index_heads, index_head_dim and index_topk "
                       "all set (or none)")
        for name in given:
            positive_int(where, name, getattr(self, name))
        if given and self.q_lora_rank is None:
            raise field_error(where, "q_lora_rank", None, "the DSA indexer reads the query latent: set q_lora_rank")
        if given and self.index_head_dim < self.qk_rope_head_dim:
            raise field_error(where, "index_head_dim", self.index_head_dim,
                       f"must hold the qk_rope_head_dim={self.qk_rope_head_dim} rotary channels")


def validate(layer: Any, where: str) -> None:
    m = layer.mla
    if m is None:
        raise field_error(where, "mla", None, "required (an MLASpec) for attention='mla'")
    m.validate(f"{where}.mla")
    if layer.num_kv_heads != 1:
        raise field_error(where, "num_kv_heads", layer.num_kv_heads, "mla caches one shared latent: must be 1")
    if layer.head_dim != m.qk_head_dim:
        raise field_error(where, "head_dim", layer.head_dim, "must equal mla.qk_nope_head_dim + "
                          f"mla.qk_rope_head_dim = {m.qk_head_dim}")
    if layer.value_dim != m.v_head_dim:
        raise field_error(where, "v_head_dim", layer.v_head_dim, f"must equal mla.v_head_dim={m.v_head_dim}")
    if layer.rope is None:
        raise field_error(where, "rope", None, "mla rotates qk_rope_head_dim channels: a RopeSpec is required")
    if layer.rope.scaling == "proportional":
        raise field_error(f"{where}.rope", "scaling", "proportional", "not supported by mla")
    if int(layer.head_dim * layer.rope.partial) != m.qk_rope_head_dim:
        raise field_error(f"{where}.rope", "partial", layer.rope.partial,
                          f"must rotate mla.qk_rope_head_dim={m.qk_rope_head_dim} of head_dim={layer.head_dim} "
                          f"channels (use MLASpec.rope_partial = {m.rope_partial!r})")


def detail(layer: Any) -> str:
    """``latent 512+64`` (``+index`` with DSA), for per-layer diagrams."""
    m = layer.mla
    return f"latent {m.kv_lora_rank}+{m.qk_rope_head_dim}" + (" +index" if m.sparse else "")


def params(layer: Any, hidden: int) -> tuple[int, int]:
    """(parameters, matmul parameters) of an MLA layer, its DSA indexer included."""
    m, h = layer.mla, layer.num_heads
    r, dr, ql = m.kv_lora_rank, m.qk_rope_head_dim, m.q_lora_rank
    mats = (hidden * ql + ql * h * m.qk_head_dim) if ql else hidden * h * m.qk_head_dim
    mats += hidden * (r + dr) + r * h * (m.qk_nope_head_dim + m.v_head_dim) + h * m.v_head_dim * hidden
    extra = (ql or 0) + (r if m.latent_norm else 0)  # q_a_layernorm, kv_a_layernorm
    extra += ((ql or 0) + r + dr) if layer.qkv_bias else 0
    extra += hidden if layer.o_bias else 0
    if m.sparse:  # indexer: wq_b (from the query latent), wk, weights_proj; k_norm is a LayerNorm (weight, bias)
        mats += ql * m.index_heads * m.index_head_dim + hidden * m.index_head_dim + hidden * m.index_heads
        extra += 2 * m.index_head_dim
    return mats + extra, mats


def cache_components(layer: Any, context: int, batch: int, kv_elt: int) -> dict[str, int]:
    """Cache bytes by part, as kvlab/cache/latent.py allocates them: c_kv, k_pe (and index_keys with DSA)."""
    m = layer.mla
    out = {"c_kv": batch * context * m.kv_lora_rank * kv_elt, "k_pe": batch * context * m.qk_rope_head_dim * kv_elt}
    if m.sparse:
        out["index_keys"] = batch * context * m.index_head_dim * kv_elt
    return out


def buffers(layer: Any, context: int) -> list:
    """``c_kv``, ``k_pe`` (its rotary channels: kept whole with ``rope_exact``) and DSA's ``index_keys``, one row
    per token each."""
    m = layer.mla
    out = [Buffer("c_kv", "c_kv", 1, context, m.kv_lora_rank),
           Buffer("k_pe", "k_pe", 1, context, m.qk_rope_head_dim, rope=m.qk_rope_head_dim)]
    if m.sparse:
        out.append(Buffer("index_keys", "index_keys", 1, context, m.index_head_dim, rope=m.qk_rope_head_dim))
    return out


def price(layer: Any, hidden: int, context: int, batch: int, kv_elt: int) -> AttnCost:
    """The latent (``kv_lora_rank + qk_rope_head_dim`` per token; + ``index_head_dim`` indexer keys with DSA).

    Decode (weight-absorbed form): every head scores ``[c_kv, k_pe]`` (``r + d_rope``) and sums ``c_kv`` (``r``)
    per attended key: ``2 x H x (2r + d_rope)`` FLOPs per key; ``W_uk`` / ``W_uv`` count once per token as matmul
    parameters (``kv_b_proj``). DSA: the indexer scores every cached key (``2 x index_heads x (index_head_dim + 1)``)
    and attention reads ``min(index_topk, context)`` latents. Prefill (expanded form): ``2 x H x (qk_head_dim +
    v_head_dim)`` per visible key (``kv_b_proj`` once per token, as matmul parameters).
    """
    m, h = layer.mla, layer.num_heads
    p, mats = params(layer, hidden)
    comp = cache_components(layer, context, batch, kv_elt)
    lat = m.kv_lora_rank + m.qk_rope_head_dim
    attended = min(m.index_topk, context) if m.sparse else context
    idx = 2 * m.index_heads * (m.index_head_dim + 1) if m.sparse else 0
    read = batch * kv_elt * (attended * lat + (context * m.index_head_dim if m.sparse else 0))
    return AttnCost(
        params=p, matmul_params=mats, kv_bytes=sum(comp.values()),
        kv_bytes_per_token=(lat + (m.index_head_dim if m.sparse else 0)) * kv_elt, kv_read_bytes=read,
        flops_per_token=2 * h * (2 * m.kv_lora_rank + m.qk_rope_head_dim) * attended + idx * context,
        prefill_flops=2 * h * (m.qk_head_dim + m.v_head_dim) * causal_positions(context, m.index_topk)
        + idx * causal_positions(context, None),
        components=comp, flop_components={"latent": 2 * h * (2 * m.kv_lora_rank + m.qk_rope_head_dim) * attended,
                                          **({"indexer": idx * context} if m.sparse else {})})
