"""The per-element fit on REAL tiny RLVR runs, checked against an independent float64 numpy fit.

The reference reads the checkpoints straight from the safetensors files
(not through the store) and uses np.polyfit and np.corrcoef on full arrays.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import ml_dtypes  # noqa: F401  (bf16 for safetensors)
import numpy as np
import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from pipeline.checkpoints.discover import discover_checkpoints
from pipeline.compute import dask_client
from pipeline.fit import fit_store, open_fit
from pipeline.fit import kernels as K
from pipeline.fit.histograms import by_layer_module, overall, summary_frames
from pipeline.store.ingest import ingest


@pytest.fixture(scope="module")
def client():
    with dask_client(n_workers=2, memory_limit="3GB") as c:
        yield c


def _ingest(run: Path, store: Path, client) -> Path:
    ingest(run, store, client=client, progress=False)
    return store


@pytest.fixture(scope="module")
def store_bf16(tiny_run_bf16, tmp_path_factory, client) -> Path:
    return _ingest(tiny_run_bf16, tmp_path_factory.mktemp("bf16") / "run.zarr", client)


@pytest.fixture(scope="module")
def store_fp32(tiny_run_fp32, tmp_path_factory, client) -> Path:
    return _ingest(tiny_run_fp32, tmp_path_factory.mktemp("fp32") / "run.zarr", client)


@pytest.fixture(scope="module")
def fit_bf16(store_bf16, client):
    return fit_store(store_bf16, client=client, progress=False)


@pytest.fixture(scope="module")
def fit_fp32(store_fp32, client):
    return fit_store(store_fp32, client=client, progress=False)


def load_checkpoints(run: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Every step of every tensor from the safetensors files: (steps, {name: (n, *shape)})."""
    cps = discover_checkpoints(run)
    data: dict[str, list[np.ndarray]] = {}
    for cp in cps:
        for f in sorted(cp.path.glob("*.safetensors")):
            with safe_open(str(f), "np") as st:
                for k in st.keys():
                    data.setdefault(k, []).append(st.get_tensor(k))
    return np.array([c.step for c in cps]), {k: np.stack(v) for k, v in data.items()}


