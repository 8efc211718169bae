"""``StepSource``: the one interface for everything indexed by training step.

Weights in a run store, weights straight from checkpoint folders, and token
log-probs (the output-space store) answer the same questions: which steps,
which arrays, each array's shape, dtype and natural block height, a block of
rows at several steps, and a (layer, module) label for the tables. The fit,
the backtest, the export and the reports read through this and nothing else,
so none of them has code for one kind of source.

Positions index ``steps`` (position i holds training step ``steps[i]``);
``read`` is the one-step convenience by training step.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

Positions = slice | Sequence[int] | None  # into ``steps``; None: every step


class StepSource(Protocol):
    """Step-indexed arrays, read by row block."""

    @property
    def steps(self) -> list[int]:
        """Training steps, strictly increasing."""
        ...

    @property
    def tensor_names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]:
        """The array's shape at every step (a source whose steps disagree refuses to say)."""
        ...

    def dtype(self, name: str) -> np.dtype:
        """The logical dtype (bfloat16 as ``ml_dtypes.bfloat16``)."""
        ...

    def chunk_rows(self, name: str) -> int:
        """Rows of axis 0 a block should hold so reads touch no stored chunk twice."""
        ...

    def read_block(self, name: str, steps: Positions = None, rows: slice | None = None,
                   out: np.ndarray | None = None) -> np.ndarray:
        """(k, rows, ...) in the logical dtype, for the positions ``steps``."""
        ...

    def read(self, name: str, step: int, rows: slice | None = None) -> np.ndarray:
        """One training step's rows."""
        ...

    def labels(self, name: str) -> tuple[int, str]:
        """(layer, module) for per-layer x module tables; layer -1 when it has none."""
        ...


class WeightSource(StepSource, Protocol):
    """A StepSource of model weights: also where config and tokenizer files are."""

    @property
    def files_folder(self) -> Path | None:
        """Newest checkpoint folder (config.json, tokenizer files), if known."""
        ...

    @property
    def config(self) -> dict[str, Any] | None: ...

    def input_paths(self) -> list[tuple[str, Path]]:
        """(description, path) of what the source reads: an output must never land there."""
        ...


def positions(steps: Positions, n: int) -> list[int]:
    """Positions as a list, each checked to be in [0, n)."""
    if steps is None:
        return list(range(n))
    if isinstance(steps, slice):
        return list(range(*steps.indices(n)))
    out = [int(i) for i in steps]
    bad = [i for i in out if not 0 <= i < n]
    if bad:
        raise IndexError(f"positions {bad} out of range for {n} steps")
    return out


def weight_labels(name: str) -> tuple[int, str]:
    """(layer, module) of a weight tensor, from its name (``pipeline.fit.names``)."""
    from pipeline.fit.names import parse_name

    info = parse_name(name)
    return info.layer, info.module
