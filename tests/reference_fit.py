"""The reference fit for tests: the tiled numpy implementation the fused kernel replaced.

Frozen copy of ``pipeline/fit/kernels.py`` as it was before the fused kernel
(``pipeline.engine``), which has since replaced it everywhere (export's line
fits included), so the numpy implementation lives only here. The engine's
results must equal it within float64 rounding (in fact bitwise, the
arithmetic is the same operation for operation). It shares no code with the
engine.

Model, for every scalar weight w at steps s_1 < ... < s_N of a window:
``w(s) = intercept + slope * s`` by least squares. Numerics:

* x = s - s_1 and d = w - w(s_1) (deltas from the first step of the window),
  both in float64, so the sums never see the large raw weight values; the
  slope is per training step and the intercept is at step 0, as np.polyfit.
* Per element we keep the sufficient statistics Σd, Σxd, Σd² (n, Σx, Σx² are
  shared by all elements), and finish with centred sums
  ``Sxy = Σxd - Σx Σd / n`` etc. R² = Sxy² / (Sxx Syy).
* An element is *static* when it never moves. Because d(s_1) = 0, "all values
  equal" is exactly "Σd² == 0" (a sum of squares of float64 numbers is 0 only
  when every term is), so the test is exact, with no tolerance.
* Null baseline: the same element's increments with random signs,
  e_k = e_{k-1} ± (d_k - d_{k-1}), a sign-flipped random walk with exactly the
  same step sizes. Its own Σe, Σxe, Σe² are accumulated in the same pass, so
  the null updates incrementally too. Signs come from a counter-based
  generator (Philox) keyed by (seed, tensor, step) and counted by the flat
  element index: reproducible, independent of block layout and of the order
  in which steps arrive.
* Authors' filters (``--paper-filters``): max - min over steps > 1e-4 (from the
  running min and max value, kept as raw bits of the logical dtype: exact, and 2
  bytes an element each for bf16 where float64 took 8), and at least 4 distinct
  values. Distinct values are counted exactly but capped: besides the first value
  we remember two *other* bit patterns seen (v1, v2) and a flag set when a fourth
  distinct pattern appears (-0.0 is folded into +0.0, so values, not bits, count).
  That is exact for the threshold and costs 2 raw values + 1 flag per element,
  where a change counter would over-count values that come back.
* NaN/inf weights (stored bit-exact) make Σd² non-finite: such elements are
  counted as ``nonfinite``, neither static nor binned.

Speed: ``update`` applies all new steps of a block at once, tile by tile, on
(steps x tile) slabs, so each numpy call does the work of many steps. The
float64 sums still add one step after the other in step order (see
``update``), so a fit updated one appended step at a time is bitwise
identical to a fit from scratch, whatever the blocking. Large buffers come
from a ``Workspace`` that outlives a block (fresh large arrays page-fault).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, fields

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
import numpy as np

from pipeline.workspace import Workspace

MIN_CHANGE = 1e-4  # authors' filter: max - min over steps must exceed this
MIN_DISTINCT = 4  # authors' filter: at least this many distinct values
TILE = 1 << 16  # values per (k steps x elements) tile: its float64 slabs stay in cache
TILE_MIN = 1024  # elements per tile at least, however many steps
MAX_STEPS = 64  # steps per slab; more are applied in groups of this many
SIGN_WORD_BITS = 64
SIGN_BLOCK = 256  # elements per Philox counter increment (4 words of 64 bits)
SIGN_CHUNK = 256  # Philox blocks unpacked at a time (64 Ki elements)


def bits_dtype(dtype: np.dtype) -> np.dtype:
    """Unsigned integer dtype of the same width, used to compare values bit-exactly."""
    return np.dtype(f"u{np.dtype(dtype).itemsize}")


def _neg_zero(dtype: np.dtype) -> int | None:
    """Bit pattern of -0.0 for float dtypes (bf16 included), None for integers and bool."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f" or (dtype.kind == "V" and dtype.itemsize <= 2):  # ml_dtypes floats
        return 1 << (8 * dtype.itemsize - 1)
    return None


@dataclass(frozen=True)
class XStats:
    """The x-side sums shared by every element of a fit (x = step - first step)."""

    n: int
    sx: float
    sxx: float
    x0: int  # first step of the window (x = step - x0)

    @staticmethod
    def from_steps(steps: Sequence[int]) -> XStats:
        """Accumulate in step order, exactly as the element sums are, so updates match."""
        x0 = int(steps[0])
        sx = 0.0
        sxx = 0.0
        for s in steps:
            x = float(s - x0)
            sx += x
            sxx += x * x
        return XStats(len(steps), sx, sxx, x0)

    @property
    def centred_sxx(self) -> float:
        return self.sxx - self.sx * self.sx / self.n


