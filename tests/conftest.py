"""Shared fixtures: real tiny RLVR runs, generated once and cached on disk.

Generating a run takes tens of seconds (the embedded run ~100 s on one
core), so each variant is made once per machine under
``.cache/tiny-runs/<hash of its config>`` and reused by every test session;
on a fresh machine they are made in the background while the first tests
run (``tiny_runs_generated``). Tests must treat these folders as read-only: copy first
(``copy_run``) before damaging or appending to one.

Two kinds of run: the *layout* runs (short, fast; 0..100 every 10 and
0..40) for tests that only need real checkpoints, and the *linear* run (the
README's embedded default) for every test that asserts the science. All are
drawn from ``RLVR_LIN_TEST_SEED`` (default 0): another seed, like another
CPU, gives another trajectory, and the suite must pass on each.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from pipeline.rl.tiny_run import GENERATOR_VERSION, TinyRunConfig, make_tiny_run

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("RLVR_LIN_TEST_CACHE", REPO / ".cache" / "tiny-runs"))


def cached_run(cfg: TinyRunConfig) -> Path:
    """Path of the run for ``cfg``, generating it atomically if missing.

    A run the session's background generators are making (``tiny_runs_generated``)
    is waited for, not made twice.
    """
    key = _run_path(cfg).name
    if key in _BACKGROUND:
        _BACKGROUND[key].result()  # a generator's error is this test's error
    else:
        _wait_for_other_session(key)
    return _make_run(cfg)


def _make_run(cfg: TinyRunConfig) -> Path:
    """The run for ``cfg`` from the cache, made there first if missing.

    A run with siblings (``SIBLINGS``) makes the missing ones in the same training.
    """
    path = _run_path(cfg)
    CACHE.mkdir(parents=True, exist_ok=True)
    group = [cfg, *SIBLINGS.get(cfg, ())]
    with ExitStack() as stack:
        # one generator per key even when several pytest processes start together
        for c in sorted(group, key=lambda c: _run_path(c).name):  # one lock order: no deadlock
            lock = stack.enter_context(open(CACHE / f".{_run_path(c).name}.lock", "w"))
            fcntl.flock(lock, fcntl.LOCK_EX)
        if (path / "metrics.json").exists():
            return path
        todo = [c for c in group if c == cfg or not (_run_path(c) / "metrics.json").exists()]
        tmps = [CACHE / f".{_run_path(c).name}.{os.getpid()}.tmp" for c in todo]
        for tmp in tmps:
            shutil.rmtree(tmp, ignore_errors=True)
        make_tiny_run(tmps[0], cfg, log=lambda _msg: None, progress=False,
                      siblings=list(zip(tmps[1:], todo[1:], strict=True)))
        for c, tmp in zip(todo, tmps, strict=True):
            shutil.rmtree(_run_path(c), ignore_errors=True)
            os.replace(tmp, _run_path(c))
    return path


# run key -> its generation in this session's background processes
_BACKGROUND: dict[str, Future] = {}


def _pending(key: str) -> Path:
    """Marker of a run that some session's background generators will make: its pid inside."""
    return CACHE / f".{key}.pending"


def _wait_for_other_session(key: str) -> None:
    """Wait while another live session (a pytest-xdist worker) has ``key`` queued."""
    marker = _pending(key)
    while marker.exists():
        try:
            os.kill(int(marker.read_text() or 0), 0)
        except (ValueError, ProcessLookupError, FileNotFoundError):
            marker.unlink(missing_ok=True)  # its session is gone: make the run here
            return
        time.sleep(0.5)


SEED = int(os.environ.get("RLVR_LIN_TEST_SEED", "0"))
# The README's embedded default: the linear regime, for tests of the science.
LINEAR = TinyRunConfig(seed=SEED)
# Layout runs (bf16, 11 checkpoints, 0..100 every 10): real checkpoints, quickly.
BF16 = TinyRunConfig(seed=SEED, dtype="bfloat16", sft_steps=250, lr=5e-5, rl_steps=100,
                     save_every=10, prompts_per_step=16)
# Shorter variants: fp32 single file, bf16 sharded (same training as BF16), tied llama.
FP32 = replace(BF16, dtype="float32", rl_steps=40)
SHARDED = replace(BF16, max_shard_size="150KB", rl_steps=40)
TIED_LLAMA = replace(BF16, arch="llama", tie=True, rl_steps=40)


# runs saved by another run's training (its first steps, saved another way): made with it
# (``make_tiny_run(siblings=...)``, bit-identical to each made alone), not trained again
SIBLINGS = {BF16: (FP32, SHARDED)}

# each run's fixture; the linear run first, the longest to make
RUNS = {"tiny_run_linear": LINEAR, "tiny_run_bf16": BF16, "tiny_run_fp32": FP32,
        "tiny_run_sharded": SHARDED, "tiny_run_tied": TIED_LLAMA}


def _run_path(cfg: TinyRunConfig) -> Path:
    blob = json.dumps([GENERATOR_VERSION, asdict(cfg)], sort_keys=True).encode()
    return CACHE / hashlib.sha256(blob).hexdigest()[:16]


def _generate_one_thread(cfg: TinyRunConfig) -> str:
    import torch

    torch.set_num_threads(1)  # two generators share the machine's cores with the tests
    return str(_make_run(cfg))


