"""The store layout (zarr v3), and the pure arithmetic that plans chunks and tasks.

::

    run.zarr/
      zarr.json            root attrs["rlvr_lin"]: schema_version, encoding, digest (file
                           digest algorithm; each stored digest also starts with its
                           algorithm's name), tensor table
                           (name -> path, dtype, shape), model_config, source, and a summary
                           of committed steps (sources, nonfinite) rewritten at each commit
      step/                int64 (n,), chunks (1,), fill -1. step[i] is written LAST for
                           position i: it is the completion marker. Readers expose the
                           prefix of positions whose marker is set.
      records/<i>/         write-once group per position: step, folder, per-file size and
                           content digest, NaN/inf counts
      tensors/<escaped>/   unsigned bits (n, *shape), chunks (1, rows, *rest), fill 0;
                           position 0 raw, a key position (multiple of root attr
                           key_every) encoded against position 0, any other position
                           against the position before it (codec.reference)

Chunks along the step axis have length 1, so a step only ever writes its
own chunks; the row extent of a chunk is chosen so a chunk is about
``chunk_bytes``. Ingest tasks cover whole chunks, so no two tasks touch the
same chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

# the step axis (marker array, records, commit protocol) is every step store's: steps.axis
from pipeline.steps.axis import NOT_COMMITTED, RECORDS_GROUP, STEP_ARRAY, record_path  # noqa: F401

SCHEMA_VERSION = 3  # 2: previous-step deltas, key positions; 3: deltas sorted within a chunk
ATTRS_KEY = "rlvr_lin"
TENSORS_GROUP = "tensors"
DEFAULT_CHUNK_BYTES = 4 << 20
DEFAULT_BLOCK_BYTES = 32 << 20
CLEVEL = 1  # blosc zstd level 1 + bitshuffle: on deltas sorted by exponent (codec), smaller
SHUFFLE = "bitshuffle"  # than byte shuffle on real bf16 and fp32 runs, and faster to compress


def chunk_rows(shape: tuple[int, ...], itemsize: int,
               chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Leading-axis extent of a chunk: at most ``chunk_bytes`` (at least one row), with the
    rows split evenly over as few chunks as that allows.

    zarr keeps an edge chunk whole, padded to the chunk shape, and the fit's results
    (uncompressed, chunked as the store) pay for that padding in bytes written: a
    4864-row MLP matrix in 4 MB chunks was 2340 + 2340 + 184 rows, 1.44x its size.
    Split evenly it is 3 x 1622 rows. Stores laid out before this rule keep their own
    chunks (``TensorEntry.chunk_rows`` is then read from the arrays).
    """
    if not shape:
        return 1
    row = itemsize
    for s in shape[1:]:
        row *= s
    most = max(1, min(shape[0], chunk_bytes // max(row, 1)))
    return -(-shape[0] // -(-shape[0] // most)) if shape[0] else most


def chunk_shape(shape: tuple[int, ...], itemsize: int,
                chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> tuple[int, ...]:
    """Chunk of the stored array ``(n_steps, *shape)``: one step, ``chunk_rows`` rows."""
    if not shape:
        return (1,)
    return (1, chunk_rows(shape, itemsize, chunk_bytes), *(max(s, 1) for s in shape[1:]))


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of one tensor; a whole number of chunks (or the tensor's tail)."""

    name: str
    start: int
    stop: int
    nbytes: int


def plan_pieces(name: str, shape: tuple[int, ...], itemsize: int, chunk_rows_: int,
                block_bytes: int) -> list[Piece]:
    """Split a tensor into chunk-aligned row blocks of at most ``block_bytes`` (>= one chunk)."""
    if not shape:
        return [Piece(name, 0, 1, itemsize)]
    rows = shape[0]
    row_bytes = itemsize
    for s in shape[1:]:
        row_bytes *= s
    if rows == 0:
        return [Piece(name, 0, 0, 0)]
    chunk_bytes = chunk_rows_ * row_bytes
    per = max(1, block_bytes // max(chunk_bytes, 1)) * chunk_rows_
    return [Piece(name, a, min(a + per, rows), (min(a + per, rows) - a) * row_bytes)
            for a in range(0, rows, per)]


def group_tasks(pieces: list[Piece], block_bytes: int) -> list[list[Piece]]:
    """Pack pieces (in the given order) into tasks of about ``block_bytes``.

    Small tensors share a task, so the number of tasks grows with bytes,
    not with the number of tensors.
    """
    tasks: list[list[Piece]] = []
    cur: list[Piece] = []
    size = 0
    for p in pieces:
        if cur and size + p.nbytes > block_bytes:
            tasks.append(cur)
            cur, size = [], 0
        cur.append(p)
        size += p.nbytes
    if cur:
        tasks.append(cur)
    return tasks
