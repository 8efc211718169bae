"""GPU workers: the fit and the token log-probs on CUDA equal the CPU path within float32 rounding.

The ``gpu`` tests need a CUDA device and are skipped (deselected by the
default ``-m 'not slow and not gpu'``) elsewhere; ``benchmarks/gpu.sh`` runs
them on a lent GPU machine. The first tests run anywhere: they check what
``--device`` means and that asking for a GPU that is not there is one line.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.engine import DEVICES, device_plan
from pipeline.errors import PipelineError
from pipeline.fit import fit_store, open_fit
from pipeline.store.ingest import ingest

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_device_plans_come_from_the_registry():
    assert set(DEVICES) == {"cpu", "cuda"}
    assert device_plan("cpu", "numba-threads", None) == ("numba-threads", None)
    assert device_plan("cpu", "numba", "tcp://h:1") == ("numba", "tcp://h:1")
    with pytest.raises(PipelineError, match="runs the torch backend, not --backend numba-threads"):
        device_plan("cuda", "numba-threads", None)
    with pytest.raises(PipelineError, match="unknown device"):
        device_plan("tpu", "numba", None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_device_cuda_without_a_gpu_is_one_line(tiny_run_fp32, tmp_path):
    r = CliRunner().invoke(app, ["fit", str(tmp_path / "nothing.zarr"), "--device", "cuda"])
    assert r.exit_code == 2
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "no CUDA device is visible" in lines[0], r.output


@pytest.fixture(scope="module")
def bf16_store(tiny_run_bf16, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "run.zarr"
    ingest(tiny_run_bf16, out, progress=False)
    return out


def _assert_close_fits(a_dir, b_dir) -> None:
    a, b = open_fit(a_dir), open_fit(b_dir)
    assert a.tensor_names == b.tensor_names and a.steps == b.steps
    for name in a.tensor_names:
        assert sorted(a[name].data_vars) == sorted(b[name].data_vars), name
        for var in a[name].data_vars:
            x, y = a[name][var].values, b[name][var].values
            np.testing.assert_array_equal(np.isnan(x), np.isnan(y), err_msg=f"{name} {var}")
            np.testing.assert_allclose(x, y, rtol=4 * 2.0**-23, atol=1e-30,
                                       err_msg=f"{name} {var}")
    for sel in ("moving", "paper"):
        ha, hb = a.histograms(sel), b.histograms(sel)
        # counts may move by an element whose R² sits on a bin edge (float64 summation order)
        for var in ("count", "null_count"):
            diff = np.abs(ha[var].values.astype(np.int64) - hb[var].values).sum()
            assert diff <= 2 * len(a.tensor_names), (sel, var, diff)
            assert ha[var].values.sum() == hb[var].values.sum()


@pytest.mark.gpu
@needs_gpu
def test_fit_on_cuda_equals_the_cpu_fit(bf16_store, tmp_path):
    cpu = fit_store(bf16_store, tmp_path / "cpu.fit", executor="serial", progress=False,
                    block_bytes=64 << 10)
    gpu = fit_store(bf16_store, tmp_path / "gpu.fit", executor="serial", backend="torch",
                    progress=False, block_bytes=64 << 10)
    _assert_close_fits(cpu.fit_dir, gpu.fit_dir)


@pytest.mark.gpu
@needs_gpu
def test_cli_device_cuda_fits_on_gpu_workers(bf16_store, tmp_path):
    try:
        import dask_cuda  # noqa: F401

        cluster: list[str] = []  # --device cuda's own LocalCUDACluster
    except ImportError:
        cluster = ["--cluster", "local"]  # no dask-cuda here: torch workers on a LocalCluster
    ref = fit_store(bf16_store, tmp_path / "cpu.fit", executor="serial", progress=False)
    r = CliRunner().invoke(app, ["fit", str(bf16_store), "--out", str(tmp_path / "gpu.fit"),
                                 "--device", "cuda", "--no-progress", *cluster])
    assert r.exit_code == 0, r.output
    _assert_close_fits(ref.fit_dir, tmp_path / "gpu.fit")


@pytest.mark.gpu
@needs_gpu
def test_token_logprobs_on_cuda_equal_the_cpu(tiny_run_fp32, tmp_path):
    from test_logprobs import make_probes

    from pipeline.outputs.logprob_store import LogprobStore, compute_logprobs
    from pipeline.outputs.records import write_probes

    probes = tmp_path / "probes.jsonl"
    write_probes(probes, make_probes(tiny_run_fp32))
    cpu = compute_logprobs(tiny_run_fp32, probes, tmp_path / "cpu.zarr", progress=False)
    gpu = compute_logprobs(tiny_run_fp32, probes, tmp_path / "gpu.zarr", device="cuda",
                           progress=False)
    a, b = LogprobStore(cpu.store), LogprobStore(gpu.store)
    assert a.steps == b.steps
    for what in ("logprob", "logit"):
        np.testing.assert_allclose(a.values(what), b.values(what), rtol=1e-4, atol=1e-4)
