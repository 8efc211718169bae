"""Faults during a job: the result equals an undisturbed run's and nothing stored is corrupt.

Real faults, no mocks: a Dask worker process is SIGKILLed while it runs an
ingest task (the nanny restarts it, the scheduler moves its tasks), and the
scheduler itself is SIGKILLed mid-ingest and mid-fit (the command fails with
a one-line error, the store keeps its committed steps, a re-run on a new
scheduler finishes the job). The kill is triggered from inside the job by a
worker plugin (``tests/faults.py``), so it lands mid-job on any machine. A
worker killed during the fit is ``tests/test_fit_dask.py``; a SLURM job
cancelled mid-fit is ``tests/test_slurm.py``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fit_checks import assert_same_fit

from pipeline.compute import dask_client
from pipeline.fit import fit_store
from pipeline.store.ingest import ingest
from pipeline.store.reader import open_run

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
BIN = Path(sys.executable).parent


def assert_same_store(a: Path, b: Path) -> None:
    """Same committed steps, tensors, dtypes and every decoded bit of every step."""
    ra, rb = open_run(a), open_run(b)
    assert ra.steps == rb.steps and ra.tensor_names == rb.tensor_names
    for name in ra.tensor_names:
        assert ra.dtype(name) == rb.dtype(name) and ra.shape(name) == rb.shape(name)
        np.testing.assert_array_equal(ra.read_bits(name), rb.read_bits(name), err_msg=name)
    strip = ("seconds", "ingested_at", "time")
    assert ([{k: v for k, v in r.items() if k not in strip} for r in ra.records]
            == [{k: v for k, v in r.items() if k not in strip} for r in rb.records])


@pytest.fixture(scope="module")
def reference(tiny_run_bf16, tmp_path_factory) -> tuple[Path, Path]:
    """(store, fit folder) of an undisturbed ingest and fit of the bf16 layout run."""
    d = tmp_path_factory.mktemp("reference")
    with dask_client(n_workers=1) as c:
        ingest(tiny_run_bf16, d / "run.zarr", client=c, progress=False)
        fit_store(d / "run.zarr", d / "run.fit", client=c, progress=False, block_bytes=64 << 10)
    return d / "run.zarr", d / "run.fit"


def test_worker_killed_during_ingest(tiny_run_bf16, reference, tmp_path):
    from faults import KillAtTask

    marker = tmp_path / "killed"
    store = tmp_path / "run.zarr"
    with dask_client(n_workers=2) as c:
        before = set(c.run(os.getpid).values())
        c.register_plugin(KillAtTask(3, marker))
        ingest(tiny_run_bf16, store, client=c, progress=False)
        c.wait_for_workers(2, timeout=60)
        after = set(c.run(os.getpid).values())
    assert marker.exists(), "the fault never fired: the test proved nothing"
    victim = int(marker.read_text().split()[0])
    assert victim in before and victim not in after  # really killed, and replaced
    assert_same_store(reference[0], store)


# -- the scheduler killed ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """A ``dask scheduler`` and one ``dask worker`` on loopback, as separate processes."""

    def __init__(self, logs: Path, fault_marker: Path | None = None) -> None:
        self.port = _free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)])}
        self.scheduler = self._start(["scheduler", "--host", "127.0.0.1", "--port",
                                      str(self.port), "--no-dashboard"], logs / "scheduler.log",
                                     env)
        if fault_marker is not None:  # the worker kills the scheduler at its 3rd task
            env = {**env, "RLVR_FAULT_MARKER": str(fault_marker), "RLVR_FAULT_N": "3",
                   "RLVR_FAULT_PID": str(self.scheduler.pid)}
        self._start(["worker", self.address, "--host", "127.0.0.1", "--nthreads", "1",
                     "--nworkers", "1", "--no-dashboard", "--memory-limit", "2GB",
                     "--preload", "faults"], logs / "worker.log", env)
        from distributed import Client

        with Client(self.address, timeout="60s") as c:
            c.wait_for_workers(1, timeout=60)

    def _start(self, args: list[str], log: Path, env: dict) -> subprocess.Popen:
        p = subprocess.Popen([str(BIN / "dask"), *args], stdout=open(log, "w"),
                             stderr=subprocess.STDOUT, env=env, cwd=REPO)
        self.procs.append(p)
        return p

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.kill()
            p.wait(30)


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(BIN / "rlvr-lin"), *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=timeout)


def _one_line_error(p: subprocess.CompletedProcess) -> str:
    assert p.returncode != 0, p.stdout + p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    return lines[0]


@pytest.mark.parametrize("job", ["ingest", "fit"])
def test_scheduler_killed_then_rerun(job, tiny_run_bf16, reference, tmp_path):
    store, fit_dir = tmp_path / "run.zarr", tmp_path / "run.fit"
    if job == "fit":
        with dask_client(n_workers=1) as c:
            ingest(tiny_run_bf16, store, client=c, progress=False)
    cmd = ([job, str(tiny_run_bf16), "--store", str(store)] if job == "ingest"
           else [job, str(store), "--out", str(fit_dir), "--block-mb", "0.0625"])
    marker = tmp_path / "killed"
    cl = Cluster(tmp_path, fault_marker=marker)
    try:
        p = _cli(*cmd, "--cluster", cl.address, "--no-progress")
    finally:
        cl.stop()
    assert marker.exists(), "the fault never fired: the test proved nothing"
    assert cl.scheduler.returncode == -9
    line = _one_line_error(p)
    assert "scheduler" in line.lower() and cl.address in line, line
    # what was committed before the kill is readable, and only that
    steps = open_run(store).steps
    assert steps == open_run(reference[0]).steps[:len(steps)]
    # the workflow re-run on a fresh scheduler finishes the job, identical to an undisturbed one
    (tmp_path / "again").mkdir()
    cl = Cluster(tmp_path / "again")
    try:
        p = _cli(*cmd, "--cluster", cl.address, "--no-progress")
    finally:
        cl.stop()
    assert p.returncode == 0, p.stdout + p.stderr
    assert_same_store(reference[0], store)
    if job == "fit":
        assert_same_fit(reference[1], fit_dir)
