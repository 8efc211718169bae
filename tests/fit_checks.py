"""Shared assertion for tests: two fit folders hold the same results, bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.fit import open_fit


def assert_same_fit(a_dir: Path, b_dir: Path, csv: bool = False) -> None:
    """Same steps, tensors, result arrays (the same ones, bit for bit) and histograms;
    optionally the CSVs."""
    a, b = open_fit(a_dir), open_fit(b_dir)
    assert a.tensor_names == b.tensor_names and a.steps == b.steps
    for name in a.tensor_names:
        fields = sorted(a[name].data_vars)
        assert fields == sorted(b[name].data_vars), name
        for var in fields:
            np.testing.assert_array_equal(a[name][var].values, b[name][var].values,
                                          err_msg=f"{name} {var}")
    for sel in ("moving", "paper"):
        assert a.histograms(sel).equals(b.histograms(sel))
    if csv:
        for f in sorted(p.name for p in Path(a_dir).glob("summary_*.csv")):
            assert (Path(a_dir) / f).read_text() == (Path(b_dir) / f).read_text()
