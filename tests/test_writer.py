"""The streaming safetensors writer: files the reference library reads back exactly."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pipeline.checkpoints.writer import (
    INDEX_FILE,
    ShardedWriter,
    TensorSpec,
    plan_shards,
    write_tensors,
)
from pipeline.errors import PipelineError, check_size


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "w.bf16": rng.standard_normal((7, 5)).astype(ml_dtypes.bfloat16),
        "w.f32": rng.standard_normal((3, 4)).astype(np.float32),
        "w.f16": rng.standard_normal(9).astype(np.float16),
        "scalar": np.array(3, np.int64),
        "empty": np.zeros((0, 3), np.float32),
        "mask": np.array([True, False, True]),
    }


def _bits(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes()


def test_single_file_round_trip_is_bit_exact(tmp_path):
    t = _tensors()
    files = write_tensors(tmp_path, t, metadata={"method": "two-point"})
    assert files == ["model.safetensors"]
    assert not (tmp_path / INDEX_FILE).exists()
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert f.metadata() == {"method": "two-point", "format": "pt"}
        assert sorted(f.keys()) == sorted(t)
    back = load_file(tmp_path / "model.safetensors")
    for k, v in t.items():
        got = back[k]
        assert tuple(got.shape) == v.shape
        assert got.contiguous().view(-1).view(torch.uint8).numpy().tobytes() == _bits(v), k


def test_streamed_row_blocks_equal_one_shot(tmp_path):
    t = _tensors()
    specs = [TensorSpec(k, v.shape, v.dtype) for k, v in t.items()]
    with ShardedWriter(tmp_path / "a", specs) as w:
        for k, v in t.items():
            if v.ndim and v.shape[0] > 1:
                for i in range(v.shape[0]):  # one row at a time
                    w.write(k, v[i : i + 1])
            else:
                w.write(k, v)
    write_tensors(tmp_path / "b", t)
    assert (tmp_path / "a/model.safetensors").read_bytes() == \
        (tmp_path / "b/model.safetensors").read_bytes()


def test_shards_respect_the_limit_and_index_lists_every_tensor(tmp_path):
    t = {f"t{i}": np.full((10,), i, np.float32) for i in range(7)}  # 40 bytes each
    t["big"] = np.zeros(100, np.float32)  # 400 bytes > limit: a shard of its own
    files = write_tensors(tmp_path, t, max_shard_size=100)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(t)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in t.values())
    assert sorted(set(index["weight_map"].values())) == sorted(files)
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    for f in files:
        sd = load_file(tmp_path / f)
        size = sum(x.numel() * x.element_size() for x in sd.values())
        assert size <= 100 or list(sd) == ["big"]
        for k, x in sd.items():
            assert index["weight_map"][k] == f
            np.testing.assert_array_equal(x.numpy(), t[k])


def test_plan_shards_keeps_order():
    specs = [TensorSpec(f"t{i}", (n,), np.dtype(np.uint8)) for i, n in enumerate([3, 3, 5, 1])]
    assert [[s.name for s in sh] for sh in plan_shards(specs, 6)] == \
        [["t0", "t1"], ["t2", "t3"]]
    assert len(plan_shards(specs, None)) == 1


@pytest.mark.parametrize(
    "text, n", [("200KB", 200_000), ("1GiB", 2**30), ("5GB", 5 * 10**9), ("12", 12), (7, 7)]
)
def test_parse_size(text, n):
    assert check_size(text, "--max-shard-size") == n


@pytest.mark.parametrize("text", ["", " ", "abc", "0", "-5MB", "5XB", "1e400GB", True])
def test_parse_size_rejects_junk(text):
    with pytest.raises(PipelineError):
        check_size(text, "--max-shard-size")


def test_out_of_order_wrong_dtype_and_overflow_are_refused(tmp_path):
    f32 = np.dtype(np.float32)
    specs = [TensorSpec("a", (2,), f32), TensorSpec("b", (2,), f32)]
    bad = [("b", np.zeros(2, f32), "expected tensor 'a'"),
           ("a", np.zeros(2, np.float64), "dtype"),
           ("a", np.zeros(3, f32), "more data")]
    for i, (name, block, msg) in enumerate(bad):
        with pytest.raises(PipelineError, match=msg), ShardedWriter(tmp_path / str(i), specs) as w:
            w.write(name, block)


def test_missing_data_fails_on_close(tmp_path):
    specs = [TensorSpec("a", (4,), np.dtype(np.float32))]
    with pytest.raises(PipelineError, match="incomplete"), ShardedWriter(tmp_path, specs) as w:
        w.write("a", np.zeros(2, np.float32))
