"""``fit_store``: fit every element of a run store (a stored fit is reused when current).

Decides what to do (nothing when a complete fit of the same window, options
and steps exists; else a fresh fit), lays out the fit arrays, runs the
tasks (``pipeline.fit.tasks``), then writes the histograms and CSVs and marks
the fit complete *last*, so an interrupted fit is never mistaken for a
finished one (the next run starts it afresh).

No state: a fit after appended steps re-reads every step of the window from
the compressed store, so it equals a fresh fit bit for bit. Measured on a
12-step bf16 synthetic store (benchmarks/fit.py, 12.8 M elements): the old
float64 state made a fit write 35.8 bytes per element (after lz4), the whole
store is 5.4 bytes per element (0.45 per step), and a fit now writes 12
(its float32 slope, intercept and R²; 16 with each element's null R²). A
compact 16-byte state would write 14.5 bytes per element on every update
and read them back (1.1 s here against a 7.4 s refit, so it would save time
per appended step), but 16 bytes can't hold the float64 sums, so an updated
fit would no longer equal a fresh one.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from pipeline.compute.executors import DEFAULT_EXECUTOR, EXECUTORS
from pipeline.dtypes import dtype_name
from pipeline.engine import BACKENDS, DEFAULT_BACKEND, XStats
from pipeline.errors import PipelineError, check_int, check_output
from pipeline.fit.histograms import build_dataset
from pipeline.fit.results import (
    ELEMENTS,
    HISTOGRAMS,
    SCHEMA_VERSION,
    SELECTIONS,
    FitResult,
    TensorPlan,
    create_fit,
    fit_dir_for,
    read_meta,
    result_fields,
    save_outputs,
    write_meta,
)
from pipeline.fit.source import SourceRef, StoreRef, store_inputs
from pipeline.fit.tasks import FitConfig, fit_block, fit_rows, plan_tasks, run_graph
from pipeline.store.layout import Piece
from pipeline.store.location import RemotePath, as_location

DEFAULT_BLOCK_BYTES = 16 << 20  # checkpoint bytes per step per task (pieces: tasks.PIECE_BYTES)
DEFAULT_BINS = 100
DEFAULT_SEED = 0


@dataclass(frozen=True)
class FitReport:
    """What a fit run did: the histograms plus how much work it took."""

    fit_dir: Path | RemotePath
    steps: list[int]
    new_steps: list[int]  # steps not in the previous complete fit of this window
    incremental: bool  # always False since schema 4: every fit reads the whole window
    tasks: int
    bytes_read: int  # checkpoint bytes (logical) read from the store
    seconds: float
    histograms: dict[str, xr.Dataset]

    def result(self) -> FitResult:
        return FitResult(self.fit_dir)


MAX_BINS = 1_000_000
FIT_PARTS = (ELEMENTS, HISTOGRAMS)  # what a fit creates (or replaces) in its folder


def check_options(n_bins: int, block_bytes: int, seed: int, start: int | None,
                  stop: int | None, backend: str = DEFAULT_BACKEND,
                  executor: str = DEFAULT_EXECUTOR) -> None:
    """Every fit argument, checked before the fit folder is touched.

    A bad one used to fail only after a fresh fit had reset the folder, so a
    good earlier fit then read as incomplete.
    """
    if backend not in BACKENDS:
        raise PipelineError(f"unknown --backend {backend!r} (expected one of "
                            f"{', '.join(sorted(BACKENDS))})")
    if executor not in EXECUTORS:
        raise PipelineError(f"unknown --executor {executor!r} (expected one of "
                            f"{', '.join(EXECUTORS)})")
    check_int(n_bins, "--bins", 1, MAX_BINS)
    check_int(block_bytes, "block size (--block-mb)", 1)
    check_int(seed, "seed")
    for what, v in (("--from", start), ("--to", stop)):
        if v is not None:
            check_int(v, what)


def _window(steps: list[int], start: int | None, stop: int | None) -> tuple[int, int]:
    """Positions [i0, i1) of the steps inside [start, stop] (inclusive bounds)."""
    pos = [i for i, s in enumerate(steps)
           if (start is None or s >= start) and (stop is None or s <= stop)]
    if len(pos) < 2:
        raise PipelineError(f"a fit needs at least 2 steps in the window "
                            f"[{start if start is not None else 'first'}, "
                            f"{stop if stop is not None else 'last'}]; the store has {steps}")
    return pos[0], pos[-1] + 1


def _previous(meta: dict[str, Any] | None, plans: list[TensorPlan],
              window: tuple[int | None, int | None], seed: int, n_bins: int,
              fields: tuple[str, ...]) -> list[int]:
    """Steps of a complete stored fit of the same schema, options and tensors ([] if none).

    When they are the window's steps, the stored fit is current and nothing is read.
    The block size is not an option that counts: an element's results do not
    depend on the block it is fitted in (``tasks.fit_block``).
    """
    if not meta or not meta.get("complete") or meta.get("schema_version") != SCHEMA_VERSION:
        return []
    same = (meta.get("seed") == seed and meta.get("n_bins") == n_bins
            and list(meta.get("window", [])) == list(window)
            and tuple(meta.get("fields", ())) == fields
            and meta.get("tensors") == {p.name: _plan_json(p) for p in plans})
    return list(meta.get("steps", [])) if same else []


def _plan_json(p: TensorPlan) -> dict[str, Any]:
    return {"shape": list(p.shape), "dtype": p.dtype, "chunk_rows": p.chunk_rows}


def fit_store(
    store: str | Path | RemotePath,
    out: str | Path | RemotePath | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
    start: int | None = None,
    stop: int | None = None,
    scheduler: str | None = None,
    client: Any = None,
    source: SourceRef | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    n_bins: int = DEFAULT_BINS,
    seed: int = DEFAULT_SEED,
    full: bool = False,
    progress: bool = True,
    backend: str = DEFAULT_BACKEND,
    executor: str = DEFAULT_EXECUTOR,
    keep_state: bool | None = None,
    null_elements: bool = False,
) -> FitReport:
    """Fit slope, intercept and R² of every element against step; update in place if possible.

    ``start``/``stop`` bound the window by training step (inclusive). When a
    complete fit of the same window, options and steps exists, nothing is
    read (``full=True`` forces a fresh fit); otherwise every step of the
    window is read and fitted afresh, so a fit after appended steps equals a
    fresh one. ``source`` replaces the store reader (tests use it to slow or
    observe reads). ``backend`` names the fused kernel's backend
    (``pipeline.engine.BACKENDS``; results do not depend on it), ``executor``
    where tasks run (``pipeline.compute.EXECUTORS``: ``dask`` on ``client`` or
    the cluster ``scheduler`` names, ``serial`` in this process for debugging).
    ``keep_state`` is accepted and ignored: since schema 4 no state is kept.
    ``null_elements`` also writes each element's null R² (``null_r2``, 4 more
    bytes an element); without it the null is in the histograms and means
    only, and ``element_results`` recomputes it for the elements one looks at.
    ``store`` and ``out`` may be object-store URLs (``storage_options`` reach
    both); every task then reads the store and writes its results there.
    """
    del keep_state  # older callers pass it; there is no state any more
    t0 = time.perf_counter()
    check_options(n_bins, block_bytes, seed, start, stop, backend, executor)
    store = as_location(store, storage_options)
    fit_dir = as_location(out, storage_options) if out is not None else fit_dir_for(store)
    ref: SourceRef = source if source is not None else StoreRef.of(store)
    src = ref.open()
    _check_fit_place(fit_dir, store, src)
    all_steps = list(src.steps)
    if not all_steps:
        raise PipelineError("the store has no committed steps yet", store)
    i0, i1 = _window(all_steps, start, stop)
    steps = all_steps[i0:i1]
    plans = []
    for name in src.tensor_names:
        shape = tuple(src.shape(name))
        dt = dtype_name(src.dtype(name))  # a name (JSON) whatever the source returns
        rows = fit_rows(shape, src.chunk_rows(name))
        plans.append(TensorPlan(name, shape, dt, rows))
        _ = plans[-1].path  # its array key: a name that cannot be one fails before any write
    window = (start, stop)
    fields = result_fields(null_elements)
    prev = _previous(read_meta(fit_dir), plans, window, seed, n_bins, fields)
    if not full and prev == steps:  # nothing new: the stored fit is current
        hists = {sel: FitResult(fit_dir).histograms(sel) for sel in SELECTIONS}
        return FitReport(fit_dir, steps, [], False, 0, 0, time.perf_counter() - t0, hists)
    new_steps = steps[len(prev):] if prev and prev == steps[:len(prev)] else steps
    meta = {"schema_version": SCHEMA_VERSION, "store": str(store.resolve()), "steps": steps,
            "window": list(window), "seed": seed, "block_bytes": block_bytes, "n_bins": n_bins,
            "tensors": {p.name: _plan_json(p) for p in plans}, "complete": False,
            "backend": backend, "fields": list(fields),
            "x": "step - steps[0] (slope per training step, intercept at step 0)"}
    fit_dir.mkdir(parents=True, exist_ok=True)
    create_fit(fit_dir, plans, meta)  # incomplete until every task and output is written
    tasks = plan_tasks(plans, block_bytes)
    # tasks get the fit folder as a path string, or the (picklable) RemotePath itself
    task_dir: Any = fit_dir if isinstance(fit_dir, RemotePath) else str(fit_dir)
    cfg = FitConfig(task_dir, tuple(steps), i0, seed, n_bins, backend, fields)
    n_read = len(steps)
    step_bytes = sum(p.nbytes for t in tasks for p in t)
    totals = _run(executor, client, scheduler, ref, {p.name: p for p in plans}, tasks, cfg,
                  step_bytes * n_read, progress)
    attrs = {"steps": steps, "window": [-1 if w is None else w for w in window], "seed": seed}
    names = [p.name for p in plans]
    labels = {n: tuple(src.labels(n)) for n in names}  # the source labels its arrays
    hists = {sel: build_dataset(names, totals, sel, n_bins, attrs, labels) for sel in SELECTIONS}
    save_outputs(fit_dir, hists)
    meta["complete"] = True
    write_meta(fit_dir, meta)
    return FitReport(fit_dir, steps, new_steps, False, len(tasks), step_bytes * n_read,
                     time.perf_counter() - t0, hists)


def element_results(fit: FitResult, name: str, row: int,
                    source: SourceRef | None = None) -> dict[str, np.ndarray]:
    """Every result of one row of a fitted tensor (null R² included), fitted again.

    The row is read from the store the fit read and fitted alone, with the
    fit's window, seed and backend: an element's results do not depend on the
    block (``fit_block``), so they equal the fit's, and the null R² a fit
    without ``null_elements`` did not write costs one row's read.
    """
    meta = fit.meta
    src = (source or StoreRef.of(meta["store"])).open()
    steps = [int(s) for s in meta["steps"]]
    have = list(src.steps)
    i0 = have.index(steps[0]) if steps[0] in have else -1
    if i0 < 0 or have[i0:i0 + len(steps)] != steps:
        raise PipelineError(f"the store no longer holds the fit's steps {steps}", meta["store"])
    t = TensorPlan(name, tuple(meta["tensors"][name]["shape"]), meta["tensors"][name]["dtype"],
                   int(meta["tensors"][name]["chunk_rows"]))
    piece = Piece(name, row, row + 1, 0) if t.shape else Piece(name, 0, 1, 0)
    cfg = FitConfig(str(fit.path), tuple(steps), i0,
                    int(meta["seed"]), int(meta["n_bins"]), meta.get("backend", DEFAULT_BACKEND))
    out, _ = fit_block(src, t, piece, cfg, XStats.from_steps(steps))
    return {k: v.copy() for k, v in out.items()}


def _check_fit_place(fit_dir: Path | RemotePath, store: Path | RemotePath, src: Any) -> None:
    """The fit may not be, or sit in, what it reads (the store, the checkpoint folders)."""
    if isinstance(fit_dir, RemotePath) or isinstance(store, RemotePath):
        # one bucket: compare keys (local checkpoint folders cannot hold a URL)
        a, b = str(fit_dir).rstrip("/") + "/", str(store).rstrip("/") + "/"
        if a.startswith(b) or b.startswith(a):
            raise PipelineError(f"output is or contains the store ({store}), which this job "
                                "reads; choose another --out", fit_dir)
        return
    check_output(fit_dir, store_inputs(store, src), writes=FIT_PARTS)


def _run(executor: str, client: Any, scheduler: str | None, ref: SourceRef,
         plans: dict[str, TensorPlan], tasks: list, cfg: FitConfig, total_bytes: int,
         progress: bool) -> dict:
    """Run the tasks on the chosen executor (and cluster), with a progress bar."""
    from pipeline.compute.executors import open_executor
    from pipeline.console import progress_bar

    token = uuid.uuid4().hex[:12]
    n_steps = len(cfg.steps)
    with progress_bar(total_bytes, "fit", unit="B", enabled=progress) as bar, \
            open_executor(executor, scheduler, client) as ex:
        return run_graph(ex, ref, plans, tasks, cfg, token,
                         lambda nbytes: bar.update(nbytes * n_steps))
