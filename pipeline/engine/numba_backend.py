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
intermediate, and so every float32 output, is bitwise the same (only a tile's
sums of R², in ``_count``, are reassociated: see there).

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
    WIDE,
    BlockCounts,
    Codec,
    XStats,
    check_block,
)

TILE = 2048  # elements per tile: ~300 KB of accumulators and scratch, in L2
N_F = 11  # float64 accumulators: sd sxd sdd se sxe see e dprev w0 min max
N_B = 3  # uint64 bit patterns: w0 v1 v2 (a slot equal to w0 is empty)
R2, NR2 = N_F + 1, N_F + 2  # scratch rows of S after the decoded row: R² and null R²
_THR = np.array(THRESHOLDS, np.float64)
if _THR.shape != (2,):  # the counters of ``_finish`` are written out for two thresholds
    raise ImportError("numba_backend counts exactly two R² thresholds")
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
    """Row ``r`` of elements [lo, hi): values (float64, exact) and bit keys (-0.0 folded).

    Loops run over 1-D row views: indexing the 2-D block directly kept LLVM
    from vectorising (3.5x slower, measured).
    """
    n = hi - lo
    row = bits[r, lo:hi]
    if kind == BF16:
        for i in range(n):
            b = row[i]
            rowf[i] = _u32_as_f32(np.uint32(np.uint32(b) << np.uint32(16)))
            bb = np.uint64(b)
            rowb[i] = np.uint64(0) if bb == negz else bb
        return
    if kind == F16:
        for i in range(n):
            rowf[i] = lut[row[i]]
    elif kind == F32:
        for i in range(n):
            rowf[i] = _u32_as_f32(np.uint32(row[i]))
    else:
        wrow = wide[r, lo:hi]
        for i in range(n):
            rowf[i] = wrow[i]
    for i in range(n):
        bb = np.uint64(row[i])
        rowb[i] = np.uint64(0) if bb == negz else bb


@njit(**_OPTS)
def _sign_masks(wr, g0, n, msk):
    """msk[i] = the float64 sign bit set where bit g0 + i of the packed words ``wr`` is."""
    one = np.uint64(1)
    top = np.uint64(63)
    if g0 & 63 == 0 and n & 63 == 0:  # whole words: one load per 64 elements
        w0 = g0 >> 6
        for q in range(n >> 6):
            w = wr[w0 + q]
            base = q << 6
            for b in range(64):
                msk[base + b] = ((w >> np.uint64(b)) & one) << top
        return
    for i in range(n):
        g = g0 + i
        msk[i] = ((wr[g >> 6] >> np.uint64(g & 63)) & one) << top


@njit(**_OPTS)
def _accumulate(bits, kind, lut, wide, xs, words, off, negz, first, lo, hi, S, U):
    """Every row of ``bits`` into the accumulators of elements [lo, hi).

    ``S`` (N_F + 1, >= hi - lo) float64 rows: the accumulators, then the decoded
    row; ``U`` (N_B + 3, ...) uint64 rows: w0/v1/v2 bit keys, the row's keys, the
    row's sign masks, the 4-distinct flag; column i is element lo + i (keys of
    dtypes of at most 32 bits and the flag are uint32, packed: views of rows).
    (Rows of one scratch array are padded apart: rows a power of two apart
    share L1 sets and thrash.)
    ``first``: row 0 is the window's first step and initialises them.
    ``words[r]``: packed null signs of row r; element lo + i is bit off + lo + i.
    """
    n = hi - lo
    if kind == WIDE:
        _accumulate_keys(bits, kind, lut, wide, xs, words, off, negz, first, lo, hi, S, U,
                         U[0, :n], U[1, :n], U[2, :n], U[3, :n])
    else:  # keys of at most 32 bits: packed in the first n uint32 of their rows (half the bytes)
        _accumulate_keys(bits, kind, lut, wide, xs, words, off, negz, first, lo, hi, S, U,
                         U[0].view(np.uint32)[:n], U[1].view(np.uint32)[:n],
                         U[2].view(np.uint32)[:n], U[3].view(np.uint32)[:n])


