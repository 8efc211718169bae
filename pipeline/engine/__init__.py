"""The fused fit kernel and its backends: a registry of name -> backend.

A backend turns a block of raw bit patterns (steps x elements) into the
per-element float32 results and the additive counts of the block, in one
pass (see ``pipeline.engine.spec`` for the shared definitions). ``numba``
runs on CPU (the default); ``torch`` runs the same algorithm on torch
tensors (CUDA when present, CPU otherwise, so tests can check it anywhere).
Backends are created lazily: importing this package compiles nothing and
imports neither numba nor torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from pipeline.engine.spec import BlockCounts, Codec, XStats


class Backend(Protocol):
    """What ``pipeline.fit.tasks`` needs from a backend."""

    name: str

    def fit(self, bits: np.ndarray, wide: np.ndarray, codec: Codec, xs: np.ndarray,
            words: np.ndarray, off: int, xst: XStats, n_bins: int,
            out: dict[str, np.ndarray]) -> BlockCounts: ...

    def start(self, m: int) -> Any: ...

    def add(self, carry: Any, bits: np.ndarray, wide: np.ndarray, codec: Codec,
            xs: np.ndarray, words: np.ndarray, off: int) -> None: ...

    def finish(self, carry: Any, xst: XStats, n_bins: int,
               out: dict[str, np.ndarray]) -> BlockCounts: ...


def _numba() -> Backend:
    from pipeline.engine.numba_backend import NumbaBackend

    return NumbaBackend()


def _numba_threads() -> Backend:
    from pipeline.engine.numba_backend import NumbaBackend

    return NumbaBackend(threads=True)


def _torch() -> Backend:
    from pipeline.engine.torch_backend import TorchBackend

    return TorchBackend()


def _torch_cpu() -> Backend:
    from pipeline.engine.torch_backend import TorchBackend

    return TorchBackend(device="cpu")


BACKENDS: dict[str, Callable[[], Backend]] = {
    "numba": _numba,  # one thread per task (Dask runs one task per core)
    "numba-threads": _numba_threads,  # tiles over numba's threads (one big task at a time)
    "torch": _torch,  # CUDA if available, else CPU
    "torch-cpu": _torch_cpu,
}
DEFAULT_BACKEND = "numba"
_CACHE: dict[str, Backend] = {}


@dataclass(frozen=True)
class DevicePlan:
    """What ``--device`` means for a fit: its backend, and its cluster when none is named."""

    backend: str | None  # None: whatever --backend says
    cluster: str | None  # a cluster kind used when the user names no cluster
    needs_cuda: bool = False


DEVICES: dict[str, DevicePlan] = {
    "cpu": DevicePlan(backend=None, cluster=None),
    # one dask-cuda worker per GPU, each running the torch backend on its device
    "cuda": DevicePlan(backend="torch", cluster="local-cuda", needs_cuda=True),
}


def device_plan(device: str, backend: str, cluster: str | None) -> tuple[str, str | None]:
    """(backend, cluster) for ``device``; a contradiction or a missing GPU is a clear error."""
    from pipeline.errors import PipelineError

    if device not in DEVICES:
        raise PipelineError(f"unknown device {device!r} (expected one of {sorted(DEVICES)})")
    plan = DEVICES[device]
    if plan.backend is not None and backend not in (DEFAULT_BACKEND, plan.backend):
        raise PipelineError(f"--device {device} runs the {plan.backend} backend, not --backend "
                            f"{backend}")
    if plan.needs_cuda:
        import torch

        if not torch.cuda.is_available():
            raise PipelineError(f"--device {device}: no CUDA device is visible to torch "
                                f"(torch {torch.__version__}, CUDA build: "
                                f"{torch.version.cuda or 'none'})")
    return plan.backend or backend, cluster or plan.cluster


def get_backend(name: str = DEFAULT_BACKEND) -> Backend:
    """The backend registered as ``name``, created once per process."""
    from pipeline.errors import PipelineError

    if name not in BACKENDS:
        raise PipelineError(f"unknown fit backend {name!r} (expected one of {sorted(BACKENDS)})")
    be = _CACHE.get(name)
    if be is None:
        be = _CACHE[name] = BACKENDS[name]()
    return be


WARM_DTYPES = ("bfloat16", "float16", "float32", "float64")


def warm_up(backend: str = DEFAULT_BACKEND, dtypes: tuple[str, ...] = WARM_DTYPES) -> None:
    """Load (or compile, the first time) the backend's kernel for each dtype, in one pass
    and in the carry's three calls, on a tiny block.

    numba compiles one specialisation per dtype of bits on its first call
    (15-22 s each here) and caches it on disk; a process that then starts
    workers (a test session, a benchmark) makes them load it (well under a
    second) instead of compiling the same code in every worker at once.
    """
    from pipeline.dtypes import logical_dtype
    from pipeline.engine.signs import sign_words
    from pipeline.engine.spec import RESULTS, codec_for, kernel_inputs

    be = get_backend(backend)
    xs, xst = np.array([0.0, 1.0]), XStats.from_steps([0, 1])
    words = sign_words(0, "w", [None, 1], 0, 64)
    for name in dtypes:
        dt = logical_dtype(name)
        codec = codec_for(dt)
        bits, wide = kernel_inputs(np.zeros((2, 64), dt), codec)
        out = {r: np.empty(64, np.float32) for r in RESULTS}
        be.fit(bits, wide, codec, xs, words, 0, xst, 50, out)
        carry = be.start(64)
        be.add(carry, bits, wide, codec, xs, words, 0)
        be.finish(carry, xst, 50, out)


def warm_all() -> None:
    """Every numba kernel of the project (both CPU backends, the store's zigzag codec) in
    numba's on-disk cache: ``workflows/setup.sh`` runs it at install, so that no test
    session, job or worker pays the ~90 s of compilation of a fresh checkout."""
    from pipeline.store import zigzag

    for backend in ("numba", "numba-threads"):
        warm_up(backend)
    zigzag.warm_up()


__all__ = ["BACKENDS", "DEFAULT_BACKEND", "DEVICES", "Backend", "BlockCounts", "Codec",
           "DevicePlan", "WARM_DTYPES", "XStats", "device_plan", "get_backend", "warm_all",
           "warm_up"]
