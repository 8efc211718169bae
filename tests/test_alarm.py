"""The linearity alarm on a real store grown checkpoint by checkpoint.

The store is ingested from the cached fp32 tiny GRPO run one checkpoint at a
time; after each commit the alarm forecasts the new step from the two before
it. Every error is recomputed with numpy in float64 from the checkpoint files
(two-point line, norm layers as "no change", as an export copies them). A
checkpoint that breaks the line on purpose (the run jumps back to an earlier
model) must raise the alarm.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from pipeline.errors import PipelineError
from pipeline.extrapolate.alarm import (
    ALARM_FILE,
    alarm_for_step,
    alarm_new_steps,
    alarm_path,
    read_alarms,
)
from pipeline.extrapolate.plan import DEFAULT_EXCLUDE, matches


def _weights(folder: Path) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float64) for k, v in load_file(folder / "model.safetensors").items()}


def _rel(w0: dict, w1: dict, real: dict) -> float:
    """Two-point forecast of ``real`` from w0, w1 (equally spaced): numpy, float64."""
    err = move = 0.0
    for name, r in real.items():
        pred = w1[name] if matches(name, DEFAULT_EXCLUDE) else 2 * w1[name] - w0[name]
        err += float(np.sum((pred - r) ** 2))
        move += float(np.sum((r - w1[name]) ** 2))
    return math.sqrt(err / move)


def _ingest(run: Path, store: Path) -> None:
    from distributed import Client

    from pipeline.store.ingest import ingest

    with Client(processes=False, n_workers=1, threads_per_worker=1,
                dashboard_address=":0") as client:
        ingest(run, store, client=client, progress=False)


def test_the_alarm_follows_a_growing_store(tiny_run_fp32, tmp_path):
    src, run, store = tiny_run_fp32, tmp_path / "run", tmp_path / "run.zarr"
    run.mkdir()
    path = alarm_path(store, None)
    assert path == tmp_path / f"run.zarr.{ALARM_FILE}"  # beside the store, never inside
    steps = [0, 10, 20, 30, 40]
    weights = {s: _weights(src / f"global_step_{s}") for s in steps}
    seen = []
    for s in steps:
        shutil.copytree(src / f"global_step_{s}", run / f"global_step_{s}")
        _ingest(run, store)
        new = alarm_new_steps(store, path, threshold=1.0)
        assert [r.step for r in new] == [s]  # only the new checkpoint is judged
        seen += new
    assert [r.status for r in seen[:2]] == ["warming-up"] * 2
    for r in seen[2:]:
        want = _rel(weights[r.step - 20], weights[r.step - 10], weights[r.step])
        assert r.known == [r.step - 20, r.step - 10]
        assert r.rel_error == pytest.approx(want, rel=1e-6)
        assert r.status == ("ok" if want <= 1.0 else "alarm")
        assert 0.05 < r.rel_error < 3
    # the run goes back to its step-10 model: the line is broken, the alarm goes off
    shutil.copytree(src / "global_step_10", run / "global_step_50")
    _ingest(run, store)
    (broken,) = alarm_new_steps(store, path, threshold=1.0)
    want = _rel(weights[30], weights[40], weights[10])
    assert broken.step == 50 and broken.rel_error == pytest.approx(want, rel=1e-6)
    assert broken.rel_error > 1.0 and broken.status == "alarm"
    assert "ALARM" in broken.line()
    # everything is in the JSONL, once, in order; nothing new means nothing appended
    assert alarm_new_steps(store, path, threshold=1.0) == []
    recs = read_alarms(path)
    assert [r["step"] for r in recs] == [0, 10, 20, 30, 40, 50]
    assert recs[-1]["status"] == "alarm" and recs[-1]["threshold"] == 1.0
    # a longer window with the least-squares line is the same measure (one code path)
    from pipeline.extrapolate.sources import StoreSource

    lst = alarm_for_step(StoreSource(store), 40, 1.0, method="lstsq", window=4)
    assert lst.known == [0, 10, 20, 30] and 0.05 < lst.rel_error < 3


@pytest.mark.parametrize("kw, match", [
    ({"threshold": 0.0}, "--alarm-threshold"), ({"threshold": float("nan")}, "--alarm-threshold"),
    ({"window": 1}, "--alarm-window"), ({"method": "nope"}, "unknown method"),
])
def test_bad_alarm_settings_are_refused(tiny_run_fp32, tmp_path, kw, match):
    from pipeline.extrapolate.alarm import ArraySource

    src = ArraySource({0: {"w": np.zeros(2, np.float32)}, 1: {"w": np.ones(2, np.float32)}})
    with pytest.raises(PipelineError, match=match):
        alarm_for_step(src, 1, **{"threshold": 1.0, **kw})


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True,
                          text=True, timeout=600)


def test_ingest_watch_prints_and_records_the_alarm(tiny_run_fp32, tmp_path):
    run, store = tmp_path / "run", tmp_path / "run.zarr"
    run.mkdir()
    for s in (0, 10, 20, 30):
        shutil.copytree(tiny_run_fp32 / f"global_step_{s}", run / f"global_step_{s}")
    shutil.copytree(tiny_run_fp32 / "global_step_0", run / "global_step_40")  # back to the start
    res = _cli("ingest", str(run), "--store", str(store), "--watch", "--until-step", "40",
               "--poll", "0.1", "--settle", "0", "--alarm-threshold", "1.0", "--no-progress")
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("linearity alarm")]
    assert len(lines) == 5 and "ALARM" in lines[-1], res.stderr
    recs = [json.loads(x) for x in (tmp_path / f"run.zarr.{ALARM_FILE}").read_text().splitlines()]
    assert [r["step"] for r in recs] == [0, 10, 20, 30, 40]
    assert recs[-1]["status"] == "alarm" and recs[-1]["rel_error"] > 1.0
    bad = _cli("ingest", str(run), "--store", str(store), "--alarm-threshold", "-1")
    assert bad.returncode != 0 and "--alarm-threshold" in bad.stderr
    assert len([ln for ln in bad.stderr.strip().splitlines() if ln.strip()]) == 1
