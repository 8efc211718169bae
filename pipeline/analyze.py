"""``analyze``: one analysis workflow for every cluster (ingest, fit, report, extrapolate).

The same library calls the ``ingest``, ``fit``, ``report`` and ``extrapolate``
commands make, in order, on one Dask client opened once from ``--cluster``
(a LocalCluster, a scheduler, a scheduler file, SLURM jobs, ...): ingest and
fit spread their tasks over its workers; report and export are submitted to
it as one task each, so on SLURM they too run in a worker job, not on the
login node. Every stage skips what is done (ingest resumes, a current fit is
reused, a report newer than its fit and an export of the same spec are
kept), so re-running after new checkpoints land redoes only what they change.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError

REPORT_PAGE = "index.html"  # what write_report writes into its folder


@dataclass(frozen=True)
class AnalysisPaths:
    """Where one analysis reads and writes: a catalog entry's folders, or folders beside a run."""

    checkpoints: Path
    store: Path
    outputs: Path
    step_pattern: str | None = None

    @property
    def fit_dir(self) -> Path:
        return self.outputs / "fit"

    @property
    def report_dir(self) -> Path:
        return self.outputs / "report"


def analysis_paths(target: str | Path, catalog: str | Path | None = None,
                   store: str | Path | None = None,
                   outputs: str | Path | None = None) -> AnalysisPaths:
    """A catalog entry's checkpoints, store and outputs, or for a run folder RUN: RUN.zarr and
    RUN.analysis beside it (``store``/``outputs`` override either)."""
    from pipeline.catalog import resolve

    t = resolve(str(target), catalog)
    if t.entry is None and not t.path.is_dir():
        raise PipelineError("not a run folder or a catalog entry", t.path)
    run = t.checkpoints
    default_store = t.store if t.entry else run.parent / f"{run.name}.zarr"
    default_out = t.outputs or run.parent / f"{run.name}.analysis"
    return AnalysisPaths(run, Path(store or default_store), Path(outputs or default_out),
                         t.step_pattern)


@dataclass(frozen=True)
class StageResult:
    """One row of the summary: what a stage did and how long it took."""

    stage: str
    did: str
    seconds: float


def write_run_report(store: str | Path, fit_dir: str | Path, out: str | Path,
                     outputs: str | Path | None = None, *, backtest: bool = True,
                     paper_filters: bool = False, n_samples: int = 6,
                     progress: bool = False) -> Path:
    """The ``report`` command's page: fit figures, the backtest, and token panels if any.

    ``outputs`` is the run's outputs folder: a token fit there (from
    ``logprobs``) adds its panels.
    """
    from pipeline.fit.results import FitResult
    from pipeline.report.html import check_report_out, write_report

    FitResult(fit_dir)  # no fit, no report: fail before the backtest writes anything
    check_report_out(store, fit_dir, out)
    extra: list[tuple[str, Path]] = []
    if backtest:
        from pipeline.extrapolate.backtest import backtest_to_folder
        from pipeline.extrapolate.sources import StoreSource

        _, _, png = backtest_to_folder(StoreSource(store), out, progress=progress)
        extra.append(("Backtest: predicted vs real weights", png))
    tokens_store = Path(outputs) / "logprobs.zarr" if outputs is not None else None
    if tokens_store is not None and tokens_store.is_dir():
        from pipeline.outputs.token_fit import open_token_fit
        from pipeline.report.tokens import write_token_panels

        tokens = open_token_fit(tokens_store, tokens_store.parent / "logprobs.fit")
        if tokens is not None:
            extra += write_token_panels(tokens_store, tokens, out)
    extra += experiment_panels(outputs)
    return write_report(store, fit_dir, out, paper_filters=paper_filters,
                        n_samples=n_samples, extra_images=extra)


def experiment_panels(outputs: str | Path | None) -> list[tuple[str, Path]]:
    """The RL-Extra experiment's plot, if ``workflows/rl_extra_experiment.py`` wrote one into
    this entry's outputs (its default for the embedded entry)."""
    png = Path(outputs) / "rl_extra_experiment" / "accuracy.png" if outputs else None
    if png is None or not png.is_file():
        return []
    return [("RL-Extra vs GRPO: held-out accuracy against real RL steps", png)]


