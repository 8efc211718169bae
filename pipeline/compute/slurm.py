"""Cluster kind ``slurm``: Dask workers as SLURM batch jobs (dask-jobqueue's ``SLURMCluster``).

The scheduler runs in this process; each worker is one ``sbatch`` job. What a
job asks for comes from the cluster file's ``rlvr-lin.cluster`` options
(``cores: 4``, ``memory: 16GB``, ``queue: gpu``, ``job-extra-directives: [...]``,
any ``SLURMCluster`` argument, hyphens or underscores) and, for anything not
given there, from Dask's own ``jobqueue.slurm.*`` configuration, so a plain
Dask config file (``jobqueue: {slurm: {cores: 4, memory: 16GB}}``) works
unchanged. Our own options:

* ``jobs`` (or ``n-workers``): how many jobs to submit (default 1);
* ``min-workers``: how many workers must be up before the job's work starts
  (default 1: the work proceeds with the workers that started, and queued
  jobs join when SLURM starts them);
* ``timeout``: how long to wait for them (default 300s). A queue that never
  starts them is a one-line error quoting ``squeue``, not a hang.

Every job is cancelled (``scancel``) when the client closes, also on error.
"""

from __future__ import annotations

import inspect
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pipeline.errors import PipelineError, check_int

DEFAULT_TIMEOUT = "300s"
OWN_OPTIONS = ("jobs", "min-workers", "timeout")  # ours; the rest go to SLURMCluster


def _cluster_class() -> Any:
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise PipelineError("cluster kind 'slurm' needs dask-jobqueue "
                            "(pip install dask-jobqueue)") from None
    return SLURMCluster


def _accepted(cls: Any) -> set[str]:
    """Keyword arguments ``SLURMCluster`` takes: its own, its job class's and their bases'."""
    names: set[str] = set()
    for c in (*cls.__mro__, *cls.job_cls.__mro__):
        init = c.__dict__.get("__init__")
        if init is not None:
            names |= {p.name for p in inspect.signature(init).parameters.values()
                      if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD}
    return names - {"self", "scheduler", "n_workers", "job_cls", "loop", "asynchronous", "worker",
                     "workers", "host", "dashboard_address", "quiet", "shutdown_on_close"}


def cluster_kwargs(options: dict[str, Any], memory_limit: str | int | None, cls: Any,
                   origin: str) -> dict[str, Any]:
    """The file's job options as ``SLURMCluster`` keywords; an unknown one is refused by name.

    Checked before anything is submitted: a typo (``core: 4``) must not turn
    into a job that silently takes the config's default.
    """
    accepted = _accepted(cls)
    kw: dict[str, Any] = {}
    for key, value in options.items():
        if key in OWN_OPTIONS:
            continue
        name = str(key).replace("-", "_")
        if name not in accepted:
            known = ", ".join(sorted(a.replace("_", "-") for a in accepted))
            raise PipelineError(f"cluster file: unknown slurm option {key!r} (SLURMCluster "
                                f"takes {known}; ours: {', '.join(OWN_OPTIONS)})", origin)
        kw[name] = value
    if memory_limit is not None and "memory" not in kw:
        kw["memory"] = memory_limit
    import dask

    from pipeline.compute.clusters import WORKER_ENV

    # the worker job exports WORKER_ENV first (the nanny's children inherit it); the file's or
    # the config's own prologue lines come after, so a user's export of the same name wins
    prologue = kw.get("job_script_prologue")
    if prologue is None:
        prologue = dask.config.get("jobqueue.slurm.job-script-prologue", None) or []
    kw["job_script_prologue"] = [*(f"export {k}={v}" for k, v in WORKER_ENV.items()),
                                 *prologue]
    sched = dict(dask.config.get("jobqueue.slurm.scheduler-options", None) or {})
    sched.update(kw.get("scheduler_options") or {})
    sched.setdefault("dashboard_address", ":0")  # a free port: never clashes with another
    kw["scheduler_options"] = sched
    return kw


