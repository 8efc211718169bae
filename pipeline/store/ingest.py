"""Ingest a run's checkpoints into its store, once or while training continues (``watch``).

Order of work for each new step (see ``layout`` for the files):
validate every header and the tensor table against the store (nothing is
written for a bad checkpoint), grow arrays by one position, write the
step's chunks with Dask tasks that read row blocks straight from the files,
check the checkpoint did not change while being read, then commit. A crash
anywhere before the commit leaves the step invisible; re-running the same
command rewrites that position from scratch.

Each position is encoded against the previous one, or position 0 for a
key position (``codec.reference``). Steps are written in batches that
never cross a key position: each task covers the same rows of every step
of its batch and encodes each step against the bits it has just read for
the step before, so only a batch's first step reads its reference back
from the store, and that reference is committed (position 0, or the
position before the first one of this call) or in the same task. The one
exception is a new store: its first batch writes position 0 itself, and
tasks of a later batch that read position 0 wait for that batch's tasks
(a Dask dependency). Commits stay in step order, one step at a time,
after all of its batch's tasks are done.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.checkpoints.discover import Checkpoint, discover_checkpoints
from pipeline.checkpoints.reader import CheckpointReader
from pipeline.errors import PipelineError, SchedulerLost, check_int, check_number, check_output
from pipeline.store.codec import DEFAULT_KEY_EVERY, reference
from pipeline.store.integrity import combine_blocks, snapshot, store_bytes
from pipeline.store.layout import (
    DEFAULT_BLOCK_BYTES,
    DEFAULT_CHUNK_BYTES,
    Piece,
    group_tasks,
    plan_pieces,
)
from pipeline.store.lease import DEFAULT_LEASE_TTL, hold
from pipeline.store.location import RemotePath, as_location, remove_tree
from pipeline.store.naming import check_names
from pipeline.store.state import StoreState, committed_steps, discard_layout
from pipeline.store.tasks import (
    BlockResult,
    PieceSpec,
    RangeSpec,
    digest_task,
    legacy_digest_task,
    same_pieces,
    write_range,
    write_ranges,
)

STEPS_PER_TASK = 8  # most steps in one task (a batch also ends before a key position)


def plan_batches(index0: int, n: int, key_every: int, most: int = STEPS_PER_TASK,
                 ) -> list[tuple[int, int]]:
    """Split positions ``index0 .. index0+n-1`` into (start, count) batches.

    A batch ends before every key position (so its first position is a key,
    or the first position of this call) and holds at most ``most`` positions.
    """
    out: list[tuple[int, int]] = []
    i, end = index0, index0 + n
    while i < end:
        stop = min(end, i + most, (i // key_every + 1) * key_every)
        out.append((i, stop - i))
        i = stop
    return out


class NonFiniteWarning(UserWarning):
    """A checkpoint holds NaN or inf values (stored bit-exact, and listed in the store)."""


@dataclass
class IngestReport:
    """What one ``ingest`` call did, for the CLI's table and for tests."""

    store: Path | RemotePath
    ingested: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)  # all committed steps afterwards
    ingested_bytes: int = 0  # checkpoint bytes read this call
    checkpoint_bytes: int = 0  # weight-file bytes of all committed steps
    store_bytes: int = 0
    seconds: float = 0.0
    nonfinite: dict[int, dict[str, list[int]]] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """Store bytes / checkpoint bytes (lower is better)."""
        return self.store_bytes / self.checkpoint_bytes if self.checkpoint_bytes else float("nan")


@dataclass(frozen=True)
class IngestOptions:
    step_pattern: str | None = None
    allow_pickle: bool = False
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    block_bytes: int = DEFAULT_BLOCK_BYTES
    progress: bool = True


# -- pure checks ---------------------------------------------------------------------------------

Table = dict[str, tuple[str, tuple[int, ...]]]  # tensor name -> (logical dtype, shape)

def tensor_table(reader: CheckpointReader) -> Table:
    return {n: (i.dtype, i.shape) for n, i in reader.tensors.items()}


def check_table(expected: Table, table: Table, folder: Path) -> None:
    """A later step must hold exactly the stored tensors, with the same shapes and dtypes."""
    for name, (want_dtype, want_shape) in expected.items():
        if name not in table:
            raise PipelineError(f"tensor {name!r} is missing (the stored steps have it)", folder)
        dtype, shape = table[name]
        if dtype != want_dtype:
            raise PipelineError(f"tensor {name!r} has dtype {dtype}, the stored steps have "
                                f"{want_dtype}", folder)
        if tuple(shape) != tuple(want_shape):
            raise PipelineError(f"tensor {name!r} has shape {list(shape)}, the stored steps "
                                f"have {list(want_shape)}", folder)
    extra = sorted(set(table) - set(expected))
    if extra:
        raise PipelineError(f"tensor {extra[0]!r} is not in the stored steps", folder)


