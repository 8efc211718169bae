"""Pure array arithmetic of weight extrapolation: arrays in, arrays out, no I/O.

Everything here works on one row block at a time, so the caller decides the
memory bound. bf16 <-> float32 casts are ml_dtypes' own casts (``np.copyto``
with ``casting="unsafe"``): one C loop each, round-to-nearest-even with ties
to even, overflow to inf, NaN to a quiet NaN of the same sign. With
ml_dtypes >= 0.5 they run at ~2G (narrowing) and ~4G (widening) elements/s,
2-3x the numpy bit tricks used before; ``tests/test_extrapolate_kernels.py``
checks the rounding against torch and ml_dtypes bit for bit. No torch here:
importing it costs seconds per export.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.compute.threads import compute_threads, run_ranges, split_ranges
from pipeline.dtypes import BF16, is_float  # noqa: F401  (K.is_float: export, backtest)
from pipeline.workspace import Workspace

COMPUTE = np.dtype(np.float32)


def to_float32(a: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``a`` as float32 (exact for bf16/f16/f32).

    Without ``out`` a float32 input is returned as is (not copied).
    """
    if out is None:
        if a.dtype == COMPUTE:
            return a
        out = np.empty(a.shape, np.float32)
    np.copyto(out, a, casting="unsafe")  # bf16: ml_dtypes' exact widening
    return out


def round_to(x: np.ndarray, dtype: np.dtype | type, out: np.ndarray | None = None) -> np.ndarray:
    """Round float32/float64 ``x`` to ``dtype`` with round-to-nearest-even.

    float64 is first rounded to float32 (``lstsq`` results): a double rounding
    that can differ from a direct float64 -> bf16 rounding only on exact
    float32 ties, which is far below the fit's own noise.
    """
    dt = np.dtype(dtype)
    if x.dtype == dt:
        return x
    if dt == BF16:
        x32 = np.asarray(x, dtype=np.float32)
        out = np.empty(x.shape, BF16) if out is None else out
        with np.errstate(all="ignore"):  # overflow to inf is part of the rounding
            np.copyto(out, x32, casting="unsafe")
        return out
    if x.dtype == np.float64 and dt != np.float32 and dt.kind == "f":
        return x.astype(np.float32).astype(dt)
    return x.astype(dt)


TILE = 1 << 16  # elements per inner tile: the float32 temporaries stay in L2 cache
# a block is split over the compute threads only in ranges of at least this many elements
PARALLEL_MIN = 1 << 18

def _two_point_tiles(f0: np.ndarray, f1: np.ndarray, alpha32: np.float32, fo: np.ndarray,
                     ta: np.ndarray, tb: np.ndarray) -> None:
    """Eq. 2 over flat ranges, one cache-sized tile at a time (``ta``/``tb``: float32 scratch)."""
    n = f0.size
    with np.errstate(all="ignore"):  # overflow to inf is part of the rounding
        for i in range(0, n, TILE):
            m = min(TILE, n - i)
            a, b = ta[:m], tb[:m]
            np.copyto(a, f0[i : i + m], casting="unsafe")  # exact widening
            np.copyto(b, f1[i : i + m], casting="unsafe")
            np.subtract(b, a, out=b)
            np.multiply(b, alpha32, out=b)
            np.add(b, a, out=b)
            np.copyto(fo[i : i + m], b, casting="unsafe")  # RNE: ml_dtypes bf16, numpy f16


