"""Fit results on disk (zarr v3) and ``open_fit``: the only place the fit does I/O.

::

    run.fit/                     beside ``run.zarr`` (or the catalog's outputs/fit)
      elements.zarr/             attrs["rlvr_lin_fit"]: steps fitted, window, x sums, seed,
                                 block size, tensor table, ``complete`` (set last)
        tensors/<escaped>/       slope, intercept, r2, null_r2: float32, the tensor's shape,
                                 dims dim_0.. (r2 and null_r2 are NaN where static)
        state/<escaped>/         f64 (7, *shape) and bits (7, *shape): the sufficient
                                 statistics that let an appended step update the fit
                                 (absent when fitted with ``keep_state=False``; then
                                 attrs ``state`` is false and the next fit starts afresh)
      histograms.zarr/           groups ``moving`` and ``paper``: xarray Datasets (tensor x bin)
      summary_*.csv              per tensor, per layer x module, overall

Each fit task writes whole chunks of its own pieces only, so tasks never
race, and a task re-run after a worker died rewrites the same bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.checkpoints.format import logical_dtype
from pipeline.errors import PipelineError
from pipeline.fit.kernels import BITS_FIELDS, F64_FIELDS, FitState, bits_dtype
from pipeline.store.naming import escape_name

SCHEMA_VERSION = 3  # 2: n_nonfinite in the histograms; 3: min/max as raw bits
ATTRS_KEY = "rlvr_lin_fit"
ELEMENTS = "elements.zarr"
HISTOGRAMS = "histograms.zarr"
RESULT_FIELDS = ("slope", "intercept", "r2", "null_r2")
SELECTIONS = ("moving", "paper")


def fit_dir_for(store: str | Path) -> Path:
    """Default fit folder of a store: ``run.zarr`` -> ``run.fit`` beside it."""
    store = Path(store)
    stem = store.name[:-5] if store.name.endswith(".zarr") else store.name
    return store.with_name(stem + ".fit")


def _dims(ndim: int) -> list[str]:
    return [f"dim_{i}" for i in range(ndim)]


@dataclass(frozen=True)
class TensorPlan:
    """How one tensor is laid out in the fit: rows per chunk = rows per fit piece."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    chunk_rows: int

    @property
    def path(self) -> str:
        return escape_name(self.name)

    def chunks(self) -> tuple[int, ...]:
        if not self.shape:
            return ()
        return (max(1, min(self.chunk_rows, self.shape[0])), *(max(s, 1) for s in self.shape[1:]))


def read_meta(fit_dir: str | Path) -> dict[str, Any] | None:
    """The fit's metadata, or None when there is no fit there."""
    p = Path(fit_dir) / ELEMENTS / "zarr.json"
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())["attributes"][ATTRS_KEY]
    except (ValueError, KeyError):
        return None


def write_meta(fit_dir: str | Path, meta: dict[str, Any]) -> None:
    g = zarr.open_group(str(Path(fit_dir) / ELEMENTS), mode="r+")
    g.attrs[ATTRS_KEY] = meta


def _fast() -> Any:
    """Compression for the state the fit writes: lz4 after a bit shuffle.

    Writing is most of a fit's I/O (~80 bytes per element against 2 per step
    read). The float64 sums of bf16 deltas have few significant bits: a bit
    shuffle + lz4 stores them in ~0.2 of their size, at about the cost of
    writing them raw, where zstd (level 1) took 3-5x as long for the same size;
    the raw bits shrink to ~0.65 (measured on a synthetic bf16 run).
    """
    from zarr.codecs import BloscCodec

    return BloscCodec(cname="lz4", clevel=1, shuffle="bitshuffle")


def _results_compressors() -> Any:
    """None: float32 slope/intercept/R² shrink only to ~0.9 under lz4, which doubles the
    time to write them (measured), so they are stored raw."""
    return None


def create_fit(fit_dir: str | Path, tensors: list[TensorPlan], meta: dict[str, Any],
               keep_state: bool = True) -> None:
    """Create every array of a fresh fit (metadata only; tasks fill the chunks).

    Without ``keep_state`` only the float32 results are created (no ``state`` group).
    """
    root = zarr.open_group(str(Path(fit_dir) / ELEMENTS), mode="w")
    root.attrs[ATTRS_KEY] = meta
    tg = root.create_group("tensors")
    sg = root.create_group("state") if keep_state else None
    for t in tensors:
        chunks = t.chunks()
        g = tg.create_group(t.path)
        for f in RESULT_FIELDS:
            g.create_array(f, shape=t.shape, chunks=chunks or None, dtype="float32",
                           fill_value=np.nan, compressors=_results_compressors(),
                           dimension_names=_dims(len(t.shape)))
        if sg is None:
            continue
        s = sg.create_group(t.path)
        s.create_array("f64", shape=(len(F64_FIELDS), *t.shape),
                       chunks=(len(F64_FIELDS), *chunks), dtype="float64", fill_value=0.0,
                       compressors=_fast(), dimension_names=["field", *_dims(len(t.shape))])
        s.create_array("bits", shape=(len(BITS_FIELDS), *t.shape),
                       chunks=(len(BITS_FIELDS), *chunks),
                       dtype=bits_dtype(logical_dtype(t.dtype)), fill_value=0,
                       compressors=_fast(), dimension_names=["field", *_dims(len(t.shape))])


