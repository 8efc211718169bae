"""The fit on a real external Dask cluster: same results as the default, and survives a dead worker.

A `dask scheduler` and two `dask worker` processes are started on loopback
(random free ports). Workers run without a nanny, so killing one really
removes it and the scheduler must move its tasks elsewhere.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from fit_checks import assert_same_fit

from pipeline.compute import dask_client
from pipeline.fit import fit_store
from pipeline.fit.source import StoreRef
from pipeline.store.ingest import ingest

DASK = str(Path(sys.executable).with_name("dask"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(scheduler address, {worker pid: Popen}); everything is stopped at the end."""
    logs = tmp_path_factory.mktemp("cluster")
    port = _free_port()
    addr = f"tcp://127.0.0.1:{port}"
    procs: list[subprocess.Popen] = []

    def start(args: list[str], log: str) -> subprocess.Popen:
        # tests/ on the path: the gated source below is pickled by reference to this module
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
        p = subprocess.Popen([DASK, *args], stdout=open(logs / log, "w"), env=env,
                             stderr=subprocess.STDOUT, cwd=Path(__file__).parents[1])
        procs.append(p)
        return p

    start(["scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
          "scheduler.log")
    workers = {}
    for i in range(2):
        w = start(["worker", addr, "--host", "127.0.0.1", "--nthreads", "1", "--no-nanny",
                   "--no-dashboard", "--memory-limit", "2GB", "--name", f"w{i}"], f"w{i}.log")
        workers[w.pid] = w
    from distributed import Client

    with Client(addr, timeout="60s") as c:
        c.wait_for_workers(2, timeout=60)
    try:
        yield addr, workers
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture(scope="module")
def store(tiny_run_bf16, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dask") / "run.zarr"
    with dask_client(n_workers=1) as c:
        ingest(tiny_run_bf16, out, client=c, progress=False)
    return out


@pytest.fixture(scope="module")
def default_fit(store, tmp_path_factory):
    """The reference: the default LocalCluster."""
    return fit_store(store, tmp_path_factory.mktemp("ref") / "ref.fit", progress=False,
                     block_bytes=64 << 10)


def test_external_cluster_gives_identical_results(cluster, store, default_fit, tmp_path):
    addr, _ = cluster
    rep = fit_store(store, tmp_path / "ext.fit", scheduler=addr, progress=False,
                    block_bytes=64 << 10)
    assert rep.tasks > 2
    assert_same_fit(default_fit.fit_dir, rep.fit_dir)


@dataclass(frozen=True)
class GatedSource:
    """Wraps the store; every read records its worker pid, then waits while the gate exists."""

    inner: StoreRef
    gate: str
    marks: str

    def open(self, n_steps: int | None = None):
        return _Gated(self.inner.open(n_steps), self.gate, self.marks)


class _Gated:
    def __init__(self, src, gate: str, marks: str) -> None:
        self._src, self._gate, self._marks = src, gate, marks

    def __getattr__(self, name):
        return getattr(self._src, name)

    def read_block(self, *args, **kwargs):
        Path(self._marks, str(os.getpid())).touch()
        deadline = time.time() + 60
        while os.path.exists(self._gate) and time.time() < deadline:
            time.sleep(0.05)
        return self._src.read_block(*args, **kwargs)


def test_fit_survives_a_killed_worker(cluster, store, default_fit, tmp_path):
    addr, workers = cluster
    gate, marks = tmp_path / "gate", tmp_path / "marks"
    gate.touch()
    marks.mkdir()
    src = GatedSource(StoreRef(str(store.resolve())), str(gate), str(marks))
    result: dict = {}

    def run() -> None:
        try:
            result["rep"] = fit_store(store, tmp_path / "killed.fit", scheduler=addr,
                                      source=src, progress=False, block_bytes=64 << 10)
        except BaseException as e:  # surfaced by the assertion below
            result["error"] = e

    t = threading.Thread(target=run)
    t.start()
    deadline = time.time() + 60
    victim = None
    while victim is None and time.time() < deadline and t.is_alive():
        busy = [int(p.name) for p in marks.iterdir() if int(p.name) in workers]
        victim = busy[0] if busy else None
        time.sleep(0.05)
    assert victim is not None, (f"no task started on the cluster: {result}, marks "
                                f"{[p.name for p in marks.iterdir()]}, workers {list(workers)}")
    os.kill(victim, signal.SIGKILL)  # a worker we started, mid-task
    workers[victim].wait(10)
    gate.unlink()  # let the surviving worker finish everything
    t.join(120)
    assert not t.is_alive() and "error" not in result, result.get("error")
    assert_same_fit(default_fit.fit_dir, result["rep"].fit_dir)
