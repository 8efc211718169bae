"""The linearity alarm: how well the earlier checkpoints forecast the newest one.

One number per forecast, the backtest's (``pipeline.extrapolate.backtest``):

    rel = ||W_pred - W_real|| / ||W_real - W_last_known||

over the model's float tensors, where W_pred is a registered method's
prediction (``pipeline.extrapolate.methods``, two-point by default) from the
known steps. "No change" scores exactly 1 and a random walk forecast by its
own two-point line about sqrt(2), so a run whose new checkpoint scores near
or above 1 is no longer moving on a line: extrapolating it (an export, an
RL-Extra jump) would not help. Two users:

- ``ingest --watch --alarm-threshold`` (:func:`alarm_for_step` on the store
  after every committed checkpoint, records appended to ``alarm.jsonl``);
- the adaptive RL-Extra policy (``pipeline.rl.extra.Adaptive``), which
  forecasts a segment's end from in-memory snapshots through
  :class:`ArraySource` and :func:`forecast_error`.

Both go through ``run_backtest``, so "the forecast error" is computed in one
place (rounding to the source dtype, streaming row blocks, float64 sums).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import PipelineError, check_int, check_number
from pipeline.extrapolate import methods as M
from pipeline.extrapolate.plan import DEFAULT_EXCLUDE

ALARM_FILE = "alarm.jsonl"
DEFAULT_ALARM_METHOD = "two-point"
DEFAULT_ALARM_THRESHOLD = 1.0  # no better than "no change"


class ArraySource:
    """In-memory weights ``{step: {name: array}}`` as a ``WeightSource`` (for the backtest).

    The adaptive RL-Extra policy keeps float32 snapshots of a segment in
    memory; wrapping them lets the backtest score them exactly as it scores
    a store or checkpoint folders.
    """

    def __init__(self, weights: Mapping[int, Mapping[str, np.ndarray]]) -> None:
        if not weights:
            raise PipelineError("no snapshots given")
        self._w = {int(s): dict(v) for s, v in weights.items()}
        names = [set(v) for v in self._w.values()]
        if any(n != names[0] for n in names):
            raise PipelineError("snapshots hold different tensors")
        self._names = sorted(names[0])

    @property
    def steps(self) -> list[int]:
        return sorted(self._w)

    @property
    def tensor_names(self) -> list[str]:
        return list(self._names)

    def _any(self, name: str) -> np.ndarray:
        return self._w[self.steps[0]][name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._any(name).shape)

    def dtype(self, name: str) -> np.dtype:
        return self._any(name).dtype

    def chunk_rows(self, name: str) -> int:
        shape = self.shape(name)
        return shape[0] if shape else 1

    def labels(self, name: str) -> tuple[int, str]:
        from pipeline.steps.source import weight_labels

        return weight_labels(name)

    def read(self, name: str, step: int, rows: slice | None = None) -> np.ndarray:
        a = self._w[step][name]
        return a if rows is None else a[rows]

    def read_block(self, name: str, steps: Any = None, rows: slice | None = None,
                   out: np.ndarray | None = None) -> np.ndarray:
        from pipeline.steps.source import positions

        idx = positions(steps, len(self.steps))
        block = np.stack([self.read(name, self.steps[i], rows) for i in idx])
        if out is not None:
            out[...] = block
            return out
        return block

    @property
    def files_folder(self) -> Path | None:
        return None

    @property
    def config(self) -> dict[str, Any] | None:
        return None

    def input_paths(self) -> list[tuple[str, Path]]:
        return []


def forecast_method(name: str) -> M.Method:
    """A registered method usable for a forecast: no per-matrix pre-pass (rank1 has one)."""
    m = M.get(name)
    if m.params and not m.typical_params():
        raise PipelineError(f"method {name!r} needs parameters a forecast cannot choose")
    return m


def forecast_used(method: M.Method, known: Sequence[int]) -> tuple[int, ...]:
    """The known steps a method reads: the first and last for a pair method, all otherwise."""
    known = sorted(known)
    if len(known) < 2:
        raise PipelineError(f"a forecast needs at least 2 known steps, got {known}")
    return (known[0], known[-1]) if method.step_rule == "pair" else tuple(known)


@dataclass(frozen=True)
class Forecast:
    """One forecast: the known steps, the predicted step and the backtest's sums."""

    method: str
    used: tuple[int, ...]
    target: int
    err_sq: float  # ||pred - real||^2 over the scored tensors (float64 sums)
    move_sq: float  # ||real - W_last_known||^2

    @property
    def rel(self) -> float:
        """||pred - real|| / ||real - last known|| (1: no better than "no change")."""
        if self.move_sq == 0.0:
            return 0.0 if self.err_sq == 0.0 else math.inf
        return math.sqrt(self.err_sq / self.move_sq)


