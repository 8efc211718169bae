"""RL-Extra vs plain GRPO on the embedded task (2-digit addition), measured on real runs.

Every arm starts from the same supervised warm start (trained once, saved,
given to each run as ``init_model``) and gets the same budget of real GRPO
steps; seeds change GRPO's sampling and data order, not the model or the
held-out set. Held-out greedy accuracy is measured every ``--eval-every``
real steps, in the trainer (after RL-Extra's callback, so a jump step scores
the jumped model), with the wall-clock time since training began (jumps
included, the evaluations themselves excluded).

Reported, per arm, mean and spread over seeds:

- steps-to-threshold ratio (the paper's 6.1x): the real steps GRPO needs to
  first reach an accuracy, divided by the arm's; the threshold is GRPO's own
  final accuracy on the same seed, so GRPO reaches it within the budget by
  construction and a ratio >= 2 means "in at most half the real steps";
- the same ratio in wall-clock seconds;
- accuracy at fixed budgets of real steps (a quarter, half, all of it).

Files under ``--out``: ``results.json`` (settings, machine, every curve, the
summary), ``curves.csv``, ``summary.csv``, ``accuracy.png`` (accuracy vs real
steps and vs seconds per arm, mean line, min-max over seeds shaded). Each
(arm, seed) run is saved as it finishes (``runs/<arm>/seed_<k>/result.json``)
and skipped when the experiment is run again with the same settings.

    python workflows/rl_extra_experiment.py   # into tiny-addition's outputs/rl_extra_experiment
    python workflows/rl_extra_experiment.py --quick --out /tmp/rlx-quick
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shutil
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError, check_int
from pipeline.rl.extra import Adaptive, RLExtra, RLExtraCallback
from pipeline.rl.tiny_run import TinyRunConfig, make_tiny_run, make_warm_start

RESULTS, CURVES, SUMMARY, PLOT = "results.json", "curves.csv", "summary.csv", "accuracy.png"
SETTINGS_FILE = "settings.json"
RUN_RESULT = "result.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Arm:
    """One way to spend the budget: plain GRPO (m = 0) or RL-Extra with (m, n)."""

    name: str
    m: int = 0
    n: int = 0
    adaptive: bool = False

    @property
    def alpha(self) -> float | None:
        return (self.m + self.n) / self.m if self.m else None

    def scaled(self, factor: int) -> Arm:
        """m and n divided by ``factor`` (quick mode), alpha kept."""
        if not self.m:
            return self
        return replace(self, m=max(1, self.m // factor), n=self.n // factor)

    def spec(self, optimizer: str) -> RLExtra | None:
        if not self.m:
            return None
        policy = Adaptive() if self.adaptive else None
        return RLExtra(m=self.m, n=self.n, optimizer=optimizer,  # type: ignore[arg-type]
                       policy=policy)


# the arms, by name: alpha = (m + n) / m of 2, 6 and 6 at a shorter segment, and adaptive
ARMS: dict[str, Arm] = {a.name: a for a in [
    Arm("grpo"),
    Arm("rlx-20-20", 20, 20),
    Arm("rlx-20-100", 20, 100),
    Arm("rlx-10-50", 10, 50),
    Arm("adaptive-20", 20, 20, adaptive=True),
]}
BASELINE = "grpo"


@dataclass(frozen=True)
class Settings:
    """What decides the results; a resumed experiment must have the same."""

    steps: int = 160  # real GRPO steps per run (the budget)
    eval_every: int = 10
    seeds: tuple[int, ...] = (0, 1, 2)
    arms: tuple[str, ...] = tuple(ARMS)
    prompts_per_step: int = 16  # the catalog's 64 would cost ~4x: see docs/rl_extra.md
    generations: int = 8
    n_heldout: int = 256
    sft_steps: int = 150  # the embedded run's warm start
    lr: float = 3e-5
    optimizer: str = "keep"
    scale: int = 1  # m, n divided by this (quick mode)

    def check(self) -> None:
        check_int(self.steps, "--steps", 1)
        check_int(self.eval_every, "--eval-every", 1)
        if not self.seeds:
            raise PipelineError("--seeds: give at least one seed")
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown:
            raise PipelineError(f"unknown arm {unknown[0]!r} (known: {', '.join(ARMS)})")
        if BASELINE not in self.arms:
            raise PipelineError(f"the arms must include {BASELINE!r}: ratios are against it")

    def arm(self, name: str) -> Arm:
        return ARMS[name].scaled(self.scale)

    def tiny_config(self) -> TinyRunConfig:
        """The embedded run's config with this experiment's batch and budget."""
        return replace(TinyRunConfig(), sft_steps=self.sft_steps, rl_steps=self.steps,
                       save_every=self.steps, prompts_per_step=self.prompts_per_step,
                       generations=self.generations, n_heldout=self.n_heldout, lr=self.lr)


QUICK = Settings(steps=8, eval_every=2, seeds=(0,), prompts_per_step=4, generations=4,
                 n_heldout=32, sft_steps=30, scale=10)


class _Curve:
    """A trainer callback: held-out accuracy every ``every`` real steps, and when."""

    def __init__(self, every: int, heldout: list, tokenizer: Any,
                 extra: RLExtraCallback | None) -> None:
        from transformers import TrainerCallback

        curve = self
        self.points: list[dict[str, Any]] = []
        self.eval_seconds = 0.0
        self.t0 = 0.0

        def measure(step: int, model: Any) -> None:
            from pipeline.rl.evaluate import greedy_accuracy

            t = time.perf_counter()
            was_training = model.training
            acc = greedy_accuracy(model, tokenizer, heldout)
            model.train(was_training)
            curve.points.append({
                "real_step": step,
                "nominal_step": extra.nominal_step(step) if extra else step,
                "seconds": round(t - curve.t0 - curve.eval_seconds, 3),
                "accuracy": acc})
            curve.eval_seconds += time.perf_counter() - t

        class Cb(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kw):
                curve.t0 = time.perf_counter()
                measure(0, model)

            def on_step_end(self, args, state, control, model=None, **kw):
                if state.global_step % every == 0 or state.global_step == args.max_steps:
                    measure(state.global_step, model)

        self.callback = Cb()


def _quiet(_msg: str) -> None:
    pass


def run_one(out: Path, settings: Settings, arm_name: str, seed: int, init: Path
            ) -> dict[str, Any]:
    """Train one (arm, seed) from ``init`` and return its curve (saved as it lands)."""
    from pipeline.rl.char_tokenizer import build_char_tokenizer
    from pipeline.rl.tasks import task_problems

    folder = out / "runs" / arm_name / f"seed_{seed}"
    done = folder / RUN_RESULT
    if done.exists():
        return json.loads(done.read_text())
    shutil.rmtree(folder, ignore_errors=True)  # an unfinished run is redone from scratch
    folder.mkdir(parents=True)
    arm = settings.arm(arm_name)
    cfg = settings.tiny_config()  # seed 0: the warm start's data split and held-out set
    _, heldout = task_problems(cfg.task, cfg.seed, cfg.n_heldout)
    spec = arm.spec(settings.optimizer)
    extra = RLExtraCallback(spec) if spec is not None else None
    curve = _Curve(settings.eval_every, heldout, build_char_tokenizer(), extra)
    t = time.perf_counter()
    make_tiny_run(folder / "run", cfg, log=_quiet, progress=False, rl_extra=extra,
                  callbacks=[curve.callback], init_model=init,
                  grpo_args={"seed": seed, "data_seed": seed})
    res = {"arm": arm_name, "seed": seed, "m": arm.m, "n": arm.n, "adaptive": arm.adaptive,
           "curve": curve.points, "seconds": round(time.perf_counter() - t, 1),
           "eval_seconds": round(curve.eval_seconds, 1),
           "rl_extra": extra.summary() if extra else None}
    tmp = folder / f".{RUN_RESULT}.partial"
    tmp.write_text(json.dumps(res, indent=1))
    os.replace(tmp, done)
    return res


# ---- analysis (pure: curves in, numbers out; the test recomputes these) ---------------


def first_reaching(curve: Sequence[Mapping[str, Any]], threshold: float,
                   key: str = "real_step") -> float | None:
    """The first ``key`` (real step or seconds) at which accuracy >= ``threshold``."""
    for p in sorted(curve, key=lambda p: p["real_step"]):
        if p["accuracy"] >= threshold:
            return p[key]
    return None


def accuracy_at(curve: Sequence[Mapping[str, Any]], budget: int) -> float:
    """Accuracy at the last evaluation within ``budget`` real steps."""
    pts = [p for p in curve if p["real_step"] <= budget]
    return max(pts, key=lambda p: p["real_step"])["accuracy"]


def _ratio(base: float | None, arm: float | None) -> float | None:
    """base / arm; None when either is undefined, inf when the arm reached it at once."""
    if base is None or arm is None:
        return None
    if arm == 0:
        return None if base == 0 else math.inf
    return base / arm


def _stats(values: Sequence[float | None]) -> dict[str, Any]:
    ok = [v for v in values if v is not None and math.isfinite(v)]
    return {"mean": statistics.fmean(ok) if ok else None,
            "std": statistics.stdev(ok) if len(ok) > 1 else (0.0 if ok else None),
            "min": min(ok) if ok else None, "max": max(ok) if ok else None,
            "n": len(ok), "undefined": len(values) - len(ok)}


def summarize(runs: Mapping[str, Mapping[int, Mapping[str, Any]]], steps: int
              ) -> dict[str, Any]:
    """Ratios against GRPO (threshold: GRPO's final accuracy, per seed) and fixed budgets."""
    base = runs[BASELINE]
    budgets = sorted({max(1, steps // 4), max(1, steps // 2), steps})
    out: dict[str, Any] = {}
    for arm, by_seed in runs.items():
        per_seed = {}
        for seed, r in by_seed.items():
            b = base[seed]["curve"]
            thr = accuracy_at(b, steps)
            gs, asteps = first_reaching(b, thr), first_reaching(r["curve"], thr)
            gt = first_reaching(b, thr, "seconds")
            at = first_reaching(r["curve"], thr, "seconds")
            per_seed[str(seed)] = {"threshold": thr, "grpo_steps": gs, "arm_steps": asteps,
                                   "ratio": _ratio(gs, asteps), "grpo_seconds": gt,
                                   "arm_seconds": at, "time_ratio": _ratio(gt, at)}
        ratios = [v["ratio"] for v in per_seed.values()]
        acc = {str(b): {**_stats([accuracy_at(r["curve"], b) for r in by_seed.values()]),
                        "per_seed": {str(s): accuracy_at(r["curve"], b)
                                     for s, r in by_seed.items()}}
               for b in budgets}
        out[arm] = {
            "steps_to_grpo_final": per_seed,
            "ratio": _stats(ratios),
            "time_ratio": _stats([v["time_ratio"] for v in per_seed.values()]),
            "half_the_steps_on_every_seed": all(x is not None and x >= 2 for x in ratios),
            "accuracy_at": acc,
        }
    return out


# ---- files ----------------------------------------------------------------------------


def _machine() -> dict[str, Any]:
    import torch

    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "load_average_at_start": list(os.getloadavg()), "python": platform.python_version()}


def _fmt(x: float | None, digits: int = 2) -> str:
    if x is None:
        return "-"
    return "inf" if math.isinf(x) else f"{x:.{digits}f}"


def write_outputs(out: Path, settings: Settings, runs: Mapping[str, Mapping[int, Any]],
                  summary: Mapping[str, Any], machine: Mapping[str, Any]) -> dict[str, Path]:
    """results.json, curves.csv, summary.csv and accuracy.png."""
    doc = {"version": FORMAT_VERSION, "settings": _settings_dict(settings), "machine": machine,
           "arms": {a: asdict(settings.arm(a)) for a in runs},
           "runs": {a: {str(s): r for s, r in by.items()} for a, by in runs.items()},
           "summary": summary}
    paths = {k: out / v for k, v in (("results", RESULTS), ("curves", CURVES),
                                     ("summary", SUMMARY), ("plot", PLOT))}
    paths["results"].write_text(_json(doc))
    with paths["curves"].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arm", "seed", "real_step", "nominal_step", "seconds", "accuracy"])
        for a, by in runs.items():
            for s, r in by.items():
                for p in r["curve"]:
                    w.writerow([a, s, p["real_step"], p["nominal_step"], p["seconds"],
                                p["accuracy"]])
    budgets = sorted(next(iter(summary.values()))["accuracy_at"], key=int)
    with paths["summary"].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arm", "m", "n", "alpha", "ratio_mean", "ratio_min", "ratio_max",
                    "ratio_undefined", "time_ratio_mean", "half_on_every_seed",
                    *[f"acc@{b}_mean" for b in budgets], *[f"acc@{b}_std" for b in budgets]])
        for a, s in summary.items():
            arm = settings.arm(a)
            w.writerow([a, arm.m, arm.n, arm.alpha, s["ratio"]["mean"], s["ratio"]["min"],
                        s["ratio"]["max"], s["ratio"]["undefined"], s["time_ratio"]["mean"],
                        s["half_the_steps_on_every_seed"],
                        *[s["accuracy_at"][b]["mean"] for b in budgets],
                        *[s["accuracy_at"][b]["std"] for b in budgets]])
    plot(runs, paths["plot"])
    return paths


def _json(doc: Any) -> str:
    """JSON without NaN/Infinity tokens (inf ratios as the string "inf")."""
    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        return x
    return json.dumps(clean(doc), indent=1) + "\n"


def plot(runs: Mapping[str, Mapping[int, Any]], path: Path) -> Path:
    """Accuracy vs real steps and vs seconds: mean over seeds, min-max shaded."""
    import numpy as np

    from pipeline.report.plots import subplots

    fig, axes = subplots(1, 2, figsize=(12, 4.5))
    for a, by in runs.items():
        curves = [r["curve"] for r in by.values()]
        steps = [p["real_step"] for p in curves[0]]
        acc = np.array([[p["accuracy"] for p in c] for c in curves])
        sec = np.array([[p["seconds"] for p in c] for c in curves])
        for ax, x in ((axes[0], np.asarray(steps, float)), (axes[1], sec.mean(axis=0))):
            (line,) = ax.plot(x, acc.mean(axis=0), marker="o", markersize=3, label=a,
                              linestyle="--" if a == BASELINE else "-")
            if len(curves) > 1:
                ax.fill_between(x, acc.min(axis=0), acc.max(axis=0), alpha=0.15,
                                color=line.get_color())
    axes[0].set_xlabel("real GRPO steps")
    axes[1].set_xlabel("wall-clock seconds (jumps included, evaluation excluded)")
    for ax in axes:
        ax.set_ylabel("held-out greedy accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[0].set_title("RL-Extra vs GRPO: accuracy per real step")
    axes[1].set_title("... and per second (mean seeds' time)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _settings_dict(s: Settings) -> dict[str, Any]:
    d = asdict(s)
    d["seeds"], d["arms"] = list(s.seeds), list(s.arms)
    return d


def run_experiment(out: str | Path, settings: Settings, log=print) -> dict[str, Any]:
    """Train (or resume) every (arm, seed), then summarize and write the files."""
    settings.check()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sfile = out / SETTINGS_FILE
    want = _settings_dict(settings)
    if sfile.exists():
        have = json.loads(sfile.read_text())
        same = {k: have.get(k) for k in want if k not in ("seeds", "arms")} == {
            k: v for k, v in want.items() if k not in ("seeds", "arms")}
        if not same:  # seeds and arms may be added; anything else changes every number
            raise PipelineError("this --out holds an experiment with other settings "
                                f"({have}); choose another --out", out)
    sfile.write_text(json.dumps(want, indent=1))
    machine = _machine()
    init = out / "warm_start"
    if not (init / "config.json").exists():
        shutil.rmtree(init, ignore_errors=True)
        t = time.perf_counter()
        make_warm_start(init, settings.tiny_config())
        log(f"warm start: {time.perf_counter() - t:.1f} s -> {init}")
    runs: dict[str, dict[int, Any]] = {}
    for seed in settings.seeds:  # seed-major: an interrupted run has whole seeds first
        for a in settings.arms:
            t = time.perf_counter()
            r = run_one(out, settings, a, seed, init)
            runs.setdefault(a, {})[seed] = r
            log(f"{a:>12} seed {seed}: final accuracy {r['curve'][-1]['accuracy']:.3f} "
                f"({time.perf_counter() - t:.1f} s)")
    summary = summarize(runs, settings.steps)
    write_outputs(out, settings, runs, summary, machine)
    for a, s in summary.items():
        log(f"{a:>12}: steps-to-GRPO-final ratio {_fmt(s['ratio']['mean'])} "
            f"[{_fmt(s['ratio']['min'])}, {_fmt(s['ratio']['max'])}], "
            f"undefined {s['ratio']['undefined']}; acc@{settings.steps} "
            f"{_fmt(s['accuracy_at'][str(settings.steps)]['mean'], 3)}")
    return summary


def markdown_table(results: Mapping[str, Any]) -> str:
    """The docs table from results.json."""
    budgets = sorted(next(iter(results["summary"].values()))["accuracy_at"], key=int)
    head = ["arm", "m", "n", "alpha", "steps ratio mean [min, max]", "seeds not reached",
            "time ratio mean", ">= 2x on every seed",
            *[f"acc @{b} (mean ± sd)" for b in budgets]]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a, s in results["summary"].items():
        arm = results["arms"][a]
        alpha = "-" if not arm["m"] else f"{(arm['m'] + arm['n']) / arm['m']:g}"
        r = s["ratio"]
        accs = [f"{s['accuracy_at'][b]['mean']:.3f} ± {s['accuracy_at'][b]['std']:.3f}"
                for b in budgets]
        rows.append("| " + " | ".join([
            a, str(arm["m"] or "-"), str(arm["n"] if arm["m"] else "-"), alpha,
            f"{_fmt(r['mean'])} [{_fmt(r['min'])}, {_fmt(r['max'])}]", str(r["undefined"]),
            _fmt(s["time_ratio"]["mean"]), "yes" if s["half_the_steps_on_every_seed"] else "no",
            *accs]) + " |")
    return "\n".join(rows) + "\n"


EXPERIMENT_DIR = "rl_extra_experiment"  # inside a catalog entry's outputs: its report shows it


def experiment_dir(entry: str = "tiny-addition") -> Path:
    from pipeline.catalog import lookup

    return lookup(entry).outputs / EXPERIMENT_DIR


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None,
                    help="default: the embedded entry's outputs/rl_extra_experiment (the "
                         "entry's report shows the plot)")
    ap.add_argument("--quick", action="store_true", help="tiny settings for a test (1 seed)")
    d = Settings()
    ap.add_argument("--steps", type=int, help=f"real GRPO steps per run (default {d.steps})")
    ap.add_argument("--eval-every", type=int, help=f"default {d.eval_every}")
    ap.add_argument("--seeds", type=int, nargs="+", help=f"default {list(d.seeds)}")
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), help="default: all")
    ap.add_argument("--prompts", type=int, help=f"prompts per step (default {d.prompts_per_step})")
    ap.add_argument("--generations", type=int, help=f"default {d.generations}")
    ap.add_argument("--optimizer", choices=["keep", "reset"], help=f"default {d.optimizer}")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--table", action="store_true", help="print the markdown table and stop")
    a = ap.parse_args(argv)
    if a.out is None:
        a.out = experiment_dir()
    if a.table:
        print(markdown_table(json.loads((a.out / RESULTS).read_text())))
        return
    import torch

    torch.set_num_threads(a.threads)
    s = QUICK if a.quick else d
    over = {k: v for k, v in (("steps", a.steps), ("eval_every", a.eval_every),
                              ("seeds", tuple(a.seeds) if a.seeds else None),
                              ("arms", tuple(a.arms) if a.arms else None),
                              ("prompts_per_step", a.prompts), ("generations", a.generations),
                              ("optimizer", a.optimizer)) if v is not None}
    try:
        run_experiment(a.out, replace(s, **over))
    except PipelineError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
