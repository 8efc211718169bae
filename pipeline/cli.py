"""``rlvr-lin``: one command-line app, a thin layer over the library.

Each subcommand parses arguments, resolves catalog names, calls one library
function and prints a table. A ``PipelineError`` becomes one line on stderr
and exit code 2; nothing here holds logic worth testing on its own.
"""

from __future__ import annotations

import enum
import functools
import os
import sys
from collections.abc import Callable
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from pipeline import engine
from pipeline.compute.executors import EXECUTORS
from pipeline.errors import PipelineError, check_int, check_number, check_output
from pipeline.extrapolate import methods as registry

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Linear dynamics of RLVR training: ingest checkpoints, fit, extrapolate.",
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable[..., Any])
# --method's choices: the names in the methods registry when the app is built
MethodName = registry.name_enum()
METHOD_HELP = "; ".join(f"{m.name}: {m.summary}" for m in registry.methods())
PAIR = "/".join(registry.with_steps("pair"))  # help texts name the methods an option is for
WINDOW = "/".join(registry.with_steps("window"))
GATED = "/".join(registry.takers("r2_min"))
SWEPT = ", ".join(f"{v:g}" for v in registry.param("r2_min").sweep)
# --backend and --executor: the fit engine's and the compute layer's registries (both import
# nothing heavy: backends and clusters are created on use)
BackendName = enum.Enum("BackendName", {n: n for n in engine.BACKENDS})  # type: ignore[misc]
ExecutorName = enum.Enum("ExecutorName", {n: n for n in EXECUTORS})  # type: ignore[misc]
FitDevice = enum.Enum("FitDevice", {n: n for n in engine.DEVICES})  # type: ignore[misc]


DEBUG_ENV = "RLVR_LIN_DEBUG"  # set to 1: internal errors also print their traceback


def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind ``e`` (itself, or what it was raised from), if any.

    Libraries (zarr, Dask) sometimes re-raise a failed write as their own
    exception; the disk's own error is what the user needs to read.
    """
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError):
            return cur
        cur = cur.__cause__ or cur.__context__
    return None


def os_error_line(e: OSError, output: Path | None = None) -> str:
    """``<file>: no space left on device``: the file and the system's reason.

    The file is the one the error names, else the command's output (a write
    deep inside zarr or a Dask task often loses the file name on the way).
    """
    reason = e.strerror or str(e) or type(e).__name__
    reason = reason[:1].lower() + reason[1:]
    name = e.filename if e.filename is not None else output
    text = f"{os.fsdecode(name)}: {reason}" if name is not None else reason
    return " ".join(text.split())


def _internal_error(e: BaseException) -> None:
    """One line that says it is a bug; the traceback only when $RLVR_LIN_DEBUG is set."""
    import traceback

    msg = " ".join(f"{type(e).__name__}: {e}".split())
    typer.echo(f"error: internal error (a bug in rlvr-lin, please report it): {msg}", err=True)
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        typer.echo("internal error to report; its traceback:", err=True)
        typer.echo("".join(traceback.format_exception(e)).rstrip(), err=True)
    else:
        typer.echo(f"(run again with {DEBUG_ENV}=1 to see the traceback)", err=True)


def user_errors(fn: F) -> F:
    """Every failure as one ``error:`` line: exit 2 for bad input or a failing disk.

    ``PipelineError`` is bad input; an ``OSError`` (a full disk, a read-only
    or forbidden output) is the environment, named by its file. Anything else
    is a bug: one line saying so, exit 1, the traceback only on request.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _OUTPUT.set(None)
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.TyperException):  # typer's own (its click)
            raise
        except PipelineError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except MemoryError:
            typer.echo("error: out of memory (try a smaller block size or fewer workers)",
                       err=True)
            raise typer.Exit(2) from None
        except Exception as e:
            os_err = _os_error(e)
            if os_err is not None:
                typer.echo(f"error: {os_error_line(os_err, _OUTPUT.get())}", err=True)
                raise typer.Exit(2) from None
            _internal_error(e)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


WORKER_PRELOAD = "pipeline.errors"  # drops workers' duplicate "Compute Failed" tracebacks


def quiet_dask_workers() -> None:
    """Have local Dask workers leave error reporting to the client (one ``error:`` line).

    Set before a cluster starts, so its worker processes get it with the rest
    of the Dask configuration; with $RLVR_LIN_DEBUG set, workers log as usual.
    """
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        return
    import logging

    import dask
    import distributed  # noqa: F401  (configures its loggers on import: set ours after)

    # a lost scheduler becomes one error line (pipeline.compute.clusters); the client's own
    # reconnect tracebacks and its closed-stream notices would bury it
    for name in ("distributed.client", "distributed.batched", "distributed.comm"):
        logging.getLogger(name).setLevel(logging.CRITICAL)

    preload = list(dask.config.get("distributed.worker.preload", None) or [])
    if WORKER_PRELOAD not in preload:
        dask.config.set({"distributed.worker.preload": [*preload, WORKER_PRELOAD]})


_OUTPUT: ContextVar[Path | None] = ContextVar("rlvr_lin_output", default=None)


def writing(path: str | Path | None) -> None:
    """Record what the command writes: an OSError without a file name is reported on it."""
    _OUTPUT.set(Path(path) if isinstance(path, str | Path) else None)  # a RemotePath: none


def number(value: float | None, what: str, low: float | None = None,
           low_open: bool = False) -> float | None:
    """A float option, refused when NaN, infinite or below ``low`` (None passes through)."""
    return None if value is None else check_number(value, what, low, low_open=low_open)


