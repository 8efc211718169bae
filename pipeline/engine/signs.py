"""Signs of the null walk: a counter-based Philox stream keyed by (seed, tensor, step).

Element i of a tensor uses bit i of the stream, so any block of the tensor
gets the signs the whole tensor would, in any order of steps and blocks.
``flip_mask`` gives them as booleans (the reference), ``sign_words`` as the
packed 64-bit words the fused kernels read (1 bit per element, no unpacking).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

SIGN_WORD_BITS = 64
SIGN_BLOCK = 256  # elements per Philox counter increment (4 words of 64 bits)
SIGN_CHUNK = 256  # Philox blocks unpacked at a time by ``flip_mask`` (64 Ki elements)


def sign_key(seed: int, tensor: str, step: int) -> tuple[int, int]:
    """128-bit Philox key for one (seed, tensor, step): stable across processes and runs."""
    # surrogatepass: a name that is not valid UTF-8 (a lone surrogate) still gets a key,
    # and every valid name keeps the bytes (and so the signs) it always had
    key = f"{seed}\x00{tensor}\x00{step}".encode("utf-8", "surrogatepass")
    h = hashlib.blake2b(key, digest_size=16).digest()
    return int.from_bytes(h[:8], "little"), int.from_bytes(h[8:], "little")


def _generator(seed: int, tensor: str, step: int, first_block: int) -> np.random.Philox:
    # Philox with counter c yields block c of the stream that starts at counter 0
    return np.random.Philox(key=list(sign_key(seed, tensor, step)), counter=[first_block, 0, 0, 0])


def flip_mask(seed: int, tensor: str, step: int, start: int, stop: int,
              out: np.ndarray | None = None) -> np.ndarray:
    """Booleans for flat elements [start, stop): True where the null increment is negated.

    ``out`` (bool, stop - start) receives the mask instead of a new array.
    """
    out = np.empty(stop - start, bool) if out is None else out
    first_block = start // SIGN_BLOCK
    skip = start - first_block * SIGN_BLOCK
    gen = _generator(seed, tensor, step, first_block)
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


def flip_masks(seed: int, tensor: str, steps: Sequence[int], start: int, stop: int) -> np.ndarray:
    """``flip_mask`` of several steps as one (len(steps), stop - start) bool array."""
    out = np.empty((len(steps), stop - start), bool)
    for j, s in enumerate(steps):
        flip_mask(seed, tensor, s, start, stop, out=out[j])
    return out


def sign_offset(start: int) -> int:
    """Bit of the first word that belongs to flat element ``start`` (see ``sign_words``)."""
    return start % SIGN_BLOCK


def sign_words(seed: int, tensor: str, steps: Sequence[int | None], start: int, stop: int,
               out: np.ndarray | None = None) -> np.ndarray:
    """Packed signs of flat elements [start, stop) for each step: (len(steps), n_words) uint64.

    Element ``start + i`` is bit ``(o + i) % 64`` of word ``(o + i) // 64``, with
    ``o = sign_offset(start)``; a set bit negates the null increment, exactly
    where ``flip_mask`` is True. A step of None gets a row of zeros (the first
    step of a window has no increment).
    """
    first_block = start // SIGN_BLOCK
    o = sign_offset(start)
    n_blocks = -(-(o + stop - start) // SIGN_BLOCK)
    shape = (len(steps), 4 * n_blocks)
    out = np.empty(shape, np.uint64) if out is None else out.reshape(shape)
    for j, s in enumerate(steps):
        if s is None or stop == start:
            out[j] = 0
        else:
            out[j] = _generator(seed, tensor, s, first_block).random_raw(4 * n_blocks)
    return out
