"""The README's main command, end to end on a real tiny run, and re-run cheaply."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

from transformers import AutoModelForCausalLM

import pipeline


def test_demo_end_to_end_then_rerun(tiny_run_bf16: Path, tmp_path: Path) -> None:
    cat = tmp_path / "catalog.yaml"
    cat.write_text(
        "default: r\nruns:\n  r:\n"
        f"    checkpoints: {tiny_run_bf16}\n    store: run.zarr\n    outputs: out\n"
    )
    cmd = [sys.executable, "-m", "pipeline", "demo", "--catalog", str(cat)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    run = pipeline.open_run(tmp_path / "run.zarr")
    assert run.steps == list(range(0, 101, 10))
    assert "store / checkpoints" in first.stdout and "median R²" in first.stdout
    # the linearity alarm judged every checkpoint after the first two, once
    alarms = [json.loads(line) for line in (tmp_path / "out" / "alarm.jsonl").open()]
    assert [a["step"] for a in alarms] == list(range(0, 101, 10))
    assert all(a["status"] in ("ok", "alarm") for a in alarms[2:])
    assert "linearity alarm" in first.stdout

    with open(tmp_path / "out" / "fit" / "summary_layer_module_moving.csv") as f:
        modules = {row["module"] for row in csv.DictReader(f)}
    assert {"q_proj", "down_proj", "lm_head"} <= modules, modules
    page = (tmp_path / "out" / "report" / "index.html").read_text()
    assert page.count("<img") >= 7 and "Backtest" in page
    assert "Token log-prob R²" in page and "Example token log-prob trajectories" in page
    # token log-probs: every probe token of every checkpoint, fitted with its null
    summary = json.loads((tmp_path / "out" / "logprobs.fit" / "token_summary.json").read_text())
    assert summary["steps"] == list(range(0, 101, 10))
    assert {r["array"] for r in summary["rows"]} == {"logprob", "logit"}
    assert "log-probs of" in first.stdout and "(11 new)" in first.stdout

    for method in ("two-point", "rank1", "gated"):  # every demo model loads with transformers
        exported = tmp_path / "out" / f"extrapolated-{method}-step120"
        assert (exported / "model.safetensors").exists()
        model = AutoModelForCausalLM.from_pretrained(exported)
        assert model.config.model_type == "qwen2"
    assert "rank-1 drift" in first.stdout
    # logits extrapolation evaluated beside the weight-extrapolated models and the last checkpoint
    assert re.search(r"logits extrapolation 80 -> 100 \(alpha 2\) -> step 120", first.stdout)
    assert "avg@4" in first.stdout and "pass@4" in first.stdout

    # the report command alone finds the token fit of the catalog entry and shows its panels
    (tmp_path / "out" / "report" / "index.html").unlink()
    rep = subprocess.run([sys.executable, "-m", "pipeline", "report", "r", "--catalog", str(cat),
                          "--no-backtest", "--out", str(tmp_path / "out" / "report")],
                         capture_output=True, text=True, timeout=600)
    assert rep.returncode == 0, rep.stderr[-3000:]
    assert "Token log-prob R²" in (tmp_path / "out" / "report" / "index.html").read_text()

    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert re.search(r"steps skipped \(unchanged\)\s*│\s*11\s", second.stdout)
    assert re.search(r"steps ingested\s*│\s*0\s", second.stdout)
    assert "(0 new)" in second.stdout  # probes kept, no log-prob row recomputed
    assert len((tmp_path / "out" / "alarm.jsonl").read_text().splitlines()) == 11  # not redone
