"""Stores and fits on S3: moto's real server on 127.0.0.1, real Dask worker processes.

Every property is checked against the same work done on a local folder:
the stored bytes, the decoded bits and the fit results must be equal, not
close. The commit protocol on object storage (lease + marker last) is
checked with a real second writer, and with a real writer process that dies
(``os._exit``) between writing a step's chunks and setting its marker.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

import pipeline
from pipeline.errors import PipelineError
from pipeline.fit.job import fit_store
from pipeline.store.ingest import ingest
from pipeline.store.lease import LEASE_KEY, hold
from pipeline.store.location import RemotePath, as_location

moto_server = pytest.importorskip("moto.server")
pytest.importorskip("s3fs")
pytest.importorskip("obstore")

REPO = Path(__file__).resolve().parents[1]
KEY = {"key": "testing", "secret": "testing", "client_kwargs": {"region_name": "us-east-1"}}


@pytest.fixture(scope="module")
def endpoint():
    srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    yield f"http://{host}:{port}"
    srv.stop()


def _new_bucket(endpoint: str) -> tuple[str, dict]:
    import boto3

    name = f"rlvr-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                 aws_secret_access_key="testing", region_name="us-east-1").create_bucket(
        Bucket=name)
    return name, {"endpoint_url": endpoint, **KEY}


@pytest.fixture
def bucket(endpoint) -> tuple[str, dict]:
    """A fresh bucket, and fsspec storage options that reach it."""
    return _new_bucket(endpoint)


@pytest.fixture(scope="module")
def reference(endpoint, run5, cluster) -> RemotePath:
    """``run5`` ingested undisturbed into S3 (through s3fs): what every other ingest must equal."""
    name, opts = _new_bucket(endpoint)
    store = as_location(f"s3://{name}/runs/run.zarr", opts)
    rep = ingest(run5, store, client=cluster, progress=False)
    assert rep.steps == [0, 10, 20, 30, 40] and rep.store_bytes > 0
    return store


@pytest.fixture(scope="module")
def run5(tiny_run_fp32) -> Path:
    """Five real fp32 checkpoints (steps 0..40)."""
    return tiny_run_fp32


def remote_files(p: RemotePath) -> dict[str, object]:
    """Key -> content of every object under ``p`` but the lease, for comparisons.

    One LIST gives every object's ETag (the MD5 of its bytes: each is one PUT),
    so only the step records, whose ``ingested_at`` differs between two
    ingests, are fetched (and compared without it).
    """
    import boto3

    o = p.storage_options
    s3 = boto3.client("s3", endpoint_url=o["endpoint_url"], aws_access_key_id=o["key"],
                      aws_secret_access_key=o["secret"], region_name="us-east-1")
    bucket = p.root.url.partition("://")[2]
    out: dict[str, object] = {}
    prefix = f"{p.key}/" if p.key else ""
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            k = obj["Key"][len(prefix):]
            if k == LEASE_KEY:
                continue
            out[k] = (_record(s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read())
                      if _is_record(k) else obj["ETag"].strip('"'))
    return out


def local_files(folder: Path) -> dict[str, object]:
    """``remote_files`` of a local folder (MD5 = the ETag S3 gives the same bytes)."""
    out: dict[str, object] = {}
    for q in sorted(folder.rglob("*")):
        if q.is_file() and q.name != ".ingest.lock":
            k = q.relative_to(folder).as_posix()
            data = q.read_bytes()
            out[k] = _record(data) if _is_record(k) else hashlib.md5(data).hexdigest()
    return out


def _is_record(key: str) -> bool:
    return key.startswith("records/") and key.endswith("zarr.json")


def _record(data: bytes) -> dict:
    doc = json.loads(data)
    doc["attributes"].pop("ingested_at", None)
    return doc


def assert_same_bits(a: object, b: object) -> None:
    ra, rb = pipeline.open_run(a), pipeline.open_run(b)
    assert ra.steps == rb.steps and ra.tensor_names == rb.tensor_names
    for name in ra.tensor_names:
        np.testing.assert_array_equal(ra.read_bits(name), rb.read_bits(name))


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400, msg
    return msg


def test_ingest_and_fit_on_s3_equal_local(reference, run5, tmp_path, cluster):
    remote = reference
    opts = remote.storage_options
    name = remote.root.url.partition("://")[2]
    local = tmp_path / "run.zarr"
    ingest(run5, local, client=cluster, progress=False)
    # the same objects with the same bytes as the local store (timestamps aside)
    assert remote_files(remote) == local_files(local)
    assert not (remote / LEASE_KEY).is_file()  # released
    assert_same_bits(local, remote)

    # fit from two worker processes reading S3 (obstore this time), results written to S3
    ob = as_location(f"s3://{name}/runs/run.zarr", {**opts, "backend": "obstore"})
    small = 128 << 10  # several tasks, so both workers read the store
    fit_local = fit_store(local, client=cluster, progress=False, block_bytes=small)
    fit_remote = fit_store(ob, ob.with_name("run.fit"), client=cluster, progress=False,
                           block_bytes=small)
    assert fit_remote.tasks >= 4 and fit_remote.steps == fit_local.steps == [0, 10, 20, 30, 40]
    # every result chunk, histogram and CSV has the local fit's bytes; the metadata differs
    # only in the store it names
    got, want = remote_files(ob.with_name("run.fit")), local_files(fit_local.fit_dir)
    meta = "elements.zarr/zarr.json"
    assert got.pop(meta) != want.pop(meta) and got == want
    assert sum(k.startswith("elements.zarr/tensors/") and "/c." in k for k in got) >= 4
    a = pipeline.open_fit(local)
    b = pipeline.open_fit(f"s3://{name}/runs/run.fit", opts)  # read back with s3fs
    assert a.tensor_names == b.tensor_names and b.meta["complete"]
    assert b.meta == {**a.meta, "store": str(ob)}
    t = a.tensor_names[0]
    assert sorted(a[t].data_vars) == sorted(b[t].data_vars)
    for f in a[t].data_vars:
        np.testing.assert_array_equal(a[t][f].values.view(np.uint32),
                                      b[t][f].values.view(np.uint32))  # NaNs too
    ha, hb = a.histograms("moving"), b.histograms("moving")
    for v in ha.data_vars:
        np.testing.assert_array_equal(ha[v].values, hb[v].values)
    # nothing was written outside the store and the fit (zarr writes parent groups of
    # nodes it creates inside a store: the stores are rooted at their own prefix)
    everything = remote_files(RemotePath.of(f"s3://{name}", opts))
    assert {k.split("/")[1] for k in everything if k.count("/") >= 1} == {"run.zarr", "run.fit"}
    assert all(k.startswith(("runs/run.zarr/", "runs/run.fit/")) for k in everything)


def test_second_writer_refused_while_lease_held(bucket, run5, copy_run, cluster):
    name, opts = bucket
    opts = {**opts, "backend": "obstore"}  # the lease through obstore's put(mode="create")
    run = copy_run(run5)
    later = [run / "global_step_30", run / "global_step_40"]
    held = [(p, p.with_name("_" + p.name)) for p in later]
    for a, b in held:
        a.rename(b)
    store = as_location(f"s3://{name}/run.zarr", opts)
    ingest(run, store, client=cluster, progress=False)
    for a, b in held:
        b.rename(a)
    before = remote_files(store)
    with hold(store) as lease:  # another writer, alive and refreshing
        with pytest.raises(PipelineError, match="another writer holds the store's lease") as e:
            ingest(run, store, client=cluster, progress=False)
        one_line(e)
        assert (store / LEASE_KEY).is_file()
        lease.check()  # the refused writer left the lease alone
    assert remote_files(store) == before  # untouched, and readable
    assert pipeline.open_run(store).steps == [0, 10, 20]
    assert ingest(run, store, client=cluster, progress=False).ingested == [30, 40]


CRASH = textwrap.dedent("""
    import os, sys
    from distributed import Client
    from pipeline.store import state
    from pipeline.store.ingest import ingest
    from pipeline.store.location import as_location

    run, url, opts = sys.argv[1], sys.argv[2], __import__("json").loads(sys.argv[3])
    commit = state.StoreState.commit

    def commit_or_die(self, index, step, record):
        if index == 2:  # step 20's chunks are written: die before its marker
            os._exit(17)
        commit(self, index, step, record)

    state.StoreState.commit = commit_or_die
    with Client(processes=False, n_workers=1, threads_per_worker=2,
                dashboard_address=":0") as c:
        ingest(run, as_location(url, opts), client=c, progress=False, lease_ttl=7.0)
