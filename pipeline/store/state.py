"""The writer's view of a store: what is committed, and the few metadata writes ingest makes.

All writes that are not tensor chunks live here, in commit order: create
the layout (only while nothing is committed), grow arrays by one position,
write the step's record, then set the step's completion marker, then
refresh the root summary. Everything is local-filesystem zarr, whose writes
are atomic renames, so a crash leaves either the old or the new file.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from pipeline.checkpoints.format import bits_dtype
from pipeline.errors import PipelineError
from pipeline.store.codec import DEFAULT_KEY_EVERY, ENCODING
from pipeline.store.integrity import TREE_ALGO
from pipeline.store.layout import (
    ATTRS_KEY,
    CLEVEL,
    NOT_COMMITTED,
    RECORDS_GROUP,
    SCHEMA_VERSION,
    STEP_ARRAY,
    TENSORS_GROUP,
    chunk_shape,
    record_path,
)
from pipeline.store.naming import check_names


def compressor(itemsize: int) -> BloscCodec:
    return BloscCodec(cname="zstd", clevel=CLEVEL, shuffle="shuffle", typesize=itemsize)


@dataclass
class TensorEntry:
    path: str
    dtype: str
    shape: tuple[int, ...]

    def as_json(self) -> dict[str, Any]:
        return {"path": self.path, "dtype": self.dtype, "shape": list(self.shape)}


LAYOUT = ("zarr.json", TENSORS_GROUP, RECORDS_GROUP, STEP_ARRAY)  # all a store writes but its lock


def discard_layout(store: Path) -> None:
    """Remove a layout that never committed a step (never the folder or its lock file)."""
    for sub in LAYOUT:
        p = store / sub
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def read_meta(store: Path) -> dict[str, Any] | None:
    """The store's ``rlvr_lin`` root attributes, or None if there is no store yet."""
    if store.exists() and not store.is_dir():
        raise PipelineError("is a file, not a store folder", store)
    if not (store / "zarr.json").exists():
        if store.exists() and any(p.name != ".ingest.lock" for p in store.iterdir()):
            raise PipelineError("exists and is not an rlvr-lin run store", store)
        return None
    try:
        meta = zarr.open_group(str(store), mode="r").attrs.get(ATTRS_KEY)
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


def committed_steps(store: Path) -> list[int]:
    """Steps whose completion marker is set: the prefix of ``step`` with no fill value."""
    try:
        arr = zarr.open_array(str(store), path=STEP_ARRAY, mode="r")
    except (FileNotFoundError, zarr.errors.NodeNotFoundError):
        return []
    vals = np.asarray(arr[:])
    missing = np.flatnonzero(vals == NOT_COMMITTED)
    n = int(missing[0]) if missing.size else vals.size
    return [int(v) for v in vals[:n]]


@dataclass
class StoreState:
    """Open store for writing (the caller holds the store lock)."""

    path: Path
    tensors: dict[str, TensorEntry] = field(default_factory=dict)
    steps: list[int] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, path: Path) -> StoreState:
        meta = read_meta(path)
        st = cls(path)
        if meta is None:
            return st
        st.meta = meta
        st.steps = committed_steps(path)
        if st.steps:
            st.tensors = {n: TensorEntry(t["path"], t["dtype"], tuple(t["shape"]))
                          for n, t in meta["tensors"].items()}
        for i in range(len(st.steps)):
            st.records.append(dict(zarr.open_group(str(path), path=record_path(i),
                                                   mode="r").attrs))
        return st

    def record_for(self, step: int) -> dict[str, Any]:
        return self.records[self.steps.index(step)]

    # -- writes, in commit order -------------------------------------------------------------

    def create(self, table: dict[str, tuple[str, tuple[int, ...]]], model_config: dict | None,
               source: dict[str, Any], chunk_bytes: int) -> None:
        """Lay out an empty store (discarding leftovers of an attempt that never committed)."""
        assert not self.steps
        discard_layout(self.path)
        paths = check_names(sorted(table))
        self.tensors = {n: TensorEntry(paths[n], d, s) for n, (d, s) in table.items()}
        s = str(self.path)
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
        root = zarr.open_group(s, mode="a")  # the lock file is already there: not "w-"
        root.attrs.put({ATTRS_KEY: self.meta})
        root.create_group(TENSORS_GROUP)
        root.create_group(RECORDS_GROUP)
        zarr.create_array(s, name=STEP_ARRAY, shape=(0,), dtype="int64", chunks=(1,),
                          fill_value=NOT_COMMITTED, compressors=None,
                          dimension_names=["step"])
        for name, t in self.tensors.items():
            bd = bits_dtype(t.dtype)
            zarr.create_array(
                s, name=f"{TENSORS_GROUP}/{t.path}", shape=(0, *t.shape), dtype=bd,
                chunks=chunk_shape(t.shape, bd.itemsize, chunk_bytes), fill_value=0,
                compressors=[compressor(bd.itemsize)],
                dimension_names=["step", *(f"dim_{i}" for i in range(len(t.shape)))],
                attributes={"name": name, "dtype": t.dtype, "encoding": ENCODING},
            )

    def grow(self, index: int) -> None:
        """Give every array exactly ``index + 1`` positions (idempotent on resume)."""
        s = str(self.path)
        zarr.open_array(s, path=STEP_ARRAY, mode="r+").resize((index + 1,))
        for t in self.tensors.values():
            zarr.open_array(s, path=f"{TENSORS_GROUP}/{t.path}", mode="r+").resize(
                (index + 1, *t.shape))

    def commit(self, index: int, step: int, record: dict[str, Any]) -> None:
        """Record, then marker (the commit point), then the root summary."""
        s = str(self.path)
        zarr.create_group(s, path=record_path(index), overwrite=True, attributes=record)
        arr = zarr.open_array(s, path=STEP_ARRAY, mode="r+")
        arr[index] = step
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
        zarr.open_group(str(self.path), mode="r+").attrs.put({ATTRS_KEY: self.meta})