def forecast_error(source: Any, known: Sequence[int], target: int,
                   method: str = DEFAULT_ALARM_METHOD, include: Sequence[str] = ("*",),
                   exclude: Sequence[str] = DEFAULT_EXCLUDE) -> Forecast:
    """The backtest's model-wide relative error of ``target`` predicted from ``known``."""
    from pipeline.extrapolate.backtest import Case, run_backtest

    m = forecast_method(method)
    used = forecast_used(m, known)
    if target <= used[-1]:
        raise PipelineError(f"the forecast target {target} must be after the known steps {used}")
    params = tuple(sorted(m.typical_params().items()))
    res = run_backtest(source, [Case(m.name, used, target, params)], include=include,
                       exclude=exclude)
    t = res.overall(0)
    return Forecast(m.name, used, target, t.err, t.move)


@dataclass(frozen=True)
class AlarmRecord:
    """One line of ``alarm.jsonl``: the newest step's forecast error and the verdict."""

    step: int
    known: list[int]
    method: str
    rel_error: float | None  # None: fewer than 3 steps stored, nothing to forecast from
    threshold: float
    status: str  # "ok", "alarm" or "warming-up"

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["rel_error"] is not None and not math.isfinite(d["rel_error"]):
            d["rel_error"] = None if math.isnan(d["rel_error"]) else "inf"
        return d

    def line(self) -> str:
        """What ``ingest --watch`` prints."""
        if self.rel_error is None:
            return (f"linearity alarm: step {self.step}: {len(self.known)} earlier step(s), "
                    "need 2 to forecast")
        verdict = "ALARM: no longer linear" if self.status == "alarm" else "ok"
        return (f"linearity alarm: step {self.step} forecast from {self.known} ({self.method}): "
                f"relative error {self.rel_error:.3f} (threshold {self.threshold:g}): {verdict}")


def check_alarm(threshold: float, window: int) -> None:
    """Refuse a non-positive threshold or a window under 2 steps (one line each)."""
    check_number(threshold, "--alarm-threshold", 0.0, low_open=True)
    check_int(window, "--alarm-window", 2)


def alarm_for_step(source: Any, step: int, threshold: float = DEFAULT_ALARM_THRESHOLD,
                   method: str = DEFAULT_ALARM_METHOD, window: int = 2,
                   include: Sequence[str] = ("*",),
                   exclude: Sequence[str] = DEFAULT_EXCLUDE) -> AlarmRecord:
    """Forecast ``step`` from the ``window`` steps stored before it and judge it.

    ``window`` 2 with two-point is the shortest line (the two previous
    checkpoints); a longer window with ``lstsq`` smooths the noise of a run
    that checkpoints often. Norm layers are predicted as "no change", as an
    export would copy them.
    """
    check_alarm(threshold, window)
    forecast_method(method)
    earlier = [s for s in source.steps if s < step][-window:]
    if step not in source.steps:
        raise PipelineError(f"step {step} is not stored (has {source.steps})")
    if len(earlier) < 2:
        return AlarmRecord(step, earlier, method, None, threshold, "warming-up")
    f = forecast_error(source, earlier, step, method, include, exclude)
    status = "ok" if f.rel <= threshold else "alarm"
    return AlarmRecord(step, earlier, method, f.rel, threshold, status)


def append_alarm(path: str | Path, rec: AlarmRecord) -> Path:
    """Append one record to the JSONL file (one write + fsync: a reader sees whole lines)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(rec.as_dict(), sort_keys=True) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def read_alarms(path: str | Path) -> list[dict[str, Any]]:
    """The records of an ``alarm.jsonl`` (a torn last line is ignored)."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def alarm_path(store: str | Path, outputs: str | Path | None) -> Path:
    """Where the alarm records go: a catalog entry's ``outputs/alarm.jsonl``, else beside
    the store (``run.zarr.alarm.jsonl``: never inside it, where only ingest writes)."""
    if outputs is not None:
        return Path(outputs) / ALARM_FILE
    store = Path(store)
    return store.with_name(f"{store.name}.{ALARM_FILE}")


def alarm_new_steps(store: str | Path, path: str | Path,
                    threshold: float = DEFAULT_ALARM_THRESHOLD,
                    method: str = DEFAULT_ALARM_METHOD, window: int = 2) -> list[AlarmRecord]:
    """Judge every stored step after the last one ``path`` holds; append and return them.

    Called after each committed ingest pass (``ingest --watch --alarm-threshold``):
    a pass may commit several checkpoints, each is forecast from the ones
    stored before it. Reads the store through ``StoreSource`` (row blocks).
    """
    from pipeline.extrapolate.sources import StoreSource

    check_alarm(threshold, window)
    forecast_method(method)
    done = {int(r["step"]) for r in read_alarms(path) if "step" in r}
    last = max(done, default=None)
    src = StoreSource(store)
    out = []
    for step in src.steps:
        if last is not None and step <= last:
            continue
        rec = alarm_for_step(src, step, threshold, method, window)
        append_alarm(path, rec)
        out.append(rec)
    return out