Scheduler = Annotated[
    str | None,
    typer.Option("--cluster", "--scheduler",
                 help="where Dask work runs: a scheduler address (tcp://host:port), a Dask "
                 "scheduler file (scheduler.json), a cluster file (YAML, see docs/clusters.md) "
                 "or a kind (local, local-cuda, slurm, kubernetes); default: a LocalCluster "
                 "sized to the machine",
                 envvar="DASK_SCHEDULER_ADDRESS"),
]
CatalogOpt = Annotated[
    Path | None, typer.Option("--catalog", help="catalog file (default ./data_catalog.yaml)")
]
# decoding options shared by generate, probes and eval (defaults: the paper's T and top-p)
TemperatureOpt = Annotated[float, typer.Option(help="0 = greedy (argmax)")]
TopPOpt = Annotated[float, typer.Option(help="nucleus sampling, in (0, 1]")]
TopKOpt = Annotated[int, typer.Option(help="keep the k most likely tokens (0 = off)")]
SeedOpt = Annotated[int, typer.Option(help="sampling seed")]
StopOpt = Annotated[list[str] | None, typer.Option(help="stop string besides EOS (repeatable)")]
BatchOpt = Annotated[int, typer.Option(help="sequences decoded together")]
DeviceOpt = Annotated[str, typer.Option(help="torch device: cpu or cuda")]
DtypeOpt = Annotated[str, typer.Option(help="auto (the checkpoint's), float32, bfloat16 or "
                                            "float16")]
ProgressOpt = Annotated[bool, typer.Option(help="show a progress bar")]
AllowNegativeOpt = Annotated[bool, typer.Option(help="accept an alpha below 0")]


@app.command("make-tiny-run")
@user_errors
def make_tiny_run_cmd(
    out: Annotated[Path, typer.Argument(help="folder to create; global_step_N/ go inside")],
    seed: int = 0,
    arch: Annotated[str, typer.Option(help="qwen2 or llama")] = "qwen2",
    dtype: Annotated[
        str | None, typer.Option(help="checkpoint dtype: float32 or bfloat16")
    ] = None,
    max_shard_size: Annotated[
        str | None, typer.Option(help="shard the safetensors, e.g. 200KB")
    ] = None,
    tie: Annotated[bool, typer.Option(help="tie input and output embeddings")] = False,
    task: Annotated[str | None, typer.Option(help="verifiable task: add2, add3, addsub2")] = None,
    rl_steps: Annotated[int | None, typer.Option(help="GRPO steps")] = None,
    save_every: Annotated[int | None, typer.Option(help="checkpoint every k steps")] = None,
    lr: Annotated[float | None, typer.Option(help="GRPO learning rate (constant)")] = None,
    prompts_per_step: Annotated[int | None, typer.Option(help="GRPO prompts per step")] = None,
    generations: Annotated[int | None, typer.Option(help="GRPO answers per prompt")] = None,
    sft_steps: Annotated[int | None, typer.Option(help="supervised warm-start steps")] = None,
    hidden_size: int = 128,
    layers: int = 2,
    intermediate_size: int = 256,
    heads: int = 4,
    kv_heads: int = 2,
) -> None:
    """Train a real tiny RLVR run (warm start + GRPO) and save HF checkpoints.

    Options left out take the embedded default run's values (``TinyRunConfig``).
    """
    from dataclasses import replace

    from pipeline.rl.tasks import TASKS

    # every option is checked before torch and transformers are imported (seconds)
    if task is not None and task not in TASKS:
        raise PipelineError(f"unknown --task {task!r} (expected one of {', '.join(TASKS)})")
    if arch not in ("qwen2", "llama"):
        raise PipelineError(f"unknown --arch {arch!r} (expected qwen2 or llama)")
    if dtype is not None and dtype not in ("float32", "bfloat16"):
        raise PipelineError(f"unknown --dtype {dtype!r} (expected float32 or bfloat16)")
    if lr is not None:
        number(lr, "--lr", 0.0, low_open=True)
    for what, v, low in (("--rl-steps", rl_steps, 0), ("--save-every", save_every, 1),
                         ("--sft-steps", sft_steps, 0), ("--prompts-per-step", prompts_per_step, 1),
                         ("--generations", generations, 2), ("--hidden-size", hidden_size, 1),
                         ("--layers", layers, 1), ("--intermediate-size", intermediate_size, 1),
                         ("--heads", heads, 1), ("--kv-heads", kv_heads, 1)):
        if v is not None:
            check_int(v, what, low)
    writing(out)
    from pipeline.rl.tiny_model import ModelSize
    from pipeline.rl.tiny_run import TinyRunConfig, make_tiny_run

    size = ModelSize(hidden_size, layers, intermediate_size, heads, kv_heads)
    given = dict(dtype=dtype, task=task, rl_steps=rl_steps, save_every=save_every, lr=lr,
                 prompts_per_step=prompts_per_step, generations=generations, sft_steps=sft_steps)
    cfg = replace(TinyRunConfig(), seed=seed, arch=arch, tie=tie,
                  max_shard_size=max_shard_size, size=size,
                  **{k: v for k, v in given.items() if v is not None})
    make_tiny_run(out, cfg)
    typer.echo(f"run written to {out}")


@app.command("demo")
@user_errors
def demo_cmd(
    name: Annotated[
        str | None, typer.Argument(help="catalog entry (default: the catalog's default)")
    ] = None,
    catalog: CatalogOpt = None,
    scheduler: Scheduler = None,
) -> None:
    """Run the whole pipeline end to end on a catalog run (the README's main command)."""
    from pipeline.demo import run_demo

    quiet_dask_workers()
    run_demo(name, catalog, scheduler)


