"""Discovery and lazy reads of real checkpoints, checked against safetensors' own loader."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import load_checkpoint_torch, torch_bits
from safetensors.torch import save_file

from pipeline.checkpoints import CheckpointReader, discover_checkpoints
from pipeline.errors import PipelineError


def test_discover_global_step_layout(tiny_run_bf16: Path) -> None:
    cps = discover_checkpoints(tiny_run_bf16)
    assert [c.step for c in cps] == list(range(0, 101, 10))
    assert all(c.path == tiny_run_bf16 / f"global_step_{c.step}" for c in cps)


def test_discover_trl_verl_and_pattern_layouts(tiny_run_bf16: Path, tmp_path: Path) -> None:
    src = tiny_run_bf16 / "global_step_10"
    trl = tmp_path / "trl"
    shutil.copytree(src, trl / "checkpoint-10")
    (trl / "checkpoint-10" / "training_args.bin").write_bytes(b"\x80\x04not weights")
    shutil.copytree(src, trl / ".checkpoint-20.partial")  # hidden: never a step
    assert [(c.step, c.path.name) for c in discover_checkpoints(trl)] == [(10, "checkpoint-10")]

    verl = tmp_path / "verl"
    shutil.copytree(src, verl / "global_step_30" / "actor" / "huggingface")
    [cp] = discover_checkpoints(verl)
    assert cp.step == 30 and cp.path == verl / "global_step_30" / "actor" / "huggingface"

    custom = tmp_path / "custom"
    shutil.copytree(src, custom / "ckpt_s7" / "hf")
    assert discover_checkpoints(custom) == []
    [cp] = discover_checkpoints(custom, r"ckpt_s(?P<step>\d+)/hf")
    assert (cp.step, cp.path) == (7, custom / "ckpt_s7" / "hf")
    with pytest.raises(PipelineError, match="no named group 'step'"):
        discover_checkpoints(custom, r"ckpt_s(\d+)")


def test_discover_refuses_duplicate_steps(tiny_run_bf16: Path, tmp_path: Path) -> None:
    src = tiny_run_bf16 / "global_step_10"
    shutil.copytree(src, tmp_path / "global_step_10")
    shutil.copytree(src, tmp_path / "checkpoint-10")
    with pytest.raises(PipelineError, match="step 10 found twice"):
        discover_checkpoints(tmp_path)


@pytest.mark.parametrize("fixture", ["tiny_run_bf16", "tiny_run_fp32", "tiny_run_sharded"])
def test_reader_matches_safetensors(fixture: str, request: pytest.FixtureRequest) -> None:
    run: Path = request.getfixturevalue(fixture)
    folder = run / "global_step_20"
    ref = load_checkpoint_torch(folder)
    r = CheckpointReader(folder)
    assert r.tensor_names == sorted(ref)
    if fixture == "tiny_run_sharded":
        assert len(r.files) > 1
    for name, t in ref.items():
        assert r.shape(name) == tuple(t.shape)
        assert r.dtype(name) == str(t.dtype).removeprefix("torch.")
        np.testing.assert_array_equal(r.read_bits(name), torch_bits(t))
        if t.dim() and t.shape[0] > 3:
            np.testing.assert_array_equal(r.read_bits(name, slice(1, 3)), torch_bits(t[1:3]))
    assert r.config is not None and "hidden_size" in r.config


def test_reader_fp16_and_logical_values(tiny_run_fp32: Path, tmp_path: Path) -> None:
    fp32 = load_checkpoint_torch(tiny_run_fp32 / "global_step_0")
    ref = {k: v.to(torch.float16) for k, v in fp32.items()}
    save_file(ref, tmp_path / "model.safetensors")
    r = CheckpointReader(tmp_path)
    for name, t in ref.items():
        assert r.dtype(name) == "float16"
        np.testing.assert_array_equal(r.read(name), t.numpy())


def test_truncated_and_corrupt_files(tiny_run_bf16: Path, tmp_path: Path) -> None:
    folder = tmp_path / "ck"
    shutil.copytree(tiny_run_bf16 / "global_step_0", folder)
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-100])
    with pytest.raises(PipelineError, match="truncated|does not match") as e:
        CheckpointReader(folder)
    assert str(f) in str(e.value) and "\n" not in str(e.value)
    f.write_bytes(data[:8] + b"{garbage" + data[16:])
    with pytest.raises(PipelineError, match="corrupt safetensors header"):
        CheckpointReader(folder)
    f.write_bytes(b"\xff" * 8 + data[8:])
    with pytest.raises(PipelineError, match="corrupt or truncated"):
        CheckpointReader(folder)


def test_missing_shard(tiny_run_sharded: Path, tmp_path: Path) -> None:
    folder = tmp_path / "ck"
    shutil.copytree(tiny_run_sharded / "global_step_0", folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (folder / victim).unlink()
    with pytest.raises(PipelineError, match=f"shard {victim} .* is missing"):
        CheckpointReader(folder)


def test_pickle_needs_opt_in(tiny_run_bf16: Path, tmp_path: Path) -> None:
    ref = load_checkpoint_torch(tiny_run_bf16 / "global_step_10")
    torch.save(ref, tmp_path / "pytorch_model.bin")
    (tmp_path / "training_args.bin").write_bytes(b"\x80\x04never loaded")
    with pytest.raises(PipelineError, match="pickle checkpoint .* --allow-pickle"):
        CheckpointReader(tmp_path)
    r = CheckpointReader(tmp_path, allow_pickle=True)
    assert r.files == [tmp_path / "pytorch_model.bin"]
    for name, t in ref.items():
        np.testing.assert_array_equal(r.read_bits(name), torch_bits(t))
