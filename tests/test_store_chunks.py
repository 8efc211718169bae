"""Ingest writes chunks without zarr's per-call machinery: the bytes must be zarr's own.

Also: the per-range block hashing of ingest tasks gives exactly the digest
of one sequential pass over the file, however the file is split.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.checkpoints.format import TensorInfo
from pipeline.store.codec import encode
from pipeline.store.integrity import TREE_BLOCK, combine_blocks, tree_digest
from pipeline.store.layout import TENSORS_GROUP
from pipeline.store.state import StoreState
from pipeline.store.tasks import PieceSpec, _ChunkWriter, _RangeHasher, _write_chunk

TABLE = {
    "w": ("bfloat16", (5, 3)),  # 2 rows per chunk: an edge chunk of 1 row
    "v": ("float32", (7,)),
    "s": ("float32", ()),
    "z": ("bfloat16", (4, 2)),  # all zero at step 1 relative to step 0
}


def _data(rng: np.random.Generator, step: int) -> dict[str, np.ndarray]:
    out = {}
    for name, (dtype, shape) in TABLE.items():
        u = np.dtype("<u2" if dtype == "bfloat16" else "<u4")
        out[name] = rng.integers(0, 1000, shape, dtype=u) if name != "z" else np.ones(shape, u)
    return out


def test_hand_written_chunks_equal_zarr(tmp_path: Path) -> None:
    stores = {}
    for kind in ("zarr", "hand"):
        p = tmp_path / f"{kind}.zarr"
        st = StoreState(p)
        p.mkdir()
        st.create(TABLE, None, {}, chunk_bytes=12)  # tiny chunks: w has chunk rows 2
        st.grow(1)
        stores[kind] = st
    rng = np.random.default_rng(0)
    steps = [_data(rng, 0), _data(rng, 1)]
    for index, data in enumerate(steps):
        for name, bits in data.items():
            entry = stores["zarr"].tensors[name]
            arr = zarr.open_array(str(stores["zarr"].path), path=f"{TENSORS_GROUP}/{entry.path}",
                                  mode="r+")
            arr[index] = bits if index == 0 else encode(bits, steps[0][name])
            cr = arr.chunks[1] if bits.ndim else 1
            w = _ChunkWriter(str(stores["hand"].path))
            info = TensorInfo(name, Path("x"), TABLE[name][0], TABLE[name][1], 0, bits.nbytes)
            spec = PieceSpec(info, entry.path, 0, bits.shape[0] if bits.ndim else 1, cr)
            if not bits.ndim:
                _write_chunk(w, spec, index, 0, bits.copy())
            for a in range(0, bits.shape[0] if bits.ndim else 0, cr):
                _write_chunk(w, spec, index, a, bits[a: a + cr].copy())

    def files(p: Path) -> dict[str, bytes]:
        return {q.relative_to(p).as_posix(): q.read_bytes()
                for q in sorted((p / TENSORS_GROUP).rglob("*")) if q.is_file()}

    a, b = files(stores["zarr"].path), files(stores["hand"].path)
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    assert not any(k.startswith("z/c/1/") for k in a)  # an all-zero chunk is not written
    # the reader decodes what the hand writer wrote
    import pipeline.store.state as state_mod

    st = stores["hand"]
    st.commit(0, 0, {"files": {}, "checkpoint_bytes": 0, "nonfinite": {}, "folder": "a"})
    st.commit(1, 5, {"files": {}, "checkpoint_bytes": 0, "nonfinite": {}, "folder": "b"})
    assert state_mod.committed_steps(st.path) == [0, 5]
    import pipeline

    r = pipeline.open_run(st.path)
    for name in TABLE:
        np.testing.assert_array_equal(r.read_block(name, [5])[0].view(steps[1][name].dtype),
                                      steps[1][name])


@pytest.mark.parametrize("seed", range(5))
def test_range_hashing_equals_sequential_digest(tmp_path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    size = int(rng.integers(0, 4 * TREE_BLOCK))
    f = tmp_path / "f.bin"
    f.write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    cuts = sorted({0, size, *rng.integers(0, size + 1, int(rng.integers(0, 6))).tolist()})
    data = f.read_bytes()
    blocks: dict[int, bytes] = {}
    fd = os.open(f, os.O_RDONLY)
    try:
        for a, b in zip(cuts, cuts[1:] or [size], strict=False):
            h = _RangeHasher(fd, a, b)
            # feed some sub-spans of [a, b) in order, leaving gaps the hasher must read itself
            pts = sorted(rng.integers(a, b + 1, 4).tolist()) if b > a else [a, a, a, a]
            for x, y in ((pts[0], pts[1]), (pts[2], pts[3])):
                h.feed(x, memoryview(data[x:y]))
            blocks.update(h.finish(size))
    finally:
        os.close(fd)
    assert combine_blocks(size, blocks) == tree_digest(f)
