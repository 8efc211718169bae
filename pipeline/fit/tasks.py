"""The Dask side of the fit: a plan of tasks (pure arithmetic) and the task body.

One task = ~``block_bytes`` of checkpoint data per step, in chunk-aligned
row blocks ("pieces") of at most ``PIECE_BYTES``: big tensors are split,
small tensors share a task, so the number of tasks follows the bytes, not
the tensor count. A task reads every step of a piece at once (up to
``READ_BUDGET_BYTES``) through the ``SourceRef``, runs the fused kernel of
``pipeline.engine`` on it in one pass, hands the float32 results of its own
chunks (slope, intercept, R²; each element's null R² only on request) to a
background writer (``store.background_writes``: written while the next piece is
fitted) and returns only small additive summaries (histograms, counts, the
null's among them), once its chunks are written.
No float64 state is written: a fit after appended steps re-reads the
compressed store, which is smaller than any state (see ``job``). Memory per
task is bounded by its piece: the steps read, 16 bytes of results per
element (the null's included, written or not), the writer's staging buffers
(``background_writes.SLOTS`` chunks), and, only when the steps do not fit one
read, a carry of 120 bytes per element in RAM; never by the model, the
task or the number of steps.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.compute.executors import Executor
from pipeline.dtypes import logical_dtype
from pipeline.engine import DEFAULT_BACKEND, BlockCounts, get_backend
from pipeline.engine.signs import sign_offset, sign_words
from pipeline.engine.spec import RESULTS, SELECTIONS, XStats, codec_for, kernel_inputs
from pipeline.fit.results import RESULT_FIELDS, TensorPlan, write_piece
from pipeline.fit.source import SourceRef
from pipeline.store.background_writes import BackgroundWriter, background_writer
from pipeline.store.layout import Piece, group_tasks, plan_pieces
from pipeline.workspace import Workspace

READ_BUDGET_BYTES = 64 << 20  # raw bytes of steps read at once by one task
PIECE_BYTES = 4 << 20  # checkpoint bytes per step of a piece: one read, one kernel call


@dataclass(frozen=True)
class FitConfig:
    """Everything a task needs besides its pieces (small and picklable)."""

    fit_dir: str
    steps: tuple[int, ...]  # the window's steps (training steps)
    first_position: int  # store position of steps[0]
    seed: int
    n_bins: int
    backend: str = DEFAULT_BACKEND  # a key of ``pipeline.engine.BACKENDS``
    fields: tuple[str, ...] = RESULT_FIELDS  # the per-element arrays written


@dataclass
class SelectionSummary:
    """Additive over pieces and tensors: what the histograms of one selection need."""

    hist: np.ndarray
    null_hist: np.ndarray
    n_selected: int = 0
    removed_min_change: int = 0
    removed_distinct: int = 0
    r2_sum: float = 0.0
    null_sum: float = 0.0
    n_above: tuple[int, ...] = (0, 0)
    null_above: tuple[int, ...] = (0, 0)

    @staticmethod
    def empty(n_bins: int) -> SelectionSummary:
        return SelectionSummary(np.zeros(n_bins, np.int64), np.zeros(n_bins, np.int64))

    def add(self, o: SelectionSummary) -> None:
        self.hist = self.hist + o.hist
        self.null_hist = self.null_hist + o.null_hist
        self.n_selected += o.n_selected
        self.removed_min_change += o.removed_min_change
        self.removed_distinct += o.removed_distinct
        self.r2_sum += o.r2_sum
        self.null_sum += o.null_sum
        self.n_above = tuple(a + b for a, b in zip(self.n_above, o.n_above, strict=True))
        self.null_above = tuple(a + b for a, b in zip(self.null_above, o.null_above, strict=True))


@dataclass
class TensorSummary:
    """Per-tensor totals: element and static counts plus one summary per selection."""

    n_elements: int = 0
    n_static: int = 0
    n_nonfinite: int = 0  # a NaN or inf value in the window: neither static nor fitted
    selections: dict[str, SelectionSummary] = field(default_factory=dict)

    def add(self, o: TensorSummary) -> None:
        self.n_elements += o.n_elements
        self.n_static += o.n_static
        self.n_nonfinite += o.n_nonfinite
        for k, v in o.selections.items():
            if k in self.selections:
                self.selections[k].add(v)
            else:
                self.selections[k] = v


def plan_tasks(tensors: Sequence[TensorPlan], block_bytes: int) -> list[list[Piece]]:
    """Chunk-aligned pieces of every tensor, packed into tasks of about ``block_bytes``.

    Pieces are at most ``PIECE_BYTES`` (or one chunk), so a task of several
    pieces writes one piece's results while it fits the next; memory follows
    the piece, not the task.
    """
    pieces: list[Piece] = []
    for t in tensors:
        pieces += plan_pieces(t.name, t.shape, logical_dtype(t.dtype).itemsize, t.chunk_rows,
                              min(block_bytes, PIECE_BYTES))
    return group_tasks(pieces, block_bytes)


def fit_rows(shape: tuple[int, ...], source_chunk_rows: int) -> int:
    """Rows per fit chunk: the source's own chunk rows.

    Every piece is a whole number of source chunks, so a piece writes whole fit
    chunks, and a tensor's last fit chunk carries no more padding than the
    source's (zarr writes an uncompressed edge chunk whole: chunks of a piece's
    height padded the tail piece of an MLP matrix to 1.44x its rows).
    """
    return max(1, min(source_chunk_rows, shape[0])) if shape else 1


def _row_elems(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape[1:]:
        n *= s
    return n


def _block_shape(shape: tuple[int, ...], piece: Piece) -> tuple[int, ...]:
    return (piece.stop - piece.start, *shape[1:]) if shape else ()


_TAKES_OUT: dict[type, bool] = {}


def _read_block(src: Any, name: str, steps: slice, rows: slice | None,
                out: np.ndarray) -> np.ndarray:
    """``src.read_block`` into ``out`` when the source takes ``out=`` (the store reader does)."""
    kind = type(src)
    takes = _TAKES_OUT.get(kind)
    if takes is None:
        import inspect

        try:
            params = inspect.signature(src.read_block).parameters
            takes = "out" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
        except (TypeError, ValueError):
            takes = False
        _TAKES_OUT[kind] = takes
    if takes:
        return src.read_block(name, steps, rows, out=out)
    return src.read_block(name, steps, rows)


_WORKSPACE = threading.local()


def workspace() -> Workspace:
    """This thread's scratch buffers, kept between tasks (see ``pipeline.workspace``)."""
    ws = getattr(_WORKSPACE, "ws", None)
    if ws is None:
        ws = _WORKSPACE.ws = Workspace()
    return ws


