"""Property-based fuzz of the CLI's numeric options (issue 13): garbage in, one line out.

Random out-of-range, non-finite and unparsable values for the numeric options of
fit, extrapolate and backtest. Whatever the values, a command exits 0 or 2, never
prints a traceback or an internal error, and a refusal is one ``error:`` line (or
click's own usage error). A NaN or infinite number is always refused. The runs are
in-process (typer's CliRunner) on a 4-checkpoint run of two tiny tensors, so the
whole file takes a few seconds.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from pipeline.cli import app

RUNNER = CliRunner(env={"COLUMNS": "250"})  # click's usage panel must not wrap option names
FUZZ = settings(max_examples=25, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

SPECIAL = ["nan", "NaN", "-nan", "inf", "-inf", "+inf", "Infinity", "1e400", "-1e400",
           "1e-400", "0", "-0", "-1", "1", "2", "0.5", "1e308", "-1e308", "", " ", "abc",
           "0x10", "1_0", "1e", "--", "\x00", "9" * 40, "-" + "9" * 40]
NUMBER = st.one_of(
    st.sampled_from(SPECIAL),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=-10**25, max_value=10**25).map(str),
    st.text(max_size=6),
)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """Four checkpoints (steps 0..30) of two small tensors: every export takes milliseconds."""
    from safetensors.numpy import save_file

    run = tmp_path_factory.mktemp("fuzz") / "run"
    rng = np.random.default_rng(0)
    base = rng.standard_normal((4, 3)).astype(np.float32)
    step = rng.standard_normal((4, 3)).astype(np.float32)
    for i, s in enumerate((0, 10, 20, 30)):
        d = run / f"global_step_{s}"
        d.mkdir(parents=True)
        save_file({"w.weight": base + np.float32(0.01 * i) * step,
                   "norm.weight": np.ones(3, np.float32)},
                  str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    return run


def as_float(text: str) -> float | None:
    """How click reads a float option (None: unparsable, click refuses it itself)."""
    try:
        return float(text)
    except ValueError:
        return None


def is_int(text: str) -> bool:
    """Whether click reads ``text`` as an integer option."""
    try:
        int(text)
    except ValueError:
        return False
    return True


def non_finite(*texts: str) -> bool:
    return any((x := as_float(t)) is not None and not math.isfinite(x) for t in texts)


def check_clean(args: list[str]) -> tuple[int, str]:
    """Run the CLI; assert the exit code and the shape of its output. Returns both."""
    r = RUNNER.invoke(app, args)
    out = r.output
    assert r.exit_code in (0, 2), (args, r.exit_code, out)
    assert "Traceback" not in out, (args, out)
    assert "internal error" not in out, (args, out)
    if r.exit_code == 2:
        errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
        usage = "Invalid value" in out or "No such option" in out or "requires an argument" in out \
            or "Missing" in out or "Got unexpected extra argument" in out
        assert len(errors) == 1 or (not errors and usage), (args, out)
    return r.exit_code, out


@FUZZ
@given(bins=NUMBER, block_mb=NUMBER, start=NUMBER, stop=NUMBER)
@example(bins="100", block_mb="nan", start="0", stop="10")  # once a traceback
@example(bins="0", block_mb="4", start="0", stop="10")
def test_fit_options(tmp_path_factory, bins, block_mb, start, stop):
    """Every option is checked before the store is opened: a store that is not there is the
    error only when all the options are valid."""
    missing = tmp_path_factory.getbasetemp() / "no-store.zarr"
    code, out = check_clean(["fit", str(missing), "--bins", bins, "--block-mb", block_mb,
                             "--from", start, "--to", stop, "--no-progress"])
    assert code == 2
    if non_finite(block_mb) and all(map(is_int, (bins, start, stop))):
        assert "--block-mb must be a finite number" in out, out  # checked first of ours
    assert not missing.exists()


@FUZZ
@given(method=st.sampled_from(["two-point", "lstsq", "gated"]),
       target=st.tuples(st.sampled_from(["--to", "--alpha"]), NUMBER),
       r2_min=st.none() | NUMBER, window=st.none() | NUMBER,
       steps=st.none() | st.tuples(NUMBER, NUMBER))
@example(method="two-point", target=("--alpha", "nan"), r2_min=None, window=None,
         steps=None)  # once a NaN model, exit 0
@example(method="lstsq", target=("--to", "50"), r2_min=None, window="-3", steps=None)
def test_extrapolate_options(tiny_run, method, target, r2_min, window, steps):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "m"
        args = ["extrapolate", str(tiny_run), "--method", method, *target, "--out", str(out),
                "--no-progress"]
        if r2_min is not None:
            args += ["--r2-min", r2_min]
        if window is not None:
            args += ["--window", window]
        if steps is not None:
            args += ["--steps", *steps]
        code, out_text = check_clean(args)
        if non_finite(target[1], *([r2_min] if r2_min is not None else [])):
            assert code == 2, out_text
        if code == 0:
            from safetensors.numpy import load_file

            assert set(load_file(out / "model.safetensors")) == {"w.weight", "norm.weight"}
        else:
            assert not out.exists()


@settings(FUZZ, max_examples=10)
@given(holdout=st.none() | NUMBER, r2_min=st.lists(NUMBER, max_size=2),
       window=st.none() | NUMBER, cutoff=st.none() | NUMBER)
@example(holdout=None, r2_min=["nan"], window=None, cutoff=None)
def test_backtest_options(tiny_run, holdout, r2_min, window, cutoff):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bt"
        args = ["backtest", str(tiny_run), "--out", str(out), "--no-progress"]
        for name, v in (("--holdout", holdout), ("--window", window), ("--cutoff", cutoff)):
            if v is not None:
                args += [name, v]
        for r in r2_min:
            args += ["--r2-min", r]
        code, out_text = check_clean(args)
        if non_finite(*r2_min):
            assert code == 2, out_text
        assert (out / "backtest.csv").exists() == (code == 0)
