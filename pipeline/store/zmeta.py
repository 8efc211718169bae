"""Zarr v3 metadata written by hand: the same bytes zarr writes, without its per-call cost.

Ingest makes a few metadata writes per step (grow every array, the step's
record, its completion marker, the root summary) and one per tensor when
a store is laid out. Through zarr's API each costs milliseconds (its async
machinery, re-parsing the array's metadata), which on a run of small
tensors was most of the ingest time (measured: 28 ``create_array`` 1.1 s,
one ``grow`` 0.46 s and 11 commits 0.5 s of a 3.8 s ingest of the 13 MB
embedded run). The documents here are zarr's own (``json.dumps`` with
zarr's indent, same keys in the same order); ``tests/test_store_zmeta.py``
checks the bytes are identical to what zarr writes and that zarr reads
them. Every local write is a temporary file renamed over the target, so a
crash leaves the old or the new document, never half of one; on object
storage (``location.RemotePath``) a write is one PUT, which is atomic itself.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.store.location import RemotePath

ZARR_JSON = "zarr.json"
_INDENT = 2  # zarr's default ``json_indent``


def write_atomic(path: Path | RemotePath, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder (one PUT remotely)."""
    if isinstance(path, RemotePath):
        path.write_bytes(data)
        return
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _dump(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, indent=_INDENT, allow_nan=True).encode()


def group_doc(attributes: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"attributes": attributes or {}, "zarr_format": 3, "node_type": "group"}


def blosc_codec(itemsize: int, cname: str, clevel: int, shuffle: str) -> dict[str, Any]:
    """The codec entry of zarr's ``BloscCodec(cname, clevel, shuffle, typesize=itemsize)``."""
    return {"name": "blosc", "configuration": {"typesize": itemsize, "cname": cname,
                                               "clevel": clevel, "shuffle": shuffle,
                                               "blocksize": 0}}


def array_doc(shape: tuple[int, ...], dtype: np.dtype, chunks: tuple[int, ...],
              fill_value: int, compressors: list[dict[str, Any]],
              attributes: dict[str, Any] | None, dimension_names: list[str]) -> dict[str, Any]:
    """What ``zarr.create_array`` writes for a little-endian integer array."""
    if dtype.kind not in "iu":
        raise ValueError(f"only integer arrays are written by hand, not {dtype}")
    return {
        "shape": list(shape),
        "data_type": dtype.name,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": int(fill_value),
        "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, *compressors],
        "attributes": attributes or {},
        "dimension_names": list(dimension_names),
        "zarr_format": 3,
        "node_type": "array",
        "storage_transformers": [],
    }


def write_node(folder: Path | RemotePath, doc: dict[str, Any]) -> None:
    """Create or replace the node (group or array) whose folder is ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / ZARR_JSON, _dump(doc))


def read_node(folder: Path | RemotePath) -> dict[str, Any]:
    return json.loads((folder / ZARR_JSON).read_bytes())


def set_attributes(folder: Path | RemotePath, attributes: dict[str, Any]) -> None:
    """Replace a node's attributes (what ``attrs.put`` does)."""
    doc = read_node(folder)
    doc["attributes"] = attributes
    write_node(folder, doc)


def resize(folder: Path | RemotePath, shape: tuple[int, ...]) -> None:
    """Set an array's shape (chunks outside it are left alone: ingest only ever grows)."""
    doc = read_node(folder)
    if doc["shape"] != list(shape):
        doc["shape"] = list(shape)
        write_node(folder, doc)


def write_scalar_chunk(folder: Path | RemotePath, index: int, value: int, dtype: np.dtype) -> None:
    """Chunk ``index`` of an uncompressed 1-D array with chunks of one element."""
    chunk = folder / "c" / str(index)
    chunk.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(chunk, np.asarray([value], dtype=dtype.newbyteorder("<")).tobytes())
