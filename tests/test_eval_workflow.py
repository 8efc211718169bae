"""workflows/output_table.py end to end on the embedded run (16 problems x 2 samples: ~3 s)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

WORKFLOW = Path(__file__).resolve().parents[1] / "workflows" / "output_table.py"


def _load():
    spec = importlib.util.spec_from_file_location("workflows_output_table", WORKFLOW)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while being defined
    spec.loader.exec_module(mod)
    return mod


def test_output_table_rows_and_resume(tiny_run_linear, tmp_path, capsys):
    mod = _load()
    args = [str(tiny_run_linear), "--out", str(tmp_path), "--n", "16", "-k", "2",
            "--targets", "200", "240"]
    mod.main(args)
    doc = json.loads((tmp_path / "output_table.json").read_text())
    kinds = [(r["target"], r["kind"]) for r in doc["rows"]]
    assert kinds == [(200, "real"), (200, "start (t1)"), (200, "logits"), *[(200, "weights")] * 3,
                     (240, "start (t1)"), (240, "logits"), *[(240, "weights")] * 3]
    for r in doc["rows"]:
        for e in r["overall"].values():
            assert e["ci_low"] <= e["value"] <= e["ci_high"]
    refs = {200: doc["rows"][0], 240: doc["rows"][6]}  # the real checkpoint at t, else t1
    for r in doc["rows"]:
        d = r["avg_minus_reference"]
        if r is refs[r["target"]]:
            assert d is None
        else:
            assert d["value"] == pytest.approx(
                r["overall"]["avg@2"]["value"] - refs[r["target"]]["overall"]["avg@2"]["value"])
            assert d["ci_low"] <= d["value"] <= d["ci_high"]
    assert (tmp_path / "output_table.md").read_text().count("\n| 2") == len(doc["rows"])
    first = re.findall(r"\((\d+) generated", capsys.readouterr().out)
    assert first.count("32") == len(doc["rows"]) - 1  # real 200 is also t1 of target 240
    mod.main(args)  # every row resumes from its folder: nothing is generated again
    again = re.findall(r"\((\d+) generated", capsys.readouterr().out)
    assert again == ["0"] * len(doc["rows"])
