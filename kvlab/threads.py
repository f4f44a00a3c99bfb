"""The default number of compute threads: the CPUs this process may use that other work leaves idle.

torch starts one OpenMP thread per physical core whatever else runs. On a shared machine (2 cores, other jobs
running) those threads spin against each other and against the other jobs: ``kvlab bench`` and ``kvlab train``
ran 7-17x slower than with ``--threads 1`` (issue 17). The default here is

    threads = clamp(round(host_cpus - load), 1, usable),   usable = min(affinity, cgroup quota, physical cores)
                                                                     // processes on this node

where ``load`` is the 1-minute load average (runnable threads on the whole host, so it is compared with the
host's CPU count) and ``processes`` the local world size under torchrun. :func:`default_threads` is that rule as
a pure function; :func:`machine` reads its inputs (``os.sched_getaffinity``, cgroup v2 ``cpu.max`` or v1
``cpu.cfs_quota_us``, ``os.getloadavg``). When some usable CPU is busy with other work and the user has not set
``OMP_WAIT_POLICY``, :func:`prepare_openmp` sets it to ``PASSIVE`` before torch loads libgomp, so idle OpenMP
workers sleep instead of spinning on CPUs another job needs (libgomp reads the variable once, at load).
Nothing here imports torch except :func:`apply`.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ThreadPlan:
    """The machine as read, the thread count chosen from it, and why (one line for a benchmark card)."""

    threads: int
    usable: int
    host_cpus: int
    load: float
    given: str | None = None  # who gave the count ("--threads", "KVLAB_THREADS"), None: the default

    @property
    def busy(self) -> bool:
        """Other work occupies some of the usable CPUs (the default gives fewer threads than usable CPUs)."""
        return not self.given and self.threads < self.usable

    def describe(self) -> str:
        if self.given:
            return f"{self.threads} threads ({self.given})"
        return (f"{self.threads} threads (default: {self.usable} usable CPUs, load {self.load:.2f} on "
                f"{self.host_cpus} host CPUs)")


def default_threads(usable: int, host_cpus: int, load: float, processes: int = 1) -> int:
    """``clamp(round(host_cpus - load), 1, usable // processes)``: the idle CPUs, at most this process's share."""
    for name, v in (("usable", usable), ("host_cpus", host_cpus), ("processes", processes)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}={v!r}: must be a positive integer")
    if not isinstance(load, (int, float)) or not math.isfinite(load) or load < 0:
        raise ValueError(f"load={load!r}: must be a finite number >= 0")
    share = max(1, usable // processes)
    return max(1, min(share, math.floor(host_cpus - load + 0.5)))


def usable_cpus(affinity: int, quota: float | None = None, physical: int | None = None) -> int:
    """CPUs this process may run on: its affinity set, capped by a cgroup quota (whole CPUs, at least 1) and by
    the physical cores (torch's own default: hyperthreads add little to matrix products)."""
    n = affinity
    if quota is not None:
        n = min(n, max(1, math.floor(quota)))
    if physical:
        n = min(n, physical)
    return max(1, n)


def cgroup_quota(root: str | Path = "/sys/fs/cgroup", proc_cgroup: str | Path = "/proc/self/cgroup") -> float | None:
    """This process's CPU quota in CPUs (cgroup v2 ``cpu.max``, else v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``),
    or None when there is none or it cannot be read."""
    root = Path(root)
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        lines = []
    v2 = [ln.split(":", 2)[2] for ln in lines if ln.startswith("0::")]
    candidates = [root / v2[0].lstrip("/") / "cpu.max"] if v2 else []
    candidates.append(root / "cpu.max")
    for f in candidates:
        try:
            quota, period = f.read_text().split()[:2]
        except (OSError, ValueError):
            continue
        return None if quota == "max" else int(quota) / int(period)
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us


def machine() -> ThreadPlan:
    """Read this machine and choose the default (:func:`default_threads`)."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        affinity = os.cpu_count() or 1
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
    except ImportError:
        physical = None
    host = os.cpu_count() or affinity
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    usable = usable_cpus(affinity, cgroup_quota(), physical)
    procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)  # torchrun: processes sharing this node
    return ThreadPlan(default_threads(usable, host, load, max(1, procs)), usable, host, load)


WAIT_POLICY = "OMP_WAIT_POLICY"


def prepare_openmp(plan: ThreadPlan, environ: Any = None) -> str | None:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` when other work is busy (``plan.busy``), the user has not set it and torch
    is not loaded yet; returns the value set, else None."""
    env = os.environ if environ is None else environ
    if not plan.busy or WAIT_POLICY in env or "torch" in sys.modules:
        return None
    env[WAIT_POLICY] = "PASSIVE"
    return "PASSIVE"


_CHOSEN: ThreadPlan | None = None
ENV = "KVLAB_THREADS"  # the user's own default thread count, in place of the machine's


def apply(threads: int | None = None, plan: ThreadPlan | None = None) -> ThreadPlan:
    """Set torch's thread count: ``threads`` when given (the user's), else ``$KVLAB_THREADS``, else the default
    read from the machine (or ``plan``); the choice is remembered for :func:`chosen` (benchmark cards record it)."""
    global _CHOSEN
    import torch  # here, not at import: OMP_WAIT_POLICY must be set (prepare_openmp) before torch loads

    given = "--threads"
    if threads is None and os.environ.get(ENV, "").strip():
        text = os.environ[ENV].strip()
        if not text.isdigit() or int(text) < 1:
            raise ValueError(f"{ENV}={text!r}: must be a positive integer (the default thread count)")
        threads, given = int(text), ENV
    if threads is not None:
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise ValueError(f"threads={threads!r}: must be a positive integer")
        base = plan or machine()
        plan = ThreadPlan(threads, base.usable, base.host_cpus, base.load, given=given)
    else:
        plan = plan or machine()
    torch.set_num_threads(plan.threads)
    _CHOSEN = plan
    return plan


def chosen() -> ThreadPlan | None:
    """The last plan :func:`apply` set in this process (None: torch's own default is in force)."""
    return _CHOSEN


__all__ = ["ThreadPlan", "apply", "cgroup_quota", "chosen", "default_threads", "machine", "prepare_openmp",
           "usable_cpus"]
