"""The process-wide pool of compute threads that in-process kernels split a block over.

numpy ufuncs (and numba ``nogil`` functions) release the GIL, so a big block
can be cut into ranges and run on a few threads. The pool is started on first
use and forgotten in a forked child (which has none of the parent's threads).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

MAX_THREADS = 8

_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def compute_threads() -> int:
    """Threads a block's arithmetic is split over: the CPUs this process may use, at most 8."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(n, MAX_THREADS))


def compute_pool() -> ThreadPoolExecutor:
    """The shared pool, started on first use."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(compute_threads(), thread_name_prefix="compute")
        return _POOL


def _forget_pool() -> None:
    global _POOL, _POOL_LOCK
    _POOL, _POOL_LOCK = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def split_ranges(n: int, parts: int, align: int = 1) -> list[slice]:
    """[0, n) cut into at most ``parts`` contiguous ranges, each a multiple of ``align`` long
    (but the last), so per-thread tiles line up with the single-threaded ones."""
    if n <= 0:
        return []
    per = -(-n // max(1, parts) // align) * align or align
    return [slice(a, min(a + per, n)) for a in range(0, n, per)]


def run_ranges(fn: Callable[[int, slice], None], ranges: list[slice]) -> None:
    """``fn(j, ranges[j])`` for every range, concurrently on the shared pool (inline for one)."""
    if len(ranges) == 1:
        fn(0, ranges[0])
        return
    jobs = [compute_pool().submit(fn, j, r) for j, r in enumerate(ranges)]
    for job in jobs:
        job.result()