def reference_fit(steps: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    """Independent float64 least squares on the full (n_steps, n_elements) array."""
    y = w.reshape(len(steps), -1).astype(np.float64)
    x = steps.astype(np.float64)
    static = (y == y[:1]).all(axis=0)
    slope = np.zeros(y.shape[1])
    intercept = y[0].copy()
    r2 = np.full(y.shape[1], np.nan)
    mv = ~static
    if mv.any():
        slope[mv], intercept[mv] = np.polyfit(x, y[:, mv], 1)
        xc = x - x.mean()
        yc = y[:, mv] - y[:, mv].mean(axis=0)
        r2[mv] = (xc @ yc) ** 2 / ((xc @ xc) * (yc * yc).sum(axis=0))
    n_distinct = np.array([np.unique(y[:, i]).size for i in range(y.shape[1])])
    return {"slope": slope, "intercept": intercept, "r2": r2, "static": static,
            "range": y.max(axis=0) - y.min(axis=0), "n_distinct": n_distinct}


def _scale(ref: dict[str, np.ndarray], steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Natural magnitudes for relative errors where the true slope/intercept is ~0."""
    span = float(steps.max() - steps.min())
    return ref["range"] / span, ref["range"] + 1e-30


@pytest.mark.parametrize("which", ["bf16", "fp32"])
def test_fit_matches_numpy_reference(which, request) -> None:
    run = request.getfixturevalue(f"tiny_run_{which}")
    rep = request.getfixturevalue(f"fit_{which}")
    steps, data = load_checkpoints(run)
    fit = open_fit(rep.fit_dir)
    assert fit.steps == list(steps)
    ds = rep.histograms["moving"]
    total_static = 0
    for name, w in data.items():
        ref = reference_fit(steps, w)
        got = fit[name]
        slope = got.slope.values.reshape(-1).astype(np.float64)
        icpt = got.intercept.values.reshape(-1).astype(np.float64)
        r2 = got.r2.values.reshape(-1).astype(np.float64)
        mv = ~ref["static"]
        s_scale, i_scale = _scale(ref, steps)
        # float32 storage: 1e-5 relative to the value, or to the element's own scale near 0
        assert np.all(np.abs(slope - ref["slope"])[mv]
                      <= 1e-5 * np.maximum(np.abs(ref["slope"]), s_scale)[mv]), name
        assert np.all(np.abs(icpt - ref["intercept"])[mv]
                      <= 1e-5 * np.maximum(np.abs(ref["intercept"]), i_scale)[mv]), name
        assert np.all(np.abs(r2 - ref["r2"])[mv] <= 1e-5), name
        assert np.all((r2[mv] >= 0) & (r2[mv] <= 1)), name
        assert np.all(np.isnan(r2[~mv])), "static elements have no R²"
        i = list(ds.tensor.values).index(name)
        assert int(ds.n_static[i]) == int(ref["static"].sum()), name
        assert int(ds["count"][i].sum()) == int(mv.sum()), "every moving element is binned"
        total_static += int(ref["static"].sum())
    assert int(overall(ds).n_static) == total_static
    if which == "bf16":
        assert total_static > 0, "a real bf16 run has elements that never move"


def test_paper_filter_counts_match_reference(tiny_run_bf16, fit_bf16) -> None:
    steps, data = load_checkpoints(tiny_run_bf16)
    ds = fit_bf16.histograms["paper"]
    removed_change = removed_distinct = kept = 0
    for name, w in data.items():
        ref = reference_fit(steps, w)
        mv = ~ref["static"]
        ok_change = mv & (ref["range"] > K.MIN_CHANGE)
        ok_distinct = ok_change & (ref["n_distinct"] >= K.MIN_DISTINCT)
        i = list(ds.tensor.values).index(name)
        assert int(ds.removed_min_change[i]) == int(mv.sum() - ok_change.sum()), name
        assert int(ds.removed_distinct[i]) == int(ok_change.sum() - ok_distinct.sum()), name
        assert int(ds.n_selected[i]) == int(ok_distinct.sum()), name
        removed_change += int(mv.sum() - ok_change.sum())
        removed_distinct += int(ok_change.sum() - ok_distinct.sum())
        kept += int(ok_distinct.sum())
    assert removed_distinct > 0, "bf16 staircases: some elements take < 4 values"
    assert kept > 0


def test_null_is_below_real_and_deterministic(store_bf16, fit_bf16, client, tmp_path) -> None:
    tot = summary_frames(fit_bf16.histograms["moving"])["overall"].iloc[0]
    assert 0.2 < tot.null_median < 0.6
    assert tot["median"] > tot.null_median, "a real RL run is more linear than chance"
    # another blocking (many small tasks) gives bitwise the same fit, null included
    again = fit_store(store_bf16, tmp_path / "fit2", client=client, block_bytes=16 << 10,
                      progress=False)
    assert again.tasks > fit_bf16.tasks
    a, b = open_fit(fit_bf16.fit_dir), open_fit(again.fit_dir)
    for name in a.tensor_names:
        for var in ("slope", "intercept", "r2", "null_r2"):
            np.testing.assert_array_equal(a[name][var].values, b[name][var].values)


def test_flip_mask_is_counter_based() -> None:
    whole = K.flip_mask(7, "t", 30, 0, 5000)
    assert 0.45 < whole.mean() < 0.55
    for lo, hi in [(0, 1), (255, 257), (1000, 4321), (4999, 5000)]:
        np.testing.assert_array_equal(K.flip_mask(7, "t", 30, lo, hi), whole[lo:hi])
    assert not np.array_equal(K.flip_mask(7, "t", 40, 0, 5000), whole)
    assert not np.array_equal(K.flip_mask(7, "u", 30, 0, 5000), whole)


def test_static_exact_and_distinct_capped_on_known_values() -> None:
    """Arithmetic with a known answer (not a claim about linearity)."""
    import ml_dtypes as mld

    vals = np.array([[1.0, 2.0, 0.0, 5.0, -0.0],
                     [1.0, 2.5, -0.0, 5.0, 0.0],
                     [1.0, 2.0, 0.0, 5.5, -0.0],
                     [1.0, 2.5, 0.0, 6.0, 0.0],
                     [1.0, 2.0, 0.0, 6.5, 0.0]], dtype=mld.bfloat16)
    steps = [0, 10, 20, 30, 40]
    st = K.init_state(vals[0])
    K.update(st, vals[1:], [s - steps[0] for s in steps[1:]],
             [K.flip_mask(0, "t", s, 0, 5) for s in steps[1:]])
    fit = K.finalize(st, K.XStats.from_steps(steps), vals.dtype)
    # columns 0, 2 and 4 never change value (+0/-0 are one value)
    np.testing.assert_array_equal(fit.static, [True, False, True, False, True])
    # column 1 alternates between 2 values; column 3 takes 4 values
    np.testing.assert_array_equal(fit.distinct4, [False, False, False, True, False])
    assert np.isnan(fit.r2[[0, 2, 4]]).all()
    assert fit.slope[0] == 0.0 and fit.intercept[0] == 1.0


def test_incremental_update_equals_scratch(tiny_run_bf16, copy_run, tmp_path, client) -> None:
    run = copy_run(tiny_run_bf16)
    held = tmp_path / "held"
    held.mkdir()
    cps = discover_checkpoints(run)
    late = cps[-2:]
    for cp in late:
        shutil.move(str(cp.path), held / cp.path.name)
    store = tmp_path / "run.zarr"
    ingest(run, store, client=client, progress=False)
    first = fit_store(store, client=client, progress=False)
    assert not first.incremental and first.steps == [c.step for c in cps[:-2]]
    for cp in late:  # training goes on: two more checkpoints land
        shutil.move(str(held / cp.path.name), run / cp.path.name)
    ingest(run, store, client=client, progress=False)

    # the from-scratch answer, on an intact copy of the store
    shutil.copytree(store, tmp_path / "copy.zarr")
    scratch = fit_store(tmp_path / "copy.zarr", tmp_path / "scratch.fit", client=client,
                        full=True, progress=False)
    assert not scratch.incremental
    # prove the update reads no earlier step: destroy their chunks (position 0 is the base
    # every step is decoded against, so it stays); reading them would give zeros
    n_old = len(first.steps)
    wiped = 0
    for chunks in (store / "tensors").glob("*/c"):
        for pos in range(1, n_old):
            if (chunks / str(pos)).exists():
                shutil.rmtree(chunks / str(pos))
                wiped += 1
    assert wiped > 0
    upd = fit_store(store, client=client, progress=False)
    assert upd.incremental and upd.new_steps == [c.step for c in late]
    a, b = open_fit(upd.fit_dir), open_fit(scratch.fit_dir)
    assert a.steps == b.steps == [c.step for c in cps]
    for name in a.tensor_names:
        for var in ("slope", "intercept", "r2", "null_r2"):
            np.testing.assert_array_equal(a[name][var].values, b[name][var].values)
    for sel in ("moving", "paper"):
        assert upd.histograms[sel].equals(scratch.histograms[sel])
    # and up to date: nothing is read
    again = fit_store(store, client=client, progress=False)
    assert again.new_steps == [] and again.bytes_read == 0


def test_window_matches_reference(tiny_run_bf16, store_bf16, client, tmp_path) -> None:
    rep = fit_store(store_bf16, tmp_path / "win.fit", start=20, stop=70, client=client,
                    progress=False)
    assert rep.steps == [20, 30, 40, 50, 60, 70]
    steps, data = load_checkpoints(tiny_run_bf16)
    keep = (steps >= 20) & (steps <= 70)
    fit = open_fit(rep.fit_dir)
    for name in ["model.layers.1.mlp.down_proj.weight", "lm_head.weight"]:
        ref = reference_fit(steps[keep], data[name][keep])
        mv = ~ref["static"]
        r2 = fit[name].r2.values.reshape(-1)
        assert np.all(np.abs(r2[mv] - ref["r2"][mv]) <= 1e-5)
        assert int(np.isnan(r2).sum()) == int(ref["static"].sum())


def test_histogram_sums_and_outputs(fit_bf16) -> None:
    ds = fit_bf16.histograms["moving"]
    assert set(ds.dims) == {"tensor", "bin"} and ds.sizes["bin"] == 100
    lm = by_layer_module(ds)
    np.testing.assert_array_equal(lm["count"].sum("group").values, ds["count"].sum("tensor"))
    assert set(lm.module.values) >= {"q_proj", "down_proj", "embed_tokens", "lm_head"}
    tot = overall(ds)
    assert int(tot.n_selected) + int(tot.n_static) == int(tot.n_elements)
    for kind in ("tensors", "layer_module", "overall"):
        for sel in ("moving", "paper"):
            assert (fit_bf16.fit_dir / f"summary_{kind}_{sel}.csv").stat().st_size > 0
    reopened = open_fit(fit_bf16.fit_dir).histograms("moving")
    np.testing.assert_array_equal(reopened["count"].values, ds["count"].values)


def test_cli_fit_and_report(store_bf16, tmp_path) -> None:
    from pipeline.cli import app

    out = tmp_path / "cli.fit"
    wide = CliRunner(env={"COLUMNS": "200"})  # rich tables shrink to the terminal width
    res = wide.invoke(app, ["fit", str(store_bf16), "--out", str(out), "--paper-filters",
                            "--no-progress", "--to", "60"])
    assert res.exit_code == 0, res.output
    assert "overall" in res.output and "< 4 distinct values" in res.output
    assert open_fit(out).steps == [0, 10, 20, 30, 40, 50, 60]
    res = CliRunner().invoke(app, ["report", str(store_bf16), "--fit", str(out),
                                   "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    page = (tmp_path / "rep" / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 4
    assert "http://" not in page and "https://" not in page  # opens with no server
    res = CliRunner().invoke(app, ["fit", str(tmp_path / "nope.zarr"), "--no-progress"])
    assert res.exit_code == 2 and "error:" in res.output