def _get(ws: Workspace | None, role: str, shape: tuple[int, ...],
         dtype: np.dtype | type) -> np.ndarray:
    return np.empty(shape, dtype) if ws is None else ws.get(role, shape, dtype)


F64_FIELDS = ("sd", "sxd", "sdd", "se", "sxe", "see", "e")
RAW_FIELDS = ("w0", "wlast", "v1", "v2", "wmin", "wmax")
BOOL_FIELDS = ("has4",)
BITS_FIELDS = RAW_FIELDS + BOOL_FIELDS


def _row(table: str, i: int) -> property:
    return property(lambda self: getattr(self, table)[i], doc=f"row {i} of ``{table}``")


@dataclass
class FitState:
    """Per-element running state of one block of elements: two 2-D arrays, stored as they are.

    ``f64`` (7, m) holds the float64 sums, one row per ``F64_FIELDS``; ``bits``
    (7, m) holds raw bit patterns of the logical dtype (bf16 as uint16), one
    row per ``RAW_FIELDS``, then ``has4`` as 0/1. The state stores and reloads
    bit-exactly, and a piece is written without restacking. Each field is a
    row view (``state.sd``, ``state.w0``, ...).
    """

    f64: np.ndarray
    bits: np.ndarray

    sd = _row("f64", 0)
    sxd = _row("f64", 1)
    sdd = _row("f64", 2)
    se = _row("f64", 3)
    sxe = _row("f64", 4)
    see = _row("f64", 5)
    e = _row("f64", 6)  # current value of the sign-flipped path
    w0 = _row("bits", 0)  # raw bits of the first value
    wlast = _row("bits", 1)  # raw bits of the latest value
    v1 = _row("bits", 2)  # raw bits of the 2nd distinct value (== w0 while unseen)
    v2 = _row("bits", 3)  # raw bits of the 3rd distinct value (== w0 while unseen)
    wmin = _row("bits", 4)  # raw bits of the smallest value (-0.0 folded into +0.0)
    wmax = _row("bits", 5)  # raw bits of the largest value (-0.0 folded into +0.0)
    has4 = _row("bits", 6)  # 1 once a 4th distinct value was seen, else 0

    def __post_init__(self) -> None:
        self.f64 = np.ascontiguousarray(self.f64, np.float64).reshape(len(F64_FIELDS), -1)
        self.bits = np.ascontiguousarray(self.bits).reshape(len(BITS_FIELDS), -1)
        if self.f64.shape[1] != self.bits.shape[1]:
            raise ValueError("f64 and bits state disagree on the number of elements")

    @property
    def size(self) -> int:
        return int(self.f64.shape[1])

    def arrays(self) -> dict[str, np.ndarray]:
        return {f: getattr(self, f) for f in FitState.field_names()}

    @staticmethod
    def field_names() -> tuple[str, ...]:
        return F64_FIELDS + BITS_FIELDS

    @staticmethod
    def from_arrays(arrays: dict[str, np.ndarray]) -> FitState:
        raw = [np.asarray(arrays[f]).reshape(-1) for f in RAW_FIELDS]
        bits = np.stack([*raw, np.asarray(arrays["has4"]).reshape(-1).astype(raw[0].dtype)])
        return FitState(np.stack([np.asarray(arrays[f], np.float64).reshape(-1)
                                  for f in F64_FIELDS]), bits)


def state_nbytes_per_element(dtype: np.dtype) -> int:
    """Bytes of state kept per element for a logical dtype (for planning and docs)."""
    return len(BITS_FIELDS) * np.dtype(dtype).itemsize + len(F64_FIELDS) * 8


def init_state(w: np.ndarray, ws: Workspace | None = None) -> FitState:
    """State after the first step of the window: d = 0, e = 0, nothing seen but w0."""
    w = np.ascontiguousarray(w).reshape(-1)
    m = w.shape[0]
    bits = _get(ws, "state_bits", (len(BITS_FIELDS), m), bits_dtype(w.dtype))
    np.copyto(bits[0], w.view(bits.dtype))
    negz = _neg_zero(w.dtype)
    if negz is not None:
        np.copyto(bits[0], 0, where=bits[0] == negz)
    bits[1: len(RAW_FIELDS)] = bits[0]
    bits[len(RAW_FIELDS)] = 0
    f64 = _get(ws, "state_f64", (len(F64_FIELDS), m), np.float64)
    f64.fill(0.0)
    return FitState(f64, bits)


