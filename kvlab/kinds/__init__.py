"""THE table of attention techniques: one :class:`~kvlab.kinds.base.Kind` record per ``LayerSpec.attention``.

This is the only place a kind's name is written. Config validation, module building (kvlab/model.py), cache
building (kvlab/cache/cache.py), the calculator (kvlab/costs), the CLI labels and the contract tests
(tests/test_contract.py) all read it. Adding a technique = one record here + its own files (docs/adding-a-technique.md).
Importing this package does not import torch.
"""

from __future__ import annotations

from . import cca, compressed, gqa, mla
from .base import DEEPSEEK_V4, PAGED, PAGED_STATE, AttnCost, Buffer, Kind, causal_positions, field_error, positive_int
from .cca import CCASpec
from .compressed import CompressSpec
from .gqa import GQASpec
from .mla import MLASpec


def _deepseek_v4(name: str, label: str, validate, examples: tuple, colour: str) -> Kind:
    """A record of one of DeepSeek V4's layer kinds: they share the module, store, price and sub-spec
    (kvlab/kinds/compressed.py) and differ in their checks (compressor, indexer), examples and colour."""
    return Kind(name=name, tag=name, label=label, page="docs/csa-hca.md", options=compressed.OPTIONS,
                validate=validate, price=compressed.price, assumption=compressed.ASSUMPTION,
                module="kvlab.layers.compressed:CompressedAttention", store="kvlab.cache.compressed:compressed_store",
                spec_field="compress", spec_type=CompressSpec, examples=examples, buffers=compressed.buffers,
                serving=DEEPSEEK_V4, tp_split=False, colour=colour, detail=compressed.detail)


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind(name="gqa", label="GQA / MQA / MHA", page="docs/attention.md", options=gqa.OPTIONS, validate=gqa.validate,
         price=gqa.price, assumption=gqa.ASSUMPTION, module="kvlab.layers.attention:Attention",
         store="kvlab.cache.gqa:gqa_store", spec_field="gqa", spec_type=GQASpec, moved=gqa.MOVED, can_share=True,
         examples=gqa.EXAMPLES, buffers=gqa.buffers, serving=PAGED, retrofits=frozenset({"window", "prune-heads", "mla"})),
    Kind(name="cca", tag="cca", label="CCA (compressed convolutional)", page="docs/cca.md", options=cca.OPTIONS,
         validate=cca.validate, price=cca.price, assumption=cca.ASSUMPTION, module="kvlab.layers.cca:CCAttention",
         store="kvlab.cache.cca:cca_store", spec_field="cca", spec_type=CCASpec, moved=cca.MOVED,
         examples=cca.EXAMPLES, buffers=gqa.buffers, serving=PAGED_STATE, colour="#009E73", detail=cca.detail),
    Kind(name="mla", tag="mla", label="MLA (latent)", page="docs/mla.md", options=mla.OPTIONS, validate=mla.validate,
         price=mla.price, assumption=mla.ASSUMPTION, module="kvlab.layers.mla:MLAttention",
         store="kvlab.cache.latent:latent_store", spec_field="mla", spec_type=MLASpec, examples=mla.EXAMPLES,
         buffers=mla.buffers, serving=PAGED, tp_split=False, colour="#D55E00", detail=mla.detail),
    # diagram colours: Okabe-Ito, colour-blind safe (gqa: kvlab/archplot.py's full / sliding-window pair)
    _deepseek_v4("csa", "CSA (compressed sparse)", compressed.validate_csa, compressed.CSA_EXAMPLES, "#CC79A7"),
    _deepseek_v4("hca", "HCA (heavily compressed)", compressed.validate_hca, compressed.HCA_EXAMPLES, "#E69F00"),
    _deepseek_v4("swa", "SWA (V4 sliding only)", compressed.validate_swa, compressed.SWA_EXAMPLES, "#F0E442"),
)}


DEFAULT = "gqa"  # the kind of a LayerSpec that names none


def register(kind: Kind) -> None:
    """Add a record at run time (a plug-in or a test's throwaway kind); its name must be new."""
    if kind.name in KINDS:
        raise ValueError(f"attention kind {kind.name!r} is already in the table")
    KINDS[kind.name] = kind


def unregister(name: str) -> None:
    """Remove a record added with :func:`register`."""
    KINDS.pop(name, None)


def get(name: str) -> Kind:
    """The record of attention kind ``name``; a ValueError listing the known kinds otherwise."""
    try:
        return KINDS[name]
    except (KeyError, TypeError):
        raise ValueError(f"attention={name!r}: allowed kinds: {', '.join(KINDS)}") from None


def layer_label(layer) -> str:
    """``"full"``, ``"window 512"``, ``"window 512 + 4 sink tokens"``, ``"cca full"``, ``"csa window 128"``: a layer's
    kind for per-layer tables."""
    base = "full" if layer.window is None else f"window {layer.window}"
    if gqa.sink_tokens(layer):
        base += f" + {gqa.sink_tokens(layer)} sink tokens"
    tag = get(layer.attention).tag
    return f"{tag} {base}" if tag else base


def takes(name: str, retrofit: str) -> bool:
    """Whether retrofit ``retrofit`` (kvlab/retrofit) converts a layer of kind ``name`` (``Kind.retrofits``)."""
    return retrofit in get(name).retrofits


def taking(retrofit: str) -> str:
    """The kinds ``retrofit`` converts, for messages (``"gqa"``)."""
    return ", ".join(k.name for k in KINDS.values() if retrofit in k.retrofits) or "no"


def kind_options() -> frozenset[str]:
    """Every LayerSpec field that belongs to some kind (the rest are shared by all)."""
    return frozenset().union(*(k.options for k in KINDS.values()))


def owners(option: str) -> list[str]:
    """The kinds that read LayerSpec field ``option``."""
    return [k.name for k in KINDS.values() if option in k.options]


def with_spec(spec_type: type) -> list[str]:
    """The kinds whose sub-spec is ``spec_type`` (``GQASpec`` -> ``["gqa"]``), for messages."""
    return [k.name for k in KINDS.values() if k.spec_type is spec_type]


__all__ = ["DEFAULT", "KINDS", "AttnCost", "Buffer", "CCASpec", "CompressSpec", "GQASpec", "Kind", "MLASpec",
           "causal_positions", "field_error", "get", "kind_options", "layer_label", "owners", "positive_int", "register",
           "takes", "taking", "unregister", "with_spec"]