def check_order(stored: list[int], pending: list[Checkpoint]) -> None:
    if stored and pending and pending[0].step < stored[-1]:
        raise PipelineError(f"step {pending[0].step} is older than the last stored step "
                            f"{stored[-1]}; the store is append-only", pending[0].path)


# config.json fields that change what the weights compute: a step that differs in any of them
# is another model, and an export would pair one model's config with the other's weights
ARCH_KEYS = ("architectures", "model_type", "hidden_size", "intermediate_size",
             "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
             "vocab_size", "tie_word_embeddings", "hidden_act", "rope_theta", "rope_scaling",
             "rms_norm_eps", "layer_norm_eps", "num_experts", "num_local_experts",
             "num_experts_per_tok", "sliding_window", "use_sliding_window", "layer_types",
             "rope_parameters")


def check_config(expected: dict | None, config: dict | None, folder: Path) -> None:
    """A step's config.json must describe the run's architecture (the first config.json seen).

    Only names, shapes and dtypes of tensors were compared once, so a llama
    step after qwen2 steps with the same shapes was ingested silently. A step
    without config.json is accepted (many trainers write it once, or after the
    weights): there is nothing in it to disagree.
    """
    if expected is None or config is None:
        return
    path = folder / "config.json"
    for key in ARCH_KEYS:
        if config.get(key) != expected.get(key):
            raise PipelineError(f"model config changed: {key} is {config.get(key)!r}, the "
                                f"stored steps have {expected.get(key)!r} (another "
                                "architecture in the same run)", path)


def check_store_place(store: Path | RemotePath, run_dir: Path, cps: list[Checkpoint]) -> None:
    """The store may not be, or sit inside, a checkpoint folder of the run it ingests.

    A trainer that rotates checkpoints (``save_total_limit``) deletes the step
    folder, and the store inside it with it; a store next to or above the
    checkpoints is fine, and so is any store on object storage.
    """
    if isinstance(store, RemotePath):
        return
    folders = {cp.path for cp in cps}
    for cp in cps:
        try:
            folders.add(run_dir / cp.path.relative_to(run_dir).parts[0])
        except (ValueError, IndexError):
            pass
    check_output(store, [("checkpoint folder", f) for f in sorted(folders)], option="--store")


def check_options(poll: float, settle: float, max_idle: float | None, chunk_bytes: int,
                  block_bytes: int) -> None:
    """Refuse bad numbers before anything is locked or created (NaN passes every ``<``)."""
    check_number(poll, "poll", 0)
    check_number(settle, "settle", 0)
    if max_idle is not None:
        check_number(max_idle, "max_idle", 0)
    check_int(chunk_bytes, "chunk_bytes", 1)
    check_int(block_bytes, "block_bytes", 1)


# -- Dask ----------------------------------------------------------------------------------------

@contextmanager
def _client(client: Any, scheduler: str | None) -> Iterator[Any]:
    if client is not None:
        yield client
        return
    from pipeline.compute import dask_client

    with dask_client(scheduler) as c:
        yield c


def _verify_digests(client: Any, files: list[Path],
                    want: dict[str, dict]) -> dict[str, tuple[int, str]]:
    """Digest of each file, made with the algorithm of its stored digest (if any)."""
    futs = [client.submit(legacy_digest_task, str(f), want.get(f.name, {}).get("digest", ""),
                          pure=False) for f in files]
    return {Path(p).name: (size, d) for p, size, d in client.gather(futs)}


