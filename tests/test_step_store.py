"""The generic append-only step store: commit marker last, resume, readers see committed steps."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.steps.store import ArraySpec, StepStore

ARRAYS = {"logprob": ArraySpec((5, 3), "float32", chunk=(2, 3)),
          "a/../b": ArraySpec((4,), "uint16")}  # a hostile name: escaped, never a path


def _values(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(step)
    return {"logprob": rng.standard_normal((5, 3)).astype(np.float32),
            "a/../b": rng.integers(0, 2**16, 4).astype(np.uint16)}


def test_append_and_read_back(tmp_path):
    st = StepStore.create(tmp_path / "s.zarr", "logprobs", ARRAYS, {"probes": "p.jsonl"})
    assert st.steps == [] and st.attrs == {"probes": "p.jsonl"}
    want = {s: _values(s) for s in (0, 10, 30)}
    for s, v in want.items():
        st.append(s, v, {"folder": f"global_step_{s}"})
    r = StepStore.open(tmp_path / "s.zarr", kind="logprobs")
    assert r.steps == [0, 10, 30] and r.names == sorted(ARRAYS)
    for name in ARRAYS:
        np.testing.assert_array_equal(r.read_block(name), np.stack([want[s][name] for s in want]))
        np.testing.assert_array_equal(r.read_block(name, [2, 0]), np.stack([want[30][name],
                                                                     want[0][name]]))
    np.testing.assert_array_equal(r.read_block("logprob", slice(1, 3), rows=slice(1, 4)),
                                  np.stack([want[10]["logprob"][1:4], want[30]["logprob"][1:4]]))
    assert r.record(1) == {"step": 10, "folder": "global_step_10"}
    assert sorted(p.name for p in (tmp_path / "s.zarr").iterdir()) == \
        ["arrays", "records", "step", "zarr.json"]  # nothing landed beside the arrays
    assert len([p for p in (tmp_path / "s.zarr" / "arrays").iterdir() if p.is_dir()]) == 2


def test_bad_appends_are_refused_and_change_nothing(tmp_path):
    st = StepStore.create(tmp_path / "s.zarr", "logprobs", ARRAYS)
    st.append(10, _values(10))
    with pytest.raises(PipelineError, match="not after the last committed step 10"):
        st.append(10, _values(10))
    with pytest.raises(PipelineError, match="not after the last committed step 10"):
        st.append(5, _values(5))
    bad = _values(20)
    bad["logprob"] = bad["logprob"][:4]
    with pytest.raises(PipelineError, match=r"logprob: a step of shape \(4, 3\)"):
        st.append(20, bad)
    with pytest.raises(PipelineError, match="missing arrays"):
        st.append(20, {"logprob": _values(20)["logprob"]})
    r = StepStore.open(tmp_path / "s.zarr")
    assert r.steps == [10]
    np.testing.assert_array_equal(r.read("logprob", 10), _values(10)["logprob"])
    with pytest.raises(PipelineError, match="positions \\[1\\] are not committed"):
        r.read_block("logprob", [1])
    with pytest.raises(PipelineError, match="is a 'logprobs' step store, not 'weights'"):
        StepStore.open(tmp_path / "s.zarr", kind="weights")
    with pytest.raises(PipelineError, match="already holds 1 committed steps"):
        StepStore.create(tmp_path / "s.zarr", "logprobs", ARRAYS)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "precious.txt").write_text("x")
    with pytest.raises(PipelineError, match="not a step store"):
        StepStore.create(tmp_path / "other", "logprobs", ARRAYS)
    assert (tmp_path / "other" / "precious.txt").read_text() == "x"


KILLED_WRITER = """
import os, sys
import numpy as np
from pipeline.steps.store import StepStore
st = StepStore.open(sys.argv[1])
i = st.begin(20)
st.write("logprob", i, np.full((5, 3), 7.0, np.float32))
os._exit(9)  # killed after writing, before the commit marker
"""


def test_a_killed_writer_is_invisible_and_resumed(tmp_path):
    path = tmp_path / "s.zarr"
    st = StepStore.create(path, "logprobs", ARRAYS)
    st.append(10, _values(10))
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED_WRITER), str(path)])
    assert p.returncode == 9
    r = StepStore.open(path)
    assert r.steps == [10]  # the half-written step 20 is not visible
    assert r.read_block("logprob").shape == (1, 5, 3)
    r.append(20, _values(20))  # resumes at the same position and overwrites the partial chunks
    r2 = StepStore.open(path)
    assert r2.steps == [10, 20]
    np.testing.assert_array_equal(r2.read("logprob", 20), _values(20)["logprob"])
    np.testing.assert_array_equal(r2.read("a/../b", 20), _values(20)["a/../b"])
