"""The safetensors file format, parsed and validated without reading tensor data.

A safetensors file is an 8-byte little-endian header length, a JSON header
mapping tensor names to ``{dtype, shape, data_offsets}``, then the raw
row-major little-endian bytes. Parsing the header ourselves (instead of
``safe_open``) lets us check a file is complete before ingesting it (a
truncated or half-written shard has a file size that disagrees with its
header) and read any row block of any dtype, bf16 included, with one
``pread``: safetensors' numpy backend has no bfloat16.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from pipeline.errors import PipelineError

# safetensors dtype code -> (logical numpy dtype name, itemsize)
ST_DTYPES: dict[str, str] = {
    "BF16": "bfloat16",
    "F16": "float16",
    "F32": "float32",
    "F64": "float64",
    "I8": "int8",
    "I16": "int16",
    "I32": "int32",
    "I64": "int64",
    "U8": "uint8",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself enforces


def logical_dtype(name: str) -> np.dtype:
    """The numpy dtype for a logical dtype name (``bfloat16`` comes from ml_dtypes)."""
    if hasattr(ml_dtypes, name) and name.startswith(("bfloat", "float8")):
        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)


def bits_dtype(name: str) -> np.dtype:
    """Unsigned little-endian integer of the same width: how a dtype is stored bit-exactly."""
    return np.dtype(f"<u{logical_dtype(name).itemsize}")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, absolute byte offset of its data, dtype, shape."""

    name: str
    file: Path
    dtype: str  # logical dtype name, e.g. "bfloat16"
    shape: tuple[int, ...]
    offset: int  # absolute offset of the first byte in ``file``
    nbytes: int

    @property
    def row_bytes(self) -> int:
        """Bytes per index of axis 0 (the whole tensor for a scalar)."""
        if not self.shape:
            return self.nbytes
        return self.nbytes // self.shape[0] if self.shape[0] else 0


def parse_header(raw: bytes, file_size: int, path: Path) -> dict[str, TensorInfo]:
    """Validate a header against the file size; pure apart from naming ``path`` in errors.

    ``raw`` is the file's first bytes (at least 8 + header length). Every
    check that can tell a complete file from a truncated or corrupt one is
    made here, so nothing is ingested from a file that would fail later.
    """
    if file_size < 8 or len(raw) < 8:
        raise PipelineError("not a safetensors file (shorter than its 8-byte header length)", path)
    (n,) = struct.unpack("<Q", raw[:8])
    if n > MAX_HEADER_BYTES or 8 + n > file_size:
        raise PipelineError(f"corrupt or truncated safetensors header (length {n} bytes, "
                            f"file {file_size} bytes)", path)
    if len(raw) < 8 + n:
        raise PipelineError("truncated safetensors header", path)
    try:
        header = json.loads(raw[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PipelineError(f"corrupt safetensors header (not JSON: {e})", path) from None
    if not isinstance(header, dict):
        raise PipelineError("corrupt safetensors header (not a JSON object)", path)
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    end_max = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            code, shape, (begin, end) = meta["dtype"], meta["shape"], meta["data_offsets"]
            shape = tuple(int(s) for s in shape)
            begin, end = int(begin), int(end)
        except (KeyError, TypeError, ValueError):
            raise PipelineError(f"corrupt safetensors header entry for tensor {name!r}",
                                path) from None
        if code not in ST_DTYPES:
            raise PipelineError(f"tensor {name!r} has unsupported dtype {code!r}", path)
        dtype = ST_DTYPES[code]
        nbytes = math.prod(shape) * logical_dtype(dtype).itemsize
        if any(s < 0 for s in shape) or begin < 0 or end - begin != nbytes:
            raise PipelineError(f"corrupt safetensors header: tensor {name!r} has shape {shape} "
                                f"but {end - begin} data bytes", path)
        if base + end > file_size:
            raise PipelineError(f"truncated safetensors file: tensor {name!r} ends at byte "
                                f"{base + end} but the file has {file_size}", path)
        end_max = max(end_max, end)
        out[name] = TensorInfo(name, path, dtype, shape, base + begin, nbytes)
    if base + end_max != file_size:
        raise PipelineError(f"safetensors file size {file_size} does not match its header "
                            f"(expected {base + end_max})", path)
    return out


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Read and validate the header of one safetensors file (no tensor data is read)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            raw = head + (f.read(n) if 0 < n <= min(MAX_HEADER_BYTES, size) else b"")
    except OSError as e:
        raise PipelineError(f"cannot read safetensors file: {e.strerror}", path) from None
    return parse_header(raw, size, path)


def read_rows_bits(info: TensorInfo, rows: slice | None = None) -> np.ndarray:
    """Bit patterns of rows ``rows`` of a tensor: one contiguous read, memory = the block.

    Row-major storage makes a block of leading-axis indices one byte range.
    """
    shape = info.shape
    if not shape:
        a, b, out_shape = 0, 1, ()
    else:
        a, b, _ = slice(None).indices(shape[0]) if rows is None else rows.indices(shape[0])
        b = max(a, b)
        out_shape = (b - a, *shape[1:])
    rb = info.row_bytes
    count = (b - a) * rb
    buf = bytearray(count)
    fd = os.open(info.file, os.O_RDONLY)
    try:
        pread_exact(fd, memoryview(buf), info.offset + a * rb, info)
    finally:
        os.close(fd)
    return np.frombuffer(buf, dtype=bits_dtype(info.dtype)).reshape(out_shape)


def pread_exact(fd: int, view: memoryview, pos: int, info: TensorInfo) -> None:
    """Fill ``view`` from byte ``pos`` of ``info.file``; a short file is a named error.

    The header already promised these bytes, so running out means the file
    was truncated after its header was written (a crash or a copy in progress).
    """
    got, count = 0, view.nbytes
    while got < count:
        n = os.preadv(fd, [view[got:]], pos + got)
        if n == 0:
            raise PipelineError(f"truncated safetensors file while reading {info.name!r}",
                                info.file)
        got += n