@pytest.fixture(scope="session", autouse=True)
def tiny_runs_generated(request) -> Iterator[None]:
    """The missing runs this session's tests use, made in two background processes.

    Tests start at once: ``pytest_collection_modifyitems`` runs the modules
    that need no run first and those that need the embedded run (the longest
    to make) last, and a test that needs a run still being made waits for it
    in ``cached_run``. One session generates (the first pytest-xdist worker
    to get ``.generate.lock``); the others wait on its ``.pending`` markers.
    Each run is still made by ``cached_run`` (its lock, its atomic rename), so
    a run made here is the run a test would have made. A test that asks for
    a run through ``request.getfixturevalue`` makes it itself, when it runs.
    """
    import multiprocessing as mp

    used = {f for item in request.session.items for f in getattr(item, "fixturenames", ())}
    wanted = [c for f, c in RUNS.items() if f in used]
    CACHE.mkdir(parents=True, exist_ok=True)
    lock = open(CACHE / ".generate.lock", "w")  # noqa: SIM115 (held until the session ends)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # another session generates: cached_run waits for its runs
        lock.close()
        yield
        return
    missing = [c for c in wanted if not (_run_path(c) / "metrics.json").exists()]
    made_with = {s: c for c, sibs in SIBLINGS.items() if c in missing for s in sibs}
    pool = ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) if missing else None
    try:
        for cfg in [c for c in missing if c not in made_with]:  # the embedded run first
            fut = pool.submit(_generate_one_thread, cfg)
            for c in [cfg, *(s for s in SIBLINGS.get(cfg, ()) if s in missing)]:
                key = _run_path(c).name
                _pending(key).write_text(str(os.getpid()))
                fut.add_done_callback(lambda _f, k=key: _pending(k).unlink(missing_ok=True))
                _BACKGROUND[key] = fut
        yield
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        for key in _BACKGROUND:
            _pending(key).unlink(missing_ok=True)
        _BACKGROUND.clear()
        lock.close()


def _run_need(item: pytest.Item) -> int:
    """0: the item needs no run; 1: only the quick layout runs; 2: the embedded run."""
    names = set(getattr(item, "fixturenames", ()))
    if "tiny_run_linear" in names:
        return 2
    return 1 if names & set(RUNS) else 0


def pytest_collection_modifyitems(session, config, items: list[pytest.Item]) -> None:
    """Whole modules in order of the runs they need (stable otherwise), see ``tiny_runs_generated``.

    Modules stay whole so that module-scoped fixtures (a cluster) start once.
    """
    need: dict[str, int] = {}
    for item in items:
        module = item.nodeid.split("::")[0]
        need[module] = max(need.get(module, 0), _run_need(item))
    items.sort(key=lambda it: need[it.nodeid.split("::")[0]])


@pytest.fixture(scope="session")
def tiny_run_linear() -> Path:
    return cached_run(LINEAR)


@pytest.fixture(scope="session")
def tiny_run_bf16() -> Path:
    return cached_run(BF16)


@pytest.fixture(scope="session")
def tiny_run_fp32() -> Path:
    return cached_run(FP32)


@pytest.fixture(scope="session")
def tiny_run_sharded() -> Path:
    return cached_run(SHARDED)


@pytest.fixture(scope="session")
def tiny_run_tied() -> Path:
    return cached_run(TIED_LLAMA)


@pytest.fixture(scope="session", autouse=True)
def compiled_kernels() -> None:
    """numba's kernels for every dtype, compiled once before any worker process starts.

    Without numba's on-disk cache (a checkout that skipped ``workflows/setup.sh``),
    every Dask worker and CLI process of the first tests compiled the same kernels
    at once (~90 s of compilation each). Afterwards each process loads them.
    """
    from pipeline.engine import warm_all

    warm_all()  # workflows/setup.sh did it at install; here it only loads them


def pytest_configure(config) -> None:
    """Local Dask workers forked from a server that has imported what tasks run.

    A spawned worker imports dask, zarr, numba and the task modules (~2 CPU-s),
    and the suite starts well over a hundred of them; forked from the
    forkserver (distributed's own test setup) a two-worker cluster starts in
    ~0.2 s instead of ~2 s. Only clusters started in the test processes
    themselves; a CLI the tests run spawns its workers as a user's would.
    """
    import multiprocessing

    import dask

    if ("forkserver" not in multiprocessing.get_all_start_methods()
            or config.getoption("numprocesses", None) and not hasattr(config, "workerinput")):
        return  # no forkserver here, or the xdist controller (it starts no cluster)
    dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"})
    from distributed.utils import get_mp_context

    ctx = get_mp_context()  # distributed's preload: itself and the packages it knows
    from multiprocessing import forkserver

    preload = list(getattr(forkserver._forkserver, "_preload_modules", None) or [])
    ctx.set_forkserver_preload([*preload, "pipeline.store.tasks", "pipeline.fit.tasks",
                                "pipeline.engine.numba_backend"])


@pytest.fixture(scope="module")
def cluster():
    """A client of two real worker processes, shared by one test module."""
    from distributed import Client, LocalCluster

    with (LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                       dashboard_address=":0", memory_limit="2GiB") as lc,
          Client(lc) as client):
        yield client


@pytest.fixture
def copy_run(tmp_path):
    """Copy a cached run into tmp_path so a test may modify it."""

    def _copy(run: Path, name: str = "run") -> Path:
        dst = tmp_path / name
        shutil.copytree(run, dst)
        return dst

    return _copy
