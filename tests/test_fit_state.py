"""The fit keeps no state (since schema 4) on a REAL tiny run: 12 bytes an element written.

A fit writes only the float32 results (slope, intercept, R²; each element's null
R² too with ``--null-elements``); an older fit folder (schema 3, with its
float64 state) is replaced by a fresh fit without stale state; ``keep_state``
is still accepted (ignored) so older callers keep working; the CLI's
``--state/--no-state`` is gone.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from fit_checks import assert_same_fit
from typer.testing import CliRunner

from pipeline.checkpoints.discover import discover_checkpoints
from pipeline.compute import dask_client
from pipeline.errors import PipelineError
from pipeline.fit import fit_store, open_fit
from pipeline.fit.results import ELEMENTS, SCHEMA_VERSION, read_meta
from pipeline.fit.source import StoreRef
from pipeline.store.ingest import ingest


@pytest.fixture(scope="module")
def client():
    with dask_client(n_workers=2, memory_limit="3GB") as c:
        yield c


@pytest.fixture(scope="module")
def store(tiny_run_bf16, tmp_path_factory, client) -> Path:
    s = tmp_path_factory.mktemp("nostate") / "run.zarr"
    ingest(tiny_run_bf16, s, client=client, progress=False)
    return s


@pytest.fixture(scope="module")
def default_fit(store, client):
    return fit_store(store, store.parent / "default.fit", client=client, progress=False)


def _bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def test_only_float32_results_are_written(store, default_fit, client) -> None:
    src_elems = sum(default_fit.histograms["moving"].n_elements.values)
    elems = _bytes(default_fit.fit_dir / ELEMENTS)
    per_element = elems / src_elems
    print(f"\nfit bytes written per element: {per_element:.2f} (elements.zarr)")
    assert 12 <= per_element < 12 * 1.3  # 3 float32 results + array metadata
    assert not (default_fit.fit_dir / ELEMENTS / "state").exists()
    meta = read_meta(default_fit.fit_dir)
    assert meta["schema_version"] == SCHEMA_VERSION and "state" not in meta
    # older callers' keep_state is ignored: the same fit, up to date, nothing read
    for keep in (False, True):
        again = fit_store(store, default_fit.fit_dir, client=client, progress=False,
                          keep_state=keep)
        assert again.new_steps == [] and again.bytes_read == 0


def test_an_older_fit_with_state_is_refitted_without_it(store, default_fit, client,
                                                         tmp_path) -> None:
    import zarr

    from pipeline.fit.results import write_meta

    out = tmp_path / "old.fit"
    shutil.copytree(default_fit.fit_dir, out)
    meta = read_meta(out)
    write_meta(out, {**meta, "schema_version": 3, "state": True})
    zarr.open_group(str(out / ELEMENTS), mode="r+").create_group("state")
    assert (out / ELEMENTS / "state").exists()
    rep = fit_store(store, out, client=client, progress=False)
    assert rep.new_steps == rep.steps == default_fit.steps  # refitted, not trusted
    assert not (out / ELEMENTS / "state").exists()
    assert read_meta(out)["schema_version"] == SCHEMA_VERSION
    assert_same_fit(out, default_fit.fit_dir, csv=True)


def test_append_one_step_equals_fresh_fit(tiny_run_bf16, copy_run, tmp_path, client,
                                          default_fit) -> None:
    run = copy_run(tiny_run_bf16)
    held = tmp_path / "held"
    held.mkdir()
    last = discover_checkpoints(run)[-1]
    shutil.move(str(last.path), held / last.path.name)
    s = tmp_path / "run.zarr"
    ingest(run, s, client=client, progress=False)
    first = fit_store(s, client=client, progress=False)
    assert first.steps == default_fit.steps[:-1]
    shutil.move(str(held / last.path.name), run / last.path.name)  # one more step lands
    ingest(run, s, client=client, progress=False)
    upd = fit_store(s, client=client, progress=False)
    assert upd.new_steps == [last.step] and upd.steps == default_fit.steps
    assert_same_fit(upd.fit_dir, default_fit.fit_dir, csv=True)


def test_cli_has_no_state_option_and_takes_a_backend(store, default_fit, tmp_path) -> None:
    from pipeline.cli import app

    out = tmp_path / "cli.fit"
    res = CliRunner().invoke(app, ["fit", str(store), "--out", str(out), "--no-state",
                                   "--no-progress"])
    assert res.exit_code == 2 and not out.exists()
    res = CliRunner().invoke(app, ["fit", str(store), "--out", str(out), "--backend", "nope",
                                   "--no-progress"])
    assert res.exit_code == 2 and "nope" in res.output and not out.exists()  # Typer's choices
    res = CliRunner(env={"COLUMNS": "200"}).invoke(
        app, ["fit", str(store), "--out", str(out), "--backend", "torch-cpu", "--no-progress",
              "--null-elements"])
    assert res.exit_code == 0, res.output
    assert "fitted from scratch" in res.output
    # per-element results (each null too) and counts equal the numba backend's; only the
    # float64 R² sums may round apart
    numba = fit_store(store, tmp_path / "numba.fit", executor="serial", progress=False,
                      null_elements=True)
    a, b = open_fit(out), open_fit(numba.fit_dir)
    for name in a.tensor_names:
        assert sorted(a[name].data_vars) == ["intercept", "null_r2", "r2", "slope"], name
        for var in ("slope", "intercept", "r2", "null_r2"):
            np.testing.assert_array_equal(a[name][var].values, b[name][var].values)
    for sel in ("moving", "paper"):
        ha, hb = a.histograms(sel), b.histograms(sel)
        for var in ("count", "null_count", "n_static", "n_nonfinite", "n_selected"):
            np.testing.assert_array_equal(ha[var].values, hb[var].values)
        np.testing.assert_allclose(ha.r2_sum.values, hb.r2_sum.values, rtol=1e-12)


@dataclass(frozen=True)
class FailingSource:
    """The store, whose reads fail once ``count`` holds ``after`` marks (an interrupted fit)."""

    inner: StoreRef
    count: str
    after: int

    def open(self, n_steps: int | None = None):
        return _Failing(self.inner.open(n_steps), self.count, self.after)


class _Failing:
    def __init__(self, src, count: str, after: int) -> None:
        self._src, self._count, self._after = src, count, after

    def __getattr__(self, name):
        return getattr(self._src, name)

    def read_block(self, *args, **kwargs):
        with open(self._count, "ab") as f:
            f.write(b".")
        if os.path.getsize(self._count) > self._after:
            raise OSError("the disk went away")
        return self._src.read_block(*args, **kwargs)


def _chunk_inodes(fit_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(fit_dir)): p.stat().st_ino
            for p in (fit_dir / ELEMENTS / "tensors").rglob("c.*")}


def test_a_refit_overwrites_in_place_and_an_interrupted_one_is_incomplete(
        store, default_fit, tmp_path) -> None:
    out = tmp_path / "again.fit"
    shutil.copytree(default_fit.fit_dir, out)
    inodes = _chunk_inodes(out)
    assert len(inodes) > 10
    # an interrupted refit: "complete" was unset before its first chunk was rewritten
    src = FailingSource(StoreRef.of(store), str(tmp_path / "reads"), 3)
    with pytest.raises(OSError, match="went away"):
        fit_store(store, out, executor="serial", source=src, full=True, progress=False)
    assert (tmp_path / "reads").stat().st_size > 3  # it did start reading
    with pytest.raises(PipelineError, match="incomplete"):
        open_fit(out)
    rep = fit_store(store, out, executor="serial", progress=False)  # not trusted: refitted
    assert rep.new_steps == rep.steps == default_fit.steps
    assert_same_fit(out, default_fit.fit_dir, csv=True)
    assert _chunk_inodes(out) == inodes  # the same files, rewritten in place


def test_a_refit_does_not_write_through_a_symlinked_chunk(store, default_fit,
                                                         tmp_path) -> None:
    out = tmp_path / "linked.fit"
    shutil.copytree(default_fit.fit_dir, out)
    chunk = sorted((out / ELEMENTS / "tensors").rglob("c.*"))[0]
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"precious" * 100)
    chunk.unlink()
    chunk.symlink_to(victim)
    with pytest.raises(PipelineError, match="symlink") as e:
        fit_store(store, out, executor="serial", full=True, progress=False)
    assert chunk.name in str(e.value)
    assert victim.read_bytes() == b"precious" * 100
