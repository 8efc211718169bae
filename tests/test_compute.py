"""The cluster factory and the executors, on real Dask clusters (LocalCluster processes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dask
import distributed  # noqa: F401  (registers its config defaults)
import pytest

from pipeline.compute import EXECUTORS, SerialExecutor, cluster_spec, dask_client
from pipeline.compute.executors import DaskExecutor, open_executor
from pipeline.errors import PipelineError


def _square_pid(x: int) -> tuple[int, int]:
    return x * x, os.getpid()


def _fail(x: int) -> int:
    if x == 3:
        raise ValueError("task 3 failed")
    return x


def _config_value() -> object:
    return dask.config.get("distributed.scheduler.allowed-failures")


def test_spec_from_value(tmp_path, monkeypatch):
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    assert cluster_spec(None).kind == "local"
    assert cluster_spec("local", n_workers=3).n_workers == 3
    s = cluster_spec("tcp://10.0.0.1:8786")
    assert (s.kind, s.address) == ("address", "tcp://10.0.0.1:8786")
    assert cluster_spec("10.0.0.1:8786").kind == "address"
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "tcp://10.0.0.2:1")
    s = cluster_spec(None)
    assert (s.kind, s.address, s.origin) == ("address", "tcp://10.0.0.2:1",
                                             "$DASK_SCHEDULER_ADDRESS")
    assert cluster_spec("tcp://10.0.0.3:2").address == "tcp://10.0.0.3:2"  # the option wins


def test_spec_from_file(tmp_path):
    f = tmp_path / "cluster.yaml"
    f.write_text("rlvr-lin:\n  cluster:\n    kind: local\n    n-workers: 3\n"
                 "    memory-limit: 1GB\ndistributed:\n  scheduler:\n    allowed-failures: 7\n")
    s = cluster_spec(str(f))
    assert (s.kind, s.n_workers, s.memory_limit) == ("local", 3, "1GB")
    assert s.dask_config == {"distributed.scheduler.allowed-failures": 7}
    assert s.origin == str(f)
    f.write_text("scheduler-address: tcp://10.0.0.9:8786\n")
    s = cluster_spec(str(f))
    assert (s.kind, s.address) == ("address", "tcp://10.0.0.9:8786")


@pytest.mark.parametrize("text, words", [
    ("rlvr-lin: {cluster: {kind: nope}}", "unknown cluster kind 'nope'"),
    ("rlvr-lin: {cluster: {kind: address}}", "needs an address"),
    ("rlvr-lin: {cluster: {n-workers: 0}}", "n-workers must be >= 1"),
    ("rlvr-lin: {cluster: {n-workers: two}}", "n-workers must be an integer"),
    ("rlvr-lin: [1, 2]", "must be a mapping"),
    ("- a\n- b\n", "must be a mapping"),
    ("a: [unclosed\n", "not valid YAML"),
])
def test_bad_cluster_file_is_one_line_naming_it(tmp_path, text, words):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(PipelineError) as e:
        cluster_spec(str(f))
    msg = str(e.value)
    assert words in msg and str(f) in msg and "\n" not in msg


def test_missing_file_and_nonsense_value(tmp_path):
    with pytest.raises(PipelineError, match="cluster file not found"):
        cluster_spec(str(tmp_path / "nope.yaml"))
    with pytest.raises(PipelineError, match="not a scheduler address"):
        cluster_spec("definitely-not-a-cluster")


def test_cluster_file_starts_a_local_cluster_with_its_dask_config(tmp_path):
    """The file's worker count and Dask settings reach the real cluster, and only while it lives."""
    f = tmp_path / "cluster.yaml"
    f.write_text("rlvr-lin:\n  cluster:\n    n-workers: 1\n    memory-limit: 1GB\n"
                 "distributed:\n  scheduler:\n    allowed-failures: 7\n")
    before = dask.config.get("distributed.scheduler.allowed-failures")
    assert before != 7
    with dask_client(str(f)) as client:
        workers = client.scheduler_info()["workers"]
        assert len(workers) == 1
        assert next(iter(workers.values()))["memory_limit"] == 10**9
        assert dask.config.get("distributed.scheduler.allowed-failures") == 7
        assert client.run_on_scheduler(_config_value) == 7
    assert dask.config.get("distributed.scheduler.allowed-failures") == before


_MALLOC_PROBE = """
import os, sys
from pipeline.compute import dask_client
def probe():
    return os.environ.get("MALLOC_MMAP_THRESHOLD_")
if __name__ == "__main__":
    with (dask_client(sys.argv[1]) if len(sys.argv) > 1 else dask_client(n_workers=1)) as client:
        print(sorted(set(client.run(probe).values())))
"""


