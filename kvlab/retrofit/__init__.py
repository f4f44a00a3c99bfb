"""Retrofits: convert a pretrained model to a technique, keep every weight that still applies, and say what changed.

    >>> from kvlab.retrofit import apply
    >>> out = apply(kvlab.load("smollm2-135m"), "share-last:6")
    >>> out.report.summary(); kvlab.save(out.model, "smollm2-share6", tokenizer=tok)

Conversions (kvlab/retrofit/<name>.py, listed by name in :data:`TECHNIQUES`): cross-layer KV sharing (sharing.py),
sliding windows with sink tokens (window.py), query-head pruning by measured importance (heads.py), GQA/MHA -> MLA
by partial RoPE and a joint K/V SVD (mla.py); export.py writes a converted model as a transformers checkpoint where
an architecture expresses it. Recovery by
distillation is kvlab/train (``kvlab.train.distill``); measuring before/after is report.py.
"""

from __future__ import annotations

from .convert import Converted, Report, RetrofitError, convert
from .export import ExportError, export_hf
from .heads import head_importance, prune_heads
from .mla import to_mla
from .sharing import to_shared
from .techniques import TECHNIQUES, Technique, apply, parse, register
from .window import to_window

__all__ = ["TECHNIQUES", "Converted", "ExportError", "Report", "RetrofitError", "Technique", "apply", "convert",
           "export_hf", "head_importance", "parse", "prune_heads", "register", "to_mla", "to_shared", "to_window"]
