"""Kubernetes manifests, checked as far as a machine without a Kubernetes API allows.

* The DaskCluster and DaskJob validate against the openAPIV3 schemas of the
  CRDs that the installed dask-kubernetes ships (the ones its Helm chart
  installs), and carry no field the API server would silently prune.
* The objects the operator makes from them (its own controller functions:
  worker Deployment, scheduler Deployment and Service, job-runner Pod)
  validate with kubernetes-validate, strictly, against shipped API versions.
* The runner's command line is the ``rlvr-lin`` app, with the entry name and a
  ``--cluster`` that, once the kubelet expands it, is the job's scheduler.
* Bad input is one ``error:`` line; the ``kubernetes`` cluster kind without a
  reachable API server is one PipelineError line.
* workflows/k8s/ holds exactly what the CLI writes for tiny-addition today.
"""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes.utils.quantity import parse_quantity
from typer.main import get_command
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.compute.clusters import SCHEDULER_ENV, cluster_spec, dask_client
from pipeline.compute.kubernetes import (
    MANIFEST_FILES,
    KubernetesOptions,
    manifest_names,
    manifests,
    memory_bytes,
)
from pipeline.errors import PipelineError

REPO = Path(__file__).resolve().parents[1]
CATALOG = REPO / "data_catalog.yaml"
ENTRY = "tiny-addition"  # the embedded default entry
# the oldest Kubernetes still widely run, and the newest schema kubernetes-validate ships
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
NAMESPACE = "analysis"
runner = CliRunner()


# ---- the operator's CRDs --------------------------------------------------------------------

def _crd_dir() -> Path:
    import dask_kubernetes

    # the Helm chart's crds/ are the fully expanded CRDs (customresources/ hold templates)
    return (Path(dask_kubernetes.__file__).parent / "operator" / "deployment" / "helm"
            / "dask-kubernetes-operator" / "crds")


@functools.cache
def crd_schema(kind: str) -> dict[str, Any]:
    """openAPIV3Schema of the served v1 version of the operator's CRD for ``kind``."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((_crd_dir() / f"{kind.lower()}.yaml").read_text(), Loader=loader)
    assert crd["kind"] == "CustomResourceDefinition"
    assert crd["spec"]["group"] == "kubernetes.dask.org" and crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def pruned_fields(obj: Any, schema: dict[str, Any], where: str = "") -> list[str]:
    """Paths in ``obj`` that a structural schema does not declare.

    The API server does not reject those: it drops them (pruning), so a typo
    such as ``volumeMount`` would vanish without an error. jsonschema cannot
    see this (the CRDs do not say additionalProperties: false).
    """
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    out: list[str] = []
    if isinstance(obj, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, value in obj.items():
            if props is not None and key in props:
                out += pruned_fields(value, props[key], f"{where}.{key}")
            elif isinstance(extra, dict):
                out += pruned_fields(value, extra, f"{where}.{key}")
            elif props is not None or extra is False:
                out.append(f"{where}.{key}")
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, value in enumerate(obj):
            out += pruned_fields(value, schema["items"], f"{where}[{i}]")
    return out


@functools.cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(crd_schema(kind))


def assert_valid_custom_resource(manifest: dict[str, Any]) -> None:
    crd_validator(manifest["kind"]).validate(manifest)
    assert crd_pruned(manifest) == []


def crd_pruned(manifest: dict[str, Any]) -> list[str]:
    """``pruned_fields`` of a custom resource; apiVersion, kind and metadata (ObjectMeta) are
    the API server's own, implicit in every CRD."""
    body = {k: v for k, v in manifest.items() if k not in ("apiVersion", "kind", "metadata")}
    return pruned_fields(body, crd_schema(manifest["kind"]))


def built(**kw: Any) -> dict[str, dict[str, Any]]:
    return manifests(ENTRY, KubernetesOptions(namespace=NAMESPACE, **kw))


VARIANTS = {
    "defaults": {},
    "hostPath, 6 workers of 2 CPU and 1500Mi, env": dict(
        pvc=None, host_path="/mnt/rlvr", mount_path="/mnt/rlvr", workers=6, worker_cpu="2",
        worker_memory="1500Mi", env=(("HF_HOME", "/mnt/rlvr/hf"),)),
}


@pytest.mark.parametrize("kw", VARIANTS.values(), ids=VARIANTS.keys())
def test_manifests_validate_against_the_operators_crds(kw: dict[str, Any]) -> None:
    for manifest in built(**kw).values():
        assert manifest["apiVersion"] == "kubernetes.dask.org/v1"
        assert_valid_custom_resource(manifest)


