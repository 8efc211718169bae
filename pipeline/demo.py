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


def run_demo(name: str | None, catalog: Path | None, scheduler: str | None) -> None:
    cat = load_catalog(catalog)
    name = name or cat.default
    if name is None or name not in cat.runs:
        raise PipelineError(f"no catalog run named {name!r}")
    entry = cat.runs[name]
    run_dir = ensure_checkpoints(name, entry)
    show_run(run_dir)