@app.command("ingest")
@user_errors
def ingest_cmd(
    run: Annotated[str, typer.Argument(help="run directory, or a catalog entry name")],
    store: Annotated[str | None, typer.Option(help="zarr store, a path or URL (default: the "
                                                 "catalog's)")] = None,
    step_pattern: Annotated[
        str | None, typer.Option(help="regex with a named group 'step' for checkpoint folders")
    ] = None,
    watch: Annotated[
        bool, typer.Option(help="keep ingesting new checkpoints as they land")
    ] = False,
    poll: Annotated[float, typer.Option(help="--watch: seconds between scans")] = 10.0,
    settle: Annotated[
        float, typer.Option(help="--watch: seconds a checkpoint must stay unchanged")
    ] = 5.0,
    max_idle: Annotated[
        float | None, typer.Option(help="--watch: stop after this many seconds with no new step")
    ] = None,
    until_step: Annotated[
        int | None, typer.Option(help="--watch: stop once this step is stored")
    ] = None,
    allow_pickle: Annotated[
        bool, typer.Option(help="also read pickle (.bin/.pt) weights, with weights_only=True")
    ] = False,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    fit: Annotated[
        bool, typer.Option(help="update the fit (incrementally) after every committed pass")
    ] = False,
    alarm_threshold: Annotated[
        float | None, typer.Option(
            help="after every committed pass, forecast each new checkpoint from the two "
                 "before it (two-point) and print/record (outputs/alarm.jsonl) its relative "
                 "error; above this threshold the run is flagged as no longer linear "
                 "(1 = no better than 'no change')")
    ] = None,
    catalog: CatalogOpt = None,
    scheduler: Scheduler = None,
) -> None:
    """Ingest a run's checkpoints into its step-indexed zarr store (resumable, append-only)."""
    import warnings

    from pipeline.catalog import resolve
    from pipeline.store.ingest import ingest

    number(poll, "--poll", 0.0, low_open=True)
    number(settle, "--settle", 0.0)
    number(max_idle, "--max-idle", 0.0)
    target = resolve(run, catalog)
    run_dir, pattern, fit_out = target.checkpoints, step_pattern or target.step_pattern, \
        target.output("fit")
    if store is None and target.entry is not None:
        store = target.store
    if store is None:
        raise PipelineError("--store is required when RUN is a path", run_dir)
    writing(store)
    quiet_dask_workers()
    hooks: list[Callable[[object], None]] = []
    if fit:
        from pipeline.fit.job import fit_store

        def fit_hook(client: object) -> None:
            rep = fit_store(store, fit_out, client=client, progress=False)
            typer.echo(f"fit {rep.fit_dir}: {len(rep.steps)} steps, new steps "
                       f"{rep.new_steps} (fitted afresh from the store)", err=True)

        hooks.append(fit_hook)
    if alarm_threshold is not None:
        from pipeline.extrapolate.alarm import alarm_new_steps, alarm_path, check_alarm

        check_alarm(alarm_threshold, 2)
        alarm_file = alarm_path(store, target.outputs)

        def alarm_hook(_client: object) -> None:
            for rec in alarm_new_steps(store, alarm_file, alarm_threshold):
                typer.echo(rec.line(), err=True)

        hooks.append(alarm_hook)

    def after_commit(client: object) -> None:
        for hook in hooks:
            hook(client)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda msg, *_a, **_k: typer.echo(f"warning: {msg}", err=True)
        rep = ingest(run_dir, store, step_pattern=pattern, scheduler=scheduler, watch=watch,
                     poll=poll, settle=settle, max_idle=max_idle, until_step=until_step,
                     allow_pickle=allow_pickle, progress=progress,
                     log=lambda m: typer.echo(m, err=True),
                     after_commit=after_commit if hooks else None)
    from pipeline.store.summary import print_ingest_report

    print_ingest_report(rep)


def block_size(block_mb: float) -> int:
    """``--block-mb`` in bytes: a finite number of at least one byte."""
    mb = check_number(block_mb, "--block-mb", 0.0, low_open=True)
    if mb * (1 << 20) < 1:
        raise PipelineError(f"--block-mb must be at least one byte, got {block_mb!r}")
    return int(mb * (1 << 20))


@app.command("fit")
@user_errors
def fit_cmd(
    store: Annotated[str, typer.Argument(help="run store (zarr), or a catalog entry name")],
    from_step: Annotated[
        int | None, typer.Option("--from", help="first training step of the window")
    ] = None,
    to_step: Annotated[
        int | None, typer.Option("--to", help="last training step of the window")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="fit folder (default: STORE's sibling NAME.fit)")
    ] = None,
    paper_filters: Annotated[
        bool, typer.Option(help="headline figures after the authors' filters")
    ] = False,
    full: Annotated[bool, typer.Option(help="refit from scratch even if up to date")] = False,
    null_elements: Annotated[
        bool, typer.Option(help="also write each element's null R² (4 more bytes an element; "
                                "the null's histograms are written either way)")
    ] = False,
    backend: Annotated[
        BackendName,  # type: ignore[valid-type]
        typer.Option(help="fused kernel backend: numba (CPU, one thread per task), "
                          "numba-threads, torch (CUDA if present), torch-cpu")
    ] = BackendName(engine.DEFAULT_BACKEND),
    executor: Annotated[
        ExecutorName,  # type: ignore[valid-type]
        typer.Option(help="where tasks run: dask (the --cluster), serial (this process, in "
                          "order: for debugging), dask-gpu (workers with a GPU resource)")
    ] = ExecutorName("dask"),
    bins: Annotated[int, typer.Option(help="R² histogram bins on [0, 1]")] = 100,
    block_mb: Annotated[
        float, typer.Option(help="checkpoint MB per step per task, read and fitted in pieces "
                                 "of at most 4 MB (memory ~50x the piece)")
    ] = 16.0,
    device: Annotated[
        FitDevice,  # type: ignore[valid-type]
        typer.Option(help="cpu, or cuda: the torch backend on GPU workers (without --cluster, "
                          "dask-cuda's LocalCUDACluster: one worker per GPU)")
    ] = FitDevice("cpu"),
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    catalog: CatalogOpt = None,
    scheduler: Scheduler = None,
) -> None:
    """Fit slope, intercept and R² of every weight element against step (incremental)."""
    backend_name, scheduler = engine.device_plan(device.value, backend.value, scheduler)
    from pipeline.catalog import resolve
    from pipeline.fit.histograms import print_headline
    from pipeline.fit.job import fit_store
    from pipeline.fit.results import fit_dir_for

    block_bytes = block_size(block_mb)
    target = resolve(store, catalog)
    store_path = target.store
    out = out or target.output("fit")
    writing(out or fit_dir_for(store_path))
    quiet_dask_workers()
    rep = fit_store(store_path, out, start=from_step, stop=to_step, scheduler=scheduler,
                    n_bins=bins, block_bytes=block_bytes, full=full, null_elements=null_elements,
                    progress=progress, backend=backend_name, executor=executor.value)
    print_headline(rep.histograms["paper" if paper_filters else "moving"])
    how = ("up to date" if not rep.new_steps else "fitted from scratch")
    typer.echo(f"fit {rep.fit_dir}: {how}; {len(rep.steps)} steps "
               f"{rep.steps[0]}..{rep.steps[-1]}, {rep.tasks} tasks, "
               f"{rep.bytes_read / 1e6:.1f} MB read in {rep.seconds:.1f} s")


