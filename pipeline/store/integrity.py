"""Content digests, folder snapshots and the single-writer lock: what makes ingest safe to re-run.

A digest per weight file per step lets a re-run skip steps whose checkpoint
is unchanged and refuse one whose bytes changed. A snapshot (name, size,
mtime of every file) taken twice a settle interval apart tells a finished
checkpoint from one still being written.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import PipelineError

DIGEST_ALGO = "blake2b-256"
_BUF = 8 << 20
LOCK_FILE = ".ingest.lock"

Snapshot = dict[str, tuple[int, int]]


def file_digest(path: str | Path) -> str:
    """Content hash of a whole file, read in 8 MiB pieces (memory stays bounded)."""
    h = hashlib.blake2b(digest_size=32)
    buf = bytearray(_BUF)
    view = memoryview(buf)
    try:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                h.update(view[:n])
    except OSError as e:
        raise PipelineError(f"cannot read checkpoint file: {e.strerror}", path) from None
    return f"{DIGEST_ALGO}:{h.hexdigest()}"


def snapshot(folder: Path) -> Snapshot:
    """Size and mtime of every file directly in ``folder``; equal snapshots = nothing moved."""
    out: Snapshot = {}
    try:
        with os.scandir(folder) as it:
            for e in it:
                if e.is_file(follow_symlinks=True):
                    st = e.stat()
                    out[e.name] = (st.st_size, st.st_mtime_ns)
    except FileNotFoundError:
        return {}
    return out


@contextmanager
def store_lock(store: Path) -> Iterator[None]:
    """Exclusive lock so two ingests never write the same store at once."""
    store.mkdir(parents=True, exist_ok=True)
    fd = os.open(store / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PipelineError("another ingest is writing this store", store) from None
        yield
    finally:
        os.close(fd)


def store_bytes(store: Path) -> int:
    """Bytes the store occupies (file sizes), ignoring the lock and temporary files."""
    total = 0
    for root, _dirs, files in os.walk(store):
        for f in files:
            if f == LOCK_FILE or f.endswith(".partial"):
                continue
            total += os.path.getsize(os.path.join(root, f))
    return total
