"""Lossless step encoding: each step is stored as its difference from a nearby step.

Pure functions, arrays in and arrays out. Bit patterns are unsigned ints of
the dtype's width. A stored chunk is ``zigzag(b - ref)`` (integer
subtraction modulo 2**bits): an RL update moves a weight by a few ULPs, and
for same-sign floats the bit pattern is monotonic in the value, so the
difference is a small integer whose high bits are zero after zigzag, which
bit-shuffle + zstd compress well. Elements that did not move encode to 0,
and an all-zero chunk is not written at all by zarr.

Which step is the reference (``reference``): position 0 is stored raw; a
*key* position (a multiple of ``key_every``) against position 0; any other
position against the position just before it. Consecutive checkpoints are
far closer than a step and the first one: on the real tiny bf16 run 3.2
bits of entropy per element against the previous step, 5 against step 0,
and the store 0.306 of the checkpoint bytes instead of 0.371; on the fp32
embedded run 0.715 instead of 0.754. Keys bound random access: any
position decodes from at most ``key_every + 1`` stored chunks (position 0,
its key, the deltas after it), and a block of consecutive positions
decodes its chain once (``chain``, ``needed``, ``decode_positions``).
Keys against step 0 rather than raw keep their cost near the old base-0
deltas instead of a raw step's (``benchmarks/codec_candidates.py``).

Sorted deltas (``ENCODING``, stores of schema 3; ``seg`` > 0 here): within
each chunk the deltas are stored grouped by the reference's exponent (the 8
bits below the sign bit: bf16's and fp32's whole exponent), a stable counting
sort, so the decoder, which has the reference, recomputes the order. An RL
update moves every weight by about the same amount in value, so by very
different numbers of ULPs at different exponents: the exponent predicts the
delta's size (on the real tiny bf16 run 3.06 bits of entropy per element
given it, 3.75 without), and grouped deltas bit-shuffle into homogeneous bit
planes. With blosc zstd-1 + bitshuffle, ingest stores the real bf16 run in
0.287 of the checkpoint bytes instead of 0.325 (plain deltas, byte shuffle),
the fp32 embedded run in 0.650 instead of 0.715, a 0.5B-shaped synthetic
bf16 run in 0.268 instead of 0.293 (all measured on one machine; the
counting sort costs two passes, and bitshuffle compresses faster than byte
shuffle, so ingest got faster, not slower). A segment is one chunk's
elements (the rows of the chunk that lie in the tensor), so only whole
chunks decode; readers widen a row range to chunk
boundaries. 8-bit patterns are never sorted. ``seg`` = 0 gives the plain
deltas (schema 2's, and the building block of the sorted ones).

fp32 has a floor far above bf16's: an Adam step over 20 RL steps moves a
weight by ~1e4-1e5 ULPs of fp32, so the previous-step delta carries 14.4 bits
of entropy per 32-bit element on the embedded run (11.9 given the exponent),
and a coder that reached that entropy exactly would still store 0.42-0.49 of
the checkpoint bytes (``benchmarks/codec_candidates.py --entropy``). bf16
rounds the same move to a few ULPs (3.75 bits; 3.06 given the exponent).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray

from pipeline.dtypes import FLOAT_MASKS, logical_dtype, signed_bits_dtype

ENCODING = "zigzag-sub-prev-key0-sort8"  # recorded in the store; change it, bump SCHEMA_VERSION
DEFAULT_KEY_EVERY = 8  # a key position every 8: at most 9 chunks to decode any step


def key_shift(dtype: np.dtype) -> int:
    """Shift that brings the 8 bits below the sign bit down: the sort key of sorted deltas
    (0 for 8-bit patterns, which are not sorted). The numba kernels take it from here too."""
    return max(0, 8 * dtype.itemsize - 9)


def _segments(n: int, seg: int) -> range:
    return range(0, n, seg)


def _order(base: NDArray) -> NDArray:
    """The stable order of a segment's elements by the reference's key (numpy reference)."""
    key = ((base >> base.dtype.type(key_shift(base.dtype))) & base.dtype.type(0xFF)).astype(
        np.uint8)  # 8-bit keys: numpy's stable sort is then a radix sort
    return np.argsort(key, kind="stable")


def _sorts(dtype: np.dtype, seg: int) -> bool:
    return seg > 0 and dtype.itemsize > 1


def reference(index: int, key_every: int) -> int | None:
    """Position that position ``index`` is encoded against (``None``: stored raw)."""
    if index <= 0:
        return None
    return 0 if index % key_every == 0 else index - 1


def chain(index: int, key_every: int) -> list[int]:
    """Positions whose stored chunks decode position ``index``, in decoding order."""
    if index <= 0:
        return [0]
    key = index - index % key_every
    return [0, *range(max(key, 1), index + 1)]


def needed(indices: list[int], key_every: int) -> list[int]:
    """Positions to decode, in order, so that every one of ``indices`` is decoded.

    Each position is decoded once: a block of consecutive positions shares
    its chain (decoding position ``p`` needs only ``reference(p)``, which
    comes earlier in the list).
    """
    out: set[int] = set()
    for i in indices:
        out.update(chain(i, key_every))
    return sorted(out)


def check_key_every(key_every: int) -> int:
    """``key_every`` as stored in a store's metadata: an int >= 1."""
    if isinstance(key_every, bool) or not isinstance(key_every, int) or key_every < 1:
        raise ValueError(f"key_every must be an integer >= 1, got {key_every!r}")
    return key_every


