"""Fully sharded data parallel for the trainer: PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``), for a model
whose weights, gradients and AdamW moments do not fit one process (``[train] fsdp = true`` / ``kvlab train --fsdp``
under ``torchrun``; gloo on CPU, nccl on GPU).

Every block of ``model.layers`` is one FSDP unit and the model itself the root unit (embeddings, final norm, head):
each process holds ``1/N`` of every parameter (a ``DTensor`` sharded on dim 0), of its gradient and of its AdamW
moments; a unit's full weights exist only while it runs. The data split and the loss are those of data parallel
(kvlab/train/dist.py): each process scores its share of the global batch, divided by the global token count, so the
gradients are *summed* over processes (divide factor 1, not FSDP's default mean) and a sharded run computes what one
process with the whole batch computes, up to float summation order (tests/test_train.py). A frozen teacher is
sharded the same way (forward only). Checkpoints gather the full tensors (a collective on every process) and rank 0
writes them, in the same layout as an unsharded run: a sharded run resumes unsharded and the reverse.

Each process still loads the whole model once before it is sharded (``[model] init``): what FSDP saves is the
gradients, the optimizer moments and the training-time copies, 3x the weights with AdamW.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


class _Shared:
    """The forward call's :class:`~kvlab.layers.core.Step` handed to a sharded block by reference. FSDP2 rebuilds every
    dataclass argument that holds a tensor requiring grad (``dataclasses.replace``, dicts copied), so a block would
    publish its K/V into a copy that the layers reading them (cross-layer sharing) never see; this wrapper is no
    dataclass, and reads and writes go to the one Step."""

    __slots__ = ("_step",)

    def __init__(self, step: Any) -> None:
        object.__setattr__(self, "_step", step)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._step, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._step, name, value)


def _by_reference(module: torch.nn.Module, args: tuple) -> tuple:
    return tuple(_Shared(a) if dataclasses.is_dataclass(a) and not isinstance(a, type) else a for a in args)


def shard(model: torch.nn.Module, blocks: torch.nn.ModuleList | None = None) -> torch.nn.Module:
    """Shard ``model`` in place over the default process group: each of ``blocks`` (default ``model.layers``) one
    FSDP unit, then the root; gradients summed, not averaged. Returns ``model`` (now also an ``FSDPModule``)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    for block in model.layers if blocks is None else blocks:
        fully_shard(block)
        block.register_forward_pre_hook(_by_reference, prepend=True)  # before FSDP's own pre-forward hook
    fully_shard(model)
    for m in model.modules():
        if isinstance(m, FSDPModule):  # the loss is already divided by the global token count (kvlab/train/dist.py)
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
    return model


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor (a parameter, gradient or optimizer moment of a sharded model)."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective: every process must call it, in the same order); ``t`` itself
    otherwise."""
    return t.full_tensor() if is_sharded(t) else t


def like(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor, the same on every process) laid out as ``target``: this process's shard when
    ``target`` is a DTensor (sliced locally, no communication), else ``value`` on ``target``'s device."""
    if not is_sharded(target):
        return value.to(target.device)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(target.device_mesh.device_type), target.device_mesh, target.placements,
                             src_data_rank=None)


def scalar(t: torch.Tensor | float) -> float:
    """A Python float of a 0-dim tensor or DTensor (a gradient norm)."""
    if isinstance(t, torch.Tensor):
        return float(full(t))
    return float(t)


__all__ = ["full", "is_sharded", "like", "scalar", "shard"]
