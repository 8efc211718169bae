"""The methods registry drives export, backtest and the CLI's ``--method`` choices.

A method registered here (not one of the built-ins) must show up in the
backtest's plan, be scored, validate its parameter and export, with no
other module told about it; every built-in method must round-trip through
the real export of a real tiny run and load with transformers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import PipelineError
from pipeline.extrapolate import kernels as K
from pipeline.extrapolate import methods as M
from pipeline.extrapolate.backtest import NO_CHANGE, plan_cases, run_backtest
from pipeline.extrapolate.export import build_plan, export, make_spec
from pipeline.extrapolate.sources import CheckpointSource

RUNNER = CliRunner(env={"COLUMNS": "250"})
STEPS = (0, 10, 20, 30, 40)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    """Five checkpoints of a noisy linear matrix and a norm: every export takes milliseconds."""
    run = tmp_path_factory.mktemp("methods") / "run"
    rng = np.random.default_rng(1)
    base = rng.standard_normal((6, 5)).astype(np.float32)
    slope = rng.standard_normal((6, 5)).astype(np.float32)
    for s in STEPS:
        d = run / f"global_step_{s}"
        d.mkdir(parents=True)
        noise = 0.002 * rng.standard_normal((6, 5))
        save_file({"w.weight": (base + 0.01 * s * slope + noise).astype(np.float32),
                   "norm.weight": np.ones(5, np.float32)},
                  str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    return run


def _damped(b: M.BlockInput, params: M.Params) -> np.ndarray:
    """The least-squares line pulled toward the last step: damp 0 is "no change"."""
    fit, last = b.fit()
    line = K.line_value(fit.slope, fit.intercept, b.target)
    last64 = K.to_float32(last).astype(np.float64).reshape(-1)
    return (last64 + params["damp"] * (line - last64)).reshape(last.shape)


@pytest.fixture
def damped() -> Iterator[M.Method]:
    m = M.register(M.Method(
        "damped", "lstsq shrunk toward the last step", "window", _damped,
        params=(M.Param("damp", "--damp", 0.0, 1.0, label="damp={:g}", sweep=(0.0, 1.0)),),
        needs_fit=True, scratch_bytes=120))
    try:
        yield m
    finally:
        M.unregister(m.name)


@pytest.mark.parametrize("command", ["extrapolate", "backtest", "alpha-sweep"])
def test_cli_method_choices_are_the_registry(command):
    """``--help`` lists exactly the registered names, and Typer accepts each of them."""
    res = RUNNER.invoke(app, [command, "--help"])
    assert res.exit_code == 0
    line = next(x for x in res.output.splitlines() if "--method" in x)
    choices = re.search(r"<(?:list\[)?([^\]>]*)\]?>", line)
    assert choices is not None and choices.group(1).split("|") == list(M.names()), line
    missing = "/nonexistent/run"  # parsing succeeds, then our own error: no such source
    for name in M.names():
        res = RUNNER.invoke(app, [command, missing, "--method", name])
        assert res.exit_code == 2 and "Invalid value for '--method'" not in res.output, name


def test_cli_refuses_an_unregistered_method(small_run, tmp_path):
    wrong = "-".join(M.names()) + "-x"  # not a registered name, whatever is registered
    out = tmp_path / "m"
    res = RUNNER.invoke(app, ["extrapolate", str(small_run), "--method", wrong, "--to", "60",
                              "--out", str(out), "--no-progress"])
    assert res.exit_code == 2 and wrong in res.output and not out.exists()
    res = RUNNER.invoke(app, ["backtest", str(small_run), "--method", wrong,
                              "--out", str(tmp_path / "bt"), "--no-progress"])
    assert res.exit_code == 2 and not (tmp_path / "bt").exists()


def test_cli_backtest_scores_only_the_methods_asked_for(small_run, tmp_path):
    window = M.with_steps("window")[0]
    res = RUNNER.invoke(app, ["backtest", str(small_run), "--method", window,
                              "--out", str(tmp_path / "bt"), "--no-progress"])
    assert res.exit_code == 0, res.output
    text = (tmp_path / "bt" / "backtest.csv").read_text()
    labels = {line.split(",")[3] for line in text.splitlines()[1:]}
    assert labels == {NO_CHANGE, f"{window}(3 steps)"}


def test_cli_backtest_refuses_a_parameter_no_chosen_method_takes(small_run, tmp_path):
    plain = next(m.name for m in M.methods() if not m.params)
    res = RUNNER.invoke(app, ["backtest", str(small_run), "--method", plain, "--r2-min", "0.5",
                              "--out", str(tmp_path / "bt"), "--no-progress"])
    assert res.exit_code == 2
    assert f"--r2-min only applies to --method {', '.join(M.takers('r2_min'))}" in res.output


def test_a_registered_method_is_planned_scored_and_exported(damped, small_run, tmp_path):
    cases = plan_cases(STEPS)
    mine = [c for c in cases if c.method == "damped"]
    assert {c.label for c in mine} == {"damped(damp=0)", "damped(damp=1)"}
    assert {c.target for c in mine} == {30, 40} and all(c.used == (0, 10, 20) for c in mine)

    src = CheckpointSource.from_run_dir(small_run)
    res = run_backtest(src, cases)
    rel = {(c.label, c.target): res.overall(i).rel for i, c in enumerate(res.cases)}
    for t in (30, 40):
        assert rel[("damped(damp=0)", t)] == rel[(NO_CHANGE, t)] == 1.0  # damp 0: no change
        np.testing.assert_allclose(rel[("damped(damp=1)", t)], rel[("lstsq(3 steps)", t)],
                                   rtol=1e-6)
        assert rel[("damped(damp=1)", t)] < 1.0  # a linear run: the line helps

    with pytest.raises(PipelineError, match="--method damped needs --damp"):
        make_spec(src, "damped", to=60)
    with pytest.raises(PipelineError, match="--damp must be <= 1"):
        make_spec(src, "damped", to=60, damp=2)
    with pytest.raises(PipelineError, match="--damp only applies to --method damped"):
        make_spec(src, "lstsq", to=60, damp=0.5)
    export(src, tmp_path / "d0", make_spec(src, "damped", to=60, damp=0.0))
    got, last = load_file(tmp_path / "d0" / "model.safetensors"), load_file(
        small_run / "global_step_40" / "model.safetensors")
    for name in last:  # damp 0 writes the last checkpoint exactly
        np.testing.assert_array_equal(got[name], last[name])
    with safe_open(tmp_path / "d0" / "model.safetensors", "np") as f:
        assert f.metadata()["method"] == "damped" and float(f.metadata()["damp"]) == 0.0


@pytest.mark.parametrize("name", M.names())
def test_every_registered_method_round_trips_through_export(name, tiny_run_fp32, tmp_path):
    """Export with the method's typical parameters, load with transformers, check the bits.

    A 1-D moving tensor (a bias) is also predicted by the method on the whole
    tensor at once: the streamed row blocks of the export must give the same bits.
    """
    from transformers import AutoModelForCausalLM

    m = M.get(name)
    src = CheckpointSource.from_run_dir(tiny_run_fp32)
    target = src.steps[-1] + (src.steps[-1] - src.steps[0]) // 4
    spec = make_spec(src, name, to=target, **m.typical_params())
    out = tmp_path / name
    res = export(src, out, spec)
    got = load_file(out / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(out)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    assert set(got) <= set(state)
    for k, v in got.items():
        np.testing.assert_array_equal(state[k], v, err_msg=k)
    with safe_open(out / "model.safetensors", "np") as f:
        md = f.metadata()
    assert md["method"] == name and float(md["target_step"]) == target
    assert all(float(md[k]) == v for k, v in spec.params)

    last = load_file(tiny_run_fp32 / f"global_step_{src.steps[-1]}" / "model.safetensors")
    assert any(not np.array_equal(got[k], last[k]) for k in res.moved)  # something moved
    plans = {p.name: p for p in build_plan(src, spec)}
    vec = next(p for p in plans.values() if p.action == "move" and len(p.shape) == 1)
    steps = m.input_steps(spec.steps, m.prepares(vec))
    block = M.BlockInput(tuple(src.read(vec.name, s, None) for s in steps), spec.steps,
                         spec.target, spec.alpha)
    want = K.round_to(m.predict(block, spec.param_values), vec.out_dtype)
    np.testing.assert_array_equal(got[vec.name], want, err_msg=vec.name)


def test_register_refuses_a_duplicate_name_or_an_unknown_step_rule():
    m = M.get(M.DEFAULT_METHOD)
    with pytest.raises(ValueError, match="already registered"):
        M.register(m)
    with pytest.raises(ValueError, match="step_rule"):
        M.register(replace(m, name=m.name + "-copy", step_rule="triple"))  # type: ignore[arg-type]
    assert m.name + "-copy" not in M.names()
    with pytest.raises(PipelineError, match="unknown method"):
        M.get(m.name + "-copy")


def test_backtest_plan_refuses_a_parameter_without_values(damped):
    bare = replace(damped, name="damped-bare",
                   params=(replace(damped.params[0], sweep=(), typical=None),))
    M.register(bare)
    try:
        with pytest.raises(PipelineError, match="--method damped-bare needs --damp"):
            plan_cases(STEPS, methods=[bare.name])
        cases = plan_cases(STEPS, methods=[bare.name], sweep={"damp": [0.25]})
        assert {c.label for c in cases} == {NO_CHANGE, "damped-bare(damp=0.25)"}
    finally:
        M.unregister(bare.name)