def test_local_workers_keep_glibcs_heap_for_chunk_buffers(tmp_path):
    """Dask's MALLOC_TRIM_THRESHOLD_ pins glibc's mmap threshold at 128 KiB; our workers start
    with a 32 MiB one (blosc's per-chunk buffers); a value the user configured, or exported,
    wins.

    In a fresh interpreter, as a user's job starts its workers: the test processes fork
    theirs from a forkserver, which keeps the environment it was started with.
    """
    from pipeline.compute.clusters import WORKER_ENV

    assert WORKER_ENV["MALLOC_MMAP_THRESHOLD_"] == str(32 << 20)
    script = tmp_path / "probe.py"
    script.write_text(_MALLOC_PROBE)
    f = tmp_path / "cluster.yaml"
    f.write_text("rlvr-lin:\n  cluster:\n    n-workers: 1\n"
                 "distributed:\n  nanny:\n    pre-spawn-environ:\n"
                 "      MALLOC_MMAP_THRESHOLD_: 65536\n")
    # Dask's nanny writes its pre-spawn variables into its own process's environment for
    # good, and takes a variable of the environment over its config: clean the children's
    clean = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    for args, env, want in (([], {}, str(32 << 20)), ([str(f)], {}, "65536"),
                            ([], {"MALLOC_MMAP_THRESHOLD_": "131072"}, "131072")):
        out = subprocess.run([sys.executable, str(script), *args], capture_output=True,
                             text=True, timeout=120, cwd=tmp_path, env={**clean, **env})
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip().splitlines()[-1] == repr([want])


def test_unreachable_scheduler_is_a_clear_error(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("rlvr-lin: {cluster: {kind: address, address: 'tcp://127.0.0.1:9', "
                 "timeout: 2s}}\n")
    with pytest.raises(PipelineError, match="cannot reach the Dask scheduler at tcp://127.0.0.1:9"):
        with dask_client(str(f)):
            pass


def test_serial_and_dask_executors_agree():
    tasks = [(i,) for i in range(7)]
    serial = dict(SerialExecutor().map_unordered(_square_pid, tasks))
    assert {i: r[0] for i, r in serial.items()} == {i: i * i for i in range(7)}
    assert {r[1] for r in serial.values()} == {os.getpid()}  # ran here
    with dask_client(n_workers=2, memory_limit="1GB") as client:
        got = dict(DaskExecutor(client).map_unordered(_square_pid, tasks, key="sq"))
        assert {i: r[0] for i, r in got.items()} == {i: i * i for i in range(7)}
        assert os.getpid() not in {r[1] for r in got.values()}  # ran in worker processes
        with pytest.raises(ValueError, match="task 3 failed"):
            list(DaskExecutor(client).map_unordered(_fail, tasks, key="fail"))
    with pytest.raises(ValueError, match="task 3 failed"):
        list(SerialExecutor().map_unordered(_fail, tasks))


def test_executor_registry():
    assert {"serial", "dask"} <= set(EXECUTORS)
    with open_executor("serial") as ex:
        assert ex.name == "serial"
    with pytest.raises(PipelineError, match="unknown executor 'warp'"):
        open_executor("warp")


EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "workflows" / "clusters").glob("*.yaml"))


def test_every_example_cluster_file_is_valid():
    """workflows/clusters/ holds one example per kind users start from; each must load."""
    kinds = {}
    for f in EXAMPLES:
        spec = cluster_spec(str(f))
        assert spec.origin == str(f)
        kinds[f.stem] = spec.kind
    assert kinds == {"local": "local", "address": "address", "slurm": "slurm",
                     "tls": "address"}
    tls = cluster_spec(str(EXAMPLES[[f.stem for f in EXAMPLES].index("tls")]))
    assert tls.address.startswith("tls://")
    assert {"distributed.comm.tls.ca-file", "distributed.comm.tls.client.cert",
            "distributed.comm.tls.client.key"} <= set(tls.dask_config)


def test_plain_dask_jobqueue_config_means_slurm(tmp_path):
    f = tmp_path / "jq.yaml"
    f.write_text("jobqueue:\n  slurm:\n    cores: 2\n    memory: 4GB\n")
    s = cluster_spec(str(f))
    assert s.kind == "slurm"
    assert s.dask_config == {"jobqueue.slurm.cores": 2, "jobqueue.slurm.memory": "4GB"}
    assert cluster_spec("slurm", n_workers=3).n_workers == 3  # the kind by name


