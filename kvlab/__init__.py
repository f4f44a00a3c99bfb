"""kvlab: long-context efficiency techniques of open-weight LLMs, made real and measured."""

from __future__ import annotations

from .config import LayerSpec, ModelConfig, MoESpec, RopeSpec
from .model import Model

__version__ = "0.1.0"

__all__ = ["LayerSpec", "MoESpec", "Model", "ModelConfig", "RopeSpec", "costs", "generate", "load", "presets"]


def __getattr__(name: str):
    # lazy: keep `import kvlab` light and free of import cycles
    if name == "generate":
        from .engine import generate
        return generate
    if name == "load":
        from .families import load
        return load
    if name == "costs":
        from .costs import costs
        return costs
    if name == "presets":
        from .presets import presets
        return presets
    raise AttributeError(name)