@app.command("report")
@user_errors
def report_cmd(
    store: Annotated[str, typer.Argument(help="run store (zarr), or a catalog entry name")],
    out: Annotated[Path | None, typer.Option(help="report folder (default: FIT/report)")] = None,
    fit: Annotated[Path | None, typer.Option(help="fit folder (default: STORE's fit)")] = None,
    paper_filters: Annotated[
        bool, typer.Option(help="plot the elements kept by the authors' filters")
    ] = False,
    samples: Annotated[int, typer.Option(help="element trajectories to plot")] = 6,
    backtest: Annotated[
        bool, typer.Option(help="also backtest extrapolation (hold out the later half)")
    ] = True,
    catalog: CatalogOpt = None,
) -> None:
    """Write a self-contained HTML report (histograms, null, heatmap, trajectories, backtest)."""
    from pipeline.analyze import write_run_report
    from pipeline.catalog import resolve
    from pipeline.fit.results import fit_dir_for

    check_int(samples, "--samples", 0)
    target = resolve(store, catalog)
    store_path = target.store
    fit_dir = fit or target.output("fit") or fit_dir_for(store_path)
    out = out or fit_dir / "report"
    writing(out)
    page = write_run_report(store_path, fit_dir, out, target.outputs, backtest=backtest,
                            paper_filters=paper_filters, n_samples=samples, progress=True)
    typer.echo(f"report: {page}")


@app.command("extrapolate")
@user_errors
def extrapolate_cmd(
    source: Annotated[
        str | None, typer.Argument(help="run store, run directory, or catalog entry name")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="output model folder (must not exist)")] = None,
    to: Annotated[float | None, typer.Option(help="target training step")] = None,
    method: Annotated[
        MethodName,  # type: ignore[valid-type]
        typer.Option(help=METHOD_HELP),
    ] = MethodName(registry.DEFAULT_METHOD),
    alpha: Annotated[
        float | None, typer.Option(help=f"{PAIR}: Eq. 2's alpha instead of --to")
    ] = None,
    steps: Annotated[
        tuple[int, int] | None,
        typer.Option(help=f"{PAIR}: the two stored steps T0 T1; {WINDOW}: a range, "
                     "every stored step with T0 <= step <= T1 (T0 and T1 need not be stored; "
                     "default: first and last / all)"),
    ] = None,
    window: Annotated[
        int | None, typer.Option(help=f"{WINDOW}: use only the last N stored steps")
    ] = None,
    r2_min: Annotated[
        float | None, typer.Option(help=f"{GATED}: line where R² >= this, else last checkpoint")
    ] = None,
    from_checkpoints: Annotated[
        tuple[Path, Path] | None, typer.Option(help="two checkpoint folders DIR0 DIR1")
    ] = None,
    source_steps: Annotated[
        tuple[int, int] | None,
        typer.Option(help="steps of --from-checkpoints (default: parsed from folder names)"),
    ] = None,
    include: Annotated[
        list[str] | None, typer.Option(help="tensors that move (glob, or re:REGEX); repeatable")
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option(help="tensors copied from the newest step (default: norms); repeatable, "
                     "replaces the default; --exclude '' moves everything"),
    ] = None,
    dtype: Annotated[
        str | None, typer.Option(help="output dtype (default: the source's), e.g. float32")
    ] = None,
    max_shard_size: Annotated[
        str | None, typer.Option(help="shard the output, e.g. 5GB (default: one file)")
    ] = None,
    allow_interpolation: Annotated[
        bool, typer.Option(help="allow a target step inside the source range")
    ] = False,
    force: Annotated[bool, typer.Option(help="replace an existing output folder")] = False,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    catalog: CatalogOpt = None,
) -> None:
    """Extrapolate weights to a future step and export a model transformers loads as-is."""
    from pipeline.extrapolate.export import export, make_spec
    from pipeline.extrapolate.plan import DEFAULT_EXCLUDE
    from pipeline.extrapolate.sources import check_export_out, open_source

    if out is None:
        raise PipelineError("--out DIR is required")
    writing(out)
    src = open_source(source, from_checkpoints, source_steps, catalog)
    check_export_out(src, out)  # before "exists": --force must not be suggested for an input
    if out.exists() and not force:
        raise PipelineError("output exists (pass --force to overwrite)", out)
    m = registry.get(method.value)
    chosen = None if steps is None else m.steps_option(src.steps, *steps)
    spec = make_spec(src, m.name, to=to, alpha=alpha, steps=chosen, window=window,
                     r2_min=r2_min, include=include or ("*",),
                     exclude=DEFAULT_EXCLUDE if exclude is None else [e for e in exclude if e],
                     allow_interpolation=allow_interpolation)
    res = export(src, out, spec, dtype=dtype, max_shard_size=max_shard_size, force=force,
                 progress=progress)
    rows = [
        ("method", spec.method),
        ("source steps", ", ".join(map(str, spec.steps))),
        ("target step", f"{spec.target:g}"),
        ("alpha", "-" if spec.alpha is None else f"{spec.alpha:g}"),
        ("tensors extrapolated", str(len(res.moved))),
        ("tensors copied from step " + str(spec.steps[-1]), str(len(res.copied))),
        ("tensors dropped (tied)", str(len(res.dropped))),
        ("files", ", ".join(res.files) if len(res.files) <= 2
         else f"{len(res.files)} shards + model.safetensors.index.json"),
        ("bytes written", f"{res.bytes_written / 1e6:.1f} MB"),
        ("seconds", f"{res.seconds:.1f}"),
    ]
    from pipeline.console import print_table

    print_table(f"Model written to {res.out}", ["", "value"], rows)


