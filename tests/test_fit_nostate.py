"""``fit_store(keep_state=False)`` / ``rlvr-lin fit --no-state`` on a REAL tiny run.

Same results and histograms as the default fit, a much smaller fit folder (no float64
sufficient statistics), and a later fit of the same folder starts afresh instead of
resuming from state that was never written.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fit_checks import assert_same_fit
from typer.testing import CliRunner

from pipeline.checkpoints.discover import discover_checkpoints
from pipeline.compute import dask_client
from pipeline.fit import fit_store
from pipeline.fit.results import ELEMENTS, read_meta
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


def test_no_state_same_results_smaller_folder(store, default_fit, client) -> None:
    out = store.parent / "nostate.fit"
    rep = fit_store(store, out, client=client, progress=False, keep_state=False)
    assert not rep.incremental and rep.steps == default_fit.steps
    assert read_meta(out)["state"] is False and read_meta(default_fit.fit_dir)["state"] is True
    assert not (out / ELEMENTS / "state").exists()
    assert (default_fit.fit_dir / ELEMENTS / "state").exists()
    assert_same_fit(out, default_fit.fit_dir, csv=True)
    for sel in ("moving", "paper"):
        assert rep.histograms[sel].equals(default_fit.histograms[sel])
    small, big = _bytes(out), _bytes(default_fit.fit_dir)
    print(f"\nfit folder bytes: no-state {small}, default {big}, ratio {small / big:.3f}")
    assert small < big / 2
    # up to date and still without state: nothing is read, nothing written
    again = fit_store(store, out, client=client, progress=False, keep_state=False)
    assert again.new_steps == [] and again.bytes_read == 0
    # asking for state on a stateless fit refits (writing state) instead of reusing it
    withstate = fit_store(store, out, client=client, progress=False)
    assert not withstate.incremental and withstate.new_steps == withstate.steps
    assert read_meta(out)["state"] is True and (out / ELEMENTS / "state").exists()
    assert_same_fit(out, default_fit.fit_dir, csv=True)
    # and --no-state on a fit with state drops it (a fresh fit, no stale state left)
    dropped = fit_store(store, out, client=client, progress=False, keep_state=False)
    assert not dropped.incremental and not (out / ELEMENTS / "state").exists()
    assert_same_fit(out, default_fit.fit_dir, csv=True)


@pytest.mark.parametrize("refit_state", [False, True], ids=["no-state", "default"])
def test_append_after_no_state_fits_afresh(tiny_run_bf16, copy_run, tmp_path, client, store,
                                           default_fit, refit_state) -> None:
    run = copy_run(tiny_run_bf16)
    held = tmp_path / "held"
    held.mkdir()
    last = discover_checkpoints(run)[-1]
    shutil.move(str(last.path), held / last.path.name)
    s = tmp_path / "run.zarr"
    ingest(run, s, client=client, progress=False)
    first = fit_store(s, client=client, progress=False, keep_state=False)
    assert first.steps == default_fit.steps[:-1]
    shutil.move(str(held / last.path.name), run / last.path.name)  # one more step lands
    ingest(run, s, client=client, progress=False)
    upd = fit_store(s, client=client, progress=False, keep_state=refit_state)
    assert not upd.incremental and upd.new_steps == upd.steps == default_fit.steps
    assert read_meta(upd.fit_dir)["state"] is refit_state
    assert_same_fit(upd.fit_dir, default_fit.fit_dir, csv=True)
    for sel in ("moving", "paper"):
        assert upd.histograms[sel].equals(default_fit.histograms[sel])


def test_cli_no_state(store, default_fit, tmp_path) -> None:
    from pipeline.cli import app

    out = tmp_path / "cli.fit"
    res = CliRunner(env={"COLUMNS": "200"}).invoke(
        app, ["fit", str(store), "--out", str(out), "--no-state", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "fitted from scratch" in res.output
    assert read_meta(out)["state"] is False and not (out / ELEMENTS / "state").exists()
    assert_same_fit(out, default_fit.fit_dir, csv=True)
