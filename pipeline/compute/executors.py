"""Executors: run a list of independent tasks and hand results back as they finish.

A job (fit, ingest, export) plans its tasks as plain picklable calls and
gives them to an executor; it never talks to Dask itself. ``SerialExecutor``
runs them in this process, in order, so a failing task raises where a
debugger can stop on it (and a test needs no cluster); ``DaskExecutor`` runs
them on a ``distributed`` client (a LocalCluster, an existing scheduler, a
SLURM or Kubernetes cluster from ``clusters``), optionally asking for worker
resources such as ``{"GPU": 1}``, the seam for CUDA workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Protocol

Task = tuple[Any, ...]  # the positional arguments of one call


class Executor(Protocol):
    """Runs ``fn(*args)`` for every args; yields (index, result) in completion order."""

    name: str

    def map_unordered(self, fn: Callable[..., Any], tasks: Sequence[Task],
                      key: str = "task") -> Iterator[tuple[int, Any]]: ...


class SerialExecutor:
    """Every task in this process, in order: exceptions surface as they are."""

    name = "serial"

    def map_unordered(self, fn: Callable[..., Any], tasks: Sequence[Task],
                      key: str = "task") -> Iterator[tuple[int, Any]]:
        for i, args in enumerate(tasks):
            yield i, fn(*args)


class DaskExecutor:
    """Tasks as futures on a ``distributed.Client``; a finished future is released at once.

    ``key`` prefixes the task keys (``{key}-{i}``), so the dashboard names the
    job; give each run a unique one (a re-run must not reuse cached results).
    ``resources`` restricts tasks to workers that declare them (``{"GPU": 1}``).
    """

    name = "dask"

    def __init__(self, client: Any, resources: dict[str, float] | None = None) -> None:
        self.client = client
        self.resources = resources

    def map_unordered(self, fn: Callable[..., Any], tasks: Sequence[Task],
                      key: str = "task") -> Iterator[tuple[int, Any]]:
        from distributed import as_completed

        futures = [self.client.submit(fn, *args, key=f"{key}-{i}", pure=False,
                                      resources=self.resources)
                   for i, args in enumerate(tasks)]
        index = {f.key: i for i, f in enumerate(futures)}
        try:
            for fut in as_completed(futures):
                res = fut.result()
                i = index[fut.key]
                fut.release()
                yield i, res
        finally:  # an abandoned iteration (an error, Ctrl-C) cancels what is left
            for f in futures:
                if not f.done():
                    f.cancel()


@contextmanager
def _serial(cluster: str | None, client: Any = None) -> Iterator[Executor]:
    yield SerialExecutor()


@contextmanager
def _dask(cluster: str | None, client: Any = None) -> Iterator[Executor]:
    if client is not None:
        yield DaskExecutor(client)
        return
    from pipeline.compute.clusters import dask_client

    with dask_client(cluster) as c:
        yield DaskExecutor(c)


@contextmanager
def _dask_gpu(cluster: str | None, client: Any = None) -> Iterator[Executor]:
    """Dask, with every task pinned to a worker that declares a GPU resource."""
    if client is not None:
        yield DaskExecutor(client, {"GPU": 1})
        return
    from pipeline.compute.clusters import dask_client

    with dask_client(cluster or "local-cuda") as c:
        yield DaskExecutor(c, {"GPU": 1})


ExecutorFactory = Callable[[str | None, Any], AbstractContextManager[Executor]]
EXECUTORS: dict[str, ExecutorFactory] = {"dask": _dask, "serial": _serial, "dask-gpu": _dask_gpu}
DEFAULT_EXECUTOR = "dask"


def open_executor(name: str = DEFAULT_EXECUTOR, cluster: str | None = None,
                  client: Any = None) -> AbstractContextManager[Executor]:
    """The executor ``name`` on ``cluster`` (or on an open ``client``), closed on exit."""
    from pipeline.errors import PipelineError

    if name not in EXECUTORS:
        raise PipelineError(f"unknown executor {name!r} (expected one of "
                            f"{', '.join(EXECUTORS)})")
    return EXECUTORS[name](cluster, client)
