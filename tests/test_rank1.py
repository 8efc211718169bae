"""Rank-1 extrapolation kernel against plain numpy (full SVD, float64)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.extrapolate.rank1 import rank1_direction


def _trajectory(seed: int, shape=(96, 40), steps=(0, 10, 20, 30, 40), noise=0.05):
    """A rank-1 drift plus per-step noise, as float32 checkpoints (known answer)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(shape[0])
    b = rng.standard_normal(shape[1])
    w0 = rng.standard_normal(shape).astype(np.float32)
    ws = {s: (w0 + 1e-3 * s * np.outer(a, b) + noise * (s > 0) * rng.standard_normal(shape)
              ).astype(np.float32) for s in steps}
    return ws, steps


@pytest.mark.parametrize("block_rows", [7, 96])
def test_direction_matches_numpy_svd(block_rows):
    ws, steps = _trajectory(0)
    r = rank1_direction(lambda s, rows: ws[s][rows], ws[0].shape, steps, block_rows)
    d = ws[steps[-1]].astype(np.float64) - ws[steps[0]].astype(np.float64)
    u, s, vt = np.linalg.svd(d)
    # the same singular pair up to sign
    assert abs(abs(r.u @ u[:, 0]) - 1) < 1e-6
    assert abs(abs(r.v @ vt[0]) - 1) < 1e-6
    assert r.sigma == pytest.approx(s[0], rel=1e-6)
    ref_coef = [r.u @ (ws[t].astype(np.float64) - ws[steps[0]]) @ r.v for t in steps]
    np.testing.assert_allclose(r.coef, ref_coef, rtol=1e-9, atol=1e-9)
    assert r.slope == pytest.approx(np.polyfit(steps, ref_coef, 1)[0], rel=1e-9)


def test_blocking_does_not_change_the_answer():
    ws, steps = _trajectory(1)
    a = rank1_direction(lambda s, rows: ws[s][rows], ws[0].shape, steps, 5)
    b = rank1_direction(lambda s, rows: ws[s][rows], ws[0].shape, steps, 1000)
    np.testing.assert_allclose(a.drift(slice(None), 10), b.drift(slice(None), 10),
                               rtol=1e-9, atol=1e-12)


def test_drift_recovers_a_rank1_line_and_beats_per_element_lines():
    ws, steps = _trajectory(2, noise=0.2)
    r = rank1_direction(lambda s, rows: ws[s][rows], ws[0].shape, steps[:-1], 32)
    # predict the held-out last step from the first four
    c, t = steps[-2], steps[-1]
    pred = ws[c] + r.drift(slice(None), t - c)
    x = np.asarray(steps[:-1], float)
    ys = np.stack([ws[s].reshape(-1) for s in steps[:-1]]).astype(np.float64)
    slope, icpt = np.polyfit(x, ys, 1)
    lstsq = (icpt + slope * t).reshape(ws[0].shape)
    real = ws[t]
    assert np.linalg.norm(pred - real) < np.linalg.norm(lstsq - real)


def test_a_matrix_that_never_moved_has_no_drift():
    w = np.ones((8, 3), np.float32)
    r = rank1_direction(lambda s, rows: w[rows], w.shape, (0, 5, 9), 4)
    assert r.slope == 0.0
    assert not np.any(r.drift(slice(None), 100))


def _reference_rank1(ws: dict[int, np.ndarray], known: list[int], target: int) -> np.ndarray:
    """Plain numpy, float64: full SVD of the update, polyfit of the coefficient."""
    w0 = ws[known[0]].astype(np.float64)
    u, _, vt = np.linalg.svd(ws[known[-1]].astype(np.float64) - w0)
    coef = [u[:, 0] @ (ws[s].astype(np.float64) - w0) @ vt[0] for s in known]
    slope = np.polyfit(known, coef, 1)[0]
    return ws[known[-1]].astype(np.float64) + slope * (target - known[-1]) * np.outer(
        u[:, 0], vt[0])


def test_rank1_export_matches_numpy_and_falls_back_to_lstsq(tiny_run_fp32, tmp_path):
    from safetensors.numpy import load_file

    from pipeline.extrapolate.export import export, make_spec
    from pipeline.extrapolate.sources import CheckpointSource

    src = CheckpointSource.from_run_dir(tiny_run_fp32)
    steps = src.steps
    target = steps[-1] + (steps[-1] - steps[0]) // 2
    export(src, tmp_path / "r1", make_spec(src, "rank1", to=target))
    export(src, tmp_path / "ls", make_spec(src, "lstsq", to=target))
    got = load_file(tmp_path / "r1/model.safetensors")
    line = load_file(tmp_path / "ls/model.safetensors")
    ckpts = [load_file(tiny_run_fp32 / f"global_step_{s}/model.safetensors") for s in steps]
    for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight"):
        ws = {s: c[name] for s, c in zip(steps, ckpts, strict=True)}
        want = _reference_rank1(ws, steps, target)
        drift = want - ws[steps[-1]]
        # the iteration stops at ~1e-4 rad from the exact direction: the drift agrees to
        # well under a percent, the weights to float32 rounding on top of that
        assert np.linalg.norm(got[name] - want) <= 0.01 * np.linalg.norm(drift)
        assert np.linalg.norm(drift) > 0
    # a vector (bias) has no matrix direction: the per-element line, bit for bit
    bias = "model.layers.0.self_attn.q_proj.bias"
    np.testing.assert_array_equal(got[bias], line[bias])


def test_backtest_scores_rank1_like_an_independent_computation(tiny_run_fp32):
    from pipeline.extrapolate.backtest import plan_cases, run_backtest
    from pipeline.extrapolate.sources import CheckpointSource

    src = CheckpointSource.from_run_dir(tiny_run_fp32)
    steps = src.steps
    cut, target = steps[len(steps) // 2], steps[-1]
    res = run_backtest(src, plan_cases(steps, cutoffs=[cut], sweep={"r2_min": (0.5,)}))
    name = "model.layers.1.mlp.down_proj.weight"
    from safetensors.numpy import load_file

    ws = {s: load_file(tiny_run_fp32 / f"global_step_{s}/model.safetensors")[name]
          for s in steps}
    known = [s for s in steps if s <= cut]
    pred = _reference_rank1(ws, known, target).astype(np.float32)  # what an export writes
    want = np.linalg.norm(pred - ws[target]) / np.linalg.norm(ws[target] - ws[cut])
    row = next(r for r in res.rows() if r["method"] == f"rank1({len(known)} steps)"
               and r["target"] == target and r["tensor"] == name)
    assert row["rel_error"] == pytest.approx(want, rel=1e-3)
