"""The README's main command: the whole pipeline, end to end, on a catalog run.

Each stage joins here as it lands, so a newcomer's first command always
exercises everything the project can do. Stages that already have their
outputs are skipped (ingest resumes, fit is incremental), so re-running is cheap.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.catalog import RunEntry, Target, resolve_entry
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


DEMO_PROBE_PROMPTS = 32  # held-out prompts whose sampled answers are teacher-forced
DEMO_EVAL = {"n": 64, "k": 4}  # the small evaluation of every model at the target step


def export_and_check(run: Target, run_dir: Path) -> None:
    """Extrapolate past the last checkpoint in weights and in logits, then evaluate them all.

    The target is a fifth of the run beyond its last checkpoint. Every weight
    method's model is written by the real export path and loaded with
    ``transformers``, so what is scored is what a user would get; logits
    extrapolation (Eq. 1) mixes the two checkpoints that give alpha 2 at the
    target, or the first and the last. The last real checkpoint is the bar
    to clear. All are evaluated alike: greedy held-out accuracy, and avg@k /
    pass@k of sampled answers (the paper's T = 0.6, top-p 0.95) with
    bootstrap intervals.
    """
    from pipeline.evaluation.runner import ModelRef, evaluate
    from pipeline.evaluation.tasks import get_task
    from pipeline.extrapolate import methods
    from pipeline.extrapolate.export import export, make_spec
    from pipeline.extrapolate.sources import StoreSource
    from pipeline.outputs.sampling import Sampling

    source = StoreSource(run.store, run_dir)
    steps = list(source.steps)
    target = steps[-1] + (steps[-1] - steps[0]) // 5
    last = _checkpoint_folder(run_dir, steps[-1])
    models: list[tuple[str, list[ModelRef]]] = [
        (f"real checkpoint, step {steps[-1]}", [ModelRef(last, steps[-1])])]
    for m in methods.methods():  # window methods use every step, two-point the first and last
        out = run.output(f"extrapolated-{m.name}-step{target}")
        spec = make_spec(source, m.name, to=target, **m.typical_params())
        res = export(source, out, spec, force=True, progress=False)
        label = m.summary + (f" ({m.label(spec.param_values)})" if m.params else "")
        models.append((f"{label} -> step {target}", [ModelRef(res.out)]))
    gap = target - steps[-1]
    early = steps[-1] - gap if steps[-1] - gap in steps else steps[0]
    pair = [ModelRef(_checkpoint_folder(run_dir, early), early), ModelRef(last, steps[-1])]
    alpha = (target - early) / (steps[-1] - early)
    models.append((f"logits extrapolation {early} -> {steps[-1]} (alpha {alpha:g}) "
                   f"-> step {target}", pair))
    heldout = get_task("heldout", [last])
    task = heldout.head(DEMO_EVAL["n"])
    greedy = Sampling(temperature=0.0, max_new_tokens=heldout.max_new_tokens)
    sampling = Sampling(temperature=0.6, top_p=0.95, max_new_tokens=task.max_new_tokens)
    k = DEMO_EVAL["k"]
    rows: list[tuple[str, float, str, str]] = []
    for label, refs in models:
        a = alpha if len(refs) == 2 else 1.0
        acc = evaluate(refs, heldout, 1, greedy, alpha=a, progress=False).summary.overall
        est = evaluate(refs, task, k, sampling, alpha=a, progress=False).summary.overall
        rows.append((label, acc["avg@1"].value, _ci(est[f"avg@{k}"]), _ci(est[f"pass@{k}"])))
    print_table(f"Weight and logits extrapolation to step {target}, next to the last checkpoint "
                f"(held-out: greedy on all {len(heldout.problems)}; sampled on "
                f"{len(task.problems)} x k={k}, T=0.6, top-p 0.95, 95% CIs)",
                ["model", "greedy accuracy", f"avg@{k}", f"pass@{k}"], rows)


def _ci(e: Any) -> str:
    return f"{e.value:.3f} [{e.low:.3f}, {e.high:.3f}]"


def token_logprobs(run: Target, run_dir: Path, report_dir: Path) -> list[tuple[str, Path]]:
    """The output space: probes sampled once, teacher-forced through every checkpoint, fitted.

    Probes are answers the last checkpoint samples for held-out prompts
    (sampled once and kept, so a re-run adds only new checkpoints' rows);
    every checkpoint's log-prob of each answer token goes into the log-prob
    store, and the same fit engine as the weights fits them against step.
    """
    from pipeline.evaluation.tasks import get_task
    from pipeline.outputs.logprob_store import compute_logprobs
    from pipeline.outputs.models import load_model
    from pipeline.outputs.probes import sample_probes
    from pipeline.outputs.records import Prompt, write_probes
    from pipeline.outputs.sampling import Sampling
    from pipeline.outputs.token_fit import fit_tokens, print_summary
    from pipeline.report.tokens import write_token_panels

    steps = [c.step for c in _checkpoints(run_dir)]
    last = _checkpoint_folder(run_dir, steps[-1])
    probes = run.output("probes.jsonl")
    if not probes.exists():
        task = get_task("heldout", [last]).head(DEMO_PROBE_PROMPTS)
        prompts = [Prompt(p.prompt, p.answer, p.id) for p in task.problems]
        sampling = Sampling(temperature=1.0, max_new_tokens=task.max_new_tokens, seed=0)
        write_probes(probes, list(sample_probes(load_model(last), prompts, 2, sampling)))
    store = run.output("logprobs.zarr")
    rep = compute_logprobs(run_dir, probes, store, step_pattern=run.step_pattern,
                           progress=False)
    console.print(f"log-probs of {rep.n_tokens} probe tokens x {len(rep.steps)} checkpoints "
                  f"({len(rep.new_steps)} new) in {store}")
    fit = fit_tokens(store, run.output("logprobs.fit"))
    print_summary(fit)
    return write_token_panels(store, fit, report_dir)


def _checkpoints(run_dir: Path) -> list:
    from pipeline.checkpoints import discover_checkpoints

    return discover_checkpoints(run_dir)


def _checkpoint_folder(run_dir: Path, step: int) -> Path:
    return next(c.path for c in _checkpoints(run_dir) if c.step == step)


def show_alarms(store: Path, outputs: Path) -> None:
    """The linearity alarm (``ingest --alarm-threshold``) over the stored steps, as a table."""
    from pipeline.extrapolate.alarm import alarm_new_steps, alarm_path, read_alarms

    path = alarm_path(store, outputs)
    alarm_new_steps(store, path)  # only steps not judged yet
    rows = [[str(r["step"]), str(r["known"]),
             "-" if r["rel_error"] is None else f"{float(r['rel_error']):.3f}", r["status"]]
            for r in read_alarms(path)]
    print_table(f"linearity alarm: each checkpoint forecast from the two before it ({path.name})",
                ["step", "from", "relative error", "verdict"], rows)
    console.print("relative error = ||forecast - real|| / ||real - previous||: 1 is no better "
                  "than 'no change'. A one-checkpoint forecast carries the noise of three "
                  "checkpoints, so a linear but noisy run sits near 1 (see docs/rl_extra.md).")


def run_demo(name: str | None, catalog: Path | None, scheduler: str | None) -> None:
    import transformers

    from pipeline.analyze import experiment_panels
    from pipeline.compute import dask_client
    from pipeline.extrapolate.backtest import backtest_to_folder, print_backtest
    from pipeline.extrapolate.sources import StoreSource
    from pipeline.fit.histograms import print_headline
    from pipeline.fit.job import fit_store
    from pipeline.report.html import write_report
    from pipeline.store.ingest import ingest
    from pipeline.store.summary import print_ingest_report

    transformers.utils.logging.disable_progress_bar()
    run = resolve_entry(name, catalog)
    name, entry = run.arg, run.entry
    console.rule(f"[bold]1. checkpoints of {name}")
    run_dir = ensure_checkpoints(name, entry)
    show_run(run_dir)
    with dask_client(scheduler) as client:
        console.rule("[bold]2. ingest into the step-indexed zarr store")
        print_ingest_report(ingest(run_dir, run.store, step_pattern=run.step_pattern,
                                   client=client))
        show_alarms(run.store, run.outputs)
        console.rule("[bold]3. fit every weight element against step")
        fit_dir = run.output("fit")
        rep = fit_store(run.store, fit_dir, client=client)
        print_headline(rep.histograms["moving"])
    console.rule("[bold]4. token log-probs: teacher-forced probes through every checkpoint")
    report_dir = run.output("report")
    token_panels = token_logprobs(run, run_dir, report_dir)
    console.rule("[bold]5. backtest and report")
    bt, _, backtest_png = backtest_to_folder(StoreSource(run.store, run_dir), report_dir)
    print_backtest(bt)
    page = write_report(run.store, fit_dir, report_dir,
                        extra_images=[("Backtest: predicted vs real weights", backtest_png),
                                      *token_panels, *experiment_panels(run.outputs)])
    console.print(f"report: {page}")
    console.rule("[bold]6. extrapolate in weights and in logits, export, load, evaluate")
    export_and_check(run, run_dir)