def test_unknown_slurm_option_is_refused_before_any_job(tmp_path):
    pytest.importorskip("dask_jobqueue")
    f = tmp_path / "s.yaml"
    f.write_text("rlvr-lin: {cluster: {kind: slurm, core: 4, memory: 1GB}}\n")
    with pytest.raises(PipelineError, match="unknown slurm option 'core'") as e:
        with dask_client(str(f)):
            pass
    assert str(f) in str(e.value) and "cores" in str(e.value)


def test_scheduler_file_means_that_scheduler(tmp_path):
    """``--cluster scheduler.json`` and ``scheduler-file:`` in a cluster file both connect."""
    from distributed import LocalCluster

    sf = tmp_path / "scheduler.json"
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=":0", scheduler_kwargs={"scheduler_file": str(sf)}
                      ) as cluster:
        assert cluster_spec(str(sf)).kind == "address"
        with dask_client(str(sf)) as client:
            assert client.scheduler.address == cluster.scheduler_address
        (tmp_path / "sub").mkdir()
        f = tmp_path / "sub" / "c.yaml"
        f.write_text("rlvr-lin: {cluster: {scheduler-file: ../scheduler.json}}\n")
        with dask_client(str(f)) as client:
            assert client.scheduler.address == cluster.scheduler_address
            assert client.submit(_square_pid, 3).result()[0] == 9
    sf.write_text("{not json")
    with pytest.raises(PipelineError, match="scheduler file is not JSON"):
        with dask_client(str(sf)):
            pass
    missing = tmp_path / "never.json"
    f.write_text(f"rlvr-lin: {{cluster: {{scheduler-file: {missing}, timeout: 0.5s}}}}\n")
    with pytest.raises(PipelineError, match="did not appear within 0.5s"):
        with dask_client(str(f)):
            pass


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A self-signed cert (and its key) for 127.0.0.1: the CA, scheduler, worker and client."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rlvr-lin test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_pem, key_pem = folder / "cert.pem", folder / "key.pem"
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    key_pem.chmod(0o600)
    return cert_pem, key_pem


def test_fit_through_a_tls_scheduler(tmp_path, tiny_run_fp32):
    """``dask scheduler`` + ``dask worker`` with TLS, reached through a cluster file like
    workflows/clusters/tls.yaml (scheduler file + distributed.comm.tls.*): the fit equals a
    serial one, and a client without the certificates is refused."""
    import subprocess
    import sys

    from fit_checks import assert_same_fit

    from pipeline.fit import fit_store
    from pipeline.store.ingest import ingest

    cert, key = _self_signed(tmp_path)
    tls = ["--tls-ca-file", str(cert), "--tls-cert", str(cert), "--tls-key", str(key)]
    sf = tmp_path / "scheduler.json"
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler",
                               "--protocol", "tls", "--host", "127.0.0.1", "--port", "0",
                               "--dashboard-address", ":0", "--scheduler-file", str(sf), *tls],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file", str(sf),
             "--nworkers", "1", "--nthreads", "1", "--memory-limit", "1.5GB",
             "--no-dashboard", *tls], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        f = tmp_path / "tls.yaml"
        f.write_text(f"rlvr-lin:\n  cluster:\n    scheduler-file: {sf.name}\n    timeout: 60s\n"
                     f"distributed:\n  comm:\n    require-encryption: true\n    tls:\n"
                     f"      ca-file: {cert}\n      client:\n        cert: {cert}\n"
                     f"        key: {key}\n")
        store = tmp_path / "run.zarr"
        with dask_client(str(f)) as client:
            assert client.scheduler.address.startswith("tls://127.0.0.1:")
            client.wait_for_workers(1, timeout=60)
            ingest(tiny_run_fp32, store, client=client, progress=False)
            tls_fit = fit_store(store, tmp_path / "tls.fit", client=client, progress=False)
            assert tls_fit.tasks >= 1
        serial = fit_store(store, tmp_path / "serial.fit", executor="serial", progress=False)
        assert_same_fit(serial.fit_dir, tls_fit.fit_dir, csv=True)
        plain = tmp_path / "plain.yaml"  # the same scheduler, no certificates: refused
        plain.write_text(f"rlvr-lin: {{cluster: {{scheduler-file: {sf}, timeout: 3s}}}}\n")
        with pytest.raises(PipelineError, match="cannot reach the Dask scheduler at tls://"):
            with dask_client(str(plain)):
                pass
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(30)
