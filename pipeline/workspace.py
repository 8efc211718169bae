"""Reusable scratch buffers for array kernels.

A fresh large temporary per block costs a page fault per 4 KiB on first
touch. Dask workers make it worse: they run with ``MALLOC_TRIM_THRESHOLD_``
set, which pins glibc's mmap threshold at 128 KiB, so every larger temporary
is a fresh mapping (~2 ns a byte here, more than the arithmetic; a third of
the export time on a 1 GB model). Kernels that take a ``Workspace`` return
views into it, valid until the next call that asks for the same role.
"""

from __future__ import annotations

import numpy as np


class Workspace:
    """Scratch buffers, one per role, grown on demand and never shrunk."""

    def __init__(self) -> None:
        self._bufs: dict[str, np.ndarray] = {}

    def get(self, role: str, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        dt = np.dtype(dtype)
        n = int(np.prod(shape, dtype=np.int64))
        buf = self._bufs.get(role)
        if buf is None or buf.nbytes < n * dt.itemsize:
            buf = self._bufs[role] = np.empty(max(n * dt.itemsize, 1), np.uint8)
        return buf[: n * dt.itemsize].view(dt).reshape(shape)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self._bufs.values())