@app.command("backtest")
@user_errors
def backtest_cmd(
    source: Annotated[str, typer.Argument(help="run store, run directory, or catalog name")],
    out: Annotated[
        Path | None, typer.Option(help="folder for backtest.csv and backtest.png")
    ] = None,
    holdout: Annotated[
        int | None, typer.Option(help="hold out the last N checkpoints (default: half)")
    ] = None,
    cutoff: Annotated[
        list[int] | None, typer.Option(help="last known step (repeatable; overrides --holdout)")
    ] = None,
    r2_min: Annotated[
        list[float] | None, typer.Option(help=f"{GATED} thresholds to try (default {SWEPT})")
    ] = None,
    window: Annotated[
        int | None, typer.Option(help=f"{WINDOW}: only the last N known steps")
    ] = None,
    method: Annotated[
        list[MethodName] | None,  # type: ignore[valid-type]
        typer.Option(help="methods to score (repeatable; default: all)"),
    ] = None,
    per_tensor: Annotated[bool, typer.Option(help="also print the per-tensor table")] = False,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    catalog: CatalogOpt = None,
) -> None:
    """Predict held-out later checkpoints from earlier ones; relative error per method."""
    from pipeline.catalog import resolve
    from pipeline.extrapolate.backtest import backtest_to_folder, plan_cases, print_backtest
    from pipeline.extrapolate.sources import open_source

    src = open_source(source, catalog=catalog)
    if out is None:
        out = resolve(source, catalog).output("backtest", "backtest")
    writing(out)
    cases = plan_cases(src.steps, cutoff, holdout, {"r2_min": r2_min} if r2_min else None,
                       window, [m.value for m in method] if method else None)
    res, csv_path, png_path = backtest_to_folder(src, out, cases, progress=progress)
    print_backtest(res, per_tensor)
    typer.echo(f"table: {csv_path}\nplot: {png_path}")


@app.command("alpha-sweep")
@user_errors
def alpha_sweep_cmd(
    run: Annotated[str, typer.Argument(help="tiny RLVR run directory, or catalog entry name")],
    t0: Annotated[int | None, typer.Option(help="first checkpoint (default: first)")] = None,
    t1: Annotated[int | None, typer.Option(help="second checkpoint (default: middle)")] = None,
    alpha: Annotated[
        list[float] | None,
        typer.Option(help="alphas (repeatable; default: every later real checkpoint)"),
    ] = None,
    method: Annotated[
        list[MethodName] | None,  # type: ignore[valid-type]
        typer.Option(help=f"methods to sweep (repeatable; default: {registry.DEFAULT_METHOD})"),
    ] = None,
    r2_min: Annotated[float, typer.Option(help=f"{GATED}: R² threshold")] = 0.8,
    csv_out: Annotated[Path | None, typer.Option("--csv", help="also write a CSV")] = None,
    catalog: CatalogOpt = None,
) -> None:
    """Held-out accuracy of extrapolated models vs alpha, next to the real checkpoints."""
    import csv

    from pipeline.catalog import resolve
    from pipeline.console import print_table
    from pipeline.extrapolate.alpha_sweep import alpha_sweep, rows_as_dicts

    run_dir = resolve(run, catalog).checkpoints
    methods = [m.value for m in method] if method else [registry.DEFAULT_METHOD]
    if csv_out is not None:
        from pipeline.extrapolate.sources import CheckpointSource

        writing(csv_out)
        check_output(csv_out, CheckpointSource.from_run_dir(run_dir).input_paths(),
                     option="--csv")
    rows = alpha_sweep(run_dir, t0, t1, alpha, methods, {"r2_min": r2_min})
    print_table(
        f"Alpha sweep on {run_dir} (greedy held-out accuracy)",
        ["method", "t0", "t1", "alpha", "target step", "extrapolated", "real at target",
         "real at t1"],
        [[r.method, r.t0, r.t1, r.alpha, f"{r.target:g}", r.accuracy,
          "-" if r.real_accuracy is None else r.real_accuracy, r.t1_accuracy] for r in rows],
    )
    if csv_out is not None:
        dicts = rows_as_dicts(rows)
        csv_out.parent.mkdir(parents=True, exist_ok=True)
        with csv_out.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(dicts[0]))
            w.writeheader()
            w.writerows(dicts)
        typer.echo(f"table: {csv_out}")


