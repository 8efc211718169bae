"""Peak resident memory of a process tree (the process and its Dask workers), sampled."""

from __future__ import annotations

import threading
import time

import psutil


def tree_rss(pid: int | None = None) -> int:
    """RSS of ``pid`` (default: this process) plus all its descendants, in bytes."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


class PeakRSS:
    """Context manager that samples ``tree_rss`` every ``every`` seconds and keeps the peak."""

    def __init__(self, pid: int | None = None, every: float = 0.05) -> None:
        self.pid = pid
        self.every = every
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            time.sleep(self.every)

    def __enter__(self) -> PeakRSS:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
