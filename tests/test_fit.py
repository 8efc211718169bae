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
import reference_fit as K  # noqa: N812  (the numpy fit: the reference)
from fit_checks import assert_same_fit
from safetensors import safe_open
from typer.testing import CliRunner

from pipeline.checkpoints.discover import discover_checkpoints
from pipeline.compute import dask_client
from pipeline.fit import fit_store, open_fit
from pipeline.fit.histograms import by_layer_module, overall, summary_frames
from pipeline.store.ingest import ingest
from pipeline.workspace import Workspace


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


def test_null_is_sane_and_deterministic(store_bf16, fit_bf16, client, tmp_path) -> None:
    """The null's level and its bitwise determinism; real-vs-null is asserted on the
    linear run (tests/test_linear_regime.py): this short layout run is a random walk."""
    tot = summary_frames(fit_bf16.histograms["moving"])["overall"].iloc[0]
    assert 0.2 < tot.null_median < 0.6
    # another blocking (many small tasks) gives bitwise the same fit, null included
    again = fit_store(store_bf16, tmp_path / "fit2", client=client, block_bytes=16 << 10,
                      progress=False)
    assert again.tasks > fit_bf16.tasks
    assert_same_fit(fit_bf16.fit_dir, again.fit_dir)
    # so a complete fit made with another block size is current: nothing is read
    same = fit_store(store_bf16, tmp_path / "fit2", client=client, progress=False)
    assert same.new_steps == [] and same.bytes_read == 0


