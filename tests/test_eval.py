"""Evaluation on real tiny-run checkpoints: greedy scores, sampled resume, refusals, the CLI."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import PipelineError
from pipeline.evaluation.runner import (
    METRICS,
    SAMPLES,
    SETTINGS,
    ModelRef,
    evaluate,
    resolve_model,
)
from pipeline.evaluation.tasks import get_task
from pipeline.outputs.sampling import Sampling


def _ckpt(run, step):
    return run / f"global_step_{step}"


def _sampled(task, **kw):
    return Sampling(temperature=1.0, max_new_tokens=task.max_new_tokens, seed=3, **kw)


def test_greedy_eval_equals_greedy_accuracy(tiny_run_linear):
    """Independent reference: the training code's own held-out scorer (HF generate)."""
    from pipeline.extrapolate.alpha_sweep import heldout_problems, score_folder

    folder = _ckpt(tiny_run_linear, 200)
    task = get_task("heldout", [folder])  # the run is found from the checkpoint folder
    ref_problems = heldout_problems(tiny_run_linear)
    assert [(p.prompt, p.answer) for p in task.problems] == \
        [(p.prompt, p.answer) for p in ref_problems]
    greedy = Sampling(temperature=0.0, max_new_tokens=task.max_new_tokens)
    res = evaluate([ModelRef(folder, 200)], task, 1, greedy, progress=False)
    ref = score_folder(folder, ref_problems)
    assert 0.05 < ref < 1.0  # a model that is neither hopeless nor perfect: a real comparison
    assert res.summary.overall["avg@1"].value == ref
    assert res.summary.overall["pass@1"].value == pytest.approx(ref)
    ci = res.summary.overall["avg@1"]
    assert ci.low < ref < ci.high


