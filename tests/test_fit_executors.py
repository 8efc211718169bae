"""The fit runs the same on every executor: in this process (serial) and on Dask workers."""

from __future__ import annotations

import os

from fit_checks import assert_same_fit
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.compute import dask_client
from pipeline.fit import fit_store
from pipeline.fit.source import StoreRef
from pipeline.store.ingest import ingest


class PidRef(StoreRef):
    """A StoreRef that records which process opened it (the fit tasks' process)."""

    def open(self, n_steps=None):
        with open(f"{self.path}.pids", "a") as f:
            f.write(f"{os.getpid()}\n")
        return super().open(n_steps)


def _pids(store) -> set[int]:
    p = f"{store}.pids"
    out = {int(x) for x in open(p).read().split()}
    os.remove(p)
    return out


def test_serial_and_dask_fits_are_identical(tiny_run_fp32, tmp_path):
    store = tmp_path / "run.zarr"
    with dask_client(n_workers=2, memory_limit="2GB") as c:
        ingest(tiny_run_fp32, store, client=c, progress=False)
        ref = PidRef(str(store.resolve()))
        fit_store(store, tmp_path / "dask.fit", client=c, source=ref, progress=False,
                  block_bytes=64 << 10)
        dask_pids = _pids(store.resolve())
    fit_store(store, tmp_path / "serial.fit", executor="serial", source=ref, progress=False,
              block_bytes=64 << 10)
    assert _pids(store.resolve()) == {os.getpid()}  # every task ran here
    assert dask_pids - {os.getpid()}  # the driver opens it too, but the tasks ran in workers
    assert_same_fit(tmp_path / "dask.fit", tmp_path / "serial.fit", csv=True)


def test_cli_refuses_unknown_backend_and_executor(tmp_path):
    r = CliRunner().invoke(app, ["fit", str(tmp_path / "x.zarr"), "--executor", "warp"])
    assert r.exit_code == 2 and "warp" in r.output
    r = CliRunner().invoke(app, ["fit", str(tmp_path / "x.zarr"), "--backend", "cuda9"])
    assert r.exit_code == 2 and "cuda9" in r.output


class Labelled:
    """A store source that labels its arrays itself (as a log-prob store will)."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def labels(self, name: str) -> tuple[int, str]:
        return (len(name) % 3, "custom")


class LabelledRef(StoreRef):
    def open(self, n_steps=None):
        return Labelled(super().open(n_steps))


def test_layer_and_module_labels_come_from_the_source(tiny_run_fp32, tmp_path):
    store = tmp_path / "run.zarr"
    ingest(tiny_run_fp32, store, progress=False)
    rep = fit_store(store, tmp_path / "l.fit", executor="serial", progress=False,
                    source=LabelledRef(str(store.resolve())))
    ds = rep.histograms["moving"]
    assert set(ds.module.values) == {"custom"}
    assert sorted(set(int(v) for v in ds.layer.values)) == sorted(
        {len(n) % 3 for n in rep.result().tensor_names})
