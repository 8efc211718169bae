"""Both weight sources are one StepSource: the same blocks from checkpoint folders and a store."""

from __future__ import annotations

import numpy as np
import pytest
from reference import load_checkpoint_torch, torch_bits

from pipeline.errors import PipelineError
from pipeline.extrapolate.sources import CheckpointSource, StoreSource
from pipeline.steps.source import StepSource
from pipeline.store.ingest import ingest


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(f"u{a.dtype.itemsize}")


def test_store_and_checkpoints_read_the_same_blocks(tiny_run_fp32, tmp_path):
    ck = CheckpointSource.from_run_dir(tiny_run_fp32)
    ingest(tiny_run_fp32, tmp_path / "run.zarr", progress=False)
    st = StoreSource(tmp_path / "run.zarr")
    for src in (ck, st):
        assert isinstance(src, object) and all(hasattr(src, m) for m in StepSource.__dict__
                                               if not m.startswith("_"))
    assert ck.steps == st.steps and ck.tensor_names == st.tensor_names
    ref = {s: load_checkpoint_torch(p) for s, p in zip(ck.steps, ck.folders(), strict=True)}
    picks = [len(ck.steps) - 1, 0, 2]
    for name in ck.tensor_names:
        shape = ck.shape(name)
        assert shape == st.shape(name) and ck.dtype(name) == st.dtype(name)
        assert ck.labels(name) == st.labels(name)
        rows = slice(1, max(2, shape[0] - 1)) if shape else None
        a, b = ck.read_block(name, picks, rows), st.read_block(name, picks, rows)
        np.testing.assert_array_equal(_bits(a), _bits(b), err_msg=name)
        want = np.stack([torch_bits(ref[ck.steps[i]][name]) for i in picks])
        np.testing.assert_array_equal(_bits(a), want[:, rows] if shape else want, err_msg=name)
        out = np.empty_like(a)
        assert ck.read_block(name, picks, rows, out=out) is out
        np.testing.assert_array_equal(_bits(out), _bits(a))


def test_a_tensor_that_changes_shape_or_vanishes_is_refused(tiny_run_fp32, tmp_path):
    import shutil

    from safetensors.numpy import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(tiny_run_fp32, run)
    ck = CheckpointSource.from_run_dir(run)
    last = ck.folders()[-1] / "model.safetensors"
    sd = load_file(last)
    name = next(n for n in sorted(sd) if sd[n].ndim == 2)
    sd[name] = sd[name][:-1]
    save_file(sd, last, metadata={"format": "pt"})
    with pytest.raises(PipelineError, match=f"tensor '{name}' changes shape between steps"):
        CheckpointSource.from_run_dir(run).shape(name)
    del sd[name]
    save_file(sd, last, metadata={"format": "pt"})
    with pytest.raises(PipelineError, match="tensors differ between steps"):
        CheckpointSource.from_run_dir(run).tensor_names  # noqa: B018
