"""The README's main command: the whole pipeline, end to end, on a catalog run.

Each stage joins here as it lands, so a newcomer's first command always
exercises everything the project can do. Stages that already have their
outputs are skipped (ingest resumes, fit is incremental), so re-running is cheap.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.catalog import RunEntry, load_catalog
from pipeline.console import console, print_table
from pipeline.errors import PipelineError


def ensure_checkpoints(name: str, entry: RunEntry) -> Path:
    """Generate the run with the tiny RLVR workflow if its checkpoints are missing."""
    run_dir = entry.checkpoints
    if (run_dir / "metrics.json").exists() or _has_checkpoints(run_dir):
        return run_dir
    if entry.tiny_run is None:
        raise PipelineError(f"no checkpoints for catalog run {name!r} and no tiny_run recipe",
                            run_dir)
    from pipeline.rl.tiny_run import TinyRunConfig, make_tiny_run

    spec = entry.tiny_run.model_dump(exclude_none=True)
    cfg = TinyRunConfig(**spec)
    console.print(f"[bold]Generating[/] the tiny RLVR run {name!r} into {run_dir} "
                  f"(warm start + {cfg.rl_steps} GRPO steps)")
    tmp = run_dir.parent / f".{run_dir.name}.partial"
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    make_tiny_run(tmp, cfg, log=lambda m: console.print("  " + m))
    tmp.replace(run_dir)
    return run_dir


def _has_checkpoints(run_dir: Path) -> bool:
    return run_dir.is_dir() and any(run_dir.glob("*/config.json"))


def show_run(run_dir: Path) -> None:
    metrics_file = run_dir / "metrics.json"
    if not metrics_file.exists():
        return
    metrics = json.loads(metrics_file.read_text())
    acc = metrics.get("heldout_accuracy", {})
    rewards = {r["step"]: r["reward"] for r in metrics.get("reward", [])}
    rows = [(int(s), a, float(rewards.get(int(s), float("nan")))) for s, a in acc.items()]
    rows.sort()
    print_table(f"Checkpoints of {run_dir}", ["step", "held-out accuracy", "train reward"], rows)


def export_and_check(entry: RunEntry, run_dir: Path) -> None:
    """Extrapolate past the last checkpoint with every registered method, export, load, score.

    The target is a fifth of the run beyond its last checkpoint. Every model
    is written by the real export path and loaded with ``transformers``, so
    what is scored is what a user would get; the last real checkpoint is the
    bar to clear.
    """
    from pipeline.extrapolate import methods
    from pipeline.extrapolate.alpha_sweep import heldout_problems, score_folder
    from pipeline.extrapolate.export import export, make_spec
    from pipeline.extrapolate.sources import StoreSource

    source = StoreSource(entry.store, run_dir)
    steps = list(source.steps)
    target = steps[-1] + (steps[-1] - steps[0]) // 5
    problems = heldout_problems(run_dir)
    last = _checkpoint_folder(run_dir, steps[-1])
    rows: list[tuple[str, str, float]] = [
        (f"real checkpoint, step {steps[-1]}", str(last), score_folder(last, problems))]
    for m in methods.methods():  # window methods use every step, two-point the first and last
        out = entry.outputs / f"extrapolated-{m.name}-step{target}"
        spec = make_spec(source, m.name, to=target, **m.typical_params())
        res = export(source, out, spec, force=True, progress=False)
        label = m.summary + (f" ({m.label(spec.param_values)})" if m.params else "")
        rows.append((f"{label} -> step {target}", str(res.out), score_folder(res.out, problems)))
    print_table(f"Extrapolated models (loaded with transformers), target step {target}",
                ["model", "folder", "held-out greedy accuracy"], rows)


def _checkpoint_folder(run_dir: Path, step: int) -> Path:
    from pipeline.checkpoints import discover_checkpoints

    return next(c.path for c in discover_checkpoints(run_dir) if c.step == step)


def run_demo(name: str | None, catalog: Path | None, scheduler: str | None) -> None:
    import transformers

    from pipeline.compute import dask_client
    from pipeline.extrapolate.backtest import backtest_to_folder, print_backtest
    from pipeline.extrapolate.sources import StoreSource
    from pipeline.fit.histograms import print_headline
    from pipeline.fit.job import fit_store
    from pipeline.report.html import write_report
    from pipeline.store.ingest import ingest
    from pipeline.store.summary import print_ingest_report

    transformers.utils.logging.disable_progress_bar()
    cat = load_catalog(catalog)
    name = name or cat.default
    if name is None or name not in cat.runs:
        raise PipelineError(f"no catalog run named {name!r}")
    entry = cat.runs[name]
    console.rule(f"[bold]1. checkpoints of {name}")
    run_dir = ensure_checkpoints(name, entry)
    show_run(run_dir)
    with dask_client(scheduler) as client:
        console.rule("[bold]2. ingest into the step-indexed zarr store")
        print_ingest_report(ingest(run_dir, entry.store, step_pattern=entry.step_pattern,
                                   client=client))
        console.rule("[bold]3. fit every weight element against step")
        fit_dir = entry.outputs / "fit"
        rep = fit_store(entry.store, fit_dir, client=client)
        print_headline(rep.histograms["moving"])
    console.rule("[bold]4. backtest and report")
    report_dir = entry.outputs / "report"
    bt, _, backtest_png = backtest_to_folder(StoreSource(entry.store, run_dir), report_dir)
    print_backtest(bt)
    page = write_report(entry.store, fit_dir, report_dir,
                        extra_images=[("Backtest: predicted vs real weights", backtest_png)])
    console.print(f"report: {page}")
    console.rule("[bold]5. extrapolate, export, load")
    export_and_check(entry, run_dir)
