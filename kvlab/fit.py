"""Will it fit: the inverse of the calculator.

``footprint(model, context, batch)`` lists what a deployment holds in memory — weights, K/V (physical, by
component), the constant per-sequence state and an activation/workspace estimate — from
:func:`kvlab.costs`; ``fit(model, memory, batch=B)`` finds the largest context for ``B`` sequences (or, with
``context=N``, the largest batch) whose footprint fits ``memory``, exactly: one more token or one more
sequence does not fit. ``tp`` prices one device of a tensor-parallel group (KV heads split or replicated as
vLLM's ``QKVParallelLinear`` does it; MLA/CSA/HCA latents, one shared head, replicated on every device);
``engine`` replaces the physical K/V by what a serving engine reserves (:mod:`kvlab.engines`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvlab.costs import costs, dtype_bytes, resolve_config
from kvlab.costs.dtypes import kv_dtype_for
from kvlab.costs.quant import quant_name, resolve_kv_quant
from kvlab.engines import get_engine, layer_tp_factor
from kvlab.errors import FitError
from kvlab.gguf_checkpoint import is_gguf, weight_bytes
from kvlab.models import resolve_file

BUDGETS_GIB = (24, 48, 80, 141)  # --table: consumer, L40S, H100/A100, H200
DEFAULT_CHUNK = 512  # prefill chunk (tokens) of the workspace estimate: kvlab bench's default chunk


@dataclass
class Footprint:
    """Bytes held at ``context`` tokens x ``batch`` sequences (on one device when ``tp`` > 1)."""

    context: int
    batch: int
    tp: int
    weights_bytes: int
    kv_bytes: int  # physical K/V growing with the context (kv_cache_bytes - state), this device
    kv_components: dict[str, int]  # kv_bytes + state by named part (gqa/cca layers: "k+v")
    state_bytes: int  # constant per-sequence state (CCA conv tails, CSA/HCA partial blocks), whole batch
    workspace_bytes: int  # activation/workspace estimate (see WORKSPACE_ASSUMPTION)
    engine: str | None = None
    engine_kv_bytes: int | None = None  # what the engine reserves for K/V + state instead of the physical figure
    engine_details: list[str] = field(default_factory=list)  # how it got there (groups, pages, cells)
    replication: list[str] = field(default_factory=list)  # tensor-parallel replication, named

    @property
    def physical_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.state_bytes + self.workspace_bytes

    @property
    def total_bytes(self) -> int:
        """What must fit: the engine's reservation when an engine is given, else the physical figure."""
        if self.engine_kv_bytes is None:
            return self.physical_bytes
        return self.weights_bytes + self.engine_kv_bytes + self.workspace_bytes

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(physical_bytes=self.physical_bytes, total_bytes=self.total_bytes)
        return d


@dataclass
class FitResult:
    """The answer of :func:`fit`: ``value`` (a context or a batch) and the footprints either side of it."""

    name: str
    solve: str  # "context" (largest context for the batch) or "batch" (largest batch for the context)
    value: int  # 0: not even one token / one sequence fits
    memory: int  # the budget given (one device)
    usable: int  # the part the fit may fill (memory x the engine's utilisation fraction)
    limited_by: str  # "memory" or "max_positions"
    fits: Footprint | None  # at value
    next: Footprint | None  # at value + 1 (does not fit), None when limited by max_positions
    weights_dtype: str
    kv_dtype: str
    assumptions: list[str] = field(default_factory=list)
    kv_quant: str = "none"  # the quantized K/V format priced ("none": every value in kv_dtype)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["fits"] = self.fits.to_dict() if self.fits else None
        d["next"] = self.next.to_dict() if self.next else None
        return d


