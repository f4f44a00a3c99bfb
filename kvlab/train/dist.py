"""Data parallelism on ``torch.distributed``: launched by ``torchrun``, gloo on CPU, nccl on GPU.

Each process computes the gradient of its share of the global batch, normalised by the *global*
number of scored tokens; the gradients are then summed across processes with one all-reduce per
step. The result is the gradient of one process that saw the whole batch, so N processes with
``1/N`` of the per-process batch give the same losses as one process (up to float summation order).
"""

from __future__ import annotations

import gc
import json
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    initialised_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the processes, in place (nothing to do with one process)."""
        if self.size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def sum_grads_(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients of ``params`` over the processes (missing gradients count as zero)."""
        if self.size == 1:
            return
        # a parameter no process touched (an unused expert) keeps grad None, as in one process:
        # AdamW then skips it instead of decaying it with a zero gradient
        dev = params[0].device
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=dev)
        dist.all_reduce(has, op=dist.ReduceOp.SUM)
        live = [p for p, h in zip(params, has.tolist()) if h > 0]
        grads = []
        for p in live:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()

    def broadcast_json(self, obj: Any, src: int = 0) -> Any:
        """``obj`` (anything ``json`` writes) as process ``src`` holds it, on every process: JSON bytes in a uint8
        tensor (no pickle), its length first."""
        if self.size == 1:
            return obj
        data = json.dumps(obj).encode() if self.rank == src else b""
        n = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        dist.broadcast(n, src=src)
        buf = torch.zeros(int(n.item()), dtype=torch.uint8, device=self.device)
        if self.rank == src:
            buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        dist.broadcast(buf, src=src)
        return json.loads(bytes(buf.cpu().tolist()).decode())

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def close(self) -> None:
        """Destroy the group this process created (a group found already open is left to its owner).

        Garbage (a sharded teacher, optimizer moments: FSDP2 state sits in reference cycles) is collected first, so
        DTensors and gloo work objects die while the group and the interpreter are alive, not in interpreter
        finalization: a rare SIGABRT of one process after a finished ``train --fsdp`` run was seen there."""
        if self.initialised_here and dist.is_initialized():
            gc.collect()
            dist.destroy_process_group()


def setup(device: str = "auto", timeout_s: float | None = None) -> World:
    """The process group from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), if any.

    ``device``: ``auto`` (``cuda:LOCAL_RANK`` when CUDA is available, else CPU), ``cpu`` or ``cuda``.
    Backend: nccl for CUDA devices, gloo on CPU. ``timeout_s``: how long a collective waits for the other processes
    (torch's default when None); a caller whose process 0 works alone for long (a conversion) sets it.
    A group that already exists is used as it is (and left open by :meth:`World.close`).
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device={device!r}: allowed auto, cpu, cuda")
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device='cuda' but CUDA is not available")
    dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    here = False
    if size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                                **({"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}))
        here = True
    if size > 1:
        rank, size = dist.get_rank(), dist.get_world_size()
    return World(rank=rank, size=size, local_rank=local, device=dev, initialised_here=here)


__all__ = ["World", "setup"]
