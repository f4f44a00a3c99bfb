"""What every technique record is made of: the :class:`Kind` record, the price it returns, and field checks.

Nothing here imports torch: the config and the calculator read these records without it. The torch side of a
record (its module and its store) is named as ``"package.module:attribute"`` and resolved on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


def field_error(where: str, name: str, value: Any, allowed: str) -> ValueError:
    """``ValueError('layers[3].window=0: must be a positive integer')``: the field, its value, what is allowed."""
    return ValueError(f"{where}.{name}={value!r}: {allowed}" if where else f"{name}={value!r}: {allowed}")


def positive_int(where: str, name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise field_error(where, name, value, "must be a positive integer")


def causal_positions(n: int, window: int | None) -> int:
    """sum_{i=1..n} min(i, window): keys seen over a causal prefill of ``n`` tokens, in closed form."""
    if window is None or n <= window:
        return n * (n + 1) // 2
    return window * (window + 1) // 2 + (n - window) * window


@dataclass
class AttnCost:
    """What one attention layer costs; returned by a kind's ``price``.

    ``kv_bytes`` is stored for the whole batch at ``context``; ``kv_bytes_per_token`` is per cached position of
    one sequence; ``kv_read_bytes`` is K/V read by one decode step of the batch; FLOPs are per token
    (decode at ``context``) and for a whole prefill of ``context`` tokens of one sequence. ``state_bytes``: the
    part of ``kv_bytes`` that does not grow with the context (a constant recurrent state per sequence, e.g.
    CCA's convolution tail; whole batch). ``components``: ``kv_bytes`` by named part, as the store's
    ``components()`` reports them (e.g. MLA's ``c_kv`` / ``k_pe``); empty for a kind with one part.
    """

    params: int
    matmul_params: int
    kv_bytes: int
    kv_bytes_per_token: int
    kv_read_bytes: int
    flops_per_token: int
    prefill_flops: int
    state_bytes: int = 0
    components: dict[str, int] = field(default_factory=dict)
    flop_components: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Buffer:
    """One per-position buffer of a store, as its kind's record describes it (``Kind.buffers``).

    component: its name (a key of the price's components, or ``"kv"`` for a kind with one part); name: the
    kv_quant key (``k``, ``v``, ``c_kv``...); rows: leading entries per sequence (kv heads); capacity: slots at
    ``max_length = context``; dim: channels; ring: a sliding-window ring (slot = position % capacity) of
    ``window`` positions; key: a keys-only buffer (``k_per_channel`` and ``rotate`` apply); rope: its rotary
    channels (the last ``rope``; kept exact with ``rope_exact``).
    """

    component: str
    name: str
    rows: int
    capacity: int
    dim: int
    ring: int | None = None
    key: bool = False
    rope: int = 0
    residual: bool = True  # False: entries written row by row (CSA/HCA pools): no residual window, per token


# How serving engines lay a kind's cache out (Kind.serving; the rules of each engine are in kvlab/engines.py)
PAGED = "paged"  # K/V (or a latent) per token, in pages or token slots: gqa, mla
PAGED_STATE = "paged+state"  # per-token K/V pages plus a constant per-sequence state: cca
DEEPSEEK_V4 = "deepseek_v4"  # DeepSeek V4's window ring + compressed entries (+ indexer keys): csa, hca, swa
UNMODELLED = ""  # no engine rule transcribed: engines charge the calculator's physical bytes

# price(layer, hidden, context, batch, kv_elt_bytes) -> AttnCost
Price = Callable[[Any, int, int, int, int], AttnCost]


def resolve(path: str) -> Any:
    """``"kvlab.layers.cca:CCAttention"`` -> the object (imported on first use, cached by the import system)."""
    mod, _, attr = path.partition(":")
    return getattr(importlib.import_module(mod), attr)


@dataclass(frozen=True)
class Kind:
    """One attention technique: everything kvlab needs to build, store, price, validate and show it.

    name: the ``LayerSpec.attention`` value (written only in the table, kvlab/kinds/__init__.py).
    label: a short human name for tables and plots. page: its docs page.
    options: the LayerSpec fields this kind reads beyond the shared ones (heads, head dims, MLP, rope...);
        a field of another kind set to a non-default value is an error naming the field and its owner.
    spec_field / spec_type: the kind's own sub-spec (``LayerSpec.mla`` -> MLASpec), or None. A layer of the kind
        given none gets ``spec_type()`` when every option of the sub-spec has a default (GQASpec, CCASpec); a layer
        of another kind drops such a sub-spec while it holds only defaults (a layer switched to another kind).
    moved: flat LayerSpec fields of older kvlab versions that now live in the sub-spec (``{"conv_kernels": "cca"}``):
        a saved config dict that still has one loads (the value moves into the sub-spec; on a layer of another
        kind, a non-default value is the usual "not supported" error).
    validate(layer, where): checks of the kind's own options (the shared fields are checked by LayerSpec).
    price: its parameters, KV bytes (by component), bytes read per decode step and FLOPs (an :class:`AttnCost`).
    assumption: the text the calculator prints under a model that has this kind.
    module: ``"pkg.mod:Class"`` of the torch module, built as ``cls(spec, hidden, eps, norm_offset)``.
    store: ``"pkg.mod:factory"`` of its cache store, ``factory(spec, batch, max_length, dtype, device)``.
    can_share: whether a layer of this kind may read another layer's cache (``kv_source``).
    tag: the word before "full" / "window N" in per-layer tables ("" for the plain default, gqa).
    examples: small LayerSpec fields of layers of this kind (each a tiny model's layer): the contract tests
        (tests/test_contract.py) run every one, so a new kind is tested the moment it is in the table.
    buffers(layer, context): the store's per-position buffers at ``max_length = context`` (a list of
        kvlab.kinds.Buffer): what a quantized cache (``kv_quant``) quantizes and the calculator prices; None:
        the kind cannot hold a quantized cache.
    serving: how serving engines (kvlab/engines.py: vLLM, llama.cpp, SGLang, transformers) lay its cache out:
        :data:`PAGED`, :data:`PAGED_STATE`, :data:`DEEPSEEK_V4`, or :data:`UNMODELLED` (physical bytes charged).
    tp_split: tensor parallelism splits its K/V by KV head (False: one shared latent / K=V head, replicated on
        every device).
    retrofits: the conversions of kvlab/retrofit that apply to its layers (technique names: ``window``,
        ``prune-heads``, ``mla``); each conversion and the memory pre-flight's advice read it.
    colour: its colour in architecture diagrams (kvlab/archplot.py); None: the full / sliding-window colours.
    detail(layer): a few words on what the per-layer diagram writes for a layer of this kind beyond heads and
        window (MLA's latent, CCA's kernels); None: nothing.
    """

    name: str
    label: str
    page: str
    options: frozenset[str]
    validate: Callable[[Any, str], None]
    price: Price
    assumption: str
    module: Any  # "pkg.mod:Class" (or the class)
    store: Any  # "pkg.mod:factory" (or the callable)
    spec_field: str | None = None
    spec_type: type | None = None
    moved: dict[str, str] = field(default_factory=dict)
    can_share: bool = False
    tag: str = ""
    examples: tuple[dict[str, Any], ...] = ()
    buffers: Callable[[Any, int], list] | None = None
    serving: str = UNMODELLED
    tp_split: bool = True
    retrofits: frozenset[str] = frozenset()
    colour: str | None = None
    detail: Callable[[Any], str] | None = None

    def module_class(self) -> Any:
        """The module class (``module`` may also be the class itself, e.g. for a kind added at run time)."""
        return resolve(self.module) if isinstance(self.module, str) else self.module

    def store_factory(self) -> Any:
        return resolve(self.store) if isinstance(self.store, str) else self.store
