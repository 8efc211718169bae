"""The fused fit kernel on CPU, compiled by numba: one pass over a (steps x elements) block.

Elements are tiled (``TILE`` at a time) and the steps are looped inside a
tile, so the float64 accumulators of a tile (~130 bytes an element) stay in
L2 while every step streams through once: bits are decoded (bf16 by a 16-bit
shift, fp16 through a table, fp32 reinterpreted), the deltas from the first
step added into the sums in step order, the sign-flipped null walk advanced,
the min/max and the capped distinct values updated; then the tile is
finished (slope, intercept, R², null R², histograms and counts) before the
next tile starts. The arithmetic is the reference's (``tests/reference_fit.py``)
operation for operation, without fast-math or contraction, so every float64
intermediate, and so every float32 output, is bitwise the same.

Kernels are pure (arrays in, arrays out) and ``nogil``: threads or Dask
decide the parallelism (see ``NumbaBackend``). ``cache=True`` keeps the
compiled code on disk, so a worker process loads it instead of compiling.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from pipeline.engine.spec import (
    BF16,
    F16,
    F16_TABLE,
    F32,
    MIN_CHANGE,
    THRESHOLDS,
    BlockCounts,
    Codec,
    XStats,
    check_block,
)

TILE = 2048  # elements per tile: ~300 KB of accumulators and scratch, in L2
N_F = 11  # float64 accumulators: sd sxd sdd se sxe see e dprev w0 min max
N_B = 3  # uint64 bit patterns: w0 v1 v2 (a slot equal to w0 is empty)
_THR = np.array(THRESHOLDS, np.float64)
_OPTS: dict[str, Any] = {"cache": True, "nogil": True, "error_model": "numpy"}


@intrinsic
def _u32_as_f32(typingctx: Any, x: Any) -> Any:
    """Reinterpret a uint32 as a float32 (a register bitcast, no memory round trip)."""
    sig = types.float32(types.uint32)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def _f64_as_u64(typingctx: Any, x: Any) -> Any:
    """The bits of a float64, as a uint64."""
    sig = types.uint64(types.float64)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(args[0], ir.IntType(64))

    return sig, codegen


@intrinsic
def _u64_as_f64(typingctx: Any, x: Any) -> Any:
    """A uint64 reinterpreted as a float64."""
    sig = types.float64(types.uint64)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(args[0], ir.DoubleType())

    return sig, codegen


@njit(**_OPTS)
def _decode_row(bits, r, lo, hi, kind, lut, wide, negz, rowf, rowb):
    """Row ``r`` of elements [lo, hi): values (float64, exact) and bit keys (-0.0 folded)."""
    n = hi - lo
    if kind == BF16:
        for i in range(n):
            rowf[i] = _u32_as_f32(np.uint32(np.uint32(bits[r, lo + i]) << np.uint32(16)))
    elif kind == F16:
        for i in range(n):
            rowf[i] = lut[bits[r, lo + i]]
    elif kind == F32:
        for i in range(n):
            rowf[i] = _u32_as_f32(np.uint32(bits[r, lo + i]))
    else:
        for i in range(n):
            rowf[i] = wide[r, lo + i]
    for i in range(n):
        b = np.uint64(bits[r, lo + i])
        rowb[i] = np.uint64(0) if b == negz else b


@njit(**_OPTS)
def _accumulate(bits, kind, lut, wide, xs, words, off, negz, first, lo, hi, S, U):
    """Every row of ``bits`` into the accumulators of elements [lo, hi).

    ``S`` (N_F + 1, >= hi - lo) float64 rows: the accumulators, then the decoded
    row; ``U`` (N_B + 2, ...) uint64 rows: w0/v1/v2 bit keys, the row's keys, the
    row's sign masks; column i is element lo + i. (Rows of one scratch array
    are padded apart: rows a power of two apart share L1 sets and thrash.)
    ``first``: row 0 is the window's first step and initialises them.
    ``words[r]``: packed null signs of row r; element lo + i is bit off + lo + i.
    """
    n = hi - lo
    k = bits.shape[0]
    sd, sxd, sdd, se, sxe, see = S[0, :n], S[1, :n], S[2, :n], S[3, :n], S[4, :n], S[5, :n]
    e, dprev, w0, mn, mx, rowf = S[6, :n], S[7, :n], S[8, :n], S[9, :n], S[10, :n], S[11, :n]
    b0, v1, v2, rowb, msk = U[0, :n], U[1, :n], U[2, :n], U[3, :n], U[4, :n]
    has4 = U[5, :n]
    r0 = 0
    if first:
        _decode_row(bits, 0, lo, hi, kind, lut, wide, negz, rowf, rowb)
        for i in range(n):
            for f in range(8):
                S[f, i] = 0.0
            w0[i] = rowf[i]
            mn[i] = rowf[i] + 0.0  # -0.0 + 0.0 == +0.0
            mx[i] = rowf[i] + 0.0
            b0[i] = rowb[i]
            v1[i] = rowb[i]
            v2[i] = rowb[i]
            has4[i] = 0
        r0 = 1
    one = np.uint64(1)
    top = np.uint64(63)
    for r in range(r0, k):
        _decode_row(bits, r, lo, hi, kind, lut, wide, negz, rowf, rowb)
        x = xs[r]
        wr = words[r]
        for i in range(n):  # the sign bit to flip, per element
            g = off + lo + i
            msk[i] = ((wr[g >> 6] >> np.uint64(g & 63)) & one) << top
        for i in range(n):
            d = rowf[i] - w0[i]
            sd[i] += d
            sxd[i] += x * d
            sdd[i] += d * d
            inc = _u64_as_f64(_f64_as_u64(d - dprev[i]) ^ msk[i])  # +-(d_k - d_k-1)
            ev = e[i] + inc
            e[i] = ev
            se[i] += ev
            sxe[i] += x * ev
            see[i] += ev * ev
            dprev[i] = d
        for i in range(n):  # the range and the distinct values: branches, kept apart
            v = rowf[i]
            if v != v:
                mn[i] = v  # NaN stays (as np.minimum/np.maximum)
                mx[i] = v
            else:
                if v < mn[i]:
                    mn[i] = v + 0.0
                if v > mx[i]:
                    mx[i] = v + 0.0
            if has4[i] == 0:
                b = rowb[i]
                if b != b0[i] and b != v1[i] and b != v2[i]:
                    if v1[i] == b0[i]:
                        v1[i] = b
                    elif v2[i] == b0[i]:
                        v2[i] = b
                    else:
                        has4[i] = 1


@njit(**_OPTS)
def _r2(sxy, sxx, syy):
    """THE coefficient of determination: Sxy² / (Sxx Syy), clipped to [0, 1], NaN unless Syy > 0."""
    if not syy > 0.0:
        return np.nan
    r = (sxy * sxy) / (sxx * syy)
    if r < 0.0:
        return 0.0
    if r > 1.0:
        return 1.0
    return r


@njit(**_OPTS)
def _bin(ri, v, cat, paper, n_bins, thr, hist, sums, above):
    """Count one selected value of result ``ri`` (a NaN null R² counts nowhere)."""
    if v != v:
        return
    b = int(v * n_bins)  # truncation = floor (R² >= 0)
    if b > n_bins - 1:
        b = n_bins - 1  # R² = 1 goes in the last bin
    hist[ri, cat, b] += 1
    sums[ri, 0] += v
    if paper:
        sums[ri, 1] += v
    for t in range(thr.shape[0]):
        if v > thr[t]:
            above[ri, 0, t] += 1
            if paper:
                above[ri, 1, t] += 1


@njit(**_OPTS)
def _finish(S, U, lo, hi, nf, sx, sxx, x0, n_bins, min_change, thr,
            slope, icpt, r2o, nr2o, hist, sums, above, counts):
    """Results of elements [lo, hi) (columns 0.. of S, U) into the outputs, counts added."""
    for i in range(hi - lo):
        sd, sxd, sdd, se, sxe, see = S[0, i], S[1, i], S[2, i], S[3, i], S[4, i], S[5, i]
        static = sdd == 0.0  # exact: d(first step) = 0, a sum of squares is 0 only if all are
        sxy = sxd - (sx * sd) / nf  # centred sums
        syy = sdd - (sd * sd) / nf
        if static:
            syy = 0.0
        sl = sxy / sxx
        ic = S[8, i] + (sd - sl * sx) / nf  # the delta at x = 0, then back to step 0
        ic = ic - sl * x0
        r2 = _r2(sxy, sxx, syy)
        sxy_n = sxe - (sx * se) / nf
        syy_n = see - (se * se) / nf
        if static:
            syy_n = 0.0
        nr2 = _r2(sxy_n, sxx, syy_n)
        j = lo + i
        slope[j] = sl
        icpt[j] = ic
        r2o[j] = r2
        nr2o[j] = nr2
        if static:
            counts[0] += 1
        if not np.isfinite(sdd):
            counts[1] += 1  # a NaN or inf value: neither static nor binned
        if static or not np.isfinite(r2):
            continue
        counts[2] += 1
        moved = (S[10, i] - S[9, i]) > min_change
        if moved:
            counts[3] += 1
        paper = moved and U[5, i] != 0
        cat = 2 if paper else 1
        _bin(0, r2, cat, paper, n_bins, thr, hist, sums, above)
        _bin(1, nr2, cat, paper, n_bins, thr, hist, sums, above)


PAD = 40  # extra columns per scratch row (see ``_accumulate``)


@njit(**_OPTS)
def _scratch(t):
    return (np.empty((N_F + 1, t + PAD), np.float64), np.empty((N_B + 3, t + PAD), np.uint64))


@njit(**_OPTS)
def fit_block(bits, kind, lut, wide, xs, words, off, negz, nf, sx, sxx, x0, n_bins,
              min_change, thr, slope, icpt, r2o, nr2o, hist, sums, above, counts, tile):
    """The whole fit of a block whose rows are every step of the window, tile by tile."""
    m = bits.shape[1]
    t = max(1, min(tile, m))
    S, U = _scratch(t)
    for lo in range(0, m, t):
        hi = min(lo + t, m)
        _accumulate(bits, kind, lut, wide, xs, words, off, negz, True, lo, hi, S, U)
        _finish(S, U, lo, hi, nf, sx, sxx, x0, n_bins, min_change, thr, slope, icpt, r2o,
                nr2o, hist, sums, above, counts)


@njit(**_OPTS, parallel=True)
def fit_block_parallel(bits, kind, lut, wide, xs, words, off, negz, nf, sx, sxx, x0,
                       n_bins, min_change, thr, slope, icpt, r2o, nr2o, hist, sums, above,
                       counts, tile):
    """``fit_block`` with tiles spread over numba threads (per-tile counts, added at the end)."""
    m = bits.shape[1]
    t = max(1, min(tile, m))
    n_tiles = (m + t - 1) // t
    h = np.zeros((n_tiles, hist.shape[0], hist.shape[1], hist.shape[2]), np.int64)
    s = np.zeros((n_tiles, sums.shape[0], sums.shape[1]), np.float64)
    a = np.zeros((n_tiles, above.shape[0], above.shape[1], above.shape[2]), np.int64)
    c = np.zeros((n_tiles, counts.shape[0]), np.int64)
    for q in prange(n_tiles):
        lo = q * t
        hi = min(lo + t, m)
        S, U = _scratch(t)
        _accumulate(bits, kind, lut, wide, xs, words, off, negz, True, lo, hi, S, U)
        _finish(S, U, lo, hi, nf, sx, sxx, x0, n_bins, min_change, thr, slope, icpt, r2o,
                nr2o, h[q], s[q], a[q], c[q])
    for q in range(n_tiles):  # in tile order: the float sums do not depend on the threads
        hist += h[q]
        sums += s[q]
        above += a[q]
        counts += c[q]


@njit(**_OPTS)
def _load(CS, CU, lo, hi, S, U):
    n = hi - lo
    for f in range(N_F):
        S[f, :n] = CS[f, lo:hi]
    for f in range(N_B):
        U[f, :n] = CU[f, lo:hi]
    U[5, :n] = CU[N_B, lo:hi]


@njit(**_OPTS)
def _store(S, U, lo, hi, CS, CU):
    n = hi - lo
    for f in range(N_F):
        CS[f, lo:hi] = S[f, :n]
    for f in range(N_B):
        CU[f, lo:hi] = U[f, :n]
    CU[N_B, lo:hi] = U[5, :n]


@njit(**_OPTS)
def accumulate(bits, kind, lut, wide, xs, words, off, negz, first, CS, CU, tile):
    """Some rows of steps into a carry CS (N_F, m) float64, CU (N_B + 1, m) uint64."""
    m = bits.shape[1]
    t = max(1, min(tile, m))
    S, U = _scratch(t)
    for lo in range(0, m, t):
        hi = min(lo + t, m)
        if not first:
            _load(CS, CU, lo, hi, S, U)
        _accumulate(bits, kind, lut, wide, xs, words, off, negz, first, lo, hi, S, U)
        _store(S, U, lo, hi, CS, CU)


@njit(**_OPTS)
def finish(CS, CU, nf, sx, sxx, x0, n_bins, min_change, thr, slope, icpt, r2o, nr2o,
           hist, sums, above, counts, tile):
    """Results and counts of a carry, tile by tile."""
    m = CS.shape[1]
    t = max(1, min(tile, m))
    S, U = _scratch(t)
    for lo in range(0, m, t):
        hi = min(lo + t, m)
        _load(CS, CU, lo, hi, S, U)
        _finish(S, U, lo, hi, nf, sx, sxx, x0, n_bins, min_change, thr, slope, icpt, r2o,
                nr2o, hist, sums, above, counts)


class Carry:
    """Accumulators of a block whose steps arrive in several reads (RAM only, 112 B/element)."""

    def __init__(self, m: int) -> None:
        self.S = np.empty((N_F, m), np.float64)
        self.U = np.empty((N_B + 1, m), np.uint64)
        self.started = False


def _xargs(xst: XStats) -> tuple[float, float, float, float]:
    return float(xst.n), xst.sx, xst.centred_sxx, float(xst.x0)


class NumbaBackend:
    """CPU backend. ``threads=True`` spreads the tiles of a block over numba's threads.

    The default is one thread per task: Dask already runs one task per core
    and overlaps the store's decompression with the kernel (measured in
    ``benchmarks/fit.py --engine-threads``).
    """

    name = "numba"

    def __init__(self, threads: bool = False, tile: int = TILE) -> None:
        self.threads = threads
        self.tile = tile

    def fit(self, bits: np.ndarray, wide: np.ndarray, codec: Codec, xs: np.ndarray,
            words: np.ndarray, off: int, xst: XStats, n_bins: int,
            out: dict[str, np.ndarray]) -> BlockCounts:
        """Fit a block holding every step of the window (rows: steps, columns: elements)."""
        check_block(bits, xs, words, xst.n)
        c = BlockCounts.zeros(n_bins)
        kern = fit_block_parallel if self.threads else fit_block
        kern(bits, codec.kind, F16_TABLE, wide, xs, words, off, np.uint64(codec.negz),
             *_xargs(xst), n_bins, MIN_CHANGE, _THR, out["slope"], out["intercept"], out["r2"],
             out["null_r2"], c.hist, c.sums, c.above, c.counts, self.tile)
        return c

    def start(self, m: int) -> Carry:
        return Carry(m)

    def add(self, carry: Carry, bits: np.ndarray, wide: np.ndarray, codec: Codec,
            xs: np.ndarray, words: np.ndarray, off: int) -> None:
        """The next rows of steps (the first call's row 0 is the window's first step)."""
        accumulate(bits, codec.kind, F16_TABLE, wide, xs, words, off, np.uint64(codec.negz),
                   not carry.started, carry.S, carry.U, self.tile)
        carry.started = True

    def finish(self, carry: Carry, xst: XStats, n_bins: int,
               out: dict[str, np.ndarray]) -> BlockCounts:
        c = BlockCounts.zeros(n_bins)
        finish(carry.S, carry.U, *_xargs(xst), n_bins, MIN_CHANGE, _THR, out["slope"],
               out["intercept"], out["r2"], out["null_r2"], c.hist, c.sums, c.above, c.counts,
               self.tile)
        return c