""")


def test_crash_between_write_and_commit_then_resume(bucket, run5, cluster, reference):
    name, opts = bucket
    url = f"s3://{name}/crash.zarr"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", CRASH, str(run5), url, json.dumps(opts)],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 17, p.stderr[-2000:]
    store = as_location(url, opts)
    # the dead writer's lease is still live: a new writer is refused, the store untouched
    before = remote_files(store)
    with pytest.raises(PipelineError, match="another writer holds") as e:
        ingest(run5, store, client=cluster, progress=False)
    one_line(e)
    assert remote_files(store) == before
    r = pipeline.open_run(store)
    assert r.steps == [0, 10]  # only committed steps are visible ...
    assert json.loads((store / "step" / "zarr.json").read_bytes())["shape"][0] == 5
    assert any(k.startswith("tensors/") and "/c/2/" in k for k in before)  # ... though
    # position 2 (step 20) had its chunks written before the writer died
    ref = reference
    for t in r.tensor_names:
        np.testing.assert_array_equal(r.read_bits(t), pipeline.open_run(ref).read_bits(t)[:2])
    lease = json.loads((store / LEASE_KEY).read_bytes())
    time.sleep(max(0.0, lease["expires"] - time.time()) + 0.2)
    logs: list[str] = []
    rep = ingest(run5, store, client=cluster, progress=False, log=logs.append)
    assert any("took over the stale lease" in m for m in logs), logs
    assert rep.ingested == [20, 30, 40] and rep.skipped == [0, 10]
    assert remote_files(store) == remote_files(ref)
    assert_same_bits(store, ref)


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_options_unreachable_and_missing_bucket(bucket, run5, tmp_path):
    name, opts = bucket
    cases = [
        (f"s3://{name}/x.zarr", {**opts, "backend": "nope"}, "unknown storage backend"),
        (f"s3://{name}/x.zarr", {**opts, "backend": "obstore", "bogus_option": 1},
         "bad storage options"),
        (f"s3://{name}-missing/x.zarr", opts, "bucket does not exist"),
        (f"s3://{name}-missing/x.zarr", {**opts, "backend": "obstore"}, "bucket does not exist"),
        (f"s3://{name}/x.zarr", {**opts, "endpoint_url": f"http://127.0.0.1:{_dead_port()}",
                                 "config_kwargs": {"retries": {"max_attempts": 1}}},
         "cannot use the object store"),
    ]
    for url, o, want in cases:
        with pytest.raises(PipelineError, match=want) as e:
            pipeline.open_run(url, o)
        assert url in one_line(e)
        with pytest.raises(PipelineError, match=want) as e:
            ingest(run5, url, storage_options=o, progress=False)
        one_line(e)
    with pytest.raises(PipelineError, match="not local paths"):
        pipeline.open_run(tmp_path / "x.zarr", opts)


def test_catalog_urls_keep_their_form_and_options(tmp_path, bucket):
    from pipeline.catalog import load_catalog

    name, opts = bucket
    cat = tmp_path / "cat.yaml"
    cat.write_text(json.dumps({"runs": {"r": {
        "checkpoints": "runs/r", "store": f"s3://{name}/r.zarr", "outputs": "out/r",
        "storage_options": opts}}}))
    e = load_catalog(cat).runs["r"]
    assert isinstance(e.store, RemotePath) and str(e.store) == f"s3://{name}/r.zarr"
    assert e.store.storage_options == opts
    assert e.outputs == tmp_path / "out" / "r" and e.checkpoints == tmp_path / "runs" / "r"
    shutil.rmtree(tmp_path / "out", ignore_errors=True)


def test_cli_ingest_and_fit_a_catalog_entry_on_s3(bucket, run5, tmp_path, cluster, reference):
    """``rlvr-lin ingest NAME`` / ``fit NAME``: the catalog's URLs and options reach every step."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    name, opts = bucket
    cat = tmp_path / "cat.yaml"
    cat.write_text(json.dumps({"runs": {"r": {
        "checkpoints": str(run5), "store": f"s3://{name}/r.zarr",
        "outputs": f"s3://{name}/out", "storage_options": opts}}}))
    at = ["--catalog", str(cat), "--scheduler", cluster.scheduler.address, "--no-progress"]
    res = CliRunner().invoke(app, ["ingest", "r", *at])
    assert res.exit_code == 0, res.output
    store = as_location(f"s3://{name}/r.zarr", opts)
    assert remote_files(store) == remote_files(reference)
    res = CliRunner().invoke(app, ["fit", "r", *at])
    assert res.exit_code == 0, res.output
    fit = pipeline.open_fit(f"s3://{name}/out/fit", opts)
    assert fit.steps == [0, 10, 20, 30, 40] and fit.meta["store"] == str(store)
    res = CliRunner().invoke(app, ["fit", "r", *at])  # the stored fit is current: nothing read
    assert res.exit_code == 0 and "up to date" in res.output, res.output


def test_generic_step_store_on_s3(bucket, tmp_path):
    """The token log-prob store's base (``steps.store``) on S3: same bytes as locally, and a
    position written but not committed stays invisible."""
    from pipeline.steps.store import ArraySpec, StepStore

    name, opts = bucket
    arrays = {"logprob": ArraySpec((5, 3), "float32", chunk=(2, 3))}
    rng = np.random.default_rng(0)
    vals = [rng.standard_normal((5, 3)).astype(np.float32) for _ in range(3)]
    remote = as_location(f"s3://{name}/lp.zarr", opts)
    local = tmp_path / "lp.zarr"
    for where in (remote, local):  # (its writers' lock is the caller's, beside the store)
        st = StepStore.create(where, "logprobs", arrays)
        for s, v in zip((0, 10), vals, strict=False):
            st.append(s, {"logprob": v})
        st.write("logprob", st.begin(20), vals[2])  # no commit: a writer that died here
    assert remote_files(remote) == local_files(local)
    r = StepStore.open(remote, kind="logprobs")
    assert r.steps == [0, 10]
    np.testing.assert_array_equal(r.read_block("logprob"), np.stack(vals[:2]))
