"""Issue 13, part A: outputs never land on inputs, bad numbers fail first, full disks and odd
tensors end in one ``error:`` line, never a traceback or a destroyed input.

Every test here failed on the code before the fix. They use the short fp32 tiny run
(5 checkpoints) and assert behaviour, not numbers of one trajectory.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import PipelineError

RUNNER = CliRunner()


def cli(*args: object) -> tuple[int, str]:
    """Run the CLI in-process: (exit code, stdout and stderr together)."""
    r = RUNNER.invoke(app, [str(a) for a in args])
    return r.exit_code, r.output


def one_error(output: str) -> str:
    """The single ``error:`` line of a refused command (and no traceback anywhere)."""
    assert "Traceback" not in output, output
    lines = [ln for ln in output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, output
    return lines[0]


def tree_digest(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes: equal digests mean nothing was touched."""
    return {str(p.relative_to(path)): p.read_bytes()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def client():
    from distributed import Client

    with Client(processes=False, n_workers=1, threads_per_worker=2,
                dashboard_address=None) as c:
        yield c


@pytest.fixture(scope="module")
def ingested(tiny_run_fp32, tmp_path_factory, client):
    """(run copy, its store, the store's complete fit): read-only for the tests below."""
    from pipeline.fit import fit_store
    from pipeline.store.ingest import ingest

    base = tmp_path_factory.mktemp("rel")
    run = base / "run"
    shutil.copytree(tiny_run_fp32, run)
    store = base / "S.zarr"
    ingest(run, store, client=client, progress=False)
    rep = fit_store(store, client=client, progress=False)
    return run, store, rep.fit_dir


# -- 1. an output never is, contains or sits inside an input -----------------------------------


def test_extrapolate_force_never_overwrites_its_store(ingested, tmp_path):
    run, store, _ = ingested
    before = tree_digest(store)
    link = tmp_path / "link"
    link.symlink_to(store)
    some_array = next((store / "tensors").iterdir())
    for out, force, why in [
        (store, True, "is the store"),
        (some_array, True, "inside the store"),
        (store / "new-model", False, "inside the store"),  # no --force: refused as well
        (link, True, "is the store"),  # a symlink resolves to the store
        (tmp_path / ".." / tmp_path.name / "link" / "x", True, "inside the store"),
    ]:
        code, out_text = cli("extrapolate", store, "--to", 80, "--out", out, "--no-progress",
                             *(["--force"] if force else []))
        assert code == 2, out_text
        assert why in one_error(out_text)
    assert tree_digest(store) == before
    assert not (store / "new-model").exists()


def test_extrapolate_force_never_replaces_a_source_checkpoint(ingested, tmp_path):
    run, store, _ = ingested
    c0, c1 = run / "global_step_10", run / "global_step_40"
    before = tree_digest(run)
    src = ["--from-checkpoints", c0, c1, "--alpha", 1.5, "--no-progress"]
    cases = [
        (c1, "is the checkpoint folder of step 40"),
        (run, "contains the checkpoint folder"),  # --force would replace the whole run
        (c1 / "sub", "inside the checkpoint folder of step 40"),
        (run / "global_step_70", "pose as a checkpoint"),  # a fake step a later ingest takes
    ]
    for out, why in cases:
        code, text = cli("extrapolate", *src, "--out", out, "--force")
        assert code == 2, text
        assert why in one_error(text)
    # a store remembers its run folder and checkpoints: they are protected too
    for out in (c1, run / "x", run):
        code, text = cli("extrapolate", store, "--to", 80, "--out", out, "--force",
                         "--no-progress")
        assert code == 2, text
        one_error(text)
    code, text = cli("extrapolate", run, "--to", 80, "--out", run / "model", "--no-progress")
    assert code == 2 and "inside the run folder" in one_error(text)
    assert tree_digest(run) == before


def test_export_api_refuses_its_own_inputs(ingested):
    from pipeline.extrapolate.export import export, make_spec
    from pipeline.extrapolate.sources import CheckpointSource, StoreSource

    run, store, _ = ingested
    for src, out in ((StoreSource(store), store), (CheckpointSource.from_run_dir(run),
                                                    run / "global_step_40")):
        with pytest.raises(PipelineError, match="which this job reads"):
            export(src, out, make_spec(src, "two-point", to=80), force=True)
    assert (run / "global_step_40" / "model.safetensors").exists()


def test_fit_report_backtest_never_write_into_inputs(ingested, tmp_path):
    run, store, fit = ingested
    before = {p: tree_digest(p) for p in (store, run, fit)}
    checkpoint = run / "global_step_20"
    cases = [
        ("fit", store, "--out", store / "fit", "--no-progress"),
        ("fit", store, "--out", checkpoint, "--no-progress"),
        ("fit", store, "--out", store, "--no-progress"),
        ("report", store, "--fit", fit, "--out", store / "rep"),
        ("report", store, "--fit", fit, "--out", fit / "elements.zarr" / "rep"),
        ("report", store, "--fit", fit, "--out", checkpoint),
        ("backtest", store, "--out", store / "bt", "--no-progress"),
        ("backtest", run, "--out", checkpoint, "--no-progress"),
    ]
    for args in cases:
        code, text = cli(*args)
        assert code == 2, (args, text)
        assert "which this job reads" in one_error(text), args
    assert {p: tree_digest(p) for p in (store, run, fit)} == before


def test_fit_api_refuses_an_output_inside_its_store(ingested):
    from pipeline.fit import fit_store

    _, store, _ = ingested
    with pytest.raises(PipelineError, match="inside the store"):
        fit_store(store, store / "tensors" / "x", progress=False)
    assert not (store / "tensors" / "x").exists()


# -- 2. non-finite and out-of-range numbers ----------------------------------------------------


@pytest.mark.parametrize("kw", [{"alpha": float("nan")}, {"alpha": float("inf")},
                                {"to": float("nan")}, {"to": float("inf")},
                                {"to": -float("inf")}, {"alpha": 1e308}])
def test_make_spec_refuses_non_finite_numbers(ingested, kw):
    from pipeline.extrapolate.export import make_spec
    from pipeline.extrapolate.sources import CheckpointSource

    src = CheckpointSource.from_run_dir(ingested[0])
    with pytest.raises(PipelineError, match="finite"):
        make_spec(src, "two-point", **kw)
    with pytest.raises(PipelineError, match="finite"):
        make_spec(src, "lstsq", **kw)


def test_make_spec_refuses_bad_r2_min_and_window(ingested):
    from pipeline.extrapolate.export import make_spec
    from pipeline.extrapolate.sources import CheckpointSource

    src = CheckpointSource.from_run_dir(ingested[0])
    with pytest.raises(PipelineError, match="finite"):
        make_spec(src, "gated", to=80, r2_min=float("nan"))
    for w in (-3, 0, 1):
        with pytest.raises(PipelineError, match="--window must be >= 2"):
            make_spec(src, "lstsq", to=80, window=w)


@pytest.mark.parametrize("args, needle", [
    (["--alpha", "nan"], "--alpha must be a finite number"),
    (["--alpha", "inf"], "--alpha must be a finite number"),
    (["--alpha", "-inf"], "--alpha must be a finite number"),
    (["--to", "nan"], "--to must be a finite number"),
    (["--to", "1e400"], "--to must be a finite number"),
    (["--method", "gated", "--to", "80", "--r2-min", "nan"], "--r2-min must be a finite"),
    (["--method", "lstsq", "--to", "80", "--window", "-3"], "--window must be >= 2"),
    (["--to", "80", "--dtype", "foo"], "--dtype must be a floating type"),
    (["--to", "80", "--dtype", "int8"], "--dtype must be a floating type"),
    (["--to", "80", "--max-shard-size", "1" + "0" * 400 + "GB"], "--max-shard-size"),
])
def test_cli_extrapolate_refuses_bad_numbers(ingested, tmp_path, args, needle):
    run = ingested[0]
    out = tmp_path / "m"
    code, text = cli("extrapolate", "--from-checkpoints", run / "global_step_10",
                     run / "global_step_40", "--out", out, "--no-progress", *args)
    assert code == 2, text
    assert needle in one_error(text)
    assert not out.exists() and not any(tmp_path.iterdir())


@pytest.mark.parametrize("args, needle", [
    (["fit", "{store}", "--bins", "0"], "--bins must be >= 1"),
    (["fit", "{store}", "--bins", "-5"], "--bins must be >= 1"),
    (["fit", "{store}", "--block-mb", "nan"], "--block-mb must be a finite"),
    (["fit", "{store}", "--block-mb", "inf"], "--block-mb must be a finite"),
    (["fit", "{store}", "--block-mb", "-1"], "--block-mb must be > 0"),
    (["fit", "{store}", "--block-mb", "0"], "--block-mb must be > 0"),
    (["backtest", "{store}", "--out", "{new}", "--r2-min", "nan"], "--r2-min must be a finite"),
    (["backtest", "{store}", "--out", "{new}", "--r2-min", "2"], "--r2-min must be <= 1"),
    (["backtest", "{store}", "--out", "{new}", "--window", "-3"], "--window must be >= 2"),
    (["backtest", "{store}", "--out", "{new}", "--window", "0"], "--window must be >= 2"),
    (["ingest", "{run}", "--store", "{new}", "--poll", "nan"], "--poll must be a finite"),
    (["ingest", "{run}", "--store", "{new}", "--settle", "inf"], "--settle must be a finite"),
    (["ingest", "{run}", "--store", "{new}", "--max-idle", "-1"], "--max-idle must be >= 0"),
    (["alpha-sweep", "{run}", "--alpha", "nan"], "--alpha must be a finite"),
    (["alpha-sweep", "{run}", "--r2-min", "inf"], "--r2-min must be a finite"),
    (["make-tiny-run", "{new}", "--lr", "nan"], "--lr must be a finite"),
])
def test_cli_refuses_bad_numbers_before_writing(ingested, tmp_path, args, needle):
    run, store, fit = ingested
    before = tree_digest(fit)
    new = tmp_path / "new"
    args = [a.format(store=store, run=run, new=new) for a in args]
    code, text = cli(*args, *(["--no-progress"] if args[0] in ("fit", "backtest") else []))
    assert code == 2, text
    assert needle in one_error(text)
    assert not new.exists()
    assert tree_digest(fit) == before


def test_library_refuses_bad_numbers():
    from pipeline.extrapolate.backtest import plan_cases
    from pipeline.fit.job import check_options

    with pytest.raises(PipelineError, match="finite"):
        plan_cases([0, 10, 20, 30], sweep={"r2_min": [float("nan")]})
    with pytest.raises(PipelineError, match="--window"):
        plan_cases([0, 10, 20, 30], window=-3)
    for bins in (0, -5):
        with pytest.raises(PipelineError, match="--bins"):
            check_options(bins, 1 << 20, 0, None, None)
    with pytest.raises(PipelineError, match="block size"):
        check_options(100, 0, 0, None, None)


# -- 3. a bad fit argument never wipes a good fit ----------------------------------------------


def test_bad_fit_argument_keeps_the_complete_fit(ingested):
    from pipeline.fit import fit_store, open_fit
    from pipeline.fit.results import read_meta

    _, store, fit = ingested
    meta = read_meta(fit)
    before = tree_digest(fit)
    for args in (["--bins", "0"], ["--bins", "-5"], ["--block-mb", "nan"]):
        code, text = cli("fit", store, "--out", fit, "--no-progress", *args)
        assert code == 2, text
        one_error(text)
    with pytest.raises(PipelineError, match="--bins"):
        fit_store(store, fit, n_bins=0, progress=False)
    assert read_meta(fit) == meta and meta["complete"]
    assert open_fit(fit).steps == meta["steps"]
    assert tree_digest(fit) == before


# -- 4. a full disk, a read-only disk and internal errors --------------------------------------


def _cli_subprocess(*args: object, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs (root only; skipped where mounting is not permitted)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill up (needs root): {r.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk: Path, leave: int = 32 << 10) -> None:
    """Fill ``disk`` up, then free ``leave`` bytes: any sizeable write runs out of space."""
    filler = disk / f"filler-{len(list(disk.glob('filler-*')))}"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (64 << 10))
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
    size = filler.stat().st_size
    with open(filler, "r+b") as f:
        f.truncate(max(0, size - leave))


def _assert_disk_full_line(r: subprocess.CompletedProcess, path: Path) -> None:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, r.stderr
    assert errors[0].endswith(": no space left on device"), errors[0]
    assert errors[0].startswith(f"error: {path}"), errors[0]


def test_full_disk_is_one_line_and_the_store_stays_readable(tiny_run_fp32, copy_run, ingested,
                                                            small_disk, client):
    """ingest appends to a store on a full disk; fit and extrapolate write onto it."""
    from pipeline.store.ingest import ingest
    from pipeline.store.reader import open_run

    run = copy_run(tiny_run_fp32)
    first = copy_run(tiny_run_fp32, "first")
    for p in sorted(first.glob("global_step_*"))[1:]:
        shutil.rmtree(p)
    store = small_disk / "S.zarr"
    ingest(first, store, client=client, progress=False)
    steps = open_run(store).steps
    ref = np.asarray(open_run(store).read("lm_head.weight", steps[0]))

    def still_readable() -> None:
        st = open_run(store)
        assert st.steps[:len(steps)] == steps
        np.testing.assert_array_equal(np.asarray(st.read("lm_head.weight", steps[0])), ref)

    _fill(small_disk)
    _assert_disk_full_line(_cli_subprocess("ingest", run, "--store", store, "--no-progress"),
                           store)
    still_readable()
    _fill(small_disk)
    fit = small_disk / "S.fit"
    _assert_disk_full_line(_cli_subprocess("fit", ingested[1], "--out", fit, "--no-progress"),
                           fit)
    still_readable()
    _fill(small_disk)
    model = small_disk / "model"
    _assert_disk_full_line(_cli_subprocess("extrapolate", run, "--to", 80, "--out", model,
                                           "--no-progress"), model)
    assert not model.exists() and not list(small_disk.glob(".model.*"))
    still_readable()


def test_read_only_output_is_one_line(tiny_run_fp32, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs (needs root): {r.stderr.strip()}")
    try:
        code, text = cli("extrapolate", tiny_run_fp32, "--to", 80, "--out", ro / "m",
                         "--no-progress")
        assert code == 2, text
        assert one_error(text).endswith("read-only file system")
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)


def _failing_app(exc: BaseException):
    import typer

    from pipeline.cli import user_errors

    a = typer.Typer()

    @a.command()
    @user_errors
    def boom() -> None:
        raise exc

    @a.command()
    def other() -> None:  # two commands: typer keeps the command name in the arguments
        pass

    return a


def test_os_errors_are_one_line_naming_the_file():
    no_space = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/out/model.safetensors")
    r = CliRunner().invoke(_failing_app(no_space), ["boom"])
    assert r.exit_code == 2
    assert one_error(r.output) == "error: /data/out/model.safetensors: no space left on device"
    wrapped = RuntimeError("write failed")
    wrapped.__cause__ = PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/x/y")
    r = CliRunner().invoke(_failing_app(wrapped), ["boom"])
    assert r.exit_code == 2 and one_error(r.output) == "error: /x/y: permission denied"


def test_typers_own_exits_pass_through_as_they_are():
    """typer.Exit / Abort / BadParameter inside a command are not bugs (typer's click is
    its own copy: catching click's classes let them through as internal errors)."""
    import typer

    r = CliRunner().invoke(_failing_app(typer.Exit(3)), ["boom"])
    assert r.exit_code == 3 and "internal error" not in r.output
    r = CliRunner().invoke(_failing_app(typer.Abort()), ["boom"])
    assert r.exit_code == 1 and "Aborted" in r.output and "internal error" not in r.output
    r = CliRunner().invoke(_failing_app(typer.BadParameter("no good")), ["boom"])
    assert r.exit_code == 2 and "no good" in r.output and "internal error" not in r.output


def test_internal_errors_say_so_and_hide_the_traceback_unless_asked():
    r = CliRunner().invoke(_failing_app(ZeroDivisionError("boom")), ["boom"])
    assert r.exit_code == 1
    line = one_error(r.output)
    assert "internal error" in line and "ZeroDivisionError: boom" in line
    r = CliRunner(env={"RLVR_LIN_DEBUG": "1"}).invoke(_failing_app(ZeroDivisionError("boom")),
                                                      ["boom"])
    assert r.exit_code == 1
    assert "internal error to report" in r.output and "Traceback" in r.output


# -- 5. zero-element tensors -------------------------------------------------------------------


def test_zero_element_tensors_fit_extrapolate_and_backtest(tiny_run_fp32, copy_run, client,
                                                           tmp_path):
    from safetensors.numpy import load_file, save_file

    from pipeline.extrapolate.backtest import plan_cases, run_backtest
    from pipeline.extrapolate.export import export, make_spec
    from pipeline.extrapolate.sources import CheckpointSource, StoreSource
    from pipeline.fit import fit_store
    from pipeline.store.ingest import ingest

    run = copy_run(tiny_run_fp32)
    empty = {"model.extra.no_rows": (0, 8), "model.extra.no_cols": (8, 0)}
    for f in sorted(run.glob("global_step_*/model.safetensors")):
        sd = load_file(f)
        sd.update({n: np.zeros(s, np.float32) for n, s in empty.items()})
        save_file(sd, f, metadata={"format": "pt"})
    store = tmp_path / "Z.zarr"
    ingest(run, store, client=client, progress=False)
    rep = fit_store(store, client=client, progress=False)
    ds = rep.histograms["moving"]
    for name in empty:
        assert int(ds.n_elements.sel(tensor=name)) == 0
        assert int(ds["count"].sel(tensor=name).sum()) == 0
    assert int(ds.n_elements.sum()) > 0
    for src, out in ((StoreSource(store), tmp_path / "a"),
                     (CheckpointSource.from_run_dir(run), tmp_path / "b")):
        for method, kw in (("two-point", {}), ("gated", {"r2_min": 0.5})):
            export(src, out / method, make_spec(src, method, to=80, **kw))
            got = load_file(out / method / "model.safetensors")
            assert {n: got[n].shape for n in empty} == empty
        res = run_backtest(src, plan_cases(src.steps))
        assert set(empty) <= set(res.tensors)


# -- 6. a lone-surrogate tensor name: refused at ingest (tests/test_reliability_ingest.py);
#    a source that is not a store must still not crash the fit


class _RenamingRef:
    """A store seen through the fit's SourceRef with one tensor renamed to ``alias``."""

    def __init__(self, path: Path, name: str, alias: str) -> None:
        self.path, self.name, self.alias = str(path), name, alias

    def open(self, n_steps: int | None = None) -> _Renamed:
        from pipeline.fit.source import StoreRef

        return _Renamed(StoreRef(self.path).open(n_steps), self.name, self.alias)


class _Renamed:
    def __init__(self, inner, name: str, alias: str) -> None:
        self.inner, self.name, self.alias = inner, name, alias

    def _real(self, n: str) -> str:
        return self.name if n == self.alias else n

    @property
    def steps(self):
        return self.inner.steps

    @property
    def tensor_names(self):
        return [self.alias if n == self.name else n for n in self.inner.tensor_names]

    def shape(self, n):
        return self.inner.shape(self._real(n))

    def dtype(self, n):
        return self.inner.dtype(self._real(n))

    def chunk_rows(self, n):
        return self.inner.chunk_rows(self._real(n))

    def read_block(self, n, steps=None, rows=None, out=None):
        return self.inner.read_block(self._real(n), steps, rows, out=out)

    def labels(self, n):
        return self.inner.labels(self._real(n))


def test_fit_never_crashes_on_a_lone_surrogate_tensor_name(ingested, tmp_path, client):
    """A name that is not valid UTF-8 once crashed the fit's tasks (UnicodeEncodeError).

    From a source that yields one anyway, the fit either completes or raises one
    ``PipelineError`` before its folder is created; the null's signs get a key either way.
    """
    from pipeline.engine.signs import sign_key
    from pipeline.fit import fit_store, open_fit

    _, store, _ = ingested
    alias = "model.layers.0.mlp.up_proj.\udcff"
    ref = _RenamingRef(store, "model.layers.0.mlp.up_proj.weight", alias)
    out = tmp_path / "fit"
    try:
        rep = fit_store(store, out, source=ref, client=client, progress=False)
    except PipelineError as e:
        assert "UTF-8" in str(e) or "surrogate" in str(e)
        assert not out.exists()
    else:
        fit = open_fit(rep.fit_dir)
        assert alias in fit
        shown = [str(t) for t in rep.histograms["moving"].tensor.values]
        assert "model.layers.0.mlp.up_proj.\\udcff" in shown  # readable, valid UTF-8
    key = sign_key(0, alias, 1)
    assert key == sign_key(0, alias, 1) and key != sign_key(0, "up_proj.weight", 1)


# -- 7. lesser problems ------------------------------------------------------------------------


def test_lstsq_steps_are_a_range(ingested, tmp_path):
    from safetensors import safe_open

    run, store, _ = ingested
    code, text = cli("extrapolate", store, "--method", "lstsq", "--steps", 5, 35, "--to", 80,
                     "--out", tmp_path / "m", "--no-progress")
    assert code == 0, text
    with safe_open(tmp_path / "m" / "model.safetensors", "np") as f:
        assert json.loads(f.metadata()["steps"]) == [10, 20, 30]
    code, text = cli("extrapolate", store, "--method", "lstsq", "--steps", 11, 19, "--to", 80,
                     "--out", tmp_path / "n", "--no-progress")
    assert code == 2 and "at least two stored steps in [11, 19]" in one_error(text)
    code, text = cli("extrapolate", "--help")
    assert "T0 <= step <= T1" in " ".join(text.split())


def test_r2_min_with_two_point_is_refused(ingested, tmp_path):
    code, text = cli("extrapolate", ingested[1], "--to", 80, "--r2-min", 0.5, "--out",
                     tmp_path / "m", "--no-progress")
    assert code == 2 and "--r2-min only applies to --method gated" in one_error(text)
    assert not (tmp_path / "m").exists()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_export_cleans_partial_folders_of_killed_exports(tiny_run_fp32, tmp_path):
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = tmp_path / f".m.partial-{_dead_pid()}"
        busy = tmp_path / f".m.partial-{alive.pid}"  # another export still writing
        others = [tmp_path / ".m.partial-x1", tmp_path / f".other.partial-{_dead_pid()}",
                  tmp_path / "m.partial-1"]
        for p in (stale, busy, *others):
            p.mkdir()
            (p / "model.safetensors").write_bytes(b"half")
        code, text = cli("extrapolate", tiny_run_fp32, "--to", 80, "--out", tmp_path / "m",
                         "--no-progress")
        assert code == 0, text
        assert not stale.exists()
        assert busy.exists() and all(p.exists() for p in others)
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".m.")) == \
            sorted([busy.name, ".m.partial-x1"])
    finally:
        alive.kill()
        alive.wait()


def test_report_without_a_fit_writes_nothing(ingested, tmp_path):
    _, store, _ = ingested
    out = tmp_path / "rep"
    code, text = cli("report", store, "--fit", tmp_path / "no.fit", "--out", out)
    assert code == 2 and "no fit found" in one_error(text)
    assert not out.exists()
