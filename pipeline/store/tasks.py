"""Functions that run on Dask workers: read a block, encode it, write its own chunks.

Each task gets plain picklable specs (no open files, no zarr objects) and
opens what it needs, so it runs on any worker of any cluster that sees the
same file system. Memory per task is about three times its block.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from pipeline.checkpoints.format import TensorInfo, read_rows_bits
from pipeline.store.codec import count_nonfinite, encode
from pipeline.store.integrity import file_digest
from pipeline.store.layout import TENSORS_GROUP


@dataclass(frozen=True)
class PieceSpec:
    """Rows [start, stop) of one tensor: where to read them and which array they go to."""

    info: TensorInfo
    array: str  # escaped path component under tensors/
    start: int
    stop: int


@dataclass(frozen=True)
class BlockResult:
    nbytes: int
    nonfinite: dict[str, tuple[int, int, int]]


def _read(spec: PieceSpec, pickle_folder: str | None) -> np.ndarray:
    rows = slice(spec.start, spec.stop) if spec.info.shape else None
    if pickle_folder is None:
        return read_rows_bits(spec.info, rows)
    from pipeline.checkpoints.reader import CheckpointReader

    return CheckpointReader(pickle_folder, allow_pickle=True).read_bits(spec.info.name, rows)


def write_block(store: str, index: int, specs: list[PieceSpec],
                pickle_folder: str | None = None) -> BlockResult:
    """Encode and write position ``index`` of every piece; returns bytes and NaN/inf counts."""
    arrays: dict[str, zarr.Array] = {}
    nonfinite: dict[str, tuple[int, int, int]] = {}
    nbytes = 0
    for spec in specs:
        arr = arrays.get(spec.array)
        if arr is None:
            arr = arrays[spec.array] = zarr.open_array(
                store, path=f"{TENSORS_GROUP}/{spec.array}", mode="r+")
        bits = _read(spec, pickle_folder)
        nbytes += bits.nbytes
        counts = count_nonfinite(bits, spec.info.dtype)
        if any(counts):
            old = nonfinite.get(spec.info.name, (0, 0, 0))
            nonfinite[spec.info.name] = tuple(a + b for a, b in zip(old, counts, strict=True))
        if spec.info.shape:
            region: tuple = (index, slice(spec.start, spec.stop))
            base_region: tuple = (0, slice(spec.start, spec.stop))
        else:
            region, base_region = (index,), (0,)
        if bits.size == 0:
            continue
        base = None if index == 0 else np.asarray(arr[base_region])
        arr[region] = encode(bits, base)
    return BlockResult(nbytes, nonfinite)


def digest_task(path: str) -> tuple[str, int, str]:
    """(path, size, digest) of one checkpoint file."""
    return path, Path(path).stat().st_size, file_digest(path)
