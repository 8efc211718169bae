"""The single-writer lease of a store on object storage, and ``hold``: the writer's lock anywhere.

Object stores have no file lock and no rename, so a remote store's writer
holds a lease object ``<store>/.lease.json`` (owner id, host, pid, expiry):

- acquired with a conditional create (S3 ``If-None-Match: *``; obstore
  ``put(mode="create")``, s3fs ``pipe_file(mode="create")``): of two writers
  starting together exactly one gets it, the other is refused, one line,
  having written nothing;
- refreshed by a background thread every third of its time to live, with
  a conditional replace on the lease's ETag (``If-Match``), so a refresh
  never overwrites a lease someone else has since taken;
- taken over only once it has expired (its holder died): again a
  conditional replace on the ETag of the expired lease that was read, so
  of two writers taking over the same stale lease only one succeeds. The
  take-over is logged;
- checked before every commit marker (``Lease.check``): a writer whose
  refresh failed, or whose lease was taken, stops before committing;
- released (deleted) at the end, if it is still this writer's.

A step becomes visible only when its marker is written, last, as for local
stores (``steps.axis``); the lease only keeps a second writer out. Its
limits (clock skew, a writer stalled for longer than the lease between its
check and its marker) are in docs/object_storage.md. Local stores keep the
file lock of ``integrity.store_lock``.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pipeline.errors import PipelineError
from pipeline.store.location import RemotePath, Root, one_line

LEASE_KEY = ".lease.json"
DEFAULT_LEASE_TTL = 60.0  # seconds a lease lives without a refresh


class Conditional(Protocol):
    """Conditional writes of one kind of zarr store (the registry ``CONDITIONAL``)."""

    def create(self, root: Root, key: str, data: bytes) -> bool:
        """Write ``key`` only if it does not exist; False if it does."""
        ...

    def read(self, root: Root, key: str) -> tuple[bytes, str] | None:
        """(bytes, ETag), or None when there is no such key."""
        ...

    def replace(self, root: Root, key: str, data: bytes, etag: str) -> bool:
        """Overwrite ``key`` only while its ETag is ``etag``; False if it changed."""
        ...


class _Obstore:
    def create(self, root: Root, key: str, data: bytes) -> bool:
        import obstore
        from obstore.exceptions import AlreadyExistsError

        try:
            obstore.put(root.store.store, key, data, mode="create")
        except AlreadyExistsError:
            return False
        return True

    def read(self, root: Root, key: str) -> tuple[bytes, str] | None:
        import obstore
        from obstore.exceptions import NotFoundError

        try:
            got = obstore.get(root.store.store, key)
        except (NotFoundError, FileNotFoundError):
            return None
        return bytes(got.bytes()), str(got.meta["e_tag"])

    def replace(self, root: Root, key: str, data: bytes, etag: str) -> bool:
        import obstore
        from obstore.exceptions import NotFoundError, PreconditionError

        try:
            obstore.put(root.store.store, key, data, mode={"e_tag": etag, "version": None})
        except (PreconditionError, NotFoundError):
            return False
        return True


class _S3fs:
    """s3fs (FsspecStore of an ``s3://`` URL): the S3 calls, on zarr's event loop."""

    @staticmethod
    def _where(root: Root, key: str) -> tuple[Any, str, str]:
        fs = root.store.fs
        if "s3" not in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
            raise PipelineError("writing needs conditional writes, which only S3 (s3fs) or "
                                "obstore stores have here; use storage_options backend: "
                                "obstore", root.url)
        return fs, root.url.partition("://")[2], key

    def create(self, root: Root, key: str, data: bytes) -> bool:
        from zarr.core.sync import sync

        fs, bucket, key = self._where(root, key)
        try:
            sync(fs._pipe_file(f"{bucket}/{key}", data, mode="create"))
        except FileExistsError:
            return False
        return True

    def read(self, root: Root, key: str) -> tuple[bytes, str] | None:
        from zarr.core.sync import sync

        fs, bucket, key = self._where(root, key)

        async def get() -> tuple[bytes, str]:
            resp = await fs._call_s3("get_object", Bucket=bucket, Key=key)
            async with resp["Body"] as body:
                return await body.read(), str(resp["ETag"])

        try:
            return sync(get())
        except FileNotFoundError:
            return None

    def replace(self, root: Root, key: str, data: bytes, etag: str) -> bool:
        from zarr.core.sync import sync

        fs, bucket, key = self._where(root, key)
        try:
            sync(fs._call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfMatch=etag))
        except FileNotFoundError:
            return False
        except OSError as e:  # s3fs maps 412 Precondition Failed to EINVAL
            if e.errno == errno.EINVAL and "condition" in str(e):
                return False
            raise
        return True


CONDITIONAL: dict[str, Conditional] = {"obstore": _Obstore(), "fsspec": _S3fs()}


