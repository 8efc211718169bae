"""Streaming export of an extrapolated model that transformers and vLLM load as-is.

Tensor by tensor, row block by row block: read the block at each source
step, run a pure kernel, round to the output dtype, append to the shard
being written. Peak memory is a few row blocks whatever the model size.
The output folder is written as a hidden sibling and renamed into place
only when complete, so a crash or a bad input never leaves a half model
where a loader could find it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.checkpoints.format import pread_exact
from pipeline.checkpoints.writer import ShardedWriter, TensorSpec
from pipeline.compute.threads import compute_threads
from pipeline.dtypes import logical_dtype
from pipeline.errors import PipelineError, check_int, check_number, check_size
from pipeline.extrapolate import kernels as K
from pipeline.extrapolate import methods as M
from pipeline.extrapolate.plan import (
    DEFAULT_EXCLUDE,
    TensorPlan,
    check_target,
    plan_tensors,
    resolve_alpha,
    rows_per_block,
)
from pipeline.extrapolate.sources import CheckpointSource, WeightSource, check_export_out
from pipeline.workspace import Workspace

DEFAULT_BLOCK_BYTES = 16 * 2**20  # working memory of the blocks in flight (all operands)
IO_THREADS = 2  # stream_blocks' reader and writer threads
# files beside the weights that a loader needs, copied from the newest checkpoint
AUX_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
             "tokenizer.model", "chat_template.jinja", "chat_template.json",
             "preprocessor_config.json")
PROVENANCE_FILE = "extrapolation.json"


@dataclass(frozen=True)
class ExtrapolationSpec:
    """Everything that decides the output values (recorded in the output's metadata)."""

    method: str  # a name in the methods registry
    steps: tuple[int, ...]
    target: float
    alpha: float | None = None  # pair methods (two-point) only
    params: tuple[tuple[str, float], ...] = ()  # the method's own, e.g. (("r2_min", 0.8),)
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE

    @property
    def param_values(self) -> dict[str, float]:
        return dict(self.params)


def make_spec(
    source: WeightSource,
    method: str = M.DEFAULT_METHOD,
    to: float | None = None,
    alpha: float | None = None,
    steps: Sequence[int] | None = None,
    window: int | None = None,
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    allow_interpolation: bool = False,
    **params: float | None,
) -> ExtrapolationSpec:
    """Validate the user's choices against the source; raises before any data is read.

    ``params`` are the method's own (``r2_min=`` for gated); one that is
    ``None`` counts as not given, so a CLI can pass every option through.
    """
    m = M.get(method)
    to = None if to is None else check_number(to, "--to")
    alpha = None if alpha is None else check_number(alpha, "--alpha")
    values = m.check_params(params)
    if window is not None:
        check_int(window, "--window", 2)
        if m.step_rule == "pair":
            raise PipelineError(f"--window only applies to --method "
                                f"{', '.join(M.with_steps('window'))}")
    used = m.choose_steps(source.steps, steps, window)
    common: dict[str, Any] = {"params": tuple(values.items()), "include": tuple(include),
                              "exclude": tuple(exclude)}
    if m.step_rule == "pair":
        a, target = resolve_alpha(used[0], used[1], to, alpha, allow_interpolation)
        return ExtrapolationSpec(m.name, tuple(used), target, alpha=a, **common)
    if (to is None) == (alpha is None):
        raise PipelineError(f"{m.name} needs exactly one of --to STEP or --alpha")
    if to is None:  # same meaning as for two-point
        to = used[0] + check_number(alpha, "--alpha") * (used[-1] - used[0])
    check_target(to, used[-1], allow_interpolation)
    return ExtrapolationSpec(m.name, tuple(used), float(to), **common)


def row_blocks(shape: tuple[int, ...], block_bytes: int, elem_bytes: int = 4
               ) -> Iterator[slice | None]:
    """Slices over axis 0 covering the tensor (``None`` for a scalar)."""
    if not shape:
        yield None
        return
    step = rows_per_block(shape, block_bytes, elem_bytes)
    for a in range(0, shape[0], step):
        yield slice(a, min(a + step, shape[0]))


def input_steps(spec: ExtrapolationSpec, plan: TensorPlan) -> tuple[int, ...]:
    """The source steps a tensor's output depends on."""
    if plan.action == "copy":
        return (spec.steps[-1],)
    m = M.get(spec.method)
    return m.input_steps(spec.steps, m.prepares(plan))


def read_inputs(source: WeightSource, spec: ExtrapolationSpec, plan: TensorPlan,
                rows: slice | None, ws: Workspace | None = None) -> list[np.ndarray]:
    """The row block of ``plan`` at every step it depends on (the only I/O of a block).

    With a workspace, blocks of safetensors checkpoint folders are read
    straight into its buffers (valid until the workspace is used again):
    no fresh zero-filled buffer per block. Anything else goes through
    ``source.read``.
    """
    out = []
    for i, s in enumerate(input_steps(spec, plan)):
        block = _read_into(source, plan.name, s, rows, ws, f"input{i}") if ws else None
        out.append(source.read(plan.name, s, rows) if block is None else block)
    return out


def _read_into(source: WeightSource, name: str, step: int, rows: slice | None,
               ws: Workspace, role: str) -> np.ndarray | None:
    """A row block read with ``os.preadv`` into ``ws``; ``None`` where that does not apply."""
    if not isinstance(source, CheckpointSource):
        return None
    reader = source.reader(step)
    if reader.is_pickle:
        return None
    info = reader.info(name)
    if info.shape:
        a, b, _ = slice(None).indices(info.shape[0]) if rows is None else rows.indices(
            info.shape[0])
        b = max(a, b)
        shape: tuple[int, ...] = (b - a, *info.shape[1:])
    else:
        a, shape = 0, ()
    dtype = logical_dtype(info.dtype)
    arr = ws.get(role, shape, dtype)
    view = memoryview(arr.reshape(-1).view(np.uint8))
    fd = os.open(info.file, os.O_RDONLY)
    try:
        pread_exact(fd, view, info.offset + a * info.row_bytes, info)
    finally:
        os.close(fd)
    return arr


def compute_block(
    spec: ExtrapolationSpec, plan: TensorPlan, inputs: list[np.ndarray],
    rows: slice | None = None, ws: Workspace | None = None, threads: int | None = None,
    prepared: Any = None,
) -> np.ndarray:
    """One output block exactly as written: predicted, rounded (RNE) to the output dtype.

    Pure: ``inputs`` come from :func:`read_inputs`. With a workspace the
    result may be a view into it, valid until the workspace is used again.
    ``threads``: how many threads the arithmetic may be split over (default:
    every core); the bits are the same whatever the split. ``prepared``: the
    method's pre-pass result for this tensor (:func:`prepass_of`).
    """
    if plan.action == "copy":
        val = inputs[0]
    else:
        block = M.BlockInput(tuple(inputs), spec.steps, spec.target, spec.alpha, rows,
                             prepared, plan.out_dtype, ws, threads)
        val = M.get(spec.method).predict(block, spec.param_values)
    if val.dtype == plan.out_dtype:
        return val
    if val.dtype != np.float64 and K.is_float(val.dtype):
        val = K.to_float32(val)  # copied tensors changing dtype: exact widening first
    return K.round_to(val, plan.out_dtype)


def block_elem_bytes(spec: ExtrapolationSpec, plan: TensorPlan) -> int:
    """Working bytes per element of one block: its inputs plus the kernel's scratch."""
    inputs = plan.src_dtype.itemsize * len(input_steps(spec, plan))
    if plan.action == "copy":
        return inputs + 8
    return inputs + M.get(spec.method).scratch_bytes


def stream_blocks(
    source: WeightSource, spec: ExtrapolationSpec, plans: Sequence[TensorPlan],
    writer: ShardedWriter, block_bytes: int,
    on_block: Callable[[int], None] = lambda _n: None,
    on_tensor: Callable[[TensorPlan], None] | None = None,
) -> None:
    """Read, compute and write every block, overlapping the three.

    One thread prefetches the next block's inputs while this one computes;
    another writes the previous block (in order: a single writer thread).
    Two workspaces alternate so a block being written is never overwritten,
    and two more hold the inputs read (block k + 1 is read into the buffers
    of block k - 1, whose computation is over; a copied tensor's block is
    copied out of them before it goes to the writer). At most two blocks are
    in flight, so memory stays ~2 x ``block_bytes``.
    """
    jobs = [(p, rows, last)
            for p in plans
            for rows, last in _with_last(row_blocks(p.shape, block_bytes // 2,
                                                    block_elem_bytes(spec, p)))]
    if not jobs:
        return
    method = M.get(spec.method)
    prepared = {p.name: prepass_of(source, method, p, spec.steps, block_bytes)
                for p in plans if method.prepares(p)}
    # the reader and the writer thread keep about a core busy each (copying to and from
    # the page cache). Measured on 2 cores, splitting the arithmetic on top of them was
    # ~5% faster on an idle machine but ~15% slower with other jobs running
    threads = max(1, compute_threads() - IO_THREADS)
    workspaces = [Workspace(), Workspace()]
    read_spaces = [Workspace(), Workspace()]  # block k's inputs live in read_spaces[k % 2]
    writes: list[Future[None] | None] = [None, None]
    with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as write_pool:
        nxt = reader.submit(read_inputs, source, spec, jobs[0][0], jobs[0][1], read_spaces[0])
        for k, (p, rows, last) in enumerate(jobs):
            inputs = nxt.result()
            if k + 1 < len(jobs):  # into the buffers of block k - 1, computed already
                nxt = reader.submit(read_inputs, source, spec, jobs[k + 1][0], jobs[k + 1][1],
                                    read_spaces[(k + 1) % 2])
            slot = k % 2
            if writes[slot] is not None:
                writes[slot].result()  # this workspace's previous block is on disk
            block = compute_block(spec, p, inputs, rows, workspaces[slot], threads,
                                  prepared.get(p.name))
            if any(np.may_share_memory(block, x) for x in inputs):
                # a copied tensor: its input buffer is refilled while the block is written
                buf = workspaces[slot].get("output", block.shape, block.dtype)
                np.copyto(buf, block)
                block = buf
            writes[slot] = write_pool.submit(writer.write, p.name, block)
            on_block(block.nbytes)
            if last and on_tensor is not None:
                on_tensor(p)
        for w in writes:
            if w is not None:
                w.result()


def prepass_of(source: WeightSource, method: M.Method, plan: TensorPlan,
               steps: Sequence[int], block_bytes: int) -> Any:
    """The method's pre-pass over one matrix (rank1: its direction), streamed from ``source``.

    The pass reads row blocks through this one function, so memory is a
    block (and what the method keeps, two vectors for rank1), never the matrix.
    """
    if method.prepass is None:
        raise ValueError(f"method {method.name!r} has no pre-pass")

    def read(step: int, rows: slice) -> np.ndarray:
        return K.to_float32(source.read(plan.name, step, rows))

    return method.prepass(read, plan.shape, tuple(steps), block_bytes)


def _with_last(it: Iterator[slice | None]) -> Iterator[tuple[slice | None, bool]]:
    items = list(it)
    for i, x in enumerate(items):
        yield x, i == len(items) - 1


def build_plan(
    source: WeightSource, spec: ExtrapolationSpec, out_dtype: np.dtype | None = None
) -> list[TensorPlan]:
    """Tensor plan over the steps used: same names and shapes at every step."""
    names = source.tensor_names
    shapes = {n: [source.shape(n)] for n in names}
    dtypes = {n: source.dtype(n) for n in names}
    cfg = source.config or {}
    tied = bool(cfg.get("tie_word_embeddings", False))
    return plan_tensors(names, shapes, dtypes, spec.include, spec.exclude, out_dtype, tied)


def metadata_for(spec: ExtrapolationSpec) -> dict[str, str]:
    """safetensors ``__metadata__`` (string values only): what produced these weights."""
    md = {"format": "pt", "method": spec.method, "steps": json.dumps(list(spec.steps)),
          "target_step": f"{spec.target:g}"}
    if spec.alpha is not None:
        md["alpha"] = repr(spec.alpha)
    for key, value in spec.params:
        md[key] = repr(value)
    return md


@dataclass
class ExportResult:
    out: Path
    spec: ExtrapolationSpec
    files: list[str]
    moved: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    bytes_written: int = 0
    seconds: float = 0.0


def export(
    source: WeightSource,
    out: str | Path,
    spec: ExtrapolationSpec,
    dtype: str | None = None,
    max_shard_size: str | int | None = None,
    force: bool = False,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    progress: bool = False,
    on_tensor: Callable[[TensorPlan], None] | None = None,
) -> ExportResult:
    """Write the extrapolated model to ``out`` (safetensors shards + config + tokenizer).

    Nothing appears at ``out`` unless the export completes; an existing
    ``out`` is replaced only with ``force``.
    """
    t_start = time.perf_counter()
    out = Path(out)
    check_export_out(source, out)
    if out.exists() and not force:
        raise PipelineError("output exists (pass --force to overwrite)", out)
    out_dtype = output_dtype(dtype)
    check_shard_size(max_shard_size)
    check_int(block_bytes, "block size", 1)
    plans = build_plan(source, spec, out_dtype)
    folder = source.files_folder
    if folder is None or not (folder / "config.json").exists():
        raise PipelineError("no config.json in the newest source checkpoint; cannot export a "
                            "loadable model", folder)
    all_names = set(source.tensor_names)
    specs = [TensorSpec(p.name, p.shape, p.out_dtype) for p in plans]
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    tmp = out.parent / f"{_partial_prefix(out)}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    bar = _progress(sum(s.nbytes for s in specs), progress)
    try:
        with ShardedWriter(tmp, specs, max_shard_size, metadata_for(spec)) as writer:
            stream_blocks(source, spec, plans, writer, block_bytes, bar, on_tensor)
        _copy_aux(folder, tmp, out_dtype)
        result = ExportResult(
            out, spec, writer.files,
            moved=[p.name for p in plans if p.action == "move"],
            copied=[p.name for p in plans if p.action == "copy"],
            dropped=sorted(all_names - {p.name for p in plans}),
            bytes_written=sum(s.nbytes for s in specs),
        )
        provenance = {**asdict(spec), "params": spec.param_values,
                      "source": str(folder.parent), "moved": result.moved,
                      "copied": result.copied, "dropped": result.dropped}
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=1) + "\n")
        _publish(tmp, out, force)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and _inside(e.filename, tmp):
            # the hidden partial folder is gone: the user's output is what failed
            raise OSError(e.errno, e.strerror, str(out)) from e
        raise
    finally:
        bar(None)
    result.seconds = time.perf_counter() - t_start
    return result


