"""``analyze``: one workflow (ingest, fit, report, extrapolate) equals the commands run one by one.

Both run on the same real LocalCluster (reached by address, as a shared
scheduler would be); the cached tiny run is only read, everything else goes
to tmp_path through a catalog.
"""

from __future__ import annotations

import pytest
from fit_checks import assert_same_fit
from safetensors.numpy import load_file
from typer.testing import CliRunner

from pipeline.analyze import REPORT_PAGE, analysis_paths, analyze, default_target
from pipeline.cli import app
from pipeline.errors import PipelineError
from pipeline.extrapolate import methods


@pytest.fixture(scope="module")
def scheduler():
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, memory_limit="1.5GB",
                      dashboard_address=":0") as cluster:
        yield cluster.scheduler_address


@pytest.fixture
def catalog(tmp_path, tiny_run_fp32):
    cat = tmp_path / "catalog.yaml"
    runs = "".join(f"  {n}:\n    checkpoints: {tiny_run_fp32}\n    store: {n}/run.zarr\n"
                   f"    outputs: {n}/outputs\n" for n in ("whole", "staged"))
    cat.write_text(f"runs:\n{runs}")
    return cat


def _tensors(folder) -> dict:
    out: dict = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_analyze_equals_the_stages_one_by_one(catalog, scheduler):
    stages = analyze("whole", scheduler, catalog)
    assert [s.stage for s in stages] == ["ingest", "fit", "report", "extrapolate"]
    whole = analysis_paths("whole", catalog)
    staged = analysis_paths("staged", catalog)
    steps = sorted(int(p.name.split("_")[-1]) for p in whole.checkpoints.glob("global_step_*"))
    target = default_target(steps)
    # the RL-Extra experiment's plot, where workflows/rl_extra_experiment.py puts it for an entry
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 10], [0.1, 0.2])
    (staged.outputs / "rl_extra_experiment").mkdir(parents=True)
    fig.savefig(staged.outputs / "rl_extra_experiment" / "accuracy.png")
    plt.close(fig)
    cli = CliRunner()
    for args in (["ingest", "staged", "--no-progress"], ["fit", "staged", "--no-progress"],
                 ["report", "staged"],
                 ["extrapolate", "staged", "--to", str(target), "--no-progress",
                  "--out", str(staged.outputs / "by-hand")]):
        r = cli.invoke(app, [*args, "--catalog", str(catalog),
                             *(["--cluster", scheduler] if args[0] in ("ingest", "fit") else [])])
        assert r.exit_code == 0, r.output
    assert_same_fit(whole.fit_dir, staged.outputs / "fit", csv=True)
    assert (whole.report_dir / REPORT_PAGE).exists()
    title = "RL-Extra vs GRPO"
    assert title not in (whole.report_dir / REPORT_PAGE).read_text()
    assert title in (staged.outputs / "fit" / "report" / REPORT_PAGE).read_text()
    exported = whole.outputs / f"extrapolated-{methods.DEFAULT_METHOD}-step{target}"
    a, b = _tensors(exported), _tensors(staged.outputs / "by-hand")
    assert a.keys() == b.keys() and a
    for name in a:
        assert (a[name] == b[name]).all(), name
    assert (exported / "config.json").exists()

    # re-running is cheap: every stage finds its outputs current and rewrites nothing
    before = {p: p.stat().st_mtime_ns for p in whole.outputs.rglob("*") if p.is_file()}
    again = {s.stage: s.did for s in analyze("whole", scheduler, catalog)}
    assert again["ingest"].startswith("0 steps ingested")
    assert all(again[s].startswith("up to date") for s in ("fit", "report", "extrapolate"))
    r = cli.invoke(app, ["analyze", "whole", "--catalog", str(catalog), "--cluster", scheduler])
    assert r.exit_code == 0, r.output
    assert "Analysis of whole" in r.output and "extrapolate" in r.output
    after = {p: p.stat().st_mtime_ns for p in whole.outputs.rglob("*") if p.is_file()}
    assert after == before


def test_bad_target_is_one_line(tmp_path):
    with pytest.raises(PipelineError, match="not a run folder or a catalog entry"):
        analysis_paths(tmp_path / "missing")
    r = CliRunner().invoke(app, ["analyze", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "not a run folder" in r.output