@app.command("generate")
@user_errors
def generate_cmd(
    late: Annotated[Path, typer.Option(help="the later checkpoint (alone: its own decoding)")],
    prompts: Annotated[Path, typer.Option(help="prompts JSONL: {\"prompt\": ..., "
                                          "\"answer\"?: ..., \"id\"?: ...} per line")],
    out: Annotated[Path, typer.Option(help="completions JSONL to write (atomically)")],
    early: Annotated[
        Path | None, typer.Option(help="the earlier checkpoint: decode from the extrapolated "
                                  "logits z_early + alpha (z_late - z_early)")
    ] = None,
    alpha: Annotated[float | None, typer.Option(help="the extrapolation factor")] = None,
    steps: Annotated[
        tuple[float, float] | None,
        typer.Option(help="training steps A B of --early and --late (with --to)"),
    ] = None,
    to: Annotated[
        float | None, typer.Option(help="target step t: alpha = (t - A) / (B - A)")
    ] = None,
    allow_negative: AllowNegativeOpt = False,
    k: Annotated[int, typer.Option("-k", help="completions per prompt")] = 1,
    temperature: TemperatureOpt = 0.6,
    top_p: TopPOpt = 0.95,
    top_k: TopKOpt = 0,
    max_new_tokens: int = 256,
    seed: SeedOpt = 0,
    stop: StopOpt = None,
    batch_size: BatchOpt = 32,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    progress: ProgressOpt = True,
) -> None:
    """Sample completions with one checkpoint, or with two by logits extrapolation (Eq. 1)."""
    from pipeline.console import print_table
    from pipeline.outputs.generate import generate_file, pair_alpha
    from pipeline.outputs.sampling import Sampling

    writing(out)
    if early is None:
        if alpha is not None or steps is not None or to is not None:
            raise PipelineError("--alpha, --steps and --to need --early (two checkpoints)")
        a = 1.0
    else:
        for v in steps or ():
            check_number(v, "--steps")
        a, _ = pair_alpha(*(steps or (None, None)), alpha, to, allow_negative)
    sampling = Sampling(temperature=temperature, top_p=top_p, top_k=top_k,
                        max_new_tokens=max_new_tokens, seed=seed, stop=tuple(stop or ()))
    ckpts = [late] if early is None else [early, late]
    rep = generate_file(ckpts, prompts, out, k, sampling, a, batch_size, device, dtype,
                        progress=progress)
    print_table(f"Completions written to {rep.out}", ["", "value"], [
        ("models", " -> ".join(str(c) for c in ckpts)),
        ("alpha", f"{a:g}" if early is not None else "-"),
        ("completions", rep.completions),
        ("finished by eos / stop / length",
         " / ".join(str(rep.finish[f]) for f in ("eos", "stop", "length"))),
        ("new tokens", rep.new_tokens),
        ("tokens/s", f"{rep.new_tokens / max(rep.seconds, 1e-9):.1f}"),
        ("seconds", f"{rep.seconds:.2f}"),
    ])


@app.command("probes")
@user_errors
def probes_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="checkpoint folder to sample from")],
    prompts: Annotated[Path, typer.Option(help="prompts JSONL ({\"prompt\": ...} per line)")],
    out: Annotated[Path, typer.Option(help="probes JSONL to write (atomically)")],
    k: Annotated[int, typer.Option("-k", help="responses per prompt")] = 4,
    temperature: TemperatureOpt = 0.6,
    top_p: TopPOpt = 0.95,
    top_k: TopKOpt = 0,
    max_new_tokens: int = 256,
    seed: SeedOpt = 0,
    batch_size: BatchOpt = 32,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    progress: ProgressOpt = True,
) -> None:
    """Sample fixed responses (probes) from one checkpoint, to teacher-force through others."""
    from pipeline.console import print_table
    from pipeline.outputs.probes import probes_file
    from pipeline.outputs.sampling import Sampling

    writing(out)
    sampling = Sampling(temperature=temperature, top_p=top_p, top_k=top_k,
                        max_new_tokens=max_new_tokens, seed=seed)
    rep = probes_file(checkpoint, prompts, out, k, sampling, batch_size, device, dtype,
                      progress=progress)
    print_table(f"Probes written to {rep.out}", ["", "value"], [
        ("checkpoint", str(checkpoint)),
        ("probes", rep.completions),
        ("finished by eos / length", f"{rep.finish['eos']} / {rep.finish['length']}"),
        ("response tokens", rep.new_tokens),
        ("seconds", f"{rep.seconds:.2f}"),
    ])


def _eval_tasks_help() -> str:
    from pipeline.evaluation.tasks import tasks_help  # the task registry names the choices

    return tasks_help()


@app.command("eval")
@user_errors
def eval_cmd(
    models: Annotated[
        list[str],
        typer.Argument(help="a model folder (checkpoint or exported) or RUN@STEP (run directory "
                       "or catalog name at a step); two of them, early then late, decode by "
                       "logits extrapolation (with --alpha or --to)"),
    ],
    task: Annotated[
        str, typer.Option(help="what to evaluate on: " + _eval_tasks_help())
    ] = "heldout",
    k: Annotated[int, typer.Option("-k", "--k", help="samples per problem")] = 1,
    out: Annotated[
        Path | None,
        typer.Option(help="results folder (settings.json, samples.jsonl, metrics.json); "
                     "a re-run with the same settings resumes"),
    ] = None,
    alpha: Annotated[
        float | None, typer.Option(help="pair: z = z_early + alpha (z_late - z_early)")
    ] = None,
    to: Annotated[
        float | None, typer.Option(help="pair: target step (alpha from the two models' steps)")
    ] = None,
    steps: Annotated[
        tuple[int, int] | None,
        typer.Option(help="pair: training steps A B of the two models (default: from RUN@STEP "
                     "or the folder names)"),
    ] = None,
    allow_negative: AllowNegativeOpt = False,
    temperature: TemperatureOpt = 0.6,
    top_p: TopPOpt = 0.95,
    top_k: TopKOpt = 0,
    max_new_tokens: Annotated[
        int | None, typer.Option(help="generation budget (default: the task's)")
    ] = None,
    stop: StopOpt = None,
    seed: SeedOpt = 0,
    n: Annotated[int | None, typer.Option("--n", help="only the first N problems")] = None,
    batch_size: BatchOpt = 32,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    progress: ProgressOpt = True,
    catalog: CatalogOpt = None,
) -> None:
    """avg@k and pass@k (bootstrap 95% CIs) of a checkpoint, an exported model or a logits pair."""
    from pipeline.evaluation import runner
    from pipeline.evaluation.tasks import get_task
    from pipeline.outputs.models import torch_dtype
    from pipeline.outputs.sampling import Sampling, check_sampling

    check_int(k, "-k", 1)
    if n is not None:
        check_int(n, "--n", 1)
    torch_dtype(dtype)
    refs = runner.with_steps([runner.resolve_model(m, catalog) for m in models], steps)
    a, target = runner.pair_alpha(refs, alpha, to, allow_negative)
    the_task = get_task(task, [r.path for r in refs], catalog).head(n)
    sampling = check_sampling(Sampling(
        temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=tuple(stop or ()),
        max_new_tokens=the_task.max_new_tokens if max_new_tokens is None else max_new_tokens))
    if out is not None:
        writing(out)
        check_output(out, [("a model folder", r.path) for r in refs], writes=runner.WRITES)
    res = runner.evaluate(refs, the_task, k, sampling, alpha=a, target=target, out=out,
                          device=device, dtype=dtype, batch_size=batch_size, progress=progress)
    runner.print_result(res)


