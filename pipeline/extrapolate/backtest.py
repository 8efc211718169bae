"""Backtest: predict held-out real checkpoints from earlier ones, measure the miss.

For a cutoff step c, only steps <= c are "known". Every later real step t is
predicted with each method and compared with the real weights:

    rel = ||W_pred - W_real|| / ||W_real - W_c||

per tensor and over the whole model (sums of squares added before the
root). The trivial prediction "no change" (W_pred = W_c) scores exactly 1,
so a method helps only where it scores below 1. Predictions are rounded to
the source dtype first, as an export would write them, and tensors the
export copies (norms by default) are predicted as "no change", so the
overall number is the error of the model one would actually get.
"""

from __future__ import annotations

import csv
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError, check_int, check_output
from pipeline.extrapolate import kernels as K
from pipeline.extrapolate import methods as M
from pipeline.extrapolate.export import prepass_of, row_blocks
from pipeline.extrapolate.plan import DEFAULT_EXCLUDE, TensorPlan, plan_tensors
from pipeline.extrapolate.sources import WeightSource

ALL = "(all)"
NO_CHANGE = "no-change"


@dataclass(frozen=True)
class Case:
    """One prediction: a method, the known steps it uses, and the step it predicts."""

    method: str  # a name in the methods registry, or NO_CHANGE (the baseline)
    used: tuple[int, ...]  # known steps the method reads (a pair method: (t0, t1))
    target: int
    params: tuple[tuple[str, float], ...] = ()  # the method's own, e.g. (("r2_min", 0.5),)

    @property
    def cutoff(self) -> int:
        return self.used[-1]

    @property
    def alpha(self) -> float:
        """Eq. 2's alpha for this target measured from the first step used."""
        t0, t1 = self.used[0], self.used[-1]
        return (self.target - t0) / (t1 - t0) if t1 > t0 else 1.0

    @property
    def label(self) -> str:
        if self.method == NO_CHANGE:
            return NO_CHANGE
        return M.get(self.method).label(dict(self.params), self.used)


def plan_cases(
    steps: Sequence[int],
    cutoffs: Sequence[int] | None = None,
    holdout: int | None = None,
    sweep: Mapping[str, Sequence[float]] | None = None,
    window: int | None = None,
    methods: Sequence[str] | None = None,
) -> list[Case]:
    """All cases: per cutoff, each later step x each method (default: every registered one).

    Default cutoff: hold out the later half of the steps. A pair method
    (two-point) is run from the first known step (the paper's setting) and
    from the step just before the cutoff (the shortest baseline), which gives
    different alphas for the same target; a window method uses every known
    step. ``sweep`` lists values to try per method parameter (``r2_min``:
    gate thresholds); a parameter not listed takes its registered defaults.
    """
    steps = sorted(steps)
    chosen = [M.get(m) for m in (methods if methods is not None else M.names())]
    grids = _param_grids(chosen, sweep or {})
    if window is not None:
        check_int(window, "--window", 2)
    if holdout is not None:
        check_int(holdout, "--holdout", 1)
    if len(steps) < 3:
        raise PipelineError(f"a backtest needs at least 3 steps, the source has {steps}")
    if cutoffs is None:
        n_hold = holdout if holdout is not None else len(steps) // 2
        if not 1 <= n_hold <= len(steps) - 2:
            raise PipelineError(f"--holdout must be between 1 and {len(steps) - 2}")
        cutoffs = [steps[-n_hold - 1]]
    cases: list[Case] = []
    for c in cutoffs:
        if c not in steps:
            raise PipelineError(f"cutoff step {c} not in the source (has {steps})")
        known = [s for s in steps if s <= c]
        if window is not None:
            known = known[-window:]
        later = [s for s in steps if s > c]
        if len(known) < 2 or not later:
            raise PipelineError(f"cutoff {c} leaves {len(known)} known and {len(later)} "
                                "held-out steps (need >= 2 and >= 1)")
        pairs = [(t0, c) for t0 in sorted({known[0], known[-2]})]
        for t in later:
            cases.append(Case(NO_CHANGE, (c,), t))
            for m in chosen:
                for used in (pairs if m.step_rule == "pair" else [tuple(known)]):
                    cases += [Case(m.name, used, t, params) for params in grids[m.name]]
    return cases


