"""The external RL-Extra loop, driven by a separate trainer process, as verl would be.

Two commands: the project's own tiny GRPO trainer (``tests/rl_extra_trainer.py``,
real RL, ~15 s a cycle for a fresh torch/TRL process: the slow variant) and a
stand-in that moves every weight by a seeded known step
(``tests/rl_extra_nudge_trainer.py``, well under a second: the default
variant). Both know nothing of RL-Extra. Every jump is recomputed in float64
from the files the command wrote; the resume and the ledger are checked on
both, the refusals on the fast one.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from pipeline.checkpoints.discover import STEP_META_FILE, discover_checkpoints
from pipeline.errors import PipelineError
from pipeline.extrapolate.plan import DEFAULT_EXCLUDE, matches
from pipeline.rl.extra_loop import LEDGER_FILE, render_command, run_rl_extra


def _command(script: str) -> str:
    path = Path(__file__).with_name(script)
    return (f"{shlex.quote(sys.executable)} {shlex.quote(str(path))} --init {{init}} "
            "--out {out} --steps {m} --seed {cycle}")


CMD = _command("rl_extra_nudge_trainer.py")
COMMANDS = {"nudge": CMD, "grpo": _command("rl_extra_trainer.py")}
M, N = 2, 2


def _quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="module", params=["nudge", pytest.param("grpo", marks=pytest.mark.slow)])
def loop_run(request, tmp_path_factory, tiny_run_fp32):
    """One cycle, then the same command asked for two: the second call resumes."""
    cmd = COMMANDS[request.param]
    out = tmp_path_factory.mktemp("loop") / "rlx"
    init = tiny_run_fp32 / "global_step_0"
    first = run_rl_extra(cmd, M, N, 1, init, out, log=_quiet)
    stamp = {p: p.stat().st_mtime_ns for p in (out / "run" / "global_step_2").iterdir()}
    log0 = (out / "cycles" / "cycle_000" / "train.log").stat().st_mtime_ns
    second = run_rl_extra(cmd, M, N, 2, init, out, log=_quiet)
    return out, init, first, second, stamp, log0, cmd


def _check_jump(start: Path, end: Path, got: Path, alpha: float) -> None:
    s_, e_, g_ = (load_file(p / "model.safetensors") for p in (start, end, got))
    assert set(s_) == set(e_) == set(g_)
    for name in g_:
        s, e, g = s_[name].astype(np.float64), e_[name].astype(np.float64), g_[name]
        if matches(name, DEFAULT_EXCLUDE):
            np.testing.assert_array_equal(g, e_[name])  # norms: the trained values
            continue
        want = s + alpha * (e - s)
        tol = 4 * np.finfo(np.float32).eps * (np.abs(s) + alpha * np.abs(e - s))
        assert np.all(np.abs(g - want) <= tol + 1e-30), name
    moved = [n for n in g_ if not matches(n, DEFAULT_EXCLUDE)]
    d = sum(float(np.sum((e_[n].astype(np.float64) - s_[n]) ** 2)) for n in moved)
    assert d > 0  # the command did train: the check above is not trivial


def test_each_cycle_trains_from_the_last_jump_and_jumps_by_eq3(loop_run):
    out, init, first, second, *_ = loop_run
    alpha = (M + N) / M
    run, cyc = out / "run", out / "cycles"
    # global_step_0 of the run is --init; each cycle's end is what the command wrote
    for name in ("model.safetensors", "config.json"):
        assert (run / "global_step_0" / name).read_bytes() == (init / name).read_bytes()
    _check_jump(run / "global_step_0", cyc / "cycle_000" / "train" / "global_step_2",
                run / "global_step_2", alpha)
    _check_jump(run / "global_step_2", cyc / "cycle_001" / "train" / "global_step_2",
                run / "global_step_4", alpha)
    # the command of cycle 1 really started from the jumped model (it saved what it loaded)
    loaded = load_file(cyc / "cycle_001" / "train" / "global_step_0" / "model.safetensors")
    jumped = load_file(run / "global_step_2" / "model.safetensors")
    assert loaded.keys() == jumped.keys()
    for name in jumped:
        np.testing.assert_array_equal(loaded[name], jumped[name])


def test_the_run_folder_is_on_the_nominal_axis(loop_run):
    out, *_ = loop_run
    cps = discover_checkpoints(out / "run")
    assert [(c.step, c.real_step) for c in cps] == [(0, 0), (4, 2), (8, 4)]
    meta = json.loads((out / "run" / "global_step_4" / STEP_META_FILE).read_text())
    assert meta["cycle"] == 1 and meta["jumps"] == 2
    ledger = json.loads((out / LEDGER_FILE).read_text())
    assert [(c["cycle"], c["real_step"], c["nominal_step"]) for c in ledger["cycles"]] == [
        (0, 2, 4), (1, 4, 8)]
    assert ledger["settings"]["m"] == M and ledger["settings"]["n"] == N


def test_a_resumed_run_never_repeats_a_cycle(loop_run):
    out, init, first, second, stamp, log0, cmd = loop_run
    assert first.ran == [0] and second.ran == [1]
    assert {p: p.stat().st_mtime_ns for p in (out / "run" / "global_step_2").iterdir()} == stamp
    assert (out / "cycles" / "cycle_000" / "train.log").stat().st_mtime_ns == log0
    again = run_rl_extra(cmd, M, N, 2, init, out, log=_quiet)
    assert again.ran == [] and again.last_model == out / "run" / "global_step_4"


@pytest.mark.parametrize("change, match", [
    ({"n": 3}, "other settings \\(n: 2 there, 3 now\\)"),
    ({"trainer_cmd": CMD + " --extra"}, "other settings \\(trainer_cmd"),
    ({"exclude": ()}, "other settings \\(exclude"),
])
def test_a_resume_with_other_settings_is_refused(loop_run, change, match):
    out, init, *_, cmd = loop_run
    if "trainer_cmd" in change:
        change = {"trainer_cmd": cmd + " --extra"}
    kw = {"trainer_cmd": cmd, "m": M, "n": N, "cycles": 3, "init": init, "out": out,
          "log": _quiet, **change}
    with pytest.raises(PipelineError, match=match):
        run_rl_extra(**kw)
    assert len(json.loads((out / LEDGER_FILE).read_text())["cycles"]) == 2


@pytest.mark.parametrize("kw, match", [
    ({"m": 0}, "-m must be >= 1"), ({"n": -1}, "-n must be >= 0"),
    ({"cycles": 0}, "--cycles must be >= 1"),
    ({"trainer_cmd": "train --from {model}"}, "unknown placeholder \\{model\\}"),
    ({"trainer_cmd": "train --out {out}"}, "must contain \\{init\\}"),
    ({"checkpoint_glob": "/abs/global_step_*"}, "relative glob"),
    ({"checkpoint_glob": "step_{steps}"}, "--checkpoint-glob: unknown placeholder"),
])
def test_bad_input_is_refused_before_anything_is_written(tmp_path, tiny_run_fp32, kw, match):
    args = {"trainer_cmd": CMD, "m": 2, "n": 1, "cycles": 1,
            "init": tiny_run_fp32 / "global_step_0", "out": tmp_path / "rlx", "log": _quiet,
            **kw}
    with pytest.raises(PipelineError, match=match):
        run_rl_extra(**args)
    assert not (tmp_path / "rlx").exists()


def test_an_init_that_is_not_a_model_is_refused(tmp_path):
    with pytest.raises(PipelineError, match="--init must be a model folder"):
        run_rl_extra(CMD, 2, 1, 1, tmp_path, tmp_path / "rlx", log=_quiet)


def _fails(tmp_path, init, cmd, match):
    out = tmp_path / "rlx"
    with pytest.raises(PipelineError, match=match):
        run_rl_extra(cmd, 2, 1, 1, init, out, log=_quiet)
    ledger = json.loads((out / LEDGER_FILE).read_text())
    assert ledger["cycles"] == []
    # the last good model (here the start) is intact and nothing jumped was published
    assert (out / "run" / "global_step_0" / "model.safetensors").read_bytes() == (
        init / "model.safetensors").read_bytes()
    assert [p.name for p in (out / "run").iterdir()] == ["global_step_0"]
    return out


def test_a_failing_command_is_a_clear_error(tmp_path, tiny_run_fp32):
    init = tiny_run_fp32 / "global_step_0"
    out = _fails(tmp_path, init, "echo starting {init}; exit 3",
                 "cycle 0: the trainer command failed \\(exit code 3\\).*last good model")
    assert "starting" in (out / "cycles" / "cycle_000" / "train.log").read_text()


def test_a_command_without_checkpoint_is_a_clear_error(tmp_path, tiny_run_fp32):
    _fails(tmp_path, tiny_run_fp32 / "global_step_0", "echo {init} {out}",
           "produced no checkpoint matching 'global_step_2'")


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path, tiny_run_fp32,
                                                         tiny_run_tied):
    other = tiny_run_tied / "global_step_0"  # llama with tied embeddings, not qwen2
    _fails(tmp_path, tiny_run_fp32 / "global_step_0",
           f"echo {{init}}; cp -r {shlex.quote(str(other))} {{out}}/global_step_{{m}}",
           "another architecture than the cycle's init model")


def test_render_command_quotes_paths():
    cmd = render_command("train {init} --steps {m}", {"init": "/a b/c", "m": 3})
    assert shlex.split(cmd) == ["train", "/a b/c", "--steps", "3"]


def test_cli_runs_and_resumes_a_loop(tmp_path, tiny_run_fp32):
    from typer.testing import CliRunner

    from pipeline.cli import app

    init = tiny_run_fp32 / "global_step_0"
    out = tmp_path / "rlx"
    args = ["rl-extra", "--trainer-cmd", CMD, "-m", "3", "-n", "6", "--init", str(init),
            "--out", str(out)]
    runner = CliRunner(env={"COLUMNS": "200"})
    r = runner.invoke(app, [*args, "--cycles", "1"])
    assert r.exit_code == 0, r.output
    assert "last model:" in r.output and "global_step_3" in r.output
    r = runner.invoke(app, [*args, "--cycles", "2"])
    assert r.exit_code == 0, r.output
    assert "(earlier run)" in r.output
    assert [(c.step, c.real_step) for c in discover_checkpoints(out / "run")] == [
        (0, 0), (9, 3), (18, 6)]
    r = runner.invoke(app, [*args[:4], "0", *args[5:], "--cycles", "2"])
    assert r.exit_code == 2
    assert r.output.strip().splitlines()[-1] == "error: -m must be >= 1, got 0"


def test_a_failed_first_cycle_can_be_rerun_with_a_fixed_command(tmp_path, tiny_run_fp32):
    init = tiny_run_fp32 / "global_step_0"
    out = _fails(tmp_path, init, "echo {init}; exit 1", "exit code 1")
    res = run_rl_extra(CMD, 2, 1, 1, init, out, log=_quiet)  # no cycle done: the fix is taken
    assert res.ran == [0]
    assert json.loads((out / LEDGER_FILE).read_text())["settings"]["trainer_cmd"] == CMD
    assert [c.step for c in discover_checkpoints(out / "run")] == [0, 3]


def test_a_model_that_landed_before_the_ledger_is_adopted_not_retrained(tmp_path,
                                                                        tiny_run_fp32):
    init = tiny_run_fp32 / "global_step_0"
    out = tmp_path / "rlx"
    run_rl_extra(CMD, 2, 1, 1, init, out, log=_quiet)
    ledger = json.loads((out / LEDGER_FILE).read_text())
    ledger["cycles"] = []  # as if the process died between publishing and recording
    (out / LEDGER_FILE).write_text(json.dumps(ledger))
    log = out / "cycles" / "cycle_000" / "train.log"
    before = log.stat().st_mtime_ns
    res = run_rl_extra(CMD, 2, 1, 2, init, out, log=_quiet)
    assert res.ran == [0, 1] and res.cycles[0].seconds == 0.0  # adopted, then cycle 1 ran
    assert log.stat().st_mtime_ns == before  # cycle 0's command did not run again
    assert [c.step for c in discover_checkpoints(out / "run")] == [0, 3, 6]


def test_an_unfinished_cycle_is_redone(tmp_path, tiny_run_fp32):
    init = tiny_run_fp32 / "global_step_0"
    out = tmp_path / "rlx"
    run_rl_extra(CMD, 2, 1, 1, init, out, log=_quiet)
    stale = out / "cycles" / "cycle_001" / "train" / "global_step_2"
    stale.mkdir(parents=True)  # a crashed attempt's half-written checkpoint
    (stale / "model.safetensors").write_bytes(b"\0" * 10)
    res = run_rl_extra(CMD, 2, 1, 2, init, out, log=_quiet)
    assert res.ran == [1]
    assert (stale / "model.safetensors").stat().st_size > 10  # written anew by the command


def test_a_resume_with_another_init_is_refused(tmp_path, tiny_run_fp32, tiny_run_tied):
    out = tmp_path / "rlx"
    run_rl_extra(CMD, 2, 1, 1, tiny_run_fp32 / "global_step_0", out, log=_quiet)
    with pytest.raises(PipelineError, match="other settings \\(init"):
        run_rl_extra(CMD, 2, 1, 2, tiny_run_tied / "global_step_0", out, log=_quiet)