def encode(bits: NDArray, base: NDArray | None, seg: int = 0) -> NDArray:
    """Stored form of ``bits`` relative to ``base`` (``None``: this is the base, stored raw).

    ``seg`` > 0: the deltas of each run of ``seg`` elements (the last may be
    shorter) are stored in the order of their reference's key (module docstring).
    """
    if base is None:
        return bits
    u = bits.dtype
    d = bits - base  # wraps modulo 2**bits: exact and invertible
    s = d.view(signed_bits_dtype(u))
    shift = 8 * u.itemsize - 1
    z = ((s << 1) ^ (s >> shift)).view(u)
    if not _sorts(u, seg):
        return z
    flat, bf = z.reshape(-1), base.reshape(-1)
    out = np.empty_like(flat)
    for lo in _segments(flat.size, seg):
        hi = min(lo + seg, flat.size)
        out[lo:hi] = flat[lo:hi][_order(bf[lo:hi])]
    return out.reshape(z.shape)


def encode_inplace(bits: NDArray, base: NDArray) -> NDArray:
    """``encode(bits, base)`` written over ``bits`` (which must be writable): one temporary."""
    np.subtract(bits, base, out=bits)
    s = bits.view(signed_bits_dtype(bits.dtype))
    sign = s >> (8 * bits.dtype.itemsize - 1)
    np.left_shift(s, 1, out=s)
    np.bitwise_xor(s, sign, out=s)
    return bits


def encode_into(bits: NDArray, base: NDArray, out: NDArray, scratch: NDArray,
                seg: int = 0) -> NDArray:
    """``encode(bits, base)`` written into ``out``, ``bits`` left as it is.

    One fused pass (``zigzag.encode_into``) for large C-contiguous blocks
    (``_fused``), else four numpy passes with ``scratch`` (same shape and dtype) holding the
    sign mask. With the buffers reused across chunks, encoding allocates
    nothing, and the caller keeps ``bits`` as the next step's reference
    without a copy.
    """
    if _sorts(bits.dtype, seg):
        if _fused(bits, base, out):
            from pipeline.store.zigzag import encode_sorted_into

            return encode_sorted_into(bits, base, out, seg)
        np.copyto(out, encode(bits, base, seg))
        return out
    if _fused(bits, base, out):
        from pipeline.store.zigzag import encode_into as fused

        return fused(bits, base, out)
    np.subtract(bits, base, out=out)
    s = out.view(signed_bits_dtype(out.dtype))
    np.right_shift(s, 8 * out.dtype.itemsize - 1, out=scratch.view(s.dtype))
    np.left_shift(s, 1, out=s)
    np.bitwise_xor(out, scratch, out=out)
    return out


FUSED_MIN_ELEMENTS = 1 << 20  # below this numpy's passes cost less than importing numba


def _fused(*arrays: NDArray) -> bool:
    """Whether the one-pass kernels apply: same shape, C-contiguous, a large block.

    Importing numba and loading the kernels costs ~1 s per process, once; it
    pays on a real model's chunks (millions of elements), not on a tiny
    run's, whose many short-lived worker processes then never import it.
    """
    a = arrays[0]
    return (a.size >= FUSED_MIN_ELEMENTS and all(x.shape == a.shape and x.dtype == a.dtype
                                   and x.flags.c_contiguous for x in arrays))