@njit(**_OPTS)
def _accumulate_keys(bits, kind, lut, wide, xs, words, off, negz, first, lo, hi, S, U,
                     b0, v1, v2, rowb):
    """``_accumulate`` with the bit-key rows w0/v1/v2/row as given (uint64 or uint32 views).

    A carry (``_store``/``_load``) copies the first n uint64 of each row, which
    hold the n packed uint32 keys: tiles are the same in every call, so each
    tile gets back the keys it wrote.
    """
    n = hi - lo
    k = bits.shape[0]
    sd, sxd, sdd, se, sxe, see = S[0, :n], S[1, :n], S[2, :n], S[3, :n], S[4, :n], S[5, :n]
    e, dprev, w0, mn, mx, rowf = S[6, :n], S[7, :n], S[8, :n], S[9, :n], S[10, :n], S[11, :n]
    msk = U[4, :n]
    has4 = U[5].view(np.uint32)[:n]  # a flag: uint32, as the packed keys (see ``_finish``)
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
    for r in range(r0, k):
        _decode_row(bits, r, lo, hi, kind, lut, wide, negz, rowf, rowb)
        x = xs[r]
        wr = words[r]
        _sign_masks(wr, off + lo, n, msk)  # the sign bit to flip, per element
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
            v = rowf[i]  # the range: selects, no branches (a NaN stays, as np.minimum's)
            lo_v = mn[i]
            hi_v = mx[i]
            lo_v = v if v < lo_v else lo_v
            hi_v = v if v > hi_v else hi_v
            lo_v = v if v != v else lo_v
            hi_v = v if v != v else hi_v
            mn[i] = lo_v + 0.0  # -0.0 + 0.0 == +0.0
            mx[i] = hi_v + 0.0
        for i in range(n):  # distinct values, capped: selects too
            b = rowb[i]
            z = b0[i]
            p = v1[i]
            q = v2[i]
            new = (b != z) & (b != p) & (b != q) & (has4[i] == 0)
            e1 = p == z
            e2 = q == z
            v1[i] = b if new & e1 else p
            v2[i] = b if new & (not e1) & e2 else q
            has4[i] = has4[i] | np.uint32(new & (not e1) & (not e2))


@njit(**_OPTS)
def _r2(sxy, sxx, syy):
    """THE coefficient of determination: Sxy² / (Sxx Syy), clipped to [0, 1], NaN unless Syy > 0.

    Written with selects, not returns, so the loop that calls it vectorises
    (np.clip semantics: a NaN stays NaN).
    """
    r = (sxy * sxy) / (sxx * syy)
    r = 0.0 if r < 0.0 else r
    r = 1.0 if r > 1.0 else r
    return r if syy > 0.0 else np.nan


@njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc"})
def _count(sdd, r2r, nr2r, mn, mx, has4, n_bins, min_change, t0, t1, ir, inr):
    """The counts of a finished tile, and each element's flat histogram index (category x bin).

    Branch-free with selects, and the only code here allowed to reassociate
    (its float sums of R²: compared with a tolerance, and added across
    tasks in Dask's order anyway), so the loop vectorises: 7.6 of the
    kernel's 19.8 ns per element (4 bf16 steps) were this loop written with
    branches and counters in registers, 2.4 now. An element counted nowhere
    (static, a non-finite R² or null R²) gets category 0, which the caller
    clears; the scatter into the histogram is the caller's (it cannot vectorise).
    """
    n = ir.shape[0]
    n_static = n_nonfinite = n_moving = n_change = 0
    sm, sp, nsm, nsp = 0.0, 0.0, 0.0, 0.0  # R² / null R² sums: moving, paper
    am0 = am1 = ap0 = ap1 = bm0 = bm1 = bp0 = bp1 = 0  # counts above t0 / t1
    nb = np.int32(n_bins)
    last = np.int32(n_bins - 1)
    for i in range(n):
        q = sdd[i]
        static = q == 0.0  # exact: d(first step) = 0; a sum of squares is 0 only if all are
        n_static += static
        n_nonfinite += not ((q - q) == 0.0)  # a NaN or inf value: neither static nor binned
        r2 = r2r[i]
        ok = (not static) & ((r2 - r2) == 0.0)
        n_moving += ok
        moved = ok & ((mx[i] - mn[i]) > min_change)
        n_change += moved
        paper = moved & (has4[i] != 0)
        cat = np.int32(ok) * (np.int32(1) + np.int32(paper))
        r2s = r2 if ok else 0.0
        ir[i] = cat * nb + min(np.int32(r2s * n_bins), last)  # truncation = floor (R² >= 0)
        pf = 1.0 if paper else 0.0
        sm += r2s
        sp += r2s * pf
        g0 = r2s > t0
        g1 = r2s > t1
        am0 += g0
        am1 += g1
        ap0 += g0 & paper
        ap1 += g1 & paper
        v = nr2r[i]
        okn = ok & (v == v)  # a NaN null R² (rounding, Syy <= 0) counts nowhere
        vs = v if okn else 0.0
        inr[i] = cat * np.int32(okn) * nb + min(np.int32(vs * n_bins), last)
        nsm += vs
        nsp += vs * pf
        g0 = vs > t0
        g1 = vs > t1
        bm0 += g0
        bm1 += g1
        bp0 += g0 & paper
        bp1 += g1 & paper
    return (n_static, n_nonfinite, n_moving, n_change, sm, sp, nsm, nsp, am0, am1, ap0, ap1,
            bm0, bm1, bp0, bp1)


