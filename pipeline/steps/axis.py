"""The step axis: the commit protocol every step store shares (weights, token log-probs).

A store folder holds ``step/`` (int64, chunks of one, fill -1) and
``records/<i>/`` (one group per position). Appending position i means:
``grow`` every array to i + 1 positions (idempotent, so a writer that died
resumes at the same position), write the step's data chunks, then
``commit``: the record first, the marker ``step[i]`` last. Readers take the
prefix of positions whose marker is set (``committed_steps``), so a step is
either wholly visible or not at all. zarr's metadata documents are written
by hand (``pipeline.store.zmeta``: the same bytes, without zarr's per-call
cost); each write is an atomic rename locally, one (atomic) PUT on object
storage. ``path`` is a local folder or a ``location.RemotePath``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.store import zmeta
from pipeline.store.location import RemotePath, zarr_store

STEP_ARRAY = "step"
RECORDS_GROUP = "records"
NOT_COMMITTED = -1
STEP_DTYPE = np.dtype("int64")


def record_path(index: int) -> str:
    return f"{RECORDS_GROUP}/{index:08d}"


def layout(path: Path | RemotePath) -> None:
    """An empty step axis: no positions, no records."""
    zmeta.write_node(path / RECORDS_GROUP, zmeta.group_doc())
    zmeta.write_node(path / STEP_ARRAY, zmeta.array_doc(
        (0,), STEP_DTYPE, (1,), NOT_COMMITTED, [], None, ["step"]))


def committed_steps(path: Path | RemotePath) -> list[int]:
    """Steps whose marker is set: the prefix of ``step`` with no fill value."""
    import zarr

    try:
        arr = zarr.open_array(zarr_store(path), path=STEP_ARRAY, mode="r")
    except (FileNotFoundError, zarr.errors.NodeNotFoundError):
        return []
    vals = np.asarray(arr[:])
    missing = np.flatnonzero(vals == NOT_COMMITTED)
    n = int(missing[0]) if missing.size else vals.size
    return [int(v) for v in vals[:n]]


def positions(path: Path | RemotePath) -> int:
    """Positions laid out (committed or being written)."""
    return int(zmeta.read_node(path / STEP_ARRAY)["shape"][0])


def grow(path: Path | RemotePath, index: int,
         arrays: Iterable[tuple[Path | RemotePath, tuple[int, ...]]]) -> None:
    """Give the step axis and every (array folder, per-step shape) exactly index + 1 positions."""
    zmeta.resize(path / STEP_ARRAY, (index + 1,))
    for folder, shape in arrays:
        zmeta.resize(folder, (index + 1, *shape))


def commit(path: Path | RemotePath, index: int, step: int, record: dict[str, Any]) -> None:
    """The record, then the marker: the commit point of position ``index``."""
    zmeta.write_node(path / record_path(index), zmeta.group_doc(record))
    zmeta.write_scalar_chunk(path / STEP_ARRAY, index, int(step), STEP_DTYPE)


def read_record(path: Path | RemotePath, index: int) -> dict[str, Any]:
    return zmeta.read_node(path / record_path(index))["attributes"]


def check_append(last: int | None, step: int) -> str | None:
    """Why ``step`` cannot follow the last committed step (None: it can)."""
    if last is not None and step <= last:
        return f"step {step} is not after the last committed step {last} (steps are append-only)"
    return None
