"""Fit results on disk (zarr v3) and ``open_fit``: the only place the fit does I/O.

::

    run.fit/                     beside ``run.zarr`` (or the catalog's outputs/fit)
      elements.zarr/             attrs["rlvr_lin_fit"]: steps fitted, window, x sums, seed,
                                 block size, tensor table, ``complete`` (set last)
        tensors/<escaped>/       slope, intercept, r2: float32, the tensor's shape, dims
                                 dim_0.. (r2 is NaN where static), chunked as the store;
                                 12 bytes an element, the only per-element bytes written
                                 (no float64 state since schema 4, see ``job``). null_r2
                                 too (16 bytes) when the fit was asked for each element's
                                 null (``null_elements``): its histograms and means are
                                 kept either way, and ``element_results`` recomputes it
                                 for a few elements (the report's trajectories)
      histograms.zarr/           groups ``moving`` and ``paper``: xarray Datasets (tensor x bin)
      summary_*.csv              per tensor, per layer x module, overall

Each fit task writes whole chunks of its own pieces only, so tasks never
race, and a task re-run after a worker died rewrites the same bytes.

A fit folder may be an object-store prefix (``location.RemotePath``): chunk
files and documents are then single PUTs through zarr's store object, and
``complete`` is still set last.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.errors import PipelineError
from pipeline.store import zmeta
from pipeline.store.background_writes import BackgroundWriter
from pipeline.store.location import (
    RemotePath,
    as_location,
    remove_tree,
    upload_tree,
    zarr_store,
)
from pipeline.store.naming import escape_name

# 2: n_nonfinite in the histograms; 3: min/max as raw bits; 4: the fused kernel, no state;
# 5: the fields written are listed (meta "fields"), null_r2 only on request
SCHEMA_VERSION = 5
ATTRS_KEY = "rlvr_lin_fit"
ELEMENTS = "elements.zarr"
HISTOGRAMS = "histograms.zarr"
RESULT_FIELDS = ("slope", "intercept", "r2")  # written by every fit
NULL_FIELD = "null_r2"  # written only with ``null_elements`` (4 more bytes an element)


def result_fields(null_elements: bool) -> tuple[str, ...]:
    """The per-element arrays a fit writes."""
    return (*RESULT_FIELDS, NULL_FIELD) if null_elements else RESULT_FIELDS
SELECTIONS = ("moving", "paper")


def fit_dir_for(store: str | Path | RemotePath) -> Path | RemotePath:
    """Default fit folder of a store: ``run.zarr`` -> ``run.fit`` beside it."""
    store = as_location(store)
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


def read_meta(fit_dir: str | Path | RemotePath) -> dict[str, Any] | None:
    """The fit's metadata, or None when there is no fit there."""
    p = as_location(fit_dir) / ELEMENTS / "zarr.json"
    try:
        return json.loads(p.read_bytes())["attributes"][ATTRS_KEY]
    except (FileNotFoundError, NotADirectoryError, ValueError, KeyError, TypeError):
        return None


def write_meta(fit_dir: str | Path | RemotePath, meta: dict[str, Any]) -> None:
    g = zarr.open_group(zarr_store(as_location(fit_dir) / ELEMENTS), mode="r+")
    g.attrs[ATTRS_KEY] = meta


# chunk files c.<i>.0 beside the array's zarr.json, not c/<i>/0: no folder per chunk row (a
# mkdir costs ~0.8 ms on a busy overlay disk, more than writing the chunk's bytes)
CHUNK_KEYS = {"name": "default", "separator": "."}


def _results_compressors() -> Any:
    """None: float32 slope/intercept/R² shrink only to ~0.9 under lz4, which doubles the
    time to write them (measured), so they are stored raw."""
    return None


def _same_layout(fit_dir: Path | RemotePath, tensors: list[TensorPlan],
                 meta: dict[str, Any]) -> bool:
    """The folder holds a fit of this schema with these arrays, shapes and chunks.

    Every fit writes every chunk of every array, so such a fit's files are
    overwritten in place (``write_piece``) instead of removed and made anew.
    """
    old = read_meta(fit_dir)
    if (not old or old.get("schema_version") != meta["schema_version"]
            or old.get("tensors") != meta["tensors"] or old.get("fields") != meta["fields"]):
        return False
    folder = fit_dir / ELEMENTS / "tensors"
    return all((folder / t.path / f / "zarr.json").is_file()
               for t in tensors for f in meta["fields"])


