"""The fit's arrays, laid out from one zarr-made document per rank, are exactly what zarr writes."""

from __future__ import annotations

import numpy as np
import zarr

from pipeline.fit.results import ELEMENTS, RESULT_FIELDS, TensorPlan, create_fit


def test_create_fit_writes_zarrs_own_documents(tmp_path):
    plans = [TensorPlan("a.weight", (7, 5), "bfloat16", 3), TensorPlan("b", (4,), "float32", 4),
             TensorPlan("c", (), "float32", 1), TensorPlan("d.weight", (9, 2), "float32", 9),
             TensorPlan("e", (0, 3), "float32", 1), TensorPlan("f/../g", (6,), "float32", 2)]
    create_fit(tmp_path / "new", plans, {"x": 1})
    ref = zarr.open_group(str(tmp_path / "ref"), mode="w")
    for t in plans:
        g = ref.create_group(f"tensors/{t.path}")
        for f in RESULT_FIELDS:
            g.create_array(f, shape=t.shape, chunks=t.chunks(), dtype="float32",
                           fill_value=np.nan, compressors=None,
                           dimension_names=[f"dim_{i}" for i in range(len(t.shape))])
    for t in plans:
        new = tmp_path / "new" / ELEMENTS / "tensors" / t.path
        old = tmp_path / "ref" / "tensors" / t.path
        assert (new / "zarr.json").read_bytes() == (old / "zarr.json").read_bytes()
        for f in RESULT_FIELDS:
            assert (new / f / "zarr.json").read_bytes() == (old / f / "zarr.json").read_bytes()
            arr = zarr.open_array(str(tmp_path / "new" / ELEMENTS), path=f"tensors/{t.path}/{f}")
            assert arr.shape == t.shape and arr.dtype == np.float32
            assert np.isnan(arr[...]).all()
