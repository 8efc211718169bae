"""Where work runs: the cluster factory, the executors, and the process-wide thread pool.

``clusters`` turns what the user said (nothing, ``--scheduler ADDRESS``,
``--cluster FILE``, a scheduler file, $DASK_SCHEDULER_ADDRESS) into one Dask
client, for every job (``slurm`` puts the workers in SLURM jobs);
``executors`` runs a list of independent tasks on that client, in this
process (serial, for debugging and tests), or on CUDA workers; ``threads``
holds the one thread pool that in-process kernels split a block over.
Kernel modules import none of this: they stay arrays in, arrays out.
"""

from __future__ import annotations

from pipeline.compute.clusters import cluster_spec, dask_client
from pipeline.compute.executors import EXECUTORS, SerialExecutor

__all__ = ["EXECUTORS", "SerialExecutor", "cluster_spec", "dask_client"]
