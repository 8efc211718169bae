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


def _sorted_per_chunk(bits: np.ndarray, ref: np.ndarray, cr: int) -> np.ndarray:
    """Deltas against ``ref``, sorted within each chunk of ``cr`` rows (the store's encoding)."""
    if not bits.ndim:
        return encode(bits.reshape(1), ref.reshape(1), 1).reshape(())
    return np.concatenate([encode(bits[a: a + cr], ref[a: a + cr], bits[a: a + cr].size)
                           for a in range(0, bits.shape[0], cr)])


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
            cr = arr.chunks[1] if bits.ndim else 1
            arr[index] = bits if index == 0 else _sorted_per_chunk(bits, steps[0][name], cr)
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


def test_multi_step_task_equals_one_task_per_step(tmp_path: Path) -> None:
    """``write_ranges`` (one base decode for several steps) writes what per-step tasks write."""
    from safetensors.numpy import save_file

    from pipeline.checkpoints.reader import CheckpointReader
    from pipeline.store.ingest import _plan_ranges, tensor_table
    from pipeline.store.tasks import write_range, write_ranges

    rng = np.random.default_rng(1)
    shapes = {"a": (37, 5), "b": (9,), "c": (), "d": (4, 3, 2)}
    base = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    run = tmp_path / "run"
    for step in range(4):
        d = run / f"global_step_{step}"
        d.mkdir(parents=True)
        sd = {n: (v + (0 if step == 0 else rng.standard_normal(v.shape).astype(np.float32)
                       * 1e-3 * (n != "d"))).astype(np.float32) for n, v in base.items()}
        sd["a"][0, 0] = np.nan if step == 2 else sd["a"][0, 0]
        save_file({n: np.ascontiguousarray(v) for n, v in sd.items()}, d / "model.safetensors")
    readers = [CheckpointReader(run / f"global_step_{s}") for s in range(4)]
    out = {}
    for kind in ("one", "multi"):
        store = tmp_path / f"{kind}.zarr"
        store.mkdir()
        st = StoreState(store)
        st.create(tensor_table(readers[0]), None, {}, chunk_bytes=64)  # many small chunks
        st.grow(3)
        for r in _plan_ranges(st, readers[0], 200):
            write_range(str(store), 0, r)
        plans = [_plan_ranges(st, r, 200) for r in readers[1:]]
        results = []
        if kind == "one":
            for i, plan in enumerate(plans):
                results.append([write_range(str(store), i + 1, r) for r in plan])
        else:
            per_task = [write_ranges(str(store), [1, 2, 3], list(rs))
                        for rs in zip(*plans, strict=True)]
            results = [list(x) for x in zip(*per_task, strict=True)]
        out[kind] = ({q.relative_to(store).as_posix(): q.read_bytes()
                      for q in sorted((store / TENSORS_GROUP).rglob("*")) if q.is_file()},
                     [(sorted((k, v) for b in rs for k, v in b.blocks.items()),
                       sum(b.nbytes for b in rs), [b.nonfinite for b in rs]) for rs in results])
    assert out["one"] == out["multi"]
    files, per_step = out["multi"]
    assert any(k.startswith("tensors/a/c/3/") for k in files)
    assert {"a": (1, 0, 0)} in per_step[1][2]  # the NaN of step 2 is counted once
    for step, (blocks, _, _) in zip(range(1, 4), per_step, strict=True):
        f = run / f"global_step_{step}" / "model.safetensors"
        assert combine_blocks(f.stat().st_size, dict(blocks)) == tree_digest(f)


def test_digests_name_their_algorithm_and_old_ones_still_verify(tmp_path: Path) -> None:
    import hashlib

    from pipeline.store.integrity import (
        BLAKE_TREE_ALGO,
        DIGEST_ALGO,
        TREE_ALGO,
        digest_like,
        file_digest,
    )

    f = tmp_path / "f.bin"
    data = np.random.default_rng(0).integers(0, 256, 2 * TREE_BLOCK + 5, np.uint8).tobytes()
    f.write_bytes(data)
    new = tree_digest(f)
    assert new.startswith(TREE_ALGO + ":") and digest_like(f, new) == new
    assert digest_like(f, "") == new
    # blake2b tree: what stores made before xxh3 hold, checked with their own algorithm
    h = hashlib.blake2b(digest_size=32)
    h.update(len(data).to_bytes(8, "little"))
    for k in range(0, len(data), TREE_BLOCK):
        h.update(hashlib.blake2b(data[k: k + TREE_BLOCK], digest_size=32).digest())
    old = f"{BLAKE_TREE_ALGO}:{h.hexdigest()}"
    assert digest_like(f, old) == old == tree_digest(f, BLAKE_TREE_ALGO)
    whole = f"{DIGEST_ALGO}:{hashlib.blake2b(data, digest_size=32).hexdigest()}"
    assert digest_like(f, whole) == whole == file_digest(f)
