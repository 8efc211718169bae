"""Where Dask work runs: a LocalCluster sized to the machine, or an existing cluster.

Every job goes through ``dask_client`` so that ``--scheduler ADDRESS`` (or
$DASK_SCHEDULER_ADDRESS) means the same thing for ingest, fit and export.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import psutil

SCHEDULER_ENV = "DASK_SCHEDULER_ADDRESS"


@contextmanager
def dask_client(
    scheduler: str | None = None,
    n_workers: int | None = None,
    memory_limit: str | int | None = None,
    threads_per_worker: int = 1,
) -> Iterator[object]:
    """Yield a ``distributed.Client``; a LocalCluster is closed on exit, a remote one is not.

    The local default uses processes (one thread each) so numpy kernels run
    in parallel and a worker that exceeds its memory limit is restarted
    rather than taking the machine down.
    """
    from distributed import Client, LocalCluster

    address = scheduler or os.environ.get(SCHEDULER_ENV)
    if address:
        with Client(address, timeout="30s") as client:
            yield client
        return
    n = n_workers or max(1, min(os.cpu_count() or 1, 8))
    if memory_limit is None:
        memory_limit = int(psutil.virtual_memory().total * 0.6 / n)
    with (
        LocalCluster(
            n_workers=n,
            threads_per_worker=threads_per_worker,
            processes=True,
            memory_limit=memory_limit,
            dashboard_address=":0",  # a free port: never clashes with another cluster
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client
