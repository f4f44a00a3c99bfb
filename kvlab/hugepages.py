"""Big CPU buffers in transparent huge pages (2 MiB) rather than 4 KiB pages: fewer TLB misses when a decode step
streams the K/V cache and the weights.

Linux gives an ordinary allocation huge pages only when THP is ``always``; under ``madvise`` (a common default)
memory must be advised before its first touch. :func:`empty` maps a private anonymous region 2 MiB longer than the
tensor (untouched slack, to align its start), advises ``MADV_HUGEPAGE`` the whole huge pages the tensor covers from
its first 2 MiB boundary (its tail, under 2 MiB, stays in small pages: at most 4 KiB more memory than
``torch.empty``) and returns the tensor there (its storage exactly its bytes, holding the region, unmapped when the
storage is freed). Anything else falls back to ``torch.empty``, silently: a buffer under :data:`MIN_BYTES`, a device
other than the CPU, a traced step, another OS, THP ``never``, or ``KVLAB_HUGEPAGES=0`` in the environment (read at
import; :data:`ENABLED` is the switch).

Used by the cache stores' buffers (kvlab/cache/growth.py) and the weights (kvlab/loading.py, ``Model.from_config``).
"""

from __future__ import annotations

import math
import mmap
import os
import re
import sys

import torch
from torch import nn

HUGE = 2 << 20  # one huge page (x86-64, arm64 with 4 KiB base pages)
MIN_BYTES = HUGE  # smaller buffers: torch.empty (a huge page would be mostly empty)
ENABLED = os.environ.get("KVLAB_HUGEPAGES", "1") != "0"
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"
_mode: str | None = None  # THP's mode, read once ("" where unreadable)


def thp_mode() -> str:
    """The kernel's THP mode (``always``, ``madvise``, ``never``); empty where it cannot be read (not Linux)."""
    global _mode
    if _mode is None:
        try:
            with open(_THP) as f:
                m = re.search(r"\[(\w+)\]", f.read())
        except OSError:
            m = None
        _mode = m[1] if m else ""
    return _mode


def available() -> bool:
    """Whether huge pages can be asked for here: Linux with ``MADV_HUGEPAGE`` and THP ``always`` or ``madvise``."""
    return sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE") and thp_mode() in ("always", "madvise")


def describe() -> str:
    """Where big CPU buffers go, for a benchmark card: ``on (THP madvise)``, ``off (KVLAB_HUGEPAGES=0)`` or
    ``unavailable``."""
    if not available():
        return "unavailable"
    return f"on (THP {thp_mode()})" if ENABLED else "off (KVLAB_HUGEPAGES=0)"


def empty(shape: tuple[int, ...] | list[int] | torch.Size, dtype: torch.dtype, device="cpu") -> torch.Tensor:
    """``torch.empty(shape, dtype, device)``, in huge pages where it can be (see the module): the tensor starts at a
    2 MiB boundary of memory advised ``MADV_HUGEPAGE`` (zeros: a fresh mapping, untouched until written)."""
    device = torch.device(device)
    nbytes = math.prod(shape) * dtype.itemsize
    if (not ENABLED or device.type != "cpu" or nbytes < MIN_BYTES or torch.compiler.is_compiling()
            or not available()):
        return torch.empty(shape, dtype=dtype, device=device)
    try:
        m = mmap.mmap(-1, nbytes + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # room to align the start
        at = -torch.frombuffer(m, dtype=torch.uint8, count=1).data_ptr() % HUGE
        m.madvise(mmap.MADV_HUGEPAGE, at, nbytes // HUGE * HUGE)  # whole huge pages; the tail in small ones
        raw = torch.frombuffer(m, dtype=torch.uint8, count=nbytes, offset=at)  # holds the mapping while it lives
    except (OSError, ValueError):
        return torch.empty(shape, dtype=dtype, device=device)
    return raw.view(dtype).view(shape)


def like(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` (contiguous) in memory from :func:`empty`."""
    out = empty(t.shape, t.dtype, t.device)
    out.copy_(t)
    return out


def adopt(module: nn.Module) -> nn.Module:
    """Move ``module``'s big CPU parameters and buffers (:data:`MIN_BYTES` and over, contiguous, not views sharing
    a storage) into huge pages, in place (``.data`` swapped: ties between modules holding one Parameter are kept);
    the rest stay. No-op where :func:`empty` falls back."""
    if not ENABLED or not available():
        return module
    seen: set[int] = set()
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) in seen or t.device.type != "cpu" or t.numel() * t.element_size() < MIN_BYTES:
            continue
        seen.add(id(t))
        if not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            continue  # a view of a larger storage (another tensor may share it): left where it is
        if t.data_ptr() % HUGE == 0:
            continue  # already from empty() (or aligned as if)
        t.data = like(t.data)
    return module


def huge_bytes(t: torch.Tensor) -> int:
    """Bytes of the mappings holding ``t``'s data that the kernel backs with huge pages (``AnonHugePages`` in
    /proc/self/smaps, summed over the mappings ``t`` spans; 0 where that file is missing)."""
    lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    total, inside = 0, False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
                if head:
                    inside = int(head[1], 16) < hi and int(head[2], 16) > lo
                elif inside and line.startswith("AnonHugePages:"):
                    total += int(line.split()[1]) * 1024
    except OSError:
        return 0
    return total


__all__ = ["ENABLED", "HUGE", "MIN_BYTES", "adopt", "available", "describe", "empty", "huge_bytes", "like", "thp_mode"]
