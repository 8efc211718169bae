"""Regime sweep: which tiny RLVR runs are linear, and at what cost.

For every setting (a ``TinyRunConfig`` with some fields changed) and seed it
trains the run with the project's own generator, ingests it, fits every
weight element (project ingest + fit, moving elements, the run's own
sign-flipped null), backtests extrapolation over the last quarter of the run,
and records the held-out accuracy curve and the wall time. Results go to one
CSV row per (setting, seed); runs and rows already there are reused, so an
interrupted sweep resumes where it stopped. ``--report`` writes the plot and
the markdown table (docs/regime_sweep.md is made this way).

    python workflows/regime_sweep.py --grid explore --seeds 0
    python workflows/regime_sweep.py --grid confirm --seeds 0 1 2
    python workflows/regime_sweep.py --report docs/regime_sweep.md
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from pipeline.rl.tiny_model import ModelSize
from pipeline.rl.tiny_run import GENERATOR_VERSION, TinyRunConfig, make_tiny_run

# Named grids: a label and the fields that differ from TinyRunConfig().
# the generator's defaults before this sweep chose new ones: every setting spells out
# what it changes from these, so the table keeps its meaning when the defaults move
OLD_DEFAULT: dict[str, Any] = dict(dtype="bfloat16", sft_steps=250, rl_steps=100, save_every=10,
                                   lr=5e-5, prompts_per_step=16, generations=8)


def _big(**over: Any) -> dict[str, Any]:
    """200 GRPO steps of 64 prompts x 8 answers, checkpoints every 20 (the sweep's base)."""
    return {**OLD_DEFAULT, "rl_steps": 200, "save_every": 20, "prompts_per_step": 64, **over}


# Named grids: a label and the fields that differ from TinyRunConfig().
GRIDS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "explore": [
        ("old default (lr 5e-5, 100 steps, 16x8)", OLD_DEFAULT),
        ("lr 1e-5, 200 steps, 64x8", _big(lr=1e-5)),
        ("lr 2e-5, 200 steps, 64x8, warm start 150", _big(lr=2e-5, sft_steps=150)),
        ("lr 1e-5, 200 steps, 64x8, add3", _big(lr=1e-5, task="add3")),
        ("lr 2e-5, 200 steps, 64x8", _big(lr=2e-5)),
        ("lr 1e-5, 200 steps, 64x8, fp32 checkpoints", _big(lr=1e-5, dtype="float32")),
        ("lr 1e-5, 200 steps, 64x8, addsub2", _big(lr=1e-5, task="addsub2")),
        ("lr 1e-5, 200 steps, 64x8, hidden 256", _big(lr=1e-5, size=ModelSize(
            hidden_size=256, intermediate_size=512))),
        ("lr 3e-5, 200 steps, 64x8, warm start 150", _big(lr=3e-5, sft_steps=150)),
        ("lr 2e-5, 200 steps, 64x8, warm start 100", _big(lr=2e-5, sft_steps=100)),
        ("lr 2e-5, 200 steps, 32x16, warm start 150", _big(lr=2e-5, sft_steps=150,
                                                         prompts_per_step=32, generations=16)),
        ("lr 2e-5, 200 steps, 48x8, warm start 150", _big(lr=2e-5, sft_steps=150,
                                                        prompts_per_step=48)),
        ("lr 2e-5, 200 steps, 64x8, warm start 150, fp32 checkpoints",
         _big(lr=2e-5, sft_steps=150, dtype="float32")),
    ],
    # the embedded default (TinyRunConfig()), on every seed
    "confirm": [
        ("default: lr 3e-5, 200 steps, 64x8, warm start 150, fp32 checkpoints", {}),
    ],
}

FIELDS = ["label", "seed", "key", "task", "lr", "rl_steps", "save_every", "prompts_per_step",
          "generations", "sft_steps", "adam_beta1", "dtype", "hidden_size", "layers",
          "n_params", "acc_first", "acc_mid", "acc_last", "acc_gain", "acc_gain_2nd_half",
          "median_r2", "frac_gt_0.7", "frac_gt_0.9", "null_median", "null_frac_gt_0.7",
          "r2_minus_null", "static_fraction", "bt_cutoff", "bt_max_horizon", "bt_best_method",
          "bt_best_rel", "bt_rel_by_method", "gen_seconds", "analysis_seconds"]


