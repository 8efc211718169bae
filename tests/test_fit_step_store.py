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


def test_a_fit_into_a_folder_of_another_stores_fit_replaces_it(tiny_run_fp32, tmp_path):
    """A fit of other tensors (here 2 arrays) in the folder: the new fit replaces all of
    it, histograms included (they once failed the fit at its very end), and equals a
    fit into an empty folder."""
    from fit_checks import assert_same_fit

    rng = np.random.default_rng(0)
    st = StepStore.create(tmp_path / "two.zarr", "two", {
        "a": ArraySpec((5, 3), "float32"), "b": ArraySpec((4,), "float32")})
    for s in (0, 10, 20):
        st.append(s, {"a": rng.standard_normal((5, 3)).astype(np.float32),
                      "b": rng.standard_normal(4).astype(np.float32)})
    folder = tmp_path / "shared.fit"
    first = fit_store(tmp_path / "two.zarr", folder, source=StepStoreRef(
        str(tmp_path / "two.zarr"), "two"), executor="serial", progress=False)
    assert int(first.histograms["paper"].sizes["tensor"]) == 2
    ingest(tiny_run_fp32, tmp_path / "run.zarr", progress=False)
    rep = fit_store(tmp_path / "run.zarr", folder, executor="serial", progress=False)
    fit_store(tmp_path / "run.zarr", tmp_path / "fresh.fit", executor="serial",
              progress=False)
    n = len(open_fit(folder).tensor_names)
    assert n > 2 and int(rep.histograms["paper"].sizes["tensor"]) == n
    assert sorted(open_fit(folder).histograms("paper").tensor.values) == sorted(
        open_fit(folder).tensor_names)
    assert_same_fit(folder, tmp_path / "fresh.fit", csv=True)