def squeue_lines(job_ids: list[str]) -> str:
    """``squeue``'s view of our jobs (id, state, reason), on one line, for error messages."""
    if not job_ids:
        return "no job was submitted"
    if shutil.which("squeue") is None:
        return "squeue not found"
    try:
        res = subprocess.run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i %T %r"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"squeue failed: {e}"
    rows = [line.split(None, 2) for line in res.stdout.splitlines() if line.strip()]
    text = "; ".join(f"job {r[0]} {' '.join(r[1:2])}" + (f" ({r[2]})" if len(r) > 2 else "")
                     for r in rows)
    return text or f"jobs {', '.join(job_ids)} no longer queued (ended: see their job logs)"


def job_ids(cluster: Any) -> list[str]:
    """SLURM job ids of the cluster's jobs (those submitted so far)."""
    return [str(j.job_id) for j in cluster.workers.values() if getattr(j, "job_id", None)]


def _wait(client: Any, cluster: Any, n: int, timeout: float) -> None:
    """Block until ``n`` workers are up, or fail with what ``squeue`` says about our jobs."""
    try:
        client.wait_for_workers(n, timeout=timeout)
    except TimeoutError:
        up = len(client.scheduler_info().get("workers", {}))
        what = "no SLURM worker" if up == 0 else f"only {up} of {n} SLURM workers"
        raise PipelineError(f"{what} started within {timeout:g}s; squeue shows: "
                            f"{squeue_lines(job_ids(cluster))}") from None


@contextmanager
def slurm_cluster(spec: Any) -> Iterator[Any]:
    """A client on a ``SLURMCluster`` scaled to ``jobs`` jobs (see the module docstring)."""
    from dask.utils import parse_timedelta
    from distributed import Client

    cls = _cluster_class()
    opts = dict(spec.options)
    jobs = opts.get("jobs", spec.n_workers or 1)
    min_workers = opts.get("min-workers", 1)
    try:
        check_int(jobs, "jobs", 1)
        check_int(min_workers, "min-workers", 1)
        timeout = parse_timedelta(opts.get("timeout", DEFAULT_TIMEOUT), default="s")
    except (PipelineError, ValueError, TypeError) as e:
        raise PipelineError(f"cluster file: {e}", spec.origin) from None
    kw = cluster_kwargs(opts, spec.memory_limit, cls, spec.origin)
    if shutil.which("sbatch") is None:
        raise PipelineError("cluster kind 'slurm' needs SLURM's sbatch on PATH "
                            "(run on a SLURM login node)")
    try:
        cluster = cls(**kw)
    except ValueError as e:  # e.g. "You must specify how much cores and memory per job"
        raise PipelineError(f"cannot configure the SLURM jobs: {str(e).splitlines()[0]} "
                            f"(set cores and memory in rlvr-lin.cluster or jobqueue.slurm)",
                            spec.origin) from None
    with cluster, Client(cluster) as client:
        try:
            _submit(cluster, jobs)
        except RuntimeError as e:
            lines = [ln.split("error:", 1)[-1].strip() for ln in str(e).splitlines()
                     if "error:" in ln] or [str(e).splitlines()[0]]
            raise PipelineError(f"sbatch refused the worker job: {'; '.join(lines)}",
                                spec.origin) from None
        _wait(client, cluster, min(min_workers, jobs * _processes(cluster)), timeout)
        yield client


def _submit(cluster: Any, jobs: int) -> None:
    """Submit ``jobs`` jobs now, raising sbatch's refusal here.

    ``cluster.scale(jobs=n)`` submits in a background callback whose failure is
    only logged, so a refused job (a memory request no node has) would leave
    us waiting for workers that never come. This is what ``scale`` does, minus
    the callback (SpecCluster's worker specs, then its state correction).
    """
    from distributed.core import Status

    while len(cluster.worker_spec) < jobs:
        cluster.worker_spec.update(cluster.new_worker_spec())
    try:
        cluster.sync(cluster._correct_state_internal)
    except RuntimeError:
        for job in cluster._created:  # never submitted: nothing to cancel on close
            if getattr(job, "job_id", None) is None:
                job.status = Status.failed
        raise


def _processes(cluster: Any) -> int:
    """Worker processes per job (a job with ``processes: 2`` starts two workers)."""
    return int(cluster._dummy_job.worker_processes)
