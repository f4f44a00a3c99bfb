"""Names kvlab knows (presets, architectures, installed models): case-insensitive lookup, "did you mean"
suggestions (difflib), and what to answer for a Hugging Face hub id (kvlab never downloads)."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable
from pathlib import Path

from .errors import UnknownNameError
from .models import MODELS

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def find(name: str, choices: Iterable[str]) -> str | None:
    """``name`` itself when it is one of ``choices``, else the one choice equal to it ignoring case, else None."""
    choices = list(choices)
    if name in choices:
        return name
    folded = [c for c in choices if c.casefold() == name.casefold()]
    return folded[0] if len(folded) == 1 else None


def suggestions(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """Up to ``n`` choices nearest to ``name`` (difflib ratio >= 0.6 and within 0.05 of the nearest, ignoring case),
    nearest first."""
    by_fold = {c.casefold(): c for c in choices}
    key = name.casefold()
    near = difflib.get_close_matches(key, list(by_fold), n=n, cutoff=0.6)

    def ratio(m: str) -> float:
        return difflib.SequenceMatcher(None, key, m).ratio()

    return [by_fold[m] for m in near if ratio(m) >= ratio(near[0]) - 0.05]


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """``"; did you mean gemma-4-e2b?"`` (or two or three names), or ``""`` when nothing is near."""
    near = suggestions(name, choices)
    if not near:
        return ""
    return "; did you mean " + (near[0] if len(near) == 1 else ", ".join(near[:-1]) + " or " + near[-1]) + "?"


def unknown(kind: str, name: str, choices: Iterable[str]) -> UnknownNameError:
    """UnknownNameError: ``unknown <kind> 'x'; did you mean ...?; available: ...``."""
    choices = sorted(choices)
    return UnknownNameError(f"unknown {kind} {name!r}{did_you_mean(name, choices)}; available: "
                            f"{', '.join(choices) or '(none)'}")


def installed_models() -> list[str]:
    """Names of the real models kvlab can load from installed packages (kvlab/models.py)."""
    return sorted(MODELS)


def hf_cache_snapshots(hub_id: str) -> list[Path]:
    """Snapshot directories of ``hub_id`` already in the local Hugging Face cache (holding a config.json)."""
    home = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface"), "hub")
    snaps = Path(home) / f"models--{hub_id.replace('/', '--')}" / "snapshots"
    return sorted(p for p in snaps.glob("*") if (p / "config.json").is_file()) if snaps.is_dir() else []


def unknown_model(spec: str, presets: Iterable[str]) -> UnknownNameError:
    """The error for a model argument that is neither a path nor a known name, saying what kvlab can read instead;
    a hub id (``owner/name``) is answered with the cached snapshot, the matching preset and the local options."""
    presets = sorted(presets)
    models = installed_models()
    if HUB_ID.match(spec) and not Path(spec).exists():
        tail = spec.split("/", 1)[1]
        near = suggestions(tail, presets + models, n=1)
        snaps = hf_cache_snapshots(spec)
        lines = [f"{spec!r} looks like a Hugging Face hub id; kvlab reads local files only and never downloads"]
        if snaps:
            lines.append(f"it is in your Hugging Face cache: pass {str(snaps[-1])!r}")
        lines.append(f"pass a local checkpoint directory (config.json + *.safetensors), e.g. after "
                     f"`huggingface-cli download {spec} --local-dir ./{tail}`: ./{tail}")
        lines.append("or a GGUF file (model.gguf)")
        if near:
            lines.append(f"or the preset {near[0]} (its published configuration: calculator and random-weight "
                         "benchmarks)" if near[0] in presets else f"or the installed model {near[0]}")
        if models:
            lines.append(f"installed models: {', '.join(models)}")
        return UnknownNameError("; ".join(lines))
    return UnknownNameError(f"unknown model {spec!r} (not a preset, an installed model, a file or a directory)"
                            f"{did_you_mean(spec, presets + models)}; presets: "
                            f"{', '.join(presets)}" + (f"; installed models: {', '.join(models)}" if models else ""))


__all__ = ["did_you_mean", "find", "hf_cache_snapshots", "installed_models", "suggestions", "unknown", "unknown_model"]
