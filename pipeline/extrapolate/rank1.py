"""Rank-1 extrapolation: move a matrix along the dominant direction of its own update.

Per-element lines are noisy: each element's slope carries its own sampling
noise, and extrapolating multiplies it by the horizon. RL updates of a weight
matrix are close to rank one (AlphaRL, arXiv 2510.00553; RELEX, arXiv
2605.21468), so most of the drift is ``c(t) * u v^T`` with one scalar
coefficient per step. That coefficient is a projection of the whole matrix,
so its fitted slope is nearly noise-free, and the prediction is

    W_t = W_c + slope * (t - c) * u v^T

for the last known step ``c``: the real last checkpoint plus the rank-1
drift. Tensors that are not matrices fall back to the per-element line.

Everything streams over row blocks: ``read(step, rows)`` is the only access
to the data, so memory is one block plus O(rows + cols) vectors, never the
matrix. The direction is the top singular pair of ``W_c - W_0`` from a
blocked subspace iteration (a few passes over two checkpoints); one more
pass over the known steps gives the coefficients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

# read(step, rows) -> float32 rows of the tensor at that step
BlockReader = Callable[[int, slice], np.ndarray]

RANK = 8  # subspace width: the top direction converges with the gap to the 9th value
MAX_ITERATIONS = 30  # passes of the subspace iteration (each reads two checkpoints once)
# stop when the top direction turns by less than this (1 - cos, ~1e-4 rad): noise-dominated
# updates have no sharper direction, and a clear rank-1 drift converges in a few passes
TOLERANCE = 1e-8


@dataclass(frozen=True)
class Rank1:
    """The dominant update direction of one matrix and its coefficient per known step."""

    u: np.ndarray  # (rows,) unit vector, float64
    v: np.ndarray  # (cols,) unit vector, float64
    steps: tuple[int, ...]
    coef: np.ndarray  # u^T (W_s - W_steps[0]) v for every known step s
    slope: float  # least-squares slope of coef against step (per training step)

    @property
    def sigma(self) -> float:
        """Coefficient of the last known step: the top singular value of the update."""
        return float(self.coef[-1])

    def drift(self, rows: slice, horizon: float) -> np.ndarray:
        """``slope * horizon * u[rows] v^T`` (float64): what the rows move by ``horizon`` steps."""
        return np.outer(self.u[rows] * (self.slope * float(horizon)), self.v)


def blocks_of(n_rows: int, block_rows: int) -> list[slice]:
    step = max(1, int(block_rows))
    return [slice(a, min(a + step, n_rows)) for a in range(0, n_rows, step)]


def _update(read: BlockReader, first: int, last: int, rows: slice) -> np.ndarray:
    return read(last, rows).astype(np.float64) - read(first, rows).astype(np.float64)


def rank1_direction(read: BlockReader, shape: tuple[int, int], steps: Sequence[int],
                    block_rows: int, rank: int = RANK, max_iterations: int = MAX_ITERATIONS,
                    tol: float = TOLERANCE, seed: int = 0) -> Rank1:
    """Top singular pair of ``W_last - W_first`` and the coefficient of every known step.

    Blocked subspace iteration (Halko et al.'s randomized range finder with
    power steps): ``Z = D^T D V`` accumulated block by block, re-orthonormalised
    each pass, until the Ritz estimate of the top direction stops turning.
    The start is seeded, so the result is deterministic.
    """
    n_rows, n_cols = shape
    steps = tuple(int(s) for s in steps)
    if len(steps) < 2:
        raise ValueError("rank-1 extrapolation needs at least two known steps")
    blocks = blocks_of(n_rows, block_rows)
    p = max(1, min(rank, n_rows, n_cols))
    v_basis = np.linalg.qr(np.random.default_rng(seed).standard_normal((n_cols, p)))[0]
    first, last = steps[0], steps[-1]
    previous: np.ndarray | None = None
    for _ in range(max_iterations):
        z = np.zeros((n_cols, p))
        for rows in blocks:
            d = _update(read, first, last, rows)
            z += d.T @ (d @ v_basis)
        if not np.any(z):
            break  # the matrix never moved: any direction, zero coefficients
        ritz = v_basis @ np.linalg.eigh(v_basis.T @ z)[1][:, -1]
        v_basis = np.linalg.qr(z)[0]
        if previous is not None and 1.0 - abs(float(ritz @ previous)) < tol:
            break
        previous = ritz
    b = np.empty((n_rows, p))
    for rows in blocks:
        b[rows] = _update(read, first, last, rows) @ v_basis
    ub, sb, wt = np.linalg.svd(b, full_matrices=False)
    u, v = ub[:, 0], v_basis @ wt[0]
    if sb[0] == 0.0:
        return Rank1(u, v, steps, np.zeros(len(steps)), 0.0)
    coef = np.zeros(len(steps))
    for rows in blocks:
        w0 = read(first, rows).astype(np.float64)
        for i, s in enumerate(steps[1:], start=1):
            coef[i] += u[rows] @ ((read(s, rows).astype(np.float64) - w0) @ v)
    x = np.asarray(steps, np.float64)
    xc = x - x.mean()
    slope = float(xc @ (coef - coef.mean()) / (xc @ xc))
    return Rank1(u, v, steps, coef, slope)
