"""Chunk files written behind the caller's back: a thread per writer, direct I/O where it can.

The fit writes 12 bytes of float32 results per element for ~2.5 bytes of
compressed store read, so how it writes matters more than how it reads.
Written in the task's own thread through the page cache, every chunk was a
memory copy into pages the kernel had to find first: on the 2-core VM of
the benchmarks new page-cache pages came at 0.35-0.4 GB/s (the host backs
guest memory lazily), and a fresh fit of the 0.5B benchmark (3.6 GB of
results) took 14-15 s, against 9.5 s with this module. Here a
chunk is copied once into one of a few page-aligned staging buffers (kept
warm: they are reused) and handed to a thread that writes it with
``O_DIRECT``: the device copies it (1.6-3.3 GB/s here, 0.1 s of CPU per GB),
while the task reads and fits its next piece. Direct I/O also keeps a large
model's results (384 GB for 32B parameters) out of the page cache, where
they would evict the store the next tasks read.

A file system that refuses ``O_DIRECT`` (tmpfs, some network mounts) gets
ordinary writes, still in the writer's thread. An object store gets one PUT
per chunk. At most ``SLOTS`` chunks are staged at a time: ``submit`` waits
for a free buffer, so memory follows the chunk size, not the task.
Files are opened without truncation (a refit overwrites the blocks it
allocated before), never through a symlink, and a hard-linked one is
replaced, not written through (``location.open_in_place``). ``wait`` returns when every
chunk submitted so far is written and raises the first failure: a task
calls it before it returns, so a finished task's results are on disk.
"""

from __future__ import annotations

import errno
import mmap
import os
import queue
import threading
import weakref
from pathlib import Path

from pipeline.store.location import RemotePath, open_in_place, overwrite_bytes, write_at

ALIGN = 4096  # O_DIRECT: buffer, offset and length multiples of the logical block (<= 4 KiB)
SLOTS = 4  # staging buffers per writer: bounds the bytes in flight to SLOTS chunks
_O_DIRECT = getattr(os, "O_DIRECT", 0)


def _write_direct(p: Path, buf: memoryview, n: int) -> bool:
    """``p`` holds ``buf[:n]`` (``buf`` page-aligned); False if the file system refuses."""
    try:
        fd = open_in_place(p, _O_DIRECT)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise
    body = n - n % ALIGN
    try:
        write_at(fd, buf[:body], 0, end=body == n)  # else the tail below sets the end
    except OSError as e:
        os.close(fd)
        if e.errno == errno.EINVAL:  # refused at the first write: nothing is lost, redone
            return False
        raise
    os.close(fd)
    if body < n:  # the unaligned tail through the page cache (it sets the size)
        overwrite_bytes(p, buf[body:n], offset=body)
    return True


class _Shared:
    """What the writer thread uses: never the ``BackgroundWriter`` itself, so that a writer
    whose owner is gone (its thread ended) is collected, and its thread told to stop."""

    def __init__(self, slots: int, direct: bool) -> None:
        self.free: queue.Queue[mmap.mmap] = queue.Queue()
        for _ in range(slots):
            self.free.put(mmap.mmap(-1, ALIGN))
        self.jobs: queue.Queue[tuple[Path | RemotePath, mmap.mmap, int] | None] = queue.Queue()
        self.idle = threading.Condition()
        self.pending = 0
        self.error: BaseException | None = None
        self.direct = direct and _O_DIRECT != 0

    def run(self) -> None:
        while (job := self.jobs.get()) is not None:
            p, buf, n = job
            try:
                if self.error is None:
                    self.write(p, buf, n)
            except BaseException as e:  # noqa: BLE001 -- handed to the waiting task
                with self.idle:
                    self.error = e
            finally:
                self.free.put(buf)
                with self.idle:
                    self.pending -= 1
                    self.idle.notify_all()

    def write(self, p: Path | RemotePath, buf: mmap.mmap, n: int) -> None:
        view = memoryview(buf)[:n]
        try:
            if self.direct and not isinstance(p, RemotePath):
                if _write_direct(p, view, n):
                    return
                self.direct = False  # this file system refused O_DIRECT: once is enough
            overwrite_bytes(p, view)
        finally:
            view.release()


class BackgroundWriter:
    """Writes (path, bytes) in a background thread, in submission order.

    ``direct=False`` writes through the page cache (as a file system without
    ``O_DIRECT`` is written). The thread ends when the writer is collected.
    """

    def __init__(self, slots: int = SLOTS, direct: bool = True) -> None:
        self._s = _Shared(slots, direct)
        self.pid = os.getpid()
        self.thread = threading.Thread(target=self._s.run, name="background-writes", daemon=True)
        self.thread.start()
        weakref.finalize(self, self._s.jobs.put, None)

    def submit(self, p: Path | RemotePath, data: memoryview | bytes) -> None:
        """Copy ``data`` into a staging buffer and queue it (blocks while all are in flight)."""
        view = memoryview(data).cast("B")
        n = len(view)
        buf = self._s.free.get()
        try:
            if len(buf) < n:  # grown once to the largest chunk, then reused (the old one is
                buf = mmap.mmap(-1, -(-n // ALIGN) * ALIGN)  # unmapped when unreferenced)
            memoryview(buf)[:n] = view
        except BaseException:  # no memory, an interrupt: the slot goes back, not lost
            self._s.free.put(buf)
            raise
        with self._s.idle:
            self._s.pending += 1
        self._s.jobs.put((p, buf, n))

    def wait(self, discard: bool = False) -> None:
        """Every chunk submitted so far is written (or skipped after a failure); raises the
        first failure since the last wait unless ``discard``."""
        s = self._s
        with s.idle:
            while s.pending:
                s.idle.wait()
            err, s.error = s.error, None
        if err is not None and not discard:
            raise err


_LOCAL = threading.local()


def background_writer() -> BackgroundWriter:
    """This thread's writer (one background thread per task thread, kept between tasks)."""
    w = getattr(_LOCAL, "writer", None)
    if w is None or w.pid != os.getpid():  # a forked child has no writer thread
        w = _LOCAL.writer = BackgroundWriter()
    return w
