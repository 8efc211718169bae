"""Ingest real tiny RLVR runs through a real Dask cluster; read back bit-exact.

The reference is always safetensors' own loader via torch, never our reader.
One LocalCluster (2 processes) serves the module; the CLI joins it with
``--scheduler`` so each invocation does not start its own cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import load_checkpoint_torch, torch_bits
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import pipeline
from pipeline.cli import app
from pipeline.store.ingest import NonFiniteWarning, ingest

REPO = Path(__file__).resolve().parents[1]


def assert_store_matches(store: Path, run: Path, steps: list[int]) -> None:
    r = pipeline.open_run(store)
    assert r.steps == steps
    for s in steps:
        ref = load_checkpoint_torch(run / f"global_step_{s}")
        assert r.tensor_names == sorted(ref)
        for name, t in ref.items():
            got = r.read(name, s)
            assert r.dtype(name) == str(t.dtype).removeprefix("torch.")
            assert got.shape == tuple(t.shape)
            np.testing.assert_array_equal(got.view(f"<u{t.element_size()}"), torch_bits(t))


def store_files(store: Path) -> dict[str, bytes]:
    return {p.relative_to(store).as_posix(): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file() and p.name != ".ingest.lock"}


def small_run(src: Path, dst: Path, steps: list[int]) -> Path:
    dst.mkdir(parents=True)
    for s in steps:
        shutil.copytree(src / f"global_step_{s}", dst / f"global_step_{s}")
    return dst


# -- round trips ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bf16_store(tiny_run_bf16: Path, cluster, tmp_path_factory) -> tuple[Path, object]:
    store = tmp_path_factory.mktemp("bf16") / "run.zarr"
    rep = ingest(tiny_run_bf16, store, client=cluster, progress=False)
    return store, rep


def test_bf16_run_bit_exact_and_compressed(bf16_store, tiny_run_bf16: Path) -> None:
    store, rep = bf16_store
    steps = list(range(0, 101, 10))
    assert rep.ingested == steps and rep.skipped == []
    assert_store_matches(store, tiny_run_bf16, steps)
    sizes = sum((tiny_run_bf16 / f"global_step_{s}" / "model.safetensors").stat().st_size
                for s in steps)
    assert rep.checkpoint_bytes == sizes
    # measured 0.31 on this run with previous-step deltas (0.37 against step 0 alone, raw
    # bf16 + zstd about 0.79); see benchmarks/codec_candidates.py
    assert rep.ratio < 0.45, rep.ratio
    r = pipeline.open_run(store)
    assert r.config["model_type"] == "qwen2"
    assert r.attrs["source"]["run_dir"] == str(tiny_run_bf16.resolve())


def test_rerun_skips_unchanged_steps(bf16_store, tiny_run_bf16: Path, cluster) -> None:
    store, _ = bf16_store
    before = store_files(store)
    rep = ingest(tiny_run_bf16, store, client=cluster, progress=False)
    assert rep.ingested == [] and len(rep.skipped) == 11
    after = store_files(store)
    assert before.keys() == after.keys()
    assert all(before[k] == after[k] for k in before if k != "zarr.json")


def test_lazy_views_and_float_reads(bf16_store, tiny_run_bf16: Path) -> None:
    store, _ = bf16_store
    r = pipeline.open_run(store)
    name = "model.layers.0.mlp.up_proj.weight"
    ref = np.stack([torch_bits(load_checkpoint_torch(tiny_run_bf16 / f"global_step_{s}")[name])
                    for s in r.steps])
    xa = r.to_xarray(name)
    assert list(xa["step"].values) == r.steps and xa.dtype == np.dtype(r.read(name, 0).dtype)
    np.testing.assert_array_equal(xa.values.view("<u2"), ref)
    block = r.read_float(name, slice(2, 5), slice(8, 40), np.float64)
    want = ref[2:5, 8:40].astype(np.uint32) << 16  # bf16 -> fp32 is a 16-bit shift
    np.testing.assert_array_equal(block, want.view(np.float32).astype(np.float64))
    ds = r.dataset([name, "model.norm.weight"])
    assert ds[name].dtype == np.float32 and ds.sizes["step"] == 11


@pytest.mark.parametrize("fixture", ["tiny_run_fp32", "tiny_run_sharded", "tiny_run_tied"])
def test_other_layouts_bit_exact(fixture: str, request, cluster, tmp_path: Path) -> None:
    run: Path = request.getfixturevalue(fixture)
    steps = [0, 20, 40]
    src = small_run(run, tmp_path / "run", steps)
    ingest(src, tmp_path / "s.zarr", client=cluster, progress=False)
    assert_store_matches(tmp_path / "s.zarr", src, steps)


def test_fp16_bit_exact(tiny_run_fp32: Path, cluster, tmp_path: Path) -> None:
    run = tmp_path / "run"
    for s in (0, 10):
        d = run / f"global_step_{s}"
        d.mkdir(parents=True)
        sd = load_checkpoint_torch(tiny_run_fp32 / f"global_step_{s}")
        save_file({k: v.to(torch.float16) for k, v in sd.items()}, d / "model.safetensors")
    ingest(run, tmp_path / "s.zarr", client=cluster, progress=False)
    assert_store_matches(tmp_path / "s.zarr", run, [0, 10])


def test_nonfinite_stored_exact_and_reported(tiny_run_bf16: Path, cluster, tmp_path: Path) -> None:
    run = small_run(tiny_run_bf16, tmp_path / "run", [0, 10])
    f = run / "global_step_10" / "model.safetensors"
    sd = load_file(f)
    w = sd["model.norm.weight"].clone()
    w[:3] = torch.tensor([float("nan"), float("inf"), float("-inf")])
    sd["model.norm.weight"] = w
    save_file(sd, f)
    with pytest.warns(NonFiniteWarning, match="model.norm.weight"):
        rep = ingest(run, tmp_path / "s.zarr", client=cluster, progress=False)
    assert rep.nonfinite == {10: {"model.norm.weight": [1, 1, 1]}}
    r = pipeline.open_run(tmp_path / "s.zarr")
    assert r.attrs["nonfinite"] == {"10": {"model.norm.weight": [1, 1, 1]}}
    assert_store_matches(tmp_path / "s.zarr", run, [0, 10])


def test_names_are_escaped_inside_the_store(cluster, tmp_path: Path) -> None:
    names = ["../x", "a/b", "__x", "ok.weight"]
    run = tmp_path / "run"
    for s in (0, 1):
        d = run / f"global_step_{s}"
        d.mkdir(parents=True)
        save_file({n: torch.full((2, 3), float(i + s)) for i, n in enumerate(names)},
                  d / "model.safetensors")
    ingest(run, tmp_path / "s.zarr", client=cluster, progress=False)
    r = pipeline.open_run(tmp_path / "s.zarr")
    assert sorted(r.tensor_names) == sorted(names)
    for i, n in enumerate(names):
        np.testing.assert_array_equal(r.read(n, 1), np.full((2, 3), i + 1.0, np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "s.zarr"]
    assert {p.name for p in (tmp_path / "s.zarr" / "tensors").iterdir() if p.is_dir()} == {
        "%2E.%2Fx", "a%2Fb", "%5F_x", "ok.weight"}


# -- the CLI and bad input ------------------------------------------------------------------------

def cli(cluster, *args: str):
    runner = CliRunner()
    return runner.invoke(app, ["ingest", *args, "--scheduler", cluster.scheduler.address,
                               "--no-progress"])


@pytest.fixture
def stored_run(tiny_run_bf16: Path, cluster, tmp_path: Path):
    """A run with steps 0 and 10 already stored; tests then add a damaged step 20."""
    run = small_run(tiny_run_bf16, tmp_path / "run", [0, 10])
    store = tmp_path / "s.zarr"
    res = cli(cluster, str(run), "--store", str(store))
    assert res.exit_code == 0, res.output
    assert "store / checkpoints" in res.output
    shutil.copytree(tiny_run_bf16 / "global_step_20", run / "global_step_20")
    return run, store, store_files(store)


def _damage_shape(f: Path) -> None:
    sd = load_file(f)
    sd["model.norm.weight"] = torch.cat([sd["model.norm.weight"]] * 2)
    save_file(sd, f)


def _damage_dtype(f: Path) -> None:
    sd = load_file(f)
    sd["model.norm.weight"] = sd["model.norm.weight"].to(torch.float32)
    save_file(sd, f)


def _damage_missing(f: Path) -> None:
    sd = load_file(f)
    del sd["lm_head.weight"]
    save_file(sd, f)


def _damage_truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[:-1000])


def _damage_header(f: Path) -> None:
    data = f.read_bytes()
    f.write_bytes(data[:8] + b"#" * 20 + data[28:])


def _damage_pickle(f: Path) -> None:
    torch.save(load_file(f), f.parent / "pytorch_model.bin")
    f.unlink()


def _damage_changed_stored_step(f: Path) -> None:
    old = f.parent.parent / "global_step_10" / "model.safetensors"
    sd = load_file(old)
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1
    save_file(sd, old)


def _damage_older_step(f: Path) -> None:
    shutil.move(f.parent, f.parent.parent / "global_step_5")


@pytest.mark.parametrize(("damage", "message"), [
    (_damage_shape, "has shape"),
    (_damage_dtype, "has dtype float32"),
    (_damage_missing, "'lm_head.weight' is missing"),
    (_damage_truncate, "truncated|does not match"),
    (_damage_header, "corrupt"),
    (_damage_pickle, "pickle checkpoint"),
    (_damage_changed_stored_step, "differ from stored step 10"),
    (_damage_older_step, "older than the last stored step 10"),
])
def test_bad_input_is_refused_and_store_unchanged(stored_run, cluster, damage, message) -> None:
    run, store, before = stored_run
    damage(run / "global_step_20" / "model.safetensors")
    res = cli(cluster, str(run), "--store", str(store))
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and __import__("re").search(message, lines[0]), res.output
    assert str(run) in lines[0]  # names the file or folder
    assert store_files(store) == before
    assert pipeline.open_run(store).steps == [0, 10]


def test_missing_shard_refused(tiny_run_sharded: Path, cluster, tmp_path: Path) -> None:
    run = small_run(tiny_run_sharded, tmp_path / "run", [0])
    index = json.loads((run / "global_step_0" / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[0]
    (run / "global_step_0" / victim).unlink()
    res = cli(cluster, str(run), "--store", str(tmp_path / "s.zarr"))
    assert res.exit_code == 2 and f"{victim} listed in" in res.output
    assert not (tmp_path / "s.zarr").exists()


def test_pickle_with_opt_in(tiny_run_bf16: Path, cluster, tmp_path: Path) -> None:
    run = small_run(tiny_run_bf16, tmp_path / "run", [0, 10])
    for s in (0, 10):
        f = run / f"global_step_{s}" / "model.safetensors"
        torch.save(load_file(f), f.parent / "pytorch_model.bin")
        f.unlink()
        (f.parent / "training_args.bin").write_bytes(b"\x80\x04never loaded")
    res = cli(cluster, str(run), "--store", str(tmp_path / "s.zarr"), "--allow-pickle")
    assert res.exit_code == 0, res.output
    assert_store_matches(tmp_path / "s.zarr", small_run(tiny_run_bf16, tmp_path / "ref", [0, 10]),
                         [0, 10])


# -- streaming and crashes ------------------------------------------------------------------------

def test_watch_picks_up_new_checkpoints(tiny_run_bf16: Path, cluster, tmp_path: Path) -> None:
    run = small_run(tiny_run_bf16, tmp_path / "run", [0])
    store = tmp_path / "s.zarr"

    def trainer() -> None:
        time.sleep(1.0)
        for s in (10, 20):
            d = run / f"global_step_{s}"
            f = d / "model.safetensors"
            d.mkdir()
            # trainers write the config with the weights; ingest compares it between steps
            shutil.copy(tiny_run_bf16 / f"global_step_{s}" / "config.json", d / "config.json")
            data = (tiny_run_bf16 / f"global_step_{s}" / "model.safetensors").read_bytes()
            f.write_bytes(data[: len(data) // 2])  # a shard still being written
            time.sleep(1.0)
            f.write_bytes(data)
            time.sleep(0.5)

    th = threading.Thread(target=trainer)
    th.start()
    rep = ingest(run, store, client=cluster, watch=True, poll=0.2, settle=0.6, until_step=20,
                 max_idle=60, progress=False)
    th.join()
    assert rep.ingested == [0, 10, 20]
    assert_store_matches(store, run, [0, 10, 20])


CRASH = """
import os, sys
from pipeline.store import state
from pipeline.store.ingest import ingest
n = 0
orig = state.StoreState.commit
def commit(self, index, step, record):
    global n
    n += 1
    if n == int(sys.argv[3]):
        os._exit(9)  # a real crash: chunks of this step written, marker not
    orig(self, index, step, record)