WORKSPACE_ASSUMPTION = (
    "workspace: an estimate, not a measurement: the activations of one step of T = max(batch, min(chunk, context)) "
    "tokens (chunk = {chunk}, a chunked prefill; decode steps have T = batch): residual stream and its norm "
    "(2 x hidden x mHC streams), q/k/v and attention output, the widest MLP (3 x width: gate, up, product; MoE: "
    "top_k x expert width + shared experts), in the weights' dtype (fp32 for fp32 weights, else 2 B), plus fp32 logits "
    "for one position per sequence; attention assumed fused (no T x context score matrix); engines add CUDA graphs, "
    "the allocator's slack and sampling buffers on top (vLLM measures its own peak with a profile run)")


def _workspace(cfg: Any, c: Any, context: int, batch: int, w_name: str, chunk: int) -> int:
    t = max(batch, min(chunk, context))
    act = 4 if w_name == "float32" else 2
    streams = cfg.mhc_streams or 1
    width = 0
    for layer in cfg.layers:
        w = layer.intermediate_size if layer.mlp in ("dense", "dense+moe") else 0
        if layer.moe is not None:
            w += layer.moe.top_k * layer.moe.expert_size + layer.moe.shared_width
        width = max(width, w)
    attn = max(x.heads * (x.head_dim + x.v_head_dim) + 2 * x.kv_heads * x.head_dim for x in c.per_layer)
    per_token = 2 * cfg.hidden_size * streams + attn + 3 * width
    return t * per_token * act + batch * cfg.vocab_size * 4


def gguf_weights(model: Any) -> dict[str, Any] | None:
    """The GGUF file's own weight bytes (quantized tensors at their stored size) when ``model`` names one, else None."""
    if not isinstance(model, (str, Path)):
        return None

    try:
        path = resolve_file(model)
    except ValueError:
        return None
    return weight_bytes(path) if is_gguf(path) else None


