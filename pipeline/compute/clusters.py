"""The cluster factory: every job gets its Dask client from ``dask_client`` and nowhere else.

What the user says, in one value (``--cluster``, alias ``--scheduler``, or
$DASK_SCHEDULER_ADDRESS), picks a *kind* of cluster from ``CLUSTER_KINDS``:

* nothing or ``local``: a LocalCluster sized to the machine (processes, one
  thread each, a memory limit per worker);
* an address (``tcp://host:port``, ``tls://...``, ``inproc://...``): an
  existing scheduler, left running on exit;
* a scheduler file (``.json``, as ``dask scheduler --scheduler-file`` writes
  it): that scheduler's address, read when the client connects (waiting for
  the file to appear, as a batch script that starts the scheduler needs);
* a YAML file: a *cluster file*. Its ``rlvr-lin.cluster`` mapping names the
  kind and its options (``kind: local``, ``n-workers: 4``, ...; or
  ``kind: address`` with ``address:`` and an optional connect ``timeout``);
  everything else in the file is Dask configuration
  (``distributed.worker.memory.target``, ...), applied while the client
  lives, as ``dask.config`` would read it from ~/.config/dask. A file with
  only Dask's own ``scheduler-address`` key means that address, one with a
  ``scheduler-file`` key (top level or in ``rlvr-lin.cluster``) that file's
  scheduler, and one with a ``jobqueue.slurm`` section and no kind means
  ``kind: slurm`` (see ``pipeline.compute.slurm``).

A new kind (SLURM, Kubernetes, CUDA workers) is one entry in ``CLUSTER_KINDS``:
a function from a ``ClusterSpec`` to a context manager yielding a client.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from pipeline.errors import PipelineError, SchedulerLost, check_int

SCHEDULER_ENV = "DASK_SCHEDULER_ADDRESS"
CONFIG_KEY = "rlvr-lin"  # the cluster file's own section: rlvr-lin.cluster
ADDRESS_SCHEMES = ("tcp://", "tls://", "inproc://", "ucx://", "ws://", "wss://")
MAX_LOCAL_WORKERS = 8


@dataclass(frozen=True)
class ClusterSpec:
    """Where a job's tasks run, decided before anything starts (small, comparable, printable)."""

    kind: str = "local"  # a key of CLUSTER_KINDS
    address: str | None = None  # kind "address"
    n_workers: int | None = None  # local kinds: default one per core, at most 8
    threads_per_worker: int = 1
    memory_limit: str | int | None = None  # per worker; default 60% of RAM split evenly
    options: Mapping[str, Any] = field(default_factory=dict)  # kind-specific, from the file
    dask_config: Mapping[str, Any] = field(default_factory=dict)  # dotted keys, set on use
    origin: str = "default"  # what the spec came from, for messages

    def describe(self) -> str:
        where = self.address if self.kind == "address" else self.kind
        if self.kind == "address" and self.address is None:
            where = f"the scheduler in {self.options.get(SCHEDULER_FILE_KEY)}"
        return f"{where} (from {self.origin})"


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted keys: ``dask.config.set`` replaces a whole subtree otherwise."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


SCHEDULER_FILE_KEY = "scheduler-file"
_SPEC_KEYS = {"kind", "address", "n-workers", "threads-per-worker", "memory-limit"}


def _default_kind(data: Mapping[str, Any], address: object, scheduler_file: object) -> str:
    """The kind a file means when it names none: a scheduler it points at, SLURM, or local."""
    if address or scheduler_file:
        return "address"
    jobqueue = data.get("jobqueue")
    if isinstance(jobqueue, Mapping) and isinstance(jobqueue.get("slurm"), Mapping):
        return "slurm"
    return "local"


