"""The paper's output-space table on a tiny run: real vs logits- vs weight-extrapolated models.

For each target step t the run is scored as a user would see it:

- the real checkpoint at t (when the run has one), and the newest checkpoint
  the extrapolations start from (t1: what you have without extrapolating);
- logits extrapolation (Eq. 1) from checkpoints t0 < t1 to t;
- weight extrapolation (Eq. 2 and the window methods of the methods
  registry) to t, exported by the real export path and loaded back.

Every model goes through ``rlvr-lin eval``'s library path with the same task,
k and sampling, so the rows differ only in the model. Pairs: t1 = min(t -
gap, last step), t0 = t1 - gap; window methods fit the last ``--window``
checkpoints up to t1. Results go to OUT/evals/<row>/ (each resumable: a re-run
reuses finished rows), OUT/output_table.json and OUT/output_table.md.

    python workflows/output_table.py RUN --out OUT [--targets 120 160 200 240 280] [-k 8]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError

DEFAULT_METHODS = ("two-point", "gated", "rank1")


@dataclass(frozen=True)
class Row:
    """One evaluated model of the table."""

    target: int
    kind: str  # "real", "start (t1)", "logits", "weights"
    label: str
    steps: tuple[int, ...]
    alpha: float | None
    result: dict[str, Any]  # metrics.json of its evaluation
    seconds: float

    def metric(self, name: str) -> dict[str, float]:
        return self.result["overall"][name]


def _fmt(e: dict[str, float]) -> str:
    return f"{e['value']:.3f} [{e['ci_low']:.3f}, {e['ci_high']:.3f}]"


def plan_pair(steps: list[int], target: int, gap: int) -> tuple[int, int]:
    """(t0, t1): t1 = min(target - gap, last step), t0 = t1 - gap, both stored."""
    t1 = min(target - gap, steps[-1])
    t0 = t1 - gap
    for s in (t0, t1):
        if s not in steps:
            raise PipelineError(f"target {target}: step {s} is not a checkpoint (has {steps}); "
                                "choose another --gap or --targets")
    return t0, t1


def build_table(run_dir: Path, out: Path, task: Any, targets: list[int], k: int,
                sampling: Any, gap: int = 40, window: int = 5,
                methods: tuple[str, ...] = DEFAULT_METHODS, batch_size: int = 64,
                log: Any = print) -> list[Row]:
    """Evaluate every model of the table (each into OUT/evals/<row>, resumable)."""
    from pipeline.evaluation.runner import ModelRef, evaluate
    from pipeline.extrapolate import methods as M
    from pipeline.extrapolate.export import export, make_spec
    from pipeline.extrapolate.sources import CheckpointSource

    src = CheckpointSource.from_run_dir(run_dir)
    steps = src.steps
    chosen = [M.get(name) for name in methods]
    rows: list[Row] = []

    def ckpt(step: int) -> Any:
        return ModelRef(src.reader(step).folder, step)

    def run(target: int, kind: str, label: str, refs: list, used: tuple[int, ...],
            name: str, alpha: float | None = None) -> None:
        t = time.perf_counter()
        res = evaluate(refs, task, k, sampling, alpha=1.0 if kind != "logits" else alpha,
                       target=float(target) if kind == "logits" else None,
                       out=out / "evals" / name, batch_size=batch_size, progress=False)
        rows.append(Row(target, kind, label, used, alpha, res.as_dict(),
                        time.perf_counter() - t))
        log(f"  t={target:<4} {label:<36} avg@{k} {_fmt(rows[-1].metric(f'avg@{k}'))}  "
            f"({res.generated} generated, {rows[-1].seconds:.1f} s)")

    with tempfile.TemporaryDirectory(prefix="output-table-") as tmp:
        for target in targets:
            t0, t1 = plan_pair(steps, target, gap)
            a = (target - t0) / (t1 - t0)
            if target in steps:
                run(target, "real", f"real checkpoint {target}", [ckpt(target)], (target,),
                    f"real-{target}")
            run(target, "start (t1)", f"real checkpoint {t1} (t1)", [ckpt(t1)], (t1,),
                f"real-{t1}")
            run(target, "logits", f"logits (alpha {a:g})", [ckpt(t0), ckpt(t1)], (t0, t1),
                f"logits-{t0}-{t1}-to{target}", a)
            for m in chosen:
                used = [t0, t1] if m.step_rule == "pair" else [s for s in steps if s <= t1][
                    -window:]
                spec = make_spec(src, m.name, to=target, steps=used, allow_interpolation=True,
                                 **m.typical_params())
                model = Path(tmp) / f"{m.name}-{target}"
                export(src, model, spec, progress=False)
                label = f"weights {m.label(spec.param_values)}" + (
                    f" (alpha {spec.alpha:g})" if spec.alpha is not None else "")
                run(target, "weights", label, [ModelRef(model)], tuple(spec.steps),
                    f"weights-{m.name}-{spec.steps[0]}-{spec.steps[-1]}-to{target}", spec.alpha)
    return rows


def paired_deltas(rows: list[Row], k: int) -> list[Any]:
    """Each row's avg@k minus its target's reference, with a paired bootstrap CI.

    The reference is the real checkpoint at the target when the run has one,
    else the checkpoint t1 the extrapolations start from. Both rows score the
    same problems, so resampling problems for the difference cancels most of
    the problem-to-problem spread that the separate intervals carry.
    """
    import numpy as np

    from pipeline.evaluation.metrics import bootstrap_mean

    def per_problem(r: Row) -> np.ndarray:
        return np.array([p[f"avg@{k}"] for p in r.result["per_problem"]])

    refs: dict[int, Row] = {}
    for r in rows:
        if r.kind == "real" or (r.kind == "start (t1)" and r.target not in refs):
            refs[r.target] = r
    return [None if refs[r.target] is r else
            bootstrap_mean(per_problem(r) - per_problem(refs[r.target])) for r in rows]


def _delta(e: Any) -> str:
    return "reference" if e is None else f"{e.value:+.3f} [{e.low:+.3f}, {e.high:+.3f}]"


def table_rows(rows: list[Row], k: int) -> list[list[str]]:
    return [[str(r.target), r.label, ",".join(map(str, r.steps)), _fmt(r.metric(f"avg@{k}")),
             _delta(d), _fmt(r.metric(f"pass@{k}"))]
            for r, d in zip(rows, paired_deltas(rows, k), strict=True)]


def columns(k: int) -> list[str]:
    return ["target", "model", "steps used", f"avg@{k} [95% CI]",
            f"avg@{k} - reference [paired 95% CI]", f"pass@{k} [95% CI]"]


def markdown(rows: list[Row], k: int, title: str) -> str:
    cols = columns(k)
    lines = [f"### {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(rows, k)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from pipeline.catalog import resolve
    from pipeline.console import print_table
    from pipeline.evaluation.tasks import get_task
    from pipeline.outputs.sampling import Sampling, check_sampling
    from pipeline.store.zmeta import write_atomic

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="tiny RLVR run directory or catalog name")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--targets", type=int, nargs="+", default=[120, 160, 200, 240, 280])
    ap.add_argument("--gap", type=int, default=40, help="t1 - t0 and t - t1 (inside the run)")
    ap.add_argument("--window", type=int, default=5, help="checkpoints for window methods")
    ap.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    ap.add_argument("-k", type=int, default=8)
    ap.add_argument("--n", type=int, default=None, help="first N held-out problems")
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        run_dir = Path(resolve(args.run).checkpoints)
        task = get_task(f"heldout:{run_dir}").head(args.n)
        sampling = check_sampling(Sampling(temperature=args.temperature, top_p=args.top_p,
                                           seed=args.seed, max_new_tokens=task.max_new_tokens))
        t = time.perf_counter()
        rows = build_table(run_dir, args.out, task, args.targets, args.k, sampling, args.gap,
                           args.window, tuple(args.methods))
    except PipelineError as e:
        raise SystemExit(f"error: {e}") from None
    k = args.k
    n_problems = rows[0].result["n_problems"]
    title = (f"{run_dir}: held-out problems n={n_problems}, k={k}, T={args.temperature:g}, "
             f"top-p={args.top_p:g}, seed {args.seed}; bootstrap 95% CIs over problems; "
             "reference: the real checkpoint at the target, else t1")
    print_table(title, columns(k), table_rows(rows, k))
    doc = {"run": str(run_dir), "k": k, "options": vars(args) | {"out": str(args.out)},
           "seconds": time.perf_counter() - t,
           "rows": [{"target": r.target, "kind": r.kind, "label": r.label,
                     "steps": list(r.steps), "alpha": r.alpha, "seconds": r.seconds,
                     "overall": r.result["overall"],
                     "avg_minus_reference": None if d is None else d.as_dict()}
                    for r, d in zip(rows, paired_deltas(rows, k), strict=True)]}
    write_atomic(args.out / "output_table.json", (json.dumps(doc, indent=1) + "\n").encode())
    write_atomic(args.out / "output_table.md", markdown(rows, k, title).encode())
    print(f"wrote {args.out / 'output_table.json'} and {args.out / 'output_table.md'}")


if __name__ == "__main__":
    main()
