"""What a model argument names, as a :class:`~kvlab.config.ModelConfig`: a preset, an installed model, a GGUF file, a
checkpoint directory (HF or kvlab's own) or a ModelConfig ``.json`` file.

Only configs are read here (headers and JSON, never weights), and nothing imports torch: the calculator
(``kvlab.costs``), ``kvlab calc`` / ``compare`` / ``fit`` and the benchmark resolve their model argument here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import ModelConfig
from .families import config_from_dir, config_from_gguf
from .gguf_checkpoint import is_gguf
from .models import MODELS, is_named, resolve_file
from .names import find, installed_models, unknown_model
from .native import native_checkpoint
from .presets import find_preset, get_preset, presets


def resolve_config(model: Any) -> ModelConfig:
    """A ModelConfig from a ModelConfig, a preset name, a checkpoint directory or an object with ``.config``."""
    if isinstance(model, ModelConfig):
        return model
    if isinstance(getattr(model, "config", None), ModelConfig):
        return model.config
    if isinstance(model, (str, Path)):
        if isinstance(model, str) and find_preset(model) is not None:  # any case
            return get_preset(model)
        model = resolve_file(model)  # a named installed model -> its GGUF file
        if is_gguf(model):
            return config_from_gguf(model)  # the header only
        native = native_checkpoint(model)  # a kvlab train run / checkpoint
        if native is not None:
            return native.config
        path = Path(model)
        if path.is_dir() and (path / "config.json").is_file():
            return config_from_dir(path)
        raise ValueError(f"model={str(model)!r} is neither a preset, a named model, a .gguf file nor a directory "
                         f"with config.json; presets: {', '.join(presets())}; named models: {', '.join(MODELS)}")
    raise ValueError(f"model must be a ModelConfig, a preset name, a checkpoint directory or have a .config "
                     f"ModelConfig; got {type(model).__name__}")


def resolve_spec(spec: str | Path | ModelConfig) -> ModelConfig:
    """A ModelConfig from a preset name, a checkpoint dir, a kvlab ModelConfig ``.json`` file or a ModelConfig; an
    unknown name suggests the nearest presets and installed models (kvlab/names.py)."""
    if isinstance(spec, ModelConfig):
        return spec
    p = Path(spec)
    if p.is_file() and p.suffix == ".json":
        hf_config_file(p)
        try:
            return ModelConfig.load(p)
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"{str(p)!r} is not a kvlab ModelConfig JSON file: {e}") from e
    if p.is_dir() and not (p / "config.json").is_file() and not is_checkpoint(p):
        raise ValueError(f"{str(p)!r} is a directory without config.json; expected a checkpoint directory")
    if isinstance(spec, str) and not p.exists():  # a name: a preset (any case), an installed model, else suggestions
        name = find_preset(spec)
        if name is not None:
            return get_preset(name)
        model = find(spec, installed_models())
        if model is None and p.suffix != ".gguf":
            raise unknown_model(spec, presets())
        spec = model or spec
    return resolve_config(str(spec))


def hf_config_file(p: Path) -> None:
    """Refuse a checkpoint's own ``config.json`` given where its directory is expected (naming the directory)."""
    if p.name != "config.json" or not p.is_file():
        return
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError):
        return
    if isinstance(d, dict) and ("architectures" in d or "model_type" in d):
        raise ValueError(f"{str(p)!r} is a checkpoint's config.json: pass the directory {str(p.parent)!r} instead")


def is_checkpoint(spec: Any) -> bool:
    """``spec`` names weights to load: a checkpoint directory (HF or kvlab's own), a ``.gguf`` file or a named model."""
    if is_gguf(spec) or is_named(spec):
        return True
    if not isinstance(spec, (str, Path)) or not Path(spec).is_dir():
        return False
    return (Path(spec) / "config.json").is_file() or native_checkpoint(spec) is not None


__all__ = ["hf_config_file", "is_checkpoint", "resolve_config", "resolve_spec"]
