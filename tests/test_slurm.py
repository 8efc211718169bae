"""The ``slurm`` cluster kind on a real single-node SLURM cluster (tests/slurm_cluster.py).

Workers are real ``sbatch`` jobs: the fit they compute must equal one in this
process, a job SLURM cannot start must fail clearly instead of hanging, and a
worker job cancelled mid-fit must not change the result. Skipped, with the
reason, where SLURM is not installed.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from fit_checks import assert_same_fit
from slurm_cluster import Slurm, slurm  # noqa: F401  (the session fixture)

from pipeline.compute import dask_client
from pipeline.errors import PipelineError
from pipeline.fit import fit_store
from pipeline.fit.results import read_meta
from pipeline.fit.source import StoreRef
from pipeline.store.ingest import ingest

pytestmark = pytest.mark.slurm
TESTS = Path(__file__).resolve().parent
BLOCK = 64 << 10  # small blocks: many tasks, so a fit spans both workers


def cluster_file(folder: Path, name: str, jobs: int, *, cores: int = 1, timeout: str = "60s",
                 extra: str = "") -> Path:
    """A cluster file in the users' format: our options, then Dask's jobqueue.slurm config."""
    logs = folder / f"{name}-logs"
    logs.mkdir(parents=True, exist_ok=True)
    f = folder / f"{name}.yaml"
    f.write_text(f"rlvr-lin:\n  cluster:\n    kind: slurm\n    jobs: {jobs}\n"
                 f"    min-workers: {jobs}\n    timeout: {timeout}\n{extra}"
                 f"jobqueue:\n  slurm:\n    cores: {cores}\n    memory: 1GB\n"
                 f"    walltime: '00:10:00'\n    log-directory: {logs}\n"
                 f"    death-timeout: 20\n"
                 # the jobs unpickle this module's helpers: put tests/ on their path
                 f"    job-script-prologue: ['export PYTHONPATH={TESTS}:$PYTHONPATH']\n")
    return f


def _job_id() -> str:
    return os.environ.get("SLURM_JOB_ID", "")


def _malloc_env() -> str | None:
    return os.environ.get("MALLOC_MMAP_THRESHOLD_")


@pytest.fixture(scope="module")
def jobs(slurm: Slurm, tmp_path_factory):  # noqa: F811
    """A client on two SLURM worker jobs (one core each), and the run store they ingested."""
    folder = tmp_path_factory.mktemp("slurm-jobs")
    with dask_client(str(cluster_file(folder, "two", 2))) as client:
        yield client, folder


@pytest.fixture(scope="module")
def store(jobs, tiny_run_fp32):
    client, folder = jobs
    path = folder / "run.zarr"
    ingest(tiny_run_fp32, path, client=client, progress=False)
    return path


@pytest.fixture(scope="module")
def local_fit(store):
    """The reference: the same fit, every task in this process."""
    return fit_store(store, store.parent / "serial.fit", executor="serial", progress=False,
                     block_bytes=BLOCK)


class JobRef(StoreRef):
    """A StoreRef that notes the SLURM job of each process that opens it (the fit's tasks)."""

    def open(self, n_steps=None):
        Path(f"{self.path}.jobs").mkdir(exist_ok=True)
        Path(f"{self.path}.jobs", _job_id() or "none").touch()
        return super().open(n_steps)


def test_fit_on_slurm_jobs_equals_a_local_fit(slurm, jobs, store, local_fit):  # noqa: F811
    client, folder = jobs
    ours = {j for j in client.run(_job_id).values()}
    queued = {j for j, state, _ in slurm.squeue() if state == "RUNNING"}
    assert len(ours) == 2 and ours <= queued  # two workers, each inside its own running job
    # the job script's prologue exported the heap setting the workers inherit (clusters.WORKER_ENV)
    assert set(client.run(_malloc_env).values()) == {str(32 << 20)}
    ref = JobRef(str(store.resolve()))
    rep = fit_store(store, folder / "slurm.fit", client=client, source=ref, progress=False,
                    block_bytes=BLOCK)
    assert rep.tasks > 2
    opened = {p.name for p in Path(f"{ref.path}.jobs").iterdir()} - {"none"}
    assert opened and opened <= ours  # the tasks ran in the SLURM jobs
    assert_same_fit(local_fit.fit_dir, rep.fit_dir, csv=True)


def test_job_slurm_cannot_start_is_a_clear_timeout(slurm, jobs, tmp_path):  # noqa: F811
    """The node is busy with the two jobs above: one more, wanting every core, stays PENDING."""
    f = cluster_file(tmp_path, "pending", 1, cores=slurm.cpus, timeout="3s")
    t0 = time.monotonic()
    with pytest.raises(PipelineError) as e:
        with dask_client(str(f)):
            pass
    msg = str(e.value)
    assert "no SLURM worker started within 3s; squeue shows: job " in msg
    assert "PENDING (Resources)" in msg and "\n" not in msg
    assert time.monotonic() - t0 < 30
    pending = msg.split("squeue shows: job ")[1].split()[0]
    deadline = time.monotonic() + 15  # and it was cancelled on the way out
    while pending in {j for j, _, _ in slurm.squeue()} and time.monotonic() < deadline:
        time.sleep(0.3)
    assert pending not in {j for j, _, _ in slurm.squeue()}


def test_sbatch_refusal_is_one_line(slurm, tmp_path):  # noqa: F811
    f = cluster_file(tmp_path, "huge", 1, timeout="5s")
    f.write_text(f.read_text().replace("memory: 1GB", f"memory: {slurm.memory_mb * 4}MB"))
    with pytest.raises(PipelineError, match="sbatch refused the worker job: .*Memory"):
        with dask_client(str(f)):
            pass


class GatedRef(StoreRef):
    """Reads wait while the gate file exists; each reading job leaves a mark (its job id)."""

    def open(self, n_steps=None):
        return Gated(super().open(n_steps), self.path)


class Gated:
    def __init__(self, src, path: str) -> None:
        self._src, self._path = src, path

    def __getattr__(self, name):
        return getattr(self._src, name)

    def read_block(self, *args, **kwargs):
        Path(f"{self._path}.marks").mkdir(exist_ok=True)
        Path(f"{self._path}.marks", _job_id() or "none").touch()
        deadline = time.time() + 60
        while os.path.exists(f"{self._path}.gate") and time.time() < deadline:
            time.sleep(0.05)
        return self._src.read_block(*args, **kwargs)


def test_scancel_of_a_worker_job_mid_fit(slurm, jobs, store, local_fit,  # noqa: F811
                                         tiny_run_fp32):
    """Last in this module: it cancels one of the two jobs. The other finishes the fit."""
    client, folder = jobs
    ref = GatedRef(str(store.resolve()))
    gate, marks = Path(f"{ref.path}.gate"), Path(f"{ref.path}.marks")
    gate.touch()
    result: dict = {}

    def run() -> None:
        try:
            result["rep"] = fit_store(store, folder / "cancelled.fit", client=client,
                                      source=ref, progress=False, block_bytes=BLOCK)
        except BaseException as e:  # surfaced by the assertion below
            result["error"] = e

    t = threading.Thread(target=run)
    t.start()
    ours = set(client.run(_job_id).values())
    deadline = time.monotonic() + 60
    victim = None
    while victim is None and time.monotonic() < deadline and t.is_alive():
        busy = sorted(p.name for p in marks.iterdir() if p.name in ours) if marks.is_dir() else []
        victim = busy[0] if busy else None
        time.sleep(0.05)
    assert victim is not None, f"no task started in a SLURM job: {result}"
    subprocess.run(["scancel", victim], check=True, timeout=30)  # mid-task: it waits at the gate
    deadline = time.monotonic() + 30
    while len(client.scheduler_info()["workers"]) > 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert set(client.run(_job_id).values()) == ours - {victim}
    gate.unlink()
    t.join(120)
    assert not t.is_alive() and "error" not in result, result.get("error")
    assert_same_fit(local_fit.fit_dir, result["rep"].fit_dir, csv=True)
    assert read_meta(result["rep"].fit_dir)["complete"]
    again = ingest(tiny_run_fp32, store, client=client, progress=False)  # the store is intact:
    assert again.ingested == [] and again.skipped == again.steps  # every step verified, kept


@pytest.mark.slow
def test_analyze_on_slurm(slurm, jobs, tiny_run_fp32, tmp_path):  # noqa: F811
    """The whole workflow with a SLURM cluster file; runs after the scancel test, on the core
    the cancelled job freed."""
    from pipeline.analyze import analyze

    f = cluster_file(tmp_path, "analyze", 1, timeout="120s")
    stages = analyze(tiny_run_fp32, str(f), store=tmp_path / "run.zarr",
                     outputs=tmp_path / "out")
    assert [s.stage for s in stages] == ["ingest", "fit", "report", "extrapolate"]
    serial = fit_store(tmp_path / "run.zarr", tmp_path / "serial.fit", executor="serial",
                       progress=False)
    assert_same_fit(serial.fit_dir, tmp_path / "out" / "fit", csv=True)
    assert (tmp_path / "out" / "report" / "index.html").exists()
    assert any((tmp_path / "out").glob("extrapolated-*/config.json"))
