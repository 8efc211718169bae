"""Backtest and alpha sweep on a real tiny run."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import PipelineError
from pipeline.extrapolate.backtest import ALL, NO_CHANGE, plan_cases, run_backtest
from pipeline.extrapolate.sources import CheckpointSource


def test_plan_cases_holds_out_the_later_half():
    cases = plan_cases([0, 10, 20, 30, 40], sweep={"r2_min": (0.7,)})
    assert {c.cutoff for c in cases} == {20}
    assert {c.target for c in cases} == {30, 40}
    labels = {c.label for c in cases}
    assert labels == {NO_CHANGE, "two-point(t0=0)", "two-point(t0=10)", "lstsq(3 steps)",
                      "rank1(3 steps)",
                      "gated(r2>=0.7)"}
    tp = next(c for c in cases if c.label == "two-point(t0=0)" and c.target == 40)
    assert tp.alpha == 2.0
    with pytest.raises(PipelineError):
        plan_cases([0, 10, 20], cutoffs=[20])  # nothing left to predict


def test_backtest_scores_match_an_independent_computation(tiny_run_fp32):
    src = CheckpointSource.from_run_dir(tiny_run_fp32)
    cases = plan_cases(src.steps, cutoffs=[20], sweep={"r2_min": (0.5,)})
    res = run_backtest(src, cases)
    rows = res.rows()
    for r in rows:
        if r["method"] == NO_CHANGE:
            assert r["rel_error"] == 1.0 or (r["move_sq"] == 0 and r["rel_error"] == 0.0)
    # two-point from step 0 to the cutoff 20, predicting 40 (alpha 2), one tensor by hand
    name = "model.layers.0.mlp.up_proj.weight"
    w = {s: load_file(tiny_run_fp32 / f"global_step_{s}/model.safetensors")[name].numpy()
         for s in (0, 20, 40)}
    pred = w[0] + np.float32(2.0) * (w[20] - w[0])
    want = np.linalg.norm((pred - w[40]).astype(np.float64)) / \
        np.linalg.norm((w[40] - w[20]).astype(np.float64))
    got = next(r for r in rows if r["method"] == "two-point(t0=0)" and r["target"] == 40
               and r["tensor"] == name)
    assert math.isclose(got["rel_error"], want, rel_tol=1e-9)
    overall = [r for r in rows if r["tensor"] == ALL and r["method"] != NO_CHANGE]
    assert all(np.isfinite(r["rel_error"]) and r["rel_error"] > 0 for r in overall)


def test_cli_backtest_writes_csv_and_png(tiny_run_fp32, tmp_path):
    r = CliRunner().invoke(app, ["backtest", str(tiny_run_fp32), "--out", str(tmp_path),
                                 "--holdout", "2", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "no-change" in r.output
    with (tmp_path / "backtest.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {int(x["target"]) for x in rows} == {30, 40}
    assert (tmp_path / "backtest.png").read_bytes()[:4] == b"\x89PNG"


def test_alpha_sweep_alpha_one_reproduces_the_real_checkpoint(tiny_run_bf16):
    from pipeline.extrapolate.alpha_sweep import alpha_sweep

    rows = alpha_sweep(tiny_run_bf16, t0=0, t1=50, alphas=[1.0, 2.0])
    one, two = rows
    assert one.target == 50 and one.real_accuracy == one.t1_accuracy
    assert one.accuracy == one.real_accuracy  # alpha = 1 gives W_t1 back exactly
    assert two.target == 100 and two.real_accuracy is not None
    assert 0.0 <= two.accuracy <= 1.0