def create_fit(fit_dir: str | Path | RemotePath, tensors: list[TensorPlan],
               meta: dict[str, Any]) -> None:
    """Create every array of a fit (metadata only; tasks fill the chunks).

    A fit of the same layout (``_same_layout``: a refit after an appended
    step, or ``--full``) keeps its arrays and only gets ``meta`` with
    ``complete`` unset. Anything else is opened with mode "w": whatever an
    older fit left (a ``state`` group of schema 3 included) is replaced.
    ``meta["fields"]`` names the arrays.
    """
    fit_dir = as_location(fit_dir)
    if _same_layout(fit_dir, tensors, meta):
        write_meta(fit_dir, meta)  # "complete" is unset before the first chunk is rewritten
        return
    root = zarr.open_group(zarr_store(fit_dir / ELEMENTS), mode="w")
    root.attrs[ATTRS_KEY] = meta
    tg = root.create_group("tensors")
    # zarr's create_array costs ms per array (4 per tensor); the first array of each rank is
    # made by zarr and its document reused for the others with their shape and chunks
    # (pipeline.store.zmeta writes it the way zarr does)
    templates: dict[int, dict[str, Any]] = {}
    folder = fit_dir / ELEMENTS / "tensors"
    for t in tensors:
        chunks = t.chunks()
        zmeta.write_node(folder / t.path, zmeta.group_doc())
        for f in meta["fields"]:
            doc = templates.get(len(t.shape))
            if doc is None:
                tg.require_group(t.path).create_array(
                    f, shape=t.shape, chunks=chunks, dtype="float32",
                    fill_value=np.nan, compressors=_results_compressors(),
                    chunk_key_encoding=CHUNK_KEYS, dimension_names=_dims(len(t.shape)),
                    overwrite=True)
                templates[len(t.shape)] = zmeta.read_node(folder / t.path / f)
                continue
            doc = copy.deepcopy(doc)
            doc["shape"] = list(t.shape)
            doc["chunk_grid"]["configuration"]["chunk_shape"] = list(chunks)
            zmeta.write_node(folder / t.path / f, doc)


def _region(shape: tuple[int, ...], rows: slice | None) -> tuple:
    return (rows,) if shape and rows is not None else ()


