"""Published model configurations as :class:`~kvlab.config.ModelConfig` objects.

``presets()`` lists the names, ``get_preset(name)`` builds a fresh config, ``register(name, fn, source)``
lets a family module add its own. Every preset cites its source in ``ModelConfig.source``.
"""

import sys
import types

from kvlab.presets import baselines, deepseek, deepseek_v4, gemma3, gemma4, laguna, zaya  # noqa: F401  (registers)
from kvlab.presets.registry import find_preset, get_preset, preset, preset_source, presets, register

__all__ = ["find_preset", "get_preset", "preset", "preset_source", "presets", "register"]


class _CallablePresets(types.ModuleType):
    """Lets ``kvlab.presets()`` (DESIGN.md) list the names while ``kvlab.presets`` stays this module."""

    def __call__(self) -> list[str]:
        return presets()


sys.modules[__name__].__class__ = _CallablePresets
