"""The preset registry: published configurations by name, each citing its source."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvlab.config import ModelConfig
from kvlab.names import find, unknown


@dataclass(frozen=True)
class _Entry:
    fn: Callable[[], ModelConfig]
    source: str


_REGISTRY: dict[str, _Entry] = {}


def register(name: str, fn: Callable[[], ModelConfig], source: str, *, replace: bool = False) -> None:
    """Add a preset: ``fn()`` builds a fresh ModelConfig; ``source`` cites the model card / config.json."""
    if not isinstance(name, str) or not name or name != name.strip():
        raise ValueError(f"preset name={name!r}: must be a non-empty string without surrounding spaces")
    if not callable(fn):
        raise TypeError(f"preset {name!r}: fn must be callable, got {type(fn).__name__}")
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"preset {name!r}: source must cite where the numbers come from")
    if name in _REGISTRY and not replace:
        raise ValueError(f"preset {name!r} is already registered (pass replace=True to override)")
    _REGISTRY[name] = _Entry(fn, source)


def preset(name: str, source: str) -> Callable[[Callable[[], ModelConfig]], Callable[[], ModelConfig]]:
    """Decorator form of :func:`register`."""

    def deco(fn: Callable[[], ModelConfig]) -> Callable[[], ModelConfig]:
        register(name, fn, source)
        return fn

    return deco


def presets() -> list[str]:
    """Sorted names of the registered presets."""
    return sorted(_REGISTRY)


def get_preset(name: str) -> ModelConfig:
    """A fresh ModelConfig for ``name``; unknown names raise ValueError listing the available ones."""
    entry = _entry(name)
    cfg = entry.fn()
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"preset {name!r} builder returned {type(cfg).__name__}, expected ModelConfig")
    if not cfg.source:
        cfg.source = entry.source
    if cfg.name == "custom":
        cfg.name = find_preset(name) or name
    return cfg


def preset_source(name: str) -> str:
    """The source a preset was registered with."""
    return _entry(name).source


def find_preset(name: str) -> str | None:
    """The registered name ``name`` denotes (exact, else ignoring case), or None."""
    return find(name, _REGISTRY) if isinstance(name, str) else None


def _entry(name: str) -> _Entry:
    found = find_preset(name)
    if found is None:
        raise unknown("preset", str(name), presets())
    return _REGISTRY[found]