def _plan_ranges(state: StoreState, reader: CheckpointReader,
                 block_bytes: int) -> list[RangeSpec]:
    """Tasks of one step: contiguous byte ranges of each file, about ``block_bytes`` each.

    The ranges of a file cover it from byte 0 to its end (header included),
    so hashing each range gives the whole file's digest; each holds whole
    chunks of the tensors in it, so no two tasks write the same chunk.
    """
    by_file: dict[Path, list] = {f: [] for f in reader.files}
    for info in sorted(reader.tensors.values(), key=lambda i: (str(i.file), i.offset)):
        itemsize = info.nbytes // max(1, _numel(info.shape)) if info.nbytes else 1
        rows = state.chunk_rows(info.name)
        entry = state.tensors[info.name]
        for p in plan_pieces(info.name, info.shape, itemsize, rows, block_bytes):
            by_file.setdefault(info.file, []).append(
                PieceSpec(info, entry.path, p.start, p.stop, rows))
    out: list[RangeSpec] = []
    for f, specs in by_file.items():
        pieces = [Piece(str(i), s.start, s.stop, (s.stop - s.start) * s.info.row_bytes
                        if s.info.shape else s.info.nbytes) for i, s in enumerate(specs)]
        groups = [[specs[int(p.name)] for p in g] for g in group_tasks(pieces, block_bytes)]
        if reader.is_pickle:
            out.extend(RangeSpec(None, 0, 0, g) for g in groups)
            continue
        size = f.stat().st_size
        starts = [0] + [g[0].info.offset + g[0].start * g[0].info.row_bytes for g in groups[1:]]
        stops = starts[1:] + [size]
        out.extend(RangeSpec(str(f), a, b, g) for a, b, g in
                   zip(starts, stops, groups or [[]], strict=True))
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# -- one pass ------------------------------------------------------------------------------------