def _now() -> float:
    return time.time()


@dataclass
class Lease:
    """This process's lease on a remote store (see the module docstring)."""

    store: RemotePath
    ttl: float
    owner: str = field(default_factory=lambda: uuid.uuid4().hex)
    etag: str = ""
    expires: float = 0.0
    lost: str | None = None
    created: bool = False  # a remote prefix is never "created" (nothing to remove but keys)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def key(self) -> str:
        return f"{self.store.key}/{LEASE_KEY}" if self.store.key else LEASE_KEY

    @property
    def cond(self) -> Conditional:
        return CONDITIONAL[self.store.root.backend]

    def _doc(self) -> tuple[bytes, float]:
        expires = _now() + self.ttl
        return json.dumps({"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                           "ttl": self.ttl, "expires": expires,
                           "expires_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                        time.gmtime(expires))}).encode(), expires

    def _call(self, f: Callable[..., Any], *args: Any) -> Any:
        try:
            return f(self.store.root, self.key, *args)
        except PipelineError:
            raise
        except Exception as e:
            raise PipelineError(f"lease: object store error: {one_line(e)}", self.store) from None

    def acquire(self, log: Callable[[str], None]) -> None:
        """Create the lease, or take over an expired one; refuse while another writer's lives."""
        self.store.probe()
        for _ in range(3):
            data, expires = self._doc()
            if self._call(self.cond.create, data):
                self._set(self._call(self.cond.read), expires)
                return
            cur = self._call(self.cond.read)
            if cur is None:
                continue  # released between our create and our read: try again
            info = _parse(cur[0])
            left = float(info.get("expires", 0)) - _now()
            if left > 0:
                raise PipelineError(
                    f"another writer holds the store's lease ({info.get('host', '?')} pid "
                    f"{info.get('pid', '?')}, {left:.0f} s left); nothing was written",
                    self.store)
            data, expires = self._doc()
            if not self._call(self.cond.replace, data, cur[1]):
                raise PipelineError("another writer took over the store's stale lease first; "
                                    "nothing was written", self.store)
            log(f"took over the stale lease of {info.get('host', '?')} pid "
                f"{info.get('pid', '?')} (expired {-left:.0f} s ago): {self.store}")
            self._set(self._call(self.cond.read), expires)
            return
        raise PipelineError("the store's lease keeps changing; try again", self.store)

    def _set(self, cur: tuple[bytes, str] | None, expires: float) -> None:
        if cur is None or _parse(cur[0]).get("owner") != self.owner:
            raise PipelineError("another writer took the store's lease", self.store)
        self.etag, self.expires = cur[1], expires

    def refresh(self) -> None:
        """Extend the lease; conditional on it being unchanged since this writer last wrote it."""
        with self._lock:
            data, expires = self._doc()
            if not self._call(self.cond.replace, data, self.etag):
                self.lost = "the store's lease was taken by another writer"
                raise PipelineError(self.lost, self.store)
            cur = self._call(self.cond.read)
            self._set(cur, expires)

    def check(self) -> None:
        """Before a commit: still this writer's and unexpired (else nothing more is committed)."""
        if self.lost:
            raise PipelineError(f"{self.lost}; step not committed", self.store)
        if _now() >= self.expires:
            raise PipelineError("the store's lease expired (refresh failed); step not "
                                "committed", self.store)

    def start_refreshing(self) -> None:
        def loop() -> None:
            while not self._stop.wait(self.ttl / 3):
                try:
                    self.refresh()
                except Exception as e:  # noted; the next check() stops the writer
                    self.lost = self.lost or f"cannot refresh the store's lease ({e})"
                    return

        threading.Thread(target=loop, name="rlvr-lin-lease", daemon=True).start()

    def release(self) -> None:
        """Delete the lease if it is still ours (an expired one another took stays theirs)."""
        self._stop.set()
        with self._lock:
            cur = self._call(self.cond.read)
            if cur is not None and _parse(cur[0]).get("owner") == self.owner:
                (self.store / LEASE_KEY).unlink(missing_ok=True)


def _parse(data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


@contextmanager
def hold(store: Path | RemotePath, log: Callable[[str], None] = lambda _m: None,
         ttl: float = DEFAULT_LEASE_TTL) -> Iterator[Any]:
    """The one writer's lock of a store: the file lock locally, the lease remotely.

    Yields an object with ``store``, ``created`` (this process made the
    local folder) and ``check()`` (raises before a commit if the lock is lost).
    """
    if not isinstance(store, RemotePath):
        from pipeline.store.integrity import store_lock

        with store_lock(store) as lock:
            yield lock
        return
    lease = Lease(store, ttl)
    lease.acquire(log)
    lease.start_refreshing()
    try:
        yield lease
    finally:
        try:
            lease.release()
        except PipelineError:
            pass  # an unreachable store: the lease expires by itself