@njit(**_OPTS)
def _finish(S, U, lo, hi, nf, sx, sxx, x0, n_bins, min_change, thr,
            slope, icpt, r2o, nr2o, hist, sums, above, counts):
    """Results of elements [lo, hi) (columns 0.. of S, U) into the outputs, counts added.

    Three loops: the arithmetic (branch-free, so it vectorises: it holds the
    divisions) writes R² and null R² into rows R2, NR2 of S as well; then
    ``_count`` (vectorised too) the counts and each element's histogram index;
    then the scatter into the histograms.
    """
    n = hi - lo
    sd, sxd, sdd, se, sxe, see = S[0, :n], S[1, :n], S[2, :n], S[3, :n], S[4, :n], S[5, :n]
    w0, mn, mx, r2r, nr2r = S[8, :n], S[9, :n], S[10, :n], S[R2, :n], S[NR2, :n]
    slope_t, icpt_t, r2_t, nr2_t = slope[lo:hi], icpt[lo:hi], r2o[lo:hi], nr2o[lo:hi]
    for i in range(n):
        static = sdd[i] == 0.0  # exact: d(first step) = 0; a sum of squares is 0 only if all are
        sxy = sxd[i] - (sx * sd[i]) / nf  # centred sums
        syy = sdd[i] - (sd[i] * sd[i]) / nf
        syy = 0.0 if static else syy
        sl = sxy / sxx
        ic = w0[i] + (sd[i] - sl * sx) / nf  # the delta at x = 0, then back to step 0
        ic = ic - sl * x0
        r2 = _r2(sxy, sxx, syy)
        sxy_n = sxe[i] - (sx * se[i]) / nf
        syy_n = see[i] - (se[i] * se[i]) / nf
        syy_n = 0.0 if static else syy_n
        nr2 = _r2(sxy_n, sxx, syy_n)
        slope_t[i] = sl  # through slices of the tile: indexed at lo + i, LLVM scattered
        icpt_t[i] = ic
        r2_t[i] = r2
        nr2_t[i] = nr2
        r2r[i] = r2
        nr2r[i] = nr2
    has4 = U[5].view(np.uint32)[:n]  # as ``_accumulate_keys`` writes it
    ir = U[3].view(np.int32)[:n]  # rows 3 and 4 (a row's keys and signs) are free here
    inr = U[4].view(np.int32)[:n]
    (n_static, n_nonfinite, n_moving, n_change, sm, sp, nsm, nsp, am0, am1, ap0, ap1,
     bm0, bm1, bp0, bp1) = _count(sdd, r2r, nr2r, mn, mx, has4, n_bins, min_change, thr[0],
                                  thr[1], ir, inr)
    h0 = hist[0].reshape(-1)
    h1 = hist[1].reshape(-1)
    for i in range(n):
        h0[ir[i]] += 1
        h1[inr[i]] += 1
    hist[0, 0, :] = 0  # category 0 took the elements counted nowhere
    hist[1, 0, :] = 0
    counts[0] += n_static
    counts[1] += n_nonfinite
    counts[2] += n_moving
    counts[3] += n_change
    sums[0, 0] += sm
    sums[0, 1] += sp
    sums[1, 0] += nsm
    sums[1, 1] += nsp
    above[0, 0, 0] += am0
    above[0, 0, 1] += am1
    above[0, 1, 0] += ap0
    above[0, 1, 1] += ap1
    above[1, 0, 0] += bm0
    above[1, 0, 1] += bm1
    above[1, 1, 0] += bp0
    above[1, 1, 1] += bp1


PAD = 40  # extra columns per scratch row (see ``_accumulate``)


@njit(**_OPTS)
def _scratch(t):
    return (np.empty((N_F + 3, t + PAD), np.float64), np.empty((N_B + 3, t + PAD), np.uint64))


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
    """Accumulators of a block whose steps arrive in several reads (RAM only, 120 B/element)."""

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