def _region(shape: tuple[int, ...], rows: slice | None) -> tuple:
    return (rows,) if shape and rows is not None else ()


def write_piece(fit_dir: str | Path, t: TensorPlan, rows: slice | None,
                results: dict[str, np.ndarray], state: FitState | None) -> None:
    """Write one piece's results (float32) and state (unless None: a fit without state);
    rows are a whole number of chunks."""
    root = Path(fit_dir) / ELEMENTS
    reg = _region(t.shape, rows)
    block = np.empty(t.shape)[reg].shape if t.shape else ()
    # every chunk written here is whole and new: skip zarr's "is it all fill value?" check,
    # which costs more than compressing the chunk (it is read when the array is opened)
    with zarr.config.set({"array.write_empty_chunks": True}):
        for f in RESULT_FIELDS:
            arr = zarr.open_array(str(root), path=f"tensors/{t.path}/{f}", mode="r+")
            arr[reg] = results[f].astype(np.float32, copy=False).reshape(block)
        if state is None:
            return
        for name, a in (("f64", state.f64), ("bits", state.bits)):
            arr = zarr.open_array(str(root), path=f"state/{t.path}/{name}", mode="r+")
            arr[(slice(None), *reg)] = a.reshape(a.shape[0], *block)


def read_state(fit_dir: str | Path, t: TensorPlan, rows: slice | None) -> FitState:
    """The stored sufficient statistics of one piece, bit-exact."""
    root = Path(fit_dir) / ELEMENTS
    reg = (slice(None), *_region(t.shape, rows))
    f64 = np.asarray(zarr.open_array(str(root), path=f"state/{t.path}/f64", mode="r")[reg])
    bits = np.asarray(zarr.open_array(str(root), path=f"state/{t.path}/bits", mode="r")[reg])
    return FitState(f64.reshape(len(F64_FIELDS), -1), bits.reshape(len(BITS_FIELDS), -1))


class FitResult:
    """A finished fit: ``fit[name]`` is an xarray Dataset with slope, intercept, r2, null_r2.

    Arrays are lazy (dask-backed), so a large model's fit opens instantly.
    ``histograms(selection)`` gives the R² histograms ("moving": every element
    that moved; "paper": after the authors' filters).
    """

    def __init__(self, fit_dir: str | Path) -> None:
        self.path = Path(fit_dir)
        meta = read_meta(self.path)
        if meta is None:
            raise PipelineError("no fit found (run `rlvr-lin fit` first)", self.path)
        if not meta.get("complete"):
            raise PipelineError("fit is incomplete (interrupted); run `rlvr-lin fit` again",
                                self.path)
        self.meta = meta

    @property
    def steps(self) -> list[int]:
        return list(self.meta["steps"])

    @property
    def tensor_names(self) -> list[str]:
        return list(self.meta["tensors"])

    def __contains__(self, name: object) -> bool:
        return name in self.meta["tensors"]

    def __getitem__(self, name: str) -> Any:
        import xarray as xr

        if name not in self.meta["tensors"]:
            raise KeyError(name)
        ds = xr.open_zarr(str(self.path / ELEMENTS), group=f"tensors/{escape_name(name)}",
                          consolidated=False, zarr_format=3)
        ds.attrs.update(tensor=name, steps=self.steps, window=self.meta["window"])
        return ds

    def histograms(self, selection: str = "moving") -> Any:
        """R² histograms (tensor x bin) of one selection, with layer/module coordinates."""
        import xarray as xr

        if selection not in SELECTIONS:
            raise PipelineError(f"unknown selection {selection!r} (expected one of {SELECTIONS})")
        return xr.open_zarr(str(self.path / HISTOGRAMS), group=selection, consolidated=False,
                            zarr_format=3).load()

    def __repr__(self) -> str:
        return (f"FitResult({str(self.path)!r}, steps={self.steps}, "
                f"tensors={len(self.tensor_names)})")


def resolve_fit_dir(target: str | Path) -> Path:
    """A fit folder, a store (-> its sibling fit), or a catalog name (-> outputs/fit)."""
    from pipeline.catalog import is_catalog_name, lookup

    p = Path(target)
    if read_meta(p) is not None:
        return p
    if isinstance(target, str) and is_catalog_name(target):
        return lookup(target).outputs / "fit"
    return fit_dir_for(p)


def open_fit(store: str | Path) -> FitResult:
    """Open the per-element fit of a store (or a fit folder, or a catalog entry name)."""
    return FitResult(resolve_fit_dir(store))
