"""Issue 13, part B: hostile or clumsy input on the ingest side.

Every refusal must be exit code 2 with exactly one ``error:`` line naming
the file, and must leave an existing store byte-for-byte as it was (and
still readable); a refused first ingest leaves no half-built store behind.
The lock test runs two real processes: a ``--watch`` ingest in a subprocess
and refused ingests next to it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import load_checkpoint_torch, torch_bits
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import pipeline
from pipeline.catalog import load_catalog
from pipeline.checkpoints.discover import discover_checkpoints
from pipeline.cli import app
from pipeline.errors import PipelineError
from pipeline.store.ingest import ingest
from pipeline.store.integrity import LOCK_FILE, store_lock

REPO = Path(__file__).resolve().parents[1]


def cli(cluster, *args: str):
    return CliRunner().invoke(app, ["ingest", *args, "--scheduler", cluster.scheduler.address,
                                    "--no-progress"])


def one_error(res, names: str | Path, pattern: str = "") -> str:
    """The single ``error:`` line of a refused command (exit 2), which names ``names``."""
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.output
    assert "Traceback" not in res.output, res.output
    assert str(names) in lines[0], lines[0]
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def store_files(store: Path) -> dict[str, bytes]:
    return {p.relative_to(store).as_posix(): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file() and p.name != LOCK_FILE}


def small_run(src: Path, dst: Path, steps: list[int]) -> Path:
    dst.mkdir(parents=True)
    for s in steps:
        shutil.copytree(src / f"global_step_{s}", dst / f"global_step_{s}")
    return dst


def assert_store_matches(store: Path, run: Path, steps: list[int]) -> None:
    r = pipeline.open_run(store)
    assert r.steps == steps
    for s in steps:
        for name, t in load_checkpoint_torch(run / f"global_step_{s}").items():
            np.testing.assert_array_equal(r.read(name, s).view(f"<u{t.element_size()}"),
                                          torch_bits(t))


@pytest.fixture
def stored_run(tiny_run_fp32: Path, cluster, tmp_path: Path):
    """Steps 0 and 10 stored; a copy of step 20 is then added for the test to damage."""
    run = small_run(tiny_run_fp32, tmp_path / "run", [0, 10])
    store = tmp_path / "s.zarr"
    ingest(run, store, client=cluster, progress=False)
    shutil.copytree(tiny_run_fp32 / "global_step_20", run / "global_step_20")
    return run, store, store_files(store)


def assert_untouched(store: Path, before: dict[str, bytes]) -> None:
    assert store_files(store) == before
    assert pipeline.open_run(store).steps == [0, 10]


# -- raw safetensors files ------------------------------------------------------------------------

def read_raw(f: Path) -> tuple[dict, bytes]:
    data = f.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8: 8 + n]), data[8 + n:]


def write_raw(f: Path, header: dict | str | bytes, body: bytes) -> None:
    """A safetensors file with exactly this header text (for headers the library won't write)."""
    if isinstance(header, dict):
        header = json.dumps(header)
    raw = header.encode() if isinstance(header, str) else header
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def mutate(f: Path, change: Callable[[dict, bytes], tuple[dict | str, bytes]]) -> None:
    header, body = read_raw(f)
    write_raw(f, *change(header, body))


def _by_offset(h: dict) -> list[str]:
    return sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"])


def _overlap(h: dict, body: bytes):
    # the issue's case: v_proj.bias points at k_proj.bias's bytes (same shape)
    k, v = "model.layers.0.self_attn.k_proj.bias", "model.layers.0.self_attn.v_proj.bias"
    h[v]["data_offsets"] = list(h[k]["data_offsets"])
    return h, body


def _gap(h: dict, body: bytes):
    last = _by_offset(h)[-1]
    h[last]["data_offsets"] = [o + 4 for o in h[last]["data_offsets"]]
    return h, body + b"\0" * 4


def _set_dim(value: str) -> Callable[[dict, bytes], tuple[str, bytes]]:
    def change(h: dict, body: bytes) -> tuple[str, bytes]:
        h["model.norm.weight"]["shape"] = ["@DIM@"]
        return json.dumps(h).replace('"@DIM@"', value), body
    return change


def _metadata(value: str) -> Callable[[dict, bytes], tuple[str, bytes]]:
    def change(h: dict, body: bytes) -> tuple[str, bytes]:
        h["__metadata__"] = "@MD@"
        return json.dumps(h).replace('"@MD@"', value), body
    return change


def _bytes_mismatch(h: dict, body: bytes):
    first = _by_offset(h)[0]
    h[first]["data_offsets"][1] -= 4
    return h, body


def _beyond_file(h: dict, body: bytes):
    last = _by_offset(h)[-1]
    h[last]["data_offsets"] = [o + (1 << 40) for o in h[last]["data_offsets"]]
    return h, body


def _dtype(h: dict, body: bytes):
    h["model.norm.weight"]["dtype"] = "F4"
    return h, body


def _duplicate(h: dict, body: bytes):
    text = json.dumps(h)
    entry = json.dumps({"lm_head.weight": h["lm_head.weight"]})[1:-1]
    return text[:-1] + ", " + entry + "}", body


@pytest.mark.parametrize(("change", "message"), [
    (_overlap, "v_proj.bias' at bytes .* overlaps"),
    (_gap, "leaves a gap"),
    (_set_dim("128.0"), "not a list of non-negative integers"),
    (_set_dim("-128"), "not a list of non-negative integers"),
    (_set_dim("Infinity"), "Infinity is not valid JSON"),
    (_set_dim("1e400"), "out of range"),
    (_metadata('["x"]'), "__metadata__ is not a map"),
    (_metadata('{"a": 1}'), "__metadata__ is not a map"),
    (_metadata("[" * 200_000 + "]" * 200_000), "nested too deeply"),
    (_bytes_mismatch, "has shape .* but \\d+ data bytes"),
    (_beyond_file, "truncated safetensors file: tensor .* ends at"),
    (_dtype, "unsupported dtype 'F4'"),
    (_duplicate, "duplicate key 'lm_head.weight'"),
], ids=["overlap", "gap", "float-dim", "negative-dim", "infinity-dim", "1e400-dim",
        "metadata-list", "metadata-int-value", "nested-200k", "bytes-vs-shape", "beyond-file",
        "unknown-dtype", "duplicate-key"])
def test_bad_header_refused_and_store_untouched(stored_run, cluster, change, message) -> None:
    run, store, before = stored_run
    f = run / "global_step_20" / "model.safetensors"
    mutate(f, change)
    one_error(cli(cluster, str(run), "--store", str(store)), f, message)
    assert_untouched(store, before)


def test_overlap_in_a_new_store_leaves_nothing(tiny_run_fp32: Path, cluster,
                                               tmp_path: Path) -> None:
    run = small_run(tiny_run_fp32, tmp_path / "run", [0])
    f = run / "global_step_0" / "model.safetensors"
    mutate(f, _overlap)
    one_error(cli(cluster, str(run), "--store", str(tmp_path / "s.zarr")), f, "overlaps")
    assert not (tmp_path / "s.zarr").exists()


# -- the lock -------------------------------------------------------------------------------------

# Both processes run the real CLI; fcntl.flock is wrapped only to force the interleaving the
# issue hit by chance: the second ingest looks at the store before the watcher has made it,
# and tries the lock only after the watcher holds it.
HOLDER = """
import fcntl, pathlib, sys
real, marker = fcntl.flock, pathlib.Path(sys.argv[1])
def flock(fd, op):
    real(fd, op)
    marker.touch()  # tell the second ingest we hold the lock
fcntl.flock = flock
sys.argv = ["rlvr-lin", *sys.argv[2:]]
from pipeline.cli import main
main()
"""
LATE = """
import fcntl, pathlib, sys, time
real, marker = fcntl.flock, pathlib.Path(sys.argv[1])
def flock(fd, op):
    deadline = time.monotonic() + 120
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    real(fd, op)
fcntl.flock = flock
sys.argv = ["rlvr-lin", *sys.argv[2:]]
from pipeline.cli import main
main()
"""


def _spawn(script: str, marker: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", script, str(marker), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(cond: Callable[[], bool], procs: list[subprocess.Popen], what: str) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        for p in procs:
            assert p.poll() is None, f"exited early: {p.communicate()[1][-3000:]}"
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _steps(store: Path) -> list[int]:
    try:
        return pipeline.open_run(store).steps
    except PipelineError:
        return []


def test_refused_ingest_leaves_the_running_one_and_its_lock(tiny_run_fp32: Path, cluster,
                                                            tmp_path: Path) -> None:
    run, store, marker = tmp_path / "run", tmp_path / "w.zarr", tmp_path / "held"
    run.mkdir()  # training has just started: no checkpoint yet
    common = ["ingest", str(run), "--store", str(store), "--no-progress",
              "--scheduler", cluster.scheduler.address]
    late = _spawn(LATE, marker, *common)
    watcher = None
    try:
        _wait_for(lambda: (store / LOCK_FILE).exists(), [late], "the second ingest's lock file")
        watcher = _spawn(HOLDER, marker, *common, "--watch", "--poll", "0.2", "--settle", "0.3",
                         "--until-step", "20", "--max-idle", "300")
        _, err = late.communicate(timeout=240)
        assert marker.exists()  # the watcher took the lock first, as arranged
        assert late.returncode == 2, err[-3000:]
        errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and "another ingest is writing this store" in errors[0], err
        assert (store / LOCK_FILE).is_file()  # the refused one used to delete folder and lock
        lock = os.stat(store / LOCK_FILE)
        for s in (0, 10):
            shutil.copytree(tiny_run_fp32 / f"global_step_{s}", run / f"global_step_{s}")
        _wait_for(lambda: _steps(store) == [0, 10], [watcher], "steps 0 and 10")
        before = store_files(store)
        # a third ingest, while the watcher writes: refused too, and it touches nothing
        one_error(cli(cluster, str(run), "--store", str(store)), store,
                  "another ingest is writing this store")
        now = os.stat(store / LOCK_FILE)
        assert (now.st_dev, now.st_ino) == (lock.st_dev, lock.st_ino)
        assert store_files(store) == before
        shutil.copytree(tiny_run_fp32 / "global_step_20", run / "global_step_20")
        _, err = watcher.communicate(timeout=240)
        assert watcher.returncode == 0, err[-3000:]
    finally:
        for p in (late, watcher):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    assert_store_matches(store, run, [0, 10, 20])
    assert [r["step"] for r in pipeline.open_run(store).records] == [0, 10, 20]  # each once


def test_lock_on_a_file_removed_meanwhile_is_retaken(tmp_path: Path, monkeypatch) -> None:
    """A lock taken on a lock file that its holder removed meanwhile locks nothing: retry."""
    import fcntl

    from pipeline.store import integrity

    store = tmp_path / "s.zarr"
    real, calls = fcntl.flock, []

    def flock(fd: int, op: int) -> None:
        if not calls:  # the previous holder removes folder and lock between our open and flock
            shutil.rmtree(store)
            store.mkdir()
            (store / LOCK_FILE).touch()
        calls.append(fd)
        real(fd, op)

    monkeypatch.setattr(integrity.fcntl, "flock", flock)
    with store_lock(store):
        assert len(calls) == 2
        held = os.fstat(calls[-1])
        now = os.stat(store / LOCK_FILE)
        assert (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)


def test_lock_refusal_in_process_touches_nothing(tmp_path: Path) -> None:
    store = tmp_path / "new.zarr"
    with store_lock(store) as held:
        assert held.created
        with pytest.raises(PipelineError, match="another ingest"), store_lock(store):
            pass
        assert (store / LOCK_FILE).is_file()


def test_failed_first_ingest_keeps_a_folder_it_did_not_create(tiny_run_fp32: Path, cluster,
                                                              tmp_path: Path) -> None:
    run = small_run(tiny_run_fp32, tmp_path / "run", [0])
    f = run / "global_step_0" / "model.safetensors"
    mutate(f, _gap)
    store = tmp_path / "mine.zarr"
    store.mkdir()
    one_error(cli(cluster, str(run), "--store", str(store)), f, "gap")
    assert store.is_dir() and store_files(store) == {}


def test_store_that_is_a_file_is_refused_untouched(tiny_run_fp32: Path, cluster,
                                                   tmp_path: Path) -> None:
    run = small_run(tiny_run_fp32, tmp_path / "run", [0])
    f = tmp_path / "notes.txt"
    f.write_text("my notes")
    one_error(cli(cluster, str(run), "--store", str(f)), f, "is a file")
    assert f.read_text() == "my notes"
    one_error(cli(cluster, str(run), "--store", str(f / "s.zarr")), f, "is a file")
    assert f.read_text() == "my notes"


@pytest.mark.parametrize("where", ["global_step_0/s.zarr", "global_step_0"])
def test_store_inside_a_checkpoint_is_refused(tiny_run_fp32: Path, cluster, tmp_path: Path,
                                              where: str) -> None:
    run = small_run(tiny_run_fp32, tmp_path / "run", [0])
    before = sorted(p.name for p in (run / "global_step_0").iterdir())
    one_error(cli(cluster, str(run), "--store", str(run / where)), run / where,
              "checkpoint folder|not an rlvr-lin run store")
    assert sorted(p.name for p in (run / "global_step_0").iterdir()) == before


# -- the model config -----------------------------------------------------------------------------

@pytest.mark.parametrize(("key", "value"), [
    ("model_type", "llama"), ("architectures", ["LlamaForCausalLM"]),
    ("num_attention_heads", 8), ("num_key_value_heads", 4), ("num_hidden_layers", 3),
    ("hidden_size", 256), ("vocab_size", 32), ("tie_word_embeddings", True),
])
def test_architecture_change_refused(stored_run, cluster, key: str, value: object) -> None:
    run, store, before = stored_run
    cfg_file = run / "global_step_20" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg[key] = value
    cfg_file.write_text(json.dumps(cfg))
    one_error(cli(cluster, str(run), "--store", str(store)), cfg_file,
              f"model config changed: {key} is")
    assert_untouched(store, before)


@pytest.mark.parametrize(("content", "message"), [
    ("[1, 2]", "not a JSON object"),
    ("{not json", "not valid JSON"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    (b"\xff\xfe{}", "not valid JSON"),
])
def test_bad_or_missing_config_refused(stored_run, cluster, content, message) -> None:
    run, store, before = stored_run
    cfg_file = run / "global_step_20" / "config.json"
    if isinstance(content, bytes):
        cfg_file.write_bytes(content)
    else:
        cfg_file.write_text(content)
    one_error(cli(cluster, str(run), "--store", str(store)), cfg_file, message)
    assert_untouched(store, before)


def test_config_change_within_a_new_run_leaves_no_store(tiny_run_fp32: Path, cluster,
                                                        tmp_path: Path) -> None:
    run = small_run(tiny_run_fp32, tmp_path / "run", [0, 10])
    cfg_file = run / "global_step_10" / "config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "model_type": "llama"}))
    one_error(cli(cluster, str(run), "--store", str(tmp_path / "s.zarr")), cfg_file,
              "model_type")
    assert not (tmp_path / "s.zarr").exists()


def test_missing_config_is_accepted_and_the_first_one_seen_is_the_runs(cluster,
                                                                      tmp_path: Path) -> None:
    """Decision: config.json may be missing from any step (many trainers write it once);
    the run's config is the first one seen, and every later config.json must match it."""
    run, store = tmp_path / "run", tmp_path / "s.zarr"

    def step(s: int, config: dict | None) -> None:
        (run / f"global_step_{s}").mkdir(parents=True)
        save_file({"w": torch.full((2, 2), float(s))},
                  run / f"global_step_{s}" / "model.safetensors")
        if config is not None:
            (run / f"global_step_{s}" / "config.json").write_text(json.dumps(config))

    step(0, None)
    step(1, None)
    ingest(run, store, client=cluster, progress=False)
    assert pipeline.open_run(store).config is None
    step(2, {"model_type": "qwen2", "num_attention_heads": 4})
    step(3, None)
    ingest(run, store, client=cluster, progress=False)
    assert pipeline.open_run(store).config == {"model_type": "qwen2", "num_attention_heads": 4}
    step(4, {"model_type": "qwen2", "num_attention_heads": 8})
    before = store_files(store)
    with pytest.raises(PipelineError, match="num_attention_heads is 8") as e:
        ingest(run, store, client=cluster, progress=False)
    assert str(run / "global_step_4" / "config.json") in str(e.value)
    assert store_files(store) == before


def test_missing_config_in_a_later_step_is_accepted(stored_run, cluster) -> None:
    run, store, _ = stored_run
    (run / "global_step_20" / "config.json").unlink()
    res = cli(cluster, str(run), "--store", str(store))
    assert res.exit_code == 0, res.output
    assert pipeline.open_run(store).config["model_type"] == "qwen2"


# -- names ----------------------------------------------------------------------------------------

def _named_run(root: Path, names: list[str], steps: tuple[int, ...] = (0, 1)) -> Path:
    """A run whose tensors have these names, written raw (safetensors can't write some)."""
    for s in steps:
        d = root / f"global_step_{s}"
        d.mkdir(parents=True)
        header = {n: {"dtype": "F32", "shape": [2], "data_offsets": [8 * i, 8 * i + 8]}
                  for i, n in enumerate(names)}
        body = np.arange(2 * len(names), dtype="<f4") + s
        write_raw(d / "model.safetensors", json.dumps(header, ensure_ascii=True), body.tobytes())
    return root


@pytest.mark.parametrize("names", [["zarr.json", "w"], ["ZARR.JSON", "zarr.json", "c"]])
def test_zarr_metadata_names_are_escaped(cluster, tmp_path: Path, names: list[str]) -> None:
    run = _named_run(tmp_path / "run", names)
    res = cli(cluster, str(run), "--store", str(tmp_path / "s.zarr"))
    assert res.exit_code == 0, res.output
    r = pipeline.open_run(tmp_path / "s.zarr")
    assert sorted(r.tensor_names) == sorted(names)
    for i, n in enumerate(names):
        np.testing.assert_array_equal(r.read(n, 1), np.array([2 * i + 1, 2 * i + 2], "f4"))


@pytest.mark.parametrize(("names", "message"), [
    (["ok", "bad\ud800name"], "not valid UTF-8"),
    (["ok", "x" * 300], "too long"),
    (["A.weight", "a.weight"], "same array path on a case-insensitive"),
    (["ok", ""], "empty tensor name"),
], ids=["lone-surrogate", "too-long", "case-collision", "empty"])
def test_unstorable_names_refused_nothing_left(cluster, tmp_path: Path, names, message) -> None:
    run = _named_run(tmp_path / "run", names)
    f = run / "global_step_0" / "model.safetensors"
    one_error(cli(cluster, str(run), "--store", str(tmp_path / "s.zarr")), f, message)
    assert not (tmp_path / "s.zarr").exists()


# -- pickles --------------------------------------------------------------------------------------

def _flat(run: Path) -> dict:
    return load_file(run / "global_step_0" / "model.safetensors")


@pytest.mark.parametrize(("wrap", "message"), [
    (lambda sd: {"state_dict": sd, "epoch": 3}, "nested dict under 'state_dict'"),
    (lambda sd: {"model": sd}, "nested dict under 'model'"),
    (lambda sd: list(sd.values()), "holds a list, not a state dict"),
    (lambda sd: {**sd, "epoch": 3}, "entry 'epoch' is not a tensor \\(int\\)"),
    (lambda sd: next(iter(sd.values())), "holds a Tensor, not a state dict"),
    (lambda sd: {**sd, "q": torch.zeros(2, dtype=torch.complex64)}, "dtype complex64"),
], ids=["state_dict", "model", "list", "non-tensor", "bare-tensor", "complex"])
def test_bad_pickles_refused(tiny_run_fp32: Path, cluster, tmp_path: Path, wrap,
                             message) -> None:
    run = small_run(tiny_run_fp32, tmp_path / "run", [0])
    sd = _flat(run)
    (run / "global_step_0" / "model.safetensors").unlink()
    f = run / "global_step_0" / "pytorch_model.bin"
    torch.save(wrap(sd), f)
    one_error(cli(cluster, str(run), "--store", str(tmp_path / "s.zarr"), "--allow-pickle"),
              f, message)
    assert not (tmp_path / "s.zarr").exists()


# -- steps and options ----------------------------------------------------------------------------

def test_step_beyond_int64_refused_at_discovery(stored_run, cluster) -> None:
    run, store, before = stored_run
    big = run / "global_step_9223372036854775808"
    shutil.move(run / "global_step_20", big)
    one_error(cli(cluster, str(run), "--store", str(store)), big, "too large")
    assert_untouched(store, before)
    (run / "global_step_9223372036854775807").mkdir()  # the largest int64 is a valid step
    shutil.rmtree(big)
    assert discover_checkpoints(run)[-1].step == (1 << 63) - 1


@pytest.mark.parametrize(("pattern", "folder", "message"), [
    (r"ckpt_(?P<step>[a-z]+)", "ckpt_abc", "matched 'abc', which is not a step number"),
    (r"ckpt_(?P<step>-?\d+)", "ckpt_-1", "matched '-1', which is not a step number"),
    (r"ckpt_(?P<step>\d+)", "ckpt_\u0663", "not a step number"),  # an Arabic-Indic digit
    (r"ckpt_(\d+)", "ckpt_1", "has no named group 'step'"),
    (r"ckpt_(?P<step>\d+", "ckpt_1", "invalid step_pattern"),
])
def test_bad_step_patterns_one_line(tiny_run_fp32: Path, cluster, tmp_path: Path, pattern: str,
                                    folder: str, message: str) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run_fp32 / "global_step_0", run / folder)
    res = cli(cluster, str(run), "--store", str(tmp_path / "s.zarr"), "--step-pattern", pattern)
    where = repr(pattern) if "pattern" in message or "group" in message else run / folder
    one_error(res, where, message)
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("kwargs", [
    {"poll": float("nan")}, {"poll": -1.0}, {"settle": float("nan")},
    {"max_idle": float("inf")}, {"chunk_bytes": 0}, {"block_bytes": -5},
])
def test_bad_ingest_options_refused_before_anything(stored_run, cluster, kwargs) -> None:
    run, store, before = stored_run
    with pytest.raises(PipelineError, match="must be"):
        ingest(run, store, client=cluster, progress=False, watch=True, **kwargs)
    assert_untouched(store, before)


# -- catalogs -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("write", "message"), [
    (lambda p: p.write_text("runs:\n  r: " + "[" * 20_000 + "]" * 20_000 + "\n"),
     "nested too deeply"),
    (lambda p: p.write_text("runs:\n" + "".join("  " * (i + 1) + "a:\n" for i in range(5000))),
     "nested too deeply|invalid catalog"),
    (lambda p: p.write_bytes(b"runs:\n  r:\n    checkpoints: \xff\xfe\n"), "not UTF-8"),
    (lambda p: p.mkdir(), "is a folder"),
], ids=["flow-20k", "block-5k", "not-utf8", "directory"])
def test_bad_catalogs_one_line(cluster, tmp_path: Path, write, message: str) -> None:
    cat = tmp_path / "cat.yaml"
    write(cat)
    with pytest.raises(PipelineError, match=message) as e:
        load_catalog(cat)
    assert str(cat) in str(e.value) and "\n" not in str(e.value)
    one_error(cli(cluster, "r", "--catalog", str(cat)), cat, message)
