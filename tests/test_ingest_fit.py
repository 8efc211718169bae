"""``ingest --fit``: the fit follows the store as steps land, and equals a fresh fit."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from fit_checks import assert_same_fit

import pipeline
from pipeline.fit.job import fit_store


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True,
                          text=True, timeout=600)


def test_ingest_fit_follows_new_steps_and_equals_fresh_fit(
    tiny_run_bf16: Path, copy_run, tmp_path: Path
) -> None:
    run = copy_run(tiny_run_bf16)
    later = tmp_path / "later"
    later.mkdir()
    for step in (60, 70, 80, 90, 100):
        shutil.move(run / f"global_step_{step}", later / f"global_step_{step}")
    store = tmp_path / "run.zarr"

    first = run_cli("ingest", str(run), "--store", str(store), "--fit", "--no-progress")
    assert first.returncode == 0, first.stderr
    assert "new steps [0, 10, 20, 30, 40, 50]" in first.stderr
    assert pipeline.open_fit(store).steps == [0, 10, 20, 30, 40, 50]

    for step in (60, 70):
        shutil.move(later / f"global_step_{step}", run / f"global_step_{step}")
    second = run_cli("ingest", str(run), "--store", str(store), "--fit", "--no-progress")
    assert second.returncode == 0, second.stderr
    assert "new steps [60, 70]" in second.stderr

    updated = pipeline.open_fit(store)
    assert updated.steps == [0, 10, 20, 30, 40, 50, 60, 70]
    fresh = fit_store(store, tmp_path / "fresh.fit", full=True, progress=False)
    assert_same_fit(updated.path, fresh.fit_dir)
