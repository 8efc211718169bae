"""The writer's view of a store: what is committed, and the few metadata writes ingest makes.

All writes that are not tensor chunks live here, in commit order: create
the layout (only while nothing is committed), grow arrays by one position,
write the step's record, then set the step's completion marker, then
refresh the root summary. Local writes are atomic renames and object-store
writes single PUTs (``location``), so a crash leaves either the old or the
new file. ``path`` is a local folder or a ``location.RemotePath``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zarr

from pipeline.dtypes import bits_dtype
from pipeline.errors import PipelineError
from pipeline.steps import axis
from pipeline.store import zmeta
from pipeline.store.codec import DEFAULT_KEY_EVERY, ENCODING
from pipeline.store.integrity import LOCK_FILE, TREE_ALGO
from pipeline.store.layout import (
    ATTRS_KEY,
    CLEVEL,
    RECORDS_GROUP,
    SCHEMA_VERSION,
    SHUFFLE,
    STEP_ARRAY,
    TENSORS_GROUP,
    chunk_shape,
)
from pipeline.store.lease import LEASE_KEY
from pipeline.store.location import RemotePath, remove_tree, zarr_store
from pipeline.store.naming import check_names


def compressor(itemsize: int) -> dict[str, Any]:
    """The tensors' compressor entry (zarr's ``BloscCodec``; ``tasks.chunk_codec`` runs it)."""
    return zmeta.blosc_codec(itemsize, "zstd", CLEVEL, SHUFFLE)


@dataclass
class TensorEntry:
    path: str
    dtype: str
    shape: tuple[int, ...]
    chunk_rows: int | None = None  # None: a store laid out before it was recorded

    def as_json(self) -> dict[str, Any]:
        return {"path": self.path, "dtype": self.dtype, "shape": list(self.shape),
                "chunk_rows": self.chunk_rows}


LAYOUT = ("zarr.json", TENSORS_GROUP, RECORDS_GROUP, STEP_ARRAY)  # all a store writes but its lock
WRITER_FILES = (LOCK_FILE, LEASE_KEY)  # the writer's lock (local) or lease (object store)


def discard_layout(store: Path | RemotePath) -> None:
    """Remove a layout that never committed a step (never the folder or its lock file)."""
    for sub in LAYOUT:
        p = store / sub
        if p.is_dir() and not p.is_symlink():
            remove_tree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def read_meta(store: Path | RemotePath) -> dict[str, Any] | None:
    """The store's ``rlvr_lin`` root attributes, or None if there is no store yet."""
    if isinstance(store, RemotePath):
        store.probe()  # an unreachable endpoint or a missing bucket is not "no store yet"
    if store.exists() and not store.is_dir():
        raise PipelineError("is a file, not a store folder", store)
    if not (store / "zarr.json").exists():
        if store.exists() and any(p.name not in WRITER_FILES for p in store.iterdir()):
            raise PipelineError("exists and is not an rlvr-lin run store", store)
        return None
    try:
        meta = zarr.open_group(zarr_store(store), mode="r").attrs.get(ATTRS_KEY)
    except Exception as e:  # zarr raises several types for damaged metadata
        raise PipelineError(f"cannot open store: {e}", store) from None
    if not isinstance(meta, dict):
        raise PipelineError("exists and is not an rlvr-lin run store", store)
    if meta.get("schema_version") != SCHEMA_VERSION or meta.get("encoding") != ENCODING:
        raise PipelineError(f"store has schema version {meta.get('schema_version')} (encoding "
                            f"{meta.get('encoding')}); this rlvr-lin reads version "
                            f"{SCHEMA_VERSION} ({ENCODING}): delete it and ingest the run "
                            "again", store)
    return meta


def committed_steps(store: Path | RemotePath) -> list[int]:
    """Steps whose completion marker is set (the step axis's protocol: ``steps.axis``)."""
    return axis.committed_steps(store)


