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
import reprlib
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# dtypes live in pipeline.dtypes (import them from there)
from pipeline.dtypes import ST_DTYPES, bits_dtype, logical_dtype
from pipeline.errors import PipelineError

MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself enforces


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


MAX_NBYTES = (1 << 63) - 1  # numpy and zarr index with int64
ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})
_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict, _REPR.maxlevel = 80, 80, 8, 4, 2


def short(x: Any) -> str:
    """``repr`` cut to a readable length: a hostile header must not make a megabyte error line."""
    return _REPR.repr(x)


def _reject_constant(name: str) -> float:
    """JSON has no NaN/Infinity; Python's parser accepts them, safetensors' does not."""
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    """A float literal; ``1e400`` overflows to inf in Python but is out of range in safetensors."""
    x = float(text)
    if not math.isfinite(x):
        raise ValueError(f"number {text} is out of range")
    return x


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Refuse a key given twice: Python and safetensors would silently keep one of them."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {short(k)}")
        out[k] = v
    return out


def _loads(text: str, path: Path) -> Any:
    """Parse header JSON as strictly as safetensors' serde parser, without recursing away."""
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float,
                          object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise PipelineError("corrupt safetensors header (JSON nested too deeply)", path) from None
    except ValueError as e:  # JSONDecodeError and our hooks' refusals (incl. huge int literals)
        raise PipelineError(f"corrupt safetensors header (not valid JSON: {e})", path) from None


def _is_utf8(s: str) -> bool:
    """A lone surrogate (``\\ud800`` in JSON) is not text: safetensors refuses it, so do we."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_uint(x: Any) -> bool:
    """A JSON integer >= 0 that fits u64 (bool is an int in Python, not in JSON)."""
    return type(x) is int and 0 <= x < 1 << 64


def _check_metadata(meta: Any, path: Path) -> None:
    """``__metadata__`` is null or a map of strings to strings, as in safetensors."""
    if meta is None:
        return
    if not isinstance(meta, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and _is_utf8(k) and _is_utf8(v)
            for k, v in meta.items()):
        raise PipelineError("corrupt safetensors header (__metadata__ is not a map of strings "
                            "to strings)", path)


def _entry(name: str, meta: Any, path: Path) -> tuple[str, tuple[int, ...], int, int]:
    """(logical dtype, shape, begin, end) of one header entry, every field type-checked."""
    def bad(why: str) -> PipelineError:
        return PipelineError(f"corrupt safetensors header entry for tensor {short(name)}: "
                             f"{why}", path)

    if not _is_utf8(name):
        raise PipelineError(f"tensor name {short(name)} is not valid UTF-8 (a lone surrogate)",
                            path)
    if not isinstance(meta, dict) or set(meta) != ENTRY_KEYS:
        raise bad("expected exactly the fields dtype, shape, data_offsets")
    code, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
    if not isinstance(shape, list) or not all(_is_uint(s) for s in shape):
        raise bad(f"shape {short(shape)} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_uint, offsets))
            or offsets[0] > offsets[1]):
        raise bad(f"data_offsets {short(offsets)} are not two increasing non-negative integers")
    if not isinstance(code, str) or code not in ST_DTYPES:
        raise PipelineError(f"tensor {short(name)} has unsupported dtype {short(code)}", path)
    dtype = ST_DTYPES[code]
    size = logical_dtype(dtype).itemsize * math.prod(max(s, 1) for s in shape)
    if size > MAX_NBYTES:
        raise bad(f"shape {short(shape)} is too large")
    nbytes = logical_dtype(dtype).itemsize * math.prod(shape)
    begin, end = offsets
    if end - begin != nbytes:
        raise PipelineError(f"corrupt safetensors header: tensor {short(name)} has shape "
                            f"{short(shape)} but {end - begin} data bytes", path)
    return dtype, tuple(shape), begin, end


def _check_layout(spans: list[tuple[int, int, str]], data_bytes: int, path: Path) -> None:
    """Tensors tile the data section exactly: inside the file, no overlap, no gap, no tail.

    An overlap would make two tensors read the same bytes (silently wrong data);
    a gap or tail means the header does not describe the file. safetensors refuses both.
    """
    for _begin, end, name in spans:
        if end > data_bytes:
            raise PipelineError(f"truncated safetensors file: tensor {short(name)} ends at data "
                                f"byte {end} but the file has {data_bytes} data bytes", path)
    pos = 0
    for begin, end, name in sorted(spans):
        if begin != pos:
            what = "overlaps the tensor before it" if begin < pos else "leaves a gap before it"
            raise PipelineError(f"corrupt safetensors header: tensor {short(name)} at bytes "
                                f"[{begin}, {end}) {what} (expected offset {pos})", path)
        pos = end
    if pos != data_bytes:
        raise PipelineError(f"safetensors file size does not match its header ({data_bytes} "
                            f"data bytes, the header describes {pos})", path)


def parse_header(raw: bytes, file_size: int, path: Path) -> dict[str, TensorInfo]:
    """Validate a header against the file size; pure apart from naming ``path`` in errors.

    ``raw`` is the file's first bytes (at least 8 + header length). Every
    check that can tell a complete file from a truncated or corrupt one is
    made here, so nothing is ingested from a file that would fail later. The
    rules are those of the safetensors library or stricter (a duplicate key,
    an unknown entry field or an unsupported dtype is refused here too), so
    whatever parses here reads the same in ``safetensors``.
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
        text = raw[8 : 8 + n].decode("utf-8")
    except UnicodeDecodeError as e:
        raise PipelineError(f"corrupt safetensors header (not UTF-8: {e})", path) from None
    header = _loads(text, path)
    if not isinstance(header, dict):
        raise PipelineError("corrupt safetensors header (not a JSON object)", path)
    _check_metadata(header.get("__metadata__"), path)
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, begin, end = _entry(name, meta, path)
        spans.append((begin, end, name))
        out[name] = TensorInfo(name, path, dtype, shape, base + begin, end - begin)
    _check_layout(spans, file_size - base, path)
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
