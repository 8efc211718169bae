"""Real faults for the fault tests: a Dask worker plugin that SIGKILLs a process mid-job.

A plugin, not a timer in the test, so that the kill lands inside the job on
any machine (a fast machine would finish a tiny run before a timer fires):
the first worker to start its ``n``-th task kills ``pid`` (itself by default)
``delay`` seconds later, while that task is running. A marker file created
with ``O_EXCL`` makes it happen exactly once per test, even though the nanny
restarts the killed worker and the scheduler re-sends the plugin to it.

Also a Dask preload (``dask worker --preload faults``): the same plugin from
``RLVR_FAULT_*`` environment variables, for workers started outside pytest
(the scheduler-kill test kills the scheduler's PID from a worker).
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

from distributed import WorkerPlugin


class KillAtTask(WorkerPlugin):
    """SIGKILL ``pid`` (default: the worker itself) once, ``delay`` s after the n-th task starts."""

    name = "rlvr-fault"

    def __init__(self, n: int, marker: str | Path, pid: int | None = None,
                 delay: float = 0.005) -> None:
        self.n = n
        self.marker = str(marker)
        self.pid = pid
        self.delay = delay
        self.started = 0

    def setup(self, worker: object) -> None:
        self.started = 0

    def transition(self, key: object, start: str, finish: str, **kwargs: object) -> None:
        if finish != "executing":
            return
        self.started += 1
        if self.started != self.n:
            return
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return  # another worker (or this one before its restart) already did it
        target = self.pid or os.getpid()
        os.write(fd, f"{os.getpid()} killed {target} at task {key!r}\n".encode())
        os.close(fd)
        threading.Timer(self.delay, os.kill, (target, signal.SIGKILL)).start()


def dask_setup(worker: object) -> None:
    """Preload entry point: install ``KillAtTask`` from the environment, if asked for."""
    marker = os.environ.get("RLVR_FAULT_MARKER")
    if not marker:
        return
    pid = os.environ.get("RLVR_FAULT_PID")
    plugin = KillAtTask(int(os.environ.get("RLVR_FAULT_N", "3")), marker,
                        int(pid) if pid else None, float(os.environ.get("RLVR_FAULT_DELAY",
                                                                        "0.005")))
    worker.plugins[plugin.name] = plugin  # type: ignore[attr-defined]