def test_crd_check_catches_a_wrong_type_and_a_pruned_field() -> None:
    """The two checks above can fail: a string replica count and a misspelt key."""
    job = built()["daskjob.yaml"]
    bad = copy.deepcopy(job)
    bad["spec"]["cluster"]["spec"]["worker"]["replicas"] = "two"
    with pytest.raises(jsonschema.ValidationError, match="'two' is not of type 'integer'"):
        assert_valid_custom_resource(bad)
    typo = copy.deepcopy(job)
    typo["spec"]["job"]["spec"]["containers"][0]["volumeMount"] = []
    assert crd_pruned(typo) == [
        ".spec.job.spec.containers[0].volumeMount"]
    no_job = copy.deepcopy(job)
    del no_job["spec"]["job"]
    with pytest.raises(jsonschema.ValidationError, match="'job' is a required property"):
        assert_valid_custom_resource(no_job)


def test_specs_match_the_operators_own_helpers() -> None:
    """Same container names, ports, probes and service as make_scheduler_spec/make_worker_spec,
    so the operator's networking (service selector, tcp-comm port) finds our pods."""
    from dask_kubernetes.operator.kubecluster.kubecluster import (
        make_scheduler_spec,
        make_worker_spec,
    )

    cluster = built()["daskcluster.yaml"]
    name = cluster["metadata"]["name"]
    ours_s = cluster["spec"]["scheduler"]
    theirs_s = make_scheduler_spec(cluster_name=name)
    assert ours_s["service"] == theirs_s["service"]
    (oc,), (tc,) = ours_s["spec"]["containers"], theirs_s["spec"]["containers"]
    for key in ("name", "ports", "readinessProbe", "livenessProbe"):
        assert oc[key] == tc[key], key
    (ow,) = cluster["spec"]["worker"]["spec"]["containers"]
    (tw,) = make_worker_spec(n_workers=2)["spec"]["containers"]
    assert (ow["name"], ow["ports"]) == (tw["name"], tw["ports"])
    # the worker options the operator relies on (its DASK_WORKER_NAME, its dashboard port),
    # with the same values
    assert _options(tw["args"]).items() <= _options(ow["args"]).items()


def _options(args: list[str]) -> dict[str, str | None]:
    """``--option value`` pairs of a command line (None for a flag)."""
    out: dict[str, str | None] = {}
    for i, a in enumerate(args):
        if a.startswith("--"):
            nxt = args[i + 1] if i + 1 < len(args) else None
            out[a] = None if nxt is None or nxt.startswith("--") else nxt
    return out


# ---- what the operator makes of them ---------------------------------------------------------