def output_dtype(dtype: str | None) -> np.dtype | None:
    """The ``--dtype`` asked for (None: keep the source's); only floating types make sense."""
    if not dtype:
        return None
    try:
        out = logical_dtype(dtype)
    except (TypeError, ValueError):
        out = None
    if out is None or not K.is_float(out):
        raise PipelineError(f"--dtype must be a floating type such as float32 or bfloat16, "
                            f"got {dtype!r}")
    return out


def check_shard_size(size: str | int | None) -> None:
    """Parse ``--max-shard-size`` now, so a bad one fails before anything is written."""
    if size is None:
        return
    check_size(size, "--max-shard-size")


def _inside(filename: object, folder: Path) -> bool:
    """True for no file name (a write in a worker thread) or one inside ``folder``."""
    if filename is None:
        return True
    try:
        return Path(os.fsdecode(filename)).is_relative_to(folder)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def _partial_prefix(out: Path) -> str:
    return f".{out.name}.partial-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process (or not a pid we can ask about): keep it
    return True


def remove_stale_partials(out: Path) -> list[Path]:
    """Delete ``.NAME.partial-PID`` folders beside ``out`` left by exports that were killed.

    Only folders with exactly this name pattern, for this ``out``, whose PID is
    no longer running on this machine; anything else (another export still
    writing, a file, a different name) is left alone.
    """
    prefix = _partial_prefix(out)
    removed = []
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        tail = p.name[len(prefix):] if p.name.startswith(prefix) else ""
        if not (tail.isdigit() and tail.isascii()) or int(tail) == os.getpid():
            continue
        if p.is_dir() and not p.is_symlink() and not _pid_alive(int(tail)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _copy_aux(src: Path, dst: Path, out_dtype: np.dtype | None) -> None:
    """Config, generation config and tokenizer files; config's dtype follows ``--dtype``."""
    for name in AUX_FILES:
        f = src / name
        if f.is_file():
            shutil.copy2(f, dst / name)
    if out_dtype is not None:
        cfg_path = dst / "config.json"
        cfg: dict[str, Any] = json.loads(cfg_path.read_text())
        name = "bfloat16" if out_dtype == K.BF16 else str(out_dtype)
        for key in ("dtype", "torch_dtype"):
            if key in cfg:
                cfg[key] = name
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def _publish(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished folder into place; with ``force`` the old one goes only after."""
    if out.exists():
        if not force:
            raise PipelineError("output appeared while exporting; not overwriting", out)
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        if old.is_dir():
            shutil.rmtree(old)
        else:
            old.unlink()
        return
    os.replace(tmp, out)


def _progress(total: int, enabled: bool) -> Callable[[int | None], None]:
    """A byte-counting progress callback (tqdm); ``None`` closes it."""
    if not enabled:
        return lambda _n: None
    from pipeline.console import progress_bar

    bar = progress_bar(total, "export", unit="B")

    def update(n: int | None) -> None:
        if n is None:
            bar.close()
        else:
            bar.update(n)

    return update
