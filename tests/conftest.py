"""Shared fixtures: real tiny RLVR runs, generated once and cached on disk.

Generating a run takes tens of seconds, so each variant is made once per
machine under ``.cache/tiny-runs/<hash of its config>`` and reused by every
test session. Tests must treat these folders as read-only: copy first
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
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from pipeline.rl.tiny_run import GENERATOR_VERSION, TinyRunConfig, make_tiny_run

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("RLVR_LIN_TEST_CACHE", REPO / ".cache" / "tiny-runs"))


def cached_run(cfg: TinyRunConfig) -> Path:
    """Path of the run for ``cfg``, generating it atomically if missing."""
    path = _run_path(cfg)
    key = path.name
    CACHE.mkdir(parents=True, exist_ok=True)
    # one generator per key even when several pytest processes start together
    with open(CACHE / f".{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "metrics.json").exists():
            tmp = CACHE / f".{key}.{os.getpid()}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            make_tiny_run(tmp, cfg, log=lambda _msg: None, progress=False)
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
    return path


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


# each run's fixture; the linear run first, the longest to make
RUNS = {"tiny_run_linear": LINEAR, "tiny_run_bf16": BF16, "tiny_run_fp32": FP32,
        "tiny_run_sharded": SHARDED, "tiny_run_tied": TIED_LLAMA}


def _run_path(cfg: TinyRunConfig) -> Path:
    blob = json.dumps([GENERATOR_VERSION, asdict(cfg)], sort_keys=True).encode()
    return CACHE / hashlib.sha256(blob).hexdigest()[:16]


def _generate_one_thread(cfg: TinyRunConfig) -> str:
    import torch

    torch.set_num_threads(1)  # two generators share the machine's cores
    return str(cached_run(cfg))


@pytest.fixture(scope="session", autouse=True)
def tiny_runs_generated(request) -> None:
    """The missing runs this session's tests use, two at a time, before the tests start.

    On a fresh machine the five runs took ~270 s one after the other, 228 s
    in two processes (measured here). Each run is still made by
    ``cached_run`` (its lock, its atomic rename), so a run made here is the
    run a test would have made. A test that asks for a run through
    ``request.getfixturevalue`` makes it itself, when it runs.
    """
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    used = {f for item in request.session.items for f in getattr(item, "fixturenames", ())}
    missing = [c for f, c in RUNS.items()
               if f in used and not (_run_path(c) / "metrics.json").exists()]
    if len(missing) < 2:
        return
    with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as ex:
        list(ex.map(_generate_one_thread, missing))


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
