"""Building blocks, one technique per file; shared machinery (masks, attention, RoPE) in attention.py / rope.py.

Which module implements an attention kind is written in its record in the kinds table (kvlab/kinds):
:func:`attention_module` builds it.
"""

from __future__ import annotations

from torch import nn

from .. import kinds


def attention_module(spec, hidden: int, eps: float, norm_offset: bool) -> nn.Module:
    """The attention module of ``spec.attention`` (from its record), built as ``cls(spec, hidden, eps, norm_offset)``."""
    return kinds.get(spec.attention).module_class()(spec, hidden, eps, norm_offset)


__all__ = ["attention_module"]
