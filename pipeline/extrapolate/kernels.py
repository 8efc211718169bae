"""Pure array arithmetic of weight extrapolation: arrays in, arrays out, no I/O.

Everything here works on one row block at a time, so the caller decides the
memory bound. bf16 <-> float32 casts are done on bit patterns in numpy:
ml_dtypes' own casts run at ~30M elements/s, the bit tricks at ~1G/s, and
``tests/test_extrapolate_kernels.py`` checks our rounding against torch and
ml_dtypes bit for bit. No torch here: importing it costs seconds per export.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import ml_dtypes
import numpy as np

if TYPE_CHECKING:
    from pipeline.fit.kernels import Fit

BF16 = np.dtype(ml_dtypes.bfloat16)
COMPUTE = np.dtype(np.float32)


def is_float(dtype: np.dtype) -> bool:
    """Floating point, including ml_dtypes' bfloat16/float8 (whose numpy kind is 'V')."""
    dt = np.dtype(dtype)
    return dt.kind == "f" or dt == BF16 or dt.name.startswith("float8")


class Workspace:
    """Reusable scratch buffers, one per role, grown on demand.

    A fresh 64 MB array per block costs a page fault per 4 KB on first touch;
    on a 1 GB model that was a third of the export time. Arrays returned by
    kernels that take a workspace are views into it, valid until the next call.
    """

    def __init__(self) -> None:
        self._bufs: dict[str, np.ndarray] = {}

    def get(self, role: str, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        dt = np.dtype(dtype)
        n = int(np.prod(shape, dtype=np.int64))
        buf = self._bufs.get(role)
        if buf is None or buf.nbytes < n * dt.itemsize:
            buf = self._bufs[role] = np.empty(max(n * dt.itemsize, 1), np.uint8)
        return buf[: n * dt.itemsize].view(dt).reshape(shape)


def _bf16_into_f32(bits: np.ndarray, out: np.ndarray) -> None:
    """Widen bf16 bit patterns (uint16) into float32 ``out``: exact, a 16-bit shift."""
    u = out.view(np.uint32)
    np.copyto(u, bits)  # measured faster than left_shift with a casting dtype
    np.left_shift(u, 16, out=u)


def _f32_into_bf16(x: np.ndarray, out_bits: np.ndarray, tmp: np.ndarray) -> None:
    """Round float32 ``x`` to bf16 bit patterns with round-to-nearest-even.

    The classic bit trick: add 0x7FFF plus the lowest kept bit, then drop 16
    bits; ties go to the even neighbour, overflow goes to inf. NaNs (where
    the add could carry into the sign) become quiet NaNs of the same sign.
    ``tmp`` is a uint32 scratch of ``x``'s size.
    """
    u = x.view(np.uint32)
    np.right_shift(u, 16, out=tmp)
    np.bitwise_and(tmp, 1, out=tmp)
    np.add(tmp, 0x7FFF, out=tmp)
    np.add(u, tmp, out=tmp)
    np.right_shift(tmp, 16, out=tmp)
    nan = np.isnan(x)
    if nan.any():
        tmp[nan] = (u[nan] >> 16) | 0x0040
    np.copyto(out_bits, tmp, casting="unsafe")


def to_float32(a: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``a`` as float32 (exact for bf16/f16/f32).

    Without ``out`` a float32 input is returned as is (not copied).
    """
    if out is None:
        if a.dtype == COMPUTE:
            return a
        out = np.empty(a.shape, np.float32)
    if a.dtype == BF16:
        _bf16_into_f32(np.ascontiguousarray(a).view(np.uint16), out)
    else:
        np.copyto(out, a, casting="unsafe")
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
        x32 = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty(x.shape, BF16) if out is None else out
        flat, ob = x32.reshape(-1), out.reshape(-1).view(np.uint16)
        tmp = np.empty(min(TILE, flat.size), np.uint32)
        for i in range(0, flat.size, TILE):
            m = min(TILE, flat.size - i)
            _f32_into_bf16(flat[i : i + m], ob[i : i + m], tmp[:m])
        return out
    if x.dtype == np.float64 and dt != np.float32 and dt.kind == "f":
        return x.astype(np.float32).astype(dt)
    return x.astype(dt)


TILE = 1 << 16  # elements per inner tile: the float32 temporaries stay in L2 cache


def two_point(w0: np.ndarray, w1: np.ndarray, alpha: float, out: np.ndarray | None = None,
              ws: Workspace | None = None) -> np.ndarray:
    """Eq. 2 in float32: ``W0 + alpha * (W1 - W0)``, evaluated exactly in that order.

    The order (subtract, multiply by alpha rounded to float32, add; no fused
    multiply-add, no ``lerp``) is part of the contract: an independent numpy
    evaluation of Eq. 2 gives the same bits. ``out`` (float32 by default, or
    bf16/f16) receives the result, rounded to nearest even tile by tile, so
    no full-size float32 intermediate exists and every temporary stays in
    cache (measured: 3x faster than whole-block numpy on a 1 GB model).
    float64 inputs are computed in float64.
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
    t = min(TILE, n)
    ta = ws.get("two_point.a", (t,), np.float32)
    tb = ws.get("two_point.b", (t,), np.float32)
    tu = ws.get("two_point.u", (t,), np.uint32)
    alpha32 = np.float32(alpha)
    to_bf16 = out.dtype == BF16
    ob = fo.view(np.uint16) if to_bf16 else fo
    for i in range(0, n, TILE):
        m = min(TILE, n - i)
        a, b = ta[:m], tb[:m]
        to_float32(f0[i : i + m], a)
        to_float32(f1[i : i + m], b)
        np.subtract(b, a, out=b)
        np.multiply(b, alpha32, out=b)
        np.add(b, a, out=b)
        if to_bf16:
            _f32_into_bf16(b, ob[i : i + m], tu[:m])
        else:
            np.copyto(fo[i : i + m], b, casting="same_kind")  # f16: numpy rounds RNE
    return out


def fit_line(blocks: Iterable[np.ndarray], steps: Sequence[int]) -> tuple[Fit, np.ndarray]:
    """Per-element least-squares line through ``blocks`` (one per step, in step order).

    Uses the fit stage's kernels (``pipeline.fit.kernels``), so export and
    fit agree on every bit of slope, intercept and R². The blocks are
    consumed one at a time: memory is the fit state of one block, not
    ``len(steps)`` copies. Returns the fit (flat arrays) and the last block.
    """
    # imported here: ``import pipeline.fit`` loads dask/xarray/zarr (~1 s), which a
    # two-point export never needs
    from pipeline.fit import kernels as FK

    it = iter(blocks)
    first = next(it)
    state = FK.init_state(first)
    no_flip = [np.zeros(state.size, bool)]  # the null path is not needed here
    last = first
    for s, block in zip(steps[1:], it, strict=True):
        FK.update(state, np.reshape(block, (1, -1)), [float(s - steps[0])], no_flip)
        last = block
    return FK.finalize(state, FK.XStats.from_steps(steps), first.dtype), last


def line_value(slope: np.ndarray, intercept: np.ndarray, target: float) -> np.ndarray:
    """A fitted line (per training step, intercept at step 0, as ``pipeline.fit``) at ``target``.

    float64 throughout: the slope is tiny next to the intercept, and this sum
    is the only place both meet.
    """
    return intercept + slope * float(target)


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
