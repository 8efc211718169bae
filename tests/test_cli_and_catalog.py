"""CLI error contract and the data catalog."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.catalog import load_catalog, lookup
from pipeline.errors import PipelineError

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_bad_arch_is_one_line_error_exit_2(tmp_path: Path) -> None:
    r = run_cli("make-tiny-run", str(tmp_path / "x"), "--arch", "gpt9")
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines == ["error: unknown --arch 'gpt9' (expected qwen2 or llama)"]
    assert not (tmp_path / "x").exists()


def test_repo_catalog_is_valid_and_paths_resolve() -> None:
    cat = load_catalog(REPO / "data_catalog.yaml")
    assert cat.default in cat.runs
    entry = cat.runs[cat.default]
    assert entry.checkpoints.is_absolute()
    assert entry.checkpoints.is_relative_to(REPO)
    assert entry.tiny_run is not None


def test_catalog_errors_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "c.yaml"
    bad.write_text("runs:\n  r1:\n    checkpoints: a\n    store: b\n")
    with pytest.raises(PipelineError) as e:
        load_catalog(bad)
    assert str(bad) in str(e.value) and "outputs" in str(e.value)
    assert "\n" not in str(e.value)
    good = tmp_path / "g.yaml"
    good.write_text("runs:\n  r1:\n    checkpoints: a\n    store: b\n    outputs: c\n")
    assert lookup("r1", good).store == tmp_path / "b"
    with pytest.raises(PipelineError, match="no run named 'nope'.*known: r1"):
        lookup("nope", good)
