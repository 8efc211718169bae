"""The step codec's arithmetic in one pass per block, compiled by numba.

``codec.encode_into`` and ``codec.decode`` in numpy take four and five
passes over a block (subtract, shifts, xor, add, each through memory); at
the store's sizes those passes were a third of reading a block back (0.5 s
of 1.8 s for a 0.6 GB bf16 run, decompression the rest). Each kernel here
is one loop over flat views, vectorised by LLVM, with the same modulo
2**bits integer arithmetic, so the stored bytes are unchanged.
Importing this module compiles nothing; numba loads each dtype's kernel from
its on-disk cache on first use.
"""

from __future__ import annotations

import numpy as np
from numba import njit
from numpy.typing import NDArray

_OPTS = {"cache": True, "nogil": True, "error_model": "numpy"}


@njit(**_OPTS)
def _decode(stored, base, out):
    one = stored.dtype.type(1)
    for i in range(stored.shape[0]):
        s = stored[i]
        out[i] = ((s >> one) ^ (-(s & one))) + base[i]


@njit(**_OPTS)
def _encode(bits, base, out, shift):
    one = bits.dtype.type(1)
    for i in range(bits.shape[0]):
        d = bits[i] - base[i]  # modulo 2**bits
        sign = -((d >> shift) & one)  # all ones where the signed difference is negative
        out[i] = (d << one) ^ sign


@njit(**_OPTS)
def _starts(base, lo, hi, kshift, off):
    """Counting-sort offsets of segment [lo, hi) by key ``(base >> kshift) & 0xFF``."""
    cnt = np.zeros(256, np.int64)
    for i in range(lo, hi):
        cnt[(base[i] >> kshift) & 0xFF] += 1
    s = lo
    for k in range(256):
        off[k] = s
        s += cnt[k]


@njit(**_OPTS)
def _encode_sorted(bits, base, out, shift, kshift, seg):
    one = bits.dtype.type(1)
    off = np.empty(256, np.int64)
    n = bits.shape[0]
    for lo in range(0, n, seg):
        hi = min(lo + seg, n)
        _starts(base, lo, hi, kshift, off)
        for i in range(lo, hi):
            k = (base[i] >> kshift) & 0xFF
            d = bits[i] - base[i]
            out[off[k]] = (d << one) ^ (-((d >> shift) & one))
            off[k] += 1


@njit(**_OPTS)
def _decode_sorted(stored, base, out, kshift, seg):
    one = stored.dtype.type(1)
    off = np.empty(256, np.int64)
    n = stored.shape[0]
    for lo in range(0, n, seg):
        hi = min(lo + seg, n)
        _starts(base, lo, hi, kshift, off)
        for i in range(lo, hi):
            k = (base[i] >> kshift) & 0xFF
            s = stored[off[k]]
            off[k] += 1
            out[i] = ((s >> one) ^ (-(s & one))) + base[i]


def encode_sorted_into(bits: NDArray, base: NDArray, out: NDArray, seg: int) -> NDArray:
    """``codec.encode(bits, base, seg)`` in two passes per segment (C-contiguous, 16+ bits)."""
    from pipeline.store.codec import key_shift

    u = bits.dtype
    _encode_sorted(bits.reshape(-1), base.reshape(-1), out.reshape(-1),
                   u.type(8 * u.itemsize - 1), u.type(key_shift(u)), seg)
    return out


def decode_sorted_into(stored: NDArray, base: NDArray, out: NDArray, seg: int) -> NDArray:
    """``codec.decode(stored, base, seg=seg)`` into ``out`` (not ``stored``), 16+ bits."""
    from pipeline.store.codec import key_shift

    u = stored.dtype
    _decode_sorted(stored.reshape(-1), base.reshape(-1), out.reshape(-1), u.type(key_shift(u)),
                   seg)
    return out


def decode_into(stored: NDArray, base: NDArray, out: NDArray) -> NDArray:
    """``out = unzigzag(stored) + base`` (C-contiguous, same shape and unsigned dtype)."""
    _decode(stored.reshape(-1), base.reshape(-1), out.reshape(-1))
    return out


def encode_into(bits: NDArray, base: NDArray, out: NDArray) -> NDArray:
    """``out = zigzag(bits - base)`` (C-contiguous, same shape and unsigned dtype)."""
    u = bits.dtype
    _encode(bits.reshape(-1), base.reshape(-1), out.reshape(-1), u.type(8 * u.itemsize - 1))
    return out


def warm_up() -> None:
    """Load (or compile, the first time) both kernels for every unsigned width."""
    for dt in (np.uint8, np.uint16, np.uint32, np.uint64):
        a = np.zeros(16, dt)
        decode_into(a, a, np.empty_like(a))
        encode_into(a, a, np.empty_like(a))
        if a.dtype.itemsize > 1:
            encode_sorted_into(a, a, np.empty_like(a), 8)
            decode_sorted_into(a, a, np.empty_like(a), 8)


__all__ = ["decode_into", "decode_sorted_into", "encode_into", "encode_sorted_into", "warm_up"]