def test_resume_after_a_crash_gives_the_uninterrupted_results(tiny_run_fp32, tmp_path):
    folder = _ckpt(tiny_run_fp32, 40)
    task = get_task("heldout", [folder]).head(24)
    sampling = _sampled(task)
    models = [ModelRef(folder, 40)]
    full = evaluate(models, task, 4, sampling, out=tmp_path / "full", batch_size=7,
                    progress=False)
    assert full.generated == 96 and full.reused == 0
    c = full.summary.correct
    assert 0 < sum(c) < 96 and any(0 < x < 4 for x in c)  # sampling made mixed outcomes

    part = tmp_path / "part"
    part.mkdir()
    shutil.copy(tmp_path / "full" / SETTINGS, part / SETTINGS)
    lines = (tmp_path / "full" / SAMPLES).read_text().splitlines(keepends=True)
    kept = lines[:37]  # mid-problem: problem 9 has one of its four samples
    (part / SAMPLES).write_text("".join(kept) + lines[37][: len(lines[37]) // 2])  # torn line
    resumed = evaluate(models, task, 4, sampling, out=part, batch_size=5, progress=False)
    assert resumed.reused == 37 and resumed.generated == 96 - 37
    assert json.loads((part / METRICS).read_text()) == json.loads(
        (tmp_path / "full" / METRICS).read_text())

    def recs(d):
        return sorted((json.loads(x) for x in (d / SAMPLES).read_text().splitlines()),
                      key=lambda r: (r["prompt_index"], r["sample"]))

    assert recs(part) == recs(tmp_path / "full")
    # a finished folder re-scores without generating anything, also from a moved model
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)
    again = evaluate([ModelRef(moved, 40)], task, 4, sampling, out=part, progress=False)
    assert again.generated == 0 and again.summary == resumed.summary


def test_other_settings_are_refused_and_leave_the_folder_alone(tiny_run_fp32, tmp_path):
    folder = _ckpt(tiny_run_fp32, 40)
    task = get_task("heldout", [folder]).head(4)
    out = tmp_path / "res"
    evaluate([ModelRef(folder, 40)], task, 2, _sampled(task), out=out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    cases = [
        (dict(k=3), r"k: 2 there, 3 now"),
        (dict(sampling=Sampling(temperature=0.5, max_new_tokens=task.max_new_tokens, seed=3)),
         r"sampling\.temperature: 1\.0 there, 0\.5 now"),
        (dict(models=[ModelRef(_ckpt(tiny_run_fp32, 30), 30)]), r"models\.0\.weights"),
        (dict(task=get_task("heldout", [folder]).head(5)), r"n_problems: 4 there, 5 now"),
    ]
    for change, match in cases:
        kw = dict(models=[ModelRef(folder, 40)], task=task, k=2, sampling=_sampled(task))
        kw.update(change)
        with pytest.raises(PipelineError, match=match) as e:
            evaluate(**kw, out=out, progress=False)
        assert "settings.json" in str(e.value) and "\n" not in str(e.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_bad_input_writes_nothing(tiny_run_fp32, tmp_path):
    folder = _ckpt(tiny_run_fp32, 40)
    task = get_task("heldout", [folder]).head(2)
    out = tmp_path / "res"
    with pytest.raises(PipelineError, match="-k must be >= 1"):
        evaluate([ModelRef(folder)], task, 0, _sampled(task), out=out)
    with pytest.raises(PipelineError, match="--top-p"):
        evaluate([ModelRef(folder)], task, 1, _sampled(task, top_p=0.0), out=out)
    with pytest.raises(PipelineError, match="needs two models"):
        evaluate([ModelRef(folder)], task, 1, _sampled(task), alpha=2.0, out=out)
    assert not out.exists()


def test_damaged_samples_file_is_named_by_line(tiny_run_fp32, tmp_path):
    folder = _ckpt(tiny_run_fp32, 40)
    task = get_task("heldout", [folder]).head(3)
    out = tmp_path / "res"
    evaluate([ModelRef(folder)], task, 2, _sampled(task), out=out, progress=False)
    lines = (out / SAMPLES).read_text().splitlines(keepends=True)
    (out / SAMPLES).write_text("".join(lines[:2]) + "{not json}\n" + "".join(lines[2:]))
    with pytest.raises(PipelineError, match=r"samples\.jsonl:3: not valid JSON"):
        evaluate([ModelRef(folder)], task, 2, _sampled(task), out=out, progress=False)
    (out / SAMPLES).write_text("".join(lines[:2]) + lines[1])
    with pytest.raises(PipelineError, match=r"samples\.jsonl:3: problem '\d+' sample 1 repeated"):
        evaluate([ModelRef(folder)], task, 2, _sampled(task), out=out, progress=False)


def test_logits_pair_at_alpha_one_is_the_late_model(tiny_run_fp32):
    early, late = _ckpt(tiny_run_fp32, 20), _ckpt(tiny_run_fp32, 40)
    task = get_task("heldout", [late]).head(16)
    s = _sampled(task)
    alone = evaluate([ModelRef(late, 40)], task, 3, s, progress=False).summary
    pair = evaluate([ModelRef(early, 20), ModelRef(late, 40)], task, 3, s, alpha=1.0,
                    progress=False).summary
    assert pair.correct == alone.correct


def test_model_arguments(tiny_run_fp32, tmp_path):
    ref = resolve_model(f"{tiny_run_fp32}@30")
    assert ref == ModelRef(_ckpt(tiny_run_fp32, 30), 30)
    assert resolve_model(str(_ckpt(tiny_run_fp32, 10))).step == 10
    with pytest.raises(PipelineError, match=r"RUN@STEP"):
        resolve_model(str(tiny_run_fp32))
    with pytest.raises(PipelineError, match=r"no checkpoint at step 35 \(has \[0, 10"):
        resolve_model(f"{tiny_run_fp32}@35")


def _cli(*args):
    return CliRunner().invoke(app, ["eval", *map(str, args)])


def test_cli_eval_checkpoint_and_pair(tiny_run_fp32, tmp_path):
    late = _ckpt(tiny_run_fp32, 40)
    r = _cli(late, "--task", "heldout", "-k", "2", "--n", "6", "--temperature", "1",
             "--out", tmp_path / "one")
    assert r.exit_code == 0, r.output
    assert "avg@2" in r.output and "pass@2" in r.output
    doc = json.loads((tmp_path / "one" / METRICS).read_text())
    assert doc["n_problems"] == 6 and doc["k"] == 2 and doc["settings"]["alpha"] == 1.0
    r = _cli(f"{tiny_run_fp32}@20", f"{tiny_run_fp32}@30", "--to", "40", "--task",
             f"heldout:{tiny_run_fp32}", "-k", "1", "--n", "6", "--temperature", "0",
             "--out", tmp_path / "pair")
    assert r.exit_code == 0, r.output
    settings = json.loads((tmp_path / "pair" / SETTINGS).read_text())
    assert settings["alpha"] == 2.0 and settings["target_step"] == 40.0
    assert [m["step"] for m in settings["models"]] == [20, 30]


@pytest.mark.parametrize("args, match", [
    (["-k", "0"], "-k must be >= 1"),
    (["--task", "nope"], "unknown --task 'nope'"),
    (["--n", "0"], "--n must be >= 1"),
    (["--alpha", "2"], "need two models"),
    (["--temperature", "nan"], "--temperature must be a finite number"),
    (["--device", "gpu0"], "unknown --device 'gpu0'"),
    (["--dtype", "int8"], "unknown dtype 'int8'"),
])
def test_cli_eval_bad_input_is_one_line(tiny_run_fp32, tmp_path, args, match):
    r = _cli(_ckpt(tiny_run_fp32, 40), "--task", "heldout", *args, "--out", tmp_path / "o")
    assert r.exit_code == 2, r.output
    assert match in r.output and r.output.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_cli_eval_pair_needs_alpha_or_steps(tiny_run_fp32, tmp_path):
    a, b = tiny_run_fp32 / "global_step_20", tiny_run_fp32 / "global_step_30"
    r = _cli(a, b, "--task", "heldout")
    assert r.exit_code == 2 and "--alpha or --to" in r.output
    r = _cli(b, a, "--to", "40", "--task", "heldout")
    assert r.exit_code == 2 and "early model first" in r.output
    r = _cli(a, b, "--to", "10", "--task", "heldout", "--out", tmp_path / "neg")
    assert r.exit_code == 2 and "alpha -1 is negative" in r.output
    assert not (tmp_path / "neg").exists()


def test_rows_decoder_draws_what_public_decode_draws(tiny_run_fp32):
    """The resume path decodes chosen rows; a full set of rows must be decode's own output."""
    from pipeline.errors import PipelineError
    from pipeline.evaluation.runner import decode_rows
    from pipeline.outputs.generate import decode
    from pipeline.outputs.models import load_model

    m = [load_model(_ckpt(tiny_run_fp32, 40))]
    prompts = [p.prompt for p in get_task("heldout", [m[0].path]).problems[:10]]
    s = Sampling(temperature=1.0, max_new_tokens=4, seed=11)
    ref = {(c.prompt_index, c.sample): c for c in decode(m, prompts, 3, s, batch_size=8)}
    rows = sorted(ref, reverse=True)  # another order, other batches
    got = {(c.prompt_index, c.sample): c for c in decode_rows(m, prompts, 3, s, 1.0, 4)(rows)}
    assert got == ref
    some = rows[::4]
    assert {(c.prompt_index, c.sample): c for c in decode(m, prompts, 3, s, rows=some)} == {
        r: ref[r] for r in some}
    with pytest.raises(PipelineError, match=r"row \(10, 0\) is outside 10 prompts x k=3"):
        decode(m, prompts, 3, s, rows=[(10, 0)])
    assert len({c.text for c in ref.values()}) > 3  # really sampled


def test_exported_model_needs_its_run_named(tiny_run_fp32, tmp_path):
    """An extrapolated export sits outside the run: --task heldout:RUN names the problems."""
    from pipeline.extrapolate.export import export, make_spec
    from pipeline.extrapolate.sources import CheckpointSource

    src = CheckpointSource.from_run_dir(tiny_run_fp32)
    export(src, tmp_path / "x", make_spec(src, "two-point", to=50, steps=[30, 40]))
    r = _cli(tmp_path / "x", "--task", "heldout", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "--task heldout:RUN" in r.output
    r = _cli(tmp_path / "x", "--task", f"heldout:{tiny_run_fp32}", "-k", "1", "--n", "8",
             "--temperature", "0", "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "o" / METRICS).read_text())
    assert doc["settings"]["models"][0]["step"] is None and doc["n_problems"] == 8


def test_cli_pair_steps_given_for_unnamed_folders(tiny_run_fp32, tmp_path):
    a, b = tmp_path / "early", tmp_path / "late"
    shutil.copytree(_ckpt(tiny_run_fp32, 20), a)
    shutil.copytree(_ckpt(tiny_run_fp32, 30), b)
    task = ["--task", f"heldout:{tiny_run_fp32}", "-k", "1", "--n", "3", "--temperature", "0"]
    r = _cli(a, b, "--to", "40", *task)
    assert r.exit_code == 2 and "--to needs the steps of both models" in r.output
    r = _cli(a, b, "--steps", "30", "20", "--to", "40", *task)
    assert r.exit_code == 2 and "early model first" in r.output
    r = _cli(a, b, "--steps", "20", "30", "--to", "40", *task, "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "o" / SETTINGS).read_text())["alpha"] == 2.0


def test_cli_eval_refuses_an_output_inside_a_model(tiny_run_fp32):
    ckpt = _ckpt(tiny_run_fp32, 40)
    r = _cli(ckpt, "--task", "heldout", "--out", ckpt / "results")
    assert r.exit_code == 2 and "is inside a model folder" in r.output
    assert not (ckpt / "results").exists()


def test_cli_eval_catalog_names(tiny_run_fp32, tmp_path):
    cat = tmp_path / "catalog.yaml"
    cat.write_text(f"runs:\n  tiny:\n    checkpoints: {tiny_run_fp32}\n"
                   f"    store: {tmp_path / 's.zarr'}\n    outputs: {tmp_path / 'o'}\n")
    r = _cli("tiny@40", "--task", "heldout:tiny", "--catalog", cat, "-k", "1", "--n", "4",
             "--temperature", "0", "--out", tmp_path / "res")
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "res" / SETTINGS).read_text())
    assert s["task"] == f"heldout:{tiny_run_fp32.resolve()}" and s["models"][0]["step"] == 40
    r = _cli("nope@40", "--catalog", cat)
    assert r.exit_code == 2 and "no run named 'nope'" in r.output
