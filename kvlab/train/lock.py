"""One writer per run directory: an exclusive ``flock`` on ``<out>/.lock`` held for the whole run.

The lock file records its holder (pid, host, start time) so a refused second run can say who holds it.
The kernel releases a ``flock`` when its process dies, so a lock file left by a killed run is stale by
construction: the next run takes it over and says so (``RunLock.stale`` holds the dead holder's record).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Self

from kvlab.errors import RunLockedError

LOCK = ".lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """``with RunLock(out):`` — hold the run directory ``out`` exclusively; RunLockedError if another process does."""

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out)
        self.path = self.out / LOCK
        self.stale: dict[str, Any] | None = None
        self._fd: int | None = None

    def acquire(self) -> Self:
        self.out.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            who = (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
                   if holder else "another process")
            raise RunLockedError(f"run directory {str(self.out)!r} is in use by {who} (lock {str(self.path)!r}); "
                                 "wait for that run to finish or choose another --out") from None
        previous = _read(fd)
        if previous and previous.get("pid") and previous.get("host") == socket.gethostname() \
                and not _alive(int(previous["pid"])):
            self.stale = previous
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # an empty lock file: nobody holds it
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read(fd: int) -> dict[str, Any]:
    try:
        data = os.pread(fd, 4096, 0)
        info = json.loads(data.decode()) if data.strip() else {}
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


__all__ = ["LOCK", "RunLock"]