def default_target(steps: list[int]) -> int:
    """The demo's target: a fifth of the run beyond its last checkpoint."""
    return steps[-1] + max(1, (steps[-1] - steps[0]) // 5)


def export_default(store: str | Path, checkpoints: str | Path, outputs: str | Path,
                   method: str | None = None, to: float | None = None) -> tuple[Path, bool]:
    """Export ``method`` (default: the registry's default) at ``to`` (default: ``default_target``).

    Returns (model folder, whether it was written now): a folder whose
    provenance records the same spec and source is kept as it is.
    """
    from pipeline.extrapolate import methods
    from pipeline.extrapolate.export import PROVENANCE_FILE, export, make_spec
    from pipeline.extrapolate.sources import StoreSource

    source = StoreSource(store, checkpoints)
    m = methods.get(method or methods.DEFAULT_METHOD)
    target = to if to is not None else default_target(list(source.steps))
    spec = make_spec(source, m.name, to=target, **m.typical_params())
    out = Path(outputs) / f"extrapolated-{m.name}-step{spec.target:g}"
    try:
        done = json.loads((out / PROVENANCE_FILE).read_text())
    except (OSError, ValueError):
        done = None
    if done is not None:
        same = {**asdict(spec), "params": spec.param_values}
        if all(json.loads(json.dumps(v)) == done.get(k) for k, v in same.items()):
            return out, False
    export(source, out, spec, force=True, progress=False)
    return out, True


def _report_is_current(paths: AnalysisPaths) -> bool:
    """A report page written after the fit last completed (the fit marks completion last)."""
    from pipeline.fit.results import ELEMENTS, read_meta

    page = paths.report_dir / REPORT_PAGE
    marker = paths.fit_dir / ELEMENTS / "zarr.json"  # where the fit's metadata lives
    if not page.exists() or not (read_meta(paths.fit_dir) or {}).get("complete"):
        return False
    return page.stat().st_mtime >= marker.stat().st_mtime


def analyze(target: str | Path, cluster: str | None = None, catalog: str | Path | None = None,
            *, store: str | Path | None = None, outputs: str | Path | None = None,
            method: str | None = None, progress: bool = False,
            log: Callable[[str], None] = lambda _m: None) -> list[StageResult]:
    """Ingest, fit, report and extrapolate ``target`` (a catalog name or a run folder).

    One client for the whole workflow, from ``cluster`` (see
    ``pipeline.compute.cluster_spec``). Returns one ``StageResult`` per stage.
    """
    from pipeline.compute.clusters import dask_client
    from pipeline.fit.job import fit_store
    from pipeline.store.ingest import ingest

    paths = analysis_paths(target, catalog, store, outputs)
    stages: list[StageResult] = []

    def timed(stage: str, fn: Callable[[], str]) -> None:
        t0 = time.perf_counter()
        log(f"{stage} ...")
        stages.append(StageResult(stage, fn(), time.perf_counter() - t0))

    def do_ingest(client: Any) -> str:
        rep = ingest(paths.checkpoints, paths.store, step_pattern=paths.step_pattern,
                     client=client, progress=progress)
        return (f"{len(rep.ingested)} steps ingested, {len(rep.skipped)} kept; "
                f"{len(rep.steps)} in {paths.store}")

    def do_fit(client: Any) -> str:
        rep = fit_store(paths.store, paths.fit_dir, client=client, progress=progress)
        how = "up to date" if not rep.new_steps else f"fitted {len(rep.steps)} steps"
        return f"{how}, {rep.tasks} tasks, {rep.bytes_read / 1e6:.1f} MB read; {rep.fit_dir}"

    def do_report(client: Any) -> str:
        if _report_is_current(paths):
            return f"up to date; {paths.report_dir / REPORT_PAGE}"
        page = client.submit(write_run_report, paths.store, paths.fit_dir, paths.report_dir,
                             paths.outputs, pure=False).result()
        return f"written: {page}"

    def do_extrapolate(client: Any) -> str:
        out, wrote = client.submit(export_default, paths.store, paths.checkpoints,
                                   paths.outputs, method, pure=False).result()
        return f"{'exported' if wrote else 'up to date'}: {out}"

    with dask_client(cluster) as client:
        for name, fn in (("ingest", do_ingest), ("fit", do_fit), ("report", do_report),
                         ("extrapolate", do_extrapolate)):
            timed(name, lambda fn=fn: fn(client))
    return stages


def print_summary(stages: list[StageResult], title: str = "Analysis") -> None:
    """The stages as a table: what each did, in how many seconds."""
    from pipeline.console import print_table

    print_table(title, ["stage", "what it did", "seconds"],
                [(s.stage, s.did, round(s.seconds, 1)) for s in stages])
