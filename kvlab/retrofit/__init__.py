"""Retrofits: convert a pretrained model to a technique, keep every weight that still applies, and say what changed.

    >>> from kvlab.retrofit import apply
    >>> out = apply(kvlab.load("smollm2-135m"), "share-last:6")
    >>> out.report.summary(); kvlab.save(out.model, "smollm2-share6", tokenizer=tok)

Conversions (kvlab/retrofit/<name>.py, listed by name in :data:`TECHNIQUES`, techniques.py): cross-layer KV sharing
(sharing.py), sliding windows with sink tokens (window.py), query-head pruning by measured importance (heads.py),
GQA/MHA -> MLA by partial RoPE and a joint K/V SVD (mla.py), KV formats (quant.py); each builds the new config (its
checks run from the config alone by ``check(config, technique)``, before any weight loads) and hands the weight
carrying to core.py (``convert``: carried / derived / initialised / dropped, the Report). export.py
writes a converted model as a transformers checkpoint where an architecture expresses it. Recovery by distillation is
kvlab/train (``kvlab.train.distill``); measuring before/after is report.py.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import RetrofitError
from .techniques import TECHNIQUES, Technique, apply, check, parse, register

# The technique table (and so ``kvlab retrofit --help``) imports without torch; the conversions load on first use
# (PEP 562 module ``__getattr__``, as ``kvlab`` itself does). name -> its module.
_LAZY = {"Converted": "core", "Derived": "core", "Report": "core", "convert": "core", "ExportError": "export",
         "export_hf": "export", "head_importance": "heads", "prune_heads": "heads", "to_mla": "mla",
         "to_shared": "sharing", "to_window": "window"}

__all__ = ["TECHNIQUES", "Converted", "Derived", "ExportError", "Report", "RetrofitError", "Technique", "apply", "check",
           "convert", "export_hf", "head_importance", "parse", "prune_heads", "register", "to_mla", "to_shared", "to_window"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'kvlab.retrofit' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
