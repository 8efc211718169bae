"""The RL-Extra experiment in quick mode: real tiny GRPO runs, files checked, ratios recomputed.

Quick mode trains a short warm start and 8 real GRPO steps per arm (1 seed,
m and n scaled by 1/10), so the numbers mean nothing; what is checked is the
bookkeeping: every file's structure, the nominal steps against the jumps
recorded, and every ratio and fixed-budget accuracy recomputed here from
the recorded curves alone.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.errors import PipelineError

REPO = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location(
        "rl_extra_experiment", REPO / "workflows" / "rl_extra_experiment.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


E = _load()


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("exp")
    E.run_experiment(out, E.QUICK, log=lambda _m: None)
    return out


def _first(curve, thr, key="real_step"):
    for p in sorted(curve, key=lambda p: p["real_step"]):
        if p["accuracy"] >= thr:
            return p[key]
    return None


def test_the_files_and_their_structure(quick):
    doc = json.loads((quick / E.RESULTS).read_text())
    arms, seeds = list(E.ARMS), ["0"]
    assert list(doc["runs"]) == arms and list(doc["summary"]) == arms
    assert doc["settings"]["steps"] == 8 and doc["machine"]["cores"] >= 1
    want_steps = [0, 2, 4, 6, 8]
    for a in arms:
        for s in seeds:
            r = doc["runs"][a][s]
            assert [p["real_step"] for p in r["curve"]] == want_steps
            assert all(0.0 <= p["accuracy"] <= 1.0 for p in r["curve"])
            secs = [p["seconds"] for p in r["curve"]]
            assert secs == sorted(secs) and secs[-1] > 0
            arm = doc["arms"][a]
            jumps = (r["rl_extra"] or {}).get("jumps", [])
            if not arm["m"]:
                assert all(p["nominal_step"] == p["real_step"] for p in r["curve"])
                continue
            assert [j["real_step"] for j in jumps] == list(range(arm["m"], 9, arm["m"]))
            for p in r["curve"]:  # nominal = real + the n of every jump taken so far
                extra = sum(j["n"] for j in jumps
                            if j["real_step"] <= p["real_step"] and not j["skipped"])
                assert p["nominal_step"] == p["real_step"] + extra
            if arm["adaptive"]:
                assert all(j["action"] in ("grow", "keep", "shrink", "skip") for j in jumps)
    # the plain arms start from the same warm start: the same step-0 accuracy
    assert len({doc["runs"][a]["0"]["curve"][0]["accuracy"] for a in arms}) == 1
    with (quick / E.CURVES).open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(arms) * len(seeds) * len(want_steps)
    with (quick / E.SUMMARY).open() as f:
        assert [r["arm"] for r in csv.DictReader(f)] == arms
    assert (quick / E.PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| grpo |" in E.markdown_table(doc)


def test_the_ratios_are_recomputed_from_the_curves(quick):
    doc = json.loads((quick / E.RESULTS).read_text())
    steps = doc["settings"]["steps"]
    base = doc["runs"]["grpo"]
    for a, summ in doc["summary"].items():
        for s, r in doc["runs"][a].items():
            got = summ["steps_to_grpo_final"][s]
            thr = base[s]["curve"][-1]["accuracy"]  # GRPO's final accuracy on this seed
            assert got["threshold"] == thr
            g, x = _first(base[s]["curve"], thr), _first(r["curve"], thr)
            assert (got["grpo_steps"], got["arm_steps"]) == (g, x)
            assert g is not None and g <= steps  # GRPO reaches its own final accuracy
            if x is None or x == 0:
                assert got["ratio"] in (None, "inf")
            else:
                assert got["ratio"] == pytest.approx(g / x)
            gt, xt = _first(base[s]["curve"], thr, "seconds"), _first(r["curve"], thr, "seconds")
            if xt:
                assert got["time_ratio"] == pytest.approx(gt / xt)
            for b, acc in summ["accuracy_at"].items():
                last = max((p for p in r["curve"] if p["real_step"] <= int(b)),
                           key=lambda p: p["real_step"])
                assert acc["per_seed"][s] == last["accuracy"]
        ratios = [v["ratio"] for v in summ["steps_to_grpo_final"].values()]
        finite = [v for v in ratios if isinstance(v, float) and math.isfinite(v)]
        if finite:
            assert summ["ratio"]["mean"] == pytest.approx(sum(finite) / len(finite))
        assert summ["half_the_steps_on_every_seed"] == all(
            isinstance(v, float) and v >= 2 for v in ratios)
    assert doc["summary"]["grpo"]["ratio"]["mean"] == 1.0


def test_a_rerun_resumes_and_other_settings_are_refused(quick):
    done = quick / "runs" / "grpo" / "seed_0" / E.RUN_RESULT
    stamp = done.stat().st_mtime_ns
    E.run_experiment(quick, E.QUICK, log=lambda _m: None)
    assert done.stat().st_mtime_ns == stamp  # skipped, not retrained
    with pytest.raises(PipelineError, match="other settings"):
        E.run_experiment(quick, replace(E.QUICK, lr=1e-4), log=lambda _m: None)
    with pytest.raises(PipelineError, match="unknown arm"):
        E.run_experiment(quick, replace(E.QUICK, arms=("grpo", "nope")), log=lambda _m: None)
    with pytest.raises(PipelineError, match="must include 'grpo'"):
        E.run_experiment(quick, replace(E.QUICK, arms=("rlx-20-20",)), log=lambda _m: None)
