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


def open_run(store: Any) -> Any:
    """Open an ingested run store for reading (see ``pipeline.store.reader``)."""
    from pipeline.store.reader import open_run as _open_run

    return _open_run(store)


def open_fit(store: Any) -> Any:
    """Open the per-element fit of a store (see ``pipeline.fit``)."""
    from pipeline.fit.results import open_fit as _open_fit

    return _open_fit(store)
