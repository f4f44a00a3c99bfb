"""kvlab's named errors: every one is a ValueError (the CLI prints ``kvlab: error: ...`` and exits with 2).

Each message names the thing at fault (field, file, tensor, directory) and what is allowed or what to do.
"""

from __future__ import annotations


class KvlabError(ValueError):
    """Base of kvlab's named errors."""


class ConfigError(KvlabError):
    """A configuration field has the wrong type or a value outside its allowed range."""


class RetrofitError(ConfigError):
    """A conversion that cannot apply to this model (names the layer and the option; kvlab/retrofit)."""


class CheckpointError(KvlabError):
    """A checkpoint file is missing, damaged, unsafe or holds tensors that cannot be used."""


class RunLockedError(KvlabError):
    """Another live process is writing to the same training run directory."""


class TrainingDivergedError(KvlabError):
    """Training produced a non-finite loss or gradient; the last good checkpoint was kept."""


class CheckpointWriteError(KvlabError):
    """Writing a training checkpoint failed (disk full, ...); the previous checkpoint was kept."""


class InsufficientMemoryError(KvlabError):
    """What was asked would need more memory than is available (checked before allocating)."""


class UnknownNameError(KvlabError):
    """A preset, family or model name kvlab does not know; the message suggests the nearest names."""


__all__ = ["CheckpointError", "CheckpointWriteError", "ConfigError", "InsufficientMemoryError", "KvlabError",
           "RunLockedError", "TrainingDivergedError", "UnknownNameError"]


class FitError(KvlabError):
    """A fit question that has no answer as asked (bad batch, context, tensor-parallel size...)."""
