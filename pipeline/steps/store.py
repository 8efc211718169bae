"""A generic append-only step store (zarr v3): arrays indexed by training step on axis 0.

::

    X.zarr/
      zarr.json        root attrs[ATTRS_KEY]: kind ("weights", "logprobs", ...), schema,
                       the array table (name -> path, dtype, shape) and the caller's attrs
      step/            int64 (n,), chunks (1,), fill -1: step[i] is written LAST for
                       position i, so it is the commit marker; readers see the prefix of
                       positions whose marker is set, never a half-written step
      records/<i>/     write-once group per position (the caller's record of that step)
      arrays/<path>/   (n, *shape), chunks (1, ...): a step only writes its own chunks

Writers append: ``begin(step)`` checks the step is later than every
committed one and gives every array room for it (idempotent, so a writer
that died mid-step resumes at the same position and overwrites its partial
chunks); ``write`` fills that position; ``commit`` writes the record and then
the marker. The weight store and the token log-prob store are both this,
with their own arrays and encodings; nothing here knows what a weight is.
The caller holds whatever lock keeps two writers apart (``store.lease.hold``).
``path`` may be an object-store URL's ``location.RemotePath``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.errors import PipelineError
from pipeline.steps import axis
from pipeline.store.location import RemotePath, as_location, zarr_store
from pipeline.store.naming import check_names

ATTRS_KEY = "rlvr_lin_steps"
SCHEMA_VERSION = 1
ARRAYS_GROUP = "arrays"


@dataclass(frozen=True)
class ArraySpec:
    """One step-indexed array: its per-step shape and dtype, and how a step is chunked."""

    shape: tuple[int, ...]
    dtype: str  # a numpy dtype name; zarr has no bfloat16, so bf16 is stored as uint16 bits
    chunk: tuple[int, ...] | None = None  # per-step chunk (default: the whole step)
    compressors: Any = "auto"  # zarr's compressors argument
    fill_value: Any = 0
    attrs: Mapping[str, Any] = field(default_factory=dict)

    def chunks(self) -> tuple[int, ...]:
        inner = self.chunk if self.chunk is not None else self.shape
        return (1, *(max(1, min(c, s)) for c, s in zip(inner, self.shape, strict=True)))


class StepStore:
    """Open store: committed steps, reads, and (for the one writer) begin / write / commit."""

    def __init__(self, path: str | Path | RemotePath) -> None:
        self.path = as_location(path)
        self.refresh()

    # -- creating and opening ----------------------------------------------------------------

    @classmethod
    def create(cls, path: str | Path | RemotePath, kind: str, arrays: Mapping[str, ArraySpec],
               attrs: Mapping[str, Any] | None = None) -> StepStore:
        """Lay out an empty store; refused where a store with committed steps exists."""
        path = as_location(path)
        if (path / "zarr.json").exists():
            existing = cls(path)  # not a step store: refused here, before anything is removed
            if existing.steps:
                raise PipelineError(f"already holds {len(existing.steps)} committed steps; "
                                    f"refusing to lay it out again", path)
        elif path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise PipelineError("exists and is not a step store; choose an empty folder", path)
        paths = check_names(sorted(arrays))
        s = zarr_store(path)
        root = zarr.open_group(s, mode="w")
        root.attrs.put({ATTRS_KEY: {
            "schema_version": SCHEMA_VERSION, "kind": kind,
            "arrays": {n: {"path": paths[n], "dtype": a.dtype, "shape": list(a.shape)}
                       for n, a in sorted(arrays.items())},
            "attrs": dict(attrs or {})}})
        root.create_group(ARRAYS_GROUP)
        axis.layout(path)
        for name, a in arrays.items():
            zarr.create_array(s, name=f"{ARRAYS_GROUP}/{paths[name]}", shape=(0, *a.shape),
                              dtype=a.dtype, chunks=a.chunks(), fill_value=a.fill_value,
                              compressors=a.compressors, attributes={"name": name, **a.attrs},
                              dimension_names=["step", *(f"dim_{i}" for i in range(len(a.shape)))])
        return cls(path)

    @classmethod
    def open(cls, path: str | Path | RemotePath, kind: str | None = None) -> StepStore:
        """An existing store (of ``kind``, when given), with a one-line error otherwise."""
        st = cls(path)
        if kind is not None and st.kind != kind:
            raise PipelineError(f"is a {st.kind!r} step store, not {kind!r}", path)
        return st

    def refresh(self) -> StepStore:
        """Re-read the table and which steps are committed (steps are only ever appended)."""
        p = self.path
        if not (p / "zarr.json").exists():
            raise PipelineError("not a step store (no zarr.json)", p)
        try:
            meta = zarr.open_group(zarr_store(p), mode="r").attrs.get(ATTRS_KEY)
        except Exception as e:  # zarr raises several types for damaged metadata
            raise PipelineError(f"cannot open step store: {e}", p) from None
        if not isinstance(meta, dict) or meta.get("schema_version") != SCHEMA_VERSION:
            raise PipelineError(f"not a step store of schema {SCHEMA_VERSION}", p)
        self._meta = meta
        self._arrays: dict[tuple[str, str], zarr.Array] = {}
        self._steps = axis.committed_steps(p)
        self._positions = axis.positions(p)
        return self

    # -- what is there -----------------------------------------------------------------------

    @property
    def kind(self) -> str:
        return str(self._meta["kind"])

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self._meta.get("attrs", {}))

    @property
    def steps(self) -> list[int]:
        """Committed steps, strictly increasing; position i holds ``steps[i]``."""
        return list(self._steps)

    @property
    def names(self) -> list[str]:
        return sorted(self._meta["arrays"])

    def spec(self, name: str) -> dict[str, Any]:
        try:
            return self._meta["arrays"][name]
        except KeyError:
            raise PipelineError(f"no array {name!r} in the step store", self.path) from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.spec(name)["shape"])

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(self.spec(name)["dtype"])

    def record(self, index: int) -> dict[str, Any]:
        return dict(axis.read_record(self.path, index))

    def array(self, name: str, mode: str = "r") -> zarr.Array:
        arr = self._arrays.get((name, mode))
        if arr is None:
            arr = zarr.open_array(zarr_store(self.path),
                                  path=f"{ARRAYS_GROUP}/{self.spec(name)['path']}", mode=mode)
            self._arrays[(name, mode)] = arr
        return arr

    # -- the StepSource interface (pipeline.steps.source): the fit reads through it ----------

    @property
    def tensor_names(self) -> list[str]:
        return self.names

    def chunk_rows(self, name: str) -> int:
        chunks = self.array(name).chunks
        return int(chunks[1]) if len(chunks) > 1 else 1

    def labels(self, name: str) -> tuple[int, str]:
        """No decoder layer; the array's own name (or its ``module`` attribute) as the module."""
        return -1, str(self.spec(name).get("module", name))

    def read_block(self, name: str, steps: slice | Sequence[int] | None = None,
                   rows: slice | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """Committed positions of one array as (k, *shape) (``rows`` slices axis 1)."""
        n = len(self._steps)
        if steps is None:
            steps = slice(0, n)
        if isinstance(steps, slice):
            start, stop, stride = steps.indices(n)
            idx: Any = slice(start, stop, stride)
        else:
            idx = [int(i) for i in steps]
            bad = [i for i in idx if not 0 <= i < n]
            if bad:
                raise PipelineError(f"positions {bad} are not committed (the store has {n})",
                                    self.path)
        sel = (idx,) if rows is None or not self.shape(name) else (idx, rows)
        got = np.asarray(self.array(name).get_orthogonal_selection(sel)
                         if not isinstance(idx, slice) else self.array(name)[sel])
        if out is None:
            return got
        np.copyto(out, got.reshape(out.shape))
        return out

    def read(self, name: str, step: int, rows: slice | None = None) -> np.ndarray:
        """One committed training step's rows."""
        if step not in self._steps:
            raise PipelineError(f"step {step} is not committed (the store has {self._steps})",
                                self.path)
        return self.read_block(name, [self._steps.index(step)], rows)[0]

    # -- appending (one writer at a time) ----------------------------------------------------

    def begin(self, step: int) -> int:
        """The position ``step`` goes to, with room made in every array (idempotent)."""
        step = int(step)
        why = axis.check_append(self._steps[-1] if self._steps else None, step)
        if why:
            raise PipelineError(why, self.path)
        index = len(self._steps)
        if self._positions != index + 1:
            axis.grow(self.path, index, ((self.path / ARRAYS_GROUP / self.spec(n)["path"],
                                          self.shape(n)) for n in self.names))
            self._arrays.clear()  # their shapes changed on disk
            self._positions = index + 1
        return index

    def write(self, name: str, index: int, value: np.ndarray, rows: slice | None = None) -> None:
        """Fill position ``index`` (or rows of it) of one array; only that step's chunks."""
        if index != len(self._steps) or index >= self._positions:
            raise PipelineError(f"position {index} is not the one being appended "
                                f"(call begin first)", self.path)
        value = np.asarray(value)
        want = self.shape(name) if rows is None else (
            len(range(*rows.indices(self.shape(name)[0]))), *self.shape(name)[1:])
        if tuple(value.shape) != tuple(want):
            raise PipelineError(f"{name}: a step of shape {tuple(value.shape)} where the store "
                                f"holds {tuple(want)}", self.path)
        arr = self.array(name, "r+")
        if rows is None:
            arr[index] = value
        else:
            arr[(index, rows)] = value

    def commit(self, index: int, step: int, record: Mapping[str, Any] | None = None) -> None:
        """The record, then the marker: from here on readers see the step."""
        if index != len(self._steps):
            raise PipelineError(f"position {index} is not the one being appended", self.path)
        axis.commit(self.path, index, step, {"step": int(step), **dict(record or {})})
        self._steps.append(int(step))

    def append(self, step: int, values: Mapping[str, np.ndarray],
               record: Mapping[str, Any] | None = None) -> int:
        """``begin`` + every array's ``write`` + ``commit``, for writers with a step in memory."""
        missing = sorted(set(self.names) - set(values))
        extra = sorted(set(values) - set(self.names))
        if missing or extra:
            raise PipelineError(f"step {step}: missing arrays {missing}, unknown {extra}",
                                self.path)
        index = self.begin(step)
        for name, v in values.items():
            self.write(name, index, v)
        self.commit(index, step, record)
        return index


@dataclass(frozen=True)
class StepStoreRef:
    """A picklable handle a fit task opens where it runs (``pipeline.fit.source.SourceRef``)."""

    path: str | RemotePath
    kind: str | None = None

    def open(self, n_steps: int | None = None) -> StepStore:
        st = StepStore.open(self.path, self.kind)
        if n_steps is not None and len(st.steps) < n_steps:
            raise PipelineError(f"has {len(st.steps)} committed steps, the fit needs {n_steps}",
                                self.path)
        return st
