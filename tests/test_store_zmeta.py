"""Hand-written zarr metadata (``zmeta``) is byte for byte what zarr's own API writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec

import pipeline
from pipeline.dtypes import bits_dtype
from pipeline.store.codec import ENCODING
from pipeline.store.layout import (
    ATTRS_KEY,
    CLEVEL,
    NOT_COMMITTED,
    RECORDS_GROUP,
    SHUFFLE,
    STEP_ARRAY,
    TENSORS_GROUP,
    chunk_shape,
    record_path,
)
from pipeline.store.state import StoreState

TABLE = {
    "model.w": ("bfloat16", (5, 3)),
    "v\u00e9": ("float32", (7,)),  # escaped by ensure_ascii in both writers
    "s": ("float32", ()),
    "d": ("float64", (2, 3, 4)),
}
RECORD = {"step": 10, "folder": "global_step_10", "nonfinite": {"v\u00e9": [1, 0, 0]},
          "files": {"model.safetensors": {"size": 12, "digest": "x:0"}},
          "checkpoint_bytes": 12, "ratio": 0.5}


def _zarr_store(path: Path, hand: StoreState, chunk_bytes: int) -> None:
    """The same store, every node through zarr's API (what ``state`` did before zmeta)."""
    s = str(path)
    root = zarr.open_group(s, mode="a")
    root.attrs.put({ATTRS_KEY: hand.meta})
    root.create_group(TENSORS_GROUP)
    root.create_group(RECORDS_GROUP)
    zarr.create_array(s, name=STEP_ARRAY, shape=(0,), dtype="int64", chunks=(1,),
                      fill_value=NOT_COMMITTED, compressors=None, dimension_names=["step"])
    for name, t in hand.tensors.items():
        bd = bits_dtype(t.dtype)
        zarr.create_array(
            s, name=f"{TENSORS_GROUP}/{t.path}", shape=(0, *t.shape), dtype=bd,
            chunks=chunk_shape(t.shape, bd.itemsize, chunk_bytes), fill_value=0,
            compressors=[BloscCodec(cname="zstd", clevel=CLEVEL, shuffle=SHUFFLE,
                                    typesize=bd.itemsize)],
            dimension_names=["step", *(f"dim_{i}" for i in range(len(t.shape)))],
            attributes={"name": name, "dtype": t.dtype, "encoding": ENCODING})


def _files(p: Path) -> dict[str, bytes]:
    return {q.relative_to(p).as_posix(): q.read_bytes() for q in sorted(p.rglob("*"))
            if q.is_file()}


def test_layout_grow_and_commit_equal_zarrs_bytes(tmp_path: Path) -> None:
    hand_p, ref_p = tmp_path / "hand.zarr", tmp_path / "zarr.zarr"
    hand_p.mkdir()
    ref_p.mkdir()
    hand = StoreState(hand_p)
    hand.create(TABLE, {"model_type": "qwen2", "rope_theta": 1e6}, {"run_dir": "/r"}, 24)
    _zarr_store(ref_p, hand, 24)
    assert _files(hand_p) == _files(ref_p)
    hand.grow(1)
    for t in hand.tensors.values():
        zarr.open_array(str(ref_p), path=f"{TENSORS_GROUP}/{t.path}", mode="r+").resize(
            (2, *t.shape))
    zarr.open_array(str(ref_p), path=STEP_ARRAY, mode="r+").resize((2,))
    assert _files(hand_p) == _files(ref_p)
    for index, step in enumerate((0, 10)):
        hand.commit(index, step, {**RECORD, "step": step})
        zarr.create_group(str(ref_p), path=record_path(index), overwrite=True,
                          attributes={**RECORD, "step": step})
        zarr.open_array(str(ref_p), path=STEP_ARRAY, mode="r+")[index] = step
        zarr.open_group(str(ref_p), mode="r+").attrs.put({ATTRS_KEY: hand.meta})
    assert _files(hand_p) == _files(ref_p)
    # and zarr (and our reader) read what was written by hand
    assert list(zarr.open_array(str(hand_p), path=STEP_ARRAY, mode="r")[:]) == [0, 10]
    again = StoreState.open(hand_p)
    assert again.steps == [0, 10] and again.records[1]["step"] == 10
    arr = zarr.open_array(str(hand_p), path=f"{TENSORS_GROUP}/{hand.tensors['d'].path}",
                          mode="r")
    assert arr.shape == (2, 2, 3, 4) and np.asarray(arr[1]).sum() == 0
    assert pipeline.open_run(hand_p).steps == [0, 10]