def operator_objects(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The Kubernetes objects the operator's controller builds from a DaskCluster or DaskJob,
    made by its own functions (kopf handlers call exactly these)."""
    from dask_kubernetes.operator.controller import controller as c

    job = manifest["kind"] == "DaskJob"
    name = manifest["metadata"]["name"]  # a DaskJob's cluster takes the job's name
    ns = manifest["metadata"]["namespace"]
    spec = manifest["spec"]["cluster"]["spec"] if job else manifest["spec"]
    labels = manifest["metadata"]["labels"]
    out = [
        c.build_scheduler_deployment_spec(name, spec["scheduler"]["spec"], {}, labels),
        c.build_scheduler_service_spec(name, spec["scheduler"]["service"], {}, labels),
        c.build_worker_deployment_spec(f"{name}-default", ns, name, "0123456789",
                                       spec["worker"]["spec"], {}, labels),
    ]
    group = c.build_default_worker_group_spec(name, spec["worker"], {}, labels)
    assert_valid_custom_resource(group)  # the DaskWorkerGroup it creates, against its CRD
    if job:
        out.append(c.build_job_pod_spec(name, name, ns, manifest["spec"]["job"]["spec"], {},
                                        labels))
    return out


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("kw", VARIANTS.values(), ids=VARIANTS.keys())
def test_operator_built_objects_validate_strictly(kw: dict[str, Any], version: str) -> None:
    kinds = []
    for manifest in built(**kw).values():
        for obj in operator_objects(manifest):
            kubernetes_validate.validate(obj, version, strict=True)
            kinds.append(obj["kind"])
    assert sorted(kinds) == ["Deployment"] * 4 + ["Pod"] + ["Service"] * 2


def test_strict_pod_validation_can_fail() -> None:
    job = built()["daskjob.yaml"]
    pod = operator_objects(job)[-1]
    pod["spec"]["containers"][0]["resources"]["limits"]["memory"] = {"Gi": 4}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, K8S_VERSIONS[-1], strict=True)


def _expand(arg: str, env: list[dict[str, str]]) -> str:
    """The kubelet's $(VAR) expansion of a container arg from the container's env."""
    values = {e["name"]: e["value"] for e in env}
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: values.get(m[1], m[0]), arg)


def test_job_runner_runs_rlvr_lin_on_the_jobs_own_scheduler() -> None:
    import tomllib

    job = built()["daskjob.yaml"]
    pod = operator_objects(job)[-1]
    (container,) = pod["spec"]["containers"]
    args = [_expand(a, container["env"]) for a in container["args"]]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts[args[0]] == "pipeline.cli:app"  # the console script is our Typer app
    assert args[1:3] == ["analyze", ENTRY]
    address = f"tcp://{job['metadata']['name']}-scheduler.{NAMESPACE}.svc.cluster.local:8786"
    assert args[3:] == ["--cluster", address]
    # our cluster factory reads that value as the existing scheduler the operator started
    spec = cluster_spec(args[4])
    assert (spec.kind, spec.address) == ("address", address)
    # and the variable it came from is the one --cluster falls back to on its own
    assert SCHEDULER_ENV == "DASK_SCHEDULER_ADDRESS" in {e["name"] for e in container["env"]}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["RLVR_LIN_CATALOG"] == "/data/data_catalog.yaml"
    assert container["volumeMounts"] == [{"name": "data", "mountPath": "/data"}]
    assert pod["spec"]["restartPolicy"] == "Never"  # else the runner never "Succeeds"
    group = get_command(app)
    import click

    cmd = group.get_command(click.Context(group), args[1])
    if cmd is not None:  # `rlvr-lin analyze` lands on another branch: parse it when present
        ctx = cmd.make_context(args[1], args[2:], resilient_parsing=True)
        assert ENTRY in ctx.params.values()
        assert address in ctx.params.values()
    else:  # the --cluster spelling is the one every Dask command of the app takes
        fit = group.get_command(click.Context(group), "fit")
        opts = {o for p in fit.params for o in getattr(p, "opts", [])}
        assert "--cluster" in opts


@pytest.mark.parametrize("memory", ["4Gi", "1500Mi", "3G", "268435456", "2.5Gi"])
def test_worker_memory_limit_is_the_pods_limit(memory: str) -> None:
    cluster = built(worker_memory=memory, worker_cpu="2500m")["daskcluster.yaml"]
    (worker,) = cluster["spec"]["worker"]["spec"]["containers"]
    args = worker["args"]
    limit = int(args[args.index("--memory-limit") + 1])
    # the Kubernetes client's own quantity parser, not ours
    assert limit == parse_quantity(worker["resources"]["limits"]["memory"])
    assert worker["resources"]["requests"] == worker["resources"]["limits"]
    assert args[args.index("--nthreads") + 1] == "2"  # whole cores of 2500m
    assert {"name": "OMP_NUM_THREADS", "value": "2"} in worker["env"]
    assert {"name": "MALLOC_MMAP_THRESHOLD_", "value": str(32 << 20)} in worker["env"]


def test_memory_quantities() -> None:
    assert memory_bytes("4Gi") == 4 * 2**30 and memory_bytes("4G") == 4 * 10**9
    for bad in ("4GB", "lots", "512m", "-1Gi", "", "0.5"):
        with pytest.raises(PipelineError, match="memory"):
            memory_bytes(bad)


def test_job_and_cluster_names_differ_and_fit_the_operator() -> None:
    from dask_kubernetes.operator.validation import validate_cluster_name

    names = manifest_names("My_Run.v2")
    assert names == ("rlvr-lin-my-run-v2", "rlvr-lin-my-run-v2-analyze")
    for n in names:
        validate_cluster_name(n)  # the operator's own check: raises if invalid
    with pytest.raises(PipelineError, match="Kubernetes name"):
        manifest_names("x" * 60)


# ---- the CLI ---------------------------------------------------------------------------------

def _cli(*args: str) -> Any:
    return runner.invoke(app, ["k8s-manifests", *args, "--catalog", str(CATALOG)])


def test_workflows_k8s_manifests_are_what_the_cli_writes_today(tmp_path: Path) -> None:
    r = _cli(ENTRY, "--out", str(tmp_path))
    assert r.exit_code == 0, r.output
    assert "DaskJob/rlvr-lin-tiny-addition-analyze" in r.stdout
    for name in MANIFEST_FILES:
        committed = (REPO / "workflows" / "k8s" / name).read_text()
        assert committed == (tmp_path / name).read_text(), (
            f"workflows/k8s/{name} is stale: run rlvr-lin k8s-manifests {ENTRY} "
            "--out workflows/k8s")
        assert_valid_custom_resource(yaml.safe_load(committed))


def test_cli_options_reach_the_manifests(tmp_path: Path) -> None:
    r = _cli(ENTRY, "--out", str(tmp_path), "--workers", "5", "--worker-memory", "6Gi",
             "--host-path", "/srv/rlvr", "--mount-path", "/srv/rlvr", "--env", "A=b=c",
             "--image", "ghcr.io/me/rlvr-lin:0.1", "--namespace", NAMESPACE)
    assert r.exit_code == 0, r.output
    job = yaml.safe_load((tmp_path / "daskjob.yaml").read_text())
    worker = job["spec"]["cluster"]["spec"]["worker"]
    (c,) = worker["spec"]["containers"]
    assert worker["replicas"] == 5 and c["image"] == "ghcr.io/me/rlvr-lin:0.1"
    assert c["args"][c["args"].index("--memory-limit") + 1] == str(6 * 2**30)
    assert worker["spec"]["volumes"] == [
        {"name": "data", "hostPath": {"path": "/srv/rlvr", "type": "DirectoryOrCreate"}}]
    assert {"name": "A", "value": "b=c"} in c["env"]
    assert job["metadata"]["namespace"] == NAMESPACE
    runner_env = job["spec"]["job"]["spec"]["containers"][0]["env"]
    assert {"name": "RLVR_LIN_CATALOG", "value": "/srv/rlvr/data_catalog.yaml"} in runner_env


def _a_file(tmp_path: Path) -> str:
    f = tmp_path / "taken"
    f.write_text("x")
    return str(f)


BAD = {
    "workers < 1": (lambda t: [ENTRY, "--out", str(t / "o"), "--workers", "0"],
                    "workers must be >= 1"),
    "memory that does not parse": (
        lambda t: [ENTRY, "--out", str(t / "o"), "--worker-memory", "4GB"],
        "worker memory must be a Kubernetes memory quantity"),
    "unknown catalog entry": (lambda t: ["no-such-run", "--out", str(t / "o")],
                              "no run named 'no-such-run'"),
    "output folder is a file": (lambda t: [ENTRY, "--out", _a_file(t)],
                                "is a file, not a folder"),
    "both volumes": (lambda t: [ENTRY, "--out", str(t / "o"), "--pvc", "x", "--host-path",
                                "/srv"], "exactly one of a PVC name or a host path"),
    "bad env": (lambda t: [ENTRY, "--out", str(t / "o"), "--env", "NOVALUE"],
                "--env must be KEY=VALUE"),
    "namespace that is not a name": (
        lambda t: [ENTRY, "--out", str(t / "o"), "--namespace", "My_NS"],
        "namespace 'My_NS' is not a Kubernetes name"),
}


@pytest.mark.parametrize("make_args,message", BAD.values(), ids=BAD.keys())
def test_bad_input_is_one_error_line(tmp_path: Path, make_args: Any, message: str) -> None:
    r = _cli(*make_args(tmp_path))
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (tmp_path / "o").exists()  # refused before anything was written


# ---- the "kubernetes" cluster kind, without a Kubernetes API --------------------------------

UNREACHABLE = """apiVersion: v1
kind: Config
clusters: [{name: nowhere, cluster: {server: "https://127.0.0.1:9"}}]
users: [{name: me, user: {token: not-a-token}}]
contexts: [{name: nowhere, context: {cluster: nowhere, user: me, namespace: default}}]
current-context: nowhere
"""


@pytest.mark.parametrize("config", ["none", "unreachable"])
def test_kubernetes_kind_without_an_api_is_one_line(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     config: str) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    if config == "unreachable":
        kubeconfig.write_text(UNREACHABLE)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.kube/config either
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # nor in-cluster credentials
    assert cluster_spec("kubernetes").kind == "kubernetes"
    with pytest.raises(PipelineError) as e, dask_client("kubernetes", n_workers=2):
        pytest.fail("a client without a Kubernetes API")
    msg = str(e.value)
    assert "\n" not in msg and "cluster kind 'kubernetes'" in msg
    expected = ("no Kubernetes configuration found" if config == "none"
                else f"API server of {kubeconfig} does not answer: ConnectError")
    assert expected in msg, msg


def test_kubernetes_cluster_file_options_are_checked(tmp_path: Path) -> None:
    f = tmp_path / "k8s.yaml"
    f.write_text("rlvr-lin:\n  cluster:\n    kind: kubernetes\n    n-workers: 3\n"
                 "    memory-limit: 6GB\n    image: me/rlvr-lin:1\n")
    with pytest.raises(PipelineError, match="worker memory must be a Kubernetes memory"), \
            dask_client(str(f)):
        pass
    f.write_text("rlvr-lin:\n  cluster:\n    kind: kubernetes\n    worker-gpus: 1\n")
    with pytest.raises(PipelineError, match="unknown option 'worker-gpus' for cluster kind"), \
            dask_client(str(f)):
        pass
    f.write_text("rlvr-lin:\n  cluster:\n    kind: kubernetes\n    env: [A=b]\n")
    with pytest.raises(PipelineError, match="env must be a mapping") as e, dask_client(str(f)):
        pass
    assert str(e.value).startswith(str(f))  # a file's mistake names the file


def test_cluster_file_reaches_the_pods(tmp_path: Path) -> None:
    """A kind: kubernetes file sizes the pods, and its Dask settings reach them as DASK_*
    variables that Dask itself reads back to the same values."""
    import dask.config

    from pipeline.compute.kubernetes import cluster_manifest, options_from_spec

    f = tmp_path / "k8s.yaml"
    f.write_text("rlvr-lin:\n  cluster:\n    kind: kubernetes\n    n-workers: 3\n"
                 "    memory-limit: 6Gi\n    threads-per-worker: 2\n    image: me/rlvr:1\n"
                 "    env: {HF_HOME: /data/hf}\n"
                 "distributed:\n  worker:\n    memory:\n      target: 0.7\n"
                 "      spill: false\n")
    opts = options_from_spec(cluster_spec(str(f)))
    (worker,) = cluster_manifest(opts, "probe")["spec"]["worker"]["spec"]["containers"]
    args = _options(worker["args"])
    assert (opts.workers, opts.image, args["--nthreads"]) == (3, "me/rlvr:1", "2")
    assert int(args["--memory-limit"]) == parse_quantity(worker["resources"]["limits"]["memory"])
    env = {e["name"]: e["value"] for e in worker["env"]}
    assert env["HF_HOME"] == "/data/hf"
    dask_env = {k: v for k, v in env.items() if k.startswith("DASK_")}
    assert dask.config.collect_env(dask_env) == {
        "distributed": {"worker": {"memory": {"target": 0.7, "spill": False}}}}


# ---- the rest of workflows/k8s ---------------------------------------------------------------

K8S_DIR = REPO / "workflows" / "k8s"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_pvc_validates_and_is_the_claim_the_manifests_mount(version: str) -> None:
    pvc = yaml.safe_load((K8S_DIR / "pvc.yaml").read_text())
    kubernetes_validate.validate(pvc, version, strict=True)
    job = yaml.safe_load((K8S_DIR / "daskjob.yaml").read_text())
    (volume,) = job["spec"]["job"]["spec"]["volumes"]
    assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]  # runner and workers on many nodes


def test_readme_names_the_resources_the_operator_creates() -> None:
    """Every resource name the README tells you to watch or delete exists for tiny-addition."""
    cluster, job = manifest_names(ENTRY)
    made = {cluster, job, f"{job}-runner", f"{job}-scheduler", f"{cluster}-scheduler"}
    named = set(re.findall(r"rlvr-lin-tiny-addition[-a-z]*", (K8S_DIR / "README.md").read_text()))
    assert named and named <= made, named - made


def test_dockerfile_pins_the_torch_that_setup_pins() -> None:
    pin = re.search(r"TORCH_SPEC:-([^}]+)\}", (REPO / "workflows" / "setup.sh").read_text())
    docker = (K8S_DIR / "Dockerfile").read_text()
    assert pin and f"ARG TORCH_SPEC={pin[1]}\n" in docker
    # CPU torch before the project, so pip never resolves torch from PyPI's CUDA wheels
    assert docker.index("download.pytorch.org/whl/cpu") < docker.index("pip install .")
