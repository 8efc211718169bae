"""Content digests, folder snapshots and the single-writer lock: what makes ingest safe to re-run.

A digest per weight file per step lets a re-run skip steps whose checkpoint
is unchanged and refuse one whose bytes changed. Every digest string starts
with its algorithm's name (``name:hex``) and the store's root attributes
name the algorithm new steps use (``digest``), so a store written with an
older algorithm (blake2b) is still verified with that algorithm. A snapshot (name, size,
mtime of every file) taken twice a settle interval apart tells a finished
checkpoint from one still being written.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from pipeline.errors import PipelineError
from pipeline.store.location import RemotePath, tree_bytes

DIGEST_ALGO = "blake2b-256"  # legacy: one hash over the whole file
BLAKE_TREE_ALGO = "blake2b-256-tree1m"  # legacy: blake2b-256 of the blake2b-256 block digests
TREE_ALGO = "xxh3-128-tree1m"  # xxh3-128 of the size and the xxh3-128 digests of 1 MiB blocks
TREE_BLOCK = 1 << 20
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


def combine_blocks(size: int, blocks: dict[int, bytes], algo: str = TREE_ALGO) -> str:
    """File digest from its per-block digests (block ``k`` = bytes ``[k * TREE_BLOCK, ...)``).

    Blocks are fixed by file offset, not by how ingest splits its work, so
    any set of tasks that hashes every block once gives the same digest, and
    ``tree_digest`` (one sequential pass) gives it too.
    """
    n = -(-size // TREE_BLOCK)
    if sorted(blocks) != list(range(n)):
        raise AssertionError(f"block digests do not cover the file ({len(blocks)} of {n})")
    if algo == BLAKE_TREE_ALGO:
        h = hashlib.blake2b(digest_size=32)
    elif algo == TREE_ALGO:
        h = xxhash.xxh3_128()
    else:
        raise ValueError(f"unknown digest algorithm {algo!r}")
    h.update(size.to_bytes(8, "little"))
    for k in range(n):
        h.update(blocks[k])
    return f"{algo}:{h.hexdigest()}"


def block_hasher(algo: str = TREE_ALGO) -> Any:
    """A streaming hasher of one block: ``update`` in pieces, ``digest`` = ``block_digest``."""
    if algo == TREE_ALGO:
        return xxhash.xxh3_128()
    if algo == BLAKE_TREE_ALGO:
        return hashlib.blake2b(digest_size=32)
    raise ValueError(f"unknown digest algorithm {algo!r}")


def block_digest(data: bytes | memoryview | bytearray, algo: str = TREE_ALGO) -> bytes:
    if algo == TREE_ALGO:
        return xxhash.xxh3_128_digest(data)
    if algo == BLAKE_TREE_ALGO:
        return hashlib.blake2b(data, digest_size=32).digest()
    raise ValueError(f"unknown digest algorithm {algo!r}")


def tree_digest(path: str | Path, algo: str = TREE_ALGO) -> str:
    """``combine_blocks`` of a whole file, read sequentially in 1 MiB blocks."""
    blocks: dict[int, bytes] = {}
    buf = bytearray(TREE_BLOCK)
    view = memoryview(buf)
    try:
        with open(path, "rb", buffering=0) as f:
            size = k = 0
            while True:
                got = 0
                while got < TREE_BLOCK and (n := f.readinto(view[got:])):
                    got += n
                if not got:
                    break
                blocks[k] = block_digest(view[:got], algo)
                size += got
                k += 1
    except OSError as e:
        raise PipelineError(f"cannot read checkpoint file: {e.strerror}", path) from None
    return combine_blocks(size, blocks, algo)


def digest_like(path: str | Path, stored: str) -> str:
    """Digest of ``path`` with the algorithm of a stored digest (its ``name:`` prefix).

    Stores made before the tree (whole-file blake2b) or before xxh3 (blake2b
    tree) are verified with their own algorithm; no stored digest: the current one.
    """
    algo = stored.partition(":")[0]
    if algo == DIGEST_ALGO:
        return file_digest(path)
    if algo == BLAKE_TREE_ALGO:
        return tree_digest(path, BLAKE_TREE_ALGO)
    return tree_digest(path, TREE_ALGO)


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


def _make_store_dir(store: Path) -> bool:
    """Create the store folder if missing; True only if this call created it.

    Only the process that created the folder may ever remove it (and only
    while holding its lock): a refused ingest must not take away the folder,
    or the lock, of the one that is running.
    """
    if store.is_dir():
        return False
    if store.exists():
        raise PipelineError("is a file, not a store folder", store)
    for parent in store.parents:
        if parent.exists() and not parent.is_dir():
            raise PipelineError(f"cannot create store folder: {parent} is a file", store)
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        store.mkdir()
    except FileExistsError:
        if not store.is_dir():
            raise PipelineError("is a file, not a store folder", store) from None
        return False  # another process made it first: it is theirs
    except OSError as e:
        raise PipelineError(f"cannot create store folder: {e.strerror}", store) from None
    return True


def _take_lock(store: Path) -> int | None:
    """An fd holding the flock of the store's current lock file, or None to try again.

    The lock file may be removed (with the folder of a failed first ingest)
    between our open and our flock; holding a lock on a removed file locks
    nothing, so the inode we locked must still be the one at the path.
    """
    path = store / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError:
        return None  # the folder went away: make it again
    except OSError as e:
        raise PipelineError(f"cannot open the store lock: {e.strerror}", path) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held, now = os.fstat(fd), os.stat(path)
    except BlockingIOError:
        os.close(fd)
        raise PipelineError("another ingest is writing this store", store) from None
    except FileNotFoundError:
        os.close(fd)
        return None
    if (held.st_dev, held.st_ino) != (now.st_dev, now.st_ino):
        os.close(fd)
        return None
    return fd


@dataclass(frozen=True)
class StoreLock:
    """A held store lock; ``created`` says this process made the store folder."""

    store: Path
    created: bool

    def check(self) -> None:
        """Nothing to check: a held flock cannot be lost (``lease.Lease.check`` can)."""


@contextmanager
def store_lock(store: Path) -> Iterator[StoreLock]:
    """Exclusive lock so two ingests never write the same store at once.

    Taken before anything else is written in the store. A refusal touches
    nothing: the folder and the lock file stay as the running ingest has them.
    """
    created = False
    for _ in range(5):
        created = _make_store_dir(store) or created
        fd = _take_lock(store)
        if fd is not None:
            break
    else:
        raise PipelineError("another ingest is writing this store", store)
    try:
        yield StoreLock(store, created)
    finally:
        os.close(fd)


def store_bytes(store: Path | RemotePath) -> int:
    """Bytes the store occupies (file sizes), ignoring the lock, the lease and temporary files."""
    from pipeline.store.lease import LEASE_KEY

    return tree_bytes(store, lambda f: f in (LOCK_FILE, LEASE_KEY) or f.endswith(".partial"))