def test_a_fit_writes_twelve_bytes_an_element_and_the_null_on_request(
        store_bf16, fit_bf16, client, tmp_path) -> None:
    """Slope, intercept and R² are written (12 bytes an element, chunked as the store, no
    more padding than the store's chunks); each element's null R² only with
    ``null_elements``, and ``element_results`` refits any row to the same bits."""
    from pipeline.fit.job import element_results
    from pipeline.fit.results import ELEMENTS, RESULT_FIELDS
    from pipeline.store.reader import open_run

    fit = open_fit(fit_bf16.fit_dir)
    src = open_run(store_bf16)
    written = want = 0
    for name in fit.tensor_names:
        assert sorted(fit[name].data_vars) == sorted(RESULT_FIELDS), name
        shape, cr = src.shape(name), src.chunk_rows(name)
        assert fit.meta["tensors"][name]["chunk_rows"] == (min(cr, shape[0]) if shape else 1)
        rows = -(-shape[0] // cr) * cr if shape else 1
        want += len(RESULT_FIELDS) * 4 * rows * int(np.prod(shape[1:], dtype=np.int64))
    for f in (Path(fit_bf16.fit_dir) / ELEMENTS / "tensors").rglob("c*"):
        written += f.stat().st_size
    assert written == want
    n = sum(int(np.prod(src.shape(t), dtype=np.int64)) for t in fit.tensor_names)
    assert written <= 12.2 * n  # the store's chunks split the rows evenly: little padding

    full = fit_store(store_bf16, tmp_path / "null.fit", client=client, progress=False,
                     null_elements=True)
    nf = open_fit(full.fit_dir)
    assert full.histograms["moving"].equals(fit_bf16.histograms["moving"])
    checked = 0
    for name in fit.tensor_names:
        shape = src.shape(name)
        assert sorted(nf[name].data_vars) == sorted((*RESULT_FIELDS, "null_r2")), name
        for var in RESULT_FIELDS:
            np.testing.assert_array_equal(nf[name][var].values, fit[name][var].values)
        for row in sorted({0, shape[0] // 2, shape[0] - 1}) if shape else [0]:
            again = element_results(fit, name, row)
            for var in (*RESULT_FIELDS, "null_r2"):
                stored = nf[name][var].values[row] if shape else nf[name][var].values
                np.testing.assert_array_equal(again[var], np.ravel(stored),
                                              err_msg=f"{name} {var} row {row}")
            checked += 1
    assert checked >= len(fit.tensor_names)


def test_flip_mask_is_counter_based() -> None:
    from pipeline.engine import signs as S  # noqa: N812

    whole = S.flip_mask(7, "t", 30, 0, 5000)
    assert 0.45 < whole.mean() < 0.55
    for lo, hi in [(0, 1), (255, 257), (1000, 4321), (4999, 5000)]:
        np.testing.assert_array_equal(S.flip_mask(7, "t", 30, lo, hi), whole[lo:hi])
    # long ranges are generated a chunk at a time: the stream must not notice
    chunk = S.SIGN_CHUNK * S.SIGN_BLOCK
    long = S.flip_mask(7, "t", 30, 0, 3 * chunk + 1000)
    np.testing.assert_array_equal(long[:5000], whole)
    for lo, hi in [(chunk - 3, chunk + 3), (100, 2 * chunk + 77), (chunk + 1, 3 * chunk + 1000)]:
        np.testing.assert_array_equal(S.flip_mask(7, "t", 30, lo, hi), long[lo:hi])
    many = S.flip_masks(7, "t", [30, 40], 100, 9000)
    np.testing.assert_array_equal(many[0], long[100:9000])
    np.testing.assert_array_equal(many[1], S.flip_mask(7, "t", 40, 100, 9000))
    assert not np.array_equal(S.flip_mask(7, "t", 40, 0, 5000), whole)
    assert not np.array_equal(S.flip_mask(7, "u", 30, 0, 5000), whole)


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


def _few_values(rng: np.random.Generator, k: int, m: int, dtype) -> np.ndarray:
    """k steps of m elements, each element drawing from 1..6 values (+0/-0, a NaN, an inf)."""
    pool = np.array([0.0, -0.0, 1.0, 2.0, 3.0, 0.5, np.nan, np.inf], np.float32).astype(dtype)
    n_vals = rng.integers(1, 7, m)
    idx = (rng.random((k, m)) * n_vals).astype(np.int64)
    idx[:, rng.random(m) < 0.02] = 6  # some elements are NaN throughout
    idx[rng.integers(0, k), rng.random(m) < 0.02] = 7  # some see an inf once
    return pool[idx]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_update_batched_equals_step_by_step(dtype, monkeypatch) -> None:
    """All steps at once, in any split, or one at a time: the same state, bit for bit."""
    import ml_dtypes as mld

    dt = np.dtype(getattr(mld, dtype, dtype))
    rng = np.random.default_rng(5)
    k, m = 13, 3001
    walk = (np.cumsum(rng.integers(-1, 2, (k, m)) * (rng.random((k, m)) < 0.4), 0)
            * 2.0 ** -9 + rng.standard_normal(m) * 0.02)
    for vals in (_few_values(rng, k, m, dt), walk.astype(np.float32).astype(dt)):
        steps = list(range(0, 10 * k, 10))
        flips = K.flip_masks(3, "t", steps, 0, m)
        states = []
        for splits in ([k - 1], [1] * (k - 1), [5, 2, 5], [11, 1]):
            if splits == [5, 2, 5]:
                monkeypatch.setattr(K, "MAX_STEPS", 3)  # groups inside one update too
            st = K.init_state(vals[0])
            i = 1
            for n in splits:
                K.update(st, vals[i:i + n], [float(s) for s in steps[i:i + n]], flips[i:i + n])
                i += n
            states.append(st)
        for st in states[1:]:
            np.testing.assert_array_equal(st.f64, states[0].f64)  # NaN == NaN here
            np.testing.assert_array_equal(st.has4, states[0].has4)
            np.testing.assert_array_equal(st.w0, states[0].w0)
            np.testing.assert_array_equal(st.wlast, states[0].wlast)
            np.testing.assert_array_equal(st.wmin, states[0].wmin)  # -0.0 folded: order-free
            np.testing.assert_array_equal(st.wmax, states[0].wmax)
        # distinct values counted exactly (values, so -0.0 is 0.0; the NaN pattern is one value)
        fit = K.finalize(states[0], K.XStats.from_steps(steps), dt)
        f = vals.astype(np.float64)
        n_distinct = np.array([np.unique(f[:, i]).size for i in range(m)])
        np.testing.assert_array_equal(fit.distinct4, n_distinct >= K.MIN_DISTINCT)
        # the range filter: max - min of the values themselves, exactly
        ok = np.isfinite(f).all(0)
        np.testing.assert_array_equal(fit.moved_enough[ok],
                                      (f.max(0) - f.min(0) > K.MIN_CHANGE)[ok])
        np.testing.assert_array_equal(fit.nonfinite, ~np.isfinite(f).all(0))
        np.testing.assert_array_equal(fit.static, (f == f[:1]).all(0) & np.isfinite(f).all(0))


def test_reference_finish_matches_finalize_select_summarize() -> None:
    """The reference's tile pass (``tests/reference_fit.py``, what the engine is checked
    against) gives what the block-wide functions define."""
    import ml_dtypes as mld

    rng = np.random.default_rng(9)
    k, m, n_bins = 9, 70001, 20  # several tiles, the last one short
    vals = _few_values(rng, k, m, mld.bfloat16)
    vals[:, ::3] = (rng.standard_normal((k, 1)) * 0.01 + np.arange(k)[:, None] * 1e-3
                    * rng.random(-(-m // 3))).astype(mld.bfloat16)
    steps = list(range(0, 10 * k, 10))
    st = K.init_state(vals[0])
    K.update(st, vals[1:], [float(s) for s in steps[1:]], K.flip_masks(0, "t", steps[1:], 0, m))
    xst = K.XStats.from_steps(steps)
    fit = K.finalize(st, xst, vals.dtype)
    ws = Workspace()
    results = {r: np.empty(m, np.float32) for r in K.RESULTS}
    tot = K.finish(st, xst, vals.dtype, n_bins, results, ws)
    for r in K.RESULTS:
        np.testing.assert_array_equal(results[r], getattr(fit, r).astype(np.float32))
    assert tot.n_static == int(fit.static.sum()) > 0
    assert tot.n_nonfinite == int(fit.nonfinite.sum()) > 0
    for name, paper in K.SELECTIONS.items():
        sel = K.select(fit, paper)
        want = K.summarize(fit, sel, n_bins)
        got = tot.summaries[name]
        assert want.n_selected > 0
        np.testing.assert_array_equal(got.hist, want.hist)
        np.testing.assert_array_equal(got.null_hist, want.null_hist)
        assert (got.n_selected, got.n_above, got.null_above) == \
            (want.n_selected, want.n_above, want.null_above)
        assert got.r2_sum == pytest.approx(want.r2_sum, rel=1e-12)
        assert got.null_sum == pytest.approx(want.null_sum, rel=1e-12)
        assert tot.removed[name] == (sel.removed_min_change, sel.removed_distinct)
        assert tot.n_static + tot.n_nonfinite + tot.summaries["moving"].n_selected == m


def test_nonfinite_elements_have_their_own_count(tiny_run_bf16, copy_run, client) -> None:
    """A NaN and an inf injected into a real checkpoint: counted, never binned, never static."""
    import torch
    from safetensors.torch import load_file, save_file

    from pipeline.store.ingest import NonFiniteWarning

    run = copy_run(tiny_run_bf16)
    name = "model.layers.0.mlp.down_proj.weight"
    cp = discover_checkpoints(run)[3]
    (f,) = [f for f in cp.path.glob("*.safetensors") if name in safe_open(str(f), "pt").keys()]
    sd = load_file(str(f))
    w = sd[name].clone()
    w.view(-1)[[5, 17]] = torch.tensor([float("nan"), float("inf")], dtype=w.dtype)
    sd[name] = w
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.warns(NonFiniteWarning, match=name):
        ingest(run, run.with_name("nan.zarr"), client=client, progress=False)
    rep = fit_store(run.with_name("nan.zarr"), client=client, progress=False)
    steps, data = load_checkpoints(run)
    fit = open_fit(rep.fit_dir)
    for sel in ("moving", "paper"):
        ds = rep.histograms[sel]
        i = list(ds.tensor.values).index(name)
        assert int(ds.n_nonfinite[i]) == 2
        assert int(ds.n_nonfinite.sum()) == 2
        moving = ds.n_elements - ds.n_static - ds.n_nonfinite
        kept = ds.n_selected + ds.removed_min_change + ds.removed_distinct
        np.testing.assert_array_equal(kept.values, moving.values)
        row = summary_frames(ds)["tensors"].set_index("tensor").loc[name]
        assert row.n_nonfinite == 2
    r2 = fit[name].r2.values.reshape(-1)
    assert np.isnan(r2[[5, 17]]).all()
    with np.errstate(invalid="ignore"):
        ref = reference_fit(steps, data[name])
    ok = np.isfinite(ref["r2"])
    assert ok.sum() == ref["r2"].size - int(ref["static"].sum()) - 2
    assert np.all(np.abs(r2[ok] - ref["r2"][ok]) <= 1e-5)


def test_fit_after_appended_steps_equals_fresh_fit(tiny_run_bf16, copy_run, tmp_path,
                                                   client) -> None:
    """No state: the fit after two more checkpoints re-reads the store and equals a fresh fit."""
    from pipeline.fit.results import ELEMENTS

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
    assert first.steps == first.new_steps == [c.step for c in cps[:-2]]
    for cp in late:  # training goes on: two more checkpoints land
        shutil.move(str(held / cp.path.name), run / cp.path.name)
    ingest(run, store, client=client, progress=False)
    upd = fit_store(store, client=client, progress=False)
    assert upd.new_steps == [c.step for c in late] and not upd.incremental
    assert upd.bytes_read > first.bytes_read  # every step of the window, read again
    assert not (upd.fit_dir / ELEMENTS / "state").exists()
    scratch = fit_store(store, tmp_path / "scratch.fit", client=client, full=True,
                        progress=False)
    assert open_fit(upd.fit_dir).steps == [c.step for c in cps]
    assert_same_fit(upd.fit_dir, scratch.fit_dir)
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
                                   "--out", str(tmp_path / "rep"), "--no-backtest"])
    assert res.exit_code == 0, res.output
    page = (tmp_path / "rep" / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 4
    assert "http://" not in page and "https://" not in page  # opens with no server
    res = CliRunner().invoke(app, ["fit", str(tmp_path / "nope.zarr"), "--no-progress"])
    assert res.exit_code == 2 and "error:" in res.output


def test_reader_out_buffer_matches_fresh_read(store_bf16) -> None:
    """``read_block(out=)`` (the fit reads into its workspace) gives the same bits as without."""
    from pipeline.store.codec import decode, encode
    from pipeline.store.reader import open_run

    src = open_run(store_bf16)
    n = len(src.steps)
    for name in src.tensor_names:
        shape = src.shape(name)
        rows = slice(0, max(1, shape[0] // 2)) if shape else None
        for steps in (None, slice(1, n), slice(n - 1, n), [src.steps[-1], src.steps[0]]):
            want = src.read_block(name, steps, rows)
            buf = np.full(want.shape, 7, want.dtype.str if want.dtype.kind != "V" else "<u2")
            got = src.read_block(name, steps, rows, out=buf.view(want.dtype))
            np.testing.assert_array_equal(got.view(buf.dtype), want.view(buf.dtype))
            assert np.shares_memory(got, buf)
    rng = np.random.default_rng(1)
    base = rng.integers(0, 1 << 16, 1000, dtype=np.uint16)
    bits = rng.integers(0, 1 << 16, 1000, dtype=np.uint16)
    stored = encode(bits, base)
    np.testing.assert_array_equal(decode(stored, base), bits)
    out = np.empty_like(bits)
    np.testing.assert_array_equal(decode(stored.copy(), base, out=out), bits)
    np.testing.assert_array_equal(decode(stored.copy(), base, overwrite=True), bits)


def _synthetic_run(root: Path, config_from: Path, width: int) -> Path:
    """Three float32 checkpoints of one (8, width) tensor: only the shape matters here."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(width)
    for step in (0, 10, 20):
        d = root / f"global_step_{step}"
        d.mkdir(parents=True)
        shutil.copy(config_from / "config.json", d / "config.json")
        save_file({"w": rng.standard_normal((8, width)).astype(np.float32)},
                  str(d / "model.safetensors"))
    return root


def test_a_store_replaced_at_the_same_path_is_not_read_through_stale_metadata(
        tiny_run_fp32, tmp_path) -> None:
    """Workers cache open stores; another run ingested where one was deleted must be re-read."""

    with dask_client(n_workers=1, memory_limit="2GB") as client:
        _replace_and_refit(tiny_run_fp32, tmp_path, client)
    assert_same_fit(tmp_path / "fit-b", tmp_path / "fit-c")


def _replace_and_refit(tiny_run_fp32: Path, tmp_path: Path, client) -> None:
    cfg = tiny_run_fp32 / "global_step_0"
    narrow = _synthetic_run(tmp_path / "narrow", cfg, 4)
    wide = _synthetic_run(tmp_path / "wide", cfg, 16)
    store = tmp_path / "run.zarr"
    _ingest(narrow, store, client)
    fit_store(store, tmp_path / "fit-a", client=client, progress=False)
    shutil.rmtree(store)
    _ingest(wide, store, client)  # same name and steps, another shape, same path
    fit_store(store, tmp_path / "fit-b", client=client, progress=False)
    other = _ingest(wide, tmp_path / "fresh.zarr", client)
    fit_store(other, tmp_path / "fit-c", client=client, progress=False)
