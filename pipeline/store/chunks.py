"""Read stored chunks straight from their files: zarr's bytes without zarr's per-chunk cost.

The fit reads every chunk of a store once. Through ``zarr.Array.__getitem__``
each read pays zarr-python 3's per-call machinery (the event-loop round
trip, codec pipeline set-up, index arithmetic, a copy out of its buffer)
on top of reading and decompressing. Measured on the 0.3 GB bf16 store of
``benchmarks/fit.py`` (12 steps, 360 chunk files, 56 MB compressed, 306 MB
decoded), every block of the fit's plan read once in one process: through
zarr 1.48 s wall, 1.2 s CPU (1.03 s inside zarr, where reading the files
alone takes 0.04 s and blosc 0.52 s; the delta decode 0.12 s); directly 0.62 s
wall, 0.66 s CPU (blosc 0.48 s, decode 0.10 s). The ingest side already
writes chunks by hand (``tasks._ChunkWriter``); this is the read side.

``DirectArray.open`` accepts only the layout ingest writes and zarr reads
the same way: a local array folder whose ``zarr.json`` is zarr v3 with an
unsigned little-endian integer dtype, a regular grid of chunks of one
step by some rows by every other axis whole, zarr's default chunk key
encoding with the "/" separator, fill value 0, no storage transformer,
and the codec pipeline ``bytes`` (little endian) optionally followed by
``blosc``. Anything else gives ``None`` and the caller reads through zarr.
A chunk file that is absent is the fill value (zero: an all-zero delta
chunk is never written); a chunk whose decompressed size is not the chunk's
is a ``PipelineError``, as zarr would fail on it too.

Chunks are decompressed into the caller's buffer (rows wholly inside the
block) or into one reused scratch chunk (a chunk the block's row range
cuts), so a read allocates nothing per chunk but the compressed bytes.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
from numcodecs import blosc

from pipeline.errors import PipelineError

_BLOSC_HEADER = 16
_local = threading.local()  # per-thread buffers: one open store serves all of a worker's threads


KEEP_BYTES = 64 << 20  # largest scratch buffer a thread keeps between calls


def scratch(n: int, dtype: np.dtype, role: str = "block") -> np.ndarray:
    """A flat buffer of ``n`` items, this thread's own, reused call after call (no page faults).

    A request over ``KEEP_BYTES`` gets a new array that is not kept (a
    whole large tensor read at once must not pin its size per thread).
    """
    dtype = np.dtype(dtype)
    if n * dtype.itemsize > KEEP_BYTES:
        return np.empty(n, dtype)
    bufs: dict[tuple[str, str], np.ndarray] = _local.__dict__.setdefault("bufs", {})
    key = (role, dtype.str)
    buf = bufs.get(key)
    if buf is None or buf.size < n:
        buf = bufs[key] = np.empty(n, dtype)
    return buf[:n]


class DirectArray:
    """One stored tensor array, read by chunk file path (see the module docstring)."""

    def __init__(self, folder: Path, shape: tuple[int, ...], dtype: np.dtype,
                 chunks: tuple[int, ...], compressed: bool) -> None:
        self.folder = folder
        self.shape = shape  # (n_allocated_steps, *tensor_shape)
        self.dtype = dtype
        self.chunks = chunks
        self.compressed = compressed
        self.chunk_rows = chunks[1] if len(chunks) > 1 else 1
        self.row_items = int(np.prod(chunks[2:], dtype=np.int64)) if len(chunks) > 2 else 1
        self.chunk_nbytes = self.chunk_rows * self.row_items * dtype.itemsize
        self._tail = "/".join("0" for _ in chunks[2:])  # key part of the whole trailing axes

    @classmethod
    def open(cls, folder: Path) -> DirectArray | None:
        """The array at ``folder`` if its metadata is the layout read here, else ``None``.

        Only a local folder: an object store's chunks are read through zarr.
        """
        if not isinstance(folder, Path):
            return None
        try:
            doc = json.loads((folder / "zarr.json").read_bytes())
        except (OSError, ValueError):
            return None
        return cls.from_doc(folder, doc)

    @classmethod
    def from_doc(cls, folder: Path, doc: dict[str, Any]) -> DirectArray | None:
        try:
            if doc.get("zarr_format") != 3 or doc.get("node_type") != "array":
                return None
            if doc.get("storage_transformers") not in (None, []):
                return None
            dtype = np.dtype(doc["data_type"]) if isinstance(doc["data_type"], str) else None
            if dtype is None or dtype.kind != "u" or doc["data_type"] != dtype.name:
                return None
            dtype = dtype.newbyteorder("<")
            grid, keys = doc["chunk_grid"], doc["chunk_key_encoding"]
            if grid.get("name") != "regular" or keys.get("name") != "default":
                return None
            if keys.get("configuration", {}).get("separator", "/") != "/":
                return None
            fill = doc["fill_value"]
            if isinstance(fill, bool) or not isinstance(fill, int) or fill != 0:
                return None
            shape = tuple(int(s) for s in doc["shape"])
            chunks = tuple(int(c) for c in grid["configuration"]["chunk_shape"])
            if not shape or len(chunks) != len(shape) or chunks[0] != 1 or min(chunks) < 1:
                return None
            if 0 in shape[2:]:
                return None  # no elements per row: nothing to gain, leave it to zarr
            if any(c != max(s, 1) for c, s in zip(chunks[2:], shape[2:], strict=True)):
                return None  # trailing axes must be whole in every chunk
            codecs = doc["codecs"]
            if not codecs or codecs[0].get("name") != "bytes":
                return None
            endian = (codecs[0].get("configuration") or {}).get("endian", "little")
            if endian != "little" and dtype.itemsize > 1:
                return None
            rest = codecs[1:]
            if len(rest) > 1 or (rest and rest[0].get("name") != "blosc"):
                return None
        except (KeyError, TypeError, AttributeError, ValueError):
            return None
        return cls(folder, shape, dtype, chunks, bool(rest))

    def _path(self, p: int, j: int) -> str:
        if len(self.shape) == 1:
            return f"{self.folder}/c/{p}"
        return f"{self.folder}/c/{p}/{j}/{self._tail}" if self._tail else f"{self.folder}/c/{p}/{j}"

    def _decode_chunk(self, path: str, dst: np.ndarray) -> bool:
        """Chunk file ``path`` into ``dst`` (C-contiguous, one whole chunk); False if absent."""
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return False
        if self.compressed:
            if len(raw) < _BLOSC_HEADER or int.from_bytes(raw[4:8], "little") != self.chunk_nbytes:
                raise PipelineError(f"chunk is not {self.chunk_nbytes} bytes once decompressed",
                                    path)
            blosc.decompress(raw, dst)
        else:
            if len(raw) != self.chunk_nbytes:
                raise PipelineError(f"chunk is {len(raw)} bytes, expected {self.chunk_nbytes}",
                                    path)
            dst.view(np.uint8).reshape(-1)[:] = np.frombuffer(raw, np.uint8)
        return True

    def load_into(self, p: int, r0: int, r1: int, out: np.ndarray) -> np.ndarray:
        """Stored (encoded) rows ``[r0, r1)`` of position ``p`` into ``out``.

        ``out`` is C-contiguous with ``(r1 - r0) * row_items`` items of this
        array's dtype (any shape: a scalar tensor's block is one item).
        """
        flat = out.reshape(-1)
        if flat.size != (r1 - r0) * self.row_items:
            raise ValueError(f"out has {flat.size} items, rows {r0}:{r1} have "
                             f"{(r1 - r0) * self.row_items}")
        cr, ri = self.chunk_rows, self.row_items
        for j in range(r0 // cr, -(-r1 // cr)):
            a, b = j * cr, (j + 1) * cr
            lo, hi = max(a, r0), min(b, r1)
            dst = flat[(lo - r0) * ri:(hi - r0) * ri]
            path = self._path(p, j)
            if lo == a and hi == b:
                if not self._decode_chunk(path, dst):
                    dst[...] = 0
            else:  # the block cuts this chunk: decompress it whole, keep the rows asked for
                s = _chunk_scratch(self.chunk_rows * ri, self.dtype)
                if self._decode_chunk(path, s):
                    dst[...] = s[(lo - a) * ri:(hi - a) * ri]
                else:
                    dst[...] = 0
        return out


def _chunk_scratch(n: int, dtype: np.dtype) -> np.ndarray:
    """This thread's buffer for one whole chunk (apart from ``scratch``'s block buffer)."""
    buf = _local.__dict__.get("chunk")
    if buf is None or buf.dtype != dtype or buf.size < n:
        buf = _local.chunk = np.empty(n, dtype)
    return buf[:n]