def sign_key(seed: int, tensor: str, step: int) -> tuple[int, int]:
    """128-bit Philox key for one (seed, tensor, step): stable across processes and runs."""
    # surrogatepass: a name that is not valid UTF-8 (a lone surrogate) still gets a key,
    # and every valid name keeps the bytes (and so the signs) it always had
    key = f"{seed}\x00{tensor}\x00{step}".encode("utf-8", "surrogatepass")
    h = hashlib.blake2b(key, digest_size=16).digest()
    return int.from_bytes(h[:8], "little"), int.from_bytes(h[8:], "little")


def flip_mask(seed: int, tensor: str, step: int, start: int, stop: int,
              out: np.ndarray | None = None) -> np.ndarray:
    """Booleans for flat elements [start, stop): True where the null increment is negated.

    Counter-based: element i uses bit i of the Philox stream for this key, so
    any block of the tensor gets the same signs as the whole tensor would.
    ``out`` (bool, stop - start) receives the mask instead of a new array.
    """
    out = np.empty(stop - start, bool) if out is None else out
    first_block = start // SIGN_BLOCK
    skip = start - first_block * SIGN_BLOCK
    # Philox with counter c yields block c of the stream that starts at counter 0
    gen = np.random.Philox(key=list(sign_key(seed, tensor, step)), counter=[first_block, 0, 0, 0])
    done = 0
    while done < out.shape[0]:  # a bounded chunk at a time: no large temporaries
        take = min(out.shape[0] - done, SIGN_CHUNK * SIGN_BLOCK - skip)
        n_blocks = -(-(skip + take) // SIGN_BLOCK)
        words = gen.random_raw(4 * n_blocks)
        bits = np.unpackbits(words.astype("<u8", copy=False).view(np.uint8), bitorder="little")
        np.copyto(out[done: done + take], bits[skip: skip + take].view(bool))
        done += take
        skip = 0
    return out


def flip_masks(seed: int, tensor: str, steps: Sequence[int], start: int, stop: int,
               ws: Workspace | None = None) -> np.ndarray:
    """``flip_mask`` of several steps as one (len(steps), stop - start) bool array."""
    out = _get(ws, "flips", (len(steps), stop - start), bool)
    for j, s in enumerate(steps):
        flip_mask(seed, tensor, s, start, stop, out=out[j])
    return out


def tile_width(k: int, m: int) -> int:
    """Elements per tile when ``k`` steps are applied at once: about ``TILE`` values per tile."""
    return max(1, min(m, max(TILE_MIN, TILE // max(k, 1))))


class _Scratch:
    """(k + 1, tile) buffers reused by every tile, so the tile loop allocates nothing."""

    def __init__(self, k: int, n: int, bits: np.dtype, ws: Workspace | None) -> None:
        self.k, self.n = k, n
        kn, k1n = k * n, (k + 1) * n
        self.d = _get(ws, "u_d", (k1n,), np.float64)  # row 0: a running sum, then d_j
        self.e = _get(ws, "u_e", (k1n,), np.float64)  # row 0: a running sum, then e_j
        self.p = _get(ws, "u_p", (k1n,), np.float64)  # row 0: a running sum, then products
        self.b = _get(ws, "u_b", (kn,), bits)  # normalised bit patterns
        self.w = _get(ws, "u_w", (kn,), bits)
        self.new = _get(ws, "u_new", (kn,), bool)
        self.c = _get(ws, "u_c", (kn,), bool)
        self.flip = _get(ws, "u_flip", (kn,), np.uint8)
        self.w0f = _get(ws, "u_w0f", (n,), np.float64)
        self.r0 = _get(ws, "u_r0", (n,), np.float64)
        self.r1 = _get(ws, "u_r1", (n,), np.float64)
        self.hi = _get(ws, "u_hi", (n,), bits)
        self.lo = _get(ws, "u_lo", (n,), bits)
        self.m = [_get(ws, f"u_m{i}", (n,), bool) for i in range(4)]

    def view(self, name: str, n: int, rows: int | None = None) -> np.ndarray:
        rows = self.k if rows is None else rows
        return getattr(self, name)[: rows * n].reshape(rows, n)


def update(state: FitState, values: np.ndarray, xs: Sequence[float],
           flips: np.ndarray | Sequence[np.ndarray], ws: Workspace | None = None) -> None:
    """Add steps to ``state`` in place: ``values`` is (k, m) in the logical dtype.

    ``xs[j]`` is step_j - first step; ``flips[j]`` the null-path signs for step j
    (see ``flip_mask``; a (k, m) bool array or k arrays). Steps must come in
    increasing order after the ones already in ``state``. All k steps of a
    tile of elements are applied at once, as a (k, tile) slab, so each numpy
    call does k steps of work. The float64 sums still add the steps into the
    state one after the other: each sum is a reduction over the step axis of
    a slab whose row 0 holds the state's running sum, and numpy reduces the
    leading axis of a C-ordered 2-D array row by row. A fit updated one
    appended step at a time is therefore bitwise identical to a fit from
    scratch, whatever the blocking (the tests check it).
    """
    values = np.asarray(values)
    k, m = values.shape[0], state.size
    if k == 0:
        return
    values = values.reshape(k, m)
    if len(xs) != k or len(flips) != k:
        raise ValueError(f"{k} steps of values but {len(xs)} xs and {len(flips)} flip masks")
    if k > MAX_STEPS:  # bounded slabs (small tensors can come with thousands of steps)
        for i in range(0, k, MAX_STEPS):
            update(state, values[i:i + MAX_STEPS], xs[i:i + MAX_STEPS],
                   flips[i:i + MAX_STEPS], ws)
        return
    dtype = values.dtype
    bdt = bits_dtype(dtype)
    x = np.asarray(xs, np.float64).reshape(k, 1)
    if not isinstance(flips, np.ndarray):
        flips = np.stack([np.asarray(f, bool).reshape(m) for f in flips])
    flips = flips.reshape(k, m)
    nz = _neg_zero(dtype)
    tile = tile_width(k, m)
    s = _Scratch(k, tile, bdt, ws)
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf weights are counted, not fitted
        for lo in range(0, m, tile):
            hi = min(lo + tile, m)
            _update_tile(state, lo, hi, values[:, lo:hi], x, flips[:, lo:hi], s, nz)
    np.copyto(state.wlast, values[k - 1].view(bdt))


def _sum_rows(slab: np.ndarray, acc: np.ndarray) -> None:
    """``acc`` + slab[1] + slab[2] + ..., added in that order (slab[0] is overwritten).

    With at least 2 columns numpy reduces axis 0 row by row; a single column
    is a contiguous reduction (pairwise), so it is added by hand.
    """
    if slab.shape[1] < 2:
        for j in range(1, slab.shape[0]):
            acc += slab[j]
        return
    np.copyto(slab[0], acc)
    np.add.reduce(slab, axis=0, out=acc)


def _update_tile(state: FitState, lo: int, hi: int, vals: np.ndarray, x: np.ndarray,
                 flips: np.ndarray, s: _Scratch, negz: int | None) -> None:
    """``update`` on elements [lo, hi): ``vals`` is the (k, hi - lo) slab in the logical dtype."""
    n, k = hi - lo, vals.shape[0]
    dtype = vals.dtype
    d1, e1, p1 = (s.view(b, n, k + 1) for b in ("d", "e", "p"))  # row 0 + k steps
    d, ee, p = d1[1:], e1[1:], p1[1:]
    w0f = s.w0f[:n]
    sd, sxd, sdd, se, sxe, see, e = state.f64[:, lo:hi]
    # the fit: deltas from the first value, float64 (every logical dtype widens exactly)
    np.copyto(w0f, state.w0[lo:hi].view(dtype), casting="unsafe")
    np.copyto(d1[0], state.wlast[lo:hi].view(dtype), casting="unsafe")
    np.copyto(d, vals, casting="unsafe")
    _update_range(state, lo, hi, vals, d, s)
    np.subtract(d1, w0f, out=d1)  # row 0: d of the last step already in the state
    # the null: same increments d_j - d_{j-1}, random signs, e_j = e_{j-1} + (+-increment)
    np.subtract(d1[1:], d1[:-1], out=ee)
    flip = s.view("flip", n)
    np.left_shift(flips.view(np.uint8), 7, out=flip)
    top = ee.view(np.uint8).reshape(k, n, 8)[:, :, 7]  # the IEEE sign bit (little-endian)
    np.bitwise_xor(top, flip, out=top)
    np.copyto(e1[0], e)
    for j in range(1, k + 1):
        np.add(e1[j - 1], e1[j], out=e1[j])
    np.copyto(e, e1[k])
    # sufficient statistics, each added into the state step after step
    for slab, rows, s1, sx1, s2 in ((d1, d, sd, sxd, sdd), (e1, ee, se, sxe, see)):
        np.multiply(rows, x, out=p)
        _sum_rows(p1, sx1)
        np.multiply(rows, rows, out=p)
        _sum_rows(p1, s2)
        _sum_rows(slab, s1)  # last: overwrites row 0
    _update_distinct(state, lo, hi, vals, s, negz)


def _exact_f64(dtype: np.dtype) -> bool:
    """Whether every value of ``dtype`` widens to float64 exactly (all but 64-bit integers)."""
    return not (dtype.kind in "iu" and dtype.itemsize > 4)


def _update_range(state: FitState, lo: int, hi: int, vals: np.ndarray, wide: np.ndarray,
                  s: _Scratch) -> None:
    """Running min and max value (raw bits of the logical dtype) over the k steps of a slab.

    ``wide`` is ``vals`` widened to float64 (exact for every dtype but 64-bit
    integers, which take the min and max as they are). -0.0 is folded into
    +0.0 so the bits stored do not depend on the order steps arrive in.
    """
    dtype = vals.dtype
    for row, red in ((state.wmin[lo:hi], np.minimum), (state.wmax[lo:hi], np.maximum)):
        cur = row.view(dtype)
        if not _exact_f64(dtype):
            red(cur, red.reduce(vals, axis=0), out=cur)
            continue
        a, b = s.r0[: hi - lo], s.r1[: hi - lo]
        red.reduce(wide, axis=0, out=a)
        np.copyto(b, cur, casting="unsafe")
        red(b, a, out=a)
        if dtype.kind not in "iub":
            a += 0.0  # -0.0 + 0.0 == +0.0
        np.copyto(cur, a, casting="unsafe")  # exact: a is one of the values


def _update_distinct(state: FitState, lo: int, hi: int, vals: np.ndarray, s: _Scratch,
                     negz: int | None) -> None:
    """Distinct values, capped at 4 (bit patterns, -0.0 folded into +0.0), for k steps at once.

    Values not yet in {w0, v1, v2} are "new". Which new values fill the empty
    slots does not matter for the count, only that they are distinct: the
    largest and the smallest new bit pattern are two distinct values when
    they differ, and a new value equal to neither is a third. So per element
    (slots fill in order, so v2 is empty whenever v1 is):

    * both slots empty: v1 = largest, v2 = smallest if different, a 4th if a third exists;
    * only v2 empty: v2 = largest, a 4th if the smallest differs;
    * both full: a 4th if anything is new.
    """
    n = hi - lo
    b, w, new, c = s.view("b", n), s.view("w", n), s.view("new", n), s.view("c", n)
    w0b, v1, v2, has4 = state.w0[lo:hi], state.v1[lo:hi], state.v2[lo:hi], state.has4[lo:hi]
    np.copyto(b, vals.view(b.dtype))
    if negz is not None:
        np.equal(b, b.dtype.type(negz), out=c)
        np.copyto(b, 0, where=c)
    np.not_equal(b, w0b, out=new)
    np.not_equal(b, v1, out=c)
    np.logical_and(new, c, out=new)
    np.not_equal(b, v2, out=c)
    np.logical_and(new, c, out=new)
    any_new, two, empty1, empty2 = (a[:n] for a in s.m)
    np.logical_or.reduce(new, axis=0, out=any_new)
    if not any_new.any():
        return
    # largest new pattern: max of b * new (0 where not new; all patterns are >= 0)
    big, small = s.hi[:n], s.lo[:n]
    np.multiply(b, new, out=w)
    np.maximum.reduce(w, axis=0, out=big)
    # smallest new pattern: ~max(~b * new)
    np.invert(b, out=w)
    np.multiply(w, new, out=w)
    np.maximum.reduce(w, axis=0, out=small)
    np.invert(small, out=small)
    np.not_equal(big, small, out=two)
    np.logical_and(two, any_new, out=two)
    # a third new value: new and equal to neither
    np.not_equal(b, big, out=c)
    np.logical_and(new, c, out=new)
    np.not_equal(b, small, out=c)
    np.logical_and(new, c, out=new)
    three = np.logical_or.reduce(new, axis=0)
    np.equal(v1, w0b, out=empty1)
    np.equal(v2, w0b, out=empty2)
    # the 4th-value flag, from the slots as they were before this update
    four = np.where(empty1, three, np.where(empty2, two, any_new))
    np.logical_or(has4, four, out=has4, casting="unsafe")
    # fill the slots
    np.copyto(v2, small, where=empty1 & two)
    np.copyto(v2, big, where=~empty1 & empty2 & any_new)
    np.copyto(v1, big, where=empty1 & any_new)


@dataclass(frozen=True)
class Fit:
    """Per-element results of one block (float64 until written)."""

    slope: np.ndarray
    intercept: np.ndarray
    r2: np.ndarray  # NaN where static
    null_r2: np.ndarray  # NaN where static
    static: np.ndarray  # bool: never moved in the window
    moved_enough: np.ndarray  # bool: max - min > MIN_CHANGE
    distinct4: np.ndarray  # bool: at least MIN_DISTINCT distinct values
    nonfinite: np.ndarray  # bool: a NaN or inf value somewhere in the window


def r_squared(sxy: np.ndarray, sxx: float, syy: np.ndarray, out: np.ndarray | None = None,
              tmp: np.ndarray | None = None) -> np.ndarray:
    """THE coefficient of determination: Sxy² / (Sxx Syy), NaN where Syy == 0, clipped to [0,1].

    Clipping only removes float64 rounding (|r| can exceed 1 by ~1e-16).
    ``out`` and ``tmp`` (float64, the shape of ``sxy``) avoid allocations.
    """
    r2 = np.multiply(sxy, sxy, out=out)
    den = np.multiply(sxx, syy, out=tmp)
    with np.errstate(divide="ignore", invalid="ignore"):
        np.divide(r2, den, out=r2)
    np.clip(r2, 0.0, 1.0, out=r2)
    np.copyto(r2, np.nan, where=~(syy > 0))
    return r2


FINALIZE_TILE = 8192  # elements per finalize tile: its temporaries stay small and in cache


def finalize(state: FitState, xst: XStats, dtype: np.dtype, ws: Workspace | None = None) -> Fit:
    """Slope, intercept, R² (real and null) and filter masks from the sufficient statistics."""
    if xst.n < 2:
        raise ValueError("a fit needs at least 2 steps")
    m = state.size
    out = Fit(*(_get(ws, f"fit_{i}", (m,), np.float64) for i in range(4)),
              *(_get(ws, f"fit_{i}", (m,), bool) for i in range(4, 8)))
    tmp = _get(ws, "fin_tmp", (3, min(m, FINALIZE_TILE)), np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        for lo in range(0, m, FINALIZE_TILE):
            hi = min(lo + FINALIZE_TILE, m)
            _finalize_tile(state, xst, np.dtype(dtype), lo, hi, Fit(
                *(getattr(out, f.name)[lo:hi] for f in fields(Fit))), tmp[:, : hi - lo])
    return out


def _finalize_tile(state: FitState, xst: XStats, dtype: np.dtype, lo: int, hi: int, out: Fit,
                   tmp: np.ndarray) -> None:
    """``finalize`` of elements [lo, hi) into ``out`` (views of that size); tmp is (3, hi - lo)."""
    n = float(xst.n)
    sxx = xst.centred_sxx
    sd, sxd, sdd, se, sxe, see, _ = state.f64[:, lo:hi]
    t, sxy, syy = tmp
    static = np.equal(sdd, 0.0, out=out.static)
    np.multiply(xst.sx, sd, out=t)
    t /= n
    np.subtract(sxd, t, out=sxy)  # Sxy = Σxd - Σx Σd / n
    np.multiply(sd, sd, out=t)
    t /= n
    np.subtract(sdd, t, out=syy)  # Syy = Σd² - (Σd)² / n
    np.copyto(syy, 0.0, where=static)
    slope = np.divide(sxy, sxx, out=out.slope)
    # intercept = w0 + a - slope * x0, with a = (Σd - slope Σx) / n the delta at x = 0
    np.multiply(slope, xst.sx, out=t)
    np.subtract(sd, t, out=t)
    t /= n
    icpt = out.intercept
    np.copyto(icpt, state.w0[lo:hi].view(dtype), casting="unsafe")
    icpt += t
    np.multiply(slope, float(xst.x0), out=t)
    icpt -= t
    r_squared(sxy, sxx, syy, out=out.r2, tmp=t)
    # the null path: the same sums of e
    np.multiply(xst.sx, se, out=t)
    t /= n
    np.subtract(sxe, t, out=sxy)
    np.multiply(se, se, out=t)
    t /= n
    np.subtract(see, t, out=syy)
    np.copyto(syy, 0.0, where=static)
    r_squared(sxy, sxx, syy, out=out.null_r2, tmp=t)
    np.not_equal(state.has4[lo:hi], 0, out=out.distinct4)  # w0, v1, v2 and a 4th were seen
    # max - min: both widen exactly (see ``_update_range``), so one rounding at most
    np.copyto(t, state.wmax[lo:hi].view(dtype), casting="unsafe")
    np.copyto(sxy, state.wmin[lo:hi].view(dtype), casting="unsafe")
    np.subtract(t, sxy, out=t)
    np.greater(t, MIN_CHANGE, out=out.moved_enough)
    np.isfinite(sdd, out=out.nonfinite)
    np.logical_not(out.nonfinite, out=out.nonfinite)


@dataclass(frozen=True)
class Selection:
    """Which elements enter the histograms of one selection, and what removed the rest."""

    mask: np.ndarray
    removed_min_change: int  # moving elements removed by the max-min filter
    removed_distinct: int  # then removed by the distinct-values filter


def select(fit: Fit, paper_filters: bool) -> Selection:
    """Moving elements (all non-static), or those passing the authors' filters in their order."""
    # NaN/inf weights (kept bit-exact by the store) give a non-finite R²: never binned, counted
    # as ``fit.nonfinite`` instead
    moving = ~fit.static & np.isfinite(fit.r2)
    if not paper_filters:
        return Selection(moving, 0, 0)
    after_change = moving & fit.moved_enough
    after_distinct = after_change & fit.distinct4
    return Selection(after_distinct, int(moving.sum() - after_change.sum()),
                     int(after_change.sum() - after_distinct.sum()))


def bin_edges(n_bins: int) -> np.ndarray:
    """Fixed edges on [0, 1] so histograms add across blocks, tensors, layers and runs."""
    return np.linspace(0.0, 1.0, n_bins + 1)


def histogram(r2: np.ndarray, mask: np.ndarray, n_bins: int) -> np.ndarray:
    """Counts of ``r2[mask]`` in ``n_bins`` equal bins on [0, 1]; R² = 1 goes in the last bin."""
    v = r2[mask]
    idx = np.minimum((v * n_bins).astype(np.int64), n_bins - 1)
    return np.bincount(idx, minlength=n_bins).astype(np.int64)


THRESHOLDS = (0.7, 0.9)


@dataclass(frozen=True)
class BlockSummary:
    """Additive summary of one block for one selection: histograms and exact counts."""

    hist: np.ndarray
    null_hist: np.ndarray
    n_selected: int
    r2_sum: float
    null_sum: float
    n_above: tuple[int, ...]  # per THRESHOLDS, exact (not from bins)
    null_above: tuple[int, ...]


def summarize(fit: Fit, sel: Selection, n_bins: int) -> BlockSummary:
    """Histograms and exact sums/counts over the selected elements of one block."""
    r2, nr2 = fit.r2[sel.mask], fit.null_r2[sel.mask]
    return BlockSummary(
        hist=histogram(fit.r2, sel.mask, n_bins),
        null_hist=histogram(fit.null_r2, sel.mask, n_bins),
        n_selected=int(sel.mask.sum()),
        r2_sum=float(r2.sum()),
        null_sum=float(nr2.sum()),
        n_above=tuple(int((r2 > t).sum()) for t in THRESHOLDS),
        null_above=tuple(int((nr2 > t).sum()) for t in THRESHOLDS),
    )


SELECTIONS = {"moving": False, "paper": True}  # name -> the authors' filters applied
RESULTS = ("slope", "intercept", "r2", "null_r2")  # the per-element outputs of a fit
SUMMARY_TILE = 1 << 15  # elements per tile of ``finish``


@dataclass
class BlockTotals:
    """What ``finish`` returns for one block: exact counts plus one summary per selection."""

    n_static: int
    n_nonfinite: int
    summaries: dict[str, BlockSummary]
    removed: dict[str, tuple[int, int]]  # (by max-min, by distinct values) per selection


def finish(state: FitState, xst: XStats, dtype: np.dtype, n_bins: int,
           results: dict[str, np.ndarray], ws: Workspace | None = None) -> BlockTotals:
    """``finalize``, ``select`` and ``summarize`` of every selection in one pass of tiles.

    Writes slope, intercept, R² and null R² into ``results`` (1-D arrays of the
    block's size, e.g. float32) and returns the additive summaries, computed
    from the float64 values exactly as ``summarize(finalize(...), select(...))``
    would (histogram counts and threshold counts identical; the R² sums are
    added tile by tile). Nothing block-sized is allocated besides ``results``.
    """
    if xst.n < 2:
        raise ValueError("a fit needs at least 2 steps")
    m = state.size
    tile = max(1, min(m, SUMMARY_TILE))  # >= 1: a zero-element tensor has no tiles
    fit_bufs = Fit(*(_get(ws, f"fin_{i}", (tile,), np.float64) for i in range(4)),
                   *(_get(ws, f"fin_{i}", (tile,), bool) for i in range(4, 8)))
    tmp = _get(ws, "fin_tmp", (3, tile), np.float64)
    v = _get(ws, "fin_v", (tile,), np.float64)
    key = _get(ws, "fin_key", (tile,), np.intp)
    cat = _get(ws, "fin_cat", (tile,), np.intp)
    b1, b2 = _get(ws, "fin_b1", (tile,), bool), _get(ws, "fin_b2", (tile,), bool)
    gt = _get(ws, "fin_gt", (tile,), bool)
    hists = {r: np.zeros((3, n_bins), np.int64) for r in ("r2", "null_r2")}
    sums = {(r, sel): 0.0 for r in hists for sel in SELECTIONS}
    above = {(r, sel, t): 0 for r in hists for sel in SELECTIONS for t in THRESHOLDS}
    n_static = n_nonfinite = n_moving = n_change = 0
    dtype = np.dtype(dtype)
    for lo in range(0, m, tile):
        hi = min(lo + tile, m)
        n = hi - lo
        f = Fit(*(getattr(fit_bufs, fl.name)[:n] for fl in fields(Fit)))
        with np.errstate(invalid="ignore", over="ignore"):
            _finalize_tile(state, xst, dtype, lo, hi, f, tmp[:, :n])
        for r in RESULTS:
            np.copyto(results[r][lo:hi], getattr(f, r), casting="unsafe")
        n_static += int(np.count_nonzero(f.static))
        n_nonfinite += int(np.count_nonzero(f.nonfinite))
        # category per element: 0 not selected, 1 moving only, 2 moving and the authors' filters
        moving, paper, g = b1[:n], b2[:n], gt[:n]
        np.isfinite(f.r2, out=moving)  # NaN where static or NaN/inf weights (see ``select``)
        np.greater(moving, f.static, out=moving)  # and not static
        n_moving += int(np.count_nonzero(moving))
        np.logical_and(moving, f.moved_enough, out=paper)
        n_change += int(np.count_nonzero(paper))
        np.logical_and(paper, f.distinct4, out=paper)
        c = cat[:n]
        np.copyto(c, moving)
        np.add(c, paper, out=c)  # (bool + bool would be "or")
        np.multiply(c, n_bins, out=c)
        vr, kr = v[:n], key[:n]
        for r in hists:
            np.copyto(vr, getattr(f, r))
            np.copyto(vr, 0.0, where=~moving)  # no NaN from here on; category 0 is dropped
            np.multiply(vr, n_bins, out=kr, casting="unsafe")  # truncation = floor (R² >= 0)
            np.minimum(kr, n_bins - 1, out=kr)  # R² = 1 goes in the last bin
            kr += c
            hists[r] += np.bincount(kr, minlength=3 * n_bins).reshape(3, n_bins)
            for t in THRESHOLDS:
                np.greater(vr, t, out=g)
                above[(r, "moving", t)] += int(np.count_nonzero(g))
                np.logical_and(g, paper, out=g)
                above[(r, "paper", t)] += int(np.count_nonzero(g))
            sums[(r, "moving")] += float(vr.sum())
            np.copyto(vr, 0.0, where=~paper)
            sums[(r, "paper")] += float(vr.sum())
    n_paper = int(hists["r2"][2].sum())
    summaries, removed = {}, {}
    for name, paper_filters in SELECTIONS.items():
        cats = slice(2, 3) if paper_filters else slice(1, 3)
        summaries[name] = BlockSummary(
            hist=hists["r2"][cats].sum(0), null_hist=hists["null_r2"][cats].sum(0),
            n_selected=n_paper if paper_filters else n_moving,
            r2_sum=sums[("r2", name)], null_sum=sums[("null_r2", name)],
            n_above=tuple(above[("r2", name, t)] for t in THRESHOLDS),
            null_above=tuple(above[("null_r2", name, t)] for t in THRESHOLDS))
        removed[name] = (n_moving - n_change, n_change - n_paper) if paper_filters else (0, 0)
    return BlockTotals(n_static, n_nonfinite, summaries, removed)
