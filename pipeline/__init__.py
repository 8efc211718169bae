"""Linear dynamics of RLVR training.

Checkpoints of an RL run become one step-indexed zarr store; every weight
element is fit against training step; the linearity is used to predict later
models. Heavy submodules are imported lazily so ``import pipeline`` stays fast.
"""

from __future__ import annotations

from typing import Any

from pipeline.errors import PipelineError

__all__ = ["PipelineError", "open_run", "open_fit"]
__version__ = "0.1.0"


def open_run(store: Any, storage_options: dict[str, Any] | None = None) -> Any:
    """Open an ingested run store for reading (see ``pipeline.store.reader``).

    ``store`` is a folder or an object-store URL (``s3://bucket/run.zarr``);
    ``storage_options`` (endpoint_url, key/secret or anon, backend) reach it.
    """
    from pipeline.store.reader import open_run as _open_run

    return _open_run(store, storage_options)


def open_fit(store: Any, storage_options: dict[str, Any] | None = None,
             catalog: Any = None) -> Any:
    """Open the per-element fit of a store, fit folder or catalog name (``pipeline.fit``)."""
    from pipeline.fit.results import open_fit as _open_fit

    return _open_fit(store, storage_options, catalog)
