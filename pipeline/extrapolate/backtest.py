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
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError, check_int, check_number, check_output
from pipeline.extrapolate import kernels as K
from pipeline.extrapolate.export import rank1_of, row_blocks
from pipeline.extrapolate.plan import DEFAULT_EXCLUDE, TensorPlan, plan_tensors
from pipeline.extrapolate.rank1 import Rank1
from pipeline.extrapolate.sources import WeightSource
from pipeline.fit.kernels import Fit

ALL = "(all)"
NO_CHANGE = "no-change"


@dataclass(frozen=True)
class Case:
    """One prediction: a method, the known steps it uses, and the step it predicts."""

    method: str  # "two-point", "lstsq", "gated", "rank1", "no-change"
    used: tuple[int, ...]  # known steps the method reads (two-point: (t0, t1))
    target: int
    r2_min: float | None = None

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
        if self.method == "two-point":
            return f"two-point(t0={self.used[0]})"
        if self.method == "gated":
            return f"gated(r2>={self.r2_min:g})"
        if self.method in ("lstsq", "rank1"):
            return f"{self.method}({len(self.used)} steps)"
        return self.method


def plan_cases(
    steps: Sequence[int],
    cutoffs: Sequence[int] | None = None,
    holdout: int | None = None,
    r2_mins: Sequence[float] = (0.5, 0.8),
    window: int | None = None,
) -> list[Case]:
    """All cases: per cutoff, each later step x each method.

    Default cutoff: hold out the later half of the steps. Two-point is run
    from the first known step (the paper's setting) and from the step just
    before the cutoff (the shortest baseline), which gives different alphas
    for the same target.
    """
    steps = sorted(steps)
    r2_mins = [check_number(r, "--r2-min", 0.0, 1.0) for r in r2_mins]
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
        t0s = sorted({known[0], known[-2]})
        for t in later:
            cases.append(Case(NO_CHANGE, (c,), t))
            cases += [Case("two-point", (t0, c), t) for t0 in t0s]
            cases.append(Case("lstsq", tuple(known), t))
            cases.append(Case("rank1", tuple(known), t))
            cases += [Case("gated", tuple(known), t, r2_min=r) for r in r2_mins]
    return cases


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
    shapes = {n: [source.shape(n, s) for s in steps] for n in names}
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
    plans = _tensor_plan(source, needed, include, exclude)
    result = BacktestResult(list(cases), [p.name for p in plans])
    for i in range(len(cases)):
        for p in plans:
            result.tallies[(i, p.name)] = Tally()
    n_steps = len(needed)
    it: Iterable[TensorPlan] = plans
    if progress:
        from tqdm import tqdm

        it = tqdm(plans, desc="backtest", unit="tensor")
    for p in it:
        dirs = {c.used: rank1_of(source, p, c.used, block_bytes)
                for c in cases if c.method == "rank1" and p.is_matrix}
        for rows in row_blocks(p.shape, block_bytes, 8 * n_steps + 96):
            vals = {s: source.read(p.name, s, rows) for s in needed}
            _score_block(result, p, vals, rows, dirs)
    return result


def _score_block(result: BacktestResult, p: TensorPlan, vals: dict[int, np.ndarray],
                 rows: slice | None, dirs: dict[tuple[int, ...], Rank1]) -> None:
    f32 = {s: K.to_float32(v) for s, v in vals.items()}
    fits: dict[tuple[int, ...], tuple[Fit, np.ndarray]] = {}
    for i, c in enumerate(result.cases):
        real = f32[c.target]
        base = f32[c.cutoff]
        if c.method == NO_CHANGE or p.action == "copy":
            pred = base
        elif c.method == "two-point":
            pred = K.two_point(vals[c.used[0]], vals[c.used[1]], c.alpha)
        elif c.method == "rank1" and c.used in dirs:
            assert rows is not None  # a matrix
            pred = base.astype(np.float64) + dirs[c.used].drift(rows, c.target - c.cutoff)
        else:
            if c.used not in fits:
                fits[c.used] = K.fit_line((vals[s] for s in c.used), list(c.used))
            fit, last = fits[c.used]
            line = K.line_value(fit.slope, fit.intercept, c.target)
            if c.method == "gated":
                assert c.r2_min is not None
                line = K.gate(line, last.reshape(-1), fit.r2, c.r2_min)
            pred = line.reshape(real.shape)
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    series: dict[str, list[tuple[int, float]]] = {}
    cutoffs = sorted({c.cutoff for c in result.cases})
    for i, c in enumerate(result.cases):
        key = c.label if len(cutoffs) == 1 else f"{c.label}, cutoff {c.cutoff}"
        series.setdefault(key, []).append((c.target - c.cutoff, result.overall(i).rel))
    fig, ax = plt.subplots(figsize=(7, 4.5))
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
    plt.close(fig)
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
