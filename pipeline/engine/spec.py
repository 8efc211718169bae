"""What every backend of the fused fit kernel shares: step axis, codecs, outputs, counts.

Pure arithmetic and small dataclasses, no I/O, no Dask. A backend
(``pipeline.engine.numba_backend``, ``pipeline.engine.torch_backend``) turns
``(k steps, m elements)`` of raw bit patterns into per-element float32
results and the additive ``BlockCounts`` of one block, with the numerics of
the numpy reference in ``tests/reference_fit.py`` (deltas from the first
step, float64 sums added in step order, the sign-flipped null walk, the
authors' filters).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline import dtypes

MIN_CHANGE = 1e-4  # authors' filter: max - min over steps must exceed this
MIN_DISTINCT = 4  # authors' filter: at least this many distinct values
THRESHOLDS = (0.7, 0.9)  # exact counts of R² above these, per selection
RESULTS = ("slope", "intercept", "r2", "null_r2")  # the per-element float32 outputs
SELECTIONS = {"moving": False, "paper": True}  # name -> the authors' filters applied

# how a backend turns raw bits into values (all widen to float64 exactly)
BF16, F16, F32, WIDE = 0, 1, 2, 3


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


@dataclass(frozen=True)
class Codec:
    """How the raw bits of one logical dtype are decoded, compared and folded.

    ``kind``: BF16 (uint16 << 16 is the float32), F16 (uint16 through a 64 Ki
    float32 table), F32 (uint32 reinterpreted), WIDE (anything else: the
    caller widens values to float64 and passes uint64 keys). ``negz`` is the
    bit pattern of -0.0, folded into +0.0 so values, not bits, are counted
    (0 for integers and bool: folding 0 into 0 changes nothing).
    """

    kind: int
    bits: np.dtype
    negz: int


def codec_for(dtype: np.dtype | str) -> Codec:
    """The codec of a logical numpy dtype (bfloat16 from ml_dtypes included)."""
    dt = np.dtype(dtype)
    negz = dtypes.neg_zero_bits(dt) or 0
    if dt == dtypes.BF16:
        return Codec(BF16, dtypes.bits_dtype(dt), negz)
    if dt == np.dtype(np.float16):
        return Codec(F16, dtypes.bits_dtype(dt), negz)
    if dt == np.dtype(np.float32):
        return Codec(F32, dtypes.bits_dtype(dt), negz)
    return Codec(WIDE, np.dtype(np.uint64), negz)


F16_TABLE = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)


def kernel_inputs(values: np.ndarray, codec: Codec) -> tuple[np.ndarray, np.ndarray]:
    """(bits, wide) as a kernel takes them from a (k, m) block in the logical dtype.

    bf16/fp16/fp32: the raw bits (a view, no copy) and an empty wide array;
    other dtypes: uint64 keys of their bits and the values widened to float64
    (exact for all but 64-bit integers beyond 2**53).
    """
    k = values.shape[0]
    if codec.kind != WIDE:
        return values.view(codec.bits).reshape(k, -1), np.empty((0, 0), np.float64)
    raw = values.view(dtypes.bits_dtype(values.dtype)).reshape(k, -1).astype(np.uint64)
    return raw, values.reshape(k, -1).astype(np.float64)


@dataclass
class BlockCounts:
    """The additive summary of one block, as plain arrays (backends fill them in place).

    ``hist[r, c, b]``: elements of result r (0: R², 1: null R²) in category c
    (1: moving only, 2: moving and the authors' filters; 0 unused) and bin b;
    ``sums[r, s]`` and ``above[r, s, t]``: sum of R² and counts above
    ``THRESHOLDS[t]`` for selection s (0: moving, 1: paper); ``counts``:
    static, nonfinite, moving, moving and max-min > MIN_CHANGE.
    """

    hist: np.ndarray
    sums: np.ndarray
    above: np.ndarray
    counts: np.ndarray

    @staticmethod
    def zeros(n_bins: int) -> BlockCounts:
        return BlockCounts(np.zeros((2, 3, n_bins), np.int64), np.zeros((2, 2), np.float64),
                           np.zeros((2, 2, len(THRESHOLDS)), np.int64), np.zeros(4, np.int64))

    def add(self, o: BlockCounts) -> None:
        self.hist += o.hist
        self.sums += o.sums
        self.above += o.above
        self.counts += o.counts

    @property
    def n_static(self) -> int:
        return int(self.counts[0])

    @property
    def n_nonfinite(self) -> int:
        return int(self.counts[1])

    def selection(self, name: str) -> dict:
        """One selection's histograms and counts (the fields of ``graph.SelectionSummary``)."""
        paper = SELECTIONS[name]
        s = int(paper)
        cats = slice(2, 3) if paper else slice(1, 3)
        n_moving, n_change = int(self.counts[2]), int(self.counts[3])
        n_paper = int(self.hist[0, 2].sum())
        return {"hist": self.hist[0, cats].sum(0), "null_hist": self.hist[1, cats].sum(0),
                "n_selected": n_paper if paper else n_moving,
                "removed_min_change": n_moving - n_change if paper else 0,
                "removed_distinct": n_change - n_paper if paper else 0,
                "r2_sum": float(self.sums[0, s]), "null_sum": float(self.sums[1, s]),
                "n_above": tuple(int(v) for v in self.above[0, s]),
                "null_above": tuple(int(v) for v in self.above[1, s])}


def check_block(bits: np.ndarray, xs: np.ndarray, words: np.ndarray, n: int) -> None:
    """Shapes a backend relies on (internal callers only: a mismatch is a bug, not user input)."""
    k = bits.shape[0]
    if xs.shape != (k,) or words.shape[0] != k:
        raise ValueError(f"{k} steps of bits but {xs.shape} xs and {words.shape[0]} sign rows")
    if n < 2:
        raise ValueError("a fit needs at least 2 steps")
