"""Kubernetes: manifests for the dask-kubernetes operator, and the ``kubernetes`` cluster kind.

The operator (``helm install dask-kubernetes-operator``) turns two custom
resources of ``kubernetes.dask.org/v1`` into pods:

* a ``DaskCluster``: a scheduler pod + service and ``replicas`` worker pods,
  alive until deleted; any job can use it with ``--cluster tcp://NAME-scheduler.NS...``;
* a ``DaskJob``: its own cluster (same worker and scheduler specs) plus one
  job-runner pod; the cluster is deleted when the runner exits. The runner here
  is ``rlvr-lin analyze ENTRY --cluster $(DASK_SCHEDULER_ADDRESS)``: the operator
  adds that variable to the runner's environment and the kubelet expands
  ``$(...)`` in ``args``, so the job talks to the cluster made for it.

Both are plain dicts built here, matching the operator's own
``make_cluster_spec``/``make_worker_spec``/``make_scheduler_spec`` (same
container names, ports, probes and service) with what those helpers lack:
separate worker and scheduler resources, a data volume mounted at the same
path in every pod that reads or writes the store (the job runner and the
workers; the scheduler never touches data), and a Dask memory limit that is
exactly the container's limit, so Dask spills and pauses before the kernel's
OOM killer acts. The operator itself is not imported: ``k8s-manifests`` works
without dask-kubernetes installed.

Checkpoints, the store and the outputs live on that volume; the catalog the job
reads (``$RLVR_LIN_CATALOG``, default ``<mount>/data_catalog.yaml``) names them
with paths relative to itself, so the same catalog works on a laptop and in a pod.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.compute.clusters import WORKER_ENV
from pipeline.errors import PipelineError, check_int

if TYPE_CHECKING:
    from pipeline.compute.clusters import ClusterSpec

API_VERSION = "kubernetes.dask.org/v1"
SCHEDULER_PORT = 8786  # the operator's scheduler service and DASK_SCHEDULER_ADDRESS use these
SCHEDULER_DASHBOARD_PORT = 8787
WORKER_DASHBOARD_PORT = 8788
SCHEDULER_ENV = "DASK_SCHEDULER_ADDRESS"  # set by the operator in every worker and runner pod
WORKER_NAME_ENV = "DASK_WORKER_NAME"  # set by the operator in every worker pod
# The scheduler service is "<cluster>-scheduler": a cluster name longer than this would make
# it an invalid Kubernetes name (dask_kubernetes.constants.MAX_CLUSTER_NAME_LEN).
MAX_CLUSTER_NAME_LEN = 63 - len("-scheduler")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # RFC 1123 label, as the operator checks
_SUBDOMAIN = re.compile(r"^[a-z0-9]([-.a-z0-9]*[a-z0-9])?$")  # RFC 1123 subdomain (a PVC)
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")  # what the API server accepts
MANIFEST_FILES = ("daskcluster.yaml", "daskjob.yaml")

# Kubernetes quantity suffixes for memory, in bytes. Dask's parse_bytes reads "4Gi" and "4G"
# the same way, but the limit is handed to Dask as a plain byte count anyway: no two parsers
# to keep in agreement. Lower-case "m" (milli) is refused: "512m" bytes is a classic typo.
_MEMORY_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
                 "E": 10**18, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
                 "Pi": 2**50, "Ei": 2**60}
_MEMORY = re.compile(r"^(\d+(?:\.\d+)?|\.\d+)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")
_CPU = re.compile(r"^(\d+(?:\.\d+)?|\.\d+)(m)?$")
MIN_WORKER_MEMORY = 256 * 2**20  # a Dask worker with the project imported needs about this


def memory_bytes(quantity: str | int, what: str = "memory") -> int:
    """Bytes in a Kubernetes memory quantity (``4Gi``, ``4G``, ``512Mi``, ``4294967296``).

    Refuses what the API server would read differently from a Dask user
    (``4GB`` is not a quantity, ``512m`` is half a byte).
    """
    text = str(quantity).strip()
    m = _MEMORY.match(text)
    if isinstance(quantity, bool) or not m:
        raise PipelineError(f"{what} must be a Kubernetes memory quantity such as 4Gi, "
                            f"512Mi or 4G, got {quantity!r}")
    value = float(m.group(1)) * _MEMORY_UNITS[m.group(2) or ""]
    if value < 1 or value != math.floor(value):
        raise PipelineError(f"{what} must be a whole number of bytes, got {quantity!r}")
    return int(value)


def cpu_cores(quantity: str | int | float, what: str = "cpu") -> float:
    """Cores in a Kubernetes CPU quantity (``1``, ``2.5``, ``500m``), refused unless > 0."""
    text = str(quantity).strip()
    m = _CPU.match(text)
    if isinstance(quantity, bool) or not m:
        raise PipelineError(f"{what} must be a Kubernetes CPU quantity such as 1, 2 or 500m, "
                            f"got {quantity!r}")
    cores = float(m.group(1)) / (1000 if m.group(2) else 1)
    if cores <= 0:
        raise PipelineError(f"{what} must be more than 0 cores, got {quantity!r}")
    return cores


def k8s_name(text: str, what: str = "name", max_len: int = MAX_CLUSTER_NAME_LEN) -> str:
    """``text`` as a Kubernetes resource name: lower case, ``-`` for anything else.

    Catalog entry names are free-form YAML keys (``Qwen2.5_run``); the operator
    refuses a DaskCluster whose name is not an RFC 1123 label short enough
    for its ``-scheduler`` service.
    """
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    if not slug or len(slug) > max_len:
        raise PipelineError(f"{what} {text!r} does not make a Kubernetes name (lower-case "
                            f"letters, digits and '-', at most {max_len} characters)")
    return check_name(slug, what, max_len)


def check_name(text: str, what: str = "name", max_len: int = MAX_CLUSTER_NAME_LEN) -> str:
    """``text`` if it already is an RFC 1123 label of at most ``max_len`` characters (names
    the user typed, like a namespace, are refused rather than silently changed)."""
    if not isinstance(text, str) or len(text) > max_len or not _NAME.match(text):
        raise PipelineError(f"{what} {text!r} is not a Kubernetes name (lower-case letters, "
                            f"digits and '-', at most {max_len} characters)")
    return text


@dataclass(frozen=True)
class KubernetesOptions:
    """What the pods look like: one value per thing a user sizes or points somewhere.

    Frozen and built from plain values so the CLI, a cluster file and tests
    all describe a cluster the same way; ``check`` refuses a bad one before
    anything is written or started.
    """

    image: str = "rlvr-lin:latest"  # built from workflows/k8s/Dockerfile
    # IfNotPresent: an image loaded into kind/minikube is used as is (":latest" would
    # otherwise default to Always and fail to pull an image that exists in no registry)
    image_pull_policy: str = "IfNotPresent"
    namespace: str | None = None  # None: kubectl's current namespace (kubectl apply -n NS)
    workers: int = 2
    worker_memory: str = "4Gi"  # pod limit = request = dask worker --memory-limit
    worker_cpu: str = "1"  # pod limit = request; dask worker --nthreads is its whole cores
    scheduler_memory: str = "2Gi"
    scheduler_cpu: str = "1"
    job_memory: str = "4Gi"  # the runner builds graphs and reads checkpoint headers
    job_cpu: str = "1"
    pvc: str | None = "rlvr-lin-data"  # a ReadWriteMany claim holding catalog, runs, outputs
    host_path: str | None = None  # instead of pvc: a node folder (single-node kind/minikube)
    mount_path: str = "/data"
    catalog: str | None = None  # the catalog inside the pods; None: <mount_path>/data_catalog.yaml
    env: tuple[tuple[str, str], ...] = ()  # extra variables for every container
    idle_timeout: int = 0  # seconds before the operator deletes an idle DaskCluster (0: never)

    def check(self) -> KubernetesOptions:
        """Self, if every value is one the API server and Dask accept; else a PipelineError."""
        check_int(self.workers, "workers", 1)
        check_int(self.idle_timeout, "idle timeout", 0)
        if memory_bytes(self.worker_memory, "worker memory") < MIN_WORKER_MEMORY:
            raise PipelineError(f"worker memory {self.worker_memory!r} is below 256Mi, too "
                                "little for a Dask worker")
        memory_bytes(self.scheduler_memory, "scheduler memory")
        memory_bytes(self.job_memory, "job memory")
        for what in ("worker_cpu", "scheduler_cpu", "job_cpu"):
            cpu_cores(getattr(self, what), what.replace("_", " "))
        if not self.image.strip() or any(c.isspace() for c in self.image):
            raise PipelineError(f"image must be an image reference such as "
                                f"registry/rlvr-lin:0.1, got {self.image!r}")
        if self.image_pull_policy not in ("Always", "IfNotPresent", "Never"):
            raise PipelineError(f"image pull policy must be Always, IfNotPresent or Never, "
                                f"got {self.image_pull_policy!r}")
        if self.namespace is not None:
            check_name(self.namespace, "namespace", 63)
        if (self.pvc is None) == (self.host_path is None):
            raise PipelineError("the data volume needs exactly one of a PVC name or a host "
                                "path")
        if self.pvc is not None and (len(self.pvc) > 253 or not _SUBDOMAIN.match(self.pvc)):
            raise PipelineError(f"PVC name {self.pvc!r} is not a Kubernetes name (lower-case "
                                "letters, digits, '-' and '.')")
        for what, path in (("mount path", self.mount_path), ("host path", self.host_path),
                           ("catalog", self.catalog)):
            if path is not None and not path.startswith("/"):
                raise PipelineError(f"{what} must be an absolute path in the pod, got {path!r}")
        for key, _ in self.env:
            if not _ENV_NAME.match(key):
                raise PipelineError(f"environment variable name {key!r} is not valid")
        return self

    @property
    def catalog_in_pod(self) -> str:
        return self.catalog or f"{self.mount_path.rstrip('/')}/data_catalog.yaml"

    @property
    def worker_threads(self) -> int:
        """Threads per worker: its whole cores (at least one), as the local cluster runs 1 per
        core; BLAS threads are pinned to the same number so a pod never oversubscribes."""
        return max(1, math.floor(cpu_cores(self.worker_cpu)))


def parse_env(items: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """``KEY=VALUE`` strings (the CLI's repeatable ``--env``) as pairs, in order."""
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PipelineError(f"--env must be KEY=VALUE, got {item!r}")
        out.append((key, value))
    return tuple(out)


# ---- pod specs ----------------------------------------------------------------------------

def _resources(memory: str, cpu: str) -> dict[str, Any]:
    """Requests = limits: the pod is sized exactly, never evicted first, and the memory limit
    Dask is given is the one the kernel enforces."""
    amount = {"cpu": str(cpu), "memory": str(memory)}
    return {"requests": dict(amount), "limits": dict(amount)}


def _env(opts: KubernetesOptions, *first: tuple[str, str]) -> list[dict[str, str]]:
    """``first`` then the user's variables; a user's value for the same name wins (last)."""
    merged = dict(first)
    merged.update(opts.env)
    return [{"name": k, "value": v} for k, v in merged.items()]


def _volume(opts: KubernetesOptions) -> dict[str, Any]:
    if opts.pvc is not None:
        return {"name": "data", "persistentVolumeClaim": {"claimName": opts.pvc}}
    return {"name": "data", "hostPath": {"path": opts.host_path, "type": "DirectoryOrCreate"}}


def _mount(opts: KubernetesOptions) -> list[dict[str, Any]]:
    return [{"name": "data", "mountPath": opts.mount_path}]


def worker_args(opts: KubernetesOptions) -> list[str]:
    """``dask worker`` with the container's own memory limit, in bytes.

    No scheduler argument: the operator sets $DASK_SCHEDULER_ADDRESS in the
    pod, which Dask reads as its ``scheduler-address`` setting.
    """
    return ["dask", "worker", "--name", f"$({WORKER_NAME_ENV})",
            "--nworkers", "1", "--nthreads", str(opts.worker_threads),
            "--memory-limit", str(memory_bytes(opts.worker_memory, "worker memory")),
            "--dashboard", "--dashboard-address", str(WORKER_DASHBOARD_PORT)]


def worker_spec(opts: KubernetesOptions) -> dict[str, Any]:
    """The ``spec.worker`` of a DaskCluster (the operator's ``make_worker_spec``, sized)."""
    threads = str(opts.worker_threads)
    return {
        "replicas": opts.workers,
        "spec": {
            "containers": [{
                "name": "worker",
                "image": opts.image,
                "imagePullPolicy": opts.image_pull_policy,
                "args": worker_args(opts),
                "env": _env(opts, ("OMP_NUM_THREADS", threads),
                            ("OPENBLAS_NUM_THREADS", threads), ("MKL_NUM_THREADS", threads),
                            *WORKER_ENV.items()),
                "resources": _resources(opts.worker_memory, opts.worker_cpu),
                "ports": [{"name": "http-dashboard", "containerPort": WORKER_DASHBOARD_PORT,
                           "protocol": "TCP"}],
                "volumeMounts": _mount(opts),
            }],
            "volumes": [_volume(opts)],
        },
    }


def scheduler_spec(opts: KubernetesOptions, cluster_name: str) -> dict[str, Any]:
    """The ``spec.scheduler`` of a DaskCluster: pod and service as ``make_scheduler_spec``
    writes them; the service selects the scheduler pod by the cluster's name."""
    probe = {"httpGet": {"port": "http-dashboard", "path": "/health"}}
    return {
        "spec": {
            "containers": [{
                "name": "scheduler",
                "image": opts.image,
                "imagePullPolicy": opts.image_pull_policy,
                "args": ["dask", "scheduler", "--host", "0.0.0.0"],
                "env": _env(opts),
                "resources": _resources(opts.scheduler_memory, opts.scheduler_cpu),
                "ports": [
                    {"name": "tcp-comm", "containerPort": SCHEDULER_PORT, "protocol": "TCP"},
                    {"name": "http-dashboard", "containerPort": SCHEDULER_DASHBOARD_PORT,
                     "protocol": "TCP"},
                ],
                "readinessProbe": {**probe, "initialDelaySeconds": 0, "periodSeconds": 1,
                                   "timeoutSeconds": 300},
                "livenessProbe": {**probe, "initialDelaySeconds": 15, "periodSeconds": 20},
            }],
        },
        "service": {
            "type": "ClusterIP",
            "selector": {"dask.org/cluster-name": cluster_name,
                         "dask.org/component": "scheduler"},
            "ports": [
                {"name": "tcp-comm", "protocol": "TCP", "port": SCHEDULER_PORT,
                 "targetPort": "tcp-comm"},
                {"name": "http-dashboard", "protocol": "TCP", "port": SCHEDULER_DASHBOARD_PORT,
                 "targetPort": "http-dashboard"},
            ],
        },
    }


def _metadata(opts: KubernetesOptions, name: str, entry: str | None) -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": "rlvr-lin", "app.kubernetes.io/instance": name}
    if entry is not None:
        labels["rlvr-lin/catalog-entry"] = k8s_name(entry, "catalog entry", 63)
    meta: dict[str, Any] = {"name": name, "labels": labels}
    if opts.namespace is not None:
        meta["namespace"] = opts.namespace
    return meta


def cluster_manifest(opts: KubernetesOptions, name: str,
                     entry: str | None = None) -> dict[str, Any]:
    """A ``DaskCluster`` named ``name``: scheduler + ``opts.workers`` workers, until deleted."""
    opts.check()
    check_name(name, "cluster name")
    return {
        "apiVersion": API_VERSION,
        "kind": "DaskCluster",
        "metadata": _metadata(opts, name, entry),
        "spec": {"idleTimeout": opts.idle_timeout, "worker": worker_spec(opts),
                 "scheduler": scheduler_spec(opts, name)},
    }


def analyze_command(entry: str) -> list[str]:
    """The job runner's command line: analyze a catalog entry on the job's own cluster.

    ``$(DASK_SCHEDULER_ADDRESS)`` is expanded by the kubelet from the variable
    the operator puts in the runner's environment (``--cluster`` would also
    read it by itself; spelling it out makes the pod's command say where it runs).
    """
    return ["rlvr-lin", "analyze", entry, "--cluster", f"$({SCHEDULER_ENV})"]


def job_manifest(opts: KubernetesOptions, entry: str, name: str) -> dict[str, Any]:
    """A ``DaskJob`` named ``name``: a cluster of the same name and one runner pod
    (``<name>-runner``) running ``analyze_command(entry)``; the operator deletes the
    cluster when the runner exits."""
    from pipeline.catalog import CATALOG_ENV

    opts.check()
    check_name(name, "job name")
    runner = {
        "restartPolicy": "Never",  # the operator reads the runner's Succeeded/Failed phase
        "containers": [{
            "name": "job",
            "image": opts.image,
            "imagePullPolicy": opts.image_pull_policy,
            "args": analyze_command(entry),
            "workingDir": opts.mount_path,
            "env": _env(opts, (CATALOG_ENV, opts.catalog_in_pod)),
            "resources": _resources(opts.job_memory, opts.job_cpu),
            "volumeMounts": _mount(opts),
        }],
        "volumes": [_volume(opts)],
    }
    return {
        "apiVersion": API_VERSION,
        "kind": "DaskJob",
        "metadata": _metadata(opts, name, entry),
        "spec": {
            "job": {"spec": runner},
            "cluster": {"spec": {"idleTimeout": opts.idle_timeout, "worker": worker_spec(opts),
                                 "scheduler": scheduler_spec(opts, name)}},
        },
    }


def manifest_names(entry: str) -> tuple[str, str]:
    """(DaskCluster name, DaskJob name) for a catalog entry. They differ: a DaskJob finding a
    DaskCluster of its own name would adopt it and delete it when the job ends."""
    slug = k8s_name(entry, "catalog entry", MAX_CLUSTER_NAME_LEN - len("rlvr-lin--analyze"))
    return f"rlvr-lin-{slug}", f"rlvr-lin-{slug}-analyze"


def manifests(entry: str, opts: KubernetesOptions) -> dict[str, dict[str, Any]]:
    """File name -> manifest, for ``entry``: ``daskcluster.yaml`` and ``daskjob.yaml``."""
    cluster_name, job_name = manifest_names(entry)
    return dict(zip(MANIFEST_FILES, (cluster_manifest(opts, cluster_name, entry),
                                     job_manifest(opts, entry, job_name)), strict=True))


def render(manifest: Mapping[str, Any], entry: str) -> str:
    """YAML text of one manifest, with a header saying how it was made (keys in build order,
    so a diff between two generations is a diff of options)."""
    import yaml

    head = (f"# Generated by `rlvr-lin k8s-manifests {entry}` (pipeline/compute/kubernetes.py)."
            "\n# Regenerate instead of editing; see docs/kubernetes.md.\n")
    return head + yaml.safe_dump(dict(manifest), sort_keys=False, default_flow_style=False)


def write_manifests(entry: str, opts: KubernetesOptions,
                    out: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Write ``daskcluster.yaml`` and ``daskjob.yaml`` into ``out``: (path, manifest) each."""
    built = manifests(entry, opts)  # everything checked before the first write
    if out.exists() and not out.is_dir():
        raise PipelineError("is a file, not a folder; choose another --out", out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for fname, manifest in built.items():
        path = out / fname
        path.write_text(render(manifest, entry))
        written.append((path, manifest))
    return written


def describe(manifest: Mapping[str, Any]) -> str:
    """What the operator will start for ``manifest``, in one line for the CLI's table."""
    spec = manifest["spec"]
    cluster = spec["cluster"]["spec"] if manifest["kind"] == "DaskJob" else spec
    worker = cluster["worker"]
    limits = worker["spec"]["containers"][0]["resources"]["limits"]
    pods = (f"scheduler + {worker['replicas']} workers ({limits['memory']}, "
            f"{limits['cpu']} CPU each)")
    if manifest["kind"] == "DaskJob":
        return f"{pods}; runner: {' '.join(spec['job']['spec']['containers'][0]['args'])}"
    return pods


# ---- the "kubernetes" cluster kind --------------------------------------------------------

# cluster-file keys (rlvr-lin.cluster.<key>) -> option fields; n-workers and memory-limit
# come through ClusterSpec's own fields
_FILE_KEYS = {f.name.replace("_", "-"): f.name for f in dataclasses.fields(KubernetesOptions)
              if f.name not in ("workers", "worker_memory")}
_KIND_KEYS = {"name": "the DaskCluster's name (default rlvr-lin-<random>)",
              "resource-timeout": "seconds to wait for the operator (default 60)"}


_TEXT_FIELDS = {f.name for f in dataclasses.fields(KubernetesOptions)
                if f.type in ("str", "str | None")}


def dask_env(config: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """Dotted Dask settings as the ``DASK_A__B__C`` variables Dask reads at start-up.

    A cluster file's Dask section (``distributed.worker.memory.target: 0.7``)
    is set in the client process only; in the pods it has to arrive as
    environment, which Dask parses back with ``ast.literal_eval``.
    """
    return tuple((f"DASK_{key.upper().replace('.', '__').replace('-', '_')}", repr(value)
                  if not isinstance(value, str) else value) for key, value in config.items())


def options_from_spec(spec: ClusterSpec) -> KubernetesOptions:
    """The pods a ``kind: kubernetes`` cluster spec asks for, checked.

    ``n-workers``, ``memory-limit`` and ``threads-per-worker`` (as the worker
    CPU, unless ``worker-cpu`` is given) come from the spec's own fields; the
    other keys are ``KubernetesOptions`` fields spelled with '-'; the file's
    Dask settings reach every pod as environment (``dask_env``).
    """
    where = None if spec.origin.startswith(("-", "$")) else spec.origin  # a file: name it
    kw: dict[str, Any] = {}
    for key, value in spec.options.items():
        if key in _KIND_KEYS:
            continue
        if key not in _FILE_KEYS:
            known = ", ".join(sorted([*_FILE_KEYS, *_KIND_KEYS]))
            raise PipelineError(f"unknown option {key!r} for cluster kind 'kubernetes' "
                                f"(expected one of {known})", where)
        field_name = _FILE_KEYS[key]
        if field_name in _TEXT_FIELDS:
            if isinstance(value, int | float) and not isinstance(value, bool):
                value = str(value)  # YAML reads `worker-cpu: 2` as a number
            if value is not None and not isinstance(value, str):
                raise PipelineError(f"cluster kind 'kubernetes': {key} must be a string, "
                                    f"got {value!r}", where)
        kw[field_name] = value
    env = kw.pop("env", None) or {}
    if not isinstance(env, Mapping):
        raise PipelineError("cluster kind 'kubernetes': env must be a mapping NAME: value",
                            where)
    kw["env"] = (*dask_env(spec.dask_config), *((str(k), str(v)) for k, v in env.items()))
    if spec.n_workers is not None:
        kw["workers"] = spec.n_workers
    if spec.memory_limit is not None:
        kw["worker_memory"] = str(spec.memory_limit)
    if "worker_cpu" not in kw and spec.threads_per_worker != 1:
        kw["worker_cpu"] = str(spec.threads_per_worker)
    try:
        return KubernetesOptions(**kw).check()
    except PipelineError as e:
        raise PipelineError(f"cluster kind 'kubernetes': {e}", where) from None


def _reach_api(namespace: str | None, origin: str) -> str:
    """The namespace to use, once the API server has answered; else a one-line PipelineError.

    Asked before KubeCluster starts: a KubeCluster that fails half-way stays
    registered for dask-kubernetes' exit hook, which then prints the same
    failure again as a traceback after the CLI has reported it.
    """
    import kr8s

    where = f"cluster kind 'kubernetes' (from {origin})"
    kubeconfig = os.environ.get("KUBECONFIG")
    try:
        api = kr8s.api(kubeconfig=kubeconfig, namespace=namespace)  # connects: version check
        api.version()
    except ValueError as e:  # kr8s: "Unable to find valid credentials"
        raise PipelineError(f"{where}: no Kubernetes configuration found ($KUBECONFIG, "
                            f"~/.kube/config or an in-cluster service account): "
                            f"{_first_line(e)}") from None
    except Exception as e:  # httpx transport errors, kr8s.ServerError (401/403), TLS errors
        raise PipelineError(f"{where}: the Kubernetes API server of "
                            f"{kubeconfig or '~/.kube/config'} does not answer: "
                            f"{_first_line(e)}") from None
    return str(namespace or api.namespace)


@contextmanager
def kubernetes_cluster(spec: ClusterSpec) -> Iterator[Any]:
    """A client on a DaskCluster created for this job by the operator, deleted on exit.

    The cluster is the same ``cluster_manifest`` that ``k8s-manifests`` writes,
    handed to ``dask_kubernetes.operator.KubeCluster`` as its custom spec. Run
    from outside the Kubernetes network, KubeCluster port-forwards the scheduler.
    No Kubernetes configuration, an unreachable API server or a missing
    operator is a one-line error, not a traceback from deep inside kr8s.
    """
    opts = options_from_spec(spec)
    try:
        from dask_kubernetes.operator import KubeCluster
    except ImportError:
        raise PipelineError("cluster kind 'kubernetes' needs dask-kubernetes "
                            "(pip install dask-kubernetes) and a cluster running the Dask "
                            "operator") from None
    from distributed import Client

    namespace = _reach_api(opts.namespace, spec.origin)
    name = str(spec.options.get("name") or f"rlvr-lin-{uuid.uuid4().hex[:8]}")
    manifest = cluster_manifest(opts, name)
    try:
        cluster = KubeCluster(custom_cluster_spec=manifest, namespace=namespace,
                              shutdown_on_close=True, quiet=True,
                              resource_timeout=int(spec.options.get("resource-timeout", 60)))
    except Exception as e:  # no operator (RuntimeError), a timeout, a scheduler crash loop
        raise PipelineError(f"cannot start DaskCluster {name} in namespace {namespace} "
                            f"(from {spec.origin}): {_first_line(e)}") from None
    with cluster, Client(cluster) as client:
        yield client


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return f"{type(e).__name__}: {text.splitlines()[0]}"