def config_key(cfg: TinyRunConfig) -> str:
    blob = json.dumps([GENERATOR_VERSION, asdict(cfg)], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def ensure_run(cfg: TinyRunConfig, runs: Path) -> Path:
    """The run for ``cfg`` under ``runs/``, trained once (atomically) and reused."""
    path = runs / config_key(cfg)
    if (path / "metrics.json").exists():
        return path
    tmp = runs / f".{path.name}.{os.getpid()}.partial"  # two sweeps may share runs/
    shutil.rmtree(tmp, ignore_errors=True)
    make_tiny_run(tmp, cfg, log=lambda m: print("   ", m, flush=True), progress=False)
    tmp.replace(path)
    return path


def backtest_row(store: Path, run_dir: Path, extra_methods: bool = True) -> dict[str, Any]:
    """Relative error per method over the last quarter of the run (worst target wins)."""
    from pipeline.extrapolate.backtest import NO_CHANGE, plan_cases, run_backtest
    from pipeline.extrapolate.sources import StoreSource

    source = StoreSource(store, run_dir)
    steps = source.steps
    n_hold = max(1, len(steps) // 4)
    cases = plan_cases(steps, holdout=n_hold)
    res = run_backtest(source, cases)
    worst: dict[str, float] = {}
    for i, c in enumerate(res.cases):
        if c.method == NO_CHANGE:
            continue
        worst[c.label] = max(worst.get(c.label, 0.0), res.overall(i).rel)
    best = min(worst, key=worst.__getitem__)
    return {"bt_cutoff": cases[0].cutoff, "bt_max_horizon": steps[-1] - cases[0].cutoff,
            "bt_best_method": best, "bt_best_rel": worst[best],
            "bt_rel_by_method": json.dumps({k: round(v, 4) for k, v in worst.items()})}


def analyse(label: str, cfg: TinyRunConfig, run_dir: Path, work: Path, client: Any) -> dict:
    from pipeline.fit.histograms import _row, overall
    from pipeline.fit.job import fit_store
    from pipeline.store.ingest import ingest

    t0 = time.perf_counter()
    store = work / "run.zarr"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ingest(run_dir, store, client=client, progress=False)
    rep = fit_store(store, work / "fit", client=client, progress=False, keep_state=False)
    r = _row(overall(rep.histograms["moving"]))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    acc = {int(k): v for k, v in metrics["heldout_accuracy"].items()}
    steps = sorted(acc)
    mid = steps[len(steps) // 2]
    row: dict[str, Any] = {
        "label": label, "seed": cfg.seed, "key": config_key(cfg), "task": cfg.task,
        "lr": cfg.lr, "rl_steps": cfg.rl_steps, "save_every": cfg.save_every,
        "prompts_per_step": cfg.prompts_per_step, "generations": cfg.generations,
        "sft_steps": cfg.sft_steps, "adam_beta1": cfg.adam_beta1, "dtype": cfg.dtype,
        "hidden_size": cfg.size.hidden_size, "layers": cfg.size.num_hidden_layers,
        "n_params": r["n_elements"],
        "acc_first": acc[steps[0]], "acc_mid": acc[mid], "acc_last": acc[steps[-1]],
        "acc_gain": acc[steps[-1]] - acc[steps[0]], "acc_gain_2nd_half": acc[steps[-1]] - acc[mid],
        "median_r2": r["median"], "frac_gt_0.7": r["frac_gt_0.7"], "frac_gt_0.9": r["frac_gt_0.9"],
        "null_median": r["null_median"], "null_frac_gt_0.7": r["null_frac_gt_0.7"],
        "r2_minus_null": r["median"] - r["null_median"], "static_fraction": r["static_fraction"],
        "gen_seconds": metrics.get("seconds", float("nan")),
    }
    row.update(backtest_row(store, run_dir))
    row["analysis_seconds"] = round(time.perf_counter() - t0, 1)
    shutil.rmtree(work, ignore_errors=True)
    return row


def read_rows(csv_path: Path) -> list[dict[str, str]]:
    if not csv_path.exists():
        return []
    with csv_path.open() as f:
        return list(csv.DictReader(f))


def append_row(csv_path: Path, row: dict[str, Any]) -> None:
    new = not csv_path.exists()
    with csv_path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerow({k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in row.items()})


def sweep(grid: str, seeds: list[int], out: Path, only: list[int] | None,
          threads: int | None) -> None:
    import torch

    from pipeline.compute import dask_client

    if threads:
        torch.set_num_threads(threads)  # several sweeps side by side on a small machine
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "results.csv"
    grid_settings = GRIDS[grid]
    settings = grid_settings if only is None else [grid_settings[i] for i in only]
    with dask_client(n_workers=1) as client:
        for label, over in settings:
            for seed in seeds:
                cfg = replace(TinyRunConfig(), seed=seed, **over)
                key = config_key(cfg)
                if any(r["key"] == key for r in read_rows(csv_path)):
                    continue
                print(f"== {label}, seed {seed} ({key})", flush=True)
                run_dir = ensure_run(cfg, out / "runs")
                row = analyse(label, cfg, run_dir, out / f"work-{os.getpid()}", client)
                append_row(csv_path, row)
                print(f"   median R² {row['median_r2']:.3f} (null {row['null_median']:.3f}), "
                      f"acc {row['acc_first']:.3f} -> {row['acc_mid']:.3f} -> "
                      f"{row['acc_last']:.3f}, backtest best {row['bt_best_method']} "
                      f"{row['bt_best_rel']:.3f}, {row['gen_seconds']} s", flush=True)


def _f(x: str) -> float:
    try:
        return float(x)
    except ValueError:
        return math.nan


def write_report(out: Path, doc: Path) -> None:
    """The markdown table (mean and range over seeds per setting) and the plot."""
    import matplotlib

    from pipeline.extrapolate import methods as registry

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_rows(out / "results.csv")
    by: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by.setdefault(r["label"], []).append(r)

    def span(rs: list[dict[str, str]], k: str, fmt: str = "{:.2f}") -> str:
        v = [_f(r[k]) for r in rs]
        return fmt.format(min(v)) if len(v) == 1 else \
            f"{fmt.format(min(v))}-{fmt.format(max(v))}"

    lines = ["| setting | seeds | accuracy first -> last | 2nd-half gain | median R² | null "
             "| > 0.7 | backtest best rel. err. (last quarter) | generation s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, rs in by.items():
        seeds = ",".join(r["seed"] for r in rs)
        lines.append(
            f"| {label} | {seeds} | {span(rs, 'acc_first')} -> {span(rs, 'acc_last')} "
            f"| {span(rs, 'acc_gain_2nd_half')} | {span(rs, 'median_r2', '{:.3f}')} "
            f"| {span(rs, 'null_median', '{:.3f}')} | {span(rs, 'frac_gt_0.7')} "
            f"| {span(rs, 'bt_best_rel')} ({rs[0]['bt_best_method']}) "
            f"| {span(rs, 'gen_seconds', '{:.0f}')} |")
    lines += ["", "Backtest per method (worst relative error over the last quarter; "
              "1 = no change), rows that ran every method:", ""]
    methods: list[str] = []
    per = [(r, json.loads(r["bt_rel_by_method"])) for r in rows]
    every = set(registry.names())  # a label is "name(...)": older rows lack newer methods
    per = [(r, m) for r, m in per if every <= {k.split("(")[0] for k in m}]
    for _, m in per:
        methods += [k for k in m if k not in methods]
    lines += ["| setting | seed | " + " | ".join(methods) + " |",
              "|---|---|" + "---|" * len(methods)]
    for r, m in per:
        lines.append(f"| {r['label']} | {r['seed']} | "
                     + " | ".join(f"{m[k]:.3f}" if k in m else "-" for k in methods) + " |")
    png = doc.with_suffix(".png")
    fig, ax = plt.subplots(figsize=(7, 5))
    for label, rs in by.items():
        ax.scatter([_f(r["null_median"]) for r in rs], [_f(r["median_r2"]) for r in rs],
                   label=label, s=25)
    ax.plot([0.3, 1], [0.3, 1], "k:", lw=1, label="= null")
    ax.plot([0.3, 0.75], [0.55, 1.0], "r:", lw=1, label="null + 0.25")
    ax.set_xlabel("null median R² (sign-flipped increments)")
    ax.set_ylabel("median R² of moving weights")
    ax.set_title("Regime sweep: linearity of tiny GRPO runs")
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    doc.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    head = doc.read_text().split("<!-- table -->")[0] if doc.exists() else "# Regime sweep\n\n"
    doc.write_text(head + "<!-- table -->\n" + "\n".join(lines) + f"\n\n![]({png.name})\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", choices=sorted(GRIDS), default="explore")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--only", type=int, nargs="+", help="indices into the grid")
    ap.add_argument("--out", type=Path, default=Path("runs/regime-sweep"))
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    ap.add_argument("--report", type=Path, help="write the markdown table + plot here and stop")
    a = ap.parse_args()
    if a.report:
        write_report(a.out, a.report)
        return
    sweep(a.grid, a.seeds, a.out, a.only, a.threads)


if __name__ == "__main__":
    main()