def _param_grids(chosen: Sequence[M.Method], sweep: Mapping[str, Sequence[float]]
                 ) -> dict[str, list[tuple[tuple[str, float], ...]]]:
    """Every combination of parameter values per method, each value checked.

    A swept parameter that none of the chosen methods takes is refused, as
    the same option is by ``extrapolate``.
    """
    taken = {p.name for m in chosen for p in m.params}
    for key in sweep:
        if key not in taken:
            raise M.not_applicable(key)
    grids: dict[str, list[tuple[tuple[str, float], ...]]] = {}
    for m in chosen:
        axes = []
        for p in m.params:
            values = sweep.get(p.name) or p.sweep or (
                () if p.typical is None else (p.typical,))
            if not values:
                raise PipelineError(f"--method {m.name} needs {p.option}")
            axes.append([(p.name, p.check(v)) for v in values])
        grids[m.name] = [tuple(combo) for combo in itertools.product(*axes)]
    return grids


@dataclass
class Tally:
    """Sums of squares of one (case, tensor): error and the real move since the cutoff."""

    err: float = 0.0
    move: float = 0.0

    @property
    def rel(self) -> float:
        if self.move == 0.0:
            return 0.0 if self.err == 0.0 else math.inf
        return math.sqrt(self.err / self.move)


@dataclass
class BacktestResult:
    cases: list[Case]
    tensors: list[str]
    tallies: dict[tuple[int, str], Tally] = field(default_factory=dict)  # (case idx, tensor)

    def overall(self, i: int) -> Tally:
        t = Tally()
        for name in self.tensors:
            x = self.tallies[(i, name)]
            t.err += x.err
            t.move += x.move
        return t

    def rows(self, per_tensor: bool = True) -> list[dict[str, object]]:
        """Flat rows (one per case x tensor, plus the model-wide row) for CSV and tables."""
        out = []
        for i, c in enumerate(self.cases):
            names = [*self.tensors, ALL] if per_tensor else [ALL]
            for name in names:
                t = self.overall(i) if name == ALL else self.tallies[(i, name)]
                out.append({"cutoff": c.cutoff, "target": c.target,
                            "horizon": c.target - c.cutoff, "method": c.label,
                            "alpha": round(c.alpha, 6), "tensor": name,
                            "rel_error": t.rel, "err_sq": t.err, "move_sq": t.move})
        return out


def _tensor_plan(source: WeightSource, steps: Iterable[int],
                 include: Sequence[str], exclude: Sequence[str]) -> list[TensorPlan]:
    names = source.tensor_names
    steps = list(steps)
    shapes = {n: [source.shape(n)] for n in names}
    dtypes = {n: source.dtype(n) for n in names}
    return [p for p in plan_tensors(names, shapes, dtypes, include, exclude)
            if K.is_float(p.src_dtype)]


def run_backtest(
    source: WeightSource,
    cases: Sequence[Case],
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    block_bytes: int = 16 * 2**20,
    progress: bool = False,
) -> BacktestResult:
    """Score every case on every float tensor, streaming row blocks.

    Each block is read once per step and every case is scored from it; the
    least-squares fit of a known window is shared by all targets and gates.
    """
    check_int(block_bytes, "block size", 1)
    needed = sorted({s for c in cases for s in (*c.used, c.target)})
    missing = [s for s in needed if s not in source.steps]
    if missing:
        raise PipelineError(f"steps {missing} not in the source")
    methods = {c.method: M.get(c.method) for c in cases if c.method != NO_CHANGE}
    plans = _tensor_plan(source, needed, include, exclude)
    result = BacktestResult(list(cases), [p.name for p in plans])
    for i in range(len(cases)):
        for p in plans:
            result.tallies[(i, p.name)] = Tally()
    n_steps = len(needed)
    from pipeline.console import progress_bar

    it: Iterable[TensorPlan] = progress_bar(desc="backtest", unit="tensor", enabled=progress,
                                            iterable=plans)
    scratch = 96 if any(m.needs_fit for m in methods.values()) else 16
    for p in it:
        prepared = {(c.method, c.used): prepass_of(source, methods[c.method], p, c.used,
                                                  block_bytes)
                    for c in cases if c.method in methods and methods[c.method].prepares(p)}
        for rows in row_blocks(p.shape, block_bytes, 8 * n_steps + scratch):
            vals = {s: source.read(p.name, s, rows) for s in needed}
            _score_block(result, p, vals, rows, methods, prepared)
    return result