state.StoreState.commit = commit
ingest(sys.argv[1], sys.argv[2], scheduler=sys.argv[4], progress=False)
"""


def test_crash_then_resume_equals_uninterrupted(tiny_run_bf16: Path, cluster,
                                                tmp_path: Path) -> None:
    run = small_run(tiny_run_bf16, tmp_path / "run", [0, 10, 20, 30])
    clean, crashed = tmp_path / "clean.zarr", tmp_path / "crashed.zarr"
    ingest(run, clean, client=cluster, progress=False)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-c", CRASH, str(run), str(crashed), "3",
                        cluster.scheduler.address], env=env, capture_output=True, timeout=120)
    assert p.returncode == 9, p.stderr.decode()[-2000:]
    assert pipeline.open_run(crashed).steps == [0, 10]  # step 20 is invisible
    assert any((crashed / "tensors").rglob("c/2/*"))  # ... although its chunks were written
    rep = ingest(run, crashed, client=cluster, progress=False)
    assert rep.ingested == [20, 30] and rep.skipped == [0, 10]
    a, b = store_files(clean), store_files(crashed)
    data = [k for k in a if k.startswith(("tensors/", "step/"))]
    assert data and {k for k in b if k.startswith(("tensors/", "step/"))} == set(data)
    assert all(a[k] == b[k] for k in data)
    assert_store_matches(crashed, run, [0, 10, 20, 30])


def test_store_written_with_blake2b_digests_is_verified_with_them(tiny_run_bf16: Path, cluster,
                                                                  tmp_path: Path) -> None:
    import zarr

    from pipeline.errors import PipelineError
    from pipeline.store.integrity import BLAKE_TREE_ALGO, TREE_ALGO, tree_digest
    from pipeline.store.layout import record_path

    run = small_run(tiny_run_bf16, tmp_path / "run", [0, 10])
    store = tmp_path / "s.zarr"
    ingest(run, store, client=cluster, progress=False)
    r = pipeline.open_run(store)
    assert r.attrs["digest"] == TREE_ALGO
    assert all(f["digest"].startswith(TREE_ALGO + ":") for rec in r.records
               for f in rec["files"].values())
    # make it look like a store from before xxh3: blake2b tree digests in the records
    for i, s in enumerate(r.steps):
        g = zarr.open_group(str(store), path=record_path(i), mode="r+")
        rec = dict(g.attrs)
        rec["files"] = {n: {**f, "digest": tree_digest(run / f"global_step_{s}" / n,
                                                        BLAKE_TREE_ALGO)}
                        for n, f in rec["files"].items()}
        g.attrs.put(rec)
    rep = ingest(run, store, client=cluster, progress=False)
    assert rep.skipped == [0, 10] and rep.ingested == []
    f = run / "global_step_10" / "model.safetensors"
    sd = load_file(f)
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1
    save_file(sd, f)
    with pytest.raises(PipelineError, match="differ from stored step 10"):
        ingest(run, store, client=cluster, progress=False)
