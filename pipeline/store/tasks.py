"""Functions that run on Dask workers: read a byte range of a file, hash it, encode and write it.

Each task gets plain picklable specs (no open files, no zarr objects) and
opens what it needs, so it runs on any worker of any cluster that sees the
same file system (the checkpoints) and the store (a local folder, or an
object-store ``location.RemotePath``). A task owns a contiguous byte range of one weight file:
it reads the tensors in it one chunk at a time (memory is a few chunks,
whatever the task's size), hashes every byte of the range on the way (the
file digest is combined from fixed 1 MiB blocks, see ``integrity``), and
writes each chunk of its step position as one file.

A task may cover the same byte range of several consecutive steps
(``write_ranges``): each step's chunk is then encoded against the previous
step's bits it has just read itself (``codec.reference``), and only the
first step's reference is read back from the store (decoded along its
chain). The reference always comes from the store or from this task's own
reads of the previous step, never from the new checkpoint alone.

Chunks are written the way zarr itself writes them (same key, same codec,
edge chunks padded with the fill value, all-fill chunks absent), without
zarr's per-call machinery; ``tests/test_store_*`` checks the bytes are
identical to zarr's. Reference chunks are read back the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numcodecs import Blosc

from pipeline.checkpoints.format import TensorInfo, pread_exact, read_rows_bits
from pipeline.dtypes import bits_dtype
from pipeline.errors import PipelineError
from pipeline.store import zmeta
from pipeline.store.codec import (
    DEFAULT_KEY_EVERY,
    chain,
    count_nonfinite,
    decode,
    encode_into,
    reference,
)
from pipeline.store.integrity import TREE_BLOCK, block_digest, block_hasher, tree_digest
from pipeline.store.layout import CLEVEL, SHUFFLE, TENSORS_GROUP
from pipeline.store.location import RemotePath, as_location


def chunk_codec(itemsize: int) -> Blosc:
    """The numcodecs Blosc that zarr's ``BloscCodec`` of ``state.compressor`` runs."""
    shuffle = {"shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}[SHUFFLE]
    return Blosc(cname="zstd", clevel=CLEVEL, shuffle=shuffle, blocksize=0, typesize=itemsize)


@dataclass(frozen=True)
class PieceSpec:
    """Rows [start, stop) of one tensor: where to read them and which array they go to."""

    info: TensorInfo
    array: str  # escaped path component under tensors/
    start: int
    stop: int
    chunk_rows: int = 1  # rows per stored chunk of the array


@dataclass(frozen=True)
class RangeSpec:
    """Bytes [start, stop) of one weight file (``file`` None: a pickle, not hashed here).

    The task hashes the 1 MiB blocks that begin in its range (reading on up
    to the block's end); the pieces all lie inside the range.
    """

    file: str | None
    start: int
    stop: int
    pieces: list[PieceSpec] = field(default_factory=list)


@dataclass(frozen=True)
class BlockResult:
    nbytes: int
    nonfinite: dict[str, tuple[int, int, int]]
    file: str | None = None
    blocks: dict[int, bytes] = field(default_factory=dict)  # block index -> digest


class _RangeHasher:
    """Hashes the fixed 1 MiB file blocks that begin in a task's range, from bytes in order.

    A block that arrives in pieces is hashed incrementally (no copy of it is kept).
    """

    def __init__(self, fd: int, start: int, stop: int) -> None:
        self.fd = fd
        self.pos = -(-start // TREE_BLOCK) * TREE_BLOCK  # next byte to hash: block-aligned
        self.end = max(self.pos, -(-stop // TREE_BLOCK) * TREE_BLOCK)
        self.blocks: dict[int, bytes] = {}
        self._h = None  # hasher of the current block, once some of its bytes were fed
        self._n = 0  # bytes of the current block hashed so far

    def feed(self, offset: int, data: memoryview) -> None:
        """Bytes ``data`` found at ``offset`` (ascending; gaps are read from the file)."""
        if offset > self.pos:
            self._fill(offset)
        skip = self.pos - offset
        if skip >= len(data):
            return
        data = data[skip:]
        while len(data):
            k = (self.pos - self._n) // TREE_BLOCK
            if not self._n and len(data) >= TREE_BLOCK:
                self.blocks[k] = block_digest(data[:TREE_BLOCK])
                take = TREE_BLOCK
            else:
                take = min(TREE_BLOCK - self._n, len(data))
                if self._h is None:
                    self._h = block_hasher()
                self._h.update(data[:take])
                self._n += take
                if self._n == TREE_BLOCK:
                    self.blocks[k] = self._h.digest()
                    self._h, self._n = None, 0
            self.pos += take
            data = data[take:]

    def _fill(self, upto: int) -> None:
        """Read and hash the file's bytes [pos, upto) that no piece covers (header, tail)."""
        while self.pos < upto:
            data = os.pread(self.fd, min(upto - self.pos, TREE_BLOCK), self.pos)
            if not data:
                raise PipelineError("checkpoint file shrank while being ingested")
            self.feed(self.pos, memoryview(data))

    def finish(self, file_size: int) -> dict[int, bytes]:
        self._fill(min(self.end, file_size))
        if self._n:  # the file's last, short block
            self.blocks[(self.pos - self._n) // TREE_BLOCK] = self._h.digest()
            self._h, self._n = None, 0
        return self.blocks


def _pread_rows(fd: int, info: TensorInfo, a: int, b: int,
                pool: list[bytearray] | None = None, slot: int = 0,
                ) -> tuple[np.ndarray, memoryview]:
    """Rows [a, b) of a tensor as writable bit patterns, and the raw bytes they came from.

    With ``pool`` the bytes land in ``pool[slot]`` (replaced by a larger one
    when too small), reused read after read: a fresh bytearray of a chunk per
    read (page faults and zero-filling) was a fifth of an ingest worker's time
    (py-spy, 0.5B-shaped bf16 run).
    """
    rb = info.row_bytes
    count = (b - a) * rb
    if pool is None:
        buf = bytearray(count)
    else:
        while len(pool) <= slot:
            pool.append(bytearray(0))
        if len(pool[slot]) < count:
            pool[slot] = bytearray(count)
        buf = pool[slot]
    view = memoryview(buf)[:count]
    pread_exact(fd, view, info.offset + a * rb, info)
    shape = (b - a, *info.shape[1:]) if info.shape else ()
    dt = bits_dtype(info.dtype)
    return np.frombuffer(buf, dtype=dt, count=count // dt.itemsize).reshape(shape), view


class _ChunkWriter:
    """Reads and writes whole chunks of the tensor arrays of one store by file path."""

    def __init__(self, store: str | Path | RemotePath) -> None:
        self.root = as_location(store) / TENSORS_GROUP
        self.codecs: dict[int, Blosc] = {}
        self.dirs: set[Path | RemotePath] = set()
        self._scratch: dict[tuple[str, int, str], np.ndarray] = {}

    def scratch(self, which: str, n: int, dtype: np.dtype) -> np.ndarray:
        """A reusable flat buffer of ``n`` items (reused chunk after chunk: no page faults)."""
        key = (which, dtype.itemsize, dtype.str)
        buf = self._scratch.get(key)
        if buf is None or buf.size < n:
            buf = self._scratch[key] = np.empty(n, dtype)
        return buf[:n]

    def path(self, array: str, coords: tuple[int, ...]) -> Path | RemotePath:
        return self.root.joinpath(array, "c", *map(str, coords))

    def codec(self, itemsize: int) -> Blosc:
        c = self.codecs.get(itemsize)
        if c is None:
            c = self.codecs[itemsize] = chunk_codec(itemsize)
        return c

    def read(self, array: str, coords: tuple[int, ...], shape: tuple[int, ...],
             dtype: np.dtype) -> np.ndarray:
        """A whole stored chunk (the fill value 0 where zarr wrote nothing)."""
        try:
            raw = self.path(array, coords).read_bytes()
        except FileNotFoundError:
            return np.zeros(shape, dtype)
        out = np.empty(shape, dtype)
        self.codec(dtype.itemsize).decode(raw, out=out)
        return out

    def write(self, array: str, coords: tuple[int, ...], chunk: np.ndarray) -> None:
        """Write one whole chunk atomically; an all-zero chunk is removed, as zarr does."""
        path = self.path(array, coords)
        flat = chunk.reshape(-1)
        if not flat[:4096].any() and not flat.any():  # moved elements show up early
            path.unlink(missing_ok=True)
            return
        data = self.codec(chunk.dtype.itemsize).encode(np.ascontiguousarray(chunk))
        if path.parent not in self.dirs:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.dirs.add(path.parent)
        zmeta.write_atomic(path, data)


def _chunk_at(spec: PieceSpec, index: int, a: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(chunk key coords, full chunk shape) of the chunk holding row ``a`` at position ``index``."""
    info = spec.info
    if info.shape:
        return ((index, a // spec.chunk_rows, *(0 for _ in info.shape[1:])),
                (spec.chunk_rows, *(max(s, 1) for s in info.shape[1:])))
    return (index,), (1,)  # a scalar is stored as (n_steps,) with chunks (1,)


def _decoded_chunk(w: _ChunkWriter, spec: PieceSpec, index: int, a: int,
                   key_every: int) -> np.ndarray:
    """Bits of the rows of the stored chunk at position ``index`` holding row ``a``, decoded
    (the rows of the chunk that lie in the tensor: its padding is not part of the encoding).

    Reads the chunk's chain (position 0, its key, the deltas up to
    ``index``): at most ``key_every + 1`` chunks.
    """
    dtype = bits_dtype(spec.info.dtype)
    base = cur = None
    real = _real_rows(spec, a)
    for p in chain(index, key_every):
        coords, full = _chunk_at(spec, p, a)
        stored = w.read(spec.array, coords, full, dtype)[:real]  # the padding is not encoded
        ref = reference(p, key_every)
        cur = stored if ref is None else decode(stored, base if ref == 0 else cur,
                                                 overwrite=True, seg=stored.size)
        if p == 0:
            base = cur
    assert cur is not None
    return cur


def _real_rows(spec: PieceSpec, a: int) -> int:
    """Rows of the chunk holding row ``a`` that lie in the tensor (1 for a scalar)."""
    if not spec.info.shape:
        return 1
    start = a - a % spec.chunk_rows
    return min(spec.chunk_rows, spec.info.shape[0] - start)


def _write_chunk(w: _ChunkWriter, spec: PieceSpec, index: int, a: int, bits: np.ndarray,
                 ref: np.ndarray | None = None, key_every: int = DEFAULT_KEY_EVERY) -> None:
    """Encode rows [a, a + len) of ``spec`` (one whole chunk) into position ``index``.

    ``bits`` is left as it is (the caller may keep it as the next step's
    reference). ``ref`` holds the bits of position ``reference(index)`` for
    these rows (at least as many rows as ``bits``); when not given it is
    decoded from the store.
    """
    info = spec.info
    if bits.size == 0:
        return
    coords, full = _chunk_at(spec, index, a)
    if not info.shape:
        bits = bits.reshape(1)
    r = reference(index, key_every)
    if r is not None:
        if (a % spec.chunk_rows if info.shape else a) or bits.shape[0] != _real_rows(spec, a):
            raise ValueError(f"rows {a}:{a + bits.shape[0]} of {info.name} are not one whole "
                             f"chunk of {spec.chunk_rows} rows (deltas are sorted per chunk)")
        if ref is None:
            ref = _decoded_chunk(w, spec, r, a, key_every)
        n = bits.size
        out = w.scratch("out", n, bits.dtype).reshape(bits.shape)
        sign = w.scratch("sign", n, bits.dtype).reshape(bits.shape)
        bits = encode_into(bits, ref.reshape(-1, *bits.shape[1:])[: bits.shape[0]], out, sign,
                           seg=n)
    if bits.shape[0] < full[0]:  # edge chunk: zarr pads it with the fill value
        padded = np.zeros(full, bits.dtype)
        padded[: bits.shape[0]] = bits
        bits = padded
    w.write(spec.array, coords, bits)


def _row_spans(spec: PieceSpec) -> list[tuple[int, int]]:
    """Chunk-aligned row ranges of a piece (one for a scalar)."""
    if not spec.info.shape:
        return [(0, 1)]
    out, a, cr = [], spec.start, spec.chunk_rows
    while a < spec.stop:
        b = min(a - a % cr + cr, spec.stop)
        out.append((a, b))
        a = b
    return out


def _add_nonfinite(nonfinite: dict[str, tuple[int, int, int]], spec: PieceSpec,
                   bits: np.ndarray) -> None:
    c = count_nonfinite(bits, spec.info.dtype)
    if any(c):
        old = nonfinite.get(spec.info.name, (0, 0, 0))
        nonfinite[spec.info.name] = tuple(x + y for x, y in zip(old, c, strict=True))


def _write_pickle_range(w: _ChunkWriter, index: int, rng: RangeSpec,
                        key_every: int) -> BlockResult:
    """A pickle's pieces: torch reads each tensor, the digest is a separate task."""
    from pipeline.checkpoints.reader import CheckpointReader

    nonfinite: dict[str, tuple[int, int, int]] = {}
    nbytes = 0
    for spec in rng.pieces:
        reader = CheckpointReader(spec.info.file.parent, allow_pickle=True)
        rows = slice(spec.start, spec.stop) if spec.info.shape else None
        block = np.array(reader.read_bits(spec.info.name, rows))  # a writable copy
        nbytes += block.nbytes
        _add_nonfinite(nonfinite, spec, block)
        for a, b in _row_spans(spec):
            part = block[a - spec.start: b - spec.start] if spec.info.shape else block
            _write_chunk(w, spec, index, a, part, key_every=key_every)
    return BlockResult(nbytes, nonfinite)


def _prefetch(fd: int, start: int, stop: int) -> None:
    """Ask the kernel to read a task's byte range ahead while the task compresses.

    A task reads its range chunk by chunk and compresses each before the
    next read; from a cold page cache every read then waited for the disk
    (ingest of the issue run from disk: 12.6 s against 9.6 s from the page
    cache). Advisory only: where the call is missing or refused, nothing changes.
    """
    advise = getattr(os, "posix_fadvise", None)
    if advise is not None and stop > start:
        try:
            advise(fd, start, stop - start, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass


def same_pieces(rngs: list[RangeSpec]) -> bool:
    """Whether ranges of several steps cover the same rows of the same tensors, in order."""
    def key(r: RangeSpec) -> list[tuple]:
        return [(p.info.name, p.array, p.start, p.stop, p.chunk_rows, p.info.dtype)
                for p in r.pieces]
    return all(r.file is not None for r in rngs) and all(key(r) == key(rngs[0])
                                                          for r in rngs[1:])


def write_ranges(store: str | Path | RemotePath, indices: list[int], rngs: list[RangeSpec],
                 key_every: int = DEFAULT_KEY_EVERY, after: object = None) -> list[BlockResult]:
    """``write_range`` of consecutive positions whose ranges hold the same pieces.

    Chunk by chunk, step by step: each step's rows are read, hashed,
    counted, encoded against their reference and written. A reference
    that is the previous position of this task is the bits this task just
    read for it (kept before encoding); any other (the first position's,
    or position 0 for a key) is decoded from the store once per chunk.
    Memory is a few chunks, whatever the number of steps. ``after`` is
    ignored: it carries the futures this task must wait for.
    """
    if len(indices) != len(rngs):
        raise ValueError("one position per range")
    if any(b != a + 1 for a, b in zip(indices, indices[1:], strict=False)):
        raise ValueError("positions of a multi-step task must be consecutive")
    w = _ChunkWriter(store)
    if len(rngs) == 1 and rngs[0].file is None:
        return [_write_pickle_range(w, indices[0], rngs[0], key_every)]
    if not same_pieces(rngs):
        raise ValueError("ranges of a multi-step task must hold the same pieces")
    fds: list[int] = []
    try:
        for r in rngs:
            fds.append(os.open(r.file, os.O_RDONLY))
            _prefetch(fds[-1], r.start, r.stop)
        sizes = [os.fstat(fd).st_size for fd in fds]
        hashers = [_RangeHasher(fd, r.start, r.stop) for fd, r in zip(fds, rngs, strict=True)]
        nonfinite: list[dict[str, tuple[int, int, int]]] = [{} for _ in rngs]
        nbytes = [0] * len(rngs)
        pool: list[bytearray] = []  # read buffers, reused; a kept step's stays untouched
        for p, spec0 in enumerate(rngs[0].pieces):
            for a, b in _row_spans(spec0):
                kept: dict[int, np.ndarray] = {}  # position -> its bits, read by this task
                slot_of: dict[int, int] = {}  # kept position -> the pool slot holding its bits
                for j, (index, rng) in enumerate(zip(indices, rngs, strict=True)):
                    spec = rng.pieces[p]
                    info = spec.info
                    busy = {slot_of[q] for q in kept if q in slot_of}
                    slot = next(i for i in range(len(busy) + 1) if i not in busy)
                    bits, raw = _pread_rows(fds[j], info, a, b, pool, slot)
                    hashers[j].feed(info.offset + a * info.row_bytes, raw)  # before encoding
                    nbytes[j] += bits.nbytes
                    _add_nonfinite(nonfinite[j], spec, bits)
                    r = reference(index, key_every)
                    if r is not None and r not in kept and bits.size:
                        kept[r] = _decoded_chunk(w, spec, r, a, key_every)
                    if j + 1 < len(indices) and reference(index + 1, key_every) == index:
                        kept[index] = bits  # left as it is by _write_chunk
                        slot_of[index] = slot
                    _write_chunk(w, spec, index, a, bits, kept.get(r) if r is not None else None,
                                 key_every)
                    for q in [q for q in kept if q not in (0, index)]:
                        del kept[q]
                        slot_of.pop(q, None)
                    del bits, raw
        blocks = [h.finish(size) for h, size in zip(hashers, sizes, strict=True)]
    finally:
        for fd in fds:
            os.close(fd)
    return [BlockResult(n, nf, r.file, bl)
            for n, nf, r, bl in zip(nbytes, nonfinite, rngs, blocks, strict=True)]


def write_range(store: str | Path | RemotePath, index: int, rng: RangeSpec,
                key_every: int = DEFAULT_KEY_EVERY, after: object = None) -> BlockResult:
    """Encode and write position ``index`` of every piece of ``rng``; hash its bytes.

    ``after`` is ignored: it carries the futures (the previous position's
    tasks) that must finish before this one reads its reference.
    """
    return write_ranges(store, [index], [rng], key_every)[0]


def digest_task(path: str) -> tuple[str, int, str]:
    """(path, size, digest) of one checkpoint file."""
    return path, Path(path).stat().st_size, tree_digest(path)


def legacy_digest_task(path: str, stored: str) -> tuple[str, int, str]:
    """(path, size, digest) with the algorithm ``stored`` was made with."""
    from pipeline.store.integrity import digest_like

    return path, Path(path).stat().st_size, digest_like(path, stored)


__all__ = ["BlockResult", "PieceSpec", "RangeSpec", "chunk_codec", "digest_task",
           "legacy_digest_task", "read_rows_bits", "same_pieces", "write_range", "write_ranges"]