def _score_block(result: BacktestResult, p: TensorPlan, vals: dict[int, np.ndarray],
                 rows: slice | None, methods: Mapping[str, M.Method],
                 prepared: Mapping[tuple[str, tuple[int, ...]], object]) -> None:
    f32 = {s: K.to_float32(v) for s, v in vals.items()}
    fits: dict = {}  # one least-squares fit per window, shared by every method and target
    for i, c in enumerate(result.cases):
        real = f32[c.target]
        base = f32[c.cutoff]
        if c.method == NO_CHANGE or p.action == "copy":
            pred = base
        else:
            m = methods[c.method]
            prep = prepared.get((c.method, c.used))
            blocks = tuple(vals[s] for s in m.input_steps(c.used, prep is not None))
            block = M.BlockInput(blocks, c.used, c.target, c.alpha, rows, prep, fits=fits)
            pred = m.predict(block, dict(c.params)).reshape(real.shape)
        pred = K.to_float32(K.round_to(pred, p.src_dtype))  # what an export would write
        t = result.tallies[(i, p.name)]
        t.err += K.sq_norm(pred - real)
        t.move += K.sq_norm(real - base)


def write_csv(result: BacktestResult, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = result.rows()
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def plot_errors(result: BacktestResult, path: str | Path) -> Path:
    """Model-wide relative error vs horizon, one line per method (and cutoff)."""
    from pipeline.report.plots import subplots

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    series: dict[str, list[tuple[int, float]]] = {}
    cutoffs = sorted({c.cutoff for c in result.cases})
    for i, c in enumerate(result.cases):
        key = c.label if len(cutoffs) == 1 else f"{c.label}, cutoff {c.cutoff}"
        series.setdefault(key, []).append((c.target - c.cutoff, result.overall(i).rel))
    fig, ax = subplots(figsize=(7, 4.5))
    for key, pts in series.items():
        pts.sort()
        style = "k--" if key.startswith(NO_CHANGE) else "-o"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=key, markersize=4)
    ax.set_xlabel("horizon (steps beyond the last known checkpoint)")
    ax.set_ylabel("||W_pred - W_real|| / ||W_real - W_cutoff||")
    ax.set_title("Backtest: relative error of predicted weights (1 = no change)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


BACKTEST_FILES = ("backtest.csv", "backtest.png")


def check_backtest_out(source: WeightSource, out: str | Path) -> None:
    """Refuse a backtest folder inside the store or checkpoints it reads."""
    paths = source.input_paths() if hasattr(source, "input_paths") else []
    check_output(out, paths, writes=BACKTEST_FILES)


def backtest_to_folder(source: WeightSource, out: str | Path, cases: list[Case] | None = None,
                       progress: bool = True) -> tuple[BacktestResult, Path, Path]:
    """Run the backtest (default cases: hold out the later half) and write CSV + PNG.

    ``out`` is checked first: it may not be, or sit inside, anything the source reads.
    """
    out = Path(out)
    check_backtest_out(source, out)
    res = run_backtest(source, cases if cases is not None else plan_cases(source.steps),
                       progress=progress)
    csv_name, png_name = BACKTEST_FILES
    return res, write_csv(res, out / csv_name), plot_errors(res, out / png_name)


def print_backtest(result: BacktestResult, per_tensor: bool = False) -> None:
    """Model-wide relative error per case (and per tensor on request) as terminal tables."""
    from pipeline.console import print_table

    cols = ["cutoff", "target", "horizon", "method", "alpha", "rel_error"]
    print_table("Backtest: ||W_pred - W_real|| / ||W_real - W_cutoff|| (no-change = 1)",
                cols, [[r[c] for c in cols] for r in result.rows(per_tensor=False)])
    if per_tensor:
        print_table("Per tensor", [*cols, "tensor"],
                    [[r[c] for c in [*cols, "tensor"]] for r in result.rows()
                     if r["tensor"] != ALL])