class LogprobDevice(enum.StrEnum):
    cpu = "cpu"
    cuda = "cuda"


def _dtype_names() -> enum.EnumMeta:
    from pipeline.outputs.models import DTYPES

    return enum.Enum("LogprobDtype", {n: n for n in DTYPES})  # type: ignore[return-value]


LogprobDtype = _dtype_names()  # --dtype's choices: the model loader's dtypes


@app.command("logprobs")
@user_errors
def logprobs_cmd(
    run: Annotated[str, typer.Argument(help="run directory (global_step_N/), or catalog name")],
    probes: Annotated[Path, typer.Option(help="probes JSONL (prompt_ids, response_ids)")],
    out: Annotated[
        Path | None, typer.Option(help="log-prob store (default: RUN.logprobs.zarr beside RUN)")
    ] = None,
    fit_out: Annotated[
        Path | None, typer.Option(help="token fit folder (default: the store's NAME.fit)")
    ] = None,
    report: Annotated[
        Path | None, typer.Option(help="also write the token panels (PNG) into this folder")
    ] = None,
    device: Annotated[LogprobDevice, typer.Option(help="where the models run")
                      ] = LogprobDevice.cpu,
    dtype: Annotated[
        LogprobDtype,  # type: ignore[valid-type]
        typer.Option(help="model dtype: auto (the checkpoint's), float32, bfloat16, float16")
    ] = LogprobDtype("auto"),
    batch_tokens: Annotated[
        int, typer.Option(help="padded tokens per forward batch")
    ] = 8192,
    vocab_chunk: Annotated[
        int, typer.Option(help="vocabulary rows per LM-head chunk (memory: tokens x chunk)")
    ] = 8192,
    min_change: Annotated[
        float, typer.Option(help="the authors' filter: keep tokens with |logp(last) - "
                                 "logp(first)| above this")
    ] = 0.2,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    catalog: CatalogOpt = None,
) -> None:
    """Teacher-force fixed probes through every checkpoint; fit token log-prob vs step."""
    from pipeline.catalog import resolve
    from pipeline.fit.results import fit_dir_for
    from pipeline.outputs.logprob_store import compute_logprobs, default_store
    from pipeline.outputs.token_fit import fit_tokens, print_summary

    check_number(min_change, "--min-change", 0.0)
    target = resolve(run, catalog)
    run_dir = target.checkpoints
    store = out or target.output("logprobs.zarr") or default_store(run_dir)
    writing(store)
    rep = compute_logprobs(run_dir, probes, store, device=device.value, dtype=dtype.value,
                           batch_tokens=batch_tokens, vocab_chunk=vocab_chunk,
                           step_pattern=target.step_pattern, progress=progress)
    rate = f", {rep.n_tokens * len(rep.new_steps) / rep.seconds:,.0f} tokens/s" if (
        rep.new_steps and rep.seconds > 0) else ""
    typer.echo(f"log-probs {rep.store}: {rep.n_tokens} tokens x {len(rep.steps)} checkpoints "
               f"({len(rep.new_steps)} new{rate})")
    if len(rep.steps) < 2:
        typer.echo("one checkpoint so far: no fit yet")
        return
    fit_dir = fit_out or target.output("logprobs.fit") or fit_dir_for(store)
    writing(fit_dir)
    fit = fit_tokens(store, fit_dir, min_change=min_change, progress=progress)
    print_summary(fit)
    typer.echo(f"token fit {fit.fit_dir} (token_summary.json, tokens.csv)")
    if report is not None:
        from pipeline.report.tokens import write_token_panels

        writing(report)
        check_output(report, [("the log-prob store", store), ("the run folder", run_dir)],
                     option="--report")
        for title, path in write_token_panels(store, fit, report):
            typer.echo(f"{title}: {path}")


@app.command("rl-extra")
@user_errors
def rl_extra_cmd(
    trainer_cmd: Annotated[str, typer.Option(
        help="command for one cycle (run by the shell); placeholders {init} (model to train "
             "from), {out} (empty folder for its checkpoints), {m}, {cycle}, {start_step}, "
             "{nominal_step}")],
    m: Annotated[int, typer.Option("-m", help="real RL steps per cycle")],
    n: Annotated[int, typer.Option("-n", help="extra (free) steps per jump")],
    cycles: Annotated[int, typer.Option(help="cycles in all (a re-run resumes)")],
    init: Annotated[Path, typer.Option(help="model folder the first cycle trains from")],
    out: Annotated[Path, typer.Option(help="run folder (ledger, cycles/, run/)")],
    checkpoint_glob: Annotated[str, typer.Option(
        help="the command's checkpoint under {out}; {m}, {cycle}, {start_step} filled; "
             "verl's actor/huggingface/ inside is found")] = "global_step_{m}",
    include: Annotated[
        list[str] | None, typer.Option(help="tensors that jump (glob, or re:REGEX); repeatable")
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option(help="tensors kept at their trained values (default: norms); repeatable, "
                     "replaces the default; --exclude '' jumps everything"),
    ] = None,
    dtype: Annotated[
        str | None, typer.Option(help="dtype of the jumped models (default: the trainer's)")
    ] = None,
) -> None:
    """RL-Extra (Eq. 3) around an external trainer: m real steps, jump n, repeat; resumable."""
    from pipeline.extrapolate.plan import DEFAULT_EXCLUDE
    from pipeline.rl.extra_loop import run_rl_extra

    writing(out)
    res = run_rl_extra(trainer_cmd, m, n, cycles, init, out,
                       checkpoint_glob=checkpoint_glob, include=include or ("*",),
                       exclude=DEFAULT_EXCLUDE if exclude is None else [e for e in exclude if e],
                       dtype=dtype, log=lambda msg: typer.echo(msg, err=True))
    from pipeline.console import print_table

    print_table(f"RL-Extra run in {res.out} (m={m}, n={n})",
                ["cycle", "real step", "nominal step", "model", "seconds"],
                [[c.cycle, c.real_step, c.nominal_step, c.model,
                  "(earlier run)" if c.cycle not in res.ran else c.seconds]
                 for c in res.cycles])
    typer.echo(f"last model: {res.last_model}")