def write_piece(fit_dir: str | Path | RemotePath, t: TensorPlan, rows: slice | None,
                results: dict[str, np.ndarray], fields: tuple[str, ...],
                writer: BackgroundWriter) -> None:
    """Hand one piece's float32 ``fields`` to ``writer``; rows are a whole number of chunks.

    The result arrays are uncompressed little-endian float32 with "." chunk
    keys (``create_fit``), so a chunk file ``c.<i>.0`` is the chunk's bytes,
    the edge chunk padded with the fill value to the whole chunk as zarr pads
    it: written straight to the file, in place and in the background
    (``background_writes``), without zarr's per-call machinery (0.74 s of a 4.2 s
    fit of the 0.3 GB benchmark store went to writing through zarr). The
    caller's ``writer.wait()`` says they are written; ``results`` may be
    reused as soon as this returns. A 0-d tensor goes through zarr, at once.
    """
    root = as_location(fit_dir) / ELEMENTS
    if not t.shape or rows is None:
        for f in fields:
            arr = zarr.open_array(zarr_store(root), path=f"tensors/{t.path}/{f}", mode="r+")
            arr[...] = results[f].astype(np.float32, copy=False).reshape(t.shape)
        return
    chunks = t.chunks()
    cr = chunks[0]
    row_items = int(np.prod(t.shape[1:], dtype=np.int64))
    if rows.start % cr or (rows.stop % cr and rows.stop != t.shape[0]):
        raise ValueError(f"rows {rows.start}:{rows.stop} of {t.name} are not whole chunks of {cr}")
    tail = "".join(".0" for _ in t.shape[1:])
    pad: np.ndarray | None = None  # the edge chunk's buffer, made only when a piece has one
    for f in fields:
        vals = results[f].astype("<f4", copy=False).reshape(-1)
        folder = root / "tensors" / t.path / f
        for j in range(rows.start // cr, -(-rows.stop // cr)):
            a = (j * cr - rows.start) * row_items
            b = (min((j + 1) * cr, rows.stop) - rows.start) * row_items
            chunk = vals[a:b]
            if b - a < cr * row_items:  # the edge chunk: zarr stores it whole, padded with NaN
                if pad is None:
                    pad = np.full(cr * row_items, np.nan, "<f4")
                pad[: b - a] = chunk
                chunk = pad
            writer.submit(folder / f"c.{j}{tail}", np.ascontiguousarray(chunk).data)


class FitResult:
    """A finished fit: ``fit[name]`` is an xarray Dataset with slope, intercept, r2 (and
    null_r2 when the fit wrote each element's null).

    Arrays are lazy (dask-backed), so a large model's fit opens instantly.
    ``histograms(selection)`` gives the R² histograms ("moving": every element
    that moved; "paper": after the authors' filters).
    """

    def __init__(self, fit_dir: str | Path | RemotePath,
                 storage_options: dict[str, Any] | None = None) -> None:
        self.path = as_location(fit_dir, storage_options)
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
        ds = xr.open_zarr(zarr_store(self.path / ELEMENTS), group=f"tensors/{escape_name(name)}",
                          consolidated=False, zarr_format=3)
        ds.attrs.update(tensor=name, steps=self.steps, window=self.meta["window"])
        return ds

    def histograms(self, selection: str = "moving") -> Any:
        """R² histograms (tensor x bin) of one selection, with layer/module coordinates."""
        import xarray as xr

        if selection not in SELECTIONS:
            raise PipelineError(f"unknown selection {selection!r} (expected one of {SELECTIONS})")
        return xr.open_zarr(zarr_store(self.path / HISTOGRAMS), group=selection, consolidated=False,
                            zarr_format=3).load()

    def __repr__(self) -> str:
        return (f"FitResult({str(self.path)!r}, steps={self.steps}, "
                f"tensors={len(self.tensor_names)})")


def resolve_fit_dir(target: str | Path | RemotePath,
                    storage_options: dict[str, Any] | None = None,
                    catalog: str | Path | None = None) -> Path | RemotePath:
    """A fit folder, a store (-> its sibling fit), or a catalog name (-> outputs/fit) in
    ``catalog`` (default: ``catalog.catalog_path``'s)."""
    from pipeline.catalog import resolve

    if isinstance(target, str) and not storage_options:
        fit_dir = resolve(target, catalog).output("fit")
        if fit_dir is not None:
            return fit_dir
    p = as_location(target, storage_options)
    if read_meta(p) is not None:
        return p
    return fit_dir_for(p)


def open_fit(store: str | Path | RemotePath,
             storage_options: dict[str, Any] | None = None,
             catalog: str | Path | None = None) -> FitResult:
    """Open the per-element fit of a store, a fit folder or a catalog entry name (of
    ``catalog``, default ``./data_catalog.yaml`` or ``$RLVR_LIN_CATALOG``).

    A store or fit on object storage is a URL with its ``storage_options``.
    """
    return FitResult(resolve_fit_dir(store, storage_options, catalog))


def save_outputs(fit_dir: Path | RemotePath, datasets: dict[str, Any]) -> None:
    """The histograms (zarr) and CSV summaries of a fit, locally or on object storage.

    On object storage they are written locally by ``write_outputs`` and
    uploaded file by file: xarray's ``to_zarr`` straight to S3 makes ~6
    requests per file (existence checks), 8 s against moto for a tiny fit.
    """
    import tempfile

    from pipeline.fit.histograms import write_outputs

    if not isinstance(fit_dir, RemotePath):
        write_outputs(fit_dir, datasets)
        return
    with tempfile.TemporaryDirectory(prefix="rlvr-lin-fit-") as tmp:
        write_outputs(tmp, datasets)
        remove_tree(fit_dir / HISTOGRAMS)  # what write_outputs' mode="w" does locally
        upload_tree(Path(tmp), fit_dir)