def _from_file(path: Path) -> ClusterSpec:
    """A cluster file (see the module docstring), validated: a bad one fails before any work."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise PipelineError(f"cannot read cluster file: {e.strerror or e}", path) from None
    except yaml.YAMLError as e:
        raise PipelineError(f"cluster file is not valid YAML: {str(e).splitlines()[0]}",
                            path) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PipelineError("cluster file must be a mapping (rlvr-lin: {cluster: ...})", path)
    data = dict(data)
    own = data.pop(CONFIG_KEY, None) or {}
    if not isinstance(own, dict) or not isinstance(own.get("cluster", {}), dict):
        raise PipelineError(f"{CONFIG_KEY}.cluster must be a mapping", path)
    cl = dict(own.get("cluster") or {})
    address = data.pop("scheduler-address", None) or data.pop("scheduler_address", None)
    sched_file = cl.pop(SCHEDULER_FILE_KEY, None) or data.pop(SCHEDULER_FILE_KEY, None)
    address = cl.get("address") or address
    kind = str(cl.get("kind") or _default_kind(data, address, sched_file))
    if kind not in CLUSTER_KINDS:
        raise PipelineError(f"unknown cluster kind {kind!r} (expected one of "
                            f"{', '.join(sorted(CLUSTER_KINDS))})", path)
    if sched_file and (kind != "address" or address):
        raise PipelineError("scheduler-file means kind 'address' and no address: give one "
                            "of address and scheduler-file", path)
    if sched_file:  # relative to the cluster file, which is where the user wrote it
        cl[SCHEDULER_FILE_KEY] = str(path.parent / Path(str(sched_file)).expanduser())
    if kind == "address" and not (address or sched_file):
        raise PipelineError("cluster kind 'address' needs an address (tcp://host:port) or a "
                            "scheduler-file", path)
    n_workers = cl.get("n-workers")
    threads = cl.get("threads-per-worker", 1)
    try:
        if n_workers is not None:
            check_int(n_workers, "n-workers", 1)
        check_int(threads, "threads-per-worker", 1)
    except PipelineError as e:
        raise PipelineError(f"cluster file: {e}", path) from None
    return ClusterSpec(kind=kind, address=str(address) if address else None,
                       n_workers=n_workers, threads_per_worker=int(threads),
                       memory_limit=cl.get("memory-limit"),
                       options={k: v for k, v in cl.items() if k not in _SPEC_KEYS},
                       dask_config=_flatten(data), origin=str(path))


def cluster_spec(cluster: str | None = None, n_workers: int | None = None,
                 memory_limit: str | int | None = None,
                 threads_per_worker: int = 1) -> ClusterSpec:
    """What ``cluster`` (an address, a cluster file, a kind, or None) means.

    None falls back to $DASK_SCHEDULER_ADDRESS, then to Dask's own
    ``scheduler-address`` setting (~/.config/dask), then to a local cluster.
    The keyword arguments size a local cluster when the value does not.
    """
    origin = "--cluster"
    if not cluster:
        cluster, origin = os.environ.get(SCHEDULER_ENV) or None, f"${SCHEDULER_ENV}"
    if not cluster:
        import dask

        cluster, origin = dask.config.get("scheduler-address", None), "dask config"
    if not cluster:
        return ClusterSpec(n_workers=n_workers, memory_limit=memory_limit,
                           threads_per_worker=threads_per_worker)
    cluster = str(cluster).strip()
    if cluster.startswith(ADDRESS_SCHEMES) or (
            ":" in cluster and not Path(cluster).exists()
            and not cluster.endswith((".yaml", ".yml", ".json"))):
        return ClusterSpec(kind="address", address=cluster, origin=origin)
    if cluster.endswith(".json"):  # Dask's scheduler file: read on connect (it may not exist yet)
        return ClusterSpec(kind="address", options={SCHEDULER_FILE_KEY: cluster}, origin=origin)
    if cluster in CLUSTER_KINDS and cluster != "address":
        return ClusterSpec(kind=cluster, n_workers=n_workers, memory_limit=memory_limit,
                           threads_per_worker=threads_per_worker, origin=origin)
    path = Path(cluster)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise PipelineError("cluster file not found", path)
        spec = _from_file(path)
        if spec.n_workers is None and n_workers is not None:
            spec = ClusterSpec(**{**spec.__dict__, "n_workers": n_workers})
        return spec
    raise PipelineError(f"--cluster {cluster!r} is not a scheduler address (tcp://host:port), "
                        f"a cluster file (.yaml), a scheduler file (.json) or a cluster kind "
                        f"({', '.join(k for k in sorted(CLUSTER_KINDS) if k != 'address')})")


def read_scheduler_file(path: str | Path, timeout: float) -> str:
    """The ``address`` in Dask's scheduler file, waiting ``timeout`` s for the file to appear.

    A batch script starts ``dask scheduler --scheduler-file F &`` and the job
    right after: the file lands a few seconds later.
    """
    import json
    import time

    path = Path(path)
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"scheduler file did not appear within {timeout:g}s "
                            f"(is `dask scheduler --scheduler-file {path}` running?)",
                            path) from None
    except OSError as e:
        raise PipelineError(f"cannot read scheduler file: {e.strerror or e}", path) from None
    except ValueError:
        raise PipelineError("scheduler file is not JSON (expected Dask's scheduler file, "
                            "as `dask scheduler --scheduler-file` writes it)", path) from None
    address = data.get("address") if isinstance(data, dict) else None
    if not isinstance(address, str) or not address:
        raise PipelineError("scheduler file has no \"address\" (expected Dask's scheduler "
                            "file)", path)
    return address


@contextmanager
def _address(spec: ClusterSpec) -> Iterator[Any]:
    from dask.utils import parse_timedelta
    from distributed import Client

    timeout = spec.options.get("timeout", "30s")
    address = spec.address
    if address is None:
        address = read_scheduler_file(spec.options[SCHEDULER_FILE_KEY],
                                      parse_timedelta(timeout, default="s"))
    try:
        client = Client(address, timeout=timeout)
    except OSError as e:
        raise PipelineError(f"cannot reach the Dask scheduler at {address} "
                            f"(from {spec.origin}): {e}") from None
    except TypeError as e:  # distributed's word for "tls:// but no certificates configured"
        if not address.startswith("tls://") or "ssl_context" not in str(e):
            raise
        raise PipelineError(f"cannot reach the Dask scheduler at {address} (from "
                            f"{spec.origin}): a tls:// scheduler needs distributed.comm.tls "
                            f"ca-file, client.cert and client.key (see "
                            f"workflows/clusters/tls.yaml)") from None
    with client:
        try:
            yield client
        except Exception as e:
            if not _scheduler_lost(client, e):
                raise
            raise SchedulerLost(f"lost the Dask scheduler at {address} (from {spec.origin})"
                                f" mid-job: {_first_line(e)}; what was committed is kept: re-run "
                                "the command on a running scheduler to finish") from None


def _first_line(e: BaseException) -> str:
    return " ".join(str(e).split("\n")[0].split()) or type(e).__name__


def _scheduler_lost(client: Any, e: BaseException) -> bool:
    """Whether ``e`` means the scheduler went away (not a task's own failure, e.g. a full disk).

    A task's OSError reaches the client as that error, while the client is
    still connected; a dead scheduler leaves the client reconnecting or closed
    and the error chain holds a closed comm.
    """
    from distributed.comm.core import CommClosedError

    cur: BaseException | None = e
    seen: set[int] = set()
    closed = False
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        closed = closed or isinstance(cur, CommClosedError | ConnectionError)
        cur = cur.__cause__ or cur.__context__
    return closed or client.status != "running"


# Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_ set, which also pins glibc's mmap
# threshold at 128 KiB: every larger allocation (blosc's and zstd's buffers for each chunk,
# a chunk's compressed bytes) is then a fresh mapping, page-faulted and zeroed on every call.
# blosc zstd-1 of a 4 MB chunk ran 1.8x slower in such a worker than with the threshold
# raised (measured here, two workers at once). Allocations up to 32 MiB (glibc's largest
# threshold on 64-bit) come from the heap again. Local workers get it through the nanny's
# pre-spawn environment, SLURM jobs through their script's prologue, pods through their env.
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20)}


def worker_environ() -> dict[str, Any]:
    """The nanny's pre-spawn environment for the workers we start: Dask's, plus ``WORKER_ENV``."""
    import dask
    import distributed  # noqa: F401  (registers the distributed.* config defaults)

    env = dict(dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {})
    return {**WORKER_ENV, **env}  # a value the user configured wins


def local_workers(n_workers: int | None) -> int:
    return n_workers or max(1, min(os.cpu_count() or 1, MAX_LOCAL_WORKERS))


@contextmanager
def _local(spec: ClusterSpec) -> Iterator[Any]:
    """Processes with one thread each: numpy and numba kernels run in parallel, and a worker
    over its memory limit is restarted instead of taking the machine down."""
    import dask
    from distributed import Client, LocalCluster

    n = local_workers(spec.n_workers)
    memory_limit = spec.memory_limit
    if memory_limit is None:
        memory_limit = int(psutil.virtual_memory().total * 0.6 / n)
    with (
        dask.config.set({"distributed.nanny.pre-spawn-environ": worker_environ()}),
        LocalCluster(
            n_workers=n,
            threads_per_worker=spec.threads_per_worker,
            processes=True,
            memory_limit=memory_limit,
            dashboard_address=":0",  # a free port: never clashes with another cluster
            **dict(spec.options),
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


@contextmanager
def _local_cuda(spec: ClusterSpec) -> Iterator[Any]:
    """One worker per visible GPU (dask-cuda's LocalCUDACluster): the seam for CUDA workers."""
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        raise PipelineError("cluster kind 'local-cuda' needs dask-cuda "
                            "(pip install dask-cuda) and a CUDA device") from None
    from distributed import Client

    kw: dict[str, Any] = dict(spec.options)
    if spec.n_workers is not None:
        kw["n_workers"] = spec.n_workers
    if spec.memory_limit is not None:
        kw["memory_limit"] = spec.memory_limit
    with LocalCUDACluster(threads_per_worker=spec.threads_per_worker, **kw) as cluster, \
            Client(cluster) as client:
        yield client


def _kubernetes(spec: ClusterSpec) -> AbstractContextManager[Any]:
    """A DaskCluster made by the dask-kubernetes operator (pipeline.compute.kubernetes); the
    import waits until the kind is used, so dask-kubernetes stays optional."""
    from pipeline.compute.kubernetes import kubernetes_cluster

    return kubernetes_cluster(spec)


def _slurm(spec: ClusterSpec) -> AbstractContextManager[Any]:
    """dask-jobqueue's SLURMCluster (imported on use: most runs never need it)."""
    from pipeline.compute.slurm import slurm_cluster

    return slurm_cluster(spec)


ClusterFactory = Callable[[ClusterSpec], AbstractContextManager[Any]]
CLUSTER_KINDS: dict[str, ClusterFactory] = {
    "local": _local,
    "address": _address,
    "local-cuda": _local_cuda,
    "kubernetes": _kubernetes,
    "slurm": _slurm,
}


@contextmanager
def open_cluster(spec: ClusterSpec) -> Iterator[Any]:
    """A client for ``spec``, with the spec's Dask configuration set while it lives."""
    import dask

    with dask.config.set(dict(spec.dask_config)), CLUSTER_KINDS[spec.kind](spec) as client:
        yield client


@contextmanager
def dask_client(
    cluster: str | None = None,
    n_workers: int | None = None,
    memory_limit: str | int | None = None,
    threads_per_worker: int = 1,
) -> Iterator[Any]:
    """Yield a ``distributed.Client`` for ``cluster`` (see ``cluster_spec``).

    A cluster this call started is closed on exit; an existing scheduler is not.
    """
    spec = cluster_spec(cluster, n_workers, memory_limit, threads_per_worker)
    with open_cluster(spec) as client:
        yield client