def decode(stored: NDArray, base: NDArray | None, out: NDArray | None = None,
           overwrite: bool = False, seg: int = 0) -> NDArray:
    """Inverse of ``encode``: the original bit patterns.

    ``out`` (same shape and dtype, never ``stored`` itself) receives them
    instead of a new array; ``overwrite=True`` lets ``stored`` serve as
    scratch (it is clobbered), so unsorted deltas allocate no temporary at all.
    ``seg`` as given to ``encode``.
    """
    if base is None:
        if out is None:
            return stored
        np.copyto(out, stored)
        return out
    u = stored.dtype
    one = u.type(1)
    if _sorts(u, seg):
        if out is None:
            out = np.empty_like(stored)
        if _fused(stored, base, out):
            from pipeline.store.zigzag import decode_sorted_into

            return decode_sorted_into(stored, base, out, seg)
        sf, bf = stored.reshape(-1), base.reshape(-1)
        d = np.empty_like(sf)
        for lo in _segments(sf.size, seg):
            hi = min(lo + seg, sf.size)
            d[lo:hi][_order(bf[lo:hi])] = sf[lo:hi]
        return decode(d.reshape(stored.shape), base, out=out, overwrite=True)
    if out is None and not overwrite:
        d = (stored >> one) ^ (-(stored & one).view(signed_bits_dtype(u))).view(u)
        return d + base
    if out is None:
        out = np.empty_like(stored)
    if _fused(stored, base, out):
        from pipeline.store.zigzag import decode_into

        return decode_into(stored, base, out)
    scratch = stored if overwrite else np.empty_like(stored)
    np.right_shift(stored, one, out=out)
    np.bitwise_and(stored, one, out=scratch)
    s = scratch.view(signed_bits_dtype(u))
    np.negative(s, out=s)  # 0 or all ones
    np.bitwise_xor(out, scratch, out=out)
    np.add(out, base, out=out)
    return out


def decode_positions(load: Callable[[int], NDArray], idx: list[int], key_every: int,
                     out: NDArray, seg: int = 0) -> NDArray:
    """Bits of positions ``idx`` into ``out[k]`` (shape ``(len(idx), *block)``).

    ``load(p)`` returns position ``p``'s stored block; it is called once
    per position of ``needed(idx)``, in increasing order. A decoded
    position goes straight into its ``out`` slot when it is wanted (else
    into a scratch buffer) and is then the reference of the next position
    of its chain, so a block of k consecutive steps costs one chain plus k
    decodes, and memory is ``out`` plus at most two scratch blocks. ``seg``
    as given to ``encode`` (the block then starts at a chunk boundary).
    """
    slots: dict[int, list[int]] = {}
    for k, i in enumerate(idx):
        slots.setdefault(i, []).append(k)
    decoded: dict[int, NDArray] = {}  # position -> its bits, while still a reference
    spare: list[NDArray] = []
    for p in needed(idx, key_every):
        ref = reference(p, key_every)
        stored = load(p)
        if p in slots:
            dst = out[slots[p][0], ...]
        else:
            dst = spare.pop() if spare else np.empty(out.shape[1:], out.dtype)
        if ref is None:
            np.copyto(dst, stored)
        else:
            decode(stored, decoded[ref], out=dst, overwrite=stored.flags.writeable, seg=seg)
        for k in slots.get(p, [])[1:]:
            np.copyto(out[k, ...], dst)
        # keep position 0 (every key's reference) and p (the next one's); recycle the rest
        for q in [q for q in decoded if q not in (0, p)]:
            buf = decoded.pop(q)
            if q not in slots:
                spare.append(buf)
        decoded[p] = dst
    return out


def as_logical(bits: NDArray, dtype: str) -> NDArray:
    """View bit patterns as their logical dtype (no copy)."""
    return bits.view(logical_dtype(dtype))


def as_float(bits: NDArray, dtype: str, out_dtype: type = np.float32) -> NDArray:
    """Logical values as float32/float64 for numerics (bf16/fp16 widen exactly)."""
    return as_logical(bits, dtype).astype(out_dtype)


def count_nonfinite(bits: NDArray, dtype: str) -> tuple[int, int, int]:
    """(NaN, +inf, -inf) counts of a block given its bit patterns; zeros for non-floats.

    NaN/inf are the patterns whose exponent bits are all ones. The common
    case (none) is decided with two reductions over the bits as they are,
    no temporary and no float conversion: as signed ints, a positive value
    is special iff it is >= the exponent mask; as unsigned ints, a negative
    one iff it is >= sign bit | exponent mask.
    """
    if dtype not in FLOAT_MASKS or bits.size == 0:
        return 0, 0, 0
    exp, sign_bit = FLOAT_MASKS[dtype]
    u = bits.dtype.type
    if (int(bits.view(signed_bits_dtype(bits.dtype)).max()) < exp
            and int(bits.max()) < (1 << sign_bit) | exp):
        return 0, 0, 0
    mag = bits & u((1 << sign_bit) - 1)
    nan = int((mag > u(exp)).sum())
    inf = mag == u(exp)
    neg = (bits >> u(sign_bit)).astype(bool)
    return nan, int((inf & ~neg).sum()), int((inf & neg).sum())
