"""kvlab: long-context efficiency techniques of open-weight LLMs, made real and measured."""

from __future__ import annotations

from . import presets  # a module that is also callable: kvlab.presets() lists the names
from .config import CompressSpec, LayerSpec, ModelConfig, MoESpec, RopeSpec
from .costs import costs  # binds kvlab.costs to the function, not the module of the same name
from .model import Model

__version__ = "0.1.0"

__all__ = ["CompressSpec", "LayerSpec", "MoESpec", "Model", "ModelConfig", "RopeSpec", "costs", "generate", "load", "presets"]


def __getattr__(name: str):
    # lazy: keep `import kvlab` light and free of import cycles
    if name == "generate":
        from .engine import generate
        return generate
    if name == "load":
        from .families import load
        return load
    raise AttributeError(name)