def _k8s_default(option: str) -> Any:
    """A ``KubernetesOptions`` default, so --help shows the value the manifests get."""
    from pipeline.compute.kubernetes import KubernetesOptions

    return getattr(KubernetesOptions(), option)


@app.command("k8s-manifests")
@user_errors
def k8s_manifests_cmd(
    name: Annotated[str, typer.Argument(help="catalog entry the job analyzes")],
    out: Annotated[Path, typer.Option(help="folder for daskcluster.yaml and daskjob.yaml")],
    image: Annotated[str, typer.Option(help="image of every pod (workflows/k8s/Dockerfile)")]
    = _k8s_default("image"),
    namespace: Annotated[str | None, typer.Option(
        help="namespace of the resources (default: kubectl's current one)")] = None,
    workers: Annotated[int, typer.Option(help="Dask worker pods")] = _k8s_default("workers"),
    worker_memory: Annotated[str, typer.Option(
        help="memory of each worker pod (Kubernetes quantity: 4Gi, 512Mi, 4G); also its "
             "dask worker --memory-limit")] = _k8s_default("worker_memory"),
    worker_cpu: Annotated[str, typer.Option(
        help="CPU of each worker pod (1, 2, 500m); its whole cores are the worker's threads")]
    = _k8s_default("worker_cpu"),
    scheduler_memory: Annotated[str, typer.Option(help="memory of the scheduler pod")]
    = _k8s_default("scheduler_memory"),
    job_memory: Annotated[str, typer.Option(help="memory of the job runner pod")]
    = _k8s_default("job_memory"),
    pvc: Annotated[str | None, typer.Option(
        help="PersistentVolumeClaim (ReadWriteMany) holding the catalog, runs and outputs "
             f"(default: {_k8s_default('pvc')}, unless --host-path)")] = None,
    host_path: Annotated[str | None, typer.Option(
        help="instead of --pvc: a folder on the node (single-node kind or minikube)")] = None,
    mount_path: Annotated[str, typer.Option(help="where the data volume is mounted in pods")]
    = _k8s_default("mount_path"),
    pod_catalog: Annotated[str | None, typer.Option(
        help="the catalog file inside the pods (default: MOUNT_PATH/data_catalog.yaml)")]
    = None,
    env: Annotated[list[str] | None, typer.Option(
        help="KEY=VALUE for every container (repeatable)")] = None,
    catalog: CatalogOpt = None,
) -> None:
    """Write the dask-kubernetes operator's DaskCluster and DaskJob for a catalog entry."""
    from pipeline.catalog import resolve
    from pipeline.compute.kubernetes import (
        KubernetesOptions,
        describe,
        parse_env,
        write_manifests,
    )
    from pipeline.console import print_table

    writing(out)
    if resolve(name, catalog).entry is None:
        raise PipelineError(f"{name!r} is a path, not a catalog entry name: the job finds its "
                            "run through the catalog on the data volume")
    opts = KubernetesOptions(
        image=image, namespace=namespace, workers=workers, worker_memory=worker_memory,
        worker_cpu=worker_cpu, scheduler_memory=scheduler_memory, job_memory=job_memory,
        pvc=pvc if pvc is not None or host_path is not None else _k8s_default("pvc"),
        host_path=host_path, mount_path=mount_path, catalog=pod_catalog,
        env=parse_env(env or []))
    written = write_manifests(name, opts, out)
    print_table(f"Kubernetes manifests for {name} in {out}", ["file", "resource", "starts"],
                [[p.name, f"{m['kind']}/{m['metadata']['name']}", describe(m)]
                 for p, m in written])
    typer.echo(f"kubectl apply -f {written[-1][0]}  (see docs/kubernetes.md)")

@app.command("analyze")
@user_errors
def analyze_cmd(
    run: Annotated[str, typer.Argument(help="catalog entry name, or a run directory")],
    store: Annotated[
        Path | None, typer.Option(help="zarr store (default: the catalog's, or RUN.zarr)")
    ] = None,
    outputs: Annotated[
        Path | None,
        typer.Option(help="fit, report and exports (default: the catalog's, or RUN.analysis)"),
    ] = None,
    method: Annotated[
        MethodName,  # type: ignore[valid-type]
        typer.Option(help="extrapolation method to export: " + METHOD_HELP),
    ] = MethodName(registry.DEFAULT_METHOD),
    progress: ProgressOpt = False,
    catalog: CatalogOpt = None,
    scheduler: Scheduler = None,
) -> None:
    """Ingest, fit, report and extrapolate a run on one cluster; re-running redoes only what
    changed."""
    from pipeline.analyze import analysis_paths, analyze, print_summary

    writing(analysis_paths(run, catalog, store, outputs).outputs)
    quiet_dask_workers()
    stages = analyze(run, scheduler, catalog, store=store, outputs=outputs,
                     method=method.value, progress=progress,
                     log=lambda m: typer.echo(m, err=True))
    print_summary(stages, f"Analysis of {run}")

def main() -> None:  # pragma: no cover - console entry point
    app(prog_name="rlvr-lin")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