def fit_piece(src: Any, t: TensorPlan, piece: Piece, cfg: FitConfig, xst: XStats,
              writer: BackgroundWriter) -> TensorSummary:
    """Fit one piece over every step of the window, hand its results to ``writer``."""
    m = (piece.stop - piece.start) * _row_elems(t.shape) if t.shape else 1
    if m == 0:  # a zero-element tensor (a 0 in its shape): nothing to read, fit or write
        return empty_summary(cfg.n_bins)
    out, counts = fit_block(src, t, piece, cfg, xst)
    write_piece(cfg.fit_dir, t, slice(piece.start, piece.stop) if t.shape else None, out,
                cfg.fields, writer)
    return summary_of(counts, m)


def fit_block(src: Any, t: TensorPlan, piece: Piece, cfg: FitConfig,
              xst: XStats) -> tuple[dict[str, np.ndarray], BlockCounts]:
    """Every result of one piece's elements (null R² included) and its counts, unwritten.

    Any rows: an element's results do not depend on the block it is fitted
    in (the null's signs are keyed by its flat index), so the report fits the
    row of a sampled element alone to get the null R² a fit did not write.
    The arrays are this thread's workspace buffers, reused by its next call.
    Usually all steps are read at once (``READ_BUDGET_BYTES``) and fitted in
    one fused pass; a piece whose steps do not fit one read is read a batch
    of steps at a time into the backend's carry (RAM only).
    """
    ws = workspace()
    rows = slice(piece.start, piece.stop) if t.shape else None
    flat0 = piece.start * _row_elems(t.shape) if t.shape else 0
    m = (piece.stop - piece.start) * _row_elems(t.shape) if t.shape else 1
    dtype = logical_dtype(t.dtype)
    codec = codec_for(dtype)
    be = get_backend(cfg.backend)
    steps = cfg.steps
    k = len(steps)
    xs = np.array([float(s - steps[0]) for s in steps])
    signed: list[int | None] = [None, *steps[1:]]  # the first step has no increment
    batch = max(2, READ_BUDGET_BYTES // max(1, m * dtype.itemsize))
    out = {r: ws.get(f"result_{r}", (m,), np.float32) for r in RESULTS}

    def read(i: int, j: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        buf = ws.get("values", (j - i, *_block_shape(t.shape, piece)), dtype)
        vals = _read_block(src, t.name, slice(cfg.first_position + i, cfg.first_position + j),
                           rows, buf).reshape(j - i, m)
        bits, wide = kernel_inputs(vals, codec)
        return bits, wide, sign_words(cfg.seed, t.name, signed[i:j], flat0, flat0 + m)

    off = sign_offset(flat0)
    if batch >= k:
        bits, wide, words = read(0, k)
        counts = be.fit(bits, wide, codec, xs, words, off, xst, cfg.n_bins, out)
    else:
        carry = be.start(m)
        for i in range(0, k, batch):
            j = min(i + batch, k)
            bits, wide, words = read(i, j)
            be.add(carry, bits, wide, codec, xs[i:j], words, off)
        counts = be.finish(carry, xst, cfg.n_bins, out)
    return out, counts


def summary_of(counts: BlockCounts, m: int) -> TensorSummary:
    """A piece's ``TensorSummary`` from the counts a backend returned."""
    out = TensorSummary(n_elements=m, n_static=counts.n_static, n_nonfinite=counts.n_nonfinite)
    for name in SELECTIONS:
        out.selections[name] = SelectionSummary(**counts.selection(name))
    return out


def empty_summary(n_bins: int) -> TensorSummary:
    """The summary of a piece without elements: zero counts in every selection."""
    return TensorSummary(selections={name: SelectionSummary.empty(n_bins)
                                     for name in SELECTIONS})


def fit_task(ref: SourceRef, tensors: dict[str, TensorPlan], pieces: list[Piece],
             cfg: FitConfig) -> list[tuple[str, TensorSummary]]:
    """One Dask task: every piece of the task, in order (idempotent: safe to re-run).

    A piece's results are written while the next piece is read and fitted;
    the task returns once all of them are written.
    """
    src = ref.open(cfg.first_position + len(cfg.steps))
    xst = XStats.from_steps(cfg.steps)
    writer = background_writer()
    try:
        out = [(p.name, fit_piece(src, tensors[p.name], p, cfg, xst, writer)) for p in pieces]
    except BaseException:
        writer.wait(discard=True)  # the task's own error wins; nothing is left in flight
        raise
    writer.wait()
    return out


def run_graph(executor: Executor, ref: SourceRef, tensors: dict[str, TensorPlan],
              tasks: list[list[Piece]], cfg: FitConfig, token: str,
              on_done: Callable[[int], None] | None = None) -> dict[str, TensorSummary]:
    """Run one ``fit_task`` per task on ``executor``, adding the summaries per tensor."""
    calls = [(ref, {p.name: tensors[p.name] for p in pieces}, pieces, cfg) for pieces in tasks]
    totals: dict[str, TensorSummary] = {}
    for i, result in executor.map_unordered(fit_task, calls, key=f"fit-{token}"):
        for name, s in result:
            if name in totals:
                totals[name].add(s)
            else:
                totals[name] = s
        if on_done is not None:
            on_done(sum(p.nbytes for p in tasks[i]))
    return totals
