"""``catalog.resolve``: one place turns a command's argument into a run's folders."""

from __future__ import annotations

import pytest

from pipeline.catalog import resolve
from pipeline.errors import PipelineError


def test_name_and_path(tmp_path, monkeypatch):
    cat = tmp_path / "cat.yaml"
    cat.write_text("runs:\n  r1:\n    checkpoints: ck\n    store: s.zarr\n    outputs: out\n"
                   "    step_pattern: 'step(?P<step>\\d+)'\n")
    t = resolve("r1", cat)
    assert (t.checkpoints, t.store) == (tmp_path / "ck", tmp_path / "s.zarr")
    assert t.output("fit") == tmp_path / "out" / "fit"
    assert t.step_pattern == "step(?P<step>\\d+)"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r1").mkdir()  # an existing folder of that name is a path, not the entry
    t = resolve("r1", cat)
    assert t.entry is None and t.checkpoints == t.store == t.path
    assert t.output("fit") is None and str(t.output("fit", "x")) == "x"
    assert resolve("a/b", cat).entry is None
    with pytest.raises(PipelineError, match="no run named 'r2'"):
        resolve("r2", cat)
