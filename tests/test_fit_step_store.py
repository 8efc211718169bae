"""The fit runs on any step store: the same real weights in a generic StepStore fit identically."""

from __future__ import annotations

import numpy as np

from pipeline.extrapolate.sources import CheckpointSource
from pipeline.fit import fit_store, open_fit
from pipeline.fit.results import RESULT_FIELDS
from pipeline.steps.store import ArraySpec, StepStore, StepStoreRef
from pipeline.store.ingest import ingest


def test_fit_on_a_generic_step_store_equals_the_weight_store_fit(tiny_run_fp32, tmp_path):
    ck = CheckpointSource.from_run_dir(tiny_run_fp32)
    names = [n for n in ck.tensor_names if ck.dtype(n) == np.float32]
    st = StepStore.create(tmp_path / "generic.zarr", "weights-copy",
                          {n: ArraySpec(ck.shape(n), "float32") for n in names})
    for s in ck.steps:
        st.append(s, {n: ck.read(n, s) for n in names})
    ref = StepStoreRef(str(tmp_path / "generic.zarr"), "weights-copy")
    gen = fit_store(tmp_path / "generic.zarr", tmp_path / "generic.fit", source=ref,
                    executor="serial", progress=False)
    ingest(tiny_run_fp32, tmp_path / "run.zarr", progress=False)
    wst = fit_store(tmp_path / "run.zarr", tmp_path / "run.fit", executor="serial",
                    progress=False)
    assert gen.steps == wst.steps == ck.steps
    a, b = open_fit(tmp_path / "generic.fit"), open_fit(tmp_path / "run.fit")
    assert sorted(a.tensor_names) == sorted(names)
    for n in names:
        assert sorted(a[n].data_vars) == sorted(b[n].data_vars) == sorted(RESULT_FIELDS)
        for var in RESULT_FIELDS:
            np.testing.assert_array_equal(a[n][var].values, b[n][var].values,
                                          err_msg=f"{n} {var}")
    # the generic store labels its arrays by name (no decoder layers): its own table
    assert set(gen.histograms["moving"].layer.values) == {-1}
    assert int(gen.histograms["moving"].n_selected.sum()) == int(
        wst.histograms["moving"].n_selected.sel(tensor=gen.histograms["moving"].tensor).sum())
