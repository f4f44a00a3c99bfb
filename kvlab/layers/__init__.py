"""Building blocks, one technique per file.

``ATTENTION_MODULES`` maps a LayerSpec's ``attention`` kind to the module class that implements it
(``cls(spec, hidden, eps, norm_offset)``); a new kind registers itself with :func:`register_attention`.
"""

from __future__ import annotations

from torch import nn

from .attention import Attention
from .cca import CCAttention
from .compressed import CompressedAttention
from .mla import MLAttention

ATTENTION_MODULES: dict[str, type[nn.Module]] = {"gqa": Attention, "cca": CCAttention,
                                                "csa": CompressedAttention, "hca": CompressedAttention,
                                                "swa": CompressedAttention}


def register_attention(kind: str, cls: type[nn.Module]) -> None:
    """Register the module class of an attention kind."""
    ATTENTION_MODULES[kind] = cls


register_attention("mla", MLAttention)  # multi-head latent attention (DeepSeek V2/V3; kvlab/layers/mla.py)


__all__ = ["ATTENTION_MODULES", "register_attention"]