class _Ingester:
    """State kept across passes of ``watch``: verified steps and settle timers."""

    def __init__(self, run_dir: Path, store: Path | RemotePath, client: Any,
                 opts: IngestOptions, log: Callable[[str], None],
                 guard: Callable[[], None] = lambda: None) -> None:
        self.run_dir, self.store, self.client = run_dir, store, client
        self.opts, self.log = opts, log
        self.guard = guard  # raises if this writer lost its lock/lease: checked before commits
        self.verified: set[int] = set()
        self.seen: dict[Path, tuple[dict, float]] = {}
        self.report = IngestReport(store)
        self.nthreads = 2
        self.created_layout = False  # this process laid out the (still uncommitted) store

    def verify_stored(self, state: StoreState, cps: list[Checkpoint]) -> None:
        """Stored steps whose checkpoint is still there must hold the same bytes."""
        for cp in cps:
            if cp.step not in state.steps or cp.step in self.verified:
                continue
            rec = state.record_for(cp.step)
            reader = CheckpointReader(cp.path, allow_pickle=self.opts.allow_pickle)
            got = _verify_digests(self.client, reader.files, rec["files"])
            for fname, (size, digest) in got.items():
                want = rec["files"].get(fname)
                if want is None or want["digest"] != digest or want["size"] != size:
                    raise PipelineError(f"checkpoint bytes differ from stored step {cp.step} "
                                        "(content hash changed)", cp.path / fname)
            if set(rec["files"]) - set(got):
                missing = sorted(set(rec["files"]) - set(got))[0]
                raise PipelineError(f"file {missing} of stored step {cp.step} is gone from the "
                                    "checkpoint", cp.path)
            self.verified.add(cp.step)
            self.report.skipped.append(cp.step)

    def ready(self, cp: Checkpoint, settle: float) -> CheckpointReader | None:
        """Reader of a checkpoint that validates and has not changed for ``settle`` seconds."""
        snap = snapshot(cp.path)
        now = time.monotonic()
        prev = self.seen.get(cp.path)
        if prev is None or prev[0] != snap:
            self.seen[cp.path] = (snap, now)
            if settle > 0:
                return None
        elif now - prev[1] < settle:
            return None
        try:
            return CheckpointReader(cp.path, allow_pickle=self.opts.allow_pickle)
        except PipelineError as e:
            self.log(f"waiting for step {cp.step}: {e}")
            return None

    def run_pass(self, watch: bool, settle: float) -> int:
        """Ingest what is ready now; returns how many steps were committed."""
        cps = discover_checkpoints(self.run_dir, self.opts.step_pattern)
        check_store_place(self.store, self.run_dir, cps)
        state = StoreState.open(self.store)
        self.verify_stored(state, cps)
        pending = [cp for cp in cps if cp.step not in state.steps]
        check_order(state.steps, pending)
        # validate everything before writing anything (one-shot), or the next ready one (watch)
        readers: list[tuple[Checkpoint, CheckpointReader]] = []
        for cp in pending:
            if watch:
                r = self.ready(cp, settle)
                if r is None:
                    break  # keep step order: never skip ahead of an unfinished checkpoint
            else:
                r = CheckpointReader(cp.path, allow_pickle=self.opts.allow_pickle)
            readers.append((cp, r))
        expected: Table | None = (
            {n: (t.dtype, t.shape) for n, t in state.tensors.items()} if state.steps else None)
        config = state.meta.get("model_config") if state.steps else None
        for cp, r in readers:
            table = tensor_table(r)
            if expected is None:
                # refuse unstorable names before creating anything
                check_names(sorted(table), {n: i.file for n, i in r.tensors.items()})
                expected = table
            check_table(expected, table, cp.path)
            step_config = r.config
            check_config(config, step_config, r.folder)
            config = config if config is not None else step_config
        if readers:
            self.ingest_steps(state, readers)
        return len(readers)

    def ingest_steps(self, state: StoreState,
                     items: list[tuple[Checkpoint, CheckpointReader]]) -> None:
        """Write the steps' chunks (several steps in flight), committing them in step order."""
        index0 = len(state.steps)
        if index0 == 0:
            cp, reader = items[0]
            self.created_layout = True
            state.create(tensor_table(reader), reader.config,
                         {"run_dir": str(self.run_dir.resolve()),
                          "step_pattern": self.opts.step_pattern}, self.opts.chunk_bytes)
        # one resize for the whole batch (positions past the last marker stay invisible)
        state.grow(index0 + len(items) - 1)
        self._run_steps(state, index0, items)

    def _submit_batch(self, state: StoreState, index0: int,
                      items: list[tuple[Checkpoint, CheckpointReader]], after0: list[Any],
                      ) -> tuple[list[_StepJob], list[tuple[Any, list[_StepJob]]]]:
        """Submit the tasks of consecutive steps at positions ``index0...``.

        ``after0``: the futures that write position 0 while it is not
        committed; a task that reads position 0 from the store waits for them.

        Returns the steps' jobs, and each future with the jobs it reports to
        (a multi-step task returns one ``BlockResult`` per job, in order).
        """
        jobs = [_StepJob(index0 + i, cp, reader, snapshot(cp.path))
                for i, (cp, reader) in enumerate(items)]
        # a task reads about block_bytes, and a step splits into enough tasks for all workers
        step_bytes = max(sum(i.nbytes for i in r.tensors.values()) for _, r in items)
        per_step = max(1, min(self.opts.block_bytes, step_bytes // (3 * self.nthreads)))
        block = max(1, min(self.opts.block_bytes // len(items), per_step))
        plans = [_plan_ranges(state, r, block) for _, r in items]
        batched = (len(items) > 1 and all(len(p) == len(plans[0]) for p in plans)
                   and all(same_pieces(list(rs)) for rs in zip(*plans, strict=True)))
        indices = [j.index for j in jobs]
        key_every = int(state.meta.get("key_every", DEFAULT_KEY_EVERY))
        subs: list[tuple[Any, list[_StepJob]]] = []
        if batched:
            for rs in zip(*plans, strict=True):
                subs.append((self.client.submit(write_ranges, state.path, indices,
                                                list(rs), key_every, after0, pure=False), jobs))
        else:  # layouts differ between steps (or a pickle): one task per range per step
            prev: list[Any] = []  # the previous position's tasks, while it is a reference
            for job, (_, reader) in zip(jobs, items, strict=True):
                ref = reference(job.index, key_every)
                if ref is not None and ref == job.index - 1 and prev:
                    after = prev  # the step just before, in this batch
                elif ref == 0:
                    after = after0  # position 0, in an earlier batch still running
                else:
                    after = []  # the reference is committed
                futs = [self.client.submit(write_range, state.path, job.index, rng,
                                           key_every, after, pure=False)
                        for rng in _plan_ranges(state, reader, per_step)]
                subs += [(f, [job]) for f in futs]
                prev = futs
                if reader.is_pickle:
                    subs += [(self.client.submit(digest_task, str(f), pure=False), [job])
                             for f in reader.files]
        for _, owners in subs:
            for job in owners:
                job.remaining += 1
        return jobs, subs

    def _run_steps(self, state: StoreState, index0: int,
                   items: list[tuple[Checkpoint, CheckpointReader]]) -> None:
        from distributed import as_completed

        from pipeline.console import progress_bar

        try:
            self.nthreads = max(1, sum(self.client.nthreads().values()))
        except Exception:  # a client without worker info
            self.nthreads = 2
        total = sum(i.nbytes for _, r in items for i in r.tensors.values())
        bar = progress_bar(total, f"steps {items[0][0].step}..{items[-1][0].step}", unit="B",
                           enabled=self.opts.progress)
        # batches never cross a key position, at most STEPS_PER_TASK steps; two in flight, so
        # the workers start on the next batch while the last tasks of the previous one finish
        key_every = int(state.meta.get("key_every", DEFAULT_KEY_EVERY))
        batches = [(a, items[a - index0: a - index0 + n])
                   for a, n in plan_batches(index0, len(items), key_every)]
        owner: dict[Any, list[_StepJob]] = {}
        ac = as_completed()
        jobs: list[_StepJob] = []
        nxt = 0

        after0: list[Any] = []  # the tasks writing position 0, until it is committed

        def submit_next() -> None:
            nonlocal nxt, after0
            start, batch = batches[nxt]
            new, subs = self._submit_batch(state, start, batch,
                                           [] if state.steps else after0)
            if start == 0:
                after0 = [f for f, _ in subs]
            jobs.extend(new)
            nxt += 1
            for fut, owners in subs:
                owner[fut] = owners
                ac.add(fut)

        try:
            while nxt < len(batches) and nxt < 2:
                submit_next()
            while jobs:
                head = jobs[0]
                while head.remaining:
                    fut = next(ac)
                    res = fut.result()
                    owners = owner.pop(fut)
                    results = res if isinstance(res, list) else [res]
                    for job, r in zip(owners, results, strict=True):
                        job.add(r)
                        if isinstance(r, BlockResult):
                            bar.update(r.nbytes)
                self.finish_step(state, head)
                jobs.pop(0)
                if nxt < len(batches) and (not jobs or jobs[0].index >= batches[nxt - 1][0]):
                    submit_next()  # the batch before the newest is committed: keep two going
        except BaseException:
            self.client.cancel(list(owner))
            raise
        finally:
            bar.close()

    def finish_step(self, state: StoreState, job: _StepJob) -> None:
        """Check the checkpoint did not move, then record and commit its position."""
        cp = job.cp
        if snapshot(cp.path) != job.before:
            raise PipelineError("checkpoint changed while it was being ingested; not committed",
                                cp.path)
        digests = dict(job.digests)
        for path, blocks in job.blocks.items():
            p = Path(path)
            digests[p.name] = (job.before[p.name][0], combine_blocks(job.before[p.name][0],
                                                                     blocks))
        nonfinite = job.nonfinite
        if nonfinite:
            first = next(iter(nonfinite.items()))
            warnings.warn(f"{cp.path}: step {cp.step} has NaN/inf values in {len(nonfinite)} "
                          f"tensor(s), e.g. {first[0]!r} (nan, +inf, -inf) = {first[1]}; "
                          "stored bit-exact", NonFiniteWarning, stacklevel=2)
        record = {
            "step": cp.step,
            "folder": _rel(cp.path, self.run_dir),
            "files": {n: {"size": s, "digest": d} for n, (s, d) in sorted(digests.items())},
            "checkpoint_bytes": sum(s for s, _ in digests.values()),
            "nonfinite": nonfinite,
            "ingested_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if cp.real_step is not None:  # an RL-Extra run: the step is nominal (real + jumped)
            record["real_step"] = cp.real_step
        if state.meta.get("model_config") is None:  # the run's config: the first one seen
            state.meta["model_config"] = job.reader.config
        self.guard()  # a writer that lost its lease must not set a marker
        state.commit(job.index, cp.step, record)
        self.verified.add(cp.step)
        self.report.ingested.append(cp.step)
        self.report.ingested_bytes += job.nbytes
        if nonfinite:
            self.report.nonfinite[cp.step] = nonfinite


@dataclass
class _StepJob:
    """One step in flight: its position, the futures left, and what they returned."""

    index: int
    cp: Checkpoint
    reader: CheckpointReader
    before: dict
    remaining: int = 0
    nbytes: int = 0
    nonfinite: dict[str, list[int]] = field(default_factory=dict)
    blocks: dict[str, dict[int, bytes]] = field(default_factory=dict)
    digests: dict[str, tuple[int, str]] = field(default_factory=dict)

    def add(self, res: Any) -> None:
        self.remaining -= 1
        if not isinstance(res, BlockResult):  # a pickle file's digest_task
            path, size, digest = res
            self.digests[Path(path).name] = (size, digest)
            return
        self.nbytes += res.nbytes
        for name, counts in res.nonfinite.items():
            old = self.nonfinite.get(name, [0, 0, 0])
            self.nonfinite[name] = [a + b for a, b in zip(old, counts, strict=True)]
        if res.file is not None:
            self.blocks.setdefault(res.file, {}).update(res.blocks)


def _rel(path: Path, base: Path) -> str:
    try:
        return path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return str(path)


def ingest(
    run_dir: str | Path,
    store: str | Path | RemotePath,
    *,
    storage_options: dict[str, Any] | None = None,
    lease_ttl: float = DEFAULT_LEASE_TTL,
    step_pattern: str | None = None,
    scheduler: str | None = None,
    client: Any = None,
    allow_pickle: bool = False,
    watch: bool = False,
    poll: float = 10.0,
    settle: float = 5.0,
    max_idle: float | None = None,
    until_step: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    progress: bool = True,
    log: Callable[[str], None] = lambda _m: None,
    after_commit: Callable[[Any], None] | None = None,
) -> IngestReport:
    """Ingest every checkpoint of ``run_dir`` into ``store``; with ``watch``, keep going.

    Re-running is safe: unchanged stored steps are skipped, an interrupted
    step is redone. ``watch`` polls every ``poll`` seconds, ingests a
    checkpoint once it is complete and unchanged for ``settle`` seconds, and
    stops after ``max_idle`` seconds without a new step or once a step >=
    ``until_step`` is stored (never, if neither is given). ``after_commit(client)``
    runs after every pass that committed steps (``ingest --fit`` updates the
    fit there, so a watched run's fit stays current as checkpoints land).

    ``store`` may be an object-store URL (``s3://bucket/run.zarr``, with
    ``storage_options``): the writer then holds the store's lease
    (``lease``, living ``lease_ttl`` seconds between refreshes) instead of
    the local file lock.
    """
    t0 = time.perf_counter()
    run_dir, store = Path(run_dir), as_location(store, storage_options)
    check_options(poll, settle, max_idle, chunk_bytes, block_bytes)
    check_number(lease_ttl, "lease_ttl", 0, low_open=True)
    opts = IngestOptions(step_pattern, allow_pickle, chunk_bytes, block_bytes, progress)
    # fail on a bad run dir or a store inside a checkpoint before making a store
    check_store_place(store, run_dir, discover_checkpoints(run_dir, step_pattern))
    StoreState.open(store)  # refuse a file or a foreign folder before locking (creating) it
    ing: _Ingester | None = None
    with hold(store, log, lease_ttl) as lock:
        try:
            with _client(client, scheduler) as c:
                ing = _Ingester(run_dir, store, c, opts, log, lock.check)
                hook = (lambda: after_commit(c)) if after_commit else None
                _run(ing, store, watch, poll, settle, max_idle, until_step, hook)
        except SchedulerLost:
            raise  # orphaned workers may still write into the store: keep it for the re-run
        except BaseException:
            _discard_unfinished(lock, ing is not None and ing.created_layout)
            raise
        state = StoreState.open(store)
    assert ing is not None
    rep = ing.report
    rep.steps = list(state.steps)
    rep.checkpoint_bytes = sum(r["checkpoint_bytes"] for r in state.records)
    rep.store_bytes = store_bytes(store)
    rep.seconds = time.perf_counter() - t0
    return rep


def _discard_unfinished(lock: Any, created_layout: bool) -> None:
    """After a failure with no step committed, remove what this process created, and only that.

    The folder goes only if this process made it; a layout only if this
    process laid it out (a store another run left uncommitted stays for it to
    resume). Runs under the lock (or lease), so no other ingest is using what
    is removed; a lock or lease that was lost removes nothing.
    """
    try:
        lock.check()
    except PipelineError:
        return
    if committed_steps(lock.store):
        return
    if lock.created:
        remove_tree(lock.store)
    elif created_layout:
        discard_layout(lock.store)


def _run(ing: _Ingester, store: Path | RemotePath, watch: bool, poll: float, settle: float,
         max_idle: float | None, until_step: int | None,
         after_commit: Callable[[], None] | None = None) -> None:
    """One pass, or the watch loop (the caller holds the store lock)."""
    if not watch:
        if ing.run_pass(False, 0.0) and after_commit:
            after_commit()
        return
    last = time.monotonic()
    while True:
        if ing.run_pass(True, settle):
            last = time.monotonic()
            if after_commit:
                after_commit()
        steps = StoreState.open(store).steps
        if until_step is not None and steps and steps[-1] >= until_step:
            return
        if max_idle is not None and time.monotonic() - last >= max_idle:
            return
        time.sleep(poll)