def footprint(model: Any, context: int, batch: int = 1, weights_dtype: Any = "bfloat16", kv_dtype: Any = None,
              tp: int = 1, engine: Any = None, chunk: int = DEFAULT_CHUNK, weights_bytes: int | None = None,
              kv_quant: Any = None) -> Footprint:
    """What ``batch`` sequences of ``context`` tokens hold, per device of a ``tp``-way tensor-parallel group.

    ``engine``: an :class:`kvlab.engines.Engine` (or its name) whose reservation is reported beside the physical
    K/V (``engine_kv_bytes``) and is what :attr:`Footprint.total_bytes` counts. ``weights_bytes``: the weights'
    size when known (a GGUF file's quantized tensors, :func:`gguf_weights`) instead of params x dtype.
    ``kv_quant``: a quantized K/V format (``"int8"``, ``"int4-g32-r64"``, ``"deepseek-v4"``; kvlab/costs/quant.py),
    priced with its scales, zero points, residual window and group padding as :func:`kvlab.costs` prices it.
    """
    cfg = resolve_config(model)
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise FitError(f"tp={tp!r}: must be a positive integer")
    c = costs(cfg, context=context, dtype=weights_dtype, batch=batch, kv_dtype=kv_dtype, kv_quant=kv_quant)
    w_name = c.dtype
    weights = c.weights_bytes  # params x dtype, mHC maps held in fp32
    if weights_bytes is not None:
        weights = weights_bytes
    kv = state = 0
    comps: dict[str, int] = {}
    replicated: dict[str, list[int]] = {}
    for x in c.per_layer:
        f, rep = layer_tp_factor(x, tp)
        if rep is not None and x.kv_source is None:
            replicated.setdefault(rep, []).append(x.index)
        layer_state = round(x.kv_state_bytes * f)
        kv += round(x.kv_bytes * f) - layer_state
        state += layer_state
        for k, v in (x.kv_components or ({"k+v": x.kv_bytes} if x.kv_bytes else {})).items():
            comps[k] = comps.get(k, 0) + round(v * f)
    notes = []
    for rep, idx in replicated.items():
        where = _ranges(idx)
        if rep == "latent":
            notes.append(f"layers {where}: one latent/shared K=V head (MLA, CSA/HCA): replicated on all {tp} devices")
        else:
            notes.append(f"layers {where}: fewer KV heads than tp={tp}: each KV head stored on {rep[:-1]} devices")
    fp = Footprint(context=context, batch=batch, tp=tp, weights_bytes=-(-weights // tp), kv_bytes=kv,
                   kv_components=comps, state_bytes=state,
                   workspace_bytes=_workspace(cfg, c, context, batch, w_name, chunk), replication=notes)
    if engine is not None:
        eng = get_engine(engine)
        fp.engine = eng.name
        res = eng.reserve(cfg, c, context=context, batch=batch, tp=tp)
        fp.engine_kv_bytes, fp.engine_details = res.kv_bytes, res.details
    return fp


def _ranges(idx: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``0-2, 5``."""
    out: list[str] = []
    for i in idx:
        if out and out[-1][1] == i - 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in out)


def fit(model: Any, memory: int, batch: int | None = None, context: int | None = None,
        weights_dtype: Any = None, kv_dtype: Any = None, tp: int = 1, engine: Any = None,
        chunk: int = DEFAULT_CHUNK, kv_quant: Any = None) -> FitResult:
    """The largest context for ``batch`` sequences (default 1), or with ``context`` the largest batch, in ``memory``.

    Exact at the boundary: ``fits`` is the footprint at the answer, ``next`` the footprint one token (one
    sequence) later, which exceeds the usable memory. Contexts stop at the model's ``max_positions``.
    ``weights_dtype`` None: the config's stored dtype (else bf16), or for a GGUF file (or a named model) the
    file's own quantized weight bytes.
    ``kv_quant``: a quantized K/V format, as :func:`footprint` takes it.
    """
    quant = resolve_kv_quant(kv_quant)  # a named error before any search
    gguf = gguf_weights(model) if weights_dtype is None else None
    if kv_dtype is None and gguf is not None:
        kv_dtype = "float16"  # llama.cpp's default cache type
    cfg = resolve_config(model)
    weights_dtype = weights_dtype or cfg.dtype or "bfloat16"
    if batch is not None and context is not None:
        raise FitError("give batch (solve for the context) or context (solve for the batch), not both")
    if not isinstance(memory, int) or memory < 1:
        raise FitError(f"memory={memory!r}: must be a positive number of bytes")
    for nm, v in (("batch", batch), ("context", context)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise FitError(f"{nm}={v!r}: must be a positive integer")
    eng = None
    if engine is not None:
        eng = get_engine(engine)
    usable = int(memory * eng.memory_fraction) if eng is not None else memory
    w_name, _ = dtype_bytes(weights_dtype)
    kv_name, _ = kv_dtype_for(weights_dtype, kv_dtype)
    if gguf is not None:
        w_name = "gguf"

    w_file = -(-gguf["weight_bytes"] // tp) if gguf else None

    def at(ctx: int, b: int) -> Footprint:
        return footprint(cfg, ctx, b, weights_dtype, kv_dtype, tp, eng, chunk, weights_bytes=w_file, kv_quant=quant)

    def ok(ctx: int, b: int) -> bool:
        return at(ctx, b).total_bytes <= usable

    solve = "batch" if context is not None else "context"
    limited = "memory"
    if solve == "context":
        b = batch or 1
        hi_cap = cfg.max_positions
        if not ok(1, b):
            value = 0
        elif ok(hi_cap, b):
            value, limited = hi_cap, "max_positions"
        else:
            value = _largest(lambda n: ok(n, b), 1, hi_cap)
        fits = at(value, b) if value else None
        nxt = at(value + 1, b) if limited == "memory" else None
    else:
        assert context is not None
        if not ok(context, 1):
            value = 0
        else:
            hi = 2
            while ok(context, hi):
                hi *= 2
            value = _largest(lambda b: ok(context, b), hi // 2, hi)
        fits = at(context, value) if value else None
        nxt = at(context, value + 1)
    assumptions = [
        f"weights: params_total x {w_name} bytes (mHC maps in fp32), divided evenly over tp={tp} device(s)"
        if tp > 1 else f"weights: params_total x {w_name} bytes (mHC maps in fp32)",
    ] if gguf is None else [
        f"weights: the GGUF file's tensor bytes, {gguf['weight_bytes']:,} B ({gguf['bits_per_weight']:.2f} bits/weight; "
        + ", ".join(f"{k} x{v}" for k, v in gguf["tensor_types"].items()) + f") from {gguf['file']}"
        + (f", divided evenly over tp={tp} devices" if tp > 1 else "") + "; K/V default f16 (llama.cpp's cache type)",
    ]
    assumptions += [
        (f"K/V: the calculator's physical bytes in {kv_name}"
         + (f" quantized as {quant_name(quant)} (codes, scales, zero points, a {kv_name} residual window, exact "
            "rotary channels and group padding, as kvlab's cache holds them)" if quant else "")
         + " (window layers hold min(window, context) positions, shared layers nothing), per component; state: the "
         "constant per-sequence part (CCA conv tails, CSA/HCA partial blocks), listed apart"),
        WORKSPACE_ASSUMPTION.format(chunk=chunk),
        "memory sizes: GiB = 1024^3 bytes, GB = 10^9 bytes; fits means total <= usable, exact to the byte",
    ]
    if tp > 1:
        assumptions.append(
            "tensor parallelism (vLLM vllm/model_executor/layers/linear.py, QKVParallelLinear): KV heads split "
            "evenly when tp <= kv_heads, else one KV head per device (each replicated tp / kv_heads times); MLA "
            "latents and CSA/HCA K=V entries (one shared head) are replicated on every device; the workspace is not "
            "divided (a conservative bound); communication buffers are not counted")
    if eng is not None:
        assumptions += eng.rules
    if limited == "max_positions":
        assumptions.append(f"the whole max_positions ({cfg.max_positions:,}) fits; contexts are not searched beyond it")
    return FitResult(name=cfg.name, solve=solve, value=value, memory=memory, usable=usable, limited_by=limited,
                     fits=fits, next=nxt, weights_dtype=w_name, kv_dtype=kv_name, assumptions=assumptions,
                     kv_quant=quant_name(quant))


def _largest(ok: Any, lo: int, hi: int) -> int:
    """The largest n in [lo, hi) with ok(n), given ok(lo) and not ok(hi), ok monotone decreasing."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo


def fit_table(model: Any, memories: list[int] | None = None, **kw: Any) -> list[FitResult]:
    """:func:`fit` at each memory budget (default 24 / 48 / 80 / 141 GiB)."""
    mems = memories or [g * 1024**3 for g in BUDGETS_GIB]
    return [fit(model, m, **kw) for m in mems]


def describe(fp: Footprint) -> list[tuple[str, int]]:
    """(label, bytes) rows of a footprint, the K/V by component."""
    rows = [("weights", fp.weights_bytes)]
    comps = {k: v for k, v in fp.kv_components.items() if v}
    physical = " (physical)" if fp.engine else ""
    if comps and set(comps) != {"k+v"}:
        rows += [(f"K/V{physical}: {k}", v) for k, v in comps.items()]
    else:
        rows.append((f"K/V{physical}", fp.kv_bytes))
    if fp.state_bytes:
        rows.append(("per-sequence state (included above)" if comps and set(comps) != {"k+v"}
                     else "per-sequence state", fp.state_bytes))
    if fp.engine_kv_bytes is not None:
        rows.append((f"{fp.engine} reserves for K/V + state", fp.engine_kv_bytes))
    rows.append(("workspace (estimate)", fp.workspace_bytes))
    return rows


__all__ = [
    "BUDGETS_GIB",
    "FitError",
    "FitResult",
    "Footprint",
    "describe",
    "fit",
    "fit_table",
    "footprint",
]