def two_point(w0: np.ndarray, w1: np.ndarray, alpha: float, out: np.ndarray | None = None,
              ws: Workspace | None = None, threads: int | None = None) -> np.ndarray:
    """Eq. 2 in float32: ``W0 + alpha * (W1 - W0)``, evaluated exactly in that order.

    The order (subtract, multiply by alpha rounded to float32, add; no fused
    multiply-add, no ``lerp``) is part of the contract: an independent numpy
    evaluation of Eq. 2 gives the same bits. ``out`` (float32 by default, or
    bf16/f16) receives the result, rounded to nearest even tile by tile, so
    no full-size float32 intermediate exists and every temporary stays in
    cache (measured: 3x faster than whole-block numpy on a 1 GB model).
    Large blocks are split into ``threads`` (default :func:`compute_threads`)
    contiguous ranges computed concurrently; every element's arithmetic is
    the same whatever the split. float64 inputs are computed in float64.
    """
    if w0.shape != w1.shape:
        raise ValueError(f"shapes differ: {w0.shape} vs {w1.shape}")
    if out is None:
        out = np.empty(w0.shape, np.float32)
    if np.float64 in (w0.dtype, w1.dtype):
        a, b = w0.astype(np.float64), w1.astype(np.float64)
        res = a + alpha * (b - a)
        out[...] = round_to(res, out.dtype) if out.dtype != np.float64 else res
        return out
    ws = ws or Workspace()
    f0 = np.ascontiguousarray(w0).reshape(-1)
    f1 = np.ascontiguousarray(w1).reshape(-1)
    fo = out.reshape(-1)
    n = f0.size
    alpha32 = np.float32(alpha)
    k = compute_threads() if threads is None else max(1, threads)
    k = min(k, max(1, n // PARALLEL_MIN))
    t = min(TILE, n)

    def part(j: int, sl: slice) -> None:
        _two_point_tiles(f0[sl], f1[sl], alpha32, fo[sl],
                         ws.get(f"two_point.a{j}", (t,), np.float32),
                         ws.get(f"two_point.b{j}", (t,), np.float32))

    run_ranges(part, split_ranges(n, k, TILE))  # every element's arithmetic is split-free
    return out


@dataclass(frozen=True)
class Line:
    """Per-element least-squares line of one block: what the fit stage writes for it.

    float32 like the fit's results (``pipeline.engine``); ``line_value`` widens
    them to float64 before they meet.
    """

    slope: np.ndarray  # per training step
    intercept: np.ndarray  # at step 0
    r2: np.ndarray  # NaN where the element never moved


def fit_line(blocks: Iterable[np.ndarray], steps: Sequence[int],
             backend: str | None = None) -> tuple[Line, np.ndarray]:
    """The line through ``blocks`` (one per step, in step order) by the fit stage's own kernel.

    The fused kernel of ``pipeline.engine`` (the default backend unless
    ``backend`` names one), so export and ``rlvr-lin fit`` agree on every bit
    of slope, intercept and R². The blocks are added one at a time into the
    kernel's carry: memory is the carry of one block, not ``len(steps)``
    copies. The null walk is not wanted here (its signs are all zero).
    Returns the line (flat arrays) and the last block.
    """
    from pipeline.engine import DEFAULT_BACKEND, get_backend
    from pipeline.engine.signs import sign_words
    from pipeline.engine.spec import RESULTS, XStats, codec_for, kernel_inputs

    it = iter(blocks)
    first = np.asarray(next(it))
    m = first.size
    be = get_backend(backend or DEFAULT_BACKEND)
    codec = codec_for(first.dtype)
    no_flip = sign_words(0, "", [None], 0, m)  # one row of zero words
    carry = be.start(m)
    last = first
    for i, block in enumerate(itertools.chain([first], it)):
        if i >= len(steps):
            raise ValueError(f"more blocks than the {len(steps)} steps")
        bits, wide = kernel_inputs(np.ascontiguousarray(block).reshape(1, m), codec)
        be.add(carry, bits, wide, codec, np.array([float(steps[i] - steps[0])]), no_flip, 0)
        last = block
    if i + 1 != len(steps):
        raise ValueError(f"{i + 1} blocks for {len(steps)} steps")
    out = {r: np.empty(m, np.float32) for r in RESULTS}
    be.finish(carry, XStats.from_steps(steps), 1, out)
    return Line(out["slope"], out["intercept"], out["r2"]), last


def line_value(slope: np.ndarray, intercept: np.ndarray, target: float) -> np.ndarray:
    """A fitted line (per training step, intercept at step 0, as ``pipeline.fit``) at ``target``.

    float64 throughout: the slope is tiny next to the intercept, and this sum
    is the only place both meet.
    """
    return intercept.astype(np.float64) + slope.astype(np.float64) * float(target)


def gate(pred: np.ndarray, last: np.ndarray, r2: np.ndarray, r2_min: float) -> np.ndarray:
    """The line's prediction where R² >= ``r2_min``, the last checkpoint's value elsewhere.

    Elements that never moved (R² undefined) keep the last value, which is
    also what their line predicts.
    """
    keep_line = np.nan_to_num(r2, nan=-1.0) >= r2_min
    return np.where(keep_line, pred, to_float32(last).astype(pred.dtype))


def sq_norm(a: np.ndarray) -> float:
    """Sum of squares in float64 (for relative errors accumulated over blocks)."""
    a64 = a.astype(np.float64, copy=False).ravel()
    return float(a64 @ a64)
