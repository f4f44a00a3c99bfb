"""kvlab: long-context efficiency techniques of open-weight LLMs, made real and measured.

``import kvlab`` (and ``kvlab.config``, ``kvlab.kinds``, ``kvlab.costs``) does not import torch; the model,
the loaders, the presets and generation are imported on first use (PEP 562 module ``__getattr__``).
"""

from __future__ import annotations

import importlib
from typing import Any

from .config import CCASpec, CompressSpec, GQASpec, LayerSpec, MLASpec, ModelConfig, MoESpec, RopeSpec
from .costs import costs  # binds kvlab.costs to the function, not the package of the same name

__version__ = "0.1.0"

__all__ = ["CCASpec", "CompressSpec", "GQASpec", "LayerSpec", "MLASpec", "MoESpec", "Model", "ModelConfig", "RopeSpec",
           "costs", "generate", "load", "presets", "save"]

# name -> (module, attribute); attribute None: the module itself (kvlab.presets is a callable module)
_LAZY = {"Model": ("kvlab.model", "Model"), "generate": ("kvlab.engine", "generate"),
         "load": ("kvlab.loading", "load"), "presets": ("kvlab.presets", None),
         "save": ("kvlab.native", "save")}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'kvlab' has no attribute {name!r}")
    module, attr = _LAZY[name]
    mod = importlib.import_module(module)
    return mod if attr is None else getattr(mod, attr)
