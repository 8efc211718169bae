"""Adaptive RL-Extra: the policy's forecast, its decisions and its refusals, on real GRPO runs.

Every run is the real TRL GRPOTrainer on the tiny model, started from the cached
fp32 layout run's warm-started model (nothing mocked). The weights the policy
sees are saved by a callback and a jump hook, and its forecast error is
recomputed from them in float64 by numpy alone. Runs differ across CPUs, so the
tests assert what must hold for any trajectory: the recomputation, the rule
that maps an error to a decision, the bookkeeping of n and of the nominal steps.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest

from pipeline.checkpoints.discover import discover_checkpoints
from pipeline.errors import PipelineError
from pipeline.rl.extra import Adaptive, RLExtra, RLExtraCallback
from pipeline.rl.tiny_run import RL_EXTRA_FILE, TinyRunConfig, make_tiny_run

# 12 real steps, segments of m=4 with a probe at 2: three decisions per run
CFG = TinyRunConfig(sft_steps=0, rl_steps=12, save_every=4, prompts_per_step=4, generations=4,
                    n_heldout=8)
M, N = 4, 4


@dataclass
class Saver:
    """float64 copies of every parameter: after each step (what the policy probes, or the
    jumped model at a jump step) and at each segment end before the jump."""

    after: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    ends: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)

    @staticmethod
    def grab(model) -> dict[str, np.ndarray]:
        return {k: v.detach().double().numpy().copy() for k, v in model.named_parameters()}

    def hook(self, phase, rec, model, optimizer) -> None:
        if phase == "before":
            self.ends[rec.real_step] = self.grab(model)

    def callback(self):
        from transformers import TrainerCallback

        saver = self

        class Save(TrainerCallback):  # runs after RLExtraCallback: sees the jumped model
            def on_train_begin(self, args, state, control, model=None, **kw):
                saver.after[0] = saver.grab(model)

            def on_step_end(self, args, state, control, model=None, **kw):
                saver.after[state.global_step] = saver.grab(model)

        return Save()


def _run(tmp: Path, policy: Adaptive, init: Path, cfg: TinyRunConfig = CFG, n: int = N
         ) -> tuple[Path, RLExtraCallback, Saver]:
    saver = Saver()
    cb = RLExtraCallback(RLExtra(m=M, n=n, policy=policy), hooks=[saver.hook])
    out = tmp / "run"
    make_tiny_run(out, cfg, log=lambda _m: None, progress=False, rl_extra=cb,
                  callbacks=[saver.callback()], init_model=init)
    return out, cb, saver


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, tiny_run_fp32):
    return _run(tmp_path_factory.mktemp("adaptive"), Adaptive(), tiny_run_fp32 / "global_step_0")


def _recompute(saver: Saver, cb: RLExtraCallback, end_step: int) -> tuple[float, float]:
    """(float64 error, float32-kernel error) of the segment ending at ``end_step``."""
    start, probe = saver.after[end_step - M], saver.after[end_step - M // 2]
    end = saver.ends[end_step]
    err64 = err32 = move = 0.0
    for name in cb.jumped_names:
        s, p, e = start[name], probe[name], end[name]
        pred = s + (M / (M // 2)) * (p - s)  # the line through start and probe, at the end
        err64 += float(np.sum((pred - e) ** 2))
        s32, p32 = s.astype(np.float32), p.astype(np.float32)
        pred32 = (s32 + np.float32(2.0) * (p32 - s32)).astype(np.float64)  # Eq. 2's order
        err32 += float(np.sum((pred32 - e) ** 2))
        move += float(np.sum((e - p) ** 2))
    return math.sqrt(err64 / move), math.sqrt(err32 / move)


def test_the_forecast_error_is_the_segments_own(default_run):
    """Each decision's error = ||(start + 2 (probe - start)) - end|| / ||end - probe||,
    recomputed from the saved weights: float64 to float32 rounding, float32 bit-level."""
    _, cb, saver = default_run
    assert [r.real_step for r in cb.records] == [4, 8, 12]
    # at lr 3e-5 a warm-started policy keeps learning: its segments move
    assert sum(math.isfinite(r.forecast_error) for r in cb.records) >= 2
    for r in cb.records:
        assert r.forecast_steps == (r.real_step - M, r.real_step - M // 2)
        if r.forecast_error is None or math.isnan(r.forecast_error):  # did not move: skipped
            assert r.action == "skip"
            continue
        e64, e32 = _recompute(saver, cb, r.real_step)
        assert r.forecast_error == pytest.approx(e32, rel=1e-9)
        assert r.forecast_error == pytest.approx(e64, rel=1e-3)
        assert 0.05 < r.forecast_error < 5  # a real, moving segment: neither 0 nor absurd


def test_decisions_follow_the_rule_and_the_weights_follow_the_decisions(default_run):
    out, cb, saver = default_run
    policy = cb.spec.policy
    n, extra = N, 0
    for r in cb.records:
        d = policy.decide(r.forecast_error, n)
        assert (r.action, r.n, r.n_next, r.skipped) == (d.action, d.n, d.n_next,
                                                         d.action == "skip")
        end, after = saver.ends[r.real_step], saver.after[r.real_step]
        start = saver.after[r.real_step - M]
        for name in cb.jumped_names[:3]:
            if r.skipped:  # left as trained
                np.testing.assert_array_equal(after[name], end[name])
            else:  # Eq. 3 with this jump's n
                want = start[name] + (M + r.n) / M * (end[name] - start[name])
                np.testing.assert_allclose(after[name], want, rtol=0, atol=1e-6)
        extra += r.n
        assert r.nominal_step == r.real_step + extra
        n = d.n_next
    assert cb.n_current == n
    summary = json.loads((out / RL_EXTRA_FILE).read_text())
    assert [j["action"] for j in summary["jumps"]] == [r.action for r in cb.records]
    assert summary["adaptive"]["extra_steps"] == extra
    assert summary["rl_extra"]["policy"]["skip_above"] == policy.skip_above
    # the checkpoints carry the same nominal steps (ingest places them by these)
    got = {c.real_step: c.step for c in discover_checkpoints(out)}
    assert got == {0: 0, **{r.real_step: r.nominal_step for r in cb.records}}


def test_below_the_threshold_n_grows_above_it_the_jump_is_skipped(tmp_path, tiny_run_fp32):
    """Thresholds on either side of every real error: always grow, or always skip."""
    init = tiny_run_fp32 / "global_step_0"
    _, grow, _ = _run(tmp_path / "grow", Adaptive(grow_below=50, shrink_above=60, skip_above=70,
                                                  grow=2.0, n_max=20), init)
    assert all(r.forecast_error < 50 for r in grow.records)  # (NaN fails too)
    assert [(r.action, r.n) for r in grow.records] == [("grow", 8), ("grow", 16), ("grow", 20)]
    assert grow.nominal_step(12) == 12 + 8 + 16 + 20
    _, skip, saver = _run(tmp_path / "skip", Adaptive(grow_below=0.0, shrink_above=0.0,
                                                      skip_above=0.01, n_min=2), init)
    assert [r.action for r in skip.records] == ["skip"] * 3
    assert [r.n_next for r in skip.records] == [2, 2, 2]
    assert skip.jumps == 0 and skip.nominal_step(12) == 12
    for step in (4, 8, 12):  # nothing moved but the training
        np.testing.assert_array_equal(saver.after[step][skip.jumped_names[0]],
                                      saver.ends[step][skip.jumped_names[0]])


def test_a_broken_line_is_not_extrapolated(tmp_path, tiny_run_fp32):
    """lr 5e-3 breaks the line (the policy collapses, then stops moving): with the
    default policy most segments are skipped or shrunk, and none grows n after the first."""
    _, cb, _ = _run(tmp_path, Adaptive(), tiny_run_fp32 / "global_step_0",
                    replace(CFG, lr=5e-3))
    acts = [r.action for r in cb.records]
    assert sum(a in ("skip", "shrink") for a in acts) >= 2, acts
    assert sum(r.n for r in cb.records) < 3 * N


@pytest.mark.parametrize("kw, match", [
    ({"n_min": -1}, "n_min .* >= 0"), ({"n_min": 5, "n_max": 4}, "n_max .* >= 5"),
    ({"grow": 1.0}, "grow .* > 1"), ({"shrink": 0.0}, "shrink"), ({"shrink": 1.0}, "shrink"),
    ({"grow_below": 0.9, "shrink_above": 0.5}, "shrink_above .* >= 0.9"),
    ({"skip_above": 0.5}, "skip_above"), ({"probes": 0}, "probes .* >= 1"),
    ({"method": "nope"}, "unknown method"), ({"grow_below": float("nan")}, "grow_below"),
])
def test_bad_policy_settings_are_refused(kw, match):
    with pytest.raises(PipelineError, match=match):
        Adaptive(**kw)


def test_bad_combinations_are_refused():
    with pytest.raises(PipelineError, match="m >= probes \\+ 1 = 3"):
        RLExtra(m=2, n=2, policy=Adaptive(probes=2))
    with pytest.raises(PipelineError, match="within the policy's"):
        RLExtra(m=4, n=0, policy=Adaptive(n_min=1))
    with pytest.raises(PipelineError, match="policy must be an Adaptive"):
        RLExtra(m=4, n=4, policy="adaptive")  # type: ignore[arg-type]
    with pytest.raises(PipelineError, match="depends on the jumps"):
        RLExtra(m=4, n=4, policy=Adaptive()).nominal_step(8)


def test_the_rule():
    p = Adaptive(n_min=2, n_max=30, grow_below=0.5, shrink_above=1.0, skip_above=1.5,
                 grow=1.5, shrink=0.5)
    assert p.decide(0.2, 10) == (d := p.decide(0.5, 10)) and (d.action, d.n) == ("grow", 15)
    assert p.decide(0.2, 25).n == 30 and p.decide(0.2, 2).n == 3  # capped; always +1 at least
    assert (p.decide(0.8, 10).action, p.decide(0.8, 10).n) == ("keep", 10)
    assert (p.decide(1.2, 10).action, p.decide(1.2, 10).n) == ("shrink", 5)
    assert p.decide(1.2, 3).n == 2  # floored at n_min
    s = p.decide(1.6, 10)
    assert (s.action, s.n, s.n_next) == ("skip", 0, 5)
    assert p.decide(math.nan, 10).action == "skip"
    assert p.probe_offsets(10) == (5,) and Adaptive(probes=3).probe_offsets(8) == (2, 4, 6)
