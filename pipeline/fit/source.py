"""Where fit tasks read blocks from: a picklable reference to a ``StepSource``.

A task never receives an open source (it may run on another machine); it
gets a small picklable *reference* and opens it where it runs. ``StoreRef``
opens a run store as a ``StepSource`` (``pipeline.extrapolate.sources.
StoreSource``, the one the export and backtest read); a log-prob store's
reference is ``pipeline.steps.store.StepStoreRef``; any ``StepSource`` works
(tests wrap one to slow reads down or to count them). A store on object
storage is referenced by its ``location.RemotePath`` (URL and storage
options), which pickles to every worker.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pipeline.steps.source import StepSource
from pipeline.store.location import RemotePath, as_location


class SourceRef(Protocol):
    """A picklable handle that opens a ``StepSource``.

    ``n_steps=None`` asks for the latest committed steps (the driver); an
    integer asks for a snapshot holding at least that many (a task).
    """

    def open(self, n_steps: int | None = None) -> StepSource: ...


@functools.lru_cache(maxsize=8)
def _open_store(path: str | RemotePath, identity: str) -> StepSource:
    from pipeline.extrapolate.sources import StoreSource

    return StoreSource(path)


def store_identity(path: str | Path | RemotePath) -> str:
    """Which store lives at ``path`` now: inode and mtime of its root metadata.

    Workers of a long-lived cluster cache open stores; a store deleted and
    ingested again at the same path (another run, other shapes) must not be
    read through the old one's metadata. On object storage (no inodes): a
    hash of the root metadata document, which every commit rewrites.
    """
    if isinstance(path, RemotePath):
        import xxhash

        try:
            return xxhash.xxh3_64_hexdigest((path / "zarr.json").read_bytes())
        except FileNotFoundError:
            return ""
    try:
        st = (Path(path) / "zarr.json").stat()
    except OSError:
        return ""
    return f"{st.st_ino}:{st.st_mtime_ns}"


@dataclass(frozen=True)
class StoreRef:
    """Reference to an ingested run store, opened once per worker process (and identity)."""

    path: str | RemotePath
    identity: str = ""

    @classmethod
    def of(cls, path: str | Path | RemotePath) -> StoreRef:
        loc = as_location(path)
        resolved = loc if isinstance(loc, RemotePath) else str(loc.resolve())
        return cls(resolved, store_identity(resolved))

    def open(self, n_steps: int | None = None) -> StepSource:
        path = self.path if isinstance(self.path, RemotePath) else str(Path(self.path).resolve())
        src = _open_store(path, self.identity)
        if n_steps is None or len(src.steps) < n_steps:  # cached snapshot may be older
            src.refresh()  # type: ignore[attr-defined]  (StoreSource.refresh)
        return src


def store_inputs(store: str | Path | RemotePath, src: object) -> list[tuple[str, Path]]:
    """What an output of a job reading ``store`` must never overwrite.

    The store itself and the checkpoint folders it was ingested from (the run
    folder and each step's folder, as recorded in the store): a fit, report
    or export written into one of them would destroy the data it came from.
    """
    out: list[tuple[str, Path]] = [("the store", Path(store))]
    attrs = getattr(src, "attrs", None) or {}
    run_dir = (attrs.get("source") or {}).get("run_dir")
    if not run_dir:
        return out
    for rec in getattr(src, "records", None) or []:
        folder = rec.get("folder")
        if folder:
            out.append((f"the checkpoint folder of step {rec.get('step')}",
                        Path(run_dir) / folder))
    return out