@dataclass
class StoreState:
    """Open store for writing (the caller holds the store lock)."""

    path: Path | RemotePath
    tensors: dict[str, TensorEntry] = field(default_factory=dict)
    steps: list[int] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, path: Path | RemotePath) -> StoreState:
        meta = read_meta(path)
        st = cls(path)
        if meta is None:
            return st
        st.meta = meta
        st.steps = committed_steps(path)
        if st.steps:
            st.tensors = {n: TensorEntry(t["path"], t["dtype"], tuple(t["shape"]),
                                         t.get("chunk_rows"))
                          for n, t in meta["tensors"].items()}
        for i in range(len(st.steps)):
            st.records.append(axis.read_record(path, i))
        return st

    def record_for(self, step: int) -> dict[str, Any]:
        return self.records[self.steps.index(step)]

    # -- writes, in commit order -------------------------------------------------------------

    def create(self, table: dict[str, tuple[str, tuple[int, ...]]], model_config: dict | None,
               source: dict[str, Any], chunk_bytes: int) -> None:
        """Lay out an empty store (discarding leftovers of an attempt that never committed)."""
        if self.steps:  # discarding the layout would destroy committed steps
            raise PipelineError(f"refusing to lay out a store that holds {len(self.steps)} "
                                f"committed steps", self.path)
        discard_layout(self.path)
        paths = check_names(sorted(table))
        chunks = {n: chunk_shape(s, bits_dtype(d).itemsize, chunk_bytes)
                  for n, (d, s) in table.items()}
        self.tensors = {n: TensorEntry(paths[n], d, s, chunks[n][1] if s else 1)
                        for n, (d, s) in table.items()}
        self.meta = {
            "schema_version": SCHEMA_VERSION,
            "encoding": ENCODING,
            "key_every": DEFAULT_KEY_EVERY,  # see codec.reference
            "tensors": {n: t.as_json() for n, t in sorted(self.tensors.items())},
            "model_config": model_config,
            "source": source,
            "chunk_bytes": chunk_bytes,
            "digest": TREE_ALGO,  # algorithm of the file digests in records (name: prefix)
        }
        # zarr's own documents, written by hand (zmeta): zarr's API costs ms per node
        zmeta.write_node(self.path, zmeta.group_doc({ATTRS_KEY: self.meta}))
        zmeta.write_node(self.path / TENSORS_GROUP, zmeta.group_doc())
        axis.layout(self.path)
        for name, t in self.tensors.items():
            bd = bits_dtype(t.dtype)
            zmeta.write_node(self.path / TENSORS_GROUP / t.path, zmeta.array_doc(
                (0, *t.shape), bd, chunks[name], 0,
                [compressor(bd.itemsize)], {"name": name, "dtype": t.dtype, "encoding": ENCODING},
                ["step", *(f"dim_{i}" for i in range(len(t.shape)))]))

    def chunk_rows(self, name: str) -> int:
        """Rows per stored chunk of a tensor: from the layout, or read from its array."""
        t = self.tensors[name]
        if t.chunk_rows is None:
            chunks = zmeta.read_node(self.path / TENSORS_GROUP / t.path)["chunk_grid"]
            grid = chunks["configuration"]["chunk_shape"]
            t.chunk_rows = int(grid[1]) if len(grid) > 1 else 1
        return t.chunk_rows

    def grow(self, index: int) -> None:
        """Give every array exactly ``index + 1`` positions (idempotent on resume)."""
        axis.grow(self.path, index, ((self.path / TENSORS_GROUP / t.path, t.shape)
                                     for t in self.tensors.values()))

    def commit(self, index: int, step: int, record: dict[str, Any]) -> None:
        """Record, then marker (the commit point), then the root summary."""
        axis.commit(self.path, index, step, record)
        self.steps.append(step)
        self.records.append(record)
        self.write_summary()

    def write_summary(self) -> None:
        """Root attrs summary of committed steps (derived from records; rewritten whole)."""
        self.meta["steps"] = list(self.steps)
        self.meta["sources"] = {str(s): r["folder"] for s, r in zip(self.steps, self.records,
                                                                    strict=True)}
        self.meta["nonfinite"] = {str(s): r["nonfinite"] for s, r in
                                  zip(self.steps, self.records, strict=True) if r["nonfinite"]}
        self.meta["checkpoint_bytes"] = sum(r["checkpoint_bytes"] for r in self.records)
        zmeta.set_attributes(self.path, {ATTRS_KEY: self.meta})
