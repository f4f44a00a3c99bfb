"""Paths of the real GGUF files of the installed model packages (kvlab.models; skipped when not installed)."""

from __future__ import annotations

from pathlib import Path

import pytest


def real_model_path(name: str) -> Path:
    """The GGUF file of the named model (``smollm2-135m``, ``gemma-3-270m``), or skip the test naming the package."""
    from kvlab.models import model_file

    try:
        return model_file(name)
    except ValueError as e:
        pytest.skip(str(e))
