"""Streaming safetensors writer: header first, then data block by block, sharded.

``safetensors.torch.save_file`` needs every tensor of a file in memory at
once, which is what makes naive export cost "model size" RAM. A safetensors
file is an 8-byte header length, a JSON header giving every tensor's dtype,
shape and byte range, then the raw bytes in that order. Since an export knows
every output shape and dtype before computing anything, the header can be
written first and each tensor's bytes appended as its row blocks are
computed: a shard never needs its tensors in memory.

Shards follow the Hugging Face layout (``model-00001-of-00003.safetensors`` +
``model.safetensors.index.json``; a single ``model.safetensors`` when
everything fits) so ``transformers`` and vLLM load the folder as-is.
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import numpy as np

from pipeline.dtypes import safetensors_code
from pipeline.errors import PipelineError, check_size

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

def safetensors_dtype(dtype: np.dtype | type | str) -> str:
    """The safetensors code of a numpy/ml_dtypes dtype (``bfloat16`` -> ``BF16``)."""
    code = safetensors_code(dtype)
    if code is None:
        raise PipelineError(f"dtype {dtype} cannot be written to safetensors")
    return code


@dataclass(frozen=True)
class TensorSpec:
    """What the header needs to know about one output tensor before its data exists."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def plan_shards(specs: Iterable[TensorSpec], max_shard_size: int | None) -> list[list[TensorSpec]]:
    """Group tensors, in order, into shards of at most ``max_shard_size`` bytes.

    A tensor bigger than the limit gets a shard of its own (it cannot be
    split), as transformers does. ``None`` means one file.
    """
    shards: list[list[TensorSpec]] = [[]]
    used = 0
    for spec in specs:
        if max_shard_size is not None and shards[-1] and used + spec.nbytes > max_shard_size:
            shards.append([])
            used = 0
        shards[-1].append(spec)
        used += spec.nbytes
    return shards if shards[0] else []


def shard_file_names(n_shards: int) -> list[str]:
    """Hugging Face file names: one ``model.safetensors`` or ``model-0000i-of-0000n``."""
    if n_shards <= 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{n_shards:05d}.safetensors" for i in range(1, n_shards + 1)]


def _header_bytes(specs: list[TensorSpec], metadata: Mapping[str, str]) -> bytes:
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": safetensors_dtype(spec.dtype),
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the reference writer does
    return struct.pack("<Q", len(raw)) + raw


class SafetensorsFileWriter:
    """One safetensors file: header written on open, tensors appended in spec order."""

    def __init__(self, path: Path, specs: list[TensorSpec], metadata: Mapping[str, str]) -> None:
        if sys.byteorder != "little":  # pragma: no cover - safetensors is little-endian
            raise PipelineError("big-endian hosts are not supported")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise PipelineError("duplicate tensor names in one file", path)
        self.path = path
        self.specs = specs
        self._fh: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._fh.write(_header_bytes(specs, metadata))
        self._index = 0  # the tensor being written
        self._written = 0  # its bytes so far
        self._skip_empty()

    @property
    def done(self) -> bool:
        return self._index >= len(self.specs)

    def write(self, name: str, block: np.ndarray) -> None:
        """Append the next row block of tensor ``name`` (must be the current tensor)."""
        if self.done:
            raise PipelineError(f"tensor {name!r} written after the file was full", self.path)
        spec = self.specs[self._index]
        if name != spec.name:
            raise PipelineError(f"expected tensor {spec.name!r}, got {name!r}", self.path)
        if np.dtype(block.dtype) != np.dtype(spec.dtype):
            raise PipelineError(f"{name}: block dtype {block.dtype} != {spec.dtype}", self.path)
        data = np.ascontiguousarray(block).reshape(-1).view(np.uint8)
        if self._written + data.nbytes > spec.nbytes:
            raise PipelineError(f"{name}: more data than its shape {spec.shape}", self.path)
        self._fh.write(memoryview(data))
        self._written += data.nbytes
        if self._written == spec.nbytes:
            self._index += 1
            self._written = 0
            self._skip_empty()

    def _skip_empty(self) -> None:
        while not self.done and self.specs[self._index].nbytes == 0:
            self._index += 1

    def close(self, check: bool = True) -> None:
        """Close the file; with ``check``, fail if a tensor is missing bytes."""
        self._skip_empty()
        self._fh.close()
        if check and not self.done:
            spec = self.specs[self._index]
            raise PipelineError(f"tensor {spec.name!r} incomplete when closing", self.path)


class ShardedWriter:
    """Stream tensors, in the order given, into HF-style shards inside ``folder``.

    Use as a context manager; call :meth:`write` with consecutive row blocks of
    each tensor in order. On clean exit the index is written (for more than
    one shard); on an exception files are closed unchecked and the caller
    removes the (temporary) folder.
    """

    def __init__(
        self,
        folder: str | Path,
        specs: Iterable[TensorSpec],
        max_shard_size: str | int | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.metadata = dict(metadata or {})
        self.metadata.setdefault("format", "pt")  # transformers refuses files without it
        limit = (check_size(max_shard_size, "--max-shard-size")
                 if max_shard_size is not None else None)
        self.shards = plan_shards(list(specs), limit)
        self.files = shard_file_names(len(self.shards))
        self.weight_map = {s.name: f for shard, f in zip(self.shards, self.files, strict=True)
                           for s in shard}
        if len(self.weight_map) != sum(len(s) for s in self.shards):
            raise PipelineError("duplicate tensor names", self.folder)
        self._empty = {s.name for shard in self.shards for s in shard if s.nbytes == 0}
        self._shard = -1
        self._current: SafetensorsFileWriter | None = None

    def __enter__(self) -> ShardedWriter:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._next_shard()
        return self

    def _next_shard(self) -> None:
        if self._current is not None:
            self._current.close()
        self._shard += 1
        if self._shard < len(self.shards):
            self._current = SafetensorsFileWriter(
                self.folder / self.files[self._shard], self.shards[self._shard], self.metadata
            )
        else:
            self._current = None

    def write(self, name: str, block: np.ndarray) -> None:
        """Append a row block of ``name``; moves to the next shard when one is full."""
        if block.size == 0 and name in self._empty:
            return  # empty tensors are complete by construction
        while self._current is not None and self._current.done:
            self._next_shard()
        if self._current is None:
            raise PipelineError(f"tensor {name!r} is not in the plan or came too late",
                                self.folder)
        self._current.write(name, block)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            if self._current is not None:
                self._current.close(check=False)
            return
        while self._current is not None:
            self._next_shard()  # closes (and checks) every remaining shard, even empty ones
        if len(self.files) > 1:
            total = sum(s.nbytes for shard in self.shards for s in shard)
            index = {"metadata": {"total_size": total, **self.metadata},
                     "weight_map": dict(sorted(self.weight_map.items()))}
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def write_tensors(
    folder: str | Path,
    tensors: Mapping[str, np.ndarray],
    max_shard_size: str | int | None = None,
    metadata: Mapping[str, str] | None = None,
) -> list[str]:
    """Convenience for small in-memory dicts: write them with :class:`ShardedWriter`."""
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    with ShardedWriter(folder, specs, max_shard_size, metadata) as w:
        for k, v in tensors.items():
            w.write(k, v)
    return w.files
