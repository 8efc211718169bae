"""Read an ingested run: the stable API the fit, extrapolation and reports build on.

``open_run(store)`` takes a snapshot of the committed steps at open time
(``refresh()`` picks up steps committed since), so an analysis never sees a
step appear or a half-written step mid-way. Everything returns values in
the tensor's logical dtype (bfloat16 as ``ml_dtypes.bfloat16``) unless a
float dtype is asked for; stored encodings are undone here and nowhere else.

Out-of-core consumers read blocks: ``read_block(name, steps, rows)`` with
``rows`` a slice of the leading axis; ``chunk_rows(name)`` is the natural
block height (reads aligned to it touch no chunk twice). ``to_dask`` /
``to_xarray`` give lazy views with the same chunks and a ``step`` coordinate.

A store may live on object storage (``open_run("s3://b/run.zarr",
storage_options=...)``, see ``location``): its chunks are then read through
zarr's store object instead of straight from files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.dtypes import logical_dtype
from pipeline.errors import PipelineError
from pipeline.store.chunks import DirectArray, scratch
from pipeline.store.codec import DEFAULT_KEY_EVERY, as_float, as_logical, decode_positions
from pipeline.store.layout import TENSORS_GROUP
from pipeline.store.location import RemotePath, as_location, zarr_store
from pipeline.store.state import StoreState, read_meta


class RunStore:
    """A read-only view of the committed steps of one run store."""

    def __init__(self, path: str | Path | RemotePath,
                 storage_options: dict[str, Any] | None = None) -> None:
        self.path = as_location(path, storage_options)
        if read_meta(self.path) is None:
            raise PipelineError("not an rlvr-lin run store", self.path)
        self.refresh()

    def refresh(self) -> RunStore:
        """Re-read which steps are committed (steps only ever get appended)."""
        st = StoreState.open(self.path)
        self._meta = st.meta
        self._key_every = int(st.meta.get("key_every", DEFAULT_KEY_EVERY))
        self._steps = list(st.steps)
        self._records = st.records
        self._arrays: dict[str, zarr.Array] = {}
        self._direct: dict[str, DirectArray | None] = {}
        return self

    # -- metadata -------------------------------------------------------------------------------

    @property
    def steps(self) -> list[int]:
        """Committed training steps, strictly increasing; position i is ``steps[i]``."""
        return list(self._steps)

    @property
    def tensor_names(self) -> list[str]:
        return sorted(self._meta.get("tensors", {})) if self._steps else []

    def _entry(self, name: str) -> dict[str, Any]:
        try:
            return self._meta["tensors"][name]
        except KeyError:
            raise PipelineError(f"no tensor {name!r} in store", self.path) from None

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of the tensor at one step (the stored array has a leading step axis)."""
        return tuple(self._entry(name)["shape"])

    def dtype(self, name: str) -> str:
        """Logical dtype name, e.g. ``"bfloat16"``."""
        return str(self._entry(name)["dtype"])

    def chunk_rows(self, name: str) -> int:
        """Rows per stored chunk: the block height that reads each chunk once."""
        chunks = self._array(name).chunks
        return chunks[1] if len(chunks) > 1 else 1

    @property
    def config(self) -> dict | None:
        """The model's ``config.json`` from the first checkpoint."""
        return self._meta.get("model_config")

    @property
    def attrs(self) -> dict[str, Any]:
        """All store metadata (schema version, source, NaN/inf summary, ...)."""
        return dict(self._meta)

    @property
    def records(self) -> list[dict[str, Any]]:
        """Per-step records: folder, file sizes and digests, NaN/inf counts."""
        return [dict(r) for r in self._records]

    def index(self, step: int) -> int:
        """Position of a training step along the step axis."""
        try:
            return self._steps.index(step)
        except ValueError:
            raise PipelineError(f"step {step} is not in the store (have {self._steps})",
                                self.path) from None

    # -- data -----------------------------------------------------------------------------------

    def _array(self, name: str) -> zarr.Array:
        arr = self._arrays.get(name)
        if arr is None:
            path = f"{TENSORS_GROUP}/{self._entry(name)['path']}"
            arr = self._arrays[name] = zarr.open_array(zarr_store(self.path), path=path, mode="r")
        return arr

    def read_bits(self, name: str, steps: slice | list[int] | None = None,
                  rows: slice | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """Decoded bit patterns, shape ``(n_selected_steps, *block)``.

        ``steps`` selects positions (a slice of positions or a list of
        training steps); ``rows`` slices the tensor's leading axis. ``out``
        (C-contiguous, that shape, the stored unsigned dtype) receives the
        patterns instead of a new array (e.g. a buffer reused across reads,
        so large reads do not page-fault); the array returned is ``out``.
        """
        idx = self._positions(steps)
        arr = self._array(name)
        tail: tuple = (rows if rows is not None else slice(None),) if self.shape(name) else ()
        dtype = _native(arr.dtype)
        full = self.shape(name)
        block = (len(range(*tail[0].indices(full[0]))), *full[1:]) if full else ()
        shape = (len(idx), *block)
        if out is None:
            out = np.empty(shape, dtype=dtype)
        elif out.shape != shape or out.dtype != dtype:
            raise ValueError(f"out is {out.shape} {out.dtype}, the block is {shape} {dtype}")
        if not idx or 0 in shape:
            return out
        if not full:  # a scalar: one element, one chunk
            return self._decode_rows(name, arr, idx, 0, 1, out)
        r0, r1, step = tail[0].indices(full[0])
        rows = range(r0, r1, step)
        lo, hi = min(rows[0], rows[-1]), max(rows[0], rows[-1]) + 1
        cr = self._chunk_rows(arr)
        a, b = lo - lo % cr, min(full[0], -(-hi // cr) * cr)  # whole chunks: deltas sort per chunk
        if (a, b, step) == (lo, hi, 1) and out.flags.c_contiguous:
            return self._decode_rows(name, arr, idx, a, b, out)
        whole = scratch(len(idx) * (b - a) * int(np.prod(full[1:], dtype=np.int64)),
                        dtype, "rows").reshape(len(idx), b - a, *full[1:])
        self._decode_rows(name, arr, idx, a, b, whole)
        out[...] = whole[:, slice(r0 - a, r1 - a if r1 - a >= 0 else None, step)]
        return out

    @staticmethod
    def _chunk_rows(arr: zarr.Array) -> int:
        """Rows per stored chunk: the unit a step's deltas are sorted in (``codec``)."""
        return int(arr.chunks[1]) if len(arr.chunks) > 1 else 1

    def _decode_rows(self, name: str, arr: zarr.Array, idx: list[int], r0: int, r1: int,
                     out: np.ndarray) -> np.ndarray:
        """Positions ``idx`` of rows [r0, r1), whole chunks, into C-contiguous ``out``."""
        full = self.shape(name)
        seg = (self._chunk_rows(arr) * int(np.prod(full[1:], dtype=np.int64))
               if full else 1)
        direct = self._direct_array(name)
        if direct is not None:
            self._decode_direct(direct, idx, r0, r1, out, seg)
        else:
            tail = (slice(r0, r1),) if full else ()
            decode_positions(lambda p: np.asarray(arr[(p, *tail)]), idx, self._key_every, out,
                             seg)
        return out

    def _direct_array(self, name: str) -> DirectArray | None:
        """The tensor's chunk files read directly (``chunks``), or ``None``: read via zarr."""
        if name not in self._direct:
            folder = self.path / TENSORS_GROUP / self._entry(name)["path"]
            d = DirectArray.open(folder)
            if d is not None and (d.shape[1:] != self.shape(name)
                                  or d.dtype != _native(self._array(name).dtype)):
                d = None
            self._direct[name] = d
        return self._direct[name]

    def _decode_direct(self, arr: DirectArray, idx: list[int], r0: int, r1: int,
                       out: np.ndarray, seg: int) -> None:
        """``_decode_rows`` reading chunk files: one reused buffer for every stored block."""
        buf = scratch(int(np.prod(out.shape[1:], dtype=np.int64)),
                      out.dtype).reshape(out.shape[1:])
        decode_positions(lambda p: arr.load_into(p, r0, r1, buf), idx, self._key_every, out,
                         seg)

    def _positions(self, steps: slice | list[int] | None) -> list[int]:
        n = len(self._steps)
        if steps is None:
            return list(range(n))
        if isinstance(steps, slice):
            return list(range(*steps.indices(n)))
        return [self.index(int(s)) for s in steps]

    def read_block(self, name: str, steps: slice | list[int] | None = None,
                   rows: slice | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """A block in the logical dtype, shape ``(n_selected_steps, *block)``.

        ``out`` (that shape, the logical dtype or its unsigned bits dtype)
        receives the block instead of a new array, as in ``read_bits``.
        """
        bits = None if out is None else out.view(_native(self._array(name).dtype))
        return as_logical(self.read_bits(name, steps, rows, out=bits), self.dtype(name))

    def read(self, name: str, step: int, rows: slice | None = None) -> np.ndarray:
        """One training step of a tensor, in its logical dtype, bit-exact."""
        return self.read_block(name, [step], rows)[0]

    def read_float(self, name: str, steps: slice | list[int] | None = None,
                   rows: slice | None = None, dtype: type = np.float32) -> np.ndarray:
        """A block as float32/float64 for numerics (bf16/fp16 widen exactly)."""
        return as_float(self.read_bits(name, steps, rows), self.dtype(name), dtype)

    def to_dask(self, name: str, dtype: Any = None) -> Any:
        """Lazy ``(n_steps, *shape)`` dask array, chunked like the store; logical dtype default."""
        import dask.array as da

        view = _DecodedBits(self, name)
        chunks = tuple(c if i else 1 for i, c in enumerate(self._array(name).chunks))
        decoded = da.from_array(view, chunks=chunks[: view.ndim], asarray=False, fancy=False,
                                name=f"rlvr-lin-{self.path}-{name}-{len(self._steps)}")
        logical = logical_dtype(self.dtype(name))
        out = decoded.map_blocks(np.ndarray.view, logical, dtype=logical)
        return out if dtype is None else out.astype(dtype)

    def to_xarray(self, name: str, dtype: Any = None) -> Any:
        """Lazy ``xarray.DataArray`` with a ``step`` coordinate (int64)."""
        import xarray as xr

        data = self.to_dask(name, dtype)
        dims = ["step", *(f"dim_{i}" for i in range(len(self.shape(name))))]
        return xr.DataArray(data, dims=dims, name=name,
                            coords={"step": np.asarray(self._steps, dtype=np.int64)},
                            attrs={"dtype": self.dtype(name)})

    def dataset(self, names: list[str] | None = None, dtype: Any = np.float32) -> Any:
        """Lazy ``xarray.Dataset`` of several tensors (float32 by default, for numerics)."""
        import xarray as xr

        names = self.tensor_names if names is None else names
        das = {}
        for n in names:
            da_ = self.to_xarray(n, dtype)
            das[n] = da_.rename({d: f"{n}/{d}" for d in da_.dims if d != "step"})
        return xr.Dataset(das)

    def __repr__(self) -> str:
        return (f"RunStore({str(self.path)!r}, steps={self._steps}, "
                f"tensors={len(self.tensor_names)})")


def _native(dtype: Any) -> np.dtype:
    """A zarr array's dtype as a numpy dtype (zarr 3.0 wraps it, 3.1 gives numpy's)."""
    return np.dtype(dtype.to_native_dtype() if hasattr(dtype, "to_native_dtype") else dtype)


class _DecodedBits:
    """Array-like over a tensor's decoded bits, for ``dask.array.from_array``.

    Slicing reads through ``read_bits`` (so chains are decoded there and
    nowhere else). Pickles as (path, name, steps) and reopens the store on
    the worker, holding that snapshot's steps only.
    """

    def __init__(self, store: RunStore, name: str) -> None:
        self.store, self.name = store, name
        self.shape = (len(store.steps), *store.shape(name))
        self.dtype = _native(store._array(name).dtype)
        self.ndim = len(self.shape)

    def __reduce__(self) -> tuple:
        return (_reopen_bits, (self.store.path, self.name, self.store.steps))

    def __getitem__(self, key: tuple) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        steps = key[0] if key else slice(None)
        rows = key[1] if len(key) > 1 and self.ndim > 1 else None
        bits = self.store.read_bits(self.name, steps, rows)
        rest = key[2:] if self.ndim > 1 else ()
        return bits[(slice(None), slice(None), *rest)] if rest else bits


def _reopen_bits(path: str | Path | RemotePath, name: str, steps: list[int]) -> _DecodedBits:
    store = RunStore(path)
    if store.steps[: len(steps)] != steps:
        raise PipelineError("store changed since it was opened (steps differ)", path)
    store._steps = list(steps)
    return _DecodedBits(store, name)


def open_run(store: str | Path | RemotePath,
             storage_options: dict[str, Any] | None = None) -> RunStore:
    """Open an ingested run store for reading (a folder, or an object-store URL)."""
    return RunStore(store, storage_options)
